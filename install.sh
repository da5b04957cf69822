#!/bin/sh
# Air-gap installer for an RKE2-style distribution built by this project (python -m builder).
#
# Usage:
#   INSTALL_RKE2_ARTIFACT_PATH=/media/release sh install.sh           # offline, from a directory
#   INSTALL_RKE2_RELEASE_URL=https://mirror/rke2/v1.32.13 sh install.sh  # online, from a URL
#   INSTALL_RKE2_ARTIFACT_PATH=/media/delta sh install.sh             # offline, a delta (below)
#
# Runs under any POSIX sh (dash, busybox ash, bash) with tar, gzip (zstd if present),
# sha256sum and the usual file utilities; openssl only when a public key is given; curl or wget
# only for a release URL; dd, tail -c and head -c only for a delta (below). No Python, no jq, no
# network in offline mode.
#
# Delta install (offline only): INSTALL_RKE2_ARTIFACT_PATH names a delta directory, made by
# `python -m builder build --since PREV` (recognised by its delta.linux-ARCH.txt; see below).
#
# ---------------------------------------------------------------------------------------------
# Release name and variable names
#   The distribution's name (NAME, default rke2) is a build setting, and every variable of this
#   installer carries it: INSTALL_<UPPER>_<SETTING>, where UPPER is NAME upper-cased with '-'
#   and '.' mapped to '_' (rke2 -> RKE2). NAME is found, in this order:
#     1. INSTALL_RELEASE_NAME, when set (e.g. INSTALL_RELEASE_NAME=rke2);
#     2. else the one UPPER for which INSTALL_<UPPER>_ARTIFACT_PATH or INSTALL_<UPPER>_RELEASE_URL
#        is set; NAME is then read from the bundle line (NAME.linux-ARCH.tar.gz, a name without
#        "-images") of the checksum file;
#     3. else rke2.
#   Settings are read only through the `setting` helper, which checks that UPPER is [A-Z0-9_]
#   before it builds a variable name with eval, so no value is ever evaluated as code.
#
# Settings (INSTALL_<UPPER>_...):
#   ARTIFACT_PATH     directory holding the artifacts (offline mode)
#   RELEASE_URL       base URL of the artifacts (online mode: files are downloaded into the
#                     private work dir with curl or wget, then installed exactly as offline)
#   CHANNEL           online mode only (refused with ARTIFACT_PATH: an air-gapped install asks
#                     no channel server, and the version is the one on the media). As upstream:
#                     the version is VERSION when set, else the last path component of the URL
#                     CHANNEL_URL/CHANNEL redirects to; RELEASE_URL is then the root holding one
#                     directory per version (GitHub's releases/download/ layout), the release is
#                     taken from RELEASE_URL/<version>/ and must be that version.
#   CHANNEL_URL       the channel server's base URL (required with CHANNEL; upstream's is
#                     https://update.rke2.io/v1-release/channels)
#   TYPE              server (default) or agent: the systemd unit (EXEC: upstream's alias)
#   VERSION           expected release version (e.g. v1.32.13+rke2r1); refused when different
#   TAR_PREFIX        where the bundle goes (default /usr/local, or /opt/NAME when /usr/local
#                     is read-only or a mount point, as upstream; an explicit prefix that is
#                     not writable is an error)
#   DATA_DIR          default /var/lib/rancher/NAME
#   AGENT_IMAGES_DIR  default DATA_DIR/agent/images
#   IMAGES            image groups to install, space separated: group names from the release
#                     (core, canal, cilium, ...), "default" (the all-in-one archive, the
#                     default), or "all" (every group)
#   PUBLIC_KEY        PEM public key file (received out of band); sha256sum-ARCH.txt.sig must
#                     verify with it (Ed25519 via `openssl pkeyutl -rawin`, OpenSSL >= 3.0;
#                     ECDSA P-256 via `openssl dgst -sha256`)
#   SKIP_SIGNATURE    true: install a signed release (one with sha256sum-ARCH.txt.sig) without
#                     checking its signature. Without it, a signed release and no PUBLIC_KEY is
#                     refused. A release without .sig installs with an "UNSIGNED" warning.
#   ALLOW_DOWNGRADE   true: install a version older than the one installed in the prefix
#                     (refused otherwise: replaying an old signed release is an attack)
#   ENABLE            true: enable the unit          START  true: (re)start the unit
#                     By default, as upstream, the unit is neither enabled nor started and the
#                     next steps are printed: the node needs /etc/rancher/NAME/config.yaml
#                     first (a server started early bootstraps its own cluster instead of
#                     joining one). SKIP_ENABLE/SKIP_START (earlier opt-outs) are accepted: true
#                     asks for the default; with ENABLE/START=true they are refused.
#   SKIP_RELOAD       true: do not run systemctl daemon-reload after installing
#   METHOD            only "tar" (upstream's rpm method needs rancher's package repositories);
#                     upstream's COMMIT and RPM_RELEASE_VERSION are refused, SKIP_FAPOLICY is
#                     accepted (no fapolicyd rules are written)
# ENABLE, START, SKIP_ENABLE, SKIP_START and SKIP_RELOAD take true or false (also TRUE, yes, 1 /
# FALSE, no, 0); anything else is an error.
# Also: ARCH (amd64|arm64|s390x, default from uname -m), DEBUG=1 (trace), TMPDIR (the private
# work dir: it needs room for the bundle and the selected image archives; on the images dir's
# file system they are moved into place instead of copied).
#
# The media is read once and is never code: every file used (checksum file, signature, bundle,
# image archives, lists) is copied once into a private work dir (online: downloaded there) and
# every hash, listing, extraction and read uses that copy, so media that changes between two
# reads cannot change what is installed. Release files must be regular files (no symlinks,
# devices or FIFOs); archives may hold only regular files and directories (no links, devices,
# FIFOs, absolute or '..' names), and are extracted without their owners and without setuid,
# setgid, sticky or world-writable bits. The release description (share/NAME/release.env) is
# parsed as data (known keys, a strict character set), never sourced. Nothing read from a file
# that fails a check is printed.
#
# Delta install. A delta directory holds, per arch, the new release's sha256sum-ARCH.txt (and
#   .sig), every file it lists except the image archives (bundle, image lists, provenance), the
#   description delta.linux-ARCH.txt, and per image archive X.tar.zst / X.tar.gz a delta archive
#   X.delta.tar.zst / X.delta.tar.gz: only the compressed frames the base release's X lacks. The
#   node must have the base release (the PREV of `build --since PREV`) installed by this
#   installer: its checksum file, kept at PREFIX/share/NAME/sha256sum-ARCH.txt by every install,
#   and, in the images dir, the base's file of every archive this install selects (and of the
#   runtime's archive when the selection holds neither it nor the all-in-one one), unchanged.
#   Each selected archive X is rebuilt, byte for byte, in the private work dir (room for the
#   delta archives and the rebuilt X; TMPDIR) from byte ranges of the base's X and of the delta
#   archive, each range checked against its sha256 in the description; the result must then match
#   the signed checksum file like a full release's X, and the install goes on exactly as a full
#   install of the new release, leaving the node exactly as that would. The byte ranges are read
#   with `dd skip | tail -c +N | head -c LEN` (dd seeks, as busybox's tail does not): head -c is
#   not POSIX, but GNU coreutils, busybox and the BSDs have it. The description is parsed as data
#   (a strict line format, at most 4 MiB). Refused before anything is changed: a node without the
#   base (no kept checksum file, another release's, a base archive missing or changed), a
#   description that is malformed or not for this checksum file and bundle, a delta archive or a
#   piece that does not match its sha256 (the error names the piece's blob). The description is
#   not signed and need not be: the rebuilt archives are checked against the signed checksum
#   file. A second run of the same delta, once installed, changes nothing.
#
# Exit status: 0 installed (or already installed, nothing changed); 1 any failure. Everything
# is verified before the target is touched (checksum file present and well formed, signature,
# every file to install listed and matching, archive members, arch, version, no downgrade),
# then staged beside its destination and moved into place at the end: a failure at any point,
# disk full included, leaves the prefix, data dir and images dir as they were. Files identical
# to what is installed are not rewritten, so a second run changes nothing. Every path created
# is recorded in PREFIX/share/NAME/installed-files, which bin/NAME-uninstall.sh reads; the
# verified checksum file is kept as PREFIX/share/NAME/sha256sum-ARCH.txt (the base a delta checks).
# ---------------------------------------------------------------------------------------------
set -e
umask 022

if [ -n "${DEBUG:-}" ]; then
    set -x
fi

NL='
'
WORK=''
COMMITTED=0

info() {
    echo "[INFO]  $*"
}

warn() {
    echo "[WARN]  $*" >&2
}

fatal() {
    echo "[ERROR] $*" >&2
    exit 1
}

# --- temp space and rollback ------------------------------------------------------------------

# cleanup runs on every exit: before the commit it removes everything staged in the target and
# every directory this run created there; in all cases it removes the private work dir.
cleanup() {
    status=$?
    set +e
    if [ "$COMMITTED" != 1 ] && [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ -s "$WORK/staged" ]; then
            while IFS= read -r path; do
                rm -rf -- "$path"
            done < "$WORK/staged"
        fi
        if [ -s "$WORK/created-dirs" ]; then
            # Reverse order of names puts every child before its parent.
            sort -r "$WORK/created-dirs" | while IFS= read -r dir; do
                rmdir -- "$dir" 2>/dev/null
            done
        fi
    fi
    if [ -n "$WORK" ]; then
        rm -rf -- "$WORK"
    fi
    exit "$status"
}

setup_work() {
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/install.XXXXXXXX") || fatal "cannot create a temp dir in ${TMPDIR:-/tmp}"
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    : > "$WORK/staged"
    : > "$WORK/created-dirs"
    : > "$WORK/plan"
    : > "$WORK/manifest.add"
    # The one private copy of every media file used (see take).
    mkdir "$WORK/media"
}

# --- settings -----------------------------------------------------------------------------------

upper_of() {
    printf '%s' "$1" | tr 'abcdefghijklmnopqrstuvwxyz.-' 'ABCDEFGHIJKLMNOPQRSTUVWXYZ__'
}

# setting KEY: the value of INSTALL_<UPPER>_KEY, empty when unset. KEY is always a literal of this
# script and UPPER is checked by check_upper, so the eval only ever expands a variable.
setting() {
    eval "printf '%s' \"\${INSTALL_${UPPER}_$1:-}\""
}

check_upper() {
    case $UPPER in
        '' | [!A-Z]* | *[!A-Z0-9_]*) fatal "release name '$1' gives no usable variable prefix (got '$UPPER')" ;;
    esac
}

is_true() {
    case $1 in
        true | TRUE | True | yes | 1) return 0 ;;
    esac
    return 1
}

# flag KEY: the boolean setting INSTALL_<UPPER>_KEY in FLAG (true or false; unset is false). A
# value that is neither is refused: a typo must not silently mean "no".
flag() {
    FLAG=$(setting "$1")
    case $FLAG in
        true | TRUE | True | yes | 1) FLAG=true ;;
        '' | false | FALSE | False | no | 0) FLAG=false ;;
        *) fatal "INSTALL_${UPPER}_$1=$FLAG: expected true or false" ;;
    esac
}

# The name part of the INSTALL_<X>_ARTIFACT_PATH / _RELEASE_URL variables that are set.
source_prefixes() {
    env | sed -n -e 's/^INSTALL_\([A-Z0-9][A-Z0-9_]*\)_ARTIFACT_PATH=.*/\1/p' \
        -e 's/^INSTALL_\([A-Z0-9][A-Z0-9_]*\)_RELEASE_URL=.*/\1/p' | sort -u
}

