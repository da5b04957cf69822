"""The delta description (``delta.linux-ARCH.txt``) and the check behind ``verify DIR --base PREV``.

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

import bisect
import contextlib
import hashlib
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from builder.artifacts import (
    ALL_GROUP,
    IMAGE_ARCHIVE_SUFFIXES,
    KNOWN_ARCHES,
    arch_of,
    classify,
    delta_archive_name,
    delta_description_name,
    images_base,
    is_delta_file,
    statement_name,
)
from builder.errors import BuilderError
from builder.humanize import human
from builder.oci import model as m
from builder.oci.archive import ArchiveReader, parse_document
from builder.oci.compress import CHUNK
from builder.trust import checksums, provenance
from builder.trust.sign import PublicKey
from builder.trust.verify import (
    Rehash,
    VerifyReport,
    open_regular,
    read_release_env,
    verify_release,
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
    """FILE is an image archive of release ``name`` for ``arch``, as artifacts names them."""
    for suffix in IMAGE_ARCHIVE_SUFFIXES:
        stem = file.removesuffix(suffix)
        if stem == file:
            continue
        if stem == images_base(name, arch):
            group = None
        else:
            prefix, tail = f"{name}-images-", f".linux-{arch}"
            group = stem.removeprefix(prefix).removesuffix(tail)
            if not (stem.startswith(prefix) and stem.endswith(tail) and GROUP.fullmatch(group)
                    and group != ALL_GROUP and stem == images_base(name, arch, group)):
                break
        if file in classify(arch, [file]).archives.get(stem, []):
            return
    raise DescriptionError(
        f"{where}: FILE: expected an image archive of {name} for {arch} "
        f"({images_base(name, arch)}.tar.zst, or {name}-images-GROUP.linux-{arch} .tar.zst or "
        f".tar.gz), got {bounded(file)}", HINT)


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


def pieces_of(archive: ArchiveDelta, source: str) -> Iterator[tuple[int, Piece]]:
    """(index, piece) of ``archive``'s pieces from ``source``."""
    return ((i, p) for i, p in enumerate(archive.pieces) if p.source == source)


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
        except BuilderError:
            pass
    return None


def read_sums(path: Path, what: str) -> tuple[bytes, dict[str, str]]:
    """A checksum file's bytes and its entries (name → hex), strictly."""
    data = checksums.read_regular(path, checksums.SIZE_LIMIT, "checksum file",
                                  f"{what} needs its {path.name}")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise checksums.ChecksumError(f"{path}: not ASCII text at byte {exc.start}") from None
    return data, {e.name: e.hex for e in checksums.parse(text, str(path))}


# -- verify DIR --base PREV ---------------------------------------------------------------------

def layer_owners(path: Path, stream: BinaryIO) -> dict[str, list[str]]:
    """Layer digest → the names of the images of the (delta) archive whose manifests list it.
    The delta archive carries every manifest, so it says whose layer a missing blob is."""
    owners: dict[str, list[str]] = {}
    with ArchiveReader(path, stream) as reader:
        for _ in reader.blobs():
            pass
        images, blobs = reader.front.images, reader.json
    for image in images:
        todo, seen = [image.manifest_digest], set()
        while todo:
            digest = todo.pop()
            if digest in seen or digest not in blobs:
                continue
            seen.add(digest)
            try:
                doc = parse_document(blobs[digest], digest)
            except BuilderError:
                continue
            if isinstance(doc, m.Index):
                todo.extend(x.digest for x in doc.manifests)
                continue
            for layer in doc.layers:
                owners.setdefault(layer.digest, [])
                if image.name not in owners[layer.digest]:
                    owners[layer.digest].append(image.name)
    return owners


