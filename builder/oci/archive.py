"""Image archives: one uncompressed tar that is both an OCI layout and a docker-archive.

Member order (metadata first, so one image can be found without reading the whole archive)::

    oci-layout, index.json, manifest.json, repositories, blobs/, blobs/sha256/, blobs/sha256/<hex>...

``index.json`` keeps the registry manifests (containerd keeps registry digests only when it
imports the OCI layout); ``manifest.json``/``repositories`` point into the same ``blobs/`` for
docker-archive readers (podman, skopeo docker-archive:, the rke2 runtime-image lookup). Every blob
is stored once however many images share it, streamed from the store with its digest re-checked,
headers are normalised (0/0, no names; the metadata at the release epoch, every blob at
``BLOB_MTIME``), and the file appears under its final name only when complete (temp + fsync +
rename). The tar is written segment by segment (``head``, a segment per blob, ``tail``), which
builder/oci/framed.py compresses a frame each.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol

from builder import digest as dg
from builder.errors import BuilderError, DigestMismatch
from builder.oci import model as m
from builder.oci.compress import Output, atomic_output, open_maybe_compressed
from builder.oci.layer import TarSink
from builder.oci.layout import OCI_LAYOUT, ArchiveImage, Blob, LayoutPlan, blob_member, plan_layout
from builder.store import Store

__all__ = ["BLOB_MTIME", "HEAD", "TAIL", "ArchiveBlob", "ArchiveContents", "ArchiveFront", "ArchiveImage", "ArchiveReader",
           "ArchivedImage", "BlobProbe", "archive_size", "read_archive", "read_archive_index", "Segmented",
           "stream_archive", "write_archive"]

FILE_MODE = 0o644
DIR_MODE = 0o755
COPY_BUF = 1 << 20
METADATA_LIMIT = 4 << 20  # index.json / manifest.json bigger than this is not ours to trust
BLOB_MTIME = 0  # every blobs/sha256/<hex> member's mtime: its segment depends on the blob alone
HEAD, TAIL = "head", "tail"  # the labels of the first and last segments (the rest: blob digests)


@dataclass(frozen=True)
class ArchivedImage:
    name: str
    manifest_digest: str
    platform: m.Platform | None
    annotations: dict[str, str] = field(default_factory=dict, compare=False)  # index.json's


# -- writing --------------------------------------------------------------------------------------
def docker_manifest_json(plan: LayoutPlan) -> bytes:
    entries = [{
        "Config": blob_member(p.manifest.config.digest),
        "RepoTags": [str(p.ref)],
        "Layers": [blob_member(layer.digest) for layer in p.manifest.layers],
    } for p in plan.images]
    return json.dumps(entries, separators=(",", ":")).encode()


def repositories_json(plan: LayoutPlan) -> bytes:
    # Legacy docker field: repository → tag → top layer id. Our layers have no v1 ids, so the
    # top layer's blob hex (a real file in blobs/) stands in; readers only use it to list tags.
    repos: dict[str, dict[str, str]] = {}
    for p in plan.images:
        if p.manifest.layers:
            top = dg.hex_of(p.manifest.layers[-1].digest)
            repos.setdefault(p.ref.name, {})[p.ref.tag or ""] = top
    return m.canonical_json(repos)


class Segmented(Protocol):
    """Where an archive's tar goes segment by segment: ``head``, one per blob (labelled with its
    digest), ``tail`` (builder/oci/framed.py frames each on its own)."""

    def segment(self, label: str) -> None:
        """The bytes written from now on (until the next call) are segment ``label``."""

    def write(self, data: bytes, /) -> object: ...


class _Unsegmented:
    """A plain sink seen as Segmented: the segments run together (a plain ``.tar``)."""

    def __init__(self, sink: TarSink):
        self.write = sink.write

    def segment(self, label: str) -> None:
        pass


def _info(name: str, mtime: int, size: int = 0, is_dir: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = int(mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = DIR_MODE if is_dir else FILE_MODE
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.size = size
    return info


def _metadata(plan: LayoutPlan) -> list[tuple[str, bytes]]:
    return [("oci-layout", OCI_LAYOUT), ("index.json", plan.index_json()),
            ("manifest.json", docker_manifest_json(plan)),
            ("repositories", repositories_json(plan))]


def _checked_plan(store: Store, images: Sequence[ArchiveImage], where: str) -> LayoutPlan:
    plan = plan_layout(store, images)
    if not plan.images:
        raise BuilderError(f"archive: no images for {where}", "an image list must not be empty")
    return plan


def _header(info: tarfile.TarInfo) -> bytes:
    """The header tarfile writes for ``info`` (PAX format, as ``addfile`` in stream mode: a pax
    extended header only for what ustar cannot hold)."""
    return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


def _padding(size: int) -> bytes:
    """Zeros from ``size`` up to the next 512-byte block (tarfile pads member data so)."""
    return tarfile.NUL * (-size % tarfile.BLOCKSIZE)


def end_blocks(offset: int) -> bytes:
    """What tarfile's stream mode writes on close after ``offset`` bytes: two zero blocks, then
    zeros up to a whole record (RECORDSIZE, 10 KiB)."""
    return tarfile.NUL * (2 * tarfile.BLOCKSIZE + -(offset + 2 * tarfile.BLOCKSIZE) % tarfile.RECORDSIZE)


def _blob_info(blob: Blob) -> tarfile.TarInfo:
    # BLOB_MTIME, not the release epoch: a blob's segment (and so its compressed frame) is then
    # the same in every archive and release that ships it (builder/oci/framed.py).
    return _info(blob_member(blob.digest), BLOB_MTIME, blob.size)


def _head(plan: LayoutPlan, mtime: int) -> Iterator[bytes]:
    """The ``head`` segment: the metadata members and the two directories, in archive order."""
    for name, data in _metadata(plan):
        yield _header(_info(name, mtime, len(data)))
        yield data + _padding(len(data))
    yield _header(_info("blobs", mtime, is_dir=True))
    yield _header(_info("blobs/sha256", mtime, is_dir=True))


def archive_size(store: Store, images: Sequence[ArchiveImage], mtime: int, where: str = "archive") -> int:
    """The exact size of the tar ``write_archive`` writes for ``images`` (headers, blobs padded to
    512 bytes, the end-of-archive blocks, padding to tarfile's 10 KiB records), known before any
    byte is written: one pass over the blobs can show progress against it."""
    plan = _checked_plan(store, images, where)
    size = sum(len(part) for part in _head(plan, mtime))
    size += sum(len(_header(_blob_info(b))) + b.size + len(_padding(b.size)) for b in plan.blobs)
    return size + len(end_blocks(size))


def write_archive(store: Store, images: Sequence[ArchiveImage], out_path: Path, mtime: int) -> Output:
    """Write the archive of ``images`` to ``out_path``; returns its sha256 and size.

    Everything is checked before the first byte is written (platforms, blobs present, sizes).
    """
    plan = _checked_plan(store, images, str(out_path))
    with atomic_output(out_path) as out:
        _write_tar(store, plan, _Unsegmented(out), mtime, out_path.name)
    return Output(Path(out_path), out.digest, out.size)


def stream_archive(store: Store, images: Sequence[ArchiveImage], sink: Segmented, mtime: int,
                   where: str) -> None:
    """``write_archive`` into an open stream (the framed compressors, which count the bytes for
    progress) instead of a file: the same bytes, the same checks; ``sink`` is told where each
    segment starts. ``where`` names the archive in errors."""
    _write_tar(store, _checked_plan(store, images, where), sink, mtime, where)


def _write_tar(store: Store, plan: LayoutPlan, sink: Segmented, mtime: int, where: str) -> None:
    """The tar of a checked ``plan`` into ``sink`` (left open), segment by segment.

    Written by hand, not by tarfile's stream mode (which buffers, so a segment boundary would not
    be a write boundary): the same headers (``TarInfo.tobuf``), data, padding and end blocks, so
    the bytes are what ``tarfile.open(mode="w|")`` writes for these members.
    """
    offset = 0

    def put(data: bytes) -> None:
        nonlocal offset
        sink.write(data)
        offset += len(data)

    sink.segment(HEAD)
    for part in _head(plan, mtime):
        put(part)
    for blob in plan.blobs:
        sink.segment(blob.digest)
        put(_header(_blob_info(blob)))
        # Hashed on the way through: a store blob changed on disk raises StoreCorrupt.
        with store.open_verified(blob.digest, f"packing {where}") as reader:
            left = blob.size
            while left and (chunk := reader.read(min(COPY_BUF, left))):
                put(chunk)
                left -= len(chunk)
            reader.finish()  # a short or longer file does not hash to its digest
        put(_padding(blob.size))
    sink.segment(TAIL)
    put(end_blocks(offset))


# -- reading --------------------------------------------------------------------------------------
# What a reader keeps in memory is bounded whatever the archive holds: a hostile archive of a few
# KB can decompress to gigabytes of JSON, headers or members.
MANIFEST_LIMIT = m.MAX_DOCUMENT  # one manifest or config kept (the model refuses bigger ones)
JSON_BUDGET = 32 << 20  # all JSON one read keeps: index.json, manifest.json and every kept blob
HEADER_LIMIT = 1 << 20  # one pax / GNU long-name header (ours are a few hundred bytes)
MEMBER_LIMIT = 200_000  # members of one archive (ours: a few per image plus one per blob)
_BLOB = re.compile(r"blobs/sha256/(?P<hex>[0-9a-f]{64})")
# What an image name may hold: a reference's characters (fullmatch; no control characters).
_IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,254}")
_METADATA = frozenset({"oci-layout", "index.json", "manifest.json", "repositories"})
_DIRS = frozenset({".", "blobs", "blobs/sha256"})


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a pax or GNU long-name header's whole payload into memory before anything
    can look at it; refuse a large one first."""

    def _proc_member(self, tarfile_: tarfile.TarFile):
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                         tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE) and self.size > HEADER_LIMIT:
            raise tarfile.HeaderError(f"a {self.size}-byte extended header (limit {HEADER_LIMIT})")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


