"""The zstd layer mode's conversion (builder/oci/convert.py) on the rig's real fixture images (real
Debian busybox/socat binaries), read back by the real consumers: containerd 1.6 (import and run),
podman and skopeo."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from builder import digest as dg
from builder.errors import BuilderError, DigestMismatch
from builder.oci import compress
from builder.oci import model as m
from builder.oci.convert import (
    REGISTRY_LAYER,
    REGISTRY_MANIFEST,
    ZSTD_LAYER_WINDOW_LOG,
    ConvertedImage,
    ZstdLayerParams,
    to_zstd,
)
from builder.oci.image import build_image, load_image
from builder.oci.layer import FileEntry, write_layer
from builder.oci.layout import ArchiveImage, write_layout
from builder.store import Store, StoreCorrupt
from tests.plugins.oci import Containerd, host_arch
from tests.rig import payloads, podman
from tests.rig.images import EPOCH, FixtureImage

ARCH = "amd64"  # converting is arch-blind; the amd64 images are the ones that run here


def _image(fixture_set, repository: str) -> FixtureImage:
    return next(i for i in fixture_set[1] if i.repository == repository)


def _copy_image(src: Store, manifest_digest: str, dest: Store) -> None:
    """One image's manifest, config and layers from the session's fixture store into a fresh
    store (re-verified on the way), so a test's conversions and memos are its own."""
    manifest, _ = load_image(src, manifest_digest)
    for digest in (manifest_digest, manifest.config.digest, *(la.digest for la in manifest.layers)):
        with src.open(digest) as fh:
            dest.put_stream(fh, expected=digest)


def _fresh(tmp_path: Path, fixture_set, *repositories: str, name: str = "store") -> Store:
    store = Store(tmp_path / name)
    for repo in repositories:
        _copy_image(fixture_set[0], _image(fixture_set, repo).manifests[ARCH].digest, store)
    return store


def _unzstd_digest(store: Store, digest: str) -> str:
    # The rke2/k3s importer's window cap: a layer that decodes here decodes there.
    dctx = zstandard.ZstdDecompressor(max_window_size=compress.ZSTD_MAX_WINDOW)
    with store.open(digest) as fh, dctx.stream_reader(fh) as reader:
        return dg.of_stream(reader)[0]


def _blobs(store: Store) -> set[str]:
    return {p.name for p in store.blobs_dir().iterdir()}


# -- the converted image -------------------------------------------------------------------------

@pytest.mark.parametrize("repository", ["fixtures/socat", "fixtures/busybox-list"])
def test_converted_image_keeps_the_config_and_each_layer_decodes_to_its_diff_id(
        tmp_path: Path, fixture_set, repository: str) -> None:
    store = _fresh(tmp_path, fixture_set, repository)
    registry_digest = _image(fixture_set, repository).manifests[ARCH].digest
    registry, config = load_image(store, registry_digest)

    image = to_zstd(store, registry_digest)

    assert image.converted == len(registry.layers) >= 2
    converted, converted_config = load_image(store, image.digest)
    doc = json.loads(converted.raw)
    assert converted.raw == m.canonical_json(doc)
    assert doc["mediaType"] == m.OCI_MANIFEST
    assert doc["annotations"] == {REGISTRY_MANIFEST: registry_digest}
    # The same config blob: bytes and digest unchanged, typed OCI (busybox-list's is Docker's).
    assert converted.config.digest == registry.config.digest == image.config_digest
    assert (converted.config.size, converted.config.media_type) == (registry.config.size, m.OCI_CONFIG)
    assert converted_config.raw == config.raw
    for i, (layer, source) in enumerate(zip(converted.layers, registry.layers, strict=True)):
        assert layer.media_type == m.OCI_LAYER_ZSTD
        assert layer.annotations == {REGISTRY_LAYER: source.digest}
        assert (layer.size, layer.digest) == (store.size(layer.digest), dg.of_file(store.blob_path(layer.digest))[0])
        assert _unzstd_digest(store, layer.digest) == config.diff_ids[i]
        frame = zstandard.get_frame_parameters(store.blob_path(layer.digest).read_bytes()[:18])
        assert frame.has_checksum and frame.content_size == zstandard.CONTENTSIZE_UNKNOWN
        assert frame.window_size <= 1 << ZSTD_LAYER_WINDOW_LOG
    assert (image.registry_digest, image.size) == (registry_digest, len(converted.raw))


