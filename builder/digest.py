"""Digest strings and streaming hashing.

Inside the builder a digest is always ``sha256:<64 hex>``; images.lock writes component pins as
bare hex (the way upstream checksum files do) and image pins in the full form.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import IO

CHUNK = 1 << 20
# fullmatch, never match with `$`: `$` also matches before a trailing newline.
_HEX = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def is_hex64(value: object) -> bool:
    return isinstance(value, str) and bool(_HEX.fullmatch(value))


def is_digest(value: object) -> bool:
    return isinstance(value, str) and bool(_DIGEST.fullmatch(value))


def from_hex(hex_value: str) -> str:
    return f"sha256:{hex_value}"


def hex_of(digest: str) -> str:
    if not is_digest(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest.split(":", 1)[1]


def of_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def of_stream(stream: IO[bytes]) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    while chunk := stream.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def of_file(path: Path) -> tuple[str, int]:
    with open(path, "rb") as f:
        return of_stream(f)


def of_chunks(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return "sha256:" + h.hexdigest()