def open_tar_stream(stream: BinaryIO) -> tarfile.TarFile:
    """A forward-only tar reader over ``stream`` whose headers are bounded (see members())."""
    return tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo)


def members(tar: tarfile.TarFile, where: str, limit: int = MEMBER_LIMIT) -> Iterator[tarfile.TarInfo]:
    """The members of a stream-mode tar, one at a time, at most ``limit`` of them.

    tarfile appends every header it reads to ``tar.members``, even in stream mode where they can
    never be revisited; the list is emptied as we go so memory does not grow with the count.
    """
    count = 0
    while (info := tar.next()) is not None:
        count += 1
        if count > limit:
            raise BuilderError(f"{where}: more than {limit} archive members",
                               "it is not an archive this builder wrote; do not use it")
        # ``members`` is tarfile's own list, undocumented and so missing from typeshed; getmembers()
        # would read the whole stream to the end first.
        tar.members.clear()  # type: ignore[attr-defined]
        yield info


class _JsonBudget:
    """Bytes of JSON kept so far by one read, against ``JSON_BUDGET``."""

    def __init__(self, where: str, limit: int = JSON_BUDGET):
        self.where, self.limit, self.used = where, limit, 0

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise BuilderError(f"{self.where}: holds more than {self.limit >> 20} MiB of JSON "
                               "metadata (manifests and configs)",
                               "it is not an archive this builder wrote; do not use it")


