"""Framed image archives: one compressed frame per tar segment (issue 15, delta releases).

An image archive's tar (builder/oci/archive.py) is cut into segments: ``head`` (the metadata
members and the two directories), one segment per blob (its header, bytes and padding; the
member's mtime is ``BLOB_MTIME``) and ``tail`` (the end-of-archive blocks and record padding).
The ``.tar.zst`` is one zstd frame per segment (``compress.zstd_params``, a new frame each
time), the ``.tar.gz`` one gzip member per segment (the pgzip scheme, restarted per member). A
blob's frame bytes thus depend on the blob alone: any archive that ships it, in any release
built with the same compressors, holds the same bytes, and a delta can point into the archive a
node already has instead of carrying them.

Both are standard: concatenated zstd frames and concatenated gzip members decode as one stream
(RFC 8878 section 3.1: a zstd stream is "one or more frames"; RFC 1952 section 2.2: "a gzip file
consists of a series of members"). What rke2 v1.32.13+rke2r1 runs on a node reads them so
(sources checked: rancher/rke2 at that tag, whose go.mod pins k3s-io/k3s
v1.32.13-0.20260227164709-bf43a24f5447 (release-v1.32; read at a containerd/v2-era revision of
the same files), rancher/wharfie v0.6.9 and klauspost/compress v1.18.4):

- import: rke2 pkg/executor/staticpod/staticpod.go ``Containerd`` calls k3s's
  ``containerd.Run``; k3s pkg/agent/containerd/containerd.go ``preloadFile`` (also called from
  watcher.go) opens each agent/images file with wharfie ``tarfile.GetOpener(filePath)`` and hands
  the reader to ``client.Import``; the runtime-image lookup (rke2 pkg/bootstrap/bootstrap.go)
  calls wharfie ``tarfile.FindImage``, which opens files with the same ``GetOpener``.
- wharfie pkg/tarfile/tarfile.go ``GetOpener``: ``.tar.gz`` -> Go's ``compress/gzip``
  ``gzip.NewReader`` (multistream by default: src/compress/gzip/gunzip.go ``Reader.Read`` reads
  the next member's header at each member's end, until EOF); ``.tar.zst`` -> klauspost
  ``zstd.NewReader(file, zstd.WithDecoderMaxMemory(MaxDecoderMemory))``, ``1 << 25``.
- klauspost/compress zstd/decoder.go: ``startStreamDecoder`` loops ``decodeStream: for {
  frame.reset(&br) ... }`` over frame after frame, and the single-threaded ``nextBlock`` starts a
  new ``frame.reset`` once a frame's last block is read (``syncStream.inFrame = !Last``), until
  EOF: concatenated frames are one stream. The 2**25 cap applies to each frame's window, which
  ``compress.zstd_params`` keeps at 2**25 per frame as before.

Every reader of ours decodes across frames too (``compress.open_maybe_compressed`` with
``read_across_frames=True``, gzip.GzipFile reads every member, fetch/docker_api's reader).

The build writes both files' frame indexes while compressing (``zstd_and_gzip``) and keeps them
in the store keyed by each file's sha256 (``remember``/``recall``), so a later ``build --since
PREV`` knows the frames of an archive PREV holds only the checksum of. ``scan_frames`` reads a
file's frames back (bounded memory), refusing anything that is not one segment per frame.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

import zstandard

from builder import digest as dg
from builder.errors import BuilderError, DigestMismatch
from builder.oci import pgzip
from builder.oci.archive import (
    _BLOB,
    _DIRS,
    _METADATA,
    BLOB_MTIME,
    HEAD,
    MEMBER_LIMIT,
    TAIL,
    Segmented,
    _check_member,
    _safe_member,
    end_blocks,
    members,
    open_tar_stream,
)
from builder.oci.compress import (
    CHUNK,
    GZIP_LEVEL,
    GZIP_MAGIC,
    ZSTD_MAGIC,
    ZSTD_MAX_WINDOW,
    HashingWriter,
    OnBytes,
    Output,
    atomic_output,
    default_threads,
    zstd_params,
)
from builder.store import Store

__all__ = ["BLOB_MTIME", "FRAMES_NAMESPACE", "HEAD", "TAIL", "Frame", "FrameIndex", "FramedOutput",
           "Segmented", "frames_of", "recall", "remember", "scan_and_remember", "scan_frames",
           "zstd_and_gzip"]

FRAMES_NAMESPACE = "frames"  # store.index_put namespace of the memos: file sha256 -> index blob
MAX_FRAMES = MEMBER_LIMIT + 2  # a blob per member, plus head and tail
INDEX_LIMIT = 64 << 20  # an index's JSON: ~120 bytes a frame at MAX_FRAMES is ~24 MiB
_LABEL = re.compile(r"head|tail|sha256:[0-9a-f]{64}")
_NUMBER_LIMIT = 1 << 62
_UNFRAMED_HINT = ("an archive built before delta support (one stream, not one frame per member) "
                  "cannot be pointed into: rebuild it with this builder, or carry it whole")


@dataclass(frozen=True)
class Frame:
    label: str  # "head", "tail", or the blob's digest "sha256:<hex>"
    offset: int  # where the frame starts in the compressed file
    length: int  # its compressed bytes
    sha256: str  # "sha256:<hex>" of those compressed bytes

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class FrameIndex:
    frames: tuple[Frame, ...]  # in file order, tiling the file from 0 to size

    @property
    def size(self) -> int:
        return self.frames[-1].end if self.frames else 0

    def by_label(self) -> dict[str, Frame]:
        return {f.label: f for f in self.frames}

    def to_json(self) -> bytes:
        """Canonical JSON (the same index gives the same bytes: a memo blob is shared)."""
        rows = [[f.label, f.offset, f.length, f.sha256] for f in self.frames]
        return json.dumps({"frames": rows, "v": 1}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> FrameIndex:
        """Parse ``to_json``'s form strictly: at most INDEX_LIMIT bytes and MAX_FRAMES frames;
        ``head`` first, ``tail`` last, blob labels in between each once; offsets tiling from 0,
        lengths >= 1; every sha256 ``sha256:<64 hex>``. Anything else: BuilderError naming
        ``where`` and the frame."""
        if len(data) > INDEX_LIMIT:
            raise _bad_index(where, f"{len(data)} bytes (limit {INDEX_LIMIT})")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise _bad_index(where, f"not JSON ({exc.__class__.__name__})") from None
        if not isinstance(doc, dict) or set(doc) != {"frames", "v"} or doc["v"] != 1 \
                or not isinstance(doc["frames"], list):
            raise _bad_index(where, 'expected {"frames": [...], "v": 1}')
        rows = doc["frames"]
        if not 2 <= len(rows) <= MAX_FRAMES:
            raise _bad_index(where, f"{len(rows)} frames (expected 2..{MAX_FRAMES})")
        frames: list[Frame] = []
        seen: set[str] = set()
        for number, row in enumerate(rows):
            frame = _frame_row(row, f"{where}: frame {number}")
            want = HEAD if number == 0 else TAIL if number == len(rows) - 1 else "sha256:<hex>"
            if frame.label in seen:
                raise _bad_index(f"{where}: frame {number}", f"label {frame.label} repeated")
            if not frame.label.startswith(want.removesuffix("<hex>")):
                raise _bad_index(f"{where}: frame {number}", f"label {frame.label}, expected {want}")
            expected = frames[-1].end if frames else 0
            if frame.offset != expected:
                raise _bad_index(f"{where}: frame {number}", f"offset {frame.offset}, expected {expected}")
            seen.add(frame.label)
            frames.append(frame)
        return cls(tuple(frames))


def _frame_row(row: object, where: str) -> Frame:
    if not (isinstance(row, list) and len(row) == 4):
        raise _bad_index(where, "expected [label, offset, length, sha256]")
    label, offset, length, sha = row
    if not (isinstance(label, str) and _LABEL.fullmatch(label)):
        raise _bad_index(where, f"label {label!r:.80} (expected head, tail or sha256:<64 hex>)")
    for name, value, low in (("offset", offset, 0), ("length", length, 1)):
        if type(value) is not int or not low <= value < _NUMBER_LIMIT:
            raise _bad_index(where, f"{name} {value!r:.40} (expected an integer >= {low})")
    if not dg.is_digest(sha):
        raise _bad_index(where, f"sha256 {sha!r:.80} (expected sha256:<64 hex>)")
    return Frame(label, offset, length, sha)


def _bad_index(where: str, what: str) -> BuilderError:
    return BuilderError(f"{where}: not a frame index: {what}",
                        "it was not written by this builder; drop it (a build writes it again)")


@dataclass(frozen=True)
class FramedOutput:
    """A compressed archive written here and the index of its frames (known while writing)."""

    output: Output
    index: FrameIndex


# -- writing --------------------------------------------------------------------------------------
class _Recorder:
    """The compressed file's sink: where each frame starts (``mark``) and the sha256 of its bytes."""

    def __init__(self, sink: HashingWriter):
        self.sink = sink
        self.frames: list[Frame] = []
        self._label: str | None = None
        self._start = 0
        self._frame = HashingWriter(sink)  # the current frame's bytes, on their way to the file

    def write(self, data: bytes) -> int:
        if self._label is None:
            raise ValueError("compressed bytes before the first segment")
        return self._frame.write(data)

    def flush(self) -> None:
        self.sink.flush()

    def mark(self, label: str) -> None:
        """A frame ``label`` starts at the current position (the one before it, if any, ends)."""
        self._close()
        self._label, self._start, self._frame = label, self.sink.size, HashingWriter(self.sink)

    def _close(self) -> None:
        if self._label is not None:
            self.frames.append(Frame(self._label, self._start, self._frame.size, self._frame.digest))

    def finish(self) -> FrameIndex:
        self._close()
        self._label = None
        return FrameIndex(tuple(self.frames))