setup_name_hint() {
    NAME=''
    if [ -n "${INSTALL_RELEASE_NAME:-}" ]; then
        NAME=$INSTALL_RELEASE_NAME
        check_name
        UPPER=$(upper_of "$NAME")
    else
        prefixes=$(source_prefixes)
        case $prefixes in
            '') NAME=rke2; UPPER=RKE2 ;;
            *"$NL"*) fatal "several INSTALL_<NAME>_ARTIFACT_PATH/_RELEASE_URL variables are set ($(echo "$prefixes" | tr '\n' ' ')); set INSTALL_RELEASE_NAME to choose" ;;
            *) UPPER=$prefixes ;;
        esac
    fi
    check_upper "${NAME:-$UPPER}"
}

check_name() {
    case $NAME in
        '' | [!a-z0-9]* | *[!a-z0-9._-]*) fatal "release name '$NAME' is not a lower-case name ([a-z0-9._-])" ;;
    esac
}

# --- the release's names -------------------------------------------------------------------------
# One function per rule; builder/artifacts.py holds the same rules and tests/test_artifacts.py
# runs these functions to pin them against it.

# arch_name MACHINE: the release's arch for an arch name or `uname -m` (fails for an arch this
# installer does not install).
arch_name() {
    case $1 in
        amd64 | x86_64) echo amd64 ;;
        arm64 | aarch64) echo arm64 ;;
        s390x) echo s390x ;;
        *) return 1 ;;
    esac
}

# sums_name ARCH: the checksum file (its signature is the same name plus .sig).
sums_name() {
    echo "sha256sum-$1.txt"
}

# bundle_name NAME ARCH: the bundle (with NAME empty: the suffix every bundle name ends with).
bundle_name() {
    echo "$1.linux-$2.tar.gz"
}

# images_base NAME GROUP ARCH: an image group's archive without its suffix (.tar.zst, .tar.gz, .txt).
images_base() {
    echo "$1-images-$2.linux-$3"
}

# delta_name ARCH: a delta's description (a delta directory holds it beside the new checksum file).
delta_name() {
    echo "delta.linux-$1.txt"
}

# delta_archive_name FILE: the delta archive of image archive FILE (X.tar.zst -> X.delta.tar.zst,
# X.tar.gz -> X.delta.tar.gz); fails for another name.
delta_archive_name() {
    case $1 in
        *.tar.zst) echo "${1%.tar.zst}.delta.tar.zst" ;;
        *.tar.gz) echo "${1%.tar.gz}.delta.tar.gz" ;;
        *) return 1 ;;
    esac
}

# release_env_member NAME: where the bundle holds the release description.
release_env_member() {
    echo "share/$1/release.env"
}

setup_arch() {
    if [ -z "${ARCH:-}" ]; then
        ARCH=$(uname -m)
    fi
    arch=$(arch_name "$ARCH") || fatal "unsupported architecture '$ARCH' (amd64, arm64 and s390x are)"
    ARCH=$arch
}

setup_source() {
    ARTIFACT_PATH=$(setting ARTIFACT_PATH)
    RELEASE_URL=$(setting RELEASE_URL)
    if [ -n "$ARTIFACT_PATH" ] && [ -n "$RELEASE_URL" ]; then
        fatal "set only one of INSTALL_${UPPER}_ARTIFACT_PATH and INSTALL_${UPPER}_RELEASE_URL"
    fi
    CHANNEL=$(setting CHANNEL)
    CHANNEL_VERSION=''
    if [ -n "$CHANNEL" ] && [ -z "$RELEASE_URL" ]; then
        fatal "INSTALL_${UPPER}_CHANNEL=$CHANNEL: a channel is resolved to a version by asking a channel server, which an install from INSTALL_${UPPER}_ARTIFACT_PATH does not do (it may be air-gapped, and the version is the one on the media); unset INSTALL_${UPPER}_CHANNEL, and pin the version with INSTALL_${UPPER}_VERSION if you want it checked"
    fi
    if [ -n "$RELEASE_URL" ]; then
        RELEASE_URL=${RELEASE_URL%/}
        if command -v curl > /dev/null 2>&1; then
            DOWNLOADER=curl
        elif command -v wget > /dev/null 2>&1; then
            DOWNLOADER=wget
        else
            fatal "INSTALL_${UPPER}_RELEASE_URL needs curl or wget"
        fi
        if [ -n "$CHANNEL" ]; then
            resolve_channel
        fi
        SRC=$RELEASE_URL
        info "downloading the release from $RELEASE_URL"
    elif [ -n "$ARTIFACT_PATH" ]; then
        [ -d "$ARTIFACT_PATH" ] || fatal "INSTALL_${UPPER}_ARTIFACT_PATH=$ARTIFACT_PATH is not a directory"
        SRC=$ARTIFACT_PATH
    else
        fatal "set INSTALL_${UPPER}_ARTIFACT_PATH (a directory holding the release artifacts) or INSTALL_${UPPER}_RELEASE_URL"
    fi
}

# resolve_channel: online mode with INSTALL_<UPPER>_CHANNEL. As upstream's installer does, the
# version is INSTALL_<UPPER>_VERSION when set, else the last path component of the URL that
# CHANNEL_URL/CHANNEL redirects to; RELEASE_URL is then the root holding one directory per
# version (the layout of GitHub's releases/download/), and the release must be that version.
resolve_channel() {
    CHANNEL_VERSION=$(setting VERSION)
    if [ -n "$CHANNEL_VERSION" ]; then
        info "INSTALL_${UPPER}_VERSION=$CHANNEL_VERSION is set: channel $CHANNEL is not consulted"
    else
        channel_url=$(setting CHANNEL_URL)
        [ -n "$channel_url" ] || fatal "INSTALL_${UPPER}_CHANNEL=$CHANNEL needs INSTALL_${UPPER}_CHANNEL_URL, the channel server's base URL (upstream's is https://update.rke2.io/v1-release/channels; it names upstream versions, which $RELEASE_URL must then hold)"
        url=${channel_url%/}/$CHANNEL
        info "finding the release for channel $CHANNEL at $url"
        # Where the channel URL leads (itself when it does not redirect); empty when nothing
        # answered. The redirect's target need not exist (upstream's leads to a GitHub page).
        case $DOWNLOADER in
            curl) found=$(curl -sSL --retry 3 -o /dev/null -w '%{url_effective}' "$url" 2> /dev/null) || found='' ;;
            wget)
                rc=0
                headers=$(wget -S -q -O /dev/null "$url" 2>&1) || rc=$?
                found=''
                # 8: the server answered with an error status (after any redirects).
                if [ "$rc" = 0 ] || [ "$rc" = 8 ]; then
                    found=$(printf '%s\n' "$headers" | sed -n 's/^ *[Ll]ocation: *//p' | tail -n 1)
                    found=${found:-$url}
                fi
                ;;
        esac
        [ -n "$found" ] || fatal "cannot resolve channel $CHANNEL: $url did not answer; check INSTALL_${UPPER}_CHANNEL_URL"
        # GitHub's redirects encode '+' as %2B.
        CHANNEL_VERSION=$(printf '%s' "${found##*/}" | tr -d '\r' | sed 's/%2[Bb]/+/g')
    fi
    case $CHANNEL_VERSION in
        '' | *[!A-Za-z0-9.+-]*) fatal "channel $CHANNEL did not lead to a version (v<major>.<minor>.<patch>...): check INSTALL_${UPPER}_CHANNEL and INSTALL_${UPPER}_CHANNEL_URL" ;;
    esac
    split_version "$CHANNEL_VERSION" || fatal "channel $CHANNEL led to '$CHANNEL_VERSION', which is not a version (v<major>.<minor>.<patch>...): check INSTALL_${UPPER}_CHANNEL and INSTALL_${UPPER}_CHANNEL_URL"
    info "using $CHANNEL_VERSION as release"
    RELEASE_URL=$RELEASE_URL/$CHANNEL_VERSION
}

