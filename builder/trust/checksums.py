"""The per-arch checksum file, ``sha256sum-ARCH.txt``, in ``sha256sum`` format.

One line per artifact: ``<64 lowercase hex><two spaces><base name>``, sorted by name, so that
``sha256sum -c sha256sum-ARCH.txt`` run in the artifacts directory checks every artifact and
install.sh can find a file's line with a fixed-width parse.

Writing is atomic (temp file in the same directory, fsync, rename, fsync of the directory): a
reader never sees half a checksum file, and an interrupted run leaves the old one in place.
Digests the caller already knows (from the content store) are taken as given, because the
architecture forbids re-hashing what the store has verified; everything else is hashed by
streaming through fixed-size buffers.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builder import digest
from builder.artifacts import checksum_name
from builder.errors import BuilderError

# write_atomic: the one atomic writer (builder/store.py); assemble/images.py imports it from here too.
from builder.store import write_atomic


class ChecksumError(BuilderError):
    """A checksum file is malformed, or an artifact does not match it."""


# sha256sum writes "  " (text mode) or " *" (binary mode); both mean the same on Linux.
# Every pattern here is applied with fullmatch: `$` would also accept a trailing newline.
_LINE = re.compile(r"(?P<hex>[0-9a-f]{64}) (?P<mode>[ *])(?P<name>[^\n]+)")
# Base names only: no directory parts, no characters sha256sum would escape with a backslash.
_NAME = re.compile(r"[A-Za-z0-9._+-]+")
# A checksum file lists the artifacts of one arch: a few dozen lines. Anything near this size is
# not ours, and reading it whole must not exhaust memory.
SIZE_LIMIT = 1 << 20


@dataclass(frozen=True, order=True)
class Entry:
    """One line: an artifact's base name and its sha256 as bare hex."""

    name: str
    hex: str

    @property
    def digest(self) -> str:
        return digest.from_hex(self.hex)

    def line(self) -> str:
        return f"{self.hex}  {self.name}\n"


@dataclass
class CheckResult:
    """Outcome of checking a directory against a checksum file."""

    ok: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.missing and not self.mismatched


def _check_name(name: str, where: str) -> None:
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise ChecksumError(
            f"{where}: {name!r} is not a plain base name",
            "checksum files list base names only (letters, digits, '.', '_', '+', '-')",
        )


def _as_hex(value: str, name: str) -> str:
    """Accept ``sha256:<hex>`` or bare hex for a known digest."""
    if digest.is_digest(value):
        return digest.hex_of(value)
    if digest.is_hex64(value):
        return value
    raise ChecksumError(f"known digest for {name} is not a sha256: {value!r}")


def render(entries: Iterable[Entry]) -> str:
    """The file's text: entries sorted by name, duplicate names refused."""
    ordered = sorted(entries)
    seen: set[str] = set()
    for entry in ordered:
        _check_name(entry.name, "checksum entry")
        if not digest.is_hex64(entry.hex):
            raise ChecksumError(f"checksum entry {entry.name}: not 64 lowercase hex: {entry.hex!r}")
        if entry.name in seen:
            raise ChecksumError(f"checksum entry {entry.name} appears twice")
        seen.add(entry.name)
    return "".join(e.line() for e in ordered)


def entries_for(files: Sequence[Path], known: Mapping[str, str] | None = None) -> list[Entry]:
    """An entry per file; ``known`` maps a base name to its digest (``sha256:`` or hex).

    A known digest is trusted (it came from the store, which verified it on write); other files are
    hashed by streaming.
    """
    known = known or {}
    out: list[Entry] = []
    for path in files:
        name = path.name
        if name in known:
            out.append(Entry(name, _as_hex(known[name], name)))
            continue
        if not path.is_file():
            raise ChecksumError(f"{path}: no such artifact to checksum")
        out.append(Entry(name, digest.hex_of(digest.of_file(path)[0])))
    return out


def write(path: Path, files: Sequence[Path], known: Mapping[str, str] | None = None) -> list[Entry]:
    """Write a checksum file for ``files`` at ``path``; returns the entries written."""
    entries = entries_for(files, known)
    write_atomic(path, render(entries).encode())
    return sorted(entries)


def write_for_arch(
    directory: Path, arch: str, files: Sequence[Path], known: Mapping[str, str] | None = None
) -> Path:
    """Write ``directory/sha256sum-ARCH.txt`` for the arch's artifacts; returns its path."""
    target = directory / checksum_name(arch)
    write(target, files, known)
    return target