class PieceStream:
    """The bytes of one archive rebuilt from its pieces, read forward (a rewind to bytes already
    read is allowed: the magic peek), never written anywhere. Each piece is hashed once as it is
    read and must match its sha256; at the end the whole must be FULL_HEX (the checksum file's)."""

    def __init__(self, archive: ArchiveDelta, files: dict[str, BinaryIO], where: str,
                 missing: Callable[[Piece], str]):
        self.archive, self.files, self.where, self.missing = archive, files, where, missing
        self.starts: list[int] = []
        at = 0
        for piece in archive.pieces:
            self.starts.append(at)
            at += piece.length
        self.pos = self.hashed = 0
        self.total = hashlib.sha256()
        self.piece_hash = hashlib.sha256()

    def _piece_at(self, pos: int) -> int:
        return bisect.bisect_right(self.starts, pos) - 1

    def read(self, n: int = -1) -> bytes:
        if self.pos >= self.archive.full_size:
            return b""
        i = self._piece_at(self.pos)
        piece, start = self.archive.pieces[i], self.starts[i]
        left = start + piece.length - self.pos
        take = min(left, CHUNK if n is None or n < 0 else n)
        if take <= 0:
            return b""
        fh = self.files[piece.source]
        data = os.pread(fh.fileno(), take, piece.offset + self.pos - start)
        if len(data) != take:
            raise BuilderError(f"{self.where}: {piece.source} file ends inside piece "
                               f"{piece.label} (line {self.archive.piece_line(i)})")
        end = self.pos + take
        if end > self.hashed:
            fresh = memoryview(data)[self.hashed - self.pos:]
            self.piece_hash.update(fresh)
            self.total.update(fresh)
            self.hashed = end
            if end == start + piece.length:
                self._piece_done(i, piece)
        self.pos = end
        return data

    def _piece_done(self, i: int, piece: Piece) -> None:
        actual, self.piece_hash = self.piece_hash.hexdigest(), hashlib.sha256()
        if actual != piece.hex:
            raise BuilderError(self.missing(piece) + f" (line {self.archive.piece_line(i)}: "
                               f"the {piece.source} bytes there hash to {actual})")
        if self.hashed == self.archive.full_size and self.total.hexdigest() != self.archive.full_hex:
            raise BuilderError(f"{self.where}: the pieces rebuild it with sha256 "
                               f"{self.total.hexdigest()}, its checksum file lists "
                               f"{self.archive.full_hex}")

    def readinto(self, buf: bytearray | memoryview) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or offset > self.hashed or offset < 0:
            raise BuilderError(f"{self.where}: a reader skipped bytes of the rebuilt archive")
        self.pos = offset
        return offset

    def tell(self) -> int:
        return self.pos


NAMED_LIMIT = 10  # blobs named per archive; the rest counted


@dataclass
class _Rebuilt:
    """One arch of a delta directory: what ``verify`` reads as rebuilt archives."""

    directory: Path
    base: Path
    description: Description | None  # None: it could not be read (reported)
    files: frozenset[str] = frozenset()
    ready: frozenset[str] = frozenset()
    extra: frozenset[str] = frozenset()

    @contextlib.contextmanager
    def open(self, path: Path) -> Iterator[BinaryIO]:
        archive = self.description.archive(path.name) if self.description else None
        assert archive is not None and path.name in self.ready
        with contextlib.ExitStack() as stack:
            files = {DELTA: stack.enter_context(open_regular(self.directory / archive.delta_file))}
            if archive.base_hex is not None:
                files[BASE] = stack.enter_context(open_regular(self.base / archive.file))
            yield PieceStream(archive, files, archive.file,  # type: ignore[misc]
                              lambda piece: self.missing(archive, piece, None))

    def missing(self, archive: ArchiveDelta, piece: Piece,
                owners: dict[str, list[str]] | None) -> str:
        """The sentence for a piece whose bytes are in neither file."""
        if owners is None:
            owners = _owners(self.directory / archive.delta_file)
        if piece.label in owners:
            what = f"a layer of {', '.join(owners[piece.label])}"
        elif piece.label.startswith("sha256:"):
            what = f"a blob of {archive.file}"
        else:
            what = f"the archive's {piece.label}"
        name = f"blob {piece.label}" if piece.label.startswith("sha256:") else piece.label
        return (f"{name} ({what}) is in neither the delta nor {self.base / archive.file}: "
                f"{archive.file} cannot be rebuilt")


def _owners(path: Path) -> dict[str, list[str]]:
    try:
        with open_regular(path) as fh:
            return layer_owners(path, fh)
    except Exception:  # a damaged delta archive: blobs are named without their images
        return {}


def _blobs_in(path: Path) -> set[str]:
    """The digests of the blobs ``path`` holds that hash to their names, as far as it reads (a
    damaged archive gives those before the damage; a missing file nothing)."""
    found: set[str] = set()
    pending: str | None = None  # the reader checks a blob's digest when asked for the next
    try:
        with open_regular(path) as fh, ArchiveReader(path, fh) as reader:
            for blob in reader.blobs():
                if pending is not None:
                    found.add(pending)
                pending = blob.digest
        if pending is not None:
            found.add(pending)
    except Exception:  # unreadable from here on: what read before stands
        pass
    return found