class _ZstdFrames:
    """A zstd frame per segment, on one compressor (its worker threads are reused)."""

    def __init__(self, recorder: _Recorder, threads: int):
        self.recorder = recorder
        self.cctx = zstandard.ZstdCompressor(compression_params=zstd_params(threads=threads))
        self.writer: zstandard.ZstdCompressionWriter | None = None

    def segment(self, label: str) -> None:
        self.close()
        self.recorder.mark(label)
        # A new writer starts a new frame with fresh state: the frame depends on the segment only.
        # (The ignore: zstandard only calls write() and flush(), all a recorder has.)
        self.writer = self.cctx.stream_writer(self.recorder, closefd=False)  # type: ignore[arg-type]

    def write(self, data: bytes) -> int:
        if self.writer is None:
            raise ValueError("archive bytes before the first segment")
        return self.writer.write(data)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()  # ends the frame (closefd=False: the file stays open)
            self.writer = None


class _Tee:
    """Segments and bytes to both compressors; ``on_bytes`` counts the input (progress)."""

    def __init__(self, zst: _ZstdFrames, gz: pgzip.ParallelGzipWriter, on_bytes: OnBytes | None):
        self.zst, self.gz, self.on_bytes = zst, gz, on_bytes

    def segment(self, label: str) -> None:
        self.zst.segment(label)
        self.gz.member(label)

    def write(self, data: bytes) -> int:
        self.zst.write(data)
        self.gz.write(data)
        if self.on_bytes:
            self.on_bytes(len(data))
        return len(data)


