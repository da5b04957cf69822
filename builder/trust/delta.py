"""The delta description (``delta.linux-ARCH.txt``): model, strict parser, renderer; and which
release a directory holds (its checksum file, its version). ``verify DIR --base PREV`` is
builder.trust.delta_check.

A delta directory (``build --since PREV``, builder.assemble.delta) carries the new release's
checksum file and small files, and for each image archive FILE only the compressed frames the base
release (PREV, what the node installed) does not hold, in ``FILE``'s delta archive. The
description says how FILE is rebuilt, byte for byte, as a concatenation of pieces of the base's
FILE and of the delta archive; each piece is pinned by its sha256, the result by the new release's
signed checksum file. Nothing in the description is trusted: it only says where to look.

The format (one space between fields, ``\\n`` line ends, no comments or blank lines, at most
DESCRIPTION_LIMIT bytes, lines in this order)::

    airgap-builder-delta 1
    release NAME VERSION ARCH
    base BASE_VERSION BASE_SUMS_HEX
    sums SUMS_HEX
    archive FILE FULL_HEX FULL_SIZE BASE_HEX DELTA_FILE DELTA_HEX DELTA_SIZE COUNT
    piece SOURCE OFFSET LENGTH HEX LABEL        (COUNT of them after each archive line)

``parse`` is strict and bounded (install.sh parses the same lines as data, never as code): every
rule of the format is checked, and an error names the line, the field, what was expected and a
bounded repr of what was there.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from builder.artifacts import (
    ALL_GROUP,
    IMAGE_ARCHIVE_SUFFIXES,
    KNOWN_ARCHES,
    classify,
    delta_archive_name,
    images_base,
    statement_name,
)
from builder.errors import BuilderError
from builder.trust import checksums, provenance
from builder.trust.verify import (
    Rehash,
    open_regular,
    read_release_env,
)

MAGIC = "airgap-builder-delta 1"
DESCRIPTION_LIMIT = 4 << 20
PIECE_LIMIT = 200_000  # pieces of one archive: a frame per blob, a few hundred in practice
BASE = "base"
DELTA = "delta"
NO_BASE = "-"

# Applied with fullmatch (`$` would accept "x\n").
NAME = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,127}")
HEX = re.compile(r"[0-9a-f]{64}")
NUMBER = re.compile(r"0|[1-9][0-9]{0,15}")
LABEL = re.compile(r"head|tail|sha256:[0-9a-f]{64}")
GROUP = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")  # the lock's group names ($defs/name)
# What each field must look like, as an error message says it.
_EXPECT = {
    "NAME": ("a release name [a-z0-9][a-z0-9.-]{0,62}", NAME),
    "VERSION": ("a version [A-Za-z0-9][A-Za-z0-9.+_-]{0,127}", VERSION),
    "HEX": ("64 lowercase hex digits", HEX),
    "NUMBER": ("a number 0|[1-9][0-9]{0,15}", NUMBER),
    "LABEL": ("head, tail or sha256:<64 hex>", LABEL),
}


class DescriptionError(BuilderError):
    """A delta description breaks a rule of its format."""


HINT = ("take delta.linux-ARCH.txt from the delta directory `build --since` wrote; it is not "
        "edited by hand")


def bounded(text: str, limit: int = 80) -> str:
    """A repr of at most about ``limit`` characters (non-printable characters escaped)."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


@dataclass(frozen=True)
class Piece:
    """``length`` bytes at ``offset`` of the base's FILE or of the delta archive."""

    source: str  # BASE or DELTA
    offset: int
    length: int
    hex: str  # sha256 of those bytes
    label: str  # the frame: "head", "tail" or the blob's digest

    @property
    def end(self) -> int:
        return self.offset + self.length

    def line(self) -> str:
        return f"piece {self.source} {self.offset} {self.length} {self.hex} {self.label}\n"