def parse(text: str, source: str = "checksum file") -> list[Entry]:
    """Parse strictly: every line must be a valid ``sha256sum`` line; errors name the line."""
    if text and not text.endswith("\n"):
        raise ChecksumError(
            f"{source}: last line has no newline (truncated file?)",
            "regenerate the checksum file; a partial copy cannot be trusted",
        )
    entries: list[Entry] = []
    seen: dict[str, int] = {}
    # Split on "\n" only: splitlines() would also split on \r, \v, \f and \x1c-\x1e, so a
    # line with one of those inside would pass as two clean lines.
    for number, line in enumerate(text.split("\n")[:-1] if text else [], start=1):
        where = f"{source} line {number}"
        match = _LINE.fullmatch(line)
        if not match:
            raise ChecksumError(
                f"{where}: not '<64 lowercase hex>  <name>': {line[:120]!r}",
                "the file must be in sha256sum format, one artifact per line",
            )
        name = match["name"]
        _check_name(name, where)
        if name in seen:
            raise ChecksumError(f"{where}: {name} is already listed on line {seen[name]}")
        seen[name] = number
        entries.append(Entry(name, match["hex"]))
    if not entries:
        raise ChecksumError(f"{source}: lists no artifacts")
    return entries


def read_regular(path: Path, limit: int, what: str = "file",
                 missing_hint: str = "copy the whole release directory again") -> bytes:
    """The bytes of ``path`` if it is a regular file (not a symlink, device or FIFO) of at most
    ``limit`` bytes; read through one descriptor, so what was checked is what is read.
    ``missing_hint``: what to do when there is no such file."""
    try:
        # O_NONBLOCK: opening a FIFO must not hang; O_NOFOLLOW: a symlink is refused, not followed.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ChecksumError(f"{path}: {what} not found", missing_hint) from None
    except OSError as exc:
        if os.path.islink(path):
            raise ChecksumError(f"{path}: {what} is a symlink, not a regular file",
                                "copy the release files themselves, not links to them") from None
        raise ChecksumError(f"{path}: cannot open {what}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ChecksumError(f"{path}: {what} is not a regular file",
                                "copy the release files themselves, not links or devices")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ChecksumError(f"{path}: {what} is larger than {limit} bytes",
                            "it is not one this builder wrote; copy it again from the release")
    return data


def read_file(path: Path, missing_hint: str = "every release directory needs sha256sum-ARCH.txt; "
              "rebuild or re-copy the artifacts") -> tuple[bytes, list[Entry]]:
    """A checksum file's bytes (what its signature and a delta description pin) and its
    entries, strictly; ``missing_hint``: what to do when there is no such file."""
    data = read_regular(path, SIZE_LIMIT, "checksum file", missing_hint)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ChecksumError(f"{path}: not ASCII text at byte {exc.start}") from None
    return data, parse(text, str(path))


def parse_file(path: Path) -> list[Entry]:
    return read_file(path)[1]


def check(
    directory: Path,
    checksum_file: Path | None = None,
    *,
    arch: str | None = None,
    names: Iterable[str] | None = None,
    raise_on_failure: bool = True,
) -> CheckResult:
    """Check artifacts in ``directory`` like ``sha256sum -c`` does.

    Give ``checksum_file`` or ``arch`` (then ``directory/sha256sum-ARCH.txt``). With ``names``,
    only those artifacts are checked and each must have a line: a file that will be used but is
    not listed is an error, not a skip. Raises ChecksumError naming every failing file unless
    ``raise_on_failure`` is false.
    """
    if checksum_file is None:
        if arch is None:
            raise ValueError("give checksum_file or arch")
        checksum_file = directory / checksum_name(arch)
    entries = {e.name: e for e in parse_file(checksum_file)}
    wanted = sorted(entries) if names is None else sorted(set(names))
    result = CheckResult()
    unlisted = [n for n in wanted if n not in entries]
    if unlisted:
        raise ChecksumError(
            f"{checksum_file}: no line for {', '.join(unlisted)}",
            "an artifact without a checksum line cannot be verified; regenerate the checksum file",
        )
    for name in wanted:
        path = directory / name
        if not path.is_file():
            result.missing.append(name)
            continue
        actual = digest.hex_of(digest.of_file(path)[0])
        (result.ok if actual == entries[name].hex else result.mismatched).append(name)
    if raise_on_failure and not result.passed:
        problems = sorted([f"{n}: missing" for n in result.missing]
                          + [f"{n}: checksum mismatch" for n in result.mismatched])
        raise ChecksumError(
            f"{checksum_file}: {len(problems)} artifact(s) failed: " + "; ".join(problems),
            "copy the artifacts again; a file that does not match was changed or damaged",
        )
    return result
