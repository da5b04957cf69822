"""Parallel gzip: the bytes depend on the input, level and block size only (never on the thread
count, on how the input is split into writes, or on scheduling); real gzip readers accept them;
memory stays within the in-flight window.

The input is real machine code: this interpreter's compiled extension modules (ELF shared objects,
always present where the tests run), not random bytes, on which compression would be moot.
"""

from __future__ import annotations

import functools
import gzip
import io
import shutil
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder.errors import BuilderError
from builder.oci import pgzip

BLOCK = pgzip.BLOCK_SIZE


@functools.cache
def _corpus() -> bytes:
    """About 4 MiB of real shared objects (lib-dynload's *.so, in name order)."""
    out = bytearray()
    for so in sorted(Path(zlib.__file__).parent.glob("*.so")):
        out += so.read_bytes()
        if len(out) >= 4 << 20:
            break
    assert len(out) >= 4 << 20, "expected at least 4 MiB of extension modules next to zlib"
    return bytes(out)


def _real(n: int) -> bytes:
    return _corpus()[:n]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/setup installs it)")
    return path


class _Recorder(io.BytesIO):
    """A sink that notes, at each write, how many blocks the writer holds in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.writer: pgzip.ParallelGzipWriter | None = None
        self.in_flight_seen: list[int] = []

    def write(self, data) -> int:  # type: ignore[override]
        if self.writer is not None:
            self.in_flight_seen.append(self.writer.in_flight)
        return super().write(data)


SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK, (2 << 20) + 17]


@pytest.mark.parametrize("size", SIZES, ids=[f"{s}B" for s in SIZES])
def test_bytes_do_not_depend_on_thread_count(size: int) -> None:
    data = _real(size)
    outs = {threads: pgzip.compress(data, threads) for threads in (1, 2, 3, 8)}
    assert len(set(outs.values())) == 1, {t: len(o) for t, o in outs.items()}
    assert gzip.decompress(outs[1]) == data


def test_up_to_one_block_keeps_todays_bytes() -> None:
    """An input of at most one block is one deflate stream: the same bytes GzipFile (what
    compress.gzip_file used before) writes, so small artifacts do not change."""
    for data in (b"", _real(1), _real(BLOCK)):
        ref = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=ref, mtime=0) as gz:
            gz.write(data)
        assert pgzip.compress(data, 2) == ref.getvalue()


def test_gzip_and_pigz_accept_it(tmp_path: Path) -> None:
    data = _real((2 << 20) + 17)
    for name, body in (("many.gz", data), ("empty.gz", b"")):
        out = tmp_path / name
        with io.BytesIO(body) as src, open(out, "wb") as dst:
            pgzip.gzip_stream(src, dst, threads=2)
        subprocess.run([_tool("gzip"), "-t", str(out)], check=True)
        subprocess.run([_tool("pigz"), "-t", str(out)], check=True)
        got = subprocess.run([_tool("gzip"), "-dc", str(out)], check=True, capture_output=True).stdout
        assert got == body
        with gzip.open(out) as gz:
            assert gz.read() == body


def test_gzip_stream_reports_progress_in_input_bytes() -> None:
    data = _real((3 << 20) + 5)  # more than one read
    seen: list[int] = []
    out = io.BytesIO()
    pgzip.gzip_stream(io.BytesIO(data), out, threads=2, on_bytes=seen.append)
    assert sum(seen) == len(data) and len(seen) > 1
    assert out.getvalue() == pgzip.compress(data, 1)


def test_size_is_pigz_size() -> None:
    """Each block is primed with the 32 KiB before it, as pigz does: the result is as small as
    `pigz -6` (a handful of bytes per block apart: our sync markers) and smaller than `gzip -6`."""
    data = _real(4 << 20)
    ours = len(pgzip.compress(data, 2))
    pigz = len(subprocess.run([_tool("pigz"), "-6", "-n", "-c"], input=data, check=True,
                              capture_output=True).stdout)
    assert ours <= pigz * 1.0005, (ours, pigz)


def test_header_has_no_name_and_mtime_zero() -> None:
    out = pgzip.compress(_real(BLOCK + 1), 2)
    magic, method, flags, mtime, _xfl, os_byte = struct.unpack("<2sBBIBB", out[:10])
    assert (magic, method, flags, mtime, os_byte) == (b"\x1f\x8b", 8, 0, 0, 255)  # flags 0: no FNAME
    for level in (1, 6, 9):
        ref = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", compresslevel=level, fileobj=ref, mtime=0):
            pass
        assert pgzip.compress(b"x", 1, level)[:10] == ref.getvalue()[:10]


@settings(max_examples=60, deadline=None)
@given(offset=st.integers(0, 1 << 20), size=st.integers(0, 40_000), block_size=st.integers(1, 9000),
       threads=st.integers(1, 8), cuts=st.lists(st.integers(0, 40_000), max_size=8))
def test_any_blocks_threads_and_writes_round_trip_to_the_same_bytes(
        offset: int, size: int, block_size: int, threads: int, cuts: list[int]) -> None:
    data = _corpus()[offset:offset + size]
    reference = pgzip.compress(data, 1, block_size=block_size)
    out = io.BytesIO()
    with pgzip.ParallelGzipWriter(out, threads, block_size=block_size) as gz:
        start = 0
        for cut in sorted(c for c in cuts if c <= len(data)) + [len(data)]:
            gz.write(data[start:cut])
            gz.flush()  # never cuts a block: bytes stay those of one write
            start = cut
        assert gz.tell() == len(data)
    assert out.getvalue() == reference
    assert gzip.decompress(reference) == data


def test_in_flight_window_is_honoured() -> None:
    """Memory bound without timing: at most `window` blocks are ever held, and compressed blocks
    reach the sink while input still arrives (nothing is kept back until close)."""
    data = _real(40 * 4096)
    sink = _Recorder()
    gz = pgzip.ParallelGzipWriter(sink, threads=8, block_size=4096, window=3)
    sink.writer = gz
    for i in range(0, len(data), 1000):
        gz.write(data[i:i + 1000])
        assert gz.in_flight <= 3
    written_before_close = len(sink.in_flight_seen)
    gz.close()
    assert max(sink.in_flight_seen) <= 3
    # 39 blocks were handed out (the 40th is held back: it may be the last); all but 3 are written
    assert written_before_close >= 39 - 3
    assert gzip.decompress(sink.getvalue()) == data


def test_tarfile_writes_through_it() -> None:
    """What the one-pass archive writer will do: tarfile streams into the writer (tell() is the
    uncompressed offset, as GzipFile's)."""
    plain, packed = io.BytesIO(), io.BytesIO()
    members = [("lib/a.so", _real(300_000)), ("lib/empty", b""), ("lib/b.so", _real(5000))]
    for mode, sink in (("w", plain), ("w", pgzip.ParallelGzipWriter(packed, 2, block_size=65536))):
        with tarfile.open(fileobj=sink, mode=mode, format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for name, body in members:
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
        if sink is not plain:
            sink.close()
    assert gzip.decompress(packed.getvalue()) == plain.getvalue()


def test_error_inside_with_leaves_the_stream_unfinished() -> None:
    out = io.BytesIO()
    with pytest.raises(RuntimeError), pgzip.ParallelGzipWriter(out, 2, block_size=4096) as gz:
        gz.write(_real(50_000))
        raise RuntimeError("the tar writer failed")
    assert gz.closed
    with pytest.raises(EOFError):
        gzip.decompress(out.getvalue())  # no final block, no trailer: no reader takes it as whole
    with pytest.raises(ValueError, match="closed"):
        gz.write(b"more")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"threads": 0}, "threads must be >= 1, got 0"),
    ({"threads": 1, "level": 10}, "level must be 0..9, got 10"),
    ({"threads": 1, "block_size": 0}, "block size must be >= 1, got 0"),
    ({"threads": 1, "window": 0}, "window must be >= 1, got 0"),
])
def test_bad_parameters_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(BuilderError, match=message):
        pgzip.ParallelGzipWriter(io.BytesIO(), **kwargs)