@dataclass(frozen=True)
class ArchiveDelta:
    """How one image archive FILE of the new release is rebuilt."""

    file: str
    full_hex: str
    full_size: int
    base_hex: str | None  # the base's FILE, None when no base file is used (carried whole)
    delta_hex: str
    delta_size: int
    pieces: tuple[Piece, ...]
    lines: tuple[int, ...] = field(default=(), compare=False, repr=False)  # where parse read them

    @property
    def delta_file(self) -> str:
        return delta_archive_name(self.file)

    @property
    def carried(self) -> int:
        """Bytes of FILE the delta archive carries."""
        return sum(p.length for p in self.pieces if p.source == DELTA)

    def line(self) -> str:
        return (f"archive {self.file} {self.full_hex} {self.full_size} {self.base_hex or NO_BASE} "
                f"{self.delta_file} {self.delta_hex} {self.delta_size} {len(self.pieces)}\n")

    def piece_line(self, index: int) -> int:
        """The description line of piece ``index`` (0 when not parsed from a file)."""
        return self.lines[index] if index < len(self.lines) else 0

    def check_base_size(self, size: int, where: str) -> None:
        """Every ``base`` piece lies within the base file's ``size`` bytes."""
        for i, piece in enumerate(self.pieces):
            if piece.source == BASE and piece.end > size:
                raise DescriptionError(
                    f"{where} line {self.piece_line(i)}: base piece {piece.label} ends at byte "
                    f"{piece.end}, the base's {self.file} has {size} bytes", HINT)


@dataclass(frozen=True)
class Description:
    """One arch's delta: the new release, the base it requires, how each archive is rebuilt."""

    name: str
    version: str
    arch: str
    base_version: str
    base_sums: str  # sha256 hex of the base's sha256sum-ARCH.txt
    sums: str  # sha256 hex of the new sha256sum-ARCH.txt
    archives: tuple[ArchiveDelta, ...]

    def archive(self, file: str) -> ArchiveDelta | None:
        return next((a for a in self.archives if a.file == file), None)

    def render(self) -> bytes:
        """The file's bytes; a model that breaks a rule is refused (it is parsed back)."""
        lines = [f"{MAGIC}\n", f"release {self.name} {self.version} {self.arch}\n",
                 f"base {self.base_version} {self.base_sums}\n", f"sums {self.sums}\n"]
        for archive in self.archives:
            lines.append(archive.line())
            lines.extend(p.line() for p in archive.pieces)
        data = "".join(lines).encode("ascii", "backslashreplace")
        if parse(data, "the description to write") != self:
            raise DescriptionError("the description to write does not read back as written")
        return data


# -- parsing -------------------------------------------------------------------------------------

def _field(value: str, kind: str, what: str, where: str) -> str:
    expected, pattern = _EXPECT[kind]
    if not pattern.fullmatch(value):
        raise DescriptionError(f"{where}: {what}: expected {expected}, got {bounded(value)}", HINT)
    return value


def _fields(line: str, keyword: str, names: tuple[str, ...], where: str) -> list[str]:
    parts = line.split(" ")
    if parts[0] != keyword:
        raise DescriptionError(f"{where}: expected a line starting with `{keyword}`, got {bounded(line)}", HINT)
    if len(parts) != len(names) + 1:
        raise DescriptionError(
            f"{where}: expected `{keyword} {' '.join(names)}` ({len(names)} fields, one space "
            f"apart), got {len(parts) - 1} fields: {bounded(line)}", HINT)
    return parts[1:]


def _lines(data: bytes, where: str) -> list[str]:
    if len(data) > DESCRIPTION_LIMIT:
        raise DescriptionError(f"{where}: larger than {DESCRIPTION_LIMIT} bytes", HINT)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise DescriptionError(f"{where}: not ASCII text at byte {exc.start}", HINT) from None
    if not text.endswith("\n"):
        raise DescriptionError(f"{where}: empty, or the last line has no newline (truncated?)",
                               HINT)
    # Split on "\n" only: a "\r" or other control character stays inside a line, and fails it.
    return text[:-1].split("\n")


def _archive_file(file: str, name: str, arch: str, where: str) -> None:
    """FILE is an image archive of release ``name`` for ``arch``, as artifacts names them (a
    GROUP is a lock group's name, never the union list's)."""
    for suffix in IMAGE_ARCHIVE_SUFFIXES:
        stem = file.removesuffix(suffix)
        group = stem.removeprefix(f"{name}-images-").removesuffix(f".linux-{arch}")
        named = stem == images_base(name, arch) or (
            GROUP.fullmatch(group) is not None and group != ALL_GROUP
            and stem == images_base(name, arch, group))
        if stem != file and named and file in classify(arch, [file]).archives.get(stem, []):
            return
    raise DescriptionError(
        f"{where}: FILE: expected an image archive of {name} for {arch} "
        f"({name}-images[-GROUP].linux-{arch}.tar.zst or .tar.gz), got {bounded(file)}", HINT)


