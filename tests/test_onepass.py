"""Image archives in one pass (issue 14, items 2, 3 and 5): the tar streams once into zstd and the
parallel gzip, with no `.tar` on disk; the `.tar.zst` and `.tar.gz` are the bytes a two-pass flow
gives (each tar segment compressed on its own since issue 15: framed.py), the same for every
thread count, and a terminal's bar counts the tar against a total known up front. All on the session's real release (`built`: its store and archives)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import zstandard

from builder import artifacts
from builder.assemble import images
from builder.assemble.state import STATE_FILE, BuildState
from builder.oci import compress, framed, pgzip
from builder.oci.archive import (
    ArchiveImage,
    archive_size,
    read_archive_index,
    stream_archive,
    write_archive,
)
from builder.oci.convert import REGISTRY_MANIFEST
from builder.progress import Meter
from builder.store import Store, StoreCorrupt
from tests.plugins.built import EPOCH

BASE = "rke2-images.linux-amd64"  # the all-in-one archive: every default image of the release


def _plan(built, name: str = "onepass-images.linux-amd64") -> images.ArchivePlan:
    """The images of the built all-in-one amd64 archive, as a plan of our own."""
    found = read_archive_index(built.out / f"{BASE}.tar.zst")
    return images.ArchivePlan(name, None, tuple(ArchiveImage(i.name, i.manifest_digest, i.platform,
                                                             *_carried(i.annotations))
                                                for i in found))


def _carried(annotations: dict[str, str]) -> tuple:
    """A converted image (the zstd layer mode) carries its registry manifest, named in index.json."""
    registry = annotations.get(REGISTRY_MANIFEST)
    return ((registry,), ((REGISTRY_MANIFEST, registry),)) if registry else ()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write(built, p: images.ArchivePlan, out: Path, work: Path, meter: Meter | None = None,
           state: BuildState | None = None) -> tuple[list[Path], bool]:
    for d in (out, work):
        d.mkdir(parents=True, exist_ok=True)
    state = state or BuildState.load(out)
    files, rebuilt = images.write(Store(built.store), p, out, work, int(EPOCH), state, meter=meter)
    state.commit()
    return files, rebuilt


def test_zst_and_gz_are_each_segment_compressed_on_its_own_from_the_same_tar(built, tmp_path):
    """The golden bytes come from a two-pass flow run here: the whole `.tar` written by
    write_archive, cut where the frames say, each segment compressed on its own by
    compress.zstd_writer and the parallel gzip (the framed archive: builder/oci/framed.py)."""
    p = _plan(built)
    tar = write_archive(Store(built.store), p.images, tmp_path / "old.tar", int(EPOCH)).path.read_bytes()
    files, rebuilt = _write(built, p, tmp_path / "out", tmp_path / "work")
    assert rebuilt
    zst, gz, _ = files
    index = framed.recall(Store(built.store), f"sha256:{_sha(zst)}")
    assert index is not None
    segments, at = [], 0
    data = zst.read_bytes()
    for f in index.frames:
        size = len(zstandard.ZstdDecompressor().decompressobj().decompress(data[f.offset:f.end]))
        segments.append(tar[at:at + size])
        at += size
    assert at == len(tar)

    def zstd_alone(segment: bytes) -> bytes:
        out = io.BytesIO()
        with compress.zstd_writer(out) as z:
            z.write(segment)
        return out.getvalue()

    assert data == b"".join(zstd_alone(s) for s in segments)
    assert gz.read_bytes() == b"".join(pgzip.compress(s, threads=2) for s in segments)
    with gzip.open(gz) as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == hashlib.sha256(tar).hexdigest()  # the same tar inside
    assert archive_size(Store(built.store), p.images, int(EPOCH)) == len(tar)


def test_zst_bytes_match_the_session_build(built, tmp_path):
    """The same images in the same order as the built all-in-one archive, rebuilt by this code:
    the bytes the build wrote (a recipe rename does not touch them)."""
    p = _plan(built, BASE)
    if any(len(i.extras) > bool(_carried(dict(i.annotations))) for i in p.images):  # pragma: no cover - carried signatures are not in the index
        pytest.skip("the built archive carries signatures this plan cannot rebuild")
    files, _ = _write(built, p, tmp_path / "out", tmp_path / "work")
    assert _sha(files[0]) == _sha(built.out / f"{BASE}.tar.zst")
    assert _sha(files[1]) == _sha(built.out / f"{BASE}.tar.gz")


@pytest.mark.parametrize("threads", [1, 2])
def test_gz_is_the_same_for_every_thread_count_and_standard(built, tmp_path, threads):
    p = _plan(built)
    ref = tmp_path / "ref"
    files, _ = _write(built, p, ref / "out", ref / "work")

    def produce(sink) -> None:
        stream_archive(Store(built.store), p.images, sink, int(EPOCH), p.base)

    zst, gz = framed.zstd_and_gzip(produce, tmp_path / "x.tar.zst", tmp_path / "x.tar.gz", threads=threads)
    assert (zst.output.digest, gz.output.digest) == (f"sha256:{_sha(files[0])}", f"sha256:{_sha(files[1])}")
    for tool in ("gzip", "pigz"):
        subprocess.run([shutil.which(tool) or tool, "-t", str(gz.output.path)], check=True)


def test_no_tar_on_disk_while_packing_and_after(built, tmp_path):
    """A thread watches the work dir throughout: it only ever holds the two compressed files
    being written (temp files), never a `.tar`, and at most their final size (the old flow held
    the whole tar beside them: about 1.5x)."""
    p = _plan(built)
    out, work = tmp_path / "out", tmp_path / "work"
    seen: set[str] = set()
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            with contextlib.suppress(FileNotFoundError):  # a temp file renamed between the two calls
                entries = [(e.name, e.stat().st_size) for e in os.scandir(work)]
                seen.update(n for n, _ in entries)
                peak = max(peak, sum(size for _, size in entries))
            time.sleep(0.002)

    work.mkdir()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        _write(built, p, out, work)
    finally:
        done.set()
        watcher.join()
    outputs = [f".{p.base}{suffix}." for suffix in artifacts.IMAGE_ARCHIVE_SUFFIXES]
    assert seen and all(n.startswith(tuple(outputs)) or n in artifacts.image_files(p.base) or
                        n.startswith(f".{p.base}.txt.") for n in seen), seen
    final = sum((out / n).stat().st_size for n in artifacts.image_files(p.base))
    assert 0 < peak <= final, (peak, final)
    assert not list(work.iterdir())  # all published ...
    assert {f.name for f in out.iterdir()} == {*artifacts.image_files(p.base), STATE_FILE}  # ... and no more


def test_meter_counts_up_to_a_total_known_up_front(built, tmp_path):
    """What build.py shows on a terminal: the total is the tar's size before packing starts, it
    never changes, and the count ends on it."""
    p = _plan(built)
    total = images.tar_bytes(Store(built.store), p, int(EPOCH))
    calls: list[tuple[int, int | None]] = []
    meter = Meter(lambda done, t: calls.append((done, t)), total)
    files, _ = _write(built, p, tmp_path / "out", tmp_path / "work", meter)
    assert len(calls) > 2
    assert {t for _, t in calls} == {total}
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert meter.done == calls[-1][0] == total
    with compress.open_maybe_compressed(files[0]) as fh:
        assert sum(len(c) for c in iter(lambda: fh.read(1 << 20), b"")) == total


def test_no_bar_without_a_terminal(built, tmp_path):
    """Output into a pipe (as here): the one line per archive, no bar (no carriage return)."""
    res = built.cli("build", "--arch", "amd64", "--artifacts", str(tmp_path / "a"))
    assert f"packed {BASE} (" in res.stderr
    assert "\r" not in res.stderr and "%|" not in res.stderr


def _old_recipe(p: images.ArchivePlan, epoch: int) -> str:
    """ArchivePlan.recipe as it was before the parallel gzip (one gzip stream, level 6)."""
    data = {"v": 1, "epoch": epoch, "images": [(i.name, i.manifest_digest, str(i.platform)) for i in p.images],
            "zstd": [compress.ZSTD_LEVEL, compress.ZSTD_WINDOW_LOG], "gzip": compress.GZIP_LEVEL}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def test_an_archive_of_the_old_gzip_recipe_is_rebuilt(built, tmp_path):
    """An artifacts dir whose record says its `.tar.gz` is the old single-stream gzip: the next
    build must rewrite it (a recipe that ignored the gzip scheme would keep the old bytes)."""
    p = _plan(built)
    out, work = tmp_path / "out", tmp_path / "work"
    _write(built, p, out, work)
    gz = out / f"{p.base}.tar.gz"
    with gzip.open(gz) as fh:
        old = gzip.compress(fh.read(), compresslevel=compress.GZIP_LEVEL, mtime=0)  # one stream
    gz.write_bytes(old)
    entries = json.loads((out / STATE_FILE).read_text())
    entries[p.base]["recipe"] = _old_recipe(p, int(EPOCH))
    entries[p.base]["files"][gz.name].update(sha256=hashlib.sha256(old).hexdigest(), size=len(old),
                                             mtime_ns=gz.stat().st_mtime_ns)
    (out / STATE_FILE).write_text(json.dumps(entries))
    assert BuildState.load(out).fresh(p.base, _old_recipe(p, int(EPOCH)), out,
                                      list(artifacts.image_files(p.base)))  # a true old record
    _, rebuilt = _write(built, p, out, work)
    assert rebuilt
    assert gz.read_bytes() != old
    with gzip.open(gz) as fh:
        assert gzip.decompress(old) == fh.read()
    _, again = _write(built, p, out, work)
    assert not again  # and the new record is honoured


def test_a_failure_mid_stream_leaves_neither_file(tmp_path):
    """A producer that fails half-way (faked: a store blob found corrupt while packing raises
    the same way from inside the tar writer) leaves no compressed file and no temp file."""
    def produce(sink) -> None:
        sink.segment("head")
        sink.write(b"x" * (3 << 20))
        raise StoreCorrupt("packing a blob", "sha256:" + "0" * 64, "sha256:" + "1" * 64)

    with pytest.raises(StoreCorrupt):
        framed.zstd_and_gzip(produce, tmp_path / "a.tar.zst", tmp_path / "a.tar.gz", threads=2)
    assert not list(tmp_path.iterdir())