def zstd_and_gzip(produce: Callable[[Segmented], object], zst: Path, gz: Path,
                  threads: int | None = None, on_bytes: OnBytes | None = None
                  ) -> tuple[FramedOutput, FramedOutput]:
    """Stream what ``produce(sink)`` writes, segment by segment, into ``zst`` (a zstd frame per
    segment) and ``gz`` (a gzip member per segment) at once, both atomic; returns both files and
    their frame indexes, known without reading either back. The same bytes for every
    ``threads`` (zstd: any count >= 1; the gzip scheme: by construction). ``on_bytes`` counts
    the input. If ``produce`` raises, neither file appears."""
    threads = default_threads() if threads is None else threads
    with atomic_output(zst) as zout, atomic_output(gz) as gout:
        zrec, grec = _Recorder(zout), _Recorder(gout)
        zframes = _ZstdFrames(zrec, threads)
        with pgzip.ParallelGzipWriter(grec, threads, GZIP_LEVEL, on_member=grec.mark) as gmembers:  # type: ignore[arg-type]
            produce(_Tee(zframes, gmembers, on_bytes))
            zframes.close()
        zindex, gindex = zrec.finish(), grec.finish()
    return (FramedOutput(Output(Path(zst), zout.digest, zout.size), zindex),
            FramedOutput(Output(Path(gz), gout.digest, gout.size), gindex))


