"""builder.trust.checksums: sha256sum-compatible writing, strict parsing, checking a directory."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from builder.store import write_atomic
from builder.trust import checksums
from builder.trust.checksums import ChecksumError, Entry
from tests.plugins.install import tmpfs


def _files(tmp_path: Path) -> list[Path]:
    out = []
    for name, data in [("b.tar.zst", b"bee" * 1000), ("a.txt", b"alpha\n"), ("c.tar.gz", b"")]:
        (tmp_path / name).write_bytes(data)
        out.append(tmp_path / name)
    return out


def test_write_sorted_and_sha256sum_checks_it(tmp_path: Path) -> None:
    files = _files(tmp_path)
    path = checksums.write_for_arch(tmp_path, "amd64", files)
    assert path.name == "sha256sum-amd64.txt"
    lines = path.read_text().splitlines()
    assert [line[66:] for line in lines] == ["a.txt", "b.tar.zst", "c.tar.gz"]
    assert lines[0] == hashlib.sha256(b"alpha\n").hexdigest() + "  a.txt"
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    if shutil.which("sha256sum"):
        proc = subprocess.run(["sha256sum", "--strict", "-c", path.name], cwd=tmp_path,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list(tmp_path.glob(".sha256sum-*"))  # no temp file left


def test_known_digests_are_not_rehashed(tmp_path: Path) -> None:
    files = _files(tmp_path)
    known_hex = hashlib.sha256(b"bee" * 1000).hexdigest()
    # A known digest is used as given, even for a file that is not there (it came from the store).
    (tmp_path / "b.tar.zst").unlink()
    entries = checksums.write(tmp_path / "sums.txt", files, known={"b.tar.zst": f"sha256:{known_hex}"})
    assert Entry("b.tar.zst", known_hex) in entries
    with pytest.raises(ChecksumError, match="not a sha256"):
        checksums.write(tmp_path / "sums.txt", files, known={"b.tar.zst": "md5:abc"})


def test_missing_file_without_known_digest(tmp_path: Path) -> None:
    with pytest.raises(ChecksumError, match="no such artifact"):
        checksums.write(tmp_path / "sums.txt", [tmp_path / "nope.tar"])


def test_duplicate_and_bad_names_refused() -> None:
    hex_ = "0" * 64
    with pytest.raises(ChecksumError, match="twice"):
        checksums.render([Entry("a", hex_), Entry("a", hex_)])
    with pytest.raises(ChecksumError, match="base name"):
        checksums.render([Entry("dir/a", hex_)])


def test_parse_accepts_text_and_binary_markers() -> None:
    hex_ = "ab" * 32
    entries = checksums.parse(f"{hex_}  a.tar\n{hex_} *b.tar\n")
    assert entries == [Entry("a.tar", hex_), Entry("b.tar", hex_)]
    assert entries[0].digest == f"sha256:{hex_}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "lists no artifacts"),
        ("ab" * 32 + "  a.tar", "no newline"),
        ("ab" * 32 + "  a.tar\n\n", "line 2"),
        ("AB" * 32 + "  a.tar\n", "line 1"),
        ("ab" * 31 + "  a.tar\n", "line 1"),
        ("ab" * 32 + " a.tar\n", "line 1"),
        ("ab" * 32 + "  a.tar\n" + "cd" * 32 + "  a.tar\n", "line 2: a.tar is already listed on line 1"),
        ("ab" * 32 + "  ../etc/passwd\n", "line 1: '../etc/passwd' is not a plain base name"),
        ("ab" * 32 + "  a b.tar\n", "line 1"),
    ],
)
def test_parse_is_strict_and_names_the_line(text: str, message: str) -> None:
    with pytest.raises(ChecksumError, match=message.replace(".", r"\.").replace("(", r"\(")):
        checksums.parse(text, "sums")


def test_parse_file_missing_and_not_ascii(tmp_path: Path) -> None:
    with pytest.raises(ChecksumError, match="not found"):
        checksums.parse_file(tmp_path / "sha256sum-amd64.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\n")
    with pytest.raises(ChecksumError, match="not ASCII"):
        checksums.parse_file(bad)


def test_check_reports_missing_and_mismatched(tmp_path: Path) -> None:
    files = _files(tmp_path)
    sums = checksums.write_for_arch(tmp_path, "arm64", files)
    assert checksums.check(tmp_path, arch="arm64").ok == ["a.txt", "b.tar.zst", "c.tar.gz"]
    (tmp_path / "a.txt").write_bytes(b"changed\n")
    (tmp_path / "c.tar.gz").unlink()
    result = checksums.check(tmp_path, sums, raise_on_failure=False)
    assert (result.mismatched, result.missing, result.passed) == (["a.txt"], ["c.tar.gz"], False)
    with pytest.raises(ChecksumError, match=r"a\.txt: checksum mismatch; c\.tar\.gz: missing"):
        checksums.check(tmp_path, sums)
    # Checking only some names: the others do not matter, an unlisted one is an error.
    assert checksums.check(tmp_path, sums, names=["b.tar.zst"]).passed
    with pytest.raises(ChecksumError, match="no line for extra.tar"):
        checksums.check(tmp_path, sums, names=["b.tar.zst", "extra.tar"])


def test_atomic_write_keeps_old_file_on_a_full_disk(tmp_path: Path) -> None:
    """A real full filesystem (a 16 KiB tmpfs, filled up): the new bytes cannot be written, the
    old file stays as it was and no temp file is left behind."""
    with tmpfs(tmp_path / "full", "16k") as disk:
        target = disk / "sha256sum-amd64.txt"
        target.write_text("old\n")
        with open(disk / "filler", "wb", buffering=0) as fill, contextlib.suppress(OSError):
            while fill.write(b"\0" * 4096):  # until the disk is full (ENOSPC)
                pass
        with pytest.raises(OSError) as err:
            write_atomic(target, b"new\n")
        assert err.value.errno == errno.ENOSPC
        assert target.read_text() == "old\n"
        assert sorted(p.name for p in disk.iterdir()) == ["filler", target.name]


def test_parse_file_reads_only_a_bounded_regular_file(tmp_path: Path) -> None:
    """The checksum file on hostile media: a symlink is refused (not followed), a FIFO is refused
    without blocking, and a file far larger than any checksum file is refused unread."""
    good = tmp_path / "good.txt"
    good.write_text("ab" * 32 + "  a.tar\n")
    link = tmp_path / "sha256sum-amd64.txt"
    link.symlink_to(good)
    with pytest.raises(ChecksumError, match="is a symlink, not a regular file"):
        checksums.parse_file(link)
    fifo = tmp_path / "sha256sum-arm64.txt"
    os.mkfifo(fifo)
    with pytest.raises(ChecksumError, match="is not a regular file"):
        checksums.parse_file(fifo)
    big = tmp_path / "sha256sum-s390x.txt"
    big.write_bytes(("ab" * 32 + "  a.tar\n").encode() * (checksums.SIZE_LIMIT // 72 + 1))
    with pytest.raises(ChecksumError, match=f"larger than {checksums.SIZE_LIMIT} bytes"):
        checksums.parse_file(big)