def _safe_member(name: str, path: Path) -> str:
    clean = posixpath.normpath(name)
    if name.startswith("/") or clean == ".." or clean.startswith("../"):
        raise BuilderError(f"{path}: archive member {name!r:.200} leaves the archive root",
                           "the archive is corrupt or hostile; do not use it")
    return clean.removeprefix("./")


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except RecursionError:
        raise BuilderError(f"{what}: JSON nested too deeply",
                           "it is not a document this builder wrote; do not use it") from None
    except ValueError as exc:
        raise BuilderError(f"{what}: not valid JSON: {exc}") from None


def _read_all(fh: IO[bytes], limit: int, what: str) -> bytes:
    data = fh.read(limit + 1)
    if len(data) > limit:
        raise BuilderError(f"{what}: larger than {limit} bytes",
                           "it is not a document this builder wrote; do not use it")
    return data


@dataclass
class ArchiveContents:
    """What one read of an archive found: its images and its small JSON blobs (by digest)."""

    images: list[ArchivedImage]
    json: dict[str, bytes]  # manifests and configs up to MANIFEST_LIMIT, each hashed to its name


def read_archive_index(path: Path, verify: bool = False) -> list[ArchivedImage]:
    """The images named in an archive's ``index.json`` (plain, .gz or .zst, streamed).

    Without ``verify`` this stops as soon as the metadata at the front was read. With ``verify``
    it reads the whole archive once: every ``blobs/sha256/<hex>`` must hash to its name, and every
    manifest, config and layer that index.json or manifest.json refers to must be present (sizes
    matching the descriptors).
    """
    return read_archive(path, verify).images


