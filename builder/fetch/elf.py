"""Which arch an ELF binary is for, from its header (so an amd64 file is never shipped as arm64)."""

from __future__ import annotations

import struct
from typing import BinaryIO

from builder.artifacts import ELF_MACHINES  # e_machine → the arch a lock names


def arch_of(stream: BinaryIO) -> str | None:
    """The arch of an ELF file, or None when the file is not ELF (a script, a chart)."""
    head = stream.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    endian = "<" if head[5] == 1 else ">"
    (machine,) = struct.unpack(endian + "H", head[18:20])
    return ELF_MACHINES.get(machine, f"elf-machine-{machine}")
