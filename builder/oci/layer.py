"""Deterministic image layers: a normalised tar, gzipped, streamed into the content store.

The same entries and the same ``mtime`` (SOURCE_DATE_EPOCH) always give the same bytes: entries
are sorted, parent directories are added, owners are 0/0 with empty names, every timestamp is the
epoch (a file's on-disk mtime comes from a checkout or an extraction and differs between
machines), integer mtimes keep tarfile from writing fractional PAX times, and gzip gets mtime 0,
no file name and a fixed level. Nothing holds a whole layer in memory: tar → gzip → a hashing
writer into a temp file in the store; the uncompressed bytes are hashed on the way (diff_id).
"""

from __future__ import annotations

import io
import os
import posixpath
import secrets
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Protocol

from builder.errors import BuilderError
from builder.oci.compress import HashingWriter, gzip_writer
from builder.oci.model import OCI_LAYER_GZIP
from builder.store import BlobReader, Store

DIR_MODE = 0o755
SYMLINK_MODE = 0o777
_COPY_BUF = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, e.g. "bin/busybox"; no leading "/"
    source: Path | bytes | None = None  # file content; None for a directory or a symlink
    mode: int = 0o755
    linkname: str | None = None  # a symlink when set
    is_dir: bool = False
    # A store blob as the source: its bytes are re-hashed while packed and must be this digest;
    # ``origin`` (e.g. the lock entry) names it in the error.
    digest: str | None = None
    origin: str = ""


@dataclass(frozen=True)
class Layer:
    digest: str  # sha256 of the gzip blob (what a manifest names)
    diff_id: str  # sha256 of the uncompressed tar (what the config's rootfs names)
    size: int  # gzip blob size
    media_type: str


def normalise_path(path: str) -> str:
    """A clean relative member path; refuses anything that could escape the image root."""
    if not path or "\x00" in path:
        raise BuilderError(f"layer: bad member path {path!r}")
    clean = posixpath.normpath(path.lstrip("/"))
    if clean.startswith("./"):
        clean = clean[2:]
    if clean in ("", ".") or clean == ".." or clean.startswith("../"):
        raise BuilderError(f"layer: member path {path!r} is empty or leaves the image root",
                           "use a path relative to the image root, e.g. bin/tool")
    return clean


def plan_entries(entries: Iterable[FileEntry]) -> list[FileEntry]:
    """Normalise, add missing parent directories and sort, so order and gaps never matter."""
    by_path: dict[str, FileEntry] = {}
    for entry in entries:
        path = normalise_path(entry.path)
        is_dir = entry.is_dir or (entry.source is None and entry.linkname is None)
        entry = replace(entry, path=path, is_dir=is_dir)
        previous = by_path.get(path)
        if previous is not None and previous != entry:
            # Refused rather than "last wins", so the order of entries can never change the bytes.
            raise BuilderError(f"layer: {path} is given twice with different content or mode",
                               "each path may appear once in a layer")
        by_path[path] = entry
    for path in list(by_path):
        parent = posixpath.dirname(path)
        while parent and parent not in by_path:
            by_path[parent] = FileEntry(parent, None, DIR_MODE, None, True)
            parent = posixpath.dirname(parent)
        if parent and not by_path[parent].is_dir:
            raise BuilderError(f"layer: {parent} is a file but {path} needs it to be a directory")
    return [by_path[p] for p in sorted(by_path)]


def _tarinfo(entry: FileEntry, mtime: int) -> tuple[tarfile.TarInfo, BinaryIO | BlobReader | None]:
    info = tarfile.TarInfo(entry.path)
    info.mtime = int(mtime)  # an int: a float would make tarfile emit a PAX mtime record
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.linkname is not None:
        info.type = tarfile.SYMTYPE
        info.linkname = entry.linkname
        info.mode = SYMLINK_MODE
        return info, None
    info.mode = entry.mode & 0o7777
    if entry.is_dir:
        info.type = tarfile.DIRTYPE
        return info, None
    info.type = tarfile.REGTYPE
    if isinstance(entry.source, bytes):
        info.size = len(entry.source)
        return info, io.BytesIO(entry.source)
    assert isinstance(entry.source, Path | str)
    src = Path(entry.source)
    try:
        fh = open(src, "rb")
    except OSError as exc:
        raise BuilderError(f"layer: cannot read {src} for {entry.path}: {exc.strerror}") from None
    info.size = os.fstat(fh.fileno()).st_size
    if entry.digest is not None:
        return info, BlobReader(fh, entry.digest, f"{entry.origin or entry.path} ({entry.path})")
    return info, fh


class TarSink(Protocol):
    """Where a streamed tar goes: a file, a gzip stream, a HashingWriter (write() is all it needs)."""

    def write(self, data: bytes, /) -> object: ...


def write_tar(out: TarSink, entries: Iterable[FileEntry], mtime: int) -> None:
    """Write the normalised, uncompressed tar of ``entries`` to ``out`` (a stream)."""
    # PAX only kicks in for what USTAR cannot hold (long or non-ASCII names); no xattrs ever.
    # (The ignore: a stream mode ("w|") only calls write(); typeshed's fileobj type asks for the
    # whole file API, read, seek and tell included, that a gzip or hashing sink lacks.)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,  # type: ignore[call-overload]
                      bufsize=_COPY_BUF, encoding="utf-8") as tar:
        for entry in plan_entries(entries):
            info, fh = _tarinfo(entry, mtime)
            try:
                if fh is not None:
                    tar.addfile(info, fh)
                    if fh.read(1):
                        raise BuilderError(f"layer: {entry.source!s} grew while being packed")  # a file: bytes cannot grow
                    if isinstance(fh, BlobReader):
                        fh.finish()  # what went into the tar is the blob that was verified
                else:
                    tar.addfile(info)
            finally:
                if fh is not None:
                    fh.close()


def write_layer(store: Store, entries: Iterable[FileEntry], mtime: int) -> Layer:
    """Pack ``entries`` into a gzip layer in the store and return its digests."""
    tmp = store.root / "tmp" / f"{os.getpid()}-{secrets.token_hex(8)}"
    try:
        with open(tmp, "wb") as raw:
            blob = HashingWriter(raw)
            with gzip_writer(blob) as gz:  # fixed level, mtime 0, no file name
                tar_hash = HashingWriter(gz)
                write_tar(tar_hash, entries, mtime)
        digest = blob.digest
        store.adopt(tmp, digest)  # hashed while written: no second read or copy
        return Layer(digest=digest, diff_id=tar_hash.digest, size=blob.size,
                     media_type=OCI_LAYER_GZIP)
    finally:
        tmp.unlink(missing_ok=True)