def read_archive(path: Path, verify: bool = False,
                 stream: BinaryIO | None = None, probe: BlobProbe | None = None) -> ArchiveContents:
    """``read_archive_index`` plus the JSON blobs it kept (verify mode), in one pass.

    ``stream`` reads already-opened bytes instead of opening ``path`` (which then only names the
    archive in messages). ``probe`` (verify mode) is shown each blob as it is hashed (see
    ``BlobProbe``), so a check that looks inside layers costs no second read of the archive.
    """
    with ArchiveReader(path, stream, strict=verify) as reader:
        if verify:
            for blob in reader.blobs():
                if probe is not None:
                    probe(blob.member, reader.front.docker, blob.reader)  # type: ignore[arg-type]
            reader.check_complete()
        return ArchiveContents(reader.front.images, reader.json)


@dataclass(frozen=True)
class ArchiveFront:
    """The metadata at the front of an archive (oci-layout, index.json, manifest.json,
    repositories), read and shape-checked before any blob is streamed."""

    images: list[ArchivedImage]  # index.json's entries, names and descriptors checked
    docker: Any  # manifest.json as parsed (a list of objects), or None when the archive has none
    descriptors: list[m.Descriptor] = field(default_factory=list, repr=False)


@dataclass
class ArchiveBlob:
    """One blob as the reader streams it. ``reader`` hashes what it hands out; whatever the
    consumer leaves unread, the reader drains, and the blob must hash to ``digest`` before the
    next one is read (a mismatch raises DigestMismatch)."""

    digest: str
    size: int
    member: str  # the member's name exactly as the tar spells it
    reader: _BlobReader

    def open(self) -> _BlobReader:
        """The blob's bytes, once (a forward-only stream cannot give them twice)."""
        if self.reader.opened:
            raise BuilderError(f"{self.member}: an archive blob can be read once only",
                               "the archive is streamed; read it again to retry")
        self.reader.opened = True
        return self.reader