def test_conversion_is_deterministic_in_two_fresh_stores(tmp_path: Path, fixture_set) -> None:
    digest = _image(fixture_set, "fixtures/socat").manifests[ARCH].digest
    one = to_zstd(_fresh(tmp_path, fixture_set, "fixtures/socat", name="one"), digest)
    two = to_zstd(_fresh(tmp_path, fixture_set, "fixtures/socat", name="two"), digest)
    assert one.digest == two.digest
    assert [la.descriptor for la in one.layers] == [la.descriptor for la in two.layers]


# -- memos ---------------------------------------------------------------------------------------

def test_memo_makes_a_second_conversion_convert_nothing(tmp_path: Path, fixture_set) -> None:
    store = _fresh(tmp_path, fixture_set, "fixtures/socat", "fixtures/busybox")
    socat = _image(fixture_set, "fixtures/socat").manifests[ARCH].digest
    busybox = _image(fixture_set, "fixtures/busybox").manifests[ARCH].digest
    first = to_zstd(store, socat)
    assert first.converted == 3
    again = to_zstd(store, socat)
    assert (again.converted, again.digest) == (0, first.digest)
    assert [la.descriptor for la in again.layers] == [la.descriptor for la in first.layers]
    # busybox's two layers are socat's first two: the layer memo converts them once.
    shared = to_zstd(store, busybox)
    assert shared.converted == 0
    assert [la.descriptor.digest for la in shared.layers] == [la.descriptor.digest for la in first.layers[:2]]


def _memo(store: Store, registry_digest: str) -> Path:
    return store.root / "derived" / f"zstd-{ZstdLayerParams().recipe}" / dg.hex_of(registry_digest)


def _layer_memo(store: Store, registry_layer: str) -> Path:
    return _memo(store, registry_layer).parent / "layers" / dg.hex_of(registry_layer)


def test_tampered_image_memo_is_ignored_and_the_work_redone(tmp_path: Path, fixture_set) -> None:
    store = _fresh(tmp_path, fixture_set, "fixtures/socat", "fixtures/busybox")
    socat = _image(fixture_set, "fixtures/socat").manifests[ARCH].digest
    busybox = _image(fixture_set, "fixtures/busybox").manifests[ARCH].digest
    good = to_zstd(store, socat)
    other = to_zstd(store, busybox)
    memo = _memo(store, socat)
    assert memo.read_text() == good.digest + "\n"
    # The same conversion but annotated as another registry manifest's (a crafted blob).
    doc = json.loads(store.read_bytes(good.digest))
    doc["annotations"][REGISTRY_MANIFEST] = busybox
    mislabelled = store.put_bytes(m.canonical_json(doc))
    # ... and another image's (valid, stored) conversion: another registry manifest and config.
    for text in ("not a digest\n", other.digest + "\n", mislabelled + "\n",
                 dg.of_bytes(b"gone") + "\n", f"{good.digest} {good.digest}\n"):
        memo.write_text(text)
        redone = to_zstd(store, socat)
        assert redone.digest == good.digest, text
        assert memo.read_text() == good.digest + "\n"  # rewritten
    # A converted manifest whose layer blob is gone: redone, and the blob is back.
    store.blob_path(good.layers[2].descriptor.digest).unlink()
    _layer_memo(store, good.layers[2].source).unlink()
    redone = to_zstd(store, socat)
    assert (redone.digest, redone.converted) == (good.digest, 1)
    assert store.has(good.layers[2].descriptor.digest)


def test_tampered_layer_memo_is_ignored_and_the_layer_redone(tmp_path: Path, fixture_set) -> None:
    store = _fresh(tmp_path, fixture_set, "fixtures/socat")
    socat = _image(fixture_set, "fixtures/socat").manifests[ARCH].digest
    good = to_zstd(store, socat)
    _memo(store, socat).unlink()
    base = good.layers[0]
    memo = _layer_memo(store, base.source)
    wrong_blob = good.layers[1].descriptor
    for text in (f"{wrong_blob.digest} {base.diff_id} {base.descriptor.size}\n",  # size differs
                 f"{base.descriptor.digest} {dg.of_bytes(b'x')} {base.descriptor.size}\n",  # other diff_id
                 "garbage\n"):
        memo.write_text(text)
        redone = to_zstd(store, socat)
        _memo(store, socat).unlink()
        assert redone.digest == good.digest, text
        assert [la.converted for la in redone.layers] == [True, False, False], text


# -- refusals ------------------------------------------------------------------------------------