def _hash_regular(path: Path) -> tuple[str, int]:
    with open_regular(path) as fh:
        digest, size = hashlib.sha256(), 0
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class BaseCheck:
    """``verify DIR --base PREV``: the hook ``verify_release`` calls per arch (``Rebuild``).

    It checks the description (strict), that it describes DIR's checksum file, that PREV is the
    release it updates (PREV's checksum file hashes to ``base``), and per archive that PREV's
    file and the delta archive are the ones described; verify then reads each archive rebuilt
    from its pieces (PieceStream) as it reads an archive file, every check included."""

    def __init__(self, base: Path):
        self.base = Path(base)

    def __call__(self, directory: Path, arch: str, sums: bytes,
                 report: VerifyReport) -> _Rebuilt | None:
        name = delta_description_name(arch)
        sums_name = checksums.checksum_name(arch)
        try:
            listed = {e.name: e.hex for e in checksums.parse(sums.decode("ascii"), sums_name)}
        except (UnicodeDecodeError, BuilderError):
            return None  # the checksum step reports it; nothing can be rebuilt against it
        # Until the description says otherwise: no listed archive is looked for here, none can
        # be rebuilt, and every delta file of this arch belongs to the delta.
        archives = frozenset(f for files in classify(arch, listed).archives.values() for f in files)
        rebuilt = _Rebuilt(directory, self.base, None, files=archives, extra=frozenset(
            n for n in os.listdir(directory) if is_delta_file(n) and arch_of(n) == arch))
        desc = self._description(directory, name, report)
        if desc is None:
            return rebuilt
        rebuilt.description = desc
        rebuilt.extra = frozenset({name, *(a.delta_file for a in desc.archives)})
        if desc.arch != arch:
            report.add(name, f"describes a delta for {desc.arch}, not {arch}")
            return rebuilt
        actual = hashlib.sha256(sums).hexdigest()
        if actual != desc.sums:
            report.add(name, f"describes the release whose {sums_name} has sha256 {desc.sums}; "
                             f"{sums_name} here has {actual} (the description belongs to another "
                             "delta: copy the delta directory again)")
            return rebuilt
        self._release(directory, desc, listed, name, report)
        base_listed = self._right_base(desc, sums_name, name, report)
        if base_listed is None:
            return rebuilt
        for file in sorted(archives - {a.file for a in desc.archives}):
            report.add(file, f"listed in {sums_name}, but neither here nor described in {name}")
        ready = []
        for archive in desc.archives:
            if archive.file not in listed:
                report.add(name, f"describes {archive.file}, which {sums_name} does not list")
            elif archive.full_hex != listed[archive.file]:
                report.add(name, f"{archive.file}: FULL_HEX is {archive.full_hex}, {sums_name} "
                                 f"lists {listed[archive.file]}")
            elif self._files_ok(rebuilt, archive, base_listed, report):
                ready.append(archive.file)
        rebuilt.ready = frozenset(ready)
        carried = sum(a.delta_size for a in desc.archives)
        full = sum(a.full_size for a in desc.archives)
        report.note(f"{arch}: {len(ready)} of {len(desc.archives)} image archives rebuilt from "
                    f"{self.base} ({desc.base_version}) and the delta, which carries "
                    f"{human(carried)} of their {human(full)}")
        return rebuilt

    def _description(self, directory: Path, name: str, report: VerifyReport) -> Description | None:
        path = directory / name
        if not os.path.lexists(path):
            report.add(name, f"missing: {directory} is not a delta directory for this arch "
                             "(verify a full release without --base)")
            return None
        try:
            return parse(checksums.read_regular(path, DESCRIPTION_LIMIT, "delta description"), name)
        except BuilderError as exc:
            report.add(name, exc.message.removeprefix(f"{path}: ").removeprefix(f"{name}: ")
                       .removeprefix(f"{name} "))
            return None

    def _release(self, directory: Path, desc: Description, listed: dict[str, str], name: str,
                 report: VerifyReport) -> None:
        """The `release` line is the release of DIR's bundle and provenance."""
        bundle_release = classify(desc.arch, listed).release
        if bundle_release is not None and bundle_release != desc.name:
            report.add(name, f"says release {desc.name}, the bundle is {bundle_release}'s")
        version = release_version(directory, desc.arch, listed)
        if version is not None and version != desc.version:
            report.add(name, f"says version {desc.version}, the release here is {version}")

    def _right_base(self, desc: Description, sums_name: str, name: str,
                    report: VerifyReport) -> dict[str, str] | None:
        """What PREV's checksum file lists, when it is the one the delta updates; else None,
        after an error naming both."""
        where = self.base / sums_name
        try:
            data, listed = read_sums(where, "--base")
        except BuilderError as exc:
            report.add(str(where), exc.message.removeprefix(f"{where}: "))
            return None
        actual = hashlib.sha256(data).hexdigest()
        if actual == desc.base_sums:
            return listed
        held = release_version(self.base, desc.arch, listed) or "an unknown release"
        report.add(name, f"wrong base: this delta updates {desc.base_version} ({sums_name} "
                         f"sha256 {desc.base_sums}); {self.base} holds {held} ({sums_name} sha256 "
                         f"{actual}): give --base the directory of {desc.base_version}, or use "
                         f"the full release of {desc.version}")
        return None

    def _files_ok(self, rebuilt: _Rebuilt, archive: ArchiveDelta, base_listed: dict[str, str],
                  report: VerifyReport) -> bool:
        """The base's FILE and the delta archive are the ones described; else why not, with
        every blob that is in neither named."""
        ok = True
        delta_path = rebuilt.directory / archive.delta_file
        base_path = self.base / archive.file
        if archive.base_hex is not None:
            uses = sum(1 for p in archive.pieces if p.source == BASE)
            if base_listed.get(archive.file) != archive.base_hex:
                report.add(str(base_path), f"the delta needs the {archive.file} with sha256 "
                                           f"{archive.base_hex}, the base's checksum file lists "
                                           f"{base_listed.get(archive.file, 'no such file')}")
                ok = False
            if not os.path.lexists(base_path):
                report.add(str(base_path), f"missing: the delta takes {uses} pieces of "
                                           f"{archive.file} from the base release")
                return False
            ok = self._hashes(base_path, archive.base_hex, None, "the base", report) and ok
            if ok:
                try:
                    archive.check_base_size(base_path.stat().st_size, archive.file)
                except BuilderError as exc:
                    report.add(str(base_path), exc.message)
                    ok = False
        if not os.path.lexists(delta_path):
            report.add(archive.delta_file, f"missing: it carries {archive.carried} bytes of "
                                           f"{archive.file}")
            return False
        ok = self._hashes(delta_path, archive.delta_hex, archive.delta_size, "the delta",
                          report) and ok
        if not ok:
            self._name_missing(rebuilt, archive, delta_path, base_path, report)
        return ok

    @staticmethod
    def _hashes(path: Path, hex_value: str, size: int | None, what: str,
                report: VerifyReport) -> bool:
        try:
            actual, actual_size = _hash_regular(path)
        except BuilderError as exc:
            report.add(path.name if what == "the delta" else str(path), exc.message)
            return False
        if actual == hex_value and size in (None, actual_size):
            return True
        report.add(path.name if what == "the delta" else str(path),
                   f"sha256 {actual} ({actual_size} bytes), the description says {hex_value}"
                   + (f" ({size} bytes)" if size is not None else "")
                   + (": a changed or damaged delta archive" if what == "the delta" else
                      ": not the base file the delta was made against (changed since it was "
                      "installed?)"))
        return False

    def _name_missing(self, rebuilt: _Rebuilt, archive: ArchiveDelta, delta_path: Path,
                      base_path: Path, report: VerifyReport) -> None:
        """Every blob piece whose blob is in neither file (read as archives: a blob there
        hashes to its name)."""
        have = _blobs_in(delta_path) | _blobs_in(base_path)
        gone = [p for p in archive.pieces if p.label.startswith("sha256:") and p.label not in have]
        owners = _owners(delta_path)
        for piece in gone[:NAMED_LIMIT]:
            report.add(archive.file, rebuilt.missing(archive, piece, owners))
        if len(gone) > NAMED_LIMIT:
            report.add(archive.file, f"and {len(gone) - NAMED_LIMIT} more pieces are in neither "
                                     "the delta nor the base")


def verify_delta(directory: Path, base: Path, arches: Iterable[str] | None = None,
                 public_key: Path | PublicKey | None = None, require_signature: bool = False,
                 trust: dict[str, str] | None = None, lock: Path | None = None) -> VerifyReport:
    """``verify DIR --base PREV``: DIR checked as the release it rebuilds into (every check of
    ``verify_release``), its archives rebuilt from PREV and the delta archives on the fly."""
    if not Path(base).is_dir():
        raise BuilderError(f"--base {base}: not a directory",
                           "give the directory of the release the delta updates")
    return verify_release(directory, arches, public_key, require_signature, trust, lock,
                          rebuild=BaseCheck(base))