class ArchiveReader:
    """One forward pass over an image archive (plain, .gz or .zst), metadata first.

    Entering reads the front (``front``: index.json must come before any blob; manifest.json
    and the rest of the metadata with it) and checks its shape; ``blobs()`` then streams each
    ``blobs/sha256/<hex>`` in archive order, hashing it to its name and keeping the small JSON
    ones (manifests, configs, signature payloads: ``json``) within bounded memory
    (MANIFEST_LIMIT, JSON_BUDGET, HEADER_LIMIT, MEMBER_LIMIT) whatever the archive decompresses
    to; ``check_complete()`` afterwards checks every manifest's tree is present with its sizes.

    ``strict`` (what ``verify`` needs): only the members an image archive has, each once, files
    or directories. Every member name is refused when it leaves the archive root, in any mode.
    """

    def __init__(self, path: Path, stream: BinaryIO | None = None, *, strict: bool = False):
        self.path, self.strict, self._stream = Path(path), strict, stream
        self.json: dict[str, bytes] = {}  # digest → bytes of a kept JSON blob (hashed to it)
        self.sizes: dict[str, int] = {}  # digest → size of every blob read
        self._budget = _JsonBudget(str(self.path))
        self._seen: set[str] = set()
        self._pending: tarfile.TarInfo | None = None  # the first blob, read with the front
        self._stack = contextlib.ExitStack()
        self._tar: tarfile.TarFile | None = None
        self._members: Iterator[tarfile.TarInfo] | None = None
        self.front = ArchiveFront([], None)

    def __enter__(self) -> ArchiveReader:
        try:
            with self._errors():
                raw = self._stack.enter_context(open_maybe_compressed(
                    self._stream if self._stream is not None else self.path))
                self._tar = self._stack.enter_context(open_tar_stream(raw))
                self._members = members(self._tar, str(self.path))
                self.front = self._read_front()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Errors of the archive's bytes (never the consumer's) as a BuilderError naming it."""
        try:
            yield
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise BuilderError(f"{self.path}: not a readable image archive: {exc}",
                               "it may be truncated or corrupt; rebuild or re-download it") from None
        except Exception as exc:  # zstandard raises its own error type for corrupt frames
            if type(exc).__module__.startswith("zstandard"):
                raise BuilderError(f"{self.path}: corrupt zstd stream: {exc}") from None
            raise

    def _next(self) -> tuple[str, tarfile.TarInfo] | None:
        """The next member and its clean name (checked in strict mode)."""
        assert self._members is not None
        member = next(self._members, None)
        if member is None:
            return None
        name = _safe_member(member.name, self.path)
        if self.strict:
            _check_member(self.path, name, member, self._seen)
        return name, member

    def _read_front(self) -> ArchiveFront:
        index: Any = None
        docker: Any = None
        while (item := self._next()) is not None:
            name, member = item
            if not member.isfile():
                continue
            if name.startswith("blobs/sha256/"):
                self._pending = member
                break
            if name in ("index.json", "manifest.json"):
                assert self._tar is not None
                fh = self._tar.extractfile(member)
                assert fh is not None
                data = _read_all(fh, METADATA_LIMIT, f"{self.path}: {name}")
                self._budget.take(len(data))
                if name == "index.json":
                    index = m.load_json_object(data, f"{self.path}: {name}", limit=METADATA_LIMIT)
                else:  # a JSON array, which model's object loader refuses
                    docker = _json(data, f"{self.path}: {name}")
                if not self.strict and index is not None and docker is not None:
                    break  # all a metadata reader needs
        if index is None:
            raise BuilderError(f"{self.path}: has no index.json"
                               + (" before its blobs" if self._pending is not None else ""),
                               "it is not an OCI image archive this builder wrote (metadata "
                               "comes first)")
        entries = _index_images(self.path, index)
        return ArchiveFront([ArchivedImage(i.name, i.manifest_digest, i.platform,
                                           dict(i.descriptor.annotations)) for i in entries],
                            docker, [i.descriptor for i in entries])

    def blobs(self) -> Iterator[ArchiveBlob]:
        """Every blob after the front, in archive order (see the class docstring)."""
        assert self._tar is not None
        while True:
            with self._errors():
                if self._pending is not None:
                    member, self._pending = self._pending, None
                    name = _safe_member(member.name, self.path)
                else:
                    if (item := self._next()) is None:
                        return
                    name, member = item
                    if not member.isfile():
                        continue
                    if name in _METADATA and name not in ("oci-layout", "repositories"):
                        raise BuilderError(f"{self.path}: {name} after the blobs",
                                           "an image archive this builder wrote has its metadata "
                                           "first; rebuild it")
                    if not name.startswith("blobs/sha256/"):
                        continue
                match = _BLOB.fullmatch(name)
                if match is None:
                    raise BuilderError(f"{self.path}: unexpected blob member {name!r:.200}")
                fh = self._tar.extractfile(member)
                assert fh is not None
                blob = ArchiveBlob(dg.from_hex(match["hex"]), member.size, member.name,
                                   _BlobReader(fh, keep=member.size <= MANIFEST_LIMIT))
            yield blob
            with self._errors():
                self._finish(name, blob)

    def _finish(self, name: str, blob: ArchiveBlob) -> None:
        """Drain what the consumer left, check the digest, keep the blob if it is small JSON."""
        reader = blob.reader
        while reader.read(COPY_BUF):
            pass
        actual = "sha256:" + reader.hash.hexdigest()
        if actual != blob.digest:
            raise DigestMismatch(f"{self.path}: {name}", blob.digest, actual,
                                 "the archive is corrupt; rebuild or re-download it")
        self.sizes[blob.digest] = blob.size
        if reader.keep and reader.parts:
            head = b"".join(reader.parts)
            self._budget.take(len(head))
            self.json[blob.digest] = head

    def check_complete(self) -> None:
        """After ``blobs()`` ran out: every blob each index entry reaches is present with its
        descriptor's size, and manifest.json names only blobs that are present."""
        for desc in self.front.descriptors:
            _check_tree(self.path, desc, self.sizes, self.json)
        if self.front.docker is not None:
            _check_docker_manifest(self.path, self.front.docker, self.sizes)


def _check_member(path: Path | str, name: str, member: tarfile.TarInfo, seen: set[str]) -> None:
    """Verify mode: only the members an image archive has, each once, files or directories."""
    if name in seen:
        raise BuilderError(f"{path}: member {name!r:.200} appears twice",
                           "readers disagree on which copy counts; do not use the archive")
    seen.add(name)
    if name in _DIRS and member.isdir():
        return
    if member.isfile() and (name in _METADATA or _BLOB.fullmatch(name)):
        return
    raise BuilderError(f"{path}: unexpected member {name!r:.200}"
                       + ("" if member.isfile() or member.isdir() else " (not a regular file)"),
                       "an image archive holds oci-layout, index.json, manifest.json, "
                       "repositories and blobs/sha256/<hex> only")


# (the member's name exactly as the tar spells it, manifest.json as parsed so far or None, the
# blob's bytes): a probe reads as much of the blob as it wants and must not raise; the reader
# hashes and drains whatever it leaves, so the blob's digest is checked all the same.
BlobProbe = Callable[[str, Any, BinaryIO], None]