check_target_path() {
    case $2 in
        /*) ;;
        *) fatal "$1=$2 must be an absolute path" ;;
    esac
    case $2 in
        *"$NL"* | *'/../'* | *'/..') fatal "$1=$2 contains a newline or '..'" ;;
    esac
}

# mountinfo_path DIR: DIR as /proc/self/mountinfo writes paths (space, tab, newline and
# backslash as octal escapes).
mountinfo_path() {
    printf '%s' "$1" | sed -e 's/\\/\\134/g' -e 's/ /\\040/g' -e 's/	/\\011/g'
}

# on_read_only_fs DIR: the file system holding the existing directory DIR (symlinks resolved) is
# mounted read-only: the mount options of the longest mount point above it (mount or super
# block) hold "ro". Read from /proc/self/mountinfo, as test -w cannot tell: busybox's answers
# "writable" to root on any file system.
on_read_only_fs() {
    [ -r /proc/self/mountinfo ] || return 1
    real=$(cd -P -- "$1" && pwd -P) || return 1
    MOUNT_DIR=$(mountinfo_path "$real") awk '
        BEGIN { dir = ENVIRON["MOUNT_DIR"] }
        {
            mp = $5
            if (mp == dir || mp == "/" || substr(dir, 1, length(mp) + 1) == mp "/") {
                if (length(mp) >= best) { best = length(mp); opts = "," $6 "," $NF "," }
            }
        }
        END { exit !(index(opts, ",ro,") > 0) }' /proc/self/mountinfo
}

# writable_path DIR: true when DIR, or its nearest existing ancestor, can be written: test -w
# (access(2)) and a file system not mounted read-only. Creates nothing.
writable_path() {
    p=$1
    while [ ! -e "$p" ]; do
        p=$(dirname -- "$p")
    done
    [ -d "$p" ] && [ -w "$p" ] && ! on_read_only_fs "$p"
}

# is_mount_point DIR: DIR (symlinks resolved) is where a file system is mounted, i.e. a line of
# /proc/self/mountinfo names it (what upstream's `mountpoint -q` checks, without needing
# util-linux). mountinfo writes space, tab, newline and backslash as octal escapes.
is_mount_point() {
    [ -d "$1" ] && [ -r /proc/self/mountinfo ] || return 1
    real=$(cd -P -- "$1" && pwd -P) || return 1
    MOUNT_DIR=$(mountinfo_path "$real") \
        awk '$5 == ENVIRON["MOUNT_DIR"] { found = 1 } END { exit !found }' /proc/self/mountinfo
}

# default_prefix DIR: upstream's rule for the tarball's prefix: DIR (/usr/local) unless it is
# read-only or a mount point (a separate /usr/local may be mounted late, noexec, or shared
# between hosts), then /opt/NAME. Sets PREFIX.
default_prefix() {
    PREFIX=$1
    if is_mount_point "$1"; then
        PREFIX=/opt/$NAME
        warn "$1 is a mount point; installing into $PREFIX (set INSTALL_${UPPER}_TAR_PREFIX to choose)"
    elif ! writable_path "$1"; then
        PREFIX=/opt/$NAME
        warn "$1 is read-only; installing into $PREFIX (set INSTALL_${UPPER}_TAR_PREFIX to choose)"
    fi
}

setup_method() {
    method=$(setting METHOD)
    case ${method:-tar} in
        tar) ;;
        rpm | yum | dnf | zypper) fatal "INSTALL_${UPPER}_METHOD=$method: this installer only installs the tarball; the $method method installs packages from rancher's package repositories, which this release does not provide; unset INSTALL_${UPPER}_METHOD or set it to tar" ;;
        *) fatal "INSTALL_${UPPER}_METHOD=$method: unknown method; this installer only installs the tarball: unset INSTALL_${UPPER}_METHOD or set it to tar" ;;
    esac
    # Upstream settings with no meaning here are refused rather than ignored: the operator expects
    # them to change what is installed. (SKIP_FAPOLICY is accepted: no fapolicyd rules are written.)
    if [ -n "$(setting COMMIT)" ]; then
        fatal "INSTALL_${UPPER}_COMMIT is upstream's way to install a CI build from its cloud storage; this installer installs only the release in INSTALL_${UPPER}_ARTIFACT_PATH or INSTALL_${UPPER}_RELEASE_URL: unset it"
    fi
    if [ -n "$(setting RPM_RELEASE_VERSION)" ]; then
        fatal "INSTALL_${UPPER}_RPM_RELEASE_VERSION belongs to upstream's rpm method, which this installer does not offer: unset it"
    fi
}

# The unit is enabled or started only on request (INSTALL_<UPPER>_ENABLE / _START), as upstream's
# installer never starts it: the node needs /etc/rancher/NAME/config.yaml first, and a server
# started early bootstraps a cluster of its own instead of joining one. SKIP_ENABLE / SKIP_START
# (this installer's earlier opt-outs) are still accepted: true asks for the default.
setup_service() {
    TYPE_VAR=TYPE
    TYPE=$(setting TYPE)
    if [ -z "$TYPE" ]; then
        # EXEC: upstream's alias of TYPE (from k3s); TYPE wins when both are set.
        TYPE_VAR=EXEC
        TYPE=$(setting EXEC)
    fi
    TYPE=${TYPE:-server}
    case $TYPE in
        server | agent) ;;
        *) fatal "INSTALL_${UPPER}_$TYPE_VAR=$TYPE: use server or agent" ;;
    esac
    for what in ENABLE START; do
        flag "$what"
        want=$FLAG
        flag "SKIP_$what"
        if [ "$FLAG" = true ]; then
            [ "$want" = false ] || fatal "INSTALL_${UPPER}_$what=true and INSTALL_${UPPER}_SKIP_$what=true contradict each other; unset INSTALL_${UPPER}_SKIP_$what"
            case $what in ENABLE) done_word=enabled ;; START) done_word=started ;; esac
            info "INSTALL_${UPPER}_SKIP_$what=true is the default now: the unit is not $done_word unless INSTALL_${UPPER}_$what=true"
        fi
        case $what in
            ENABLE) DO_ENABLE=$want ;;
            START) DO_START=$want ;;
        esac
    done
    flag SKIP_RELOAD
    SKIP_RELOAD=$FLAG
}

setup_targets() {
    setup_method
    setup_service
    PREFIX=$(setting TAR_PREFIX)
    if [ -z "$PREFIX" ]; then
        default_prefix /usr/local
    fi
    PREFIX=${PREFIX%/}
    check_target_path "INSTALL_${UPPER}_TAR_PREFIX" "$PREFIX"
    DATA_DIR=$(setting DATA_DIR)
    DATA_DIR=${DATA_DIR:-/var/lib/rancher/$NAME}
    DATA_DIR=${DATA_DIR%/}
    check_target_path "INSTALL_${UPPER}_DATA_DIR" "$DATA_DIR"
    IMAGES_DIR=$(setting AGENT_IMAGES_DIR)
    IMAGES_DIR=${IMAGES_DIR:-$DATA_DIR/agent/images}
    IMAGES_DIR=${IMAGES_DIR%/}
    check_target_path "INSTALL_${UPPER}_AGENT_IMAGES_DIR" "$IMAGES_DIR"
    writable_path "$PREFIX" || fatal "prefix $PREFIX is not writable (read-only file system?); set INSTALL_${UPPER}_TAR_PREFIX"
    writable_path "$DATA_DIR" || fatal "data dir $DATA_DIR is not writable; set INSTALL_${UPPER}_DATA_DIR"
    writable_path "$IMAGES_DIR" || fatal "images dir $IMAGES_DIR is not writable; set INSTALL_${UPPER}_AGENT_IMAGES_DIR"
}

# --- reading the media (once) -------------------------------------------------------------------

download() {
    case $DOWNLOADER in
        curl) curl -fsSL --retry 3 -o "$2" "$1" ;;
        wget) wget -q -O "$2" "$1" ;;
    esac
}

# on_media NAME: true when the media directory has an entry NAME (of any type). Offline only.
on_media() {
    [ -e "$SRC/$1" ] || [ -L "$SRC/$1" ]
}

# regular_media NAME: NAME on the media must be a regular file: a symlink could read any file of
# this host, a device or FIFO never ends or blocks.
regular_media() {
    if [ -L "$SRC/$1" ]; then
        fatal "$SRC/$1 is a symlink; release files must be regular files (copy the file itself)"
    fi
    on_media "$1" || fatal "$1 is listed in $SUMS_NAME but missing from $SRC"
    [ -f "$SRC/$1" ] || fatal "$SRC/$1 is not a regular file (a device, FIFO or directory); refusing to read it"
}

# take NAME [LIMIT]: make the one private copy of media file NAME, $WORK/media/NAME (online:
# download it there). The media is read here and only here: every hash, listing, extraction and
# read afterwards uses the copy, so media that changes between two reads cannot change what is
# installed. With LIMIT, at most LIMIT bytes are accepted (small files: checksum file, signature).
take() {
    copy=$WORK/media/$1
    [ -f "$copy" ] && return 0
    if [ -n "$RELEASE_URL" ]; then
        download "$RELEASE_URL/$1" "$copy.part" || {
            rm -f "$copy.part"
            fatal "cannot download $RELEASE_URL/$1"
        }
        mv "$copy.part" "$copy"
    else
        regular_media "$1"
        if [ -n "${2:-}" ]; then
            # A bounded read: one block more than the limit tells "too large" apart.
            dd if="$SRC/$1" of="$copy" bs=1024 count=$(($2 / 1024 + 1)) 2> /dev/null \
                || fatal "cannot read $SRC/$1"
        else
            cp "$SRC/$1" "$copy" \
                || fatal "cannot copy $1 into $WORK (TMPDIR full?); set TMPDIR to a directory with room for the bundle and the selected image archives"
        fi
    fi
    if [ -n "${2:-}" ] && [ "$(wc -c < "$copy")" -gt "$2" ]; then
        fatal "$1 is larger than $2 bytes; it is not a file this installer reads"
    fi
}

# --- checksums and signature --------------------------------------------------------------------

# Only names of this shape are printed from a directory listing of the media.
sums_names_on_media() {
    for f in "$SRC"/sha256sum-*.txt; do
        name=${f##*/}
        case $name in
            sha256sum-*[!a-z0-9]*.txt | sha256sum-.txt) continue ;;
            sha256sum-*.txt) [ -f "$f" ] && printf ' %s' "$name" ;;
        esac
    done
}

get_checksums() {
    SUMS_NAME=$(sums_name "$ARCH")
    if [ -z "$RELEASE_URL" ] && ! on_media "$SUMS_NAME"; then
        others=$(sums_names_on_media)
        if [ -n "$others" ]; then
            fatal "$SRC has no $SUMS_NAME but has$others: these artifacts are for another architecture than $ARCH (set ARCH to install them anyway)"
        fi
        fatal "checksum file $SRC/$SUMS_NAME not found; copy it with the artifacts (nothing is installed without it)"
    fi
    take "$SUMS_NAME" 1048576
    SUMS=$WORK/media/$SUMS_NAME
}

# The checksum file's format is checked after its signature: a line of a file that failed a check
# is never printed, only its number.
check_checksums() {
    [ -s "$SUMS" ] || fatal "$SUMS_NAME is empty"
    if [ -n "$(tail -c 1 "$SUMS")" ]; then
        fatal "$SUMS_NAME: last line has no newline (truncated copy?)"
    fi
    bad=$(LC_ALL=C grep -n -v -E '^[0-9a-f]{64} [ *][A-Za-z0-9._+-]+$' "$SUMS" | head -n 1 | cut -d : -f 1 || true)
    [ -z "$bad" ] || fatal "$SUMS_NAME: malformed line $bad (want '<64 hex digits>  <file name of [A-Za-z0-9._+-]>'); copy the checksum file again"
    dup=$(awk 'seen[substr($0, 67)] { print seen[substr($0, 67)] " and " NR; exit } { seen[substr($0, 67)] = NR }' "$SUMS")
    [ -z "$dup" ] || fatal "$SUMS_NAME names one file twice (lines $dup)"
}

# sig_present: true when the release carries sha256sum-ARCH.txt.sig (online: when it downloads).
sig_present() {
    if [ -n "$RELEASE_URL" ]; then
        download "$RELEASE_URL/$SUMS_NAME.sig" "$WORK/media/$SUMS_NAME.sig.part" 2> /dev/null || {
            rm -f "$WORK/media/$SUMS_NAME.sig.part"
            return 1
        }
        mv "$WORK/media/$SUMS_NAME.sig.part" "$WORK/media/$SUMS_NAME.sig"
        return 0
    fi
    on_media "$SUMS_NAME.sig"
}

verify_signature() {
    key=$(setting PUBLIC_KEY)
    skip=$(setting SKIP_SIGNATURE)
    if [ -z "$key" ]; then
        if ! sig_present; then
            warn "UNSIGNED release: $SUMS_NAME has no .sig, so whoever could change the media could change what is installed; sign releases and set INSTALL_${UPPER}_PUBLIC_KEY"
            return 0
        fi
        if is_true "$skip"; then
            warn "INSTALL_${UPPER}_SKIP_SIGNATURE=$skip: the signature $SUMS_NAME.sig is NOT checked"
            return 0
        fi
        fatal "the release is signed ($SUMS_NAME.sig) but INSTALL_${UPPER}_PUBLIC_KEY is not set: set it to the release's public key file (received out of band), or set INSTALL_${UPPER}_SKIP_SIGNATURE=true to install without checking the signature"
    fi
    if [ -n "$skip" ] && is_true "$skip"; then
        fatal "INSTALL_${UPPER}_PUBLIC_KEY and INSTALL_${UPPER}_SKIP_SIGNATURE=$skip are both set; unset one"
    fi
    [ -f "$key" ] || fatal "INSTALL_${UPPER}_PUBLIC_KEY=$key: no such file"
    command -v openssl > /dev/null 2>&1 || fatal "INSTALL_${UPPER}_PUBLIC_KEY is set but openssl is not installed"
    if ! sig_present; then
        fatal "signature $SRC/$SUMS_NAME.sig not found (INSTALL_${UPPER}_PUBLIC_KEY is set)"
    fi
    take "$SUMS_NAME.sig" 4096
    sig=$WORK/media/$SUMS_NAME.sig
    ok=yes
    if openssl pkey -pubin -in "$key" -noout -text 2> /dev/null | grep -q ED25519; then
        openssl pkeyutl -verify -pubin -inkey "$key" -rawin -sigfile "$sig" \
            -in "$SUMS" > "$WORK/openssl.out" 2>&1 || ok=no
    else
        openssl dgst -sha256 -verify "$key" -signature "$sig" "$SUMS" \
            > "$WORK/openssl.out" 2>&1 || ok=no
    fi
    if [ "$ok" = no ]; then
        fatal "signature $SUMS_NAME.sig does not verify $SUMS_NAME with $key: the checksum file was changed or signed with another key"
    fi
    info "signature of $SUMS_NAME verified with $key"
}

# listed FILE: true when the checksum file has a line for FILE.
listed() {
    awk -v n="$1" 'substr($0, 67) == n { found = 1 } END { exit !found }' "$SUMS"
}

# expected_sum FILE [SUMS_FILE]: the sha256 the checksum file (default: the release's) lists for FILE.
expected_sum() {
    awk -v n="$1" 'substr($0, 67) == n { print substr($0, 1, 64) }' "${2:-$SUMS}"
}

sum_of() {
    sha256sum < "$1" | cut -c 1-64
}

# size_of FILE: FILE's size in bytes, from its directory entry, a link followed as wc -c would
# (busybox's wc -c reads the whole file: a base or rebuilt image archive would cost one more full
# read); LS_BLOCK_SIZE keeps GNU ls from scaling or grouping the size column.
size_of() {
    # shellcheck disable=SC2012 # only the size field is read; the name comes after it
    LS_BLOCK_SIZE=1 ls -lnL -- "$1" | awk '{ print $5 }'
}

