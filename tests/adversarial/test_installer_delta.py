"""install.sh's delta install against an attacker who controls the delta media.

The description (delta.linux-ARCH.txt) is not signed: the rebuilt archives are checked against the
signed checksum file. So what matters here is that the description is only ever data (parsed
strictly, never run, never echoed), that install.sh's parser accepts exactly what the builder's
(builder.trust.delta.parse) accepts, and that a tampered delta is refused before the target is
touched, with the error line that names what is wrong. The parser properties call install.sh's own
functions (the script without its last line, ``main "$@"``); the install cases run the real
install.sh under dash and busybox sh on real releases and the real delta `build --since` writes.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from builder import artifacts
from builder.trust import delta as D
from tests import tamper
from tests.plugins.install import SHELLS, Delta, Target, failed, install_functions, needs_tools, ok
from tests.plugins.releases import V1, V2, Release, scratch_copy
from tests.rig import update

pytestmark = needs_tools()

SUMS = "sha256sum-amd64.txt"
DESC = "delta.linux-amd64.txt"
HEX = st.text("0123456789abcdef", min_size=64, max_size=64)
SHOW = ('printf "%s|%s|%s|%s|%s|%s\\n" "$D_NAME" "$D_VERSION" "$D_ARCH" "$D_BASE_VERSION" '
        '"$D_BASE_SUMS" "$D_SUMS"; cat "$OUT"')


def sh_parse(data: bytes, tmp_path: Path, shell: str = "dash") -> tuple[bool, str]:
    """(accepted, stdout) of install.sh's parse_delta on ``data``: the parsed fields and the
    archive table when accepted, "REJECTED: <error>" otherwise."""
    desc, out = tmp_path / "delta.linux-amd64.txt", tmp_path / "archives"
    desc.write_bytes(data)
    proc = install_functions(f'OUT={out}; if parse_delta "{desc}" "$OUT"; then {SHOW}; '
                             'else echo "REJECTED: $PARSE_ERROR"; fi\n', shell)
    assert proc.returncode == 0, proc.stderr
    return not proc.stdout.startswith("REJECTED"), proc.stdout


def py_parse(data: bytes) -> D.Description | None:
    try:
        return D.parse(data, "delta.linux-amd64.txt")
    except D.DescriptionError:
        return None


def expected_stdout(desc: D.Description, data: bytes) -> str:
    """What SHOW prints for ``desc``: its fields, then one table line per archive (with the
    line number of its archive line)."""
    lines = data.decode().splitlines()
    rows = []
    for a in desc.archives:
        number = lines.index(a.line().rstrip("\n")) + 1
        rows.append(f"{a.file} {a.full_hex} {a.full_size} {a.base_hex or '-'} {a.delta_file} "
                    f"{a.delta_hex} {a.delta_size} {len(a.pieces)} {number}\n")
    return (f"{desc.name}|{desc.version}|{desc.arch}|{desc.base_version}|{desc.base_sums}|"
            f"{desc.sums}\n" + "".join(rows))


@st.composite
def descriptions(draw: st.DrawFn) -> D.Description:
    """A valid description: 1-3 archives of 1-6 pieces, delta pieces tiling the delta archive."""
    name = draw(st.sampled_from(["rke2", "my-k8s", "k.8"]))
    arch = draw(st.sampled_from(["amd64", "arm64", "s390x"]))
    groups = draw(st.lists(st.sampled_from([None, "core", "canal", "x_y.z"]), min_size=1,
                           max_size=3, unique=True))
    archives = []
    for group in groups:
        ext = draw(st.sampled_from([".tar.zst", ".tar.gz"]))
        file = (f"{name}-images.linux-{arch}" if group is None
                else f"{name}-images-{group}.linux-{arch}") + ext
        has_base = draw(st.booleans())
        pieces, at = [], 0
        for _ in range(draw(st.integers(1, 6))):
            source = draw(st.sampled_from(["base", "delta"])) if has_base else "delta"
            length = draw(st.integers(1, 10**6))
            offset = draw(st.integers(0, 10**9)) if source == "base" else at
            if source == "delta":
                at += length
            label = draw(st.one_of(st.sampled_from(["head", "tail"]), HEX.map("sha256:{}".format)))
            pieces.append(D.Piece(source, offset, length, draw(HEX), label))
        archives.append(D.ArchiveDelta(file, draw(HEX), sum(p.length for p in pieces),
                                       draw(HEX) if has_base else None, draw(HEX), at,
                                       tuple(pieces)))
    version = draw(st.sampled_from(["v1.33.9+rke2r1", "v1.32.13+rke2r2", "1.0_rc-1"]))
    return D.Description(name, version, arch, "v1.32.13+rke2r1", draw(HEX), draw(HEX),
                         tuple(archives))


# Field values an edit puts in: plausible, off by one, hostile.
TOKENS = st.one_of(
    st.sampled_from(["", "0", "00", "01", "-1", "1", "-", "base", "delta", "piece", "archive",
                     "head", "tail", "sha256:", "9999999999999999", "10000000000000000",
                     "200000", "200001", "ppc64le", "AMD64", "rke2", "v1", "a" * 64, "A" * 64,
                     "0" * 63, "rke2-images-all.linux-amd64.tar.zst",
                     "rke2-images.linux-amd64.tar.zst", "rke2-images.linux-amd64.delta.tar.zst",
                     "rke2-images-.linux-amd64.tar.zst", "$(touch MARK)", "`touch MARK`", "*",
                     "a\tb", "x\r", "x;touch MARK", "é"]),
    st.integers(0, 2 * 10**6).map(str), HEX)
EDIT = st.one_of(
    st.tuples(st.just("field"), st.integers(0, 10**6), st.integers(0, 9), TOKENS),
    st.tuples(st.just("drop"), st.integers(0, 10**6), st.just(0), st.just("")),
    st.tuples(st.just("dup"), st.integers(0, 10**6), st.just(0), st.just("")),
    st.tuples(st.just("space"), st.integers(0, 10**6), st.just(0), st.sampled_from([" ", "  "])),
    st.tuples(st.just("end"), st.just(0), st.just(0), st.sampled_from(["", "\n", "x\n"])),
    # A number off by a little: the tiling and size rules, not only the shapes.
    st.tuples(st.just("nudge"), st.integers(0, 10**6), st.integers(0, 9),
              st.sampled_from(["-1", "1", "-1000", "1000"])),
)


def apply(data: bytes, edit: tuple[str, int, int, str]) -> bytes:
    op, at, field, token = edit
    if op == "end":
        return (data[:-1] if token == "" else data + token.encode())
    lines = data.decode().split("\n")[:-1]
    i = at % len(lines)
    if op == "drop":
        del lines[i]
    elif op == "dup":
        lines.insert(i, lines[i])
    elif op == "nudge":
        parts = lines[i].split(" ")
        numbers = [j for j, part in enumerate(parts) if part.isdigit() and len(part) < 64]
        if numbers:
            j = numbers[field % len(numbers)]
            parts[j] = str(max(0, int(parts[j]) + int(token)))
            lines[i] = " ".join(parts)
    elif op == "space":
        lines[i] = lines[i] + token if field % 2 else token + lines[i]
    else:
        parts = lines[i].split(" ")
        parts[field % len(parts)] = token
        lines[i] = " ".join(parts)
    return ("\n".join(lines) + "\n").encode()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(desc=descriptions(), edits=st.lists(EDIT, max_size=2))
def test_delta_parser_agrees_with_the_builders(desc: D.Description, edits, tmp_path: Path) -> None:
    """Whatever the description holds, install.sh accepts it exactly when builder.trust.delta.parse
    does (one exception: ppc64le, an arch the builder knows and this installer does not install),
    reads the same fields, never runs any of it and never echoes it in an error."""
    mark = tmp_path / "MARK"
    data = desc.render()
    for edit in edits:
        data = apply(data, (edit[0], edit[1], edit[2], edit[3].replace("MARK", str(mark))))
    accepted, out = sh_parse(data, tmp_path)
    event("accepted" if accepted else "rejected")
    assert not mark.exists(), "the description ran a command"
    python = py_parse(data)
    if python is not None and python.arch == "ppc64le":
        assert not accepted
        return
    assert accepted == (python is not None), f"sh: {out}\npython: {python}\n{data!r}"
    if accepted:
        assert python is not None
        assert out == expected_stdout(python, data)
    else:
        # The error names a line and a field, never the content.
        assert "touch" not in out and "\r" not in out and "\t" not in out, out
    if not edits:
        assert accepted


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ranges=st.lists(st.tuples(st.integers(0, 200_000), st.integers(1, 140_000)), min_size=1,
                       max_size=6), shell=st.sampled_from(sorted(SHELLS)))
def test_byte_range_reads_exactly_the_range(ranges: list[tuple[int, int]], shell: str,
                                            tmp_path: Path) -> None:
    """byte_range (dd to the 64 KiB block, tail -c +N, head -c) gives the bytes at OFFSET, LENGTH
    of them (fewer past the end), across block boundaries, under dash and busybox."""
    data = hashlib.sha256(b"seed").digest() * 6000  # 192000 bytes, no two blocks alike
    path = tmp_path / "file"
    path.write_bytes(data)
    script = "".join(f'byte_range "{path}" {o} {n} | sha256sum | cut -c 1-64; ' for o, n in ranges)
    proc = install_functions(script + "\n", shell)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [hashlib.sha256(data[o:o + n]).hexdigest() for o, n in ranges]


def test_delta_names_are_the_builders() -> None:
    """install.sh's delta_name / delta_archive_name are builder.artifacts' rules (the media
    names the installer looks for are the ones `build --since` writes)."""
    files = ["rke2-images.linux-amd64.tar.zst", "rke2-images-core.linux-arm64.tar.gz",
             "my-k8s-images-x.y_z.linux-s390x.tar.zst"]
    script = "".join(f'delta_archive_name "{f}"; ' for f in files) + \
        "".join(f"delta_name {a}; " for a in ("amd64", "arm64", "s390x"))
    proc = install_functions(script + "\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [artifacts.delta_archive_name(f) for f in files] + [
        artifacts.delta_description_name(a) for a in ("amd64", "arm64", "s390x")]


@pytest.mark.parametrize("shell", ["dash", "busybox"])
def test_delta_parser_refuses_each_broken_rule(tmp_path: Path, shell: str) -> None:
    """One case per rule of the format that is not a field's shape (those the property covers):
    the bounds, the order of lines, the tiling and the sums; each refused with its reason."""
    pieces = (D.Piece("base", 7, 3, "5" * 64, "head"), D.Piece("delta", 0, 2, "6" * 64, "tail"),
              D.Piece("delta", 2, 3, "7" * 64, "sha256:" + "8" * 64))
    desc = D.Description("rke2", "v2", "amd64", "v1", "1" * 64, "2" * 64, (D.ArchiveDelta(
        "rke2-images.linux-amd64.tar.zst", "3" * 64, 8, "9" * 64, "4" * 64, 5, pieces),))
    data = desc.render()
    archive = data.decode().splitlines()[4]
    assert sh_parse(data, tmp_path, shell)[0]
    cases = {
        "larger than 4 MiB": data + b"x" * (4 << 20),
        "empty, or the last line has no newline": data[:-1],
        "a character outside [A-Za-z0-9._:+ -] and newline": data.replace(b"rke2 v2", b"rke2\0 v2"),
        "line 1 is not 'airgap-builder-delta 1'": data.replace(b"delta 1\n", b"delta 2\n", 1),
        "line 5: COUNT is not a number from 1 to 200000": data.replace(b" 5 3\n", b" 5 200001\n"),
        "line 9: FILE has an archive line already": data + data[data.index(b"archive"):],
        "no archive line": data[: data.index(b"archive")],
        "the file ends 1 piece lines short of the archive on line 5": data.replace(b" 5 3\n", b" 5 4\n"),
        "line 8 is not 'piece SOURCE OFFSET LENGTH HEX LABEL' (the archive on line 5 has 1 more)":
            data.replace(b"piece delta 2 3", b"pieces delta 2 3"),
        "line 8: the delta pieces do not follow each other (OFFSET 1, expected 2)":
            data.replace(b"delta 2 3", b"delta 1 3"),
        "line 8: the delta pieces of the archive on line 5 end at 5, not at its DELTA_SIZE":
            data.replace(f" {'4' * 64} 5 3".encode(), f" {'4' * 64} 6 3".encode()),
        "line 8: the pieces of the archive on line 5 sum to 8 bytes, not its FULL_SIZE":
            data.replace(f"{'3' * 64} 8 ".encode(), f"{'3' * 64} 9 ".encode()),
        "line 6: a base piece in an archive without a base file (BASE_HEX -)":
            data.replace(f" {'9' * 64} ".encode(), b" - "),
        "line 5: DELTA_FILE is not FILE's delta archive name":
            data.replace(b"amd64.delta.tar.zst", b"amd64.delta.tar.gz"),
        "line 5: FILE is not an image archive of the release":
            data.replace(archive.encode(), archive.replace("images.", "images-all.").replace(
                "images.linux-amd64.delta", "images-all.linux-amd64.delta").encode()),
        "line 6: LENGTH is not a number of at least 1": data.replace(b"base 7 3", b"base 7 0"),
    }
    for reason, bad in cases.items():
        accepted, out = sh_parse(bad, tmp_path, shell)
        assert not accepted and reason in out, (reason, out)
        assert py_parse(bad) is None, reason


def test_a_real_description_parses_alike(tmp_path: Path) -> None:
    """A description of the size a real release gives (a few hundred pieces) reads back the same
    in sh, and quickly."""
    pieces = tuple(D.Piece("base" if i % 3 else "delta", i * 1000, 1000, hashlib.sha256(
        str(i).encode()).hexdigest(), f"sha256:{hashlib.sha256(bytes([i % 256])).hexdigest()}")
        for i in range(600))
    at, tiled = 0, []
    for p in pieces:
        if p.source == "delta":
            p = D.Piece("delta", at, p.length, p.hex, p.label)
            at += p.length
        tiled.append(p)
    desc = D.Description("rke2", "v2", "amd64", "v1", "1" * 64, "2" * 64, (D.ArchiveDelta(
        "rke2-images.linux-amd64.tar.zst", "3" * 64, 600_000, "6" * 64, "4" * 64, at,
        tuple(tiled)),))
    data = desc.render()
    accepted, out = sh_parse(data, tmp_path)
    assert accepted and out == expected_stdout(desc, data)
    assert re.search(r" 600 5\n$", out)


# --- the delta install refuses, before anything changes -----------------------------------------

FILE = "rke2-images.linux-amd64.tar.zst"
HINT = f"install the full release {update.PATCH} instead"
AGAIN = "copy the delta directory again"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_description(media: Release, change) -> None:
    """The description rewritten by ``change`` (text -> text): a forger's edit."""
    path = media.path(DESC)
    tamper.replace_bytes(path, change(path.read_text()).encode())


