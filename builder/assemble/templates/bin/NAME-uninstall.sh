#!/bin/sh
# Removes @NAME@ from this node. PREFIX is the parent of the directory holding this script.
#
# After install.sh, it removes exactly what install.sh installed, as recorded in
# PREFIX/share/@NAME@/installed-files:
#   f PATH   a file install.sh placed (bundle files, image archives and lists, this manifest)
#   l PATH   the DATA_DIR/bin symlink
#   r PATH   a runtime directory DATA_DIR/data/KEY that install.sh staged (removed whole)
#   d PATH   a directory install.sh created (removed only when empty)
#
# Without that manifest (the bundle was unpacked by hand, `tar xzf @NAME@.linux-ARCH.tar.gz -C
# /usr/local`, or by upstream's installer), it removes the bundle's layout under PREFIX and what
# the supervisor stages in the data dir (@NAME_UPPER@_DATA_DIR, default /var/lib/rancher/@NAME@):
#   PREFIX/bin/{@NAME@,@NAME@-killall.sh,@NAME@-uninstall.sh}
#   PREFIX/lib/systemd/system/@NAME@-{server,agent}.{service,env}
#   PREFIX/share/@NAME@/ (whole)
#   DATA_DIR/bin (when it is a symlink into DATA_DIR/data), DATA_DIR/data/<runtime key>/ (whole),
#   DATA_DIR/agent/images/@NAME@-images*.linux-* (the release's image archives and lists)
#   /etc/systemd/system/@NAME@-{server,agent}.service when it is a regular file that runs
#   PREFIX/bin/@NAME@ (upstream's installer moves the units there for a prefix other than /usr/local)
# then the directories of that layout that are left empty (bin, lib and share of /usr/local
# itself stay). A path of that layout that is a symlink is refused before anything is removed:
# nothing outside PREFIX and DATA_DIR is touched.
#
# Either way, anything else stays: the node's state in the data dir (server/, agent/ ...), its
# config in /etc/rancher/@NAME@, directories that existed before. UNINSTALL_SKIP_KILLALL=true skips
# stopping the runtime first.
set -e

NAME=@NAME@
# The data dir variable's prefix (the release name upper-cased, '-' and '.' as '_'): [A-Z0-9_].
UPPER=@NAME_UPPER@

fatal() {
    echo "[ERROR] $*" >&2
    exit 1
}

info() {
    echo "[INFO]  $*"
}

[ "$(id -u)" -eq 0 ] || fatal "$0 must run as root"

here=$(cd -P -- "$(dirname -- "$0")" && pwd -P)
PREFIX=$(dirname -- "$here")
MANIFEST=$PREFIX/share/$NAME/installed-files

# --- the upstream layout (no manifest) ----------------------------------------------------------

# not_a_symlink PATH...: each existing PATH must be a real directory or file: a symlink in the
# layout could lead the removal outside PREFIX or DATA_DIR.
not_a_symlink() {
    for p in "$@"; do
        [ ! -L "$p" ] || fatal "$p is a symlink; the layout has a directory or file there; refusing to remove anything (remove it by hand)"
    done
}

