"""``verify DIR --base PREV``: a delta directory checked as the release it rebuilds into.

Each image archive of the delta directory is rebuilt on the fly (``PieceStream``: never written,
every piece hashed against the description) from PREV's file and the delta archive, and
``verify_release`` reads it like a full release's archive: the checksum file's sha256, every blob,
platforms, lists, the runtime lookup, provenance. The description's format is builder.trust.delta.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from builder import digest as dg
from builder.artifacts import (
    arch_of,
    classify,
    delta_description_name,
    is_delta_file,
)
from builder.errors import BuilderError
from builder.humanize import human
from builder.oci import model as m
from builder.oci.archive import ArchiveReader, parse_document
from builder.oci.compress import CHUNK
from builder.trust import checksums
from builder.trust.delta import (
    BASE,
    DELTA,
    DESCRIPTION_LIMIT,
    ArchiveDelta,
    Description,
    Piece,
    parse,
    read_sums,
    release_version,
)
from builder.trust.sign import PublicKey
from builder.trust.verify import (
    VerifyReport,
    open_regular,
    verify_release,
)


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
    read and must match its sha256; the whole is hashed by the reader verify wraps around every
    archive (``Rehash``), against the checksum file's sha256."""

    def __init__(self, archive: ArchiveDelta, files: dict[str, BinaryIO], where: str,
                 missing: Callable[[Piece], str]):
        self.archive, self.files, self.where, self.missing = archive, files, where, missing
        self.starts: list[int] = []
        at = 0
        for piece in archive.pieces:
            self.starts.append(at)
            at += piece.length
        self.pos = self.hashed = 0
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
            self.piece_hash.update(memoryview(data)[self.hashed - self.pos:])
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
    """(sha256 hex, size) of ``path``, read as a regular file."""
    with open_regular(path) as fh:
        digest, size = dg.of_stream(fh)
    return dg.hex_of(digest), size


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
            ok = self._hashes(base_path, str(base_path), archive.base_hex, None,
                              "not the base file the delta was made against (changed since it "
                              "was installed?)", report) and ok
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
        ok = self._hashes(delta_path, archive.delta_file, archive.delta_hex, archive.delta_size,
                          "a changed or damaged delta archive", report) and ok
        if not ok:
            self._name_missing(rebuilt, archive, delta_path, base_path, report)
        return ok

    @staticmethod
    def _hashes(path: Path, key: str, hex_value: str, size: int | None, otherwise: str,
                report: VerifyReport) -> bool:
        """``path`` hashes to ``hex_value`` (and has ``size`` bytes, when given); else reported
        under ``key``, ``otherwise`` saying what that means."""
        try:
            actual, actual_size = _hash_regular(path)
        except BuilderError as exc:
            report.add(key, exc.message)
            return False
        if actual == hex_value and size in (None, actual_size):
            return True
        report.add(key, f"sha256 {actual} ({actual_size} bytes), the description says {hex_value}"
                        + (f" ({size} bytes)" if size is not None else "") + f": {otherwise}")
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
    report = verify_release(directory, arches, public_key, require_signature, trust, lock,
                            rebuild=BaseCheck(base))
    report.hint = ("do not install from this delta: each problem says what to do (give --base the "
                   "release it updates, or copy the named files again)")
    return report