# verify FILE: FILE must be listed; its private copy ($WORK/media/FILE, made here) must match.
verify() {
    listed "$1" || fatal "$1 has no line in $SUMS_NAME; refusing to install an unverified file"
    take "$1"
    want=$(expected_sum "$1")
    got=$(sum_of "$WORK/media/$1")
    [ "$want" = "$got" ] || fatal "$1: checksum mismatch (expected $want, got $got): the file is damaged or was changed"
}

discover_name() {
    if [ -n "$NAME" ] && [ -n "${INSTALL_RELEASE_NAME:-}" ]; then
        return 0
    fi
    found=''
    suffix=$(bundle_name '' "$ARCH")
    # Names were checked to be [A-Za-z0-9._+-]: word splitting is safe.
    # shellcheck disable=SC2013
    for f in $(cut -c 67- "$SUMS"); do
        case $f in
            *-images.linux-* | *-images-*.linux-*) continue ;;
            *"$suffix") n=${f%"$suffix"} ;;
            *) continue ;;
        esac
        [ "$(upper_of "$n")" = "$UPPER" ] || continue
        found="$found $n"
    done
    # shellcheck disable=SC2086 # split the candidate names on purpose
    set -- $found
    case $# in
        1) NAME=$1 ;;
        0) fatal "$SUMS_NAME lists no bundle (<name>.linux-$ARCH.tar.gz) for INSTALL_${UPPER}_*" ;;
        *) fatal "$SUMS_NAME lists several bundles ($found); set INSTALL_RELEASE_NAME" ;;
    esac
    check_name
}

# --- archives -----------------------------------------------------------------------------------

# unpack_stream FILE: FILE's tar stream on stdout (.tar.zst, .tar.gz/.tgz layer blobs, .tar).
unpack_stream() {
    case $1 in
        *.tar.zst) zstd -dcq < "$1" ;;
        *.tar) cat < "$1" ;;
        *) gzip -dc < "$1" ;;
    esac
}

# check_members FILE WHAT: every member of the tar FILE must be a regular file or a directory with
# a relative name and no '..' component; hard links, symlinks, devices and FIFOs are refused
# before anything is extracted. Read from `tar -tv` (GNU and busybox: type is the mode's first
# character, a link shows "link to" or "->"; the name follows five fields). Only the entry's
# number is printed, never its name.
check_members() {
    rm -f "$WORK/decompress-failed"
    # The decompressor's status is lost in a pipe; a marker file carries it out.
    listing=ok
    { unpack_stream "$1" 2> /dev/null || : > "$WORK/decompress-failed"; } \
        | tar -tvf - > "$WORK/members" 2> "$WORK/members.err" || listing=failed
    [ ! -f "$WORK/decompress-failed" ] || fatal "$2 does not decompress (truncated or damaged)"
    [ "$listing" = ok ] || fatal "$2: cannot list its members (damaged archive?)"
    # busybox tar lists an absolute or '..' name already rewritten, with a warning; a clean
    # archive lists without any (the warning is not printed: it quotes the name).
    if [ -s "$WORK/members.err" ]; then
        fatal "$2: member names tar warned about while listing (absolute or '..' names, or a damaged archive); archives may hold only regular files and directories under relative names (refused, nothing installed)"
    fi
    bad=$(awk '
        {
            kind = substr($0, 1, 1)
            if (kind == "l") why = "a symbolic link"
            else if (kind == "h" || (kind == "-" && (index($0, " link to ") || index($0, " -> ")))) why = "a hard link"
            else if (kind == "c" || kind == "b") why = "a device"
            else if (kind == "p") why = "a FIFO"
            else if (kind != "-" && kind != "d") why = "not a regular file or directory"
            else {
                name = $0
                sub(/^[^ ]+ +[^ ]+ +[^ ]+ +[^ ]+ +[^ ]+ /, "", name)
                if (name ~ /^\// || name ~ /(^|\/)\.\.(\/|$)/) why = "a path outside the archive (absolute or \047..\047)"
                else next
            }
            print NR ": " why
            exit
        }' "$WORK/members")
    [ -z "$bad" ] || fatal "$2: member ${bad%%:*} is ${bad#*: }; archives may hold only regular files and directories (refused, nothing installed)"
}

# extract FILE DIR [MEMBER...]: extract from the private copy FILE into DIR without the archive's
# owners (-o) and without setuid, setgid, sticky or world-writable bits.
extract() {
    file=$1 dir=$2
    shift 2
    rm -f "$WORK/decompress-failed"
    { unpack_stream "$file" || : > "$WORK/decompress-failed"; } | tar -xof - -C "$dir" "$@" || return 1
    [ ! -f "$WORK/decompress-failed" ] || return 1
    chmod -R u-s,g-s,o-w,-t "$dir"
}

# --- bundle and release description -------------------------------------------------------------

unpack_bundle() {
    BUNDLE=$(bundle_name "$NAME" "$ARCH")
    verify "$BUNDLE"
    check_members "$WORK/media/$BUNDLE" "$BUNDLE"
    mkdir "$WORK/bundle"
    extract "$WORK/media/$BUNDLE" "$WORK/bundle" || fatal "$BUNDLE: cannot unpack (damaged archive?)"
    RELEASE_ENV=$WORK/bundle/$(release_env_member "$NAME")
    if [ -L "$RELEASE_ENV" ] || [ ! -f "$RELEASE_ENV" ]; then
        fatal "$BUNDLE has no $(release_env_member "$NAME") (a regular file); it was not built for this installer"
    fi
}

# is_hex64 VALUE: 64 lower-case hex digits (a sha256).
is_hex64() {
    case $1 in
        *[!0-9a-f]*) return 1 ;;
    esac
    [ ${#1} -eq 64 ]
}

# is_digest VALUE: sha256:<64 lower-case hex digits> (a blob's digest).
is_digest() {
    case $1 in
        sha256:*) is_hex64 "${1#sha256:}" ;;
        *) return 1 ;;
    esac
}

# is_words PATTERN VALUE: VALUE is one or more words separated by single spaces, none matching
# the case pattern PATTERN of forbidden characters.
is_words() {
    case $2 in
        '' | ' '* | *' ' | *'  '*) return 1 ;;
    esac
    for w in $2; do
        # shellcheck disable=SC2254 # PATTERN is a pattern on purpose
        case $w in
            $1) return 1 ;;
        esac
    done
    return 0
}

# check_release_value KEY VALUE: the per-key rule of release.env. Values are used in paths and
# messages, so each one is held to the narrowest shape the builder writes.
check_release_value() {
    case $1 in
        RELEASE_NAME) case $2 in '' | [!a-z0-9]* | *[!a-z0-9._-]*) return 1 ;; esac ;;
        RELEASE_VERSION) case $2 in '' | *[!A-Za-z0-9.+-]*) return 1 ;; esac ;;
        RELEASE_ARCH) [ "$(arch_name "$2")" = "$2" ] || return 1 ;;
        RUNTIME_IMAGE) case $2 in '' | *[!A-Za-z0-9._:/@+-]*) return 1 ;; esac ;;
        RUNTIME_MANIFEST) is_digest "$2" || return 1 ;;
        RUNTIME_LAYERS)
            is_words '*[!a-z0-9:]*' "$2" || return 1
            for layer in $2; do
                is_digest "$layer" || return 1
            done
            ;;
        RUNTIME_ARCHIVE | DEFAULT_IMAGES) case $2 in '' | .* | *[!A-Za-z0-9._+-]*) return 1 ;; esac ;;
        DATA_KEY) case $2 in '' | . | .. | *[!A-Za-z0-9._-]*) return 1 ;; esac ;;
        IMAGE_GROUPS) is_words '.*|*[!a-z0-9._-]*' "$2" || return 1 ;;
    esac
    return 0
}

RELEASE_KEYS='RELEASE_NAME RELEASE_VERSION RELEASE_ARCH RUNTIME_IMAGE RUNTIME_MANIFEST RUNTIME_LAYERS RUNTIME_ARCHIVE DATA_KEY DEFAULT_IMAGES IMAGE_GROUPS'

# parse_release_env FILE: read a release description as data, never as code. Every line is
# KEY='VALUE' with a known KEY, each key exactly once, VALUE of [A-Za-z0-9._:/@+ -] and of its
# key's shape. Sets RELEASE_NAME ... IMAGE_GROUPS; on a bad file sets PARSE_ERROR (which names
# the line and key, never the content) and returns 1.
parse_release_env() {
    PARSE_ERROR=''
    RELEASE_NAME='' RELEASE_VERSION='' RELEASE_ARCH='' RUNTIME_IMAGE='' RUNTIME_MANIFEST=''
    RUNTIME_LAYERS='' RUNTIME_ARCHIVE='' DATA_KEY='' DEFAULT_IMAGES='' IMAGE_GROUPS=''
    if [ "$(wc -c < "$1")" -gt 65536 ]; then
        PARSE_ERROR="larger than 64 KiB"
        return 1
    fi
    if [ -n "$(tail -c 1 "$1")" ]; then
        PARSE_ERROR="last line has no newline"
        return 1
    fi
    seen=' '
    n=0
    while IFS= read -r line; do
        n=$((n + 1))
        key=${line%%=*}
        value=${line#*=}
        case " $RELEASE_KEYS " in
            *" $key "*) ;;
            *)
                PARSE_ERROR="line $n is not KEY='value' with a known KEY ($RELEASE_KEYS)"
                return 1
                ;;
        esac
        case $value in
            \'*\') value=${value#\'} value=${value%\'} ;;
            *)
                PARSE_ERROR="line $n: the value of $key is not in single quotes"
                return 1
                ;;
        esac
        case $value in
            *[!A-Za-z0-9._:/@+\ -]*)
                PARSE_ERROR="line $n: the value of $key has a character outside [A-Za-z0-9._:/@+ -]"
                return 1
                ;;
        esac
        case $seen in
            *" $key "*)
                PARSE_ERROR="line $n: $key is set twice"
                return 1
                ;;
        esac
        seen="$seen$key "
        if ! check_release_value "$key" "$value"; then
            PARSE_ERROR="line $n: the value of $key is not a valid $key"
            return 1
        fi
        case $key in
            RELEASE_NAME) RELEASE_NAME=$value ;;
            RELEASE_VERSION) RELEASE_VERSION=$value ;;
            RELEASE_ARCH) RELEASE_ARCH=$value ;;
            RUNTIME_IMAGE) RUNTIME_IMAGE=$value ;;
            RUNTIME_MANIFEST) RUNTIME_MANIFEST=$value ;;
            RUNTIME_LAYERS) RUNTIME_LAYERS=$value ;;
            RUNTIME_ARCHIVE) RUNTIME_ARCHIVE=$value ;;
            DATA_KEY) DATA_KEY=$value ;;
            DEFAULT_IMAGES) DEFAULT_IMAGES=$value ;;
            IMAGE_GROUPS) IMAGE_GROUPS=$value ;;
        esac
    done < "$1"
    for key in $RELEASE_KEYS; do
        case $seen in
            *" $key "*) ;;
            *)
                PARSE_ERROR="$key is missing"
                return 1
                ;;
        esac
    done
    return 0
}

# --- versions -----------------------------------------------------------------------------------