def _number(value: str, what: str, where: str) -> int:
    return int(_field(value, "NUMBER", what, where))


class _Reader:
    """The lines with their numbers, one at a time."""

    def __init__(self, lines: list[str], where: str):
        self.lines, self.where, self.at = lines, where, 0

    def next(self, expected: str) -> tuple[str, str]:
        """(the line, "WHERE line N") of the next line; an error if there is none."""
        if self.at >= len(self.lines):
            raise DescriptionError(f"{self.where}: ends after line {len(self.lines)}, expected "
                                   f"{expected}", HINT)
        self.at += 1
        line = self.lines[self.at - 1]
        here = f"{self.where} line {self.at}"
        if not line:
            raise DescriptionError(f"{here}: blank line, expected {expected}", HINT)
        return line, here

    def more(self) -> bool:
        return self.at < len(self.lines)


def _header(reader: _Reader) -> tuple[str, str, str, str, str, str]:
    line, here = reader.next(f"`{MAGIC}`")
    if line != MAGIC:
        raise DescriptionError(f"{here}: expected `{MAGIC}`, got {bounded(line)}", HINT)
    line, here = reader.next("`release NAME VERSION ARCH`")
    name, version, arch = _fields(line, "release", ("NAME", "VERSION", "ARCH"), here)
    _field(name, "NAME", "NAME", here)
    _field(version, "VERSION", "VERSION", here)
    if arch not in KNOWN_ARCHES:
        raise DescriptionError(f"{here}: ARCH: expected one of {', '.join(KNOWN_ARCHES)}, got "
                               f"{bounded(arch)}", HINT)
    line, here = reader.next("`base BASE_VERSION BASE_SUMS_HEX`")
    base_version, base_sums = _fields(line, "base", ("BASE_VERSION", "BASE_SUMS_HEX"), here)
    _field(base_version, "VERSION", "BASE_VERSION", here)
    _field(base_sums, "HEX", "BASE_SUMS_HEX", here)
    line, here = reader.next("`sums SUMS_HEX`")
    (sums,) = _fields(line, "sums", ("SUMS_HEX",), here)
    _field(sums, "HEX", "SUMS_HEX", here)
    return name, version, arch, base_version, base_sums, sums


_ARCHIVE_FIELDS = ("FILE", "FULL_HEX", "FULL_SIZE", "BASE_HEX", "DELTA_FILE", "DELTA_HEX",
                   "DELTA_SIZE", "COUNT")
_PIECE_FIELDS = ("SOURCE", "OFFSET", "LENGTH", "HEX", "LABEL")


def _piece(line: str, here: str) -> Piece:
    source, offset, length, hex_value, label = _fields(line, "piece", _PIECE_FIELDS, here)
    if source not in (BASE, DELTA):
        raise DescriptionError(f"{here}: SOURCE: expected base or delta, got {bounded(source)}",
                               HINT)
    piece = Piece(source, _number(offset, "OFFSET", here), _number(length, "LENGTH", here),
                  _field(hex_value, "HEX", "HEX", here), _field(label, "LABEL", "LABEL", here))
    if piece.length < 1:
        raise DescriptionError(f"{here}: LENGTH: expected at least 1, got 0", HINT)
    return piece


def _archive(reader: _Reader, name: str, arch: str) -> ArchiveDelta:
    line, here = reader.next("an `archive` line")
    file, full_hex, full_size, base_hex, delta_file, delta_hex, delta_size, count = _fields(
        line, "archive", _ARCHIVE_FIELDS, here)
    _archive_file(file, name, arch, here)
    if delta_file != delta_archive_name(file):
        raise DescriptionError(f"{here}: DELTA_FILE: expected {delta_archive_name(file)}, got "
                               f"{bounded(delta_file)}", HINT)
    if base_hex != NO_BASE:
        _field(base_hex, "HEX", "BASE_HEX (or -)", here)
    number = _number(count, "COUNT", here)
    if not 1 <= number <= PIECE_LIMIT:
        raise DescriptionError(f"{here}: COUNT: expected 1 to {PIECE_LIMIT} pieces, got {number}",
                               HINT)
    pieces: list[Piece] = []
    lines: list[int] = []
    for _ in range(number):
        text, where = reader.next(f"piece {len(pieces) + 1} of {number} of {file}")
        pieces.append(_piece(text, where))
        lines.append(reader.at)
    archive = ArchiveDelta(file, _field(full_hex, "HEX", "FULL_HEX", here),
                           _number(full_size, "FULL_SIZE", here),
                           None if base_hex == NO_BASE else base_hex,
                           _field(delta_hex, "HEX", "DELTA_HEX", here),
                           _number(delta_size, "DELTA_SIZE", here), tuple(pieces), tuple(lines))
    _check_tiling(archive, here, reader.where)
    return archive