class _BlobReader:
    """A blob's bytes as read: hashed, and kept while they may be a small JSON document."""

    def __init__(self, fh: IO[bytes], keep: bool):
        self.fh, self.hash, self.keep, self.opened = fh, hashlib.sha256(), keep, False
        self.parts: list[bytes] = []

    def __enter__(self) -> _BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        pass  # the archive stays open: the reader drains and checks the blob

    def close(self) -> None:
        pass

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.hash.update(data)
        if self.keep and data:
            self.keep = bool(self.parts) or data.startswith(b"{")  # only JSON objects are kept
            if self.keep:
                self.parts.append(data)
        return data


@dataclass(frozen=True)
class _IndexEntry:
    name: str
    manifest_digest: str
    platform: m.Platform | None
    descriptor: m.Descriptor


def _index_images(path: Path, index: Any) -> list[_IndexEntry]:
    """index.json's entries, each with a well-formed descriptor and image name."""
    where = f"{path}: index.json"
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list):
        raise BuilderError(f"{where}: expected an object with a \"manifests\" list")
    out = []
    for number, raw in enumerate(manifests, 1):
        at = f"{where}: manifests[{number}]"
        try:
            desc = m.Descriptor.from_json(raw, at)
        except (TypeError, ValueError, AttributeError):
            raise BuilderError(f"{at}: not a descriptor object") from None
        name = desc.annotations.get(m.ANNOTATION_CONTAINERD_NAME) or \
            desc.annotations.get(m.ANNOTATION_REF_NAME, "")
        if not isinstance(name, str) or not _IMAGE_NAME.fullmatch(name):
            raise BuilderError(f"{at}: image name {name!r:.200} is not an image reference")
        out.append(_IndexEntry(name, desc.digest, desc.platform, desc))
    return out


def _check_docker_manifest(path: Path, docker: Any, sizes: dict[str, int]) -> None:
    """manifest.json: a list of objects whose Config and Layers name blobs that are present."""
    if not isinstance(docker, list) or not all(isinstance(e, dict) for e in docker):
        raise BuilderError(f"{path}: manifest.json: expected a list of objects")
    for entry in docker:
        layers = entry.get("Layers") or []
        if not isinstance(layers, list):
            raise BuilderError(f"{path}: manifest.json: Layers is not a list")
        for member in [entry.get("Config", ""), *layers]:
            match = _BLOB.fullmatch(member) if isinstance(member, str) else None
            if match is None or dg.from_hex(match["hex"]) not in sizes:
                raise BuilderError(f"{path}: manifest.json refers to missing member {member!r:.200}")


NESTING_LIMIT = 4  # index → index → manifest is the deepest a real image goes


def parse_document(raw: bytes, where: str) -> m.Manifest | m.Index:
    """``model.parse_document`` for bytes from an archive: any malformed shape is a BuilderError
    (the model itself refuses over-deep JSON)."""
    try:
        return m.parse_document(raw, where)
    except (TypeError, ValueError, AttributeError) as exc:
        raise BuilderError(f"{where}: malformed document ({type(exc).__name__})") from None


def _check_tree(path: Path, top: m.Descriptor, sizes: dict[str, int],
                kept: dict[str, bytes]) -> None:
    """Every blob reachable from an index entry is present with the size its descriptor says.

    Each manifest is parsed once however often it is referenced, and nesting is bounded, so a
    hostile index of indexes costs no more than the documents it holds.
    """
    def present(d: m.Descriptor) -> None:
        if sizes.get(d.digest) != d.size:
            got = sizes.get(d.digest)
            raise BuilderError(f"{path}: blob {d.digest} is "
                               + ("missing" if got is None else f"{got} bytes, expected {d.size}"))

    done: set[str] = set()
    todo = [(top, 0)]
    while todo:
        desc, depth = todo.pop()
        present(desc)
        if desc.digest in done:
            continue
        done.add(desc.digest)
        if depth >= NESTING_LIMIT:
            raise BuilderError(f"{path}: indexes nested more than {NESTING_LIMIT} deep")
        raw = kept.get(desc.digest)
        if raw is None:
            raise BuilderError(f"{path}: manifest {desc.digest} could not be read")
        doc = parse_document(raw, f"{path}: {desc.digest}")
        if isinstance(doc, m.Index):
            todo.extend((child, depth + 1) for child in doc.manifests)
            continue
        for d in (doc.config, *doc.layers):
            present(d)