# split_version V: V_MAJOR V_MINOR V_PATCH (numbers), V_PRE (after '-', may be empty) and V_REV
# (the trailing number of the build suffix after '+': rke2r2 -> 2, none -> 0) of
# v<major>.<minor>.<patch>[-<pre>][+<suffix>]; returns 1 when V has another shape.
split_version() {
    v=${1#v}
    meta=''
    case $v in
        *+*) meta=${v#*+} v=${v%%+*} ;;
    esac
    V_PRE=''
    case $v in
        *-*) V_PRE=${v#*-} v=${v%%-*} ;;
    esac
    case $v in
        *.*.*.* | *[!0-9.]*) return 1 ;;
        *.*.*) ;;
        *) return 1 ;;
    esac
    V_MAJOR=${v%%.*}
    v=${v#*.}
    V_MINOR=${v%%.*}
    V_PATCH=${v#*.}
    for part in "$V_MAJOR" "$V_MINOR" "$V_PATCH"; do
        case $part in
            '' | *[!0-9]*) return 1 ;;
        esac
        [ ${#part} -le 9 ] || return 1
    done
    case $V_PRE in
        *[!A-Za-z0-9.]*) return 1 ;;
    esac
    case $meta in
        *[!A-Za-z0-9.]*) return 1 ;;
    esac
    V_REV=${meta##*[!0-9]}
    V_REV=${V_REV:-0}
    [ ${#V_REV} -le 9 ] || return 1
}

# compare_tags A B: prints -1, 0 or 1 for pre-release tags such as rc1 < rc2 < rc10 (a common
# prefix, then the trailing numbers; otherwise by characters).
compare_tags() {
    na=${1##*[!0-9]} nb=${2##*[!0-9]}
    pa=${1%"$na"} pb=${2%"$nb"}
    if [ "$pa" = "$pb" ] && [ -n "$na" ] && [ -n "$nb" ] && [ ${#na} -le 9 ] && [ ${#nb} -le 9 ]; then
        compare_numbers "$na" "$nb"
    elif [ "$1" = "$2" ]; then
        echo 0
    elif [ "$(printf '%s\n%s\n' "$1" "$2" | LC_ALL=C sort | head -n 1)" = "$1" ]; then
        echo -1
    else
        echo 1
    fi
}

compare_numbers() {
    if [ "$1" -lt "$2" ]; then
        echo -1
    elif [ "$1" -gt "$2" ]; then
        echo 1
    else
        echo 0
    fi
}

# compare_versions A B: prints -1, 0 or 1 (A older, same, newer than B): major, minor, patch as
# numbers, a release newer than its pre-releases (v1.33.0-rc1 < v1.33.0), then the suffix
# number (v1.32.13+rke2r1 < v1.32.13+rke2r2 < v1.33.9+rke2r1). Returns 1 when either does not
# parse.
compare_versions() {
    split_version "$1" || return 1
    a="$V_MAJOR $V_MINOR $V_PATCH" a_pre=$V_PRE a_rev=$V_REV
    split_version "$2" || return 1
    # shellcheck disable=SC2086 # three numbers, split on purpose
    set -- $a "$V_MAJOR" "$V_MINOR" "$V_PATCH"
    for pair in "$1 $4" "$2 $5" "$3 $6"; do
        # shellcheck disable=SC2086
        c=$(compare_numbers $pair)
        if [ "$c" != 0 ]; then
            echo "$c"
            return 0
        fi
    done
    if [ "$a_pre" != "$V_PRE" ]; then
        if [ -z "$a_pre" ]; then
            echo 1
        elif [ -z "$V_PRE" ]; then
            echo -1
        else
            compare_tags "$a_pre" "$V_PRE"
        fi
        return 0
    fi
    compare_numbers "$a_rev" "$V_REV"
}

# The installed version is the one in PREFIX/share/NAME/release.env (written by this installer);
# an older release over it is refused unless ALLOW_DOWNGRADE says so: replaying an old signed
# release (with its known holes) is an attack the signature alone does not stop.
check_downgrade() {
    installed=$PREFIX/share/$NAME/release.env
    [ -f "$installed" ] || return 0
    allow=$(setting ALLOW_DOWNGRADE)
    if is_true "$allow"; then
        return 0
    fi
    new_version=$RELEASE_VERSION
    hint="set INSTALL_${UPPER}_ALLOW_DOWNGRADE=true to install $new_version anyway"
    # The parser sets the RELEASE_* variables: the new release is parsed again afterwards.
    parse_release_env "$installed" || fatal "cannot tell the installed version: $installed: $PARSE_ERROR; $hint"
    old_version=$RELEASE_VERSION
    parse_release_env "$RELEASE_ENV" || fatal "release.env in $BUNDLE: $PARSE_ERROR"
    [ "$old_version" != "$new_version" ] || return 0
    order=$(compare_versions "$new_version" "$old_version") \
        || fatal "cannot compare version $new_version with the installed $old_version (want v<major>.<minor>.<patch>[-<pre>][+<suffix>]); $hint"
    if [ "$order" = -1 ]; then
        fatal "refusing to downgrade: $old_version is installed in $PREFIX and these artifacts are the older $new_version (an old release replayed?); $hint"
    fi
}

# runtime_data_key REF: the directory name under DATA_DIR/data the supervisor gives the runtime
# image REF (releaseRefDigest in upstream's pkg/bootstrap): TAG, '-', then the first 12 hex digits
# of sha256 of the reference text the supervisor was built with, which carries no registry
# (rancher/rke2-runtime:TAG, not docker.io/rancher/rke2-runtime:TAG). The registry is the first
# path component when it holds a '.' or ':' or is localhost (the docker naming rule). Sets
# RUNTIME_KEY; returns 1, with the reason in KEY_ERROR, for a reference the supervisor has no key
# for.
runtime_data_key() {
    KEY_ERROR='' RUNTIME_KEY=''
    ref=$1
    case $ref in
        *@*)
            KEY_ERROR="is pinned by digest; the supervisor looks its runtime up by version tag"
            return 1
            ;;
    esac
    last=${ref##*/}
    case $last in
        *:*) tag=${last##*:} ;;
        *)
            KEY_ERROR="has no tag"
            return 1
            ;;
    esac
    case $tag in
        v[0-9]*) ;;
        *)
            KEY_ERROR="has a tag that does not start with v<digit> (the supervisor's release pattern)"
            return 1
            ;;
    esac
    path=$ref
    case $ref in
        */*)
            first=${ref%%/*}
            case $first in
                *.* | *:* | localhost) path=${ref#*/} ;;
            esac
            ;;
    esac
    RUNTIME_KEY=$tag-$(printf '%s' "$path" | sha256sum | cut -c 1-12)
}

# check_data_key: the key everything is staged under (RUNTIME_KEY) is computed here from
# RUNTIME_IMAGE; the release's own DATA_KEY must agree (a builder with another formula would stage a directory the
# supervisor never reads, and an uninstall manifest that does not describe the disk).
check_data_key() {
    runtime_data_key "$RUNTIME_IMAGE" || fatal "release.env in $BUNDLE: RUNTIME_IMAGE $KEY_ERROR; the bundle was not built for this installer"
    key=$RUNTIME_KEY
    want_tag=$(printf '%s' "$RELEASE_VERSION" | tr '+' '-')
    case $key in
        "$want_tag"-*) ;;
        *) fatal "release.env in $BUNDLE: the tag of RUNTIME_IMAGE is not RELEASE_VERSION with '+' as '-' ($want_tag): the supervisor of $RELEASE_VERSION would not find this runtime image" ;;
    esac
    if [ "$DATA_KEY" != "$key" ]; then
        fatal "release.env in $BUNDLE: DATA_KEY is not the supervisor's key for RUNTIME_IMAGE (expected $key: the tag, '-', 12 hex digits of sha256 of the reference without its registry); the bundle was made by a builder with another data-key formula: rebuild the release with this project's current builder (python -m builder build)"
    fi
}

read_release() {
    parse_release_env "$RELEASE_ENV" || fatal "release.env in $BUNDLE: $PARSE_ERROR; the bundle was not built for this installer"
    [ "$RELEASE_NAME" = "$NAME" ] || fatal "$BUNDLE describes release '$RELEASE_NAME', not '$NAME'"
    [ "$RELEASE_ARCH" = "$ARCH" ] || fatal "$BUNDLE holds $RELEASE_ARCH artifacts but this install is for $ARCH: artifacts of another architecture"
    check_data_key
    want_version=$(setting VERSION)
    if [ -n "$want_version" ] && [ "$want_version" != "$RELEASE_VERSION" ]; then
        fatal "these artifacts are version $RELEASE_VERSION, not INSTALL_${UPPER}_VERSION=$want_version"
    fi
    if [ -n "$CHANNEL_VERSION" ] && [ "$CHANNEL_VERSION" != "$RELEASE_VERSION" ]; then
        fatal "$RELEASE_URL holds version $RELEASE_VERSION, not $CHANNEL_VERSION (channel $CHANNEL)"
    fi
    info "release $RELEASE_NAME $RELEASE_VERSION ($RELEASE_ARCH), runtime $RUNTIME_IMAGE"
}

# --- delta install ------------------------------------------------------------------------------
# Offline media holding delta.linux-ARCH.txt is a delta: the new release's checksum file (and
# signature), bundle and lists, and per image archive FILE a delta archive holding only the
# compressed frames the base release's FILE lacks. FILE is rebuilt here, piece by piece, from the
# base's FILE in the images dir and the delta archive, into $WORK/media/FILE (where take puts a
# media file); from there on the install is the full install's, so the rebuilt FILE must match the
# signed checksum file like a copied one. Nothing in the delta is trusted for that; the checks
# here only refuse early and clearly, before anything is changed.

DELTA_MAX=4194304
DELTA_MAX_PIECES=200000