def _forged(store: Store, registry_digest: str, diff_ids: list[str]) -> str:
    """The image with its config's diff_ids replaced. A real registry serves what it was pushed,
    so this is a unit-level fake of a broken or hostile image, made in the store."""
    manifest, config = load_image(store, registry_digest)
    doc = json.loads(config.raw)
    doc["rootfs"]["diff_ids"] = diff_ids
    raw = m.canonical_json(doc)
    config_digest = store.put_bytes(raw)
    out = json.loads(manifest.raw)
    out["config"] = {**out["config"], "digest": config_digest, "size": len(raw)}
    return store.put_bytes(m.canonical_json(out))


def test_layer_not_matching_its_diff_id_is_refused_naming_it(tmp_path: Path, fixture_set) -> None:
    store = _fresh(tmp_path, fixture_set, "fixtures/socat")
    socat = _image(fixture_set, "fixtures/socat").manifests[ARCH].digest
    manifest, config = load_image(store, socat)
    wrong = dg.of_bytes(b"not this layer")
    forged = _forged(store, socat, [config.diff_ids[0], wrong, config.diff_ids[2]])
    before = _blobs(store)
    with pytest.raises(DigestMismatch) as err:
        to_zstd(store, forged)
    text = str(err.value)
    assert f"image {forged} layer 1 ({manifest.layers[1].digest})" in text
    assert f"expected {wrong} (the config's rootfs.diff_ids entry), got {config.diff_ids[1]}" in text
    assert "hint: the registry served a broken or tampered image" in text
    # Layer 0 was converted (good, kept for next time); nothing of layer 1 and no manifest.
    assert len(_blobs(store) - before) == 1
    assert not _memo(store, forged).exists()
    assert not list((store.root / "tmp").iterdir())


def test_corrupt_gzip_layer_is_refused(tmp_path: Path) -> None:
    # A gzip blob cut short (a unit-level fake: a registry serves what it was pushed, whole).
    store = Store(tmp_path / "store")
    layer = write_layer(store, [FileEntry("bin/busybox", payloads.binary("busybox", ARCH))], EPOCH)
    cut = store.blob_path(layer.digest).read_bytes()[:-100]
    cut_digest = store.put_bytes(cut)
    desc = build_image(store, [layer], m.Platform.for_arch(ARCH), EPOCH)
    doc = json.loads(store.read_bytes(desc.digest))
    doc["layers"][0].update(digest=cut_digest, size=len(cut))
    manifest = store.put_bytes(m.canonical_json(doc))
    with pytest.raises(BuilderError, match=rf"image {manifest} layer 0 \({cut_digest}\): not a valid gzip stream"):
        to_zstd(store, manifest)


def test_uncompressed_layer_is_compressed_and_zstd_layer_kept(tmp_path: Path, fixture_set) -> None:
    store = _fresh(tmp_path, fixture_set, "fixtures/busybox")
    registry = _image(fixture_set, "fixtures/busybox").manifests[ARCH].digest
    converted = to_zstd(store, registry)
    # Re-converting the converted image keeps its zstd layers as they are.
    again = to_zstd(store, converted.digest)
    assert again.converted == 0
    assert [la.descriptor.digest for la in again.layers] == [la.descriptor.digest for la in converted.layers]
    # An image with an uncompressed tar layer (as `docker save` or a plain OCI layout hold them).
    manifest, config = load_image(store, registry)
    dctx = zstandard.ZstdDecompressor()
    tar = dctx.stream_reader(store.open(converted.layers[1].descriptor.digest)).read()
    tar_digest = store.put_bytes(tar)
    doc = json.loads(manifest.raw)
    doc["layers"][1].update(mediaType=m.OCI_LAYER, digest=tar_digest, size=len(tar))
    plain = store.put_bytes(m.canonical_json(doc))
    image = to_zstd(store, plain)
    assert image.layers[1].descriptor.digest == converted.layers[1].descriptor.digest
    assert image.layers[1].descriptor.annotations == {REGISTRY_LAYER: tar_digest}


