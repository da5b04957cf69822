"""install.sh against an attacker who controls the release media (everything but the operator's
out-of-band public key; the media may change between two reads).

Every install runs the real install.sh under dash or busybox sh with the real tar, zstd, gzip,
openssl and sha256sum, against real releases the builder made (tests/plugins/releases.py),
tampered with by tests/tamper.py as an attacker would. The one stand-in is a ``sha256sum`` wrapper placed first on PATH that swaps media files right after
their bytes were checked: a USB stick or NFS export that changes between two reads cannot be
produced on demand otherwise. Parser and version-order properties call install.sh's own
functions (the script without its last line, ``main "$@"``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.trust import sign
from tests import tamper
from tests.plugins.install import (
    SHELLS,
    Target,
    failed,
    install_functions,
    needs_tools,
    ok,
)
from tests.plugins.releases import V1, V2, Release

pytestmark = needs_tools()

IMAGES = "rke2-images.linux-amd64.tar.zst"
BUNDLE = "rke2.linux-amd64.tar.gz"


# --- 1. the media is read once ------------------------------------------------------------------

SWAP_SHIM = """#!/bin/sh
# sha256sum, then: every media file whose original bytes were just hashed (the file itself or a
# copy of it) is replaced by other bytes at once, so any second read of the media sees them.
out=$({real} "$@") || exit $?
printf '%s\\n' "$out"
digest=${{out%% *}}
while read -r d media replacement; do
    if [ "$d" = "$digest" ] && ! cmp -s "$media" "$replacement"; then
        cat "$replacement" > "$media"
        echo "$media" >> {log}
    fi
done < {swaps}
"""

# busybox sh runs sha256sum as a built-in applet (no PATH lookup), but zstd is a program: this
# one swaps every archive on the media as soon as anything is decompressed (an archive is only
# decompressed after it was checked, and the bundle is checked before any image archive), then
# decompresses.
SWAP_ZSTD = """#!/bin/sh
while read -r d media replacement; do
    case $media in *.tar.zst | *.tar.gz) ;; *) continue ;; esac
    if ! cmp -s "$media" "$replacement"; then
        cat "$replacement" > "$media"
        echo "$media" >> {log}
    fi