# is_count VALUE: a number as the description writes one: 0|[1-9][0-9]{0,15} (no sign, no leading
# zero: sh arithmetic would read 010 as octal), so sums of two stay far inside 64 bits.
is_count() {
    case $1 in
        0) return 0 ;;
        '' | 0* | *[!0-9]*) return 1 ;;
    esac
    [ ${#1} -le 16 ]
}

# is_delta_version VALUE: [A-Za-z0-9][A-Za-z0-9.+_-]{0,127}.
is_delta_version() {
    case $1 in
        '' | [!A-Za-z0-9]* | *[!A-Za-z0-9.+_-]*) return 1 ;;
    esac
    [ ${#1} -le 128 ]
}

# is_image_archive FILE NAME ARCH: FILE is an image archive of release NAME for ARCH:
# NAME-images[-GROUP].linux-ARCH.tar.zst or .tar.gz, GROUP a group name of the lock
# ([a-z0-9][a-z0-9._-]{0,62}) other than all (the union list's, never an archive).
is_image_archive() {
    case $1 in
        "$2-images.linux-$3.tar.zst" | "$2-images.linux-$3.tar.gz") return 0 ;;
        "$2-images-"*".linux-$3.tar.zst") group=${1#"$2-images-"} group=${group%".linux-$3.tar.zst"} ;;
        "$2-images-"*".linux-$3.tar.gz") group=${1#"$2-images-"} group=${group%".linux-$3.tar.gz"} ;;
        *) return 1 ;;
    esac
    case $group in
        '' | all | [!a-z0-9]* | *[!a-z0-9._-]*) return 1 ;;
    esac
    [ ${#group} -le 63 ]
}

# parse_delta FILE OUT: read a delta description as data (never as code), strictly: the line
# format of builder's delta description, every field of its shape, the pieces of each archive
# tiling its delta archive and summing to its size. Sets D_NAME D_VERSION D_ARCH D_BASE_VERSION
# D_BASE_SUMS D_SUMS and writes OUT, one line per archive: "FILE FULL_HEX FULL_SIZE BASE_HEX
# DELTA_FILE DELTA_HEX DELTA_SIZE COUNT LINE" (LINE: the archive line's number; its pieces are the
# COUNT lines after it). On a bad file sets PARSE_ERROR (naming the line and field, never the
# content) and returns 1.
parse_delta() {
    desc=$1 out=$2
    PARSE_ERROR=''
    D_NAME='' D_VERSION='' D_ARCH='' D_BASE_VERSION='' D_BASE_SUMS='' D_SUMS=''
    : > "$out"
    size=$(wc -c < "$desc")
    if [ "$size" -gt "$DELTA_MAX" ]; then
        PARSE_ERROR="larger than 4 MiB"
        return 1
    fi
    if [ "$size" -eq 0 ] || [ -n "$(tail -c 1 "$desc")" ]; then
        PARSE_ERROR="empty, or the last line has no newline"
        return 1
    fi
    # One pass over the bytes: only the description's characters (no tab, CR or NUL, which read
    # would treat differently from the builder's parser).
    if [ "$(LC_ALL=C tr -d 'A-Za-z0-9._:+ \n-' < "$desc" | wc -c)" -ne 0 ]; then
        PARSE_ERROR="a character outside [A-Za-z0-9._:+ -] and newline"
        return 1
    fi
    n=0 left=0 archives=0
    while IFS= read -r line; do
        n=$((n + 1))
        case $line in
            '' | ' '* | *' ' | *'  '*)
                PARSE_ERROR="line $n is empty or its fields are not separated by single spaces"
                return 1
                ;;
        esac
        # The character check above leaves no glob character to expand.
        # shellcheck disable=SC2086
        set -- $line
        if [ "$n" -eq 1 ]; then
            [ "$line" = 'airgap-builder-delta 1' ] || { PARSE_ERROR="line 1 is not 'airgap-builder-delta 1' (another format or version)"; return 1; }
        elif [ "$n" -eq 2 ]; then
            if [ "$#" -ne 4 ] || [ "$1" != release ]; then
                PARSE_ERROR="line 2 is not 'release NAME VERSION ARCH'"
                return 1
            fi
            case $2 in
                [!a-z0-9]* | *[!a-z0-9.-]*) PARSE_ERROR="line 2: NAME is not a release name"; return 1 ;;
            esac
            [ ${#2} -le 63 ] || { PARSE_ERROR="line 2: NAME is longer than 63 characters"; return 1; }
            is_delta_version "$3" || { PARSE_ERROR="line 2: VERSION is not a version"; return 1; }
            [ "$(arch_name "$4" 2> /dev/null)" = "$4" ] || { PARSE_ERROR="line 2: ARCH is not an arch this installer installs"; return 1; }
            D_NAME=$2 D_VERSION=$3 D_ARCH=$4
        elif [ "$n" -eq 3 ]; then
            if [ "$#" -ne 3 ] || [ "$1" != base ]; then
                PARSE_ERROR="line 3 is not 'base BASE_VERSION BASE_SUMS_HEX'"
                return 1
            fi
            is_delta_version "$2" || { PARSE_ERROR="line 3: BASE_VERSION is not a version"; return 1; }
            is_hex64 "$3" || { PARSE_ERROR="line 3: BASE_SUMS_HEX is not 64 lower-case hex digits"; return 1; }
            D_BASE_VERSION=$2 D_BASE_SUMS=$3
        elif [ "$n" -eq 4 ]; then
            if [ "$#" -ne 2 ] || [ "$1" != sums ]; then
                PARSE_ERROR="line 4 is not 'sums SUMS_HEX'"
                return 1
            fi
            is_hex64 "$2" || { PARSE_ERROR="line 4: SUMS_HEX is not 64 lower-case hex digits"; return 1; }
            D_SUMS=$2
        elif [ "$left" -gt 0 ]; then
            delta_piece "$@" || return 1
        else
            delta_archive_line "$@" || return 1
            archives=$((archives + 1))
        fi
    done < "$desc"
    if [ "$n" -lt 4 ]; then
        PARSE_ERROR="the file ends before its release, base and sums lines"
        return 1
    fi
    if [ "$left" -gt 0 ]; then
        PARSE_ERROR="the file ends $left piece lines short of the archive on line $a_line"
        return 1
    fi
    if [ "$archives" -eq 0 ]; then
        PARSE_ERROR="no archive line"
        return 1
    fi
}

# delta_archive_line FIELD...: line n of parse_delta, an archive line (sets the a_* state the
# piece lines after it are checked against).
delta_archive_line() {
    if [ "$#" -ne 9 ] || [ "$1" != archive ]; then
        PARSE_ERROR="line $n is not 'archive FILE FULL_HEX FULL_SIZE BASE_HEX DELTA_FILE DELTA_HEX DELTA_SIZE COUNT'"
        return 1
    fi
    is_image_archive "$2" "$D_NAME" "$D_ARCH" || { PARSE_ERROR="line $n: FILE is not an image archive of the release ($D_NAME-images[-GROUP].linux-$D_ARCH.tar.zst or .tar.gz)"; return 1; }
    if awk -v f="$2" '$1 == f { found = 1 } END { exit !found }' "$out"; then
        PARSE_ERROR="line $n: FILE has an archive line already"
        return 1
    fi
    is_hex64 "$3" || { PARSE_ERROR="line $n: FULL_HEX is not 64 lower-case hex digits"; return 1; }
    is_count "$4" || { PARSE_ERROR="line $n: FULL_SIZE is not a number"; return 1; }
    [ "$5" = - ] || is_hex64 "$5" || { PARSE_ERROR="line $n: BASE_HEX is neither 64 lower-case hex digits nor -"; return 1; }
    [ "$6" = "$(delta_archive_name "$2")" ] || { PARSE_ERROR="line $n: DELTA_FILE is not FILE's delta archive name"; return 1; }
    is_hex64 "$7" || { PARSE_ERROR="line $n: DELTA_HEX is not 64 lower-case hex digits"; return 1; }
    is_count "$8" || { PARSE_ERROR="line $n: DELTA_SIZE is not a number"; return 1; }
    if ! is_count "$9" || [ "$9" -lt 1 ] || [ "$9" -gt "$DELTA_MAX_PIECES" ]; then
        PARSE_ERROR="line $n: COUNT is not a number from 1 to $DELTA_MAX_PIECES"
        return 1
    fi
    echo "$2 $3 $4 $5 $6 $7 $8 $9 $n" >> "$out"
    a_line=$n a_size=$4 a_base=$5 a_delta_size=$8 left=$9 a_total=0 a_delta_at=0
}

# delta_piece FIELD...: line n of parse_delta, a piece line of the archive on line a_line.
delta_piece() {
    if [ "$#" -ne 6 ] || [ "$1" != piece ]; then
        PARSE_ERROR="line $n is not 'piece SOURCE OFFSET LENGTH HEX LABEL' (the archive on line $a_line has $left more)"
        return 1
    fi
    is_count "$3" || { PARSE_ERROR="line $n: OFFSET is not a number"; return 1; }
    if ! is_count "$4" || [ "$4" = 0 ]; then
        PARSE_ERROR="line $n: LENGTH is not a number of at least 1"
        return 1
    fi
    is_hex64 "$5" || { PARSE_ERROR="line $n: HEX is not 64 lower-case hex digits"; return 1; }
    case $6 in
        head | tail) ;;
        *) is_digest "$6" || { PARSE_ERROR="line $n: LABEL is not head, tail or sha256:<64 hex>"; return 1; } ;;
    esac
    case $2 in
        base)
            [ "$a_base" != - ] || { PARSE_ERROR="line $n: a base piece in an archive without a base file (BASE_HEX -)"; return 1; }
            ;;
        delta)
            [ "$3" = "$a_delta_at" ] || { PARSE_ERROR="line $n: the delta pieces do not follow each other (OFFSET $3, expected $a_delta_at)"; return 1; }
            a_delta_at=$((a_delta_at + $4))
            [ "$a_delta_at" -le "$a_delta_size" ] || { PARSE_ERROR="line $n: the delta pieces run past DELTA_SIZE"; return 1; }
            ;;
        *) PARSE_ERROR="line $n: SOURCE is neither base nor delta"; return 1 ;;
    esac
    # Both below 10^16 after each step: the sum cannot overflow.
    a_total=$((a_total + $4))
    [ "$a_total" -le "$a_size" ] || { PARSE_ERROR="line $n: the pieces of the archive on line $a_line run past its FULL_SIZE"; return 1; }
    left=$((left - 1))
    if [ "$left" -eq 0 ]; then
        [ "$a_total" = "$a_size" ] || { PARSE_ERROR="line $n: the pieces of the archive on line $a_line sum to $a_total bytes, not its FULL_SIZE"; return 1; }
        [ "$a_delta_at" = "$a_delta_size" ] || { PARSE_ERROR="line $n: the delta pieces of the archive on line $a_line end at $a_delta_at, not at its DELTA_SIZE"; return 1; }
    fi
}

# setup_delta: offline media with delta.linux-ARCH.txt makes this a delta install (DELTA: the
# description's name; empty for a full install). The description is taken (bounded) and parsed,
# must be for the media's checksum file, and the node must hold the base release's checksum file.
setup_delta() {
    DELTA=''
    [ -z "$RELEASE_URL" ] || return 0
    desc=$(delta_name "$ARCH")
    on_media "$desc" || return 0
    DELTA=$desc
    take "$DELTA" "$DELTA_MAX"
    mkdir "$WORK/delta"
    parse_delta "$WORK/media/$DELTA" "$WORK/delta/archives" \
        || fatal "$DELTA: $PARSE_ERROR; the delta description is damaged or was not written by this project's builder: copy the delta directory again"
    got=$(sum_of "$SUMS")
    [ "$D_SUMS" = "$got" ] || fatal "$DELTA is for the checksum file with sha256 $D_SUMS, but $SUMS_NAME on the media has sha256 $got: the description and the checksum file come from different builds; copy the delta directory again"
    info "delta install: $D_NAME $D_VERSION ($D_ARCH) over $D_BASE_VERSION"
    check_delta_base
}

# installed_version: the version PREFIX/share/NAME/release.env names, or "an unknown release"
# (in a subshell: the parser sets the RELEASE_* variables).
installed_version() {
    (parse_release_env "$PREFIX/share/$NAME/release.env" 2> /dev/null && printf 'version %s' "$RELEASE_VERSION") \
        || printf 'an unknown release'
}

# check_delta_base: the node's kept checksum file (every install stages the verified one at
# PREFIX/share/NAME/sha256sum-ARCH.txt) must be the base release's (DELTA_STATE=base), or already
# the new release's (DELTA_STATE=new: this delta was installed; a second run changes nothing).
check_delta_base() {
    KEPT=$PREFIX/share/$NAME/$SUMS_NAME
    FULL_HINT="install the full release $D_VERSION instead"
    if [ -L "$KEPT" ] || [ ! -f "$KEPT" ]; then
        fatal "this delta updates $NAME $D_BASE_VERSION, but $KEPT (the checksum file an install keeps) is not there: the node has no release installed by this installer, or one installed before deltas; $FULL_HINT"
    fi
    got=$(sum_of "$KEPT")
    case $got in
        "$D_BASE_SUMS") DELTA_STATE=base ;;
        "$D_SUMS") DELTA_STATE=new ;;
        *) fatal "this delta updates $NAME $D_BASE_VERSION (checksum file sha256 $D_BASE_SUMS), but this node has $(installed_version) ($KEPT has sha256 $got); $FULL_HINT" ;;
    esac
}

# check_delta_release: the description's release line is the bundle's release.
check_delta_release() {
    [ -n "$DELTA" ] || return 0
    if [ "$D_NAME $D_VERSION $D_ARCH" != "$RELEASE_NAME $RELEASE_VERSION $RELEASE_ARCH" ]; then
        fatal "$DELTA describes $D_NAME $D_VERSION ($D_ARCH), but $BUNDLE is $RELEASE_NAME $RELEASE_VERSION ($RELEASE_ARCH): the description belongs to another release; copy the delta directory again"
    fi
}

# delta_entry FILE: FILE's archive line (as parse_delta wrote it) into A_FULL_HEX A_FULL_SIZE
# A_BASE_HEX A_DELTA_FILE A_DELTA_HEX A_DELTA_SIZE A_COUNT A_LINE.
delta_entry() {
    entry=$(awk -v f="$1" '$1 == f' "$WORK/delta/archives")
    [ -n "$entry" ] || fatal "$DELTA has no archive line for $1, which this install selects: the delta was made for other archives; $FULL_HINT, or choose the images with INSTALL_${UPPER}_IMAGES"
    # Fields checked by parse_delta: split on purpose.
    # shellcheck disable=SC2086
    set -- $entry
    A_FULL_HEX=$2 A_FULL_SIZE=$3 A_BASE_HEX=$4 A_DELTA_FILE=$5 A_DELTA_HEX=$6 A_DELTA_SIZE=$7 A_COUNT=$8 A_LINE=$9
}