# -- reading --------------------------------------------------------------------------------------
class _Window:
    """``length`` bytes of ``fh`` from where it stands (one zstd frame), hashed as they are read."""

    def __init__(self, fh: IO[bytes], length: int):
        self.fh, self.left, self.seen = fh, length, HashingWriter()

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.fh.read(n) if n else b""
        self.left -= len(data)
        self.seen.write(data)
        return data


# (offset, decompressed stream, compressed bytes seen) of each frame, in file order.
_Frames = Generator[tuple[int, BinaryIO, HashingWriter], None, None]


def _zstd_frame_length(fh: IO[bytes], offset: int, size: int, path: Path) -> int:
    """The compressed length of the zstd frame at ``offset``, from its header and block headers
    (RFC 8878 section 3.1.1); a skippable frame, anything else or a frame running past the end of
    the file is refused naming the offset."""
    fh.seek(offset)
    header = fh.read(18)  # the longest frame header: magic 4, descriptor 1, window 1, dict 4, size 8
    if header[:4] != ZSTD_MAGIC:
        magic = int.from_bytes(header[:4].ljust(4, b"\0"), "little")
        if len(header) >= 4 and 0x184D2A50 <= magic <= 0x184D2A5F:
            raise BuilderError(f"{path}: a skippable zstd frame at offset {offset}",
                               "an archive this builder wrote has none; do not use it")
        raise BuilderError(f"{path}: {size - offset} bytes after the last zstd frame (offset {offset}) "
                           "are not a zstd frame", "the file is corrupt; rebuild or re-download it")
    if len(header) < 6:
        raise _truncated(path, offset)
    fhd = header[4]
    single, checksum, dict_flag, fcs_flag = fhd >> 5 & 1, fhd >> 2 & 1, fhd & 3, fhd >> 6
    if fhd & 0x08:
        raise BuilderError(f"{path}: the zstd frame at offset {offset} has the reserved bit set",
                           "the file is corrupt; rebuild or re-download it")
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag] + ((1 if single else 0), 2, 4, 8)[fcs_flag]
    while True:
        fh.seek(offset + pos)
        raw = fh.read(3)
        if len(raw) < 3:
            raise _truncated(path, offset)
        block = int.from_bytes(raw, "little")
        kind = block >> 1 & 3
        if kind == 3:
            raise BuilderError(f"{path}: the zstd frame at offset {offset} has a reserved block type",
                               "the file is corrupt; rebuild or re-download it")
        pos += 3 + (1 if kind == 1 else block >> 3)  # an RLE block holds its one byte
        if block & 1:
            break
    pos += 4 * checksum
    if offset + pos > size:
        raise _truncated(path, offset)
    return pos