def _check_tiling(archive: ArchiveDelta, here: str, where: str) -> None:
    """The delta pieces tile the delta archive; no base piece without a base; the lengths sum to
    FULL_SIZE."""
    at = 0
    for i, piece in enumerate(archive.pieces):
        line = f"{where} line {archive.piece_line(i)}"
        if piece.source == BASE and archive.base_hex is None:
            raise DescriptionError(f"{line}: a base piece, but the archive line says no base file "
                                   "is used (BASE_HEX -)", HINT)
        if piece.source == DELTA:
            if piece.offset != at:
                raise DescriptionError(
                    f"{line}: delta piece at OFFSET {piece.offset}, expected {at} (the delta "
                    f"pieces tile {archive.delta_file} in order, without gaps or overlaps)", HINT)
            at = piece.end
    if at != archive.delta_size:
        raise DescriptionError(f"{here}: DELTA_SIZE is {archive.delta_size}, the delta pieces "
                               f"end at {at}", HINT)
    total = sum(p.length for p in archive.pieces)
    if total != archive.full_size:
        raise DescriptionError(f"{here}: FULL_SIZE is {archive.full_size}, the pieces' lengths "
                               f"sum to {total}", HINT)


def parse(data: bytes, where: str) -> Description:
    """A description from its bytes, every rule of the format checked (see the module text)."""
    reader = _Reader(_lines(data, where), where)
    name, version, arch, base_version, base_sums, sums = _header(reader)
    archives: list[ArchiveDelta] = []
    seen: dict[str, int] = {}
    while reader.more() or not archives:
        first = reader.at + 1
        archive = _archive(reader, name, arch)
        if archive.file in seen:
            raise DescriptionError(f"{where} line {first}: {archive.file} already described on "
                                   f"line {seen[archive.file]}", HINT)
        seen[archive.file] = first
        archives.append(archive)
    return Description(name, version, arch, base_version, base_sums, sums, tuple(archives))


# -- which release a directory holds -------------------------------------------------------------

def _listed_file(directory: Path, name: str, hex_value: str, limit: int) -> bytes | None:
    """A small file a checksum file lists, if it is here and matches its line."""
    try:
        data = checksums.read_regular(directory / name, limit, name)
    except BuilderError:
        return None
    return data if hashlib.sha256(data).hexdigest() == hex_value else None


def release_version(directory: Path, arch: str, listed: dict[str, str]) -> str | None:
    """The release version of ``directory`` for ``arch`` (``listed``: its checksum file, name →
    hex): from its provenance statement, else its bundle's release.env, each only when it
    matches its line; None when neither is there."""
    name = statement_name(arch)
    if name in listed:
        raw = _listed_file(directory, name, listed[name], provenance.STATEMENT_LIMIT)
        if raw is not None:
            try:
                ext = provenance.build_definition(provenance.parse_statement(raw, name)).get(
                    "externalParameters") or {}
            except BuilderError:
                ext = {}
            release = ext.get("release") if isinstance(ext, dict) else None
            version = release.get("version") if isinstance(release, dict) else None
            if isinstance(version, str) and VERSION.fullmatch(version):
                return version
    bundle = classify(arch, listed).bundle
    if bundle is not None:
        try:
            with open_regular(directory / bundle) as fh:
                rehash = Rehash(fh)
                version = read_release_env(directory / bundle, stream=rehash)[1].get(  # type: ignore[arg-type]
                    "RELEASE_VERSION", "")
                if rehash.finish() == listed[bundle] and VERSION.fullmatch(version):
                    return version
        except Exception:  # a damaged gzip raises zlib's and gzip's own errors, not BuilderError
            pass
    return None


def read_sums(path: Path, what: str) -> tuple[bytes, dict[str, str]]:
    """A checksum file's bytes and its entries (name → hex), strictly."""
    data, entries = checksums.read_file(path, f"{what} needs its {path.name}")
    return data, {e.name: e.hex for e in entries}