def piece_line(desc: D.Description, source: str) -> tuple[int, D.Piece]:
    """(1-based index, piece) of the first piece of FILE from ``source``."""
    archive = desc.archive(FILE)
    assert archive is not None
    return next((i + 1, p) for i, p in enumerate(archive.pieces) if p.source == source)


def other_hex(hex_value: str) -> str:
    return hashlib.sha256(hex_value.encode()).hexdigest()


def no_base(d: Delta, media: Release, target: Target) -> str:
    del media
    kept = target.prefix() / "share/rke2" / SUMS
    return (f"this delta updates rke2 {V1}, but {kept} (the checksum file an install keeps) is "
            "not there: the node has no release installed by this installer, or one installed "
            f"before deltas; {HINT}")


def other_release(d: Delta, media: Release, target: Target) -> str:
    kept = target.prefix() / "share/rke2" / SUMS
    return (f"this delta updates rke2 {V1} (checksum file sha256 {d.description.base_sums}), but "
            f"this node has version {V2} ({kept} has sha256 {sha(kept)}); {HINT}")


def base_archive_missing(d: Delta, media: Release, target: Target) -> str:
    (target.images_dir() / FILE).unlink()
    return (f"{FILE}: the delta builds on {target.images_dir() / FILE} from {V1}, which is not "
            f"there (or not a regular file); {HINT}")