layout_data_dir() {
    DATA_DIR=$(eval "printf '%s' \"\${${UPPER}_DATA_DIR:-}\"")
    DATA_DIR=${DATA_DIR:-/var/lib/rancher/$NAME}
    DATA_DIR=${DATA_DIR%/}
    case $DATA_DIR in
        /*) ;;
        *) fatal "${UPPER}_DATA_DIR=$DATA_DIR must be an absolute path" ;;
    esac
    case $DATA_DIR in
        / | *'/../'* | *'/..' | *'/./'* | *'/.') fatal "${UPPER}_DATA_DIR=$DATA_DIR is not a data directory" ;;
    esac
}

# is_runtime_key NAME: a directory name the supervisor gives a runtime image: v<tag>-<12 hex>,
# or the 64 hex of a digest.
is_runtime_key() {
    h='[0-9a-f]'
    h12="$h$h$h$h$h$h$h$h$h$h$h$h"
    # shellcheck disable=SC2254 # patterns built on purpose
    case $1 in
        v[0-9]*-$h12) return 0 ;;
        $h12$h12$h12$h12$h$h$h$h$h$h$h$h$h$h$h$h$h$h$h$h) return 0 ;;
    esac
    return 1
}

# The removal list of the upstream layout, in $WORK/remove (one "f PATH", "r PATH" or "d PATH"
# a line, in order), after every check passed.
plan_layout() {
    case $PREFIX in
        / | /usr) fatal "$0 is in $PREFIX/bin and $PREFIX/share/$NAME/installed-files does not exist: $PREFIX is a package manager's prefix; remove the packages with it" ;;
    esac
    layout_data_dir
    units=$PREFIX/lib/systemd/system
    not_a_symlink "$PREFIX/bin" "$PREFIX/lib" "$PREFIX/lib/systemd" "$units" "$PREFIX/share" \
        "$PREFIX/share/$NAME" "$DATA_DIR" "$DATA_DIR/data" "$DATA_DIR/agent" "$DATA_DIR/agent/images"
    : > "$WORK/remove"
    for f in "$PREFIX/bin/$NAME" "$PREFIX/bin/$NAME-killall.sh" \
        "$units/$NAME-server.service" "$units/$NAME-server.env" \
        "$units/$NAME-agent.service" "$units/$NAME-agent.env"; do
        if [ -f "$f" ] || [ -L "$f" ]; then
            echo "f $f" >> "$WORK/remove"
        fi
    done
    if [ -d "$PREFIX/share/$NAME" ]; then
        echo "r $PREFIX/share/$NAME" >> "$WORK/remove"
    fi
    for type in server agent; do
        f=/etc/systemd/system/$NAME-$type.service
        if [ -f "$f" ] && [ ! -L "$f" ] && grep -q -x -F "ExecStart=$PREFIX/bin/$NAME $type" "$f"; then
            echo "f $f" >> "$WORK/remove"
        fi
    done
    if [ -L "$DATA_DIR/bin" ]; then
        case $(readlink "$DATA_DIR/bin") in
            data/?* | "$DATA_DIR"/data/?*) echo "f $DATA_DIR/bin" >> "$WORK/remove" ;;
            *) echo "[WARN]  $DATA_DIR/bin points outside $DATA_DIR/data: left in place" >&2 ;;
        esac
    fi
    if [ -d "$DATA_DIR/data" ]; then
        for d in "$DATA_DIR"/data/*; do
            if [ -d "$d" ] && [ ! -L "$d" ] && is_runtime_key "${d##*/}"; then
                echo "r $d" >> "$WORK/remove"
            fi
        done
    fi
    if [ -d "$DATA_DIR/agent/images" ]; then
        for f in "$DATA_DIR/agent/images/$NAME"-images.linux-* "$DATA_DIR/agent/images/$NAME"-images-*.linux-*; do
            if [ -f "$f" ] && [ ! -L "$f" ]; then
                echo "f $f" >> "$WORK/remove"
            fi
        done
    fi
    echo "f $here/$NAME-uninstall.sh" >> "$WORK/remove"
    # Emptied directories, deepest first (with /var/lib/rancher, as upstream); /usr/local's own
    # bin, lib and share stay. /usr/local is spelled in two parts: upstream's installer rewrites
    # the first /usr/local of each line of this script to its prefix.
    for d in "$DATA_DIR/agent/images" "$DATA_DIR/agent" "$DATA_DIR/data" "$DATA_DIR" \
        "$units" "$PREFIX/lib/systemd"; do
        echo "d $d" >> "$WORK/remove"
    done
    parent=$(dirname -- "$DATA_DIR")
    if [ "${parent##*/}" = rancher ]; then
        echo "d $parent" >> "$WORK/remove"
    fi
    if [ "$PREFIX" != "/usr/""local" ]; then
        for d in "$PREFIX/lib" "$PREFIX/share" "$PREFIX/bin" "$PREFIX"; do
            echo "d $d" >> "$WORK/remove"
        done
    fi
}

# --- install.sh's manifest ----------------------------------------------------------------------

plan_manifest() {
    bad=$(grep -n -v -E '^[fdlr] /.' "$MANIFEST" | head -n 1 || true)
    [ -z "$bad" ] || fatal "$MANIFEST: malformed line ${bad%%:*}; refusing to remove anything"
    : > "$WORK/remove"
    while IFS= read -r line; do
        path=${line#? }
        case $line in
            f\ *) if [ -f "$path" ] || [ -L "$path" ]; then echo "f $path" >> "$WORK/remove"; fi ;;
            l\ *) if [ -L "$path" ]; then echo "f $path" >> "$WORK/remove"; fi ;;
            r\ *)
                case $path in
                    */data/?*) echo "r $path" >> "$WORK/remove" ;;
                    *) echo "[WARN]  not removing $path: not a runtime data directory" >&2 ;;
                esac
                ;;
        esac
    done < "$MANIFEST"
    # Children sort after their parents, so reverse order empties the deepest directories first.
    grep '^d ' "$MANIFEST" | sort -r >> "$WORK/remove" || true
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/uninstall.XXXXXXXX")
trap 'rm -rf -- "$WORK"' EXIT

if [ -f "$MANIFEST" ] && [ ! -L "$MANIFEST" ]; then
    plan_manifest
else
    info "no $MANIFEST (not installed by install.sh): removing the bundle's layout in $PREFIX and the runtime in the data dir"
    plan_layout
fi

if command -v systemctl > /dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now "$NAME-server.service" "$NAME-agent.service" 2> /dev/null || true
fi
case ${UNINSTALL_SKIP_KILLALL:-} in
    true | 1 | yes) ;;
    *)
        if [ -x "$here/$NAME-killall.sh" ]; then
            "$here/$NAME-killall.sh"
        fi
        ;;
esac

while IFS= read -r line; do
    path=${line#? }
    case $line in
        f\ *) rm -f -- "$path" ;;
        r\ *) rm -rf -- "$path" ;;
        d\ *) rmdir -- "$path" 2> /dev/null || true ;;
    esac
done < "$WORK/remove"

if command -v systemctl > /dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
if [ -d "${DATA_DIR:-}" ]; then
    info "kept the node's state in $DATA_DIR and its config in /etc/rancher/$NAME"
fi
echo "[INFO]  $NAME uninstalled"