def _truncated(path: Path, offset: int) -> BuilderError:
    return BuilderError(f"{path}: truncated: the frame at offset {offset} runs past the end of the file",
                        "rebuild or re-download it")


def _zstd_frames(fh: IO[bytes], size: int, path: Path) -> _Frames:
    """(offset, decompressed stream, compressed bytes seen) of each zstd frame, in order; the
    stream must be read to its end before the next frame is asked for."""
    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    offset = 0
    while offset < size:
        length = _zstd_frame_length(fh, offset, size, path)
        fh.seek(offset)
        window = _Window(fh, length)
        # (The ignore: zstandard only calls read() on its source, all a window has.)
        with dctx.stream_reader(window, read_size=CHUNK, closefd=False,  # type: ignore[arg-type]
                                read_across_frames=False) as reader:
            yield offset, reader, window.seen
        if window.left:  # the decoder stopped before the end the headers gave: not one frame
            raise BuilderError(f"{path}: the zstd frame at offset {offset} ends before its "
                               "headers say", "the file is corrupt; rebuild or re-download it")
        offset += length


class _GzipMember:
    """The decompressed bytes of the gzip member at the reader's position, pulled as asked.
    ``carry`` is what the previous member's reader read past its end."""

    def __init__(self, fh: IO[bytes], offset: int, carry: bytes, path: Path):
        self.fh, self.offset, self.path = fh, offset, path
        self.carry, self.seen = carry, HashingWriter()
        self.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing, CRC and size checked

    def read(self, n: int = -1) -> bytes:
        n = CHUNK if n < 0 else n
        while n and not self.inflate.eof:
            fed = self.inflate.unconsumed_tail or self.carry or self.fh.read(CHUNK)
            self.carry = b""
            if not fed:
                raise _truncated(self.path, self.offset)
            try:
                out = self.inflate.decompress(fed, n)
            except zlib.error as exc:
                raise BuilderError(f"{self.path}: the gzip member at offset {self.offset} is "
                                   f"corrupt: {exc}", "rebuild or re-download it") from None
            # At the member's end zlib leaves the rest in unused_data (and, when the output
            # limit was hit on the way, in unconsumed_tail too: not to be counted twice).
            rest = len(self.inflate.unused_data if self.inflate.eof else self.inflate.unconsumed_tail)
            self.seen.write(memoryview(fed)[:len(fed) - rest])
            if self.inflate.eof:
                self.carry = self.inflate.unused_data
            if out:
                return out
        return b""


def _gzip_members(fh: IO[bytes], size: int, path: Path) -> _Frames:
    """As ``_zstd_frames``, for the members of a gzip file."""
    offset, carry = 0, b""
    while offset < size:
        if len(carry) < 2:
            carry += fh.read(2 - len(carry))
        if carry[:2] != GZIP_MAGIC:
            raise BuilderError(f"{path}: {size - offset} bytes after the last gzip member "
                               f"(offset {offset}) are not a gzip member",
                               "the file is corrupt; rebuild or re-download it")
        member = _GzipMember(fh, offset, carry, path)
        yield offset, member, member.seen  # type: ignore[misc]
        while member.read(CHUNK):  # the checker read the tar; the trailer may be left
            pass
        carry = member.carry
        offset += member.seen.size