def base_archive_changed(d: Delta, media: Release, target: Target) -> str:
    archive = d.description.archive(FILE)
    assert archive is not None
    path = target.images_dir() / FILE
    tamper.flip_byte(path, path.stat().st_size // 2)
    return (f"{path} does not match the {V1} archive the delta builds on (expected sha256 "
            f"{archive.base_hex}, got {sha(path)}): it was changed on this node; {HINT}")


def base_piece_past_the_end(d: Delta, media: Release, target: Target) -> str:
    """A base piece moved to end one byte past the base archive: refused by the node's own size
    of the file (read from its directory entry), before the piece is read."""
    i, piece = piece_line(d.description, "base")
    path = target.images_dir() / FILE
    size = path.stat().st_size
    moved = D.Piece("base", size - piece.length + 1, piece.length, piece.hex, piece.label)
    edit_description(media, lambda text: text.replace(piece.line(), moved.line(), 1))
    return (f"{FILE}: piece {i} (blob {piece.label}) lies past the end of {path} ({size} bytes, "
            f"the base's as {DESC} says): the description was changed; {AGAIN}")


def delta_archive_byte(d: Delta, media: Release, target: Target) -> str:
    archive = d.description.archive(FILE)
    assert archive is not None
    path = media.path(archive.delta_file)
    tamper.flip_byte(path, path.stat().st_size // 2)
    return (f"{archive.delta_file}: checksum mismatch (expected {archive.delta_hex} from {DESC}, "
            f"got {sha(path)}): the delta archive is damaged or was changed; {AGAIN}")


def piece_hash(source: str):
    def case(d: Delta, media: Release, target: Target) -> str:
        i, piece = piece_line(d.description, source)
        fake = other_hex(piece.hex)
        edit_description(media, lambda text: text.replace(piece.line(), piece.line().replace(
            piece.hex, fake), 1))
        where = target.images_dir() / FILE if source == "base" else f"{d.description.archive(FILE).delta_file}"
        return (f"{FILE}: piece {i} (blob {piece.label}, {piece.length} bytes at {piece.offset} of "
                f"{where}) does not match its sha256 in {DESC} (expected {fake}, got {piece.hex}): "
                f"the description was changed; {AGAIN}")
    return case


def sums_line(d: Delta, media: Release, target: Target) -> str:
    fake = other_hex(d.description.sums)
    edit_description(media, lambda text: text.replace(f"sums {d.description.sums}\n", f"sums {fake}\n"))
    return (f"{DESC} is for the checksum file with sha256 {fake}, but {SUMS} on the media has "
            f"sha256 {sha(media.sums)}: the description and the checksum file come from different "
            f"builds; {AGAIN}")


def release_line(d: Delta, media: Release, target: Target) -> str:
    edit_description(media, lambda text: text.replace(f"release rke2 {update.PATCH} amd64\n",
                                                      "release rke2 v1.32.15+rke2r1 amd64\n"))
    return (f"{DESC} describes rke2 v1.32.15+rke2r1 (amd64), but rke2.linux-amd64.tar.gz is rke2 "
            f"{update.PATCH} (amd64): the description belongs to another release; {AGAIN}")


def malformed(d: Delta, media: Release, target: Target) -> str:
    i, piece = piece_line(d.description, "delta")
    edit_description(media, lambda text: text.replace(piece.line(), "", 1))
    return f"{DESC}: line "  # which line and rule: the parser tests pin those


def coherent_forgery(d: Delta, media: Release, target: Target) -> str:
    """A forger who changes delta bytes and rewrites every hash the description holds for them:
    the rebuilt archive then fails the signed checksum file."""
    archive = d.description.archive(FILE)
    assert archive is not None
    i, piece = piece_line(d.description, "delta")
    path = media.path(archive.delta_file)
    data = bytearray(path.read_bytes())
    data[piece.offset + piece.length // 2] ^= 0xFF
    tamper.replace_bytes(path, bytes(data))
    new_piece = hashlib.sha256(data[piece.offset:piece.end]).hexdigest()
    edit_description(media, lambda text: text.replace(piece.line(), piece.line().replace(
        piece.hex, new_piece), 1).replace(f" {archive.delta_hex} ", f" {sha(path)} "))
    signed = archive.full_hex
    forged = hashlib.sha256()
    for p in archive.pieces:
        src = target.images_dir() / FILE if p.source == "base" else path
        with open(src, "rb") as fh:
            fh.seek(p.offset)
            forged.update(fh.read(p.length))
    return (f"{FILE}: checksum mismatch (expected {signed}, got {forged.hexdigest()}): the file "
            "is damaged or was changed")


# case -> (what the node has: None, "base" or "v2"; the tamper, returning the error line)
REFUSALS = {
    "no base installed": (None, no_base),
    "another release installed": ("v2", other_release),
    "base archive missing": ("base", base_archive_missing),
    "base archive changed on the node": ("base", base_archive_changed),
    "a base piece past the end of the base archive": ("base", base_piece_past_the_end),
    "a changed byte in the delta archive": ("base", delta_archive_byte),
    "a changed base piece hash": ("base", piece_hash("base")),
    "a changed delta piece hash": ("base", piece_hash("delta")),
    "sums of another build": ("base", sums_line),
    "release line of another version": ("base", release_line),
    "malformed description": ("base", malformed),
    "delta bytes and their hashes forged": ("base", coherent_forgery),
}


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("case", list(REFUSALS))
def test_delta_refused_before_anything_changes(case: str, shell: str, delta: Delta,
                                               scratch_target: Target, releases,
                                               tmp_path: Path) -> None:
    """Each refusal with its exact error line, the target exactly as it was (a listing of every
    entry with its mode, owner, size, mtime and sha256, directory mtimes included)."""
    has, tamper_with = REFUSALS[case]
    if has is not None:
        ok(scratch_target.install(delta.base if has == "base" else releases["v2"], shell))
    media = scratch_copy(delta.media, tmp_path / "media")
    expected = tamper_with(delta, media, scratch_target)
    before = scratch_target.snapshot()
    proc = scratch_target.install(media, shell)
    err = failed(proc)
    last = err.splitlines()[-1]
    print(f"\n{case}: {last}")
    if expected.endswith(": line "):
        assert last.startswith(f"[ERROR] {expected}") and last.endswith(
            f"; the delta description is damaged or was not written by this project's builder: {AGAIN}"), last
    else:
        assert last == f"[ERROR] {expected}", f"\n{last}\n[ERROR] {expected}"
    assert scratch_target.snapshot() == before, "a refused delta changed the target"