done < {swaps}
exec {real} "$@"
"""


FLIP = bytes(b ^ 0x5A for b in range(256))  # every byte changed (bytes.translate runs in C)


def _swapping_tools(tmp_path: Path, release: Release) -> tuple[str, Path]:
    """A PATH whose sha256sum (and zstd, for busybox) swap each file of ``release`` for flipped
    bytes once checked."""
    shim_dir, other = tmp_path / "shim", tmp_path / "other-bytes"
    shim_dir.mkdir()
    other.mkdir()
    log, swaps = tmp_path / "swapped.log", tmp_path / "swaps"
    lines = []
    for name in release.files:
        data = release.path(name).read_bytes()
        (other / name).write_bytes(data.translate(FLIP))
        lines.append(f"{hashlib.sha256(data).hexdigest()} {release.path(name)} {other / name}\n")
    swaps.write_text("".join(lines))
    for tool, text in (("sha256sum", SWAP_SHIM), ("zstd", SWAP_ZSTD)):
        shim = shim_dir / tool
        shim.write_text(text.format(real=shutil.which(tool), log=log, swaps=swaps))
        shim.chmod(0o755)
    return f"{shim_dir}:{os.environ['PATH']}", log


@pytest.mark.parametrize("shell", SHELLS)
def test_media_swapped_after_its_check_still_installs_the_checked_bytes(
        scratch_target: Target, scratch_release, releases, tmp_path: Path, shell: str) -> None:
    """Every file changes on the media the moment its bytes were hashed: a second read of the
    media (hash here, copy or decompress there) would see other bytes. The node gets exactly
    the checked bytes, because everything after the one read uses the private copy."""
    original = releases["v1"]
    media = scratch_release("v1", linked=False)  # the shim writes through the media's files
    path, log = _swapping_tools(tmp_path, media)
    ok(scratch_target.install(media, shell, raw={"PATH": path}))

    swapped = set(log.read_text().split())
    assert str(media.path(IMAGES)) in swapped and str(media.path(BUNDLE)) in swapped, \
        "the shim never fired: the test proves nothing"
    assert media.path(IMAGES).read_bytes() != original.path(IMAGES).read_bytes()
    landed = scratch_target.images_dir() / IMAGES
    assert landed.read_bytes() == original.path(IMAGES).read_bytes()
    assert (scratch_target.data_dir() / "bin" / "runc").read_bytes() == original.runtime_file("runc")
    assert f"RELEASE_VERSION='{V1}'" in (scratch_target.prefix() / "share/rke2/release.env").read_text()


# --- 2. the media is never code; what fails a check is never printed ----------------------------

INJECTIONS = {
    "command line": lambda env, mark: env + f"touch {mark}\n",
    "command substitution": lambda env, mark: env.replace(
        f"RELEASE_VERSION='{V1}'", f"RELEASE_VERSION='{V1}'$(touch {mark})"),
    "backquotes in a value": lambda env, mark: env.replace(
        f"RELEASE_VERSION='{V1}'", f"RELEASE_VERSION=\"{V1}`touch {mark}`\""),
    "unknown key": lambda env, mark: env + f"PATH='{mark}'\n",
    "second assignment": lambda env, mark: env + f"DATA_KEY='x' ; touch {mark}\n",
}


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("case", sorted(INJECTIONS))
def test_release_env_is_parsed_as_data_never_run(case: str, shell: str, scratch_target: Target, scratch_release,
                                                 fixture_signing_key, tmp_path: Path) -> None:
    """Even signed (a compromised build), release.env is data: no line of it ever runs."""
    mark = tmp_path / "ran"
    r = scratch_release("v1")
    tamper.edit_release_env(r, lambda env: INJECTIONS[case](env, mark))
    tamper.resign(r, fixture_signing_key[0])
    before = scratch_target.snapshot()
    err = failed(scratch_target.install(r, shell), "release.env in rke2.linux-amd64.tar.gz: line")
    assert not mark.exists(), "install.sh ran a command from release.env"
    assert str(mark) not in err and "touch" not in err, "content of a failed file was printed"
    assert scratch_target.snapshot() == before


KEYS = ("RELEASE_NAME", "RELEASE_VERSION", "RELEASE_ARCH", "RUNTIME_IMAGE", "RUNTIME_MANIFEST",
        "RUNTIME_LAYERS", "RUNTIME_ARCHIVE", "DATA_KEY", "DEFAULT_IMAGES", "IMAGE_GROUPS")
SAFE = re.compile(r"[A-Za-z0-9._:/@+ -]*")
HOSTILE = st.sampled_from(["$(touch MARK)", "`touch MARK`", "'; touch MARK; '", "\\", "'", '"',
                           "$HOME", "a b", "\t", "${x:=y}", "*", "~", "\r", "../x", "a  b", " "])
PLAUSIBLE = st.sampled_from(["rke2", "v1.2.3+rke2r1", "amd64", "s390x", "core canal", "core",
                             "sha256:" + "a" * 64, "sha256:" + "b" * 64 + " sha256:" + "c" * 64,
                             "docker.io/x/y:v1-z", "rke2-images.linux-amd64", "v1-0123abcd"])
VALUE = st.lists(st.one_of(PLAUSIBLE, st.text(alphabet="abcz019.:/+-@ _", max_size=8), HOSTILE),
                 min_size=1, max_size=2).map("".join)
QUOTE = st.sampled_from(["'{}'", "'{}'", "'{}'", '"{}"', "{}", "'{}", "'{}' "])
# A valid description (what the builder writes), then a few edits: a value replaced (plausible,
# random or hostile, in any quoting), a line dropped, duplicated or added under another name.
VALID = {"RELEASE_NAME": "rke2", "RELEASE_VERSION": V1, "RELEASE_ARCH": "amd64",
         "RUNTIME_IMAGE": "docker.io/rancher/rke2-runtime:v1.32.13-rke2r1",
         "RUNTIME_MANIFEST": "sha256:" + "1" * 64, "RUNTIME_LAYERS": f"sha256:{'2' * 64} sha256:{'3' * 64}",
         "RUNTIME_ARCHIVE": "rke2-images-core.linux-amd64", "DATA_KEY": "v1.32.13-rke2r1-0123456789ab",
         "DEFAULT_IMAGES": "rke2-images.linux-amd64", "IMAGE_GROUPS": "core canal cilium"}
KEY = st.one_of(st.sampled_from(KEYS), st.sampled_from(["PATH", "IFS", "X", " RELEASE_NAME", ""]))
EDIT = st.one_of(st.tuples(st.just("set"), st.sampled_from(KEYS), VALUE, QUOTE),
                 st.tuples(st.just("add"), KEY, VALUE, QUOTE),
                 st.tuples(st.just("drop"), st.sampled_from(KEYS), st.just(""), st.just("")))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(EDIT, max_size=3))
def test_release_env_parser_property(edits: list[tuple[str, str, str, str]], tmp_path: Path) -> None:
    """Whatever release.env holds: nothing runs and a rejection quotes nothing of it; an accepted
    file has every known key exactly once, each value single-quoted, of the safe character set,
    and read back byte for byte."""
    mark = tmp_path / "MARK"
    lines = [(k, v, "'{}'") for k, v in VALID.items()]
    for op, key, value, quote in edits:
        value = value.replace("MARK", str(mark))
        if op == "set":
            lines = [(k, value, quote) if k == key else (k, v, q) for k, v, q in lines]
        elif op == "add":
            lines.append((key, value, quote))
        else:
            lines = [line for line in lines if line[0] != key]
    text = "".join(f"{k}={q.format(v)}\n" for k, v, q in lines)
    env_file = tmp_path / "release.env"
    env_file.write_text(text)
    show = "".join(f'printf "%s=[%s]\\n" {k} "${k}"; ' for k in KEYS)
    proc = install_functions(f"if parse_release_env '{env_file}'; then {show} else echo \"REJECTED: $PARSE_ERROR\"; fi\n")
    assert proc.returncode == 0, proc.stderr
    assert not mark.exists(), f"release.env ran a command:\n{text}"
    if proc.stdout.startswith("REJECTED"):
        assert "touch" not in proc.stdout and "\r" not in proc.stdout, proc.stdout
        return
    parsed = dict(re.fullmatch(r"([A-Z_]+)=\[(.*)\]", line).groups() for line in proc.stdout.splitlines())
    assert sorted(k for k, _, _ in lines) == sorted(KEYS), "accepted a file without exactly the known keys"
    for key, value, quote in lines:
        assert quote == "'{}'" and SAFE.fullmatch(value), (key, value, quote)
        assert parsed[key] == value
    if not edits:
        assert parsed == VALID


def test_release_env_the_builder_writes_is_accepted(releases, tmp_path: Path) -> None:
    """The Python writer (builder.assemble.bundle, in a real build) and the shell parser agree on
    a real description."""
    release = releases["v1"]
    with tarfile.open(release.path(BUNDLE)) as tar:
        fh = tar.extractfile("share/rke2/release.env")
        assert fh is not None
        (tmp_path / "release.env").write_bytes(fh.read())
    proc = install_functions(f"parse_release_env '{tmp_path}/release.env' || echo \"$PARSE_ERROR\"; "
                        "echo \"$DATA_KEY|$IMAGE_GROUPS|$RELEASE_VERSION\"")
    assert proc.stdout.strip() == f"{release.data_key}|{' '.join(release.groups)}|{V1}", proc.stdout + proc.stderr


SECRET = "SECRET-token-4f1c"


def test_symlinked_checksum_file_is_refused_and_never_printed(scratch_target: Target, scratch_release,
                                                              tmp_path: Path) -> None:
    """sha256sum-amd64.txt -> a secret file of the host: the old installer printed its first
    line as 'malformed'. A release file must be a regular file; nothing of it is printed."""
    secret = tmp_path / "shadow"
    secret.write_text(f"root:{SECRET}:19000:0:99999:7:::\n")
    r = scratch_release("v1")
    tamper.unsign(r)
    r.sums.unlink()
    r.sums.symlink_to(secret)
    proc = scratch_target.install(r)
    failed(proc, "sha256sum-amd64.txt is a symlink", "regular files")
    assert SECRET not in proc.stdout + proc.stderr


def test_malformed_checksum_line_is_not_echoed(scratch_target: Target, scratch_release) -> None:
    """A hostile line (terminal escape, a secret) in an unsigned checksum file: its number only."""
    r = scratch_release("v1")
    tamper.unsign(r)
    lines = r.sums.read_text()
    r.sums.write_text(lines + f"\x1b]0;owned\x07 {SECRET}\n")
    proc = scratch_target.install(r)
    failed(proc, f"sha256sum-amd64.txt: malformed line {lines.count(chr(10)) + 1}")
    assert SECRET not in proc.stdout + proc.stderr and "\x1b" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("what", ["sig-symlink", "sums-fifo"])
def test_signature_and_checksum_files_must_be_regular(what: str, scratch_target: Target, scratch_release,
                                                      fixture_signing_key, tmp_path: Path) -> None:
    r = scratch_release("v1")
    if what == "sig-symlink":
        sig = r.path("sha256sum-amd64.txt.sig")
        real = tmp_path / "real.sig"
        shutil.move(sig, real)
        sig.symlink_to(real)
        needle = "sha256sum-amd64.txt.sig is a symlink"
    else:
        r.sums.unlink()
        os.mkfifo(r.sums)
        needle = "sha256sum-amd64.txt is not a regular file"
    before = scratch_target.snapshot()
    failed(scratch_target.install(r, PUBLIC_KEY=str(fixture_signing_key[1])), needle)
    assert scratch_target.snapshot() == before


# --- 3. a signed release installs only with its key --------------------------------------------

@pytest.mark.parametrize("shell", SHELLS)
def test_signed_release_without_key_is_refused(shell: str, scratch_target: Target, releases) -> None:
    before = scratch_target.snapshot()
    failed(scratch_target.install(releases["v1"], shell, raw={"INSTALL_RKE2_PUBLIC_KEY": None},
                                  SKIP_SIGNATURE="false"),
           "signed (sha256sum-amd64.txt.sig) but INSTALL_RKE2_PUBLIC_KEY is not set",
           "INSTALL_RKE2_SKIP_SIGNATURE=true")
    assert scratch_target.snapshot() == before


def test_signed_release_with_explicit_opt_out_installs_with_a_warning(scratch_target: Target,
                                                                     releases) -> None:
    proc = ok(scratch_target.install(releases["v1"], SKIP_SIGNATURE="true"))
    assert "INSTALL_RKE2_SKIP_SIGNATURE=true: the signature sha256sum-amd64.txt.sig is NOT checked" in proc.stderr


def test_key_and_opt_out_together_are_refused(scratch_target: Target, releases, fixture_signing_key) -> None:
    failed(scratch_target.install(releases["v1"], PUBLIC_KEY=str(fixture_signing_key[1]),
                                  SKIP_SIGNATURE="true"), "both set")


def test_unsigned_release_installs_with_a_clear_warning(scratch_target: Target, scratch_release) -> None:
    r = scratch_release("v1")
    tamper.unsign(r)
    proc = ok(scratch_target.install(r))
    assert "[WARN]  UNSIGNED release: sha256sum-amd64.txt has no .sig" in proc.stderr


def test_ecdsa_signed_release_installs(scratch_target: Target, scratch_release, fixture_ecdsa_key) -> None:
    r = scratch_release("v1")
    sign.sign_checksums(r.directory, fixture_ecdsa_key[0])
    proc = ok(scratch_target.install(r, PUBLIC_KEY=str(fixture_ecdsa_key[1])))
    assert "signature of sha256sum-amd64.txt verified" in proc.stdout


@pytest.mark.parametrize("how", ["other-ecdsa-key", "flipped-byte", "changed-sums"])
def test_bad_ecdsa_signature_is_refused(how: str, scratch_target: Target, scratch_release, fixture_ecdsa_key,
                                        tmp_path: Path) -> None:
    r = scratch_release("v1")
    sig = r.path("sha256sum-amd64.txt.sig")
    if how == "other-ecdsa-key":
        other = sign.generate_key(tmp_path / "other.key", passphrase=b"x", algorithm="ecdsa-p256")
        sign.sign_checksums(r.directory, sign.load_private_key(other.private, b"x"))
    else:
        sign.sign_checksums(r.directory, fixture_ecdsa_key[0])
        if how == "flipped-byte":
            data = bytearray(sig.read_bytes())
            data[-5] ^= 0x01
            sig.write_bytes(bytes(data))
        else:
            r.sums.write_text(r.sums.read_text().replace("rke2-images.linux-amd64.txt", "rke2-images.linux-amd64.tx_"))
    before = scratch_target.snapshot()
    failed(scratch_target.install(r, PUBLIC_KEY=str(fixture_ecdsa_key[1])), "does not verify")
    assert scratch_target.snapshot() == before


# --- 4. no silent downgrade ---------------------------------------------------------------------

@pytest.mark.parametrize("shell", SHELLS)
def test_older_release_over_newer_is_refused(shell: str, scratch_target: Target, releases) -> None:
    ok(scratch_target.install(releases["v2"], shell))
    before = scratch_target.snapshot()
    failed(scratch_target.install(releases["v1"], shell),
           f"refusing to downgrade: {V2} is installed", f"older {V1}", "INSTALL_RKE2_ALLOW_DOWNGRADE=true")
    assert scratch_target.snapshot() == before
    ok(scratch_target.install(releases["v1"], shell, ALLOW_DOWNGRADE="true"))
    assert os.readlink(scratch_target.data_dir() / "bin") == f"data/{releases['v1'].data_key}/bin"


ORDERED = ["v1.9.0+rke2r1", "v1.32.9+rke2r3", "v1.32.13-rc1+rke2r1", "v1.32.13-rc2+rke2r1",
           "v1.32.13-rc10+rke2r1", "v1.32.13+rke2r1", "v1.32.13+rke2r2", "v1.32.13+rke2r10",
           "v1.33.9+rke2r1", "v2.0.0"]


def test_versions_compare_in_order() -> None:
    pairs = [(a, b) for a in ORDERED for b in ORDERED]
    script = "".join(f'echo "$(compare_versions {a} {b})"\n' for a, b in pairs)
    got = install_functions(script).stdout.split()
    want = [str((ORDERED.index(a) > ORDERED.index(b)) - (ORDERED.index(a) < ORDERED.index(b)))
            for a, b in pairs]
    assert got == want
    assert install_functions("compare_versions v1.32 v1.33.0 || echo unparsable").stdout.strip() == "unparsable"


PRE = st.one_of(st.none(), st.tuples(st.sampled_from(["alpha", "beta", "rc"]), st.integers(0, 30)))
VERSION = st.tuples(st.integers(0, 40), st.integers(0, 40), st.integers(0, 40), PRE, st.integers(0, 30))


def _format(v: tuple) -> str:
    major, minor, patch, pre, rev = v
    return f"v{major}.{minor}.{patch}" + (f"-{pre[0]}{pre[1]}" if pre else "") + f"+rke2r{rev}"


def _order_key(v: tuple) -> tuple:
    major, minor, patch, pre, rev = v
    return (major, minor, patch, pre is None, pre or ("", 0), rev)


@settings(max_examples=150, deadline=None)
@given(a=VERSION, b=VERSION)
def test_version_order_property(a: tuple, b: tuple) -> None:
    """compare_versions agrees with (numbers, release after its pre-releases, suffix number)."""
    want = (_order_key(a) > _order_key(b)) - (_order_key(a) < _order_key(b))
    proc = install_functions(f"compare_versions {_format(a)} {_format(b)}", shell="busybox")
    assert proc.stdout.strip() == str(want), (_format(a), _format(b), proc.stderr)


# --- archive members: types, paths, modes, owners -----------------------------------------------

def _add(path: Path, *extra: tuple[tarfile.TarInfo, bytes | None]) -> None:
    tamper.rewrite_tar(path, lambda members: members.extend(extra))


def _device(name: str) -> tuple[tarfile.TarInfo, None]:
    info, data = tamper.member(name, kind=tarfile.CHRTYPE)
    info.devmajor, info.devminor = 1, 3
    return info, data


MEMBERS = {
    "bundle-symlink": (BUNDLE, lambda: tamper.member(
        "bin/rke2-shadow", kind=tarfile.SYMTYPE, linkname="/etc/shadow"), "a symbolic link"),
    "bundle-hardlink": (BUNDLE, lambda: tamper.member(
        "bin/rke2-again", kind=tarfile.LNKTYPE, linkname="bin/rke2"), "a hard link"),
    "bundle-fifo": (BUNDLE, lambda: tamper.member("bin/rke2-fifo", kind=tarfile.FIFOTYPE), "a FIFO"),
    "bundle-device": (BUNDLE, lambda: _device("bin/rke2-null"), "a device"),
    "bundle-absolute": (BUNDLE, lambda: tamper.member("/etc/rke2-evil", b"x\n"), "absolute or"),
    "bundle-dotdot": (BUNDLE, lambda: tamper.member("bin/../../rke2-evil", b"x\n"), "'..'"),
    "images-symlink": (IMAGES, lambda: tamper.member(
        "blobs/sha256/evil", kind=tarfile.SYMTYPE, linkname="/etc/shadow"), "a symbolic link"),
    "images-device": (IMAGES, lambda: _device("blobs/sha256/null"), "a device"),
}


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("case", sorted(MEMBERS))
def test_link_device_fifo_and_absolute_members_are_refused(case: str, shell: str, scratch_target: Target,
                                                           scratch_release, fixture_signing_key) -> None:
    """Even in a signed release (a compromised build): only regular files and directories."""
    archive, make, kind = MEMBERS[case]
    r = scratch_release("v1")
    _add(r.path(archive), make())
    tamper.resign(r, fixture_signing_key[0])
    before = scratch_target.snapshot()
    err = failed(scratch_target.install(r, shell), f"{archive}: member", kind, "nothing installed")
    assert "shadow" not in err and "evil" not in err, "a member name from a refused archive was printed"
    assert scratch_target.snapshot() == before


@pytest.mark.parametrize("shell", SHELLS)
def test_setuid_world_writable_and_foreign_owner_are_not_kept(shell: str, scratch_target: Target,
                                                             scratch_release, fixture_signing_key) -> None:
    r = scratch_release("v1")

    def loosen(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
        for info, _ in members:
            if info.name == "bin/rke2":
                info.mode = 0o4755
            elif info.name == "bin/rke2-killall.sh":
                info.mode = 0o6777
            elif info.name == "share/rke2/LICENSE.txt":
                info.mode, info.uid, info.gid = 0o777, 1234, 1234
            elif info.name == "share/rke2/":
                info.mode = 0o1777
    tamper.rewrite_tar(r.path(BUNDLE), loosen)
    tamper.resign(r, fixture_signing_key[0])
    ok(scratch_target.install(r, shell))
    prefix = scratch_target.prefix()
    modes = {rel: stat.S_IMODE((prefix / rel).stat().st_mode)
             for rel in ("bin/rke2", "bin/rke2-killall.sh", "share/rke2/LICENSE.txt")}
    assert modes == {"bin/rke2": 0o755, "bin/rke2-killall.sh": 0o775, "share/rke2/LICENSE.txt": 0o775}
    license_stat = (prefix / "share/rke2/LICENSE.txt").stat()
    assert (license_stat.st_uid, license_stat.st_gid) == (os.getuid(), os.getgid())
    assert stat.S_IMODE((prefix / "share/rke2").stat().st_mode) & 0o1002 == 0


# --- the runtime layers (members of an image archive, extracted onto the node) -----------------

@pytest.mark.parametrize("shell", SHELLS)
def test_runtime_layer_link_is_refused(shell: str, scratch_target: Target, scratch_release,
                                       fixture_signing_key) -> None:
    """A runtime layer (signed, digest in release.env) holding bin/evil -> /etc/shadow."""
    r = scratch_release("v1")
    tamper.add_to_runtime_layer(r, tamper.member("bin/evil", kind=tarfile.SYMTYPE, linkname="/etc/shadow"))
    tamper.resign(r, fixture_signing_key[0])
    before = scratch_target.snapshot()
    err = failed(scratch_target.install(r, shell, PUBLIC_KEY=str(fixture_signing_key[1])),
                 "runtime layer sha256:", "is a symbolic link", "nothing installed")
    assert "shadow" not in err and "evil" not in err
    assert scratch_target.snapshot() == before, "refused only after touching the target"


@pytest.mark.parametrize("shell", SHELLS)
def test_runtime_layer_setuid_is_not_kept(shell: str, scratch_target: Target, scratch_release) -> None:
    """An unsigned release whose runtime layer (digest in release.env) holds a setuid file."""
    r = scratch_release("v1")
    tamper.add_to_runtime_layer(r, tamper.member("bin/suid-tool", b"#!/bin/sh\n", mode=0o4777))
    tamper.unsign(r)
    tamper.resum(r)
    ok(scratch_target.install(r, shell))
    landed = scratch_target.data_dir() / "bin" / "suid-tool"
    assert stat.S_IMODE(landed.stat().st_mode) == 0o775
