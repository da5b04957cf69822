"""Framed image archives: one compressed frame per tar segment (issue 15, delta releases).

An image archive's tar (builder/oci/archive.py) is cut into segments: ``head`` (the metadata
members and the two directories), one segment per blob (header + bytes + padding) and ``tail``
(the end-of-archive blocks and record padding). The ``.tar.zst`` is one zstd frame per segment,
the ``.tar.gz`` one gzip member per segment. Blob members have a constant mtime (``BLOB_MTIME``),
so a blob's frame bytes depend on the blob alone: a delta can point into the base archive.

(Implementation in progress: the API below is what other modules build on.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from builder.oci.compress import OnBytes, Output
from builder.store import Store

BLOB_MTIME = 0  # every blobs/sha256/<hex> member's mtime: its segment depends on the blob alone
HEAD = "head"
TAIL = "tail"
FRAMES_NAMESPACE = "frames"  # store.index_put namespace of the memos: file sha256 -> index blob


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
        raise NotImplementedError

    @classmethod
    def from_json(cls, data: bytes, where: str) -> FrameIndex:
        raise NotImplementedError


@dataclass(frozen=True)
class FramedOutput:
    """A compressed archive written here and the index of its frames (known while writing)."""

    output: Output
    index: FrameIndex


class Segmented(Protocol):
    """What the archive writer writes into: bytes, and where each segment starts."""

    def segment(self, label: str) -> None:
        """The bytes written from now on (until the next call) are segment ``label``."""

    def write(self, data: bytes | memoryview) -> int: ...


def zstd_and_gzip(produce: Callable[[Segmented], object], zst: Path, gz: Path,
                  threads: int | None = None, on_bytes: OnBytes | None = None
                  ) -> tuple[FramedOutput, FramedOutput]:
    """Stream what ``produce(sink)`` writes, segment by segment, into ``zst`` (a zstd frame per
    segment) and ``gz`` (a gzip member per segment) at once, both atomic; returns both files and
    their frame indexes. ``on_bytes`` counts the input."""
    raise NotImplementedError


def scan_frames(path: Path) -> FrameIndex:
    """The frames of a framed ``.tar.zst`` / ``.tar.gz`` (bounded memory); each must hold exactly
    one segment, else a BuilderError naming the file and the frame's offset."""
    raise NotImplementedError


def remember(store: Store, file_digest: str, index: FrameIndex) -> None:
    """Keep ``index`` in the store as the frames of the compressed file ``file_digest``."""
    raise NotImplementedError


def recall(store: Store, file_digest: str) -> FrameIndex | None:
    """The index ``remember`` kept for ``file_digest``; None when unknown or unreadable."""
    raise NotImplementedError
