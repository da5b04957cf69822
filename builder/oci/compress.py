"""Deterministic, streaming compression of artifacts (zstd and gzip) to files written atomically.

zstd: fixed level 3, long-distance matching with a window of at
most 2**25 (the rke2/k3s decoder refuses anything above 32 MiB), a checksum, and ``threads >= 1``:
zstandard's multi-threaded output does not depend on the number of workers, while ``threads=0``
(single-threaded mode) gives different bytes. So any machine produces the same file.
gzip: mtime 0, no file name, fixed level (pigz's default, 6). Artifacts (``gzip_file``,
``pgzip_writer``) are gzipped in parallel by builder.oci.pgzip, whose bytes depend on the input, the
level and the block size only (``GZIP_SCHEME``, what a recipe records); layers and charts keep the
single-stream ``gzip_writer``, since their bytes are digests others pin. Image archives are
compressed a frame per tar segment on these same parameters (builder/oci/framed.py).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from builder.errors import BuilderError
from builder.oci import pgzip
from builder.store import atomic_file

CHUNK = 1 << 20
# Upstream runs `zstd -16` over `docker save` tars of *uncompressed* layers. Our archives keep the
# registry's gzip layers (so containerd keeps the registry digests), and on those level 16 saved
# 0.03% over level 3 at 1/30 of the speed (41.85 MB fixture archive: 9.7 s vs 0.3 s).
ZSTD_LEVEL = 3
ZSTD_WINDOW_LOG = 25
ZSTD_MAX_WINDOW = 1 << 25  # what the rke2/k3s importer accepts when decoding
GZIP_LEVEL = 6
GZIP_SCHEME = ("pgzip", GZIP_LEVEL, pgzip.BLOCK_SIZE)  # the parallel gzip's bytes: a recipe records it
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Output:
    """A file written here, with the sha256 and size of its bytes (hashed while writing)."""

    path: Path
    digest: str
    size: int


def default_threads() -> int:
    # Any value >= 1 gives the same bytes; never 0 (that selects a different, single-threaded mode).
    return max(1, min(os.cpu_count() or 1, 8))


class HashingWriter:
    """A write-only stream that hashes and counts what passes through to ``sink`` (if any)."""

    def __init__(self, sink=None):
        self.sink = sink
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.hash.update(data)
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        self.size += n
        if self.sink is not None:
            self.sink.write(data)
        return n

    def flush(self) -> None:
        if self.sink is not None:
            self.sink.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


@contextlib.contextmanager
def atomic_output(dest: Path) -> Iterator[HashingWriter]:
    """``store.atomic_file`` seen through a HashingWriter: the caller learns the digest and
    size of exactly the bytes that landed under ``dest``."""
    with atomic_file(dest) as fh:
        yield HashingWriter(fh)


def zstd_params(level: int = ZSTD_LEVEL, threads: int | None = None,
                window_log: int = ZSTD_WINDOW_LOG) -> zstandard.ZstdCompressionParameters:
    threads = default_threads() if threads is None else threads
    if threads < 1:
        raise BuilderError(f"zstd: threads must be >= 1, got {threads}",
                           "threads=0 selects a mode whose output differs from every other count")
    if not 10 <= window_log <= 25:
        raise BuilderError(f"zstd: window log {window_log} is outside 10..25",
                           "the rke2/k3s decoder accepts at most a 32 MiB (2**25) window")
    return zstandard.ZstdCompressionParameters.from_level(
        level, window_log=window_log, enable_ldm=True, threads=threads,
        write_checksum=True, write_content_size=False, write_dict_id=False)


@contextlib.contextmanager
def zstd_writer(sink, level: int = ZSTD_LEVEL, threads: int | None = None,
                window_log: int = ZSTD_WINDOW_LOG) -> Iterator[BinaryIO]:
    """A writable stream that zstd-compresses into ``sink`` (left open)."""
    cctx = zstandard.ZstdCompressor(compression_params=zstd_params(level, threads, window_log))
    with cctx.stream_writer(sink, closefd=False) as writer:
        yield writer


def gzip_writer(sink, level: int = GZIP_LEVEL) -> gzip.GzipFile:
    """A deterministic gzip stream over ``sink``: mtime 0, no file name, fixed level."""
    return gzip.GzipFile(filename="", mode="wb", compresslevel=level, fileobj=sink, mtime=0)


def pgzip_writer(sink, level: int = GZIP_LEVEL, threads: int | None = None) -> pgzip.ParallelGzipWriter:
    """A parallel gzip stream over ``sink`` (left open): header as ``gzip_writer``'s, and the
    same bytes for every thread count (``GZIP_SCHEME``)."""
    return pgzip.ParallelGzipWriter(sink, default_threads() if threads is None else threads, level)


OnBytes = Callable[[int], None]  # told how many more bytes were processed (progress)


def _copy(src: BinaryIO, dst, on_bytes: OnBytes | None = None) -> None:
    while chunk := src.read(CHUNK):
        dst.write(chunk)
        if on_bytes:
            on_bytes(len(chunk))


def zstd_file(src: Path, dest: Path, level: int = ZSTD_LEVEL, threads: int | None = None,
              window_log: int = ZSTD_WINDOW_LOG, on_bytes: OnBytes | None = None) -> Output:
    """Compress ``src`` to ``dest`` (atomically); the result is the same on every machine."""
    with open(src, "rb") as fin, atomic_output(dest) as out:
        with zstd_writer(out, level, threads, window_log) as z:
            _copy(fin, z, on_bytes)
    return Output(Path(dest), out.digest, out.size)


def gzip_file(src: Path, dest: Path, level: int = GZIP_LEVEL, on_bytes: OnBytes | None = None,
              threads: int | None = None) -> Output:
    """Compress ``src`` to ``dest`` (atomically) with the parallel gzip: the same bytes on every
    machine, whatever its thread count."""
    with open(src, "rb") as fin, atomic_output(dest) as out:
        with pgzip_writer(out, level, threads) as gz:
            _copy(fin, gz, on_bytes)
    return Output(Path(dest), out.digest, out.size)


@contextlib.contextmanager
def open_maybe_compressed(path: Path | BinaryIO) -> Iterator[BinaryIO]:
    """Read a file that may be plain, gzip or zstd (detected by magic, not by name).

    zstd is decoded with the same 32 MiB window cap as the rke2/k3s importer, so an archive that
    reads here also reads there; every frame of a zstd file and every member of a gzip file is
    read (image archives are framed: builder/oci/framed.py). ``path`` may be an open, seekable binary file (left open).
    """
    opened: contextlib.AbstractContextManager[BinaryIO] = (
        open(path, "rb") if isinstance(path, (str, os.PathLike)) else contextlib.nullcontext(path))
    with opened as fh:
        magic = fh.read(4)
        fh.seek(0)
        if magic.startswith(ZSTD_MAGIC):
            dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
            with dctx.stream_reader(fh, read_size=CHUNK, closefd=False, read_across_frames=True) as reader:
                yield reader
        elif magic.startswith(GZIP_MAGIC):  # GzipFile reads every member
            with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
                yield gz  # type: ignore[misc]
        else:
            yield fh


def decompress_file(src: Path, dest: Path) -> Output:
    """Decompress a gzip or zstd file (or copy a plain one) to ``dest`` atomically."""
    with open_maybe_compressed(src) as fin, atomic_output(dest) as out:
        try:
            _copy(fin, out)
        except (zstandard.ZstdError, OSError, EOFError) as exc:
            raise BuilderError(f"decompress: {src} is corrupt or truncated: {exc}") from None
    return Output(Path(dest), out.digest, out.size)