class _Segments:
    """Checks each frame's decompressed bytes are one segment of the archive's tar."""

    def __init__(self, path: Path):
        self.path = path
        self.tar_offset = 0  # uncompressed bytes of the frames before
        self.count = 0
        self.ended = False
        self.seen: set[str] = set()  # member names so far (each once: a label is a blob's)

    def label(self, offset: int, stream: BinaryIO) -> str:
        """The segment the frame at ``offset`` holds (``stream``: its decompressed bytes)."""
        where = f"{self.path}: the frame at offset {offset}"
        self.count += 1
        if self.count > MAX_FRAMES:
            raise BuilderError(f"{self.path}: more than {MAX_FRAMES} frames",
                               "it is not an archive this builder wrote; do not use it")
        if self.ended:
            raise BuilderError(f"{where} comes after the end of the archive (the tail)",
                               "the file is corrupt; rebuild or re-download it")
        counted = _Counted(stream)
        first = counted.read_exactly(tarfile.BLOCKSIZE)
        if first.count(0) == len(first) == tarfile.BLOCKSIZE:
            label = self._tail(where, counted)
        else:
            try:
                label = self._members(where, _Prefixed(first, counted), offset)
            except (tarfile.TarError, EOFError) as exc:
                raise BuilderError(f"{self.path} is not a framed archive (built before delta "
                                   f"support, or damaged): the frame at offset {offset} does not "
                                   f"hold whole tar members ({exc})", _UNFRAMED_HINT) from None
        self.tar_offset += counted.total
        return label

    def _tail(self, where: str, counted: _Counted) -> str:
        if self.count == 1:
            raise BuilderError(f"{where}: the archive starts with its end (an empty tar)",
                               "it is not an archive this builder wrote; do not use it")
        expected = len(end_blocks(self.tar_offset))
        zeros = True
        while zeros and counted.total <= expected and (chunk := counted.read(CHUNK)):
            zeros = chunk.count(0) == len(chunk)
        if not zeros or counted.total != expected:
            raise BuilderError(f"{where}: the end of the archive is not {expected} zero bytes "
                               "(two blocks and the record padding)",
                               "the file is corrupt; rebuild or re-download it")
        self.ended = True
        return TAIL

    def _members(self, where: str, stream: _Prefixed, offset: int) -> str:
        tar = open_tar_stream(stream)  # type: ignore[arg-type]
        names: list[str] = []
        label = HEAD
        for info in members(tar, where, limit=len(_METADATA) + len(_DIRS)):
            name = _safe_member(info.name, self.path)
            blob = _BLOB.fullmatch(name)
            if self.count == 1 and blob:
                raise BuilderError(f"{self.path} is not a framed archive (built before delta "
                                   f"support): its first frame holds {name} as well as the metadata",
                                   _UNFRAMED_HINT)
            if self.count > 1 and (names or not blob or not info.isfile()):
                what = f"{names[0]} and {name}" if names else f"{name!r:.100}, not a blob"
                raise BuilderError(f"{self.path} is not a framed archive: the frame at offset "
                                   f"{offset} holds {what}", _UNFRAMED_HINT)
            _check_member(where, name, info, self.seen)  # verify's member rules, across frames
            if blob:
                label = dg.from_hex(blob["hex"])
                self._check_blob(where, tar, info, label)
            names.append(name)
        if not names:
            raise BuilderError(f"{where}: holds no tar member", "the file is corrupt; rebuild it")
        # tarfile stops at the frame's end or at a zero block: either way nothing may follow the
        # last member in this frame (the end blocks are a frame of their own).
        end = tar.offset
        if stream.total > end or stream.read(1):
            raise BuilderError(f"{self.path} is not a framed archive: the frame at offset {offset} "
                               "holds more than whole members (the end of the archive too?)",
                               _UNFRAMED_HINT)
        return label

    def _check_blob(self, where: str, tar: tarfile.TarFile, info: tarfile.TarInfo, label: str) -> None:
        fh = tar.extractfile(info)
        assert fh is not None
        actual, _ = dg.of_stream(fh)
        if actual != label:
            raise DigestMismatch(f"{where} ({info.name})", label, actual,
                                 "the archive is corrupt; rebuild or re-download it")


