"""Framed image archives (issue 15, builder/oci/framed.py): the tar written segment by segment is
still tarfile's tar; `.tar.zst` is one zstd frame and `.tar.gz` one gzip member per segment, the
same for every thread count, a shared blob's frame the same bytes in every archive; scan_frames
reads the frames back and refuses what is not framed; the build remembers each file's frame index
in the store. Fixture images are real (busybox layers written into a real store); the release
ones are the session's real build (`built`)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder import digest as dg
from builder.assemble import images
from builder.assemble.state import BuildState
from builder.errors import BuilderError, DigestMismatch
from builder.fetch.docker_api import import_archive
from builder.oci import compress, framed, pgzip
from builder.oci import model as m
from builder.oci.archive import (
    BLOB_MTIME,
    ArchiveImage,
    archive_size,
    end_blocks,
    read_archive,
    stream_archive,
    write_archive,
)
from builder.oci.layout import OCI_LAYOUT, blob_member, plan_layout
from builder.store import Store
from tests.plugins.built import EPOCH as EPOCH_BUILT
from tests.plugins.oci import EPOCH, busybox_image
from tests.rig.images import docker_archive
from tests.test_onepass import _plan, _write  # the built all-in-one archive's images; images.write

ARCH = "amd64"


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, list[ArchiveImage]]:
    """A real store with three busybox images (sharing both layers, each its own config)."""
    store = Store(tmp_path_factory.mktemp("framed") / "store")
    platform = m.Platform.for_arch(ARCH)
    imgs = [ArchiveImage(f"docker.io/rancher/busybox-{label}:v1",
                         busybox_image(store, ARCH, label=label, media=media).digest, platform)
            for label, media in (("a", "oci"), ("b", "docker"), ("c", "oci"))]
    return store, imgs


def _framed(store: Store, imgs: list[ArchiveImage], dest: Path, threads: int | None = None,
            name: str = "x") -> tuple[framed.FramedOutput, framed.FramedOutput]:
    dest.mkdir(parents=True, exist_ok=True)
    return framed.zstd_and_gzip(lambda sink: stream_archive(store, imgs, sink, EPOCH, name),
                                dest / f"{name}.tar.zst", dest / f"{name}.tar.gz", threads=threads)


def _tarfile_bytes(store: Store, imgs: list[ArchiveImage]) -> bytes:
    """The same members written by tarfile's own stream mode (metadata at the epoch, blobs at
    BLOB_MTIME): the reference the hand-written tar must equal."""
    from builder.oci.archive import _info, _metadata  # the member list, not the writing

    plan = plan_layout(store, imgs)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, data in _metadata(plan):
            tar.addfile(_info(name, EPOCH, len(data)), io.BytesIO(data))
        tar.addfile(_info("blobs", EPOCH, is_dir=True))
        tar.addfile(_info("blobs/sha256", EPOCH, is_dir=True))
        for blob in plan.blobs:
            tar.addfile(_info(blob_member(blob.digest), BLOB_MTIME, blob.size),
                        io.BytesIO(store.read_bytes(blob.digest)))
    return out.getvalue()


def _frames(path: Path, index: framed.FrameIndex) -> list[bytes]:
    data = path.read_bytes()
    return [data[f.offset:f.end] for f in index.frames]


def _unzstd(frame: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(frame)


# -- 1. the tar ---------------------------------------------------------------------------------
def test_the_tar_is_what_tarfile_writes_with_blobs_at_blob_mtime(fixture, tmp_path):
    store, imgs = fixture
    tar = write_archive(store, imgs, tmp_path / "x.tar", EPOCH).path
    assert tar.read_bytes() == _tarfile_bytes(store, imgs)
    assert archive_size(store, imgs, EPOCH) == tar.stat().st_size
    with tarfile.open(tar) as t:
        mtimes = {i.name: i.mtime for i in t.getmembers()}
    assert {n for n, t in mtimes.items() if t == BLOB_MTIME} == \
        {n for n in mtimes if n.startswith("blobs/sha256/")}
    assert mtimes["index.json"] == mtimes["blobs"] == EPOCH


# -- 2. frames ----------------------------------------------------------------------------------
def test_one_frame_per_segment_decoding_to_the_tar(fixture, tmp_path):
    store, imgs = fixture
    zst, gz = _framed(store, imgs, tmp_path)
    tar = write_archive(store, imgs, tmp_path / "x.tar", EPOCH).path.read_bytes()
    plan = plan_layout(store, imgs)
    labels = ["head", *(b.digest for b in plan.blobs), "tail"]
    for out in (zst, gz):
        assert [f.label for f in out.index.frames] == labels
        assert out.index.size == out.output.size == out.output.path.stat().st_size
        with compress.open_maybe_compressed(out.output.path) as fh:  # across frames
            assert fh.read() == tar
    # Each frame decodes on its own to its segment; the gzip members are the pgzip scheme's.
    segments, at = [], 0
    for frame in _frames(zst.output.path, zst.index):
        segment = _unzstd(frame)
        segments.append(segment)
        assert tar[at:at + len(segment)] == segment
        at += len(segment)
    assert at == len(tar)
    for segment, member in zip(segments, _frames(gz.output.path, gz.index), strict=True):
        assert member == pgzip.compress(segment)
    for f, data in zip(zst.index.frames, _frames(zst.output.path, zst.index), strict=True):
        assert f.sha256 == dg.of_bytes(data)


@pytest.mark.parametrize("threads", [1, 3])
def test_the_same_bytes_for_every_thread_count(fixture, tmp_path, threads):
    store, imgs = fixture
    ref = _framed(store, imgs, tmp_path / "ref", threads=2)
    got = _framed(store, imgs, tmp_path / "t", threads=threads)
    for a, b in zip(ref, got, strict=True):
        assert (a.output.digest, a.index) == (b.output.digest, b.index)


def test_a_shared_blob_is_the_same_frame_in_two_archives(fixture, tmp_path):
    """Two archives with overlapping images (and a different epoch: another release): every blob
    both ship has the same compressed bytes in both, wherever it sits."""
    store, imgs = fixture
    a = _framed(store, imgs[:2], tmp_path / "a", name="a")
    b = framed.zstd_and_gzip(lambda sink: stream_archive(store, imgs[1:], sink, EPOCH + 86400, "b"),
                             tmp_path / "b.tar.zst", tmp_path / "b.tar.gz")
    for x, y in zip(a, b, strict=True):
        fx, fy = x.index.by_label(), y.index.by_label()
        shared = set(fx) & set(fy) - {"head", "tail"}
        assert len(shared) >= 3  # both layers and imgs[1]'s manifest and config
        assert set(fx) - shared - {"head", "tail"}  # imgs[0]'s own blobs are not in b
        dx, dy = x.output.path.read_bytes(), y.output.path.read_bytes()
        for label in shared:
            assert fx[label].sha256 == fy[label].sha256
            assert dx[fx[label].offset:fx[label].end] == dy[fy[label].offset:fy[label].end]
        assert fx["head"].sha256 != fy["head"].sha256


# -- 3. scan_frames -----------------------------------------------------------------------------
def test_scan_agrees_with_the_writer(fixture, tmp_path):
    store, imgs = fixture
    for out in _framed(store, imgs, tmp_path):
        assert framed.scan_frames(out.output.path) == out.index


def _refused(path: Path, *needles: str) -> BuilderError:
    with pytest.raises(BuilderError) as err:
        framed.scan_frames(path)
    text = str(err.value)
    assert str(path) in text
    for needle in needles:
        assert needle in text, text
    return err.value


def test_an_unframed_archive_is_refused(fixture, tmp_path):
    """What the build wrote before framing: one zstd frame / one gzip member for the whole tar."""
    store, imgs = fixture
    tar = write_archive(store, imgs, tmp_path / "old.tar", EPOCH).path
    for old in (compress.zstd_file(tar, tmp_path / "old.tar.zst"),
                compress.gzip_file(tar, tmp_path / "old.tar.gz")):
        err = _refused(old.path, "is not a framed archive (built before delta support)",
                       "its first frame holds blobs/sha256/")
        assert "carry it whole" in (err.hint or "")


def _rewrite(path: Path, index: framed.FrameIndex, dest: Path,
             change: Callable[[list[tuple[str, bytes]]], list[bytes]]) -> Path:
    """A copy of a framed file whose frames ``change`` rewrites (given (label, frame) pairs)."""
    pairs = list(zip((f.label for f in index.frames), _frames(path, index), strict=True))
    dest.write_bytes(b"".join(change(pairs)))
    return dest


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(compression_params=compress.zstd_params(threads=1)).compress(data)


def test_frames_that_are_not_one_segment_each_are_refused(fixture, tmp_path):
    store, imgs = fixture
    zst, gz = _framed(store, imgs, tmp_path)
    path, index = zst.output.path, zst.index
    offsets = [f.offset for f in index.frames]

    # Two blob members in one frame (frames 1 and 2 re-compressed together).
    two = _rewrite(path, index, tmp_path / "two.tar.zst", lambda p: [
        p[0][1], _zstd(_unzstd(p[1][1]) + _unzstd(p[2][1])), *(f for _, f in p[3:])])
    _refused(two, f"the frame at offset {offsets[1]} holds blobs/sha256/", " and blobs/sha256/")

    # Half a member: a blob's segment cut in two frames.
    def halves(p: list[tuple[str, bytes]]) -> list[bytes]:
        big = max(range(1, len(p) - 1), key=lambda i: len(p[i][1]))
        seg = _unzstd(p[big][1])
        return [f for _, f in p[:big]] + [_zstd(seg[:len(seg) // 2]), _zstd(seg[len(seg) // 2:])] + \
            [f for _, f in p[big + 1:]]
    _refused(_rewrite(path, index, tmp_path / "half.tar.zst", halves),
             "does not hold whole tar members")

    # The tail inside the last blob's frame.
    merged = _rewrite(path, index, tmp_path / "tail.tar.zst", lambda p: [
        *(f for _, f in p[:-2]), _zstd(_unzstd(p[-2][1]) + _unzstd(p[-1][1]))])
    _refused(merged, f"the frame at offset {offsets[-2]} holds more than whole members")

    # A tail that is not all zeros (a byte set after its first block).
    def dirty(p: list[tuple[str, bytes]]) -> list[bytes]:
        tail = bytearray(_unzstd(p[-1][1]))
        tail[600] = 1
        return [*(f for _, f in p[:-1]), _zstd(bytes(tail))]
    _refused(_rewrite(path, index, tmp_path / "dirty.tar.zst", dirty),
             f"the frame at offset {offsets[-1]}: the end of the archive is not")
    # Half a frame's worth of tail: the record padding missing.
    short = _rewrite(path, index, tmp_path / "shorttail.tar.zst", lambda p: [
        *(f for _, f in p[:-1]), _zstd(bytes(2 * tarfile.BLOCKSIZE))])
    if short.read_bytes() != path.read_bytes():  # (unless the tar ended on a record already)
        _refused(short, "the end of the archive is not")


def test_a_blob_frame_repeated_is_refused(fixture, tmp_path):
    """A blob's frame twice (the tail made to fit, so the tar is whole): a member appears twice,
    as verify says, and no index with a label repeated (which from_json refuses) comes out."""
    store, imgs = fixture
    zst, _ = _framed(store, imgs, tmp_path)

    def twice(p: list[tuple[str, bytes]]) -> list[bytes]:
        segments = [_unzstd(f) for _, f in p[:-1]]
        segments.insert(2, segments[1])
        tar_size = sum(len(s) for s in segments)
        return [_zstd(s) for s in segments] + [_zstd(end_blocks(tar_size))]

    repeated = _rewrite(zst.output.path, zst.index, tmp_path / "twice.tar.zst", twice)
    _refused(repeated, f"{blob_member(zst.index.frames[1].label)}' appears twice")


def test_a_blob_frame_that_does_not_hash_to_its_name_is_refused(fixture, tmp_path):
    store, imgs = fixture
    zst, _ = _framed(store, imgs, tmp_path)
    index = zst.index

    def flip(p: list[tuple[str, bytes]]) -> list[bytes]:
        seg = bytearray(_unzstd(p[1][1]))
        seg[600] ^= 1  # a data byte (the header is the first 512)
        return [p[0][1], _zstd(bytes(seg)), *(f for _, f in p[2:])]

    with pytest.raises(DigestMismatch) as err:
        framed.scan_frames(_rewrite(zst.output.path, index, tmp_path / "bad.tar.zst", flip))
    assert f"the frame at offset {index.frames[1].offset} ({blob_member(index.frames[1].label)})" in str(err.value)


def test_garbage_skippable_frames_and_truncation_are_refused(fixture, tmp_path):
    store, imgs = fixture
    zst, gz = _framed(store, imgs, tmp_path)
    for out, magic in ((zst, "zstd"), (gz, "gzip")):
        data = out.output.path.read_bytes()
        junk = tmp_path / f"junk.{magic}"
        junk.write_bytes(data + b"junk")
        _refused(junk, f"4 bytes after the last {magic} ", f"(offset {len(data)})")
        cut = tmp_path / f"cut.{magic}"
        cut.write_bytes(data[:-3])
        _refused(cut, "truncated")
        short = tmp_path / f"short.{magic}"
        short.write_bytes(data[:out.index.frames[-1].offset])  # ends where the tail would start
        _refused(short, "ends without the end of the archive")
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"skip"
    head = zst.index.frames[0]
    data = zst.output.path.read_bytes()
    skip = tmp_path / "skip.tar.zst"
    skip.write_bytes(data[:head.end] + skippable + data[head.end:])
    _refused(skip, f"a skippable zstd frame at offset {head.end}")
    plain = tmp_path / "plain.tar"
    plain.write_bytes(b"ustar")
    _refused(plain, "neither zstd nor gzip")


# -- FrameIndex.from_json -------------------------------------------------------------------------
_HEX = st.text("0123456789abcdef", min_size=64, max_size=64)


@st.composite
def _indexes(draw) -> framed.FrameIndex:
    blobs = draw(st.lists(_HEX, max_size=6, unique=True))
    labels = ["head", *(f"sha256:{h}" for h in blobs), "tail"]
    frames, at = [], 0
    for label in labels:
        length = draw(st.integers(1, 1 << 40))
        frames.append(framed.Frame(label, at, length, "sha256:" + draw(_HEX)))
        at += length
    return framed.FrameIndex(tuple(frames))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_indexes())
def test_frame_index_json_round_trips(index):
    assert framed.FrameIndex.from_json(index.to_json(), "memo") == index


def _mutations(doc: dict) -> list:
    rows = doc["frames"]
    return [
        {**doc, "v": 2}, {"frames": rows}, {**doc, "x": 1}, [rows], {**doc, "frames": rows[:1]},
        {**doc, "frames": [rows[1], rows[0], *rows[2:]]},  # head not first
        {**doc, "frames": [*rows[:-1], [rows[-1][0], rows[-1][1] + 1, *rows[-1][2:]]]},  # a gap
        {**doc, "frames": [[rows[0][0], 1, *rows[0][2:]], *rows[1:]]},  # not from 0
        {**doc, "frames": [[rows[0][0], 0, 0, rows[0][3]], *rows[1:]]},  # empty frame
        {**doc, "frames": [[rows[0][0], 0, True, rows[0][3]], *rows[1:]]},
        {**doc, "frames": [[rows[0][0], 0, 1.5, rows[0][3]], *rows[1:]]},
        {**doc, "frames": [[*rows[0][:3], "sha256:XY"], *rows[1:]]},
        {**doc, "frames": [rows[0][:3], *rows[1:]]},
        {**doc, "frames": [["body", *rows[0][1:]], *rows[1:]]},
        {**doc, "frames": [rows[0], ["sha256:" + "A" * 64, *rows[1][1:]], *rows[2:]]},
        {**doc, "frames": [*rows[:-1], ["head", *rows[-1][1:]]]},  # tail missing
    ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_indexes(), st.data())
def test_frame_index_json_is_strict(index, data):
    doc = json.loads(index.to_json())
    bad = data.draw(st.sampled_from(_mutations(doc)))
    with pytest.raises(BuilderError) as err:
        framed.FrameIndex.from_json(json.dumps(bad).encode(), "memo X")
    assert str(err.value).startswith("memo X") and "not a frame index" in str(err.value)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_frame_index_json_refuses_any_bytes_cleanly(raw):
    try:
        framed.FrameIndex.from_json(raw, "memo")
    except BuilderError:
        pass


def test_frame_index_json_is_bounded():
    with pytest.raises(BuilderError, match="bytes \\(limit"):
        framed.FrameIndex.from_json(b" " * (framed.INDEX_LIMIT + 1), "memo")
    rows = [["head", 0, 1, "sha256:" + "0" * 64]]
    rows += [[f"sha256:{i:064x}", i + 1, 1, "sha256:" + "0" * 64] for i in range(framed.MAX_FRAMES)]
    with pytest.raises(BuilderError, match="frames \\(expected 2.."):
        framed.FrameIndex.from_json(json.dumps({"frames": rows, "v": 1}).encode(), "memo")


# -- 4. the memo --------------------------------------------------------------------------------
def test_remember_and_recall(fixture, tmp_path):
    store, imgs = fixture
    zst, _ = _framed(store, imgs, tmp_path)
    assert framed.recall(store, "sha256:" + "7" * 64) is None
    framed.remember(store, zst.output.digest, zst.index)
    assert framed.recall(store, zst.output.digest) == zst.index
    # A memo naming a blob that is not an index (faked: a store cannot be made to hold a bad
    # memo otherwise) is no memo.
    store.index_put(framed.FRAMES_NAMESPACE, zst.output.digest, store.put_bytes(b'{"v": 1}'))
    assert framed.recall(store, zst.output.digest) is None


def test_the_build_remembers_every_archive_it_wrote(built):
    """The session's real release: each `.tar.zst` / `.tar.gz` has its index in the store, the
    one scan_frames reads back (the all-in-one archive is a copy of the core group's: same_as)."""
    store = Store(built.store)
    archives = sorted(built.out.glob("*-images*.tar.zst")) + sorted(built.out.glob("*-images*.tar.gz"))
    assert len(archives) >= 8  # two arches, the all-in-one and at least one group each
    for path in archives:
        remembered = framed.recall(store, dg.of_file(path)[0])
        assert remembered is not None, path.name
        assert remembered == framed.scan_frames(path), path.name


def _forget(store: Store, path: Path) -> None:
    """Drop a file's memo (faked: as a store that never saw the build would be)."""
    digest = dg.of_file(path)[0]
    (store.root / "index" / framed.FRAMES_NAMESPACE / hashlib.sha256(digest.encode()).hexdigest()).unlink()
    assert framed.recall(store, digest) is None


def test_a_fresh_archive_without_its_memo_gets_one(built, tmp_path):
    store = Store(built.store)
    p = _plan(built)
    out, work = tmp_path / "out", tmp_path / "work"
    files, rebuilt = _write(built, p, out, work)
    assert rebuilt
    for f in files[:2]:
        _forget(store, f)
    files, rebuilt = _write(built, p, out, work)
    assert not rebuilt  # fresh: nothing packed again ...
    for f in files[:2]:  # ... and the memo is back
        assert framed.recall(store, dg.of_file(f)[0]) == framed.scan_frames(f)


def test_a_fresh_record_of_an_unframed_archive_is_rebuilt(built, tmp_path):
    """A record that matches but a file that is not framed (its memo gone: an artifacts dir of
    another store): rebuilt, not kept."""
    store = Store(built.store)
    p = _plan(built)
    out, work = tmp_path / "out", tmp_path / "work"
    files, _ = _write(built, p, out, work)
    zst = files[0]
    with compress.open_maybe_compressed(zst) as fh:
        tar = fh.read()
    _forget(store, zst)
    stat = zst.stat()
    zst.write_bytes(_zstd(tar)[:stat.st_size].ljust(stat.st_size, b"\0"))  # same size, one frame
    import os
    os.utime(zst, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _, rebuilt = _write(built, p, out, work)
    assert rebuilt
    assert framed.scan_frames(zst) == framed.recall(store, dg.of_file(zst)[0])


def test_the_same_as_copy_is_remembered(built, tmp_path):
    """An archive of the same images as one written before (build.py passes it as ``same_as``):
    the copy's memo exists, even when the first archive's was lost."""
    store = Store(built.store)
    p = _plan(built)
    q = images.ArchivePlan("framed-copy.linux-amd64", None, p.images)
    out, work = tmp_path / "out", tmp_path / "work"
    files, _ = _write(built, p, out, work)
    for f in files[:2]:
        _forget(store, f)
    state = BuildState.load(out)
    copies, rebuilt = images.write(store, q, out, work, int(EPOCH_BUILT), state, same_as=p)
    state.commit()
    assert rebuilt
    for a, b in zip(files[:2], copies[:2], strict=True):
        assert a.read_bytes() == b.read_bytes()
        assert framed.recall(store, dg.of_file(b)[0]) == framed.scan_frames(b)


def test_gzip_reads_every_member(fixture, tmp_path):
    """Python's gzip (and gzip -dc) read a framed `.tar.gz` whole."""
    store, imgs = fixture
    _, gz = _framed(store, imgs, tmp_path)
    tar = write_archive(store, imgs, tmp_path / "x.tar", EPOCH).path.read_bytes()
    assert gzip.decompress(gz.output.path.read_bytes()) == tar
    assert OCI_LAYOUT in tar


# -- 5. readers across frames ---------------------------------------------------------------------
def test_our_readers_read_every_frame(fixture, tmp_path):
    """open_maybe_compressed read in chunks (as tarfile reads), and the archive reader that
    verify uses, get the whole tar of a framed `.tar.zst` and `.tar.gz`."""
    store, imgs = fixture
    tar = write_archive(store, imgs, tmp_path / "x.tar", EPOCH).path.read_bytes()
    for out in _framed(store, imgs, tmp_path):
        with compress.open_maybe_compressed(out.output.path) as fh:
            assert b"".join(iter(lambda: fh.read(4096), b"")) == tar  # noqa: B023 - read at once
        found = read_archive(out.output.path, verify=True)
        assert [i.manifest_digest for i in found.images] == [i.manifest_digest for i in imgs]


def test_a_docker_archive_with_multi_frame_zstd_layers_imports(fixture_set, tmp_path):
    """fetch/docker_api reads a layer that is several zstd frames (as `zstd -T` or a framed
    writer leaves it) whole: the same image as from the plain archive."""
    src, images = fixture_set
    manifest = images[2].manifests["amd64"].digest  # socat: three layers
    plain = docker_archive(src, manifest, "example.com/ci/app:dev", tmp_path / "plain.tar")
    framed_layers = tmp_path / "framed.tar"
    with tarfile.open(plain) as tin, tarfile.open(framed_layers, "w") as tout:
        for info in tin.getmembers():
            data = tin.extractfile(info).read() if info.isfile() else b""  # type: ignore[union-attr]
            if info.name.endswith("layer.tar"):
                half = len(data) // 2
                data = _zstd(data[:half]) + _zstd(data[half:])
                info.size = len(data)
            tout.addfile(info, io.BytesIO(data) if info.isfile() else None)
    digests = {import_archive(Store(tmp_path / name), path, "example.com/ci/app:dev").manifest.digest
               for name, path in (("a", plain), ("b", framed_layers))}
    assert len(digests) == 1