def test_an_index_or_a_foreign_layer_is_refused(tmp_path: Path, fixture_set) -> None:
    store = _fresh(tmp_path, fixture_set, "fixtures/busybox")
    top = _image(fixture_set, "fixtures/busybox").top
    with fixture_set[0].open(top.digest) as fh:
        store.put_stream(fh, expected=top.digest)
    with pytest.raises(BuilderError, match="is an index, not an image manifest"):
        to_zstd(store, top.digest)
    manifest, _ = load_image(store, _image(fixture_set, "fixtures/busybox").manifests[ARCH].digest)
    doc = json.loads(manifest.raw)
    doc["layers"][0]["mediaType"] = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    foreign = store.put_bytes(m.canonical_json(doc))
    with pytest.raises(BuilderError, match=r"layer 0 .* has media type "
                                           r"'application/vnd.docker.image.rootfs.foreign"):
        to_zstd(store, foreign)


# -- real consumers --------------------------------------------------------------------------------

NAME = "registry.test/fixtures/socat:zstd"


@pytest.fixture
def converted_layout(tmp_path: Path, fixture_set) -> tuple[Path, Path, ConvertedImage]:
    """The converted socat image (busybox + socat layers) as an OCI layout directory and as a tar
    of it, carried the way the archive will carry it (the registry manifest as an extra blob)."""
    store = _fresh(tmp_path, fixture_set, "fixtures/socat")
    registry = _image(fixture_set, "fixtures/socat").manifests[ARCH].digest
    image = to_zstd(store, registry)
    layout = tmp_path / "layout"
    write_layout(store, [ArchiveImage(NAME, image.digest, m.Platform.for_arch(ARCH),
                                      extras=(registry,),
                                      annotations=((REGISTRY_MANIFEST, registry),))], layout)
    tar_path = tmp_path / "layout.tar"
    with tarfile.open(tar_path, "w") as tar:
        for entry in sorted(layout.rglob("*")):
            tar.add(entry, arcname=str(entry.relative_to(layout)), recursive=False)
    return layout, tar_path, image


def test_containerd_imports_and_runs_the_converted_image(
        converted_layout, containerd: Containerd) -> None:
    if host_arch() != ARCH:
        pytest.skip(f"the amd64 fixture image does not run on {platform.machine()}")
    _, tar_path, image = converted_layout
    imp = containerd.ctr("images", "import", str(tar_path), timeout=120)
    assert imp.returncode == 0, imp.stderr
    assert containerd.images().get(NAME) == image.digest
    run = containerd.ctr("run", "--rm", NAME, f"zstd-{os.getpid()}",
                         "/bin/busybox", "cat", "/etc/fixture-release", timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "airgap-builder fixture\n"


def test_podman_loads_the_converted_image(converted_layout, tmp_path: Path) -> None:
    _, tar_path, image = converted_layout
    with podman.private(tmp_path) as pm:
        load = pm.run("load", "-i", str(tar_path))
        assert load.returncode == 0, load.stderr
        inspect = pm.run("image", "inspect", NAME, timeout=60)
        assert inspect.returncode == 0, inspect.stderr
        assert json.loads(inspect.stdout)[0]["Id"] == dg.hex_of(image.config_digest)


def test_skopeo_copies_the_converted_layout(converted_layout, tmp_path: Path) -> None:
    layout, _, image = converted_layout
    out = tmp_path / "dir"
    copy = subprocess.run(["skopeo", "copy", f"oci:{layout}:zstd", f"dir:{out}"],
                          capture_output=True, text=True, timeout=120)
    assert copy.returncode == 0, copy.stderr
    manifest = json.loads((out / "manifest.json").read_bytes())
    assert hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest() == dg.hex_of(image.digest)
    assert [la["mediaType"] for la in manifest["layers"]] == [m.OCI_LAYER_ZSTD] * 3


def test_registry_blob_changed_on_disk_is_refused_with_the_store_repair_hint(
        tmp_path: Path, fixture_set) -> None:
    # The store really can be damaged on disk: the converter reads the gzip blob through the
    # store's verified reader, so it never compresses bytes the store did not verify.
    store = _fresh(tmp_path, fixture_set, "fixtures/busybox")
    registry = _image(fixture_set, "fixtures/busybox").manifests[ARCH].digest
    manifest, _ = load_image(store, registry)
    path = store.blob_path(manifest.layers[1].digest)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the gzip trailer's size field: decodes, but hashes differently
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    before = _blobs(store)
    with pytest.raises(StoreCorrupt) as err:
        to_zstd(store, registry)
    assert f"image {registry} layer 1 ({manifest.layers[1].digest}): store blob" in str(err.value)
    assert "store verify" in str(err.value)
    assert len(_blobs(store) - before) == 1  # layer 0's conversion; nothing of layer 1
    assert not _memo(store, registry).exists()