class _Counted:
    """A frame's decompressed stream, counting what was read."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.total = stream, 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.total += len(data)
        return data

    def read_exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n and (data := self.read(n - len(out))):
            out += data
        return out


class _Prefixed:
    """``first`` (already read), then the rest of ``rest``: what tarfile reads."""

    def __init__(self, first: bytes, rest: _Counted):
        self.first, self.rest = first, rest

    @property
    def total(self) -> int:
        return self.rest.total

    def read(self, n: int = -1) -> bytes:
        if self.first:
            data, self.first = (self.first, b"") if n < 0 or n >= len(self.first) else \
                (self.first[:n], self.first[n:])
            return data
        return self.rest.read(n)


def scan_frames(path: Path) -> FrameIndex:
    """The frames of a framed ``.tar.zst`` / ``.tar.gz``, read frame by frame in bounded memory.

    Each frame must hold exactly one segment: the first the metadata (``head``), then one blob
    member each whose bytes hash to its name, the last the end-of-archive blocks (``tail``).
    Anything else (an archive built before framing: one stream for everything; a frame holding
    two members or half of one; a blob that does not hash to its name; bytes after the last
    frame; a skippable zstd frame; a truncated file) is a BuilderError naming the file and the
    frame's offset."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise BuilderError(f"{path}: cannot read: {exc.strerror}") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        magic = fh.read(4)
        fh.seek(0)
        if magic == ZSTD_MAGIC:
            frames = _zstd_frames(fh, size, path)
        elif magic[:2] == GZIP_MAGIC:
            frames = _gzip_members(fh, size, path)
        else:
            raise BuilderError(f"{path}: neither zstd nor gzip (it starts with {magic.hex() or 'nothing'})",
                               "frames are read from a .tar.zst or .tar.gz image archive")
        checker = _Segments(path)
        found: list[tuple[str, int, HashingWriter]] = []
        with contextlib.closing(frames):
            for offset, stream, seen in frames:
                try:
                    found.append((checker.label(offset, stream), offset, seen))
                except zstandard.ZstdError as exc:
                    raise BuilderError(f"{path}: the zstd frame at offset {offset} is corrupt: {exc}",
                                       "rebuild or re-download it") from None
    # (each frame's length and hash are complete once the next frame was asked for)
    if not checker.ended:
        raise BuilderError(f"{path}: ends without the end of the archive (truncated?)",
                           "rebuild or re-download it")
    out = tuple(Frame(label, offset, seen.size, seen.digest) for label, offset, seen in found)
    return FrameIndex(out)


# -- the memo in the store ------------------------------------------------------------------------
def remember(store: Store, file_digest: str, index: FrameIndex) -> None:
    """Keep ``index`` in the store as the frames of the compressed file whose sha256 is
    ``file_digest`` (the index is a blob; the memo names it)."""
    blob = store.put_bytes(index.to_json(), what=f"frame index of {file_digest}")
    store.index_put(FRAMES_NAMESPACE, file_digest, blob)


def recall(store: Store, file_digest: str) -> FrameIndex | None:
    """The index ``remember`` kept for ``file_digest``; None when there is none or it does not
    read as one (a memo is a shortcut: the caller scans the file or carries it whole)."""
    blob = store.index_get(FRAMES_NAMESPACE, file_digest)
    if blob is None:
        return None
    try:
        return FrameIndex.from_json(store.read_bytes(blob), f"frame index {blob}")
    except BuilderError:
        return None


def scan_and_remember(store: Store, path: Path, file_digest: str) -> FrameIndex:
    """``scan_frames`` of ``path`` (whose sha256 is ``file_digest``), kept in the store for the
    next reader; raises like ``scan_frames`` for a file that is not framed."""
    index = scan_frames(path)
    remember(store, file_digest, index)
    return index


def frames_of(store: Store, path: Path, file_digest: str) -> FrameIndex:
    """The frames of the compressed file ``path`` (sha256 ``file_digest``): remembered, else
    scanned once and remembered."""
    known = recall(store, file_digest)
    return known if known is not None else scan_and_remember(store, path, file_digest)