# delta_base FILE: what FILE is rebuilt from, checked before anything is read for it: the node's
# IMAGES_DIR/FILE is either already the new release's FILE (listed so in the signed checksum file:
# it is used as it is), or the base's (a regular file hashing to BASE_HEX, which the kept base
# checksum file lists for FILE). Writes "FILE installed" or "FILE rebuild" to $WORK/delta/plan.
delta_base() {
    delta_entry "$1"
    want=$(expected_sum "$1")
    [ "$A_FULL_HEX" = "$want" ] || fatal "$DELTA builds $1 with sha256 $A_FULL_HEX, but $SUMS_NAME lists $want: the description does not belong to this checksum file; copy the delta directory again"
    base=$IMAGES_DIR/$1
    if [ -f "$base" ] && [ ! -L "$base" ]; then
        got=$(sum_of "$base")
        if [ "$got" = "$want" ]; then
            echo "$1 installed" >> "$WORK/delta/plan"
            return 0
        fi
    elif [ "$A_BASE_HEX" != - ]; then
        fatal "$1: the delta builds on $base from $D_BASE_VERSION, which is not there (or not a regular file); $FULL_HINT"
    fi
    if [ "$A_BASE_HEX" != - ]; then
        [ "$DELTA_STATE" = base ] || fatal "$base is neither the $D_BASE_VERSION nor the $D_VERSION archive (sha256 $got) and $KEPT is $D_VERSION's: it was changed on this node; $FULL_HINT"
        [ "$got" = "$A_BASE_HEX" ] || fatal "$base does not match the $D_BASE_VERSION archive the delta builds on (expected sha256 $A_BASE_HEX, got $got): it was changed on this node; $FULL_HINT"
        kept=$(expected_sum "$1" "$KEPT")
        [ "$kept" = "$A_BASE_HEX" ] || fatal "$KEPT does not list $1 with sha256 $A_BASE_HEX: the delta was not made from the installed release; $FULL_HINT"
    fi
    echo "$1 rebuild" >> "$WORK/delta/plan"
}

# byte_range FILE OFFSET LENGTH: LENGTH bytes at OFFSET of FILE on stdout (fewer when FILE is
# shorter). dd seeks to the 64 KiB block holding OFFSET (busybox's tail -c +N reads the file up
# to N: a piece near the end of a big base archive would cost a read of all of it), tail -c +N
# drops the bytes before OFFSET, head -c stops after LENGTH.
byte_range() {
    dd if="$1" bs=65536 skip=$(($2 / 65536)) count=$((($2 % 65536 + $3 + 65535) / 65536)) 2> /dev/null \
        | tail -c +$(($2 % 65536 + 1)) | head -c "$3"
}

# delta_rebuild FILE: FILE into $WORK/media/FILE (where take puts a media file), from the node's
# own FILE when it is already the new one, else piece by piece: byte ranges of the base file and
# of the delta archive (one private copy, hashing to DELTA_HEX), each piece hashed against its
# HEX. A pipe loses its commands' exit status: sizes and hashes are checked instead.
delta_rebuild() {
    rebuilt=$WORK/media/$1
    base=$IMAGES_DIR/$1
    if grep -q -x -F "$1 installed" "$WORK/delta/plan"; then
        info "$1: the $D_VERSION archive is already in $IMAGES_DIR"
        cp "$base" "$rebuilt" || fatal "cannot copy $base into $WORK (TMPDIR full?)"
        return 0
    fi
    delta_entry "$1"
    delta=$WORK/media/$A_DELTA_FILE
    if [ "$A_DELTA_SIZE" -gt 0 ]; then
        on_media "$A_DELTA_FILE" \
            || fatal "$A_DELTA_FILE (the delta archive of $1) is missing from $SRC; copy the delta directory again"
        take "$A_DELTA_FILE"
        got=$(sum_of "$delta")
        [ "$got" = "$A_DELTA_HEX" ] || fatal "$A_DELTA_FILE: checksum mismatch (expected $A_DELTA_HEX from $DELTA, got $got): the delta archive is damaged or was changed; copy the delta directory again"
    fi
    base_size=0
    if [ "$A_BASE_HEX" != - ]; then
        base_size=$(size_of "$base")
    fi
    info "rebuilding $1 from $IMAGES_DIR and $A_DELTA_FILE ($A_COUNT pieces)"
    sed -n "$((A_LINE + 1)),$((A_LINE + A_COUNT))p" "$WORK/media/$DELTA" > "$WORK/delta/pieces"
    part=$rebuilt.part
    : > "$part"
    i=0
    # Fields checked by parse_delta.
    while read -r _ source offset length hex label; do
        i=$((i + 1))
        case $source in
            base)
                from=$base where=$base
                [ $((offset + length)) -le "$base_size" ] \
                    || fatal "$1: piece $i (blob $label) lies past the end of $base ($base_size bytes, the base's as $DELTA says): the description was changed; copy the delta directory again"
                ;;
            *) from=$delta where=$A_DELTA_FILE ;;
        esac
        got=$(byte_range "$from" "$offset" "$length" | tee -a "$part" | sha256sum | cut -c 1-64)
        if [ "$got" != "$hex" ]; then
            # The file read matched its sha256 in the description: the piece's line is wrong.
            fatal "$1: piece $i (blob $label, $length bytes at $offset of $where) does not match its sha256 in $DELTA (expected $hex, got $got): the description was changed; copy the delta directory again"
        fi
    done < "$WORK/delta/pieces"
    [ "$(size_of "$part")" -eq "$A_FULL_SIZE" ] || fatal "cannot write $part (TMPDIR full?); set TMPDIR to a directory with room for the rebuilt image archives"
    mv -f -- "$part" "$rebuilt"
}

# --- image selection ----------------------------------------------------------------------------

# archive_file BASE: the archive variant to use, in $ARCHIVE (zst when zstd is here, else gz).
archive_file() {
    ARCHIVE=''
    if command -v zstd > /dev/null 2>&1 && listed "$1.tar.zst"; then
        ARCHIVE=$1.tar.zst
    elif listed "$1.tar.gz"; then
        ARCHIVE=$1.tar.gz
    elif listed "$1.tar.zst"; then
        fatal "$1 is only shipped as .tar.zst and zstd is not installed; install zstd or copy $1.tar.gz"
    else
        fatal "$SUMS_NAME lists no $1.tar.zst or $1.tar.gz"
    fi
}

select_images() {
    wanted=$(setting IMAGES)
    wanted=${wanted:-default}
    : > "$WORK/images"
    for group in $wanted; do
        case $group in
            default) echo "$DEFAULT_IMAGES" >> "$WORK/images" ;;
            all)
                for g in $IMAGE_GROUPS; do
                    images_base "$NAME" "$g" "$ARCH" >> "$WORK/images"
                done
                ;;
            *)
                case " $IMAGE_GROUPS " in
                    *" $group "*) images_base "$NAME" "$group" "$ARCH" >> "$WORK/images" ;;
                    *) fatal "INSTALL_${UPPER}_IMAGES: no image group '$group' for $ARCH (available: default all $IMAGE_GROUPS)" ;;
                esac
                ;;
        esac
    done
    if ! grep -q -x -F -e "$DEFAULT_IMAGES" -e "$RUNTIME_ARCHIVE" "$WORK/images"; then
        warn "neither the all-in-one archive nor $RUNTIME_ARCHIVE is selected: the node needs the core images from a registry"
    fi
    : > "$WORK/image-files"
    # A for loop (not a piped while) so fatal exits the installer, not a subshell; the names
    # hold no spaces.
    # shellcheck disable=SC2013
    for base in $(sort -u "$WORK/images"); do
        archive_file "$base"
        echo "$ARCHIVE" >> "$WORK/image-files"
    done
    runtime_archive
    if [ -n "$DELTA" ]; then
        # Every base file is checked before any archive is rebuilt: a node without the base is
        # refused before anything is read for it.
        : > "$WORK/delta/plan"
        # shellcheck disable=SC2013
        for f in $(cat "$WORK/image-files") $RUNTIME_EXTRA; do
            delta_base "$f"
        done
    fi
    # shellcheck disable=SC2013
    for f in $(cat "$WORK/image-files"); do
        get_archive "$f"
        base=${f%.tar.*}
        # The image list is verified but not installed: in the images directory the agent reads
        # a .txt as images to *pull*, which would send an air-gapped node to the network.
        if listed "$base.txt" || { [ -z "$RELEASE_URL" ] && on_media "$base.txt"; }; then
            verify "$base.txt"
        fi
    done
    if [ -n "$RUNTIME_EXTRA" ]; then
        get_archive "$RUNTIME_EXTRA"
    fi
}

# runtime_archive: the archive the runtime is staged from, in RUNTIME_FROM: one being installed
# when one holds it (no extra read), else the runtime's own or the all-in-one archive, also in
# RUNTIME_EXTRA (read and checked, not installed).
runtime_archive() {
    RUNTIME_FROM='' RUNTIME_EXTRA=''
    for base in "$RUNTIME_ARCHIVE" "$DEFAULT_IMAGES"; do
        if grep -q -x -F -e "$base" "$WORK/images"; then
            archive_file "$base"
            RUNTIME_FROM=$ARCHIVE
            return 0
        fi
    done
    for base in "$RUNTIME_ARCHIVE" "$DEFAULT_IMAGES"; do
        if listed "$base.tar.zst" || listed "$base.tar.gz"; then
            archive_file "$base"
            RUNTIME_FROM=$ARCHIVE RUNTIME_EXTRA=$ARCHIVE
            return 0
        fi
    done
    fatal "$SUMS_NAME lists no archive holding the runtime image ($RUNTIME_ARCHIVE or $DEFAULT_IMAGES)"
}

# get_archive FILE: the verified private copy of image archive FILE (a delta install rebuilds it
# there first), its members checked.
get_archive() {
    if [ -n "$DELTA" ]; then
        delta_rebuild "$1"
    fi
    verify "$1"
    check_members "$WORK/media/$1" "$1"
}

# --- staging in the target ----------------------------------------------------------------------

# make_dir DIR: mkdir -p that records every directory it creates (for rollback and uninstall).
make_dir() {
    [ -d "$1" ] && return 0
    [ -e "$1" ] && fatal "$1 exists and is not a directory"
    make_dir "$(dirname -- "$1")"
    mkdir -- "$1" || fatal "cannot create directory $1"
    echo "$1" >> "$WORK/created-dirs"
    echo "d $1" >> "$WORK/manifest.add"
}

# stage_file SRC DEST: copy SRC beside DEST under a temp name, to be renamed at commit time;
# skips the copy when DEST already holds the same bytes.
stage_file() {
    echo "f $2" >> "$WORK/manifest.add"
    if [ -d "$2" ]; then
        fatal "$2 is a directory; refusing to replace it with a file"
    fi
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        return 0
    fi
    make_dir "$(dirname -- "$2")"
    tmp=$(dirname -- "$2")/.${2##*/}.$NAME-install.$$
    echo "$tmp" >> "$WORK/staged"
    cp -p "$1" "$tmp" || fatal "cannot write $tmp (disk full?)"
    printf '%s\n%s\n' "$tmp" "$2" >> "$WORK/plan"
}

sed_escape() {
    printf '%s' "$1" | sed 's/[\\|&]/\\&/g'
}

rewrite_bundle() {
    if [ "$PREFIX" != /usr/local ]; then
        p=$(sed_escape "$PREFIX")
        for unit in "$WORK/bundle/lib/systemd/system/$NAME"-*.service; do
            [ -f "$unit" ] || continue
            sed "s|/usr/local|$p|g" "$unit" > "$unit.new"
            cat "$unit.new" > "$unit"
            rm -f "$unit.new"
        done
    fi
    if [ "$DATA_DIR" != "/var/lib/rancher/$NAME" ]; then
        d=$(sed_escape "$DATA_DIR")
        script=$WORK/bundle/bin/$NAME-killall.sh
        if [ -f "$script" ]; then
            sed "s|/var/lib/rancher/$NAME|$d|g" "$script" > "$script.new"
            cat "$script.new" > "$script"
            rm -f "$script.new"
        fi
    fi
}

stage_bundle() {
    rewrite_bundle
    (cd "$WORK/bundle" && find . -type f) | sed 's|^\./||' | sort > "$WORK/bundle-files"
    while IFS= read -r rel; do
        stage_file "$WORK/bundle/$rel" "$PREFIX/$rel"
    done < "$WORK/bundle-files"
    if [ ! -f "$WORK/bundle/bin/$NAME" ]; then
        warn "$BUNDLE has no bin/$NAME: the units need the supervisor binary at $PREFIX/bin/$NAME"
    fi
}

# Image archives are moved from their verified private copy (a rename when TMPDIR is on the images
# dir's file system) and checked again where they land. One already in place is found by cmp, as
# stage_file does: it stops at the first differing byte, so the installed archive of another
# release (always there for a delta) costs a block, not a hash of the whole file.
stage_images() {
    while IFS= read -r f; do
        dest=$IMAGES_DIR/$f
        want=$(expected_sum "$f")
        echo "f $dest" >> "$WORK/manifest.add"
        [ -d "$dest" ] && fatal "$dest is a directory; refusing to replace it"
        if [ -f "$dest" ] && cmp -s "$WORK/media/$f" "$dest"; then
            continue
        fi
        make_dir "$IMAGES_DIR"
        tmp=$IMAGES_DIR/.$f.$NAME-install.$$
        echo "$tmp" >> "$WORK/staged"
        mv -f -- "$WORK/media/$f" "$tmp" || fatal "cannot write $tmp (disk full?)"
        chmod 0644 "$tmp"
        [ "$(sum_of "$tmp")" = "$want" ] || fatal "$f changed while being moved into $IMAGES_DIR (disk error?)"
        printf '%s\n%s\n' "$tmp" "$dest" >> "$WORK/plan"
    done < "$WORK/image-files"
}

# verify_runtime: the runtime image's manifest and layers, taken by digest from the verified
# private copy of RUNTIME_FROM into the work dir, and checked (digests, the manifest names each
# layer, layer members) before anything is staged.
verify_runtime() {
    KEY_DIR=$DATA_DIR/data/$RUNTIME_KEY
    [ ! -f "$KEY_DIR/.extracted" ] || return 0
    RUNTIME_BLOBS=$WORK/runtime/blobs/sha256
    mkdir "$WORK/runtime"
    members="blobs/sha256/${RUNTIME_MANIFEST#sha256:}"
    for layer in $RUNTIME_LAYERS; do
        members="$members blobs/sha256/${layer#sha256:}"
    done
    info "extracting the runtime layers from $RUNTIME_FROM"
    # shellcheck disable=SC2086 # members are digests, split on purpose
    extract "$WORK/media/$RUNTIME_FROM" "$WORK/runtime" $members \
        || fatal "cannot extract the runtime layers from $RUNTIME_FROM (damaged archive, missing layer, or TMPDIR full)"
    manifest_blob=$RUNTIME_BLOBS/${RUNTIME_MANIFEST#sha256:}
    [ "$(sum_of "$manifest_blob")" = "${RUNTIME_MANIFEST#sha256:}" ] || fatal "runtime manifest in $RUNTIME_FROM does not match $RUNTIME_MANIFEST"
    for layer in $RUNTIME_LAYERS; do
        hex=${layer#sha256:}
        [ "$(sum_of "$RUNTIME_BLOBS/$hex")" = "$hex" ] || fatal "runtime layer $layer in $RUNTIME_FROM does not match its digest"
        grep -q -F "\"$layer\"" "$manifest_blob" || fatal "runtime layer $layer is not in manifest $RUNTIME_MANIFEST"
        check_members "$RUNTIME_BLOBS/$hex" "runtime layer $layer"
    done
}

# Stage the runtime the way the supervisor does: the runtime image's layers (checked by
# verify_runtime) extracted in order into data/RUNTIME_KEY (bin/ and charts/), then .extracted.
stage_runtime() {
    if [ -f "$KEY_DIR/.extracted" ]; then
        info "runtime already staged in $KEY_DIR"
        return 0
    fi
    make_dir "$DATA_DIR/data"
    STAGE=$DATA_DIR/data/.$RUNTIME_KEY.$NAME-install.$$
    echo "$STAGE" >> "$WORK/staged"
    mkdir "$STAGE" "$STAGE/root"
    for layer in $RUNTIME_LAYERS; do
        blob=$RUNTIME_BLOBS/${layer#sha256:}
        extract "$blob" "$STAGE/root" || fatal "cannot extract runtime layer $layer into $STAGE (disk full?)"
        rm -f "$blob"
    done
    [ -d "$STAGE/root/bin" ] || fatal "the runtime image $RUNTIME_IMAGE has no bin/"
    # The supervisor skips extraction only when bin/, charts/ and .extracted are all there, and a
    # server copies charts/ at every start: an image without charts gets an empty one.
    if [ ! -d "$STAGE/root/charts" ]; then
        warn "the runtime image $RUNTIME_IMAGE has no charts/: a server deploys no bundled charts (CNI, CoreDNS, ingress...); install them yourself"
        mkdir "$STAGE/root/charts" || fatal "cannot write $STAGE (disk full?)"
    fi
    echo "$RUNTIME_IMAGE" > "$STAGE/root/.extracted" || fatal "cannot write $STAGE (disk full?)"
    echo "r $KEY_DIR" >> "$WORK/manifest.add"
    if [ -e "$KEY_DIR" ]; then
        # A half-extracted key dir without .extracted: replaced as a whole at commit.
        printf '%s\n%s\n' "$KEY_DIR" "$STAGE/old" >> "$WORK/plan"
    fi
    printf '%s\n%s\n' "$STAGE/root" "$KEY_DIR" >> "$WORK/plan"
}

# The verified checksum file is kept at PREFIX/share/NAME/sha256sum-ARCH.txt: a delta install
# checks the node's release against it (the base a delta updates). Staged after the images, so an
# interrupted commit never names a release whose archives are not all in place.
stage_sums() {
    stage_file "$SUMS" "$PREFIX/share/$NAME/$SUMS_NAME"
}

# DATA_DIR/bin -> data/RUNTIME_KEY/bin, switched with one rename.
stage_symlink() {
    link=$DATA_DIR/bin
    target=data/$RUNTIME_KEY/bin
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$target" ]; then
        return 0
    fi
    if [ -e "$link" ] && [ ! -L "$link" ]; then
        fatal "$link exists and is not a symlink; move it away first"
    fi
    LINK_STAGE=$DATA_DIR/.bin.$NAME-install.$$
    echo "$LINK_STAGE" >> "$WORK/staged"
    mkdir "$LINK_STAGE" || fatal "cannot create $LINK_STAGE"
    ln -s "$target" "$LINK_STAGE/bin" || fatal "cannot create a symlink in $LINK_STAGE"
    echo "l $link" >> "$WORK/manifest.add"
}

# The manifest is the union of what earlier runs and this run installed.
stage_manifest() {
    MANIFEST=$PREFIX/share/$NAME/installed-files
    echo "f $MANIFEST" >> "$WORK/manifest.add"
    if [ -f "$MANIFEST" ]; then
        cat "$MANIFEST" "$WORK/manifest.add"
    else
        cat "$WORK/manifest.add"
    fi | LC_ALL=C sort -u > "$WORK/installed-files"
    # The manifest is committed first: if the commit is cut short, it already names every path
    # that may have landed, and the uninstaller skips the ones that did not.
    mv "$WORK/plan" "$WORK/plan.rest"
    : > "$WORK/plan"
    stage_file "$WORK/installed-files" "$MANIFEST"
    cat "$WORK/plan.rest" >> "$WORK/plan"
}

# --- commit -------------------------------------------------------------------------------------

commit() {
    # Renames only from here on; an interrupt would leave a mix of old and new.
    trap '' INT TERM
    while IFS= read -r from && IFS= read -r to; do
        mv -f -- "$from" "$to" || fatal "cannot move $from to $to"
    done < "$WORK/plan"
    if [ -n "${LINK_STAGE:-}" ]; then
        mv -f -- "$LINK_STAGE/bin" "$DATA_DIR/" || fatal "cannot switch $DATA_DIR/bin"
    fi
    COMMITTED=1
    # Leftovers (old key dir replaced, empty staging dirs) go once everything is in place.
    while IFS= read -r path; do
        rm -rf -- "$path"
    done < "$WORK/staged"
    if [ -s "$WORK/plan" ] || [ -n "${LINK_STAGE:-}" ]; then
        info "installed $RELEASE_NAME $RELEASE_VERSION: prefix $PREFIX, data $DATA_DIR, images $IMAGES_DIR"
    else
        info "$RELEASE_NAME $RELEASE_VERSION is already installed; nothing changed"
    fi
}

# next_steps UNIT UNIT_ARG: what the operator does once the release is installed and not
# started (UNIT_ARG: the unit file's path when it is outside systemd's search path).
next_steps() {
    config=/etc/rancher/$NAME/config.yaml
    info "next steps:"
    case $TYPE in
        server) info "  1. write $config: token (shared by every node of the cluster), tls-san (the names and addresses clients use); on a server joining a cluster also server: https://<first server>:9345" ;;
        agent) info "  1. write $config: server: https://<a server>:9345 and token (the cluster's)" ;;
    esac
    if [ "$DATA_DIR" != "/var/lib/rancher/$NAME" ]; then
        info "     and data-dir: $DATA_DIR (this install's non-default data dir)"
    fi
    if [ ! -d /run/systemd/system ]; then
        info "  2. systemd is not running: start the node with $PREFIX/bin/$NAME $TYPE"
    elif [ "$DO_ENABLE" = true ]; then
        info "  2. systemctl start $1"
    else
        info "  2. systemctl enable --now $2"
    fi
}

# Reload systemd (unless SKIP_RELOAD), then enable and start only when asked. Units outside
# systemd's search path (a prefix other than /usr/local) are enabled or linked by full path.
service() {
    unit=$NAME-$TYPE.service
    unit_arg=$unit
    if [ "$PREFIX" != /usr/local ]; then
        unit_arg=$PREFIX/lib/systemd/system/$unit
    fi
    if [ ! -d /run/systemd/system ]; then
        if [ "$DO_ENABLE" = true ] || [ "$DO_START" = true ]; then
            warn "systemd is not running: $unit is neither enabled nor started"
        fi
        next_steps "$unit" "$unit_arg"
        return 0
    fi
    if [ "$SKIP_RELOAD" = true ]; then
        info "INSTALL_${UPPER}_SKIP_RELOAD=true: not running systemctl daemon-reload"
    else
        systemctl daemon-reload
    fi
    if [ "$DO_ENABLE" = true ]; then
        systemctl enable "$unit_arg"
    elif [ "$DO_START" = true ] && [ "$unit_arg" != "$unit" ]; then
        systemctl link "$unit_arg"
    fi
    if [ "$DO_START" = true ]; then
        systemctl restart "$unit"
        info "started $unit"
    else
        next_steps "$unit" "$unit_arg"
    fi
}

main() {
    setup_work
    setup_arch
    setup_name_hint
    setup_source
    get_checksums
    verify_signature
    check_checksums
    discover_name
    UPPER=$(upper_of "$NAME")
    check_upper "$NAME"
    setup_targets
    setup_delta
    unpack_bundle
    read_release
    check_delta_release
    check_downgrade
    select_images
    verify_runtime
    # Nothing in the target was touched up to here.
    stage_bundle
    stage_runtime
    stage_images
    stage_sums
    stage_symlink
    stage_manifest
    commit
    service
}

main "$@"
