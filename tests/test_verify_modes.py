"""`verify` of images shipped in the zstd layer mode (issue 14): the chain from a signature over
the registry digest to the converted image that ships (builder/trust/verify.check_converted).

Archives are written here by the real writer (builder.oci.archive.write_archive) from a store
holding the rig's fixture images (real Debian binaries) converted by builder.oci.convert.to_zstd,
each entry as the build writes it (the converted manifest, the registry manifest carried as an
extra blob, index.json annotated with its digest); a tampered one is the same with one blob or
annotation changed, as a compromised builder would leave it (every blob still hashes to its name,
so only the chain can tell). Each is read by verify's own archive check, in one streamed pass.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from builder.digest import of_file
from builder.oci import model as m
from builder.oci.archive import write_archive
from builder.oci.convert import REGISTRY_LAYER, REGISTRY_MANIFEST, ZstdLayerParams, to_zstd
from builder.oci.image import load_image
from builder.oci.layout import ArchiveImage
from builder.store import Store
from builder.trust import verify as vf
from tests.rig import cosign as rig_cosign
from tests.test_convert import _fresh, _image
from tests.test_cosign import (
    _fetch,
    _lock,
    signing,  # noqa: F401 (a fixture: pytest finds it by this name)
)
from tests.test_cosign import _image as _signed_image

ARCH = "amd64"
SOCAT, BUSYBOX = "fixtures/socat", "fixtures/busybox"
NAME = "docker.io/fixtures/socat:1.0"
OTHER = "docker.io/fixtures/busybox:1.0"


@pytest.fixture(scope="module")
def converted(tmp_path_factory, fixture_set) -> tuple[Store, dict[str, tuple[str, str]]]:
    """A store with socat and busybox, both converted: repository -> (registry, converted)."""
    store = _fresh(tmp_path_factory.mktemp("modes"), fixture_set, SOCAT, BUSYBOX)
    digests = {}
    for repo in (SOCAT, BUSYBOX):
        registry = _image(fixture_set, repo).manifests[ARCH].digest
        digests[repo] = (registry, to_zstd(store, registry).digest)
    return store, digests


def _entry(name: str, manifest: str, registry: str, extras: tuple[str, ...] | None = None,
           notes: tuple[tuple[str, str], ...] = ()) -> ArchiveImage:
    """An index.json entry as images.plan writes one in the zstd mode."""
    return ArchiveImage(name, manifest, m.Platform.for_arch(ARCH),
                        (registry,) if extras is None else extras,
                        ((REGISTRY_MANIFEST, registry), *notes))


def _problems(store: Store, tmp_path: Path, *images: ArchiveImage) -> list[str]:
    out = tmp_path / "images.tar"
    write_archive(store, images, out, 0)
    report = vf.VerifyReport(tmp_path)
    vf._check_archive(out, ARCH, of_file(out)[0].removeprefix("sha256:"), report)
    return [str(p) for p in report.problems]


def _edited(store: Store, manifest: str, edit: Callable[[dict], None]) -> str:
    """A converted manifest with ``edit`` applied, stored; its digest."""
    doc = json.loads(store.read_bytes(manifest))
    edit(doc)
    return store.put_bytes(m.canonical_json(doc))


def _tar(store: Store, zstd_layer: str) -> bytes:
    return zstandard.ZstdDecompressor().stream_reader(store.read_bytes(zstd_layer)).read()


def _zstd(data: bytes, window_log: int = 25) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=window_log, write_checksum=True, write_content_size=False)
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(buf, closefd=False) as z:
        z.write(data)
    return buf.getvalue()


def _with_layer0(store: Store, manifest: str, blob: bytes) -> tuple[str, str]:
    """The converted manifest with layer 0 replaced by ``blob``: (manifest, layer digest)."""
    layer = store.put_bytes(blob)

    def edit(doc: dict) -> None:
        doc["layers"][0].update(digest=layer, size=len(blob))
    return _edited(store, manifest, edit), layer


def test_untampered_zstd_archive_passes_beside_a_registry_mode_image(converted, tmp_path) -> None:
    store, d = converted
    socat_registry, socat = d[SOCAT]
    busybox_registry, _ = d[BUSYBOX]
    assert _problems(store, tmp_path, _entry(NAME, socat, socat_registry),
                     ArchiveImage(OTHER, busybox_registry, m.Platform.for_arch(ARCH))) == []


def test_layer_that_decodes_to_other_bytes_is_refused(converted, tmp_path) -> None:
    store, d = converted
    registry, socat = d[SOCAT]
    _, config = load_image(store, registry)
    layer0 = load_image(store, socat)[0].layers[0].digest
    other = _tar(store, layer0) + b"\0" * 1024  # one more tar end record: other bytes
    manifest, layer = _with_layer0(store, socat, _zstd(other))
    assert _problems(store, tmp_path, _entry(NAME, manifest, registry)) == [
        f"images.tar: {NAME}: layer 0 ({layer}): decompresses to "
        f"sha256:{hashlib.sha256(other).hexdigest()}, expected {config.diff_ids[0]} "
        "(the config's rootfs.diff_ids[0])"]


def test_layer_with_a_window_the_rke2_decoder_refuses(converted, tmp_path) -> None:
    store, d = converted
    registry, socat = d[SOCAT]
    same = _tar(store, load_image(store, socat)[0].layers[0].digest)  # the right diff_id
    manifest, layer = _with_layer0(store, socat, _zstd(same, window_log=27))
    assert _problems(store, tmp_path, _entry(NAME, manifest, registry)) == [
        f"images.tar: {NAME}: layer 0 ({layer}): its zstd frame needs a 134217728-byte window "
        "(2**27), more than the 33554432 (2**25) the rke2/k3s decoder accepts"]


def test_carried_registry_manifest_swapped_for_another_images(converted, tmp_path) -> None:
    store, d = converted
    socat_registry, socat = d[SOCAT]
    busybox_registry, _ = d[BUSYBOX]
    # index.json names busybox's registry manifest (carried), the converted socat says socat's
    assert _problems(store, tmp_path, _entry(NAME, socat, busybox_registry)) == [
        f"images.tar: {NAME}: converted manifest {socat} was converted from {socat_registry}, "
        f"index.json says from {busybox_registry}"]
    # ... and with the converted manifest's own annotation rewritten to match: the configs differ
    relabelled = _edited(store, socat, lambda doc: doc["annotations"].update(
        {REGISTRY_MANIFEST: busybox_registry}))
    socat_config = load_image(store, socat_registry)[0].config.digest
    busybox_config = load_image(store, busybox_registry)[0].config.digest
    assert _problems(store, tmp_path, _entry(NAME, relabelled, busybox_registry)) == [
        f"images.tar: {NAME}: converted manifest {relabelled} names config {socat_config}, "
        f"the registry manifest {busybox_registry} names {busybox_config}"]


def test_registry_manifest_posing_as_a_converted_one(converted, tmp_path) -> None:
    """index.json's entry names the registry manifest itself as the converted image."""
    store, d = converted
    registry, _ = d[SOCAT]
    assert _problems(store, tmp_path, _entry(NAME, registry, registry)) == [
        f"images.tar: {NAME}: manifest {registry} names no registry manifest (no "
        f"{REGISTRY_MANIFEST} annotation): not a converted image, though index.json says it was "
        f"converted from {registry}"]


def test_converted_manifest_pointing_at_another_config(converted, tmp_path) -> None:
    """Another config with as many diff_ids (the writer refuses any other count): socat's own
    with one more field, as an attacker would change an image's command or environment."""
    store, d = converted
    registry, socat = d[SOCAT]
    mine = load_image(store, registry)[0].config.digest
    doc = json.loads(store.read_bytes(mine))
    raw = m.canonical_json({**doc, "author": "someone else"})
    other = store.put_bytes(raw)

    def edit(doc: dict) -> None:
        doc["config"].update(digest=other, size=len(raw))
    manifest = _edited(store, socat, edit)
    assert _problems(store, tmp_path, _entry(NAME, manifest, registry)) == [
        f"images.tar: {NAME}: converted manifest {manifest} names config {other}, "
        f"the registry manifest {registry} names {mine}"]


def test_layer_annotation_naming_another_gzip_blob(converted, tmp_path) -> None:
    store, d = converted
    registry, socat = d[SOCAT]
    own = load_image(store, registry)[0].layers[0].digest
    # (socat is built on busybox: their first layers are one blob)
    elsewhere = next(la.digest for la in load_image(store, d[BUSYBOX][0])[0].layers
                     if la.digest != own)
    manifest = _edited(store, socat, lambda doc: doc["layers"][0]["annotations"].update(
        {REGISTRY_LAYER: elsewhere}))
    layer = load_image(store, socat)[0].layers[0].digest
    assert _problems(store, tmp_path, _entry(NAME, manifest, registry)) == [
        f"images.tar: {NAME}: layer 0 ({layer}): annotation {REGISTRY_LAYER} is {elsewhere}, "
        f"expected {own} (layer 0 of the registry manifest {registry})"]


def test_missing_carried_registry_manifest(converted, tmp_path) -> None:
    store, d = converted
    registry, socat = d[SOCAT]
    assert _problems(store, tmp_path, _entry(NAME, socat, registry, extras=())) == [
        f"images.tar: {NAME}: carried registry manifest ({REGISTRY_MANIFEST}) {registry} is not "
        "in the archive"]


def test_gzip_layer_in_a_converted_image_is_refused(converted, tmp_path) -> None:
    """A converted manifest whose layer is the registry's gzip blob, relabelled tar+zstd."""
    store, d = converted
    registry, socat = d[SOCAT]
    gz = load_image(store, registry)[0].layers[0]

    def edit(doc: dict) -> None:
        doc["layers"][0].update(digest=gz.digest, size=gz.size)
    manifest = _edited(store, socat, edit)
    assert _problems(store, tmp_path, _entry(NAME, manifest, registry)) == [
        f"images.tar: {NAME}: layer 0 ({gz.digest}): not a zstd stream (no zstd frame at its "
        "start)"]


def test_cosign_signed_image_passes_in_the_zstd_mode(signing, tmp_path) -> None:  # noqa: F811
    """A real signature (tests/rig/cosign.py, in the rig's registry) over the registry digest,
    fetched and checked as `fetch` does, carried by the converted image: verify ties it to what
    ships through the registry manifest. The same signature on a converted image that claims
    another registry manifest does not vouch for it."""
    setup, publisher, good, _other, _keys = signing
    pin, ref = _signed_image(signing, "zstd-signed")
    rig_cosign.sign_image(setup.client(anonymous=True), publisher, good, ref, pin.digest)
    report = _fetch(signing, _lock(signing, pin, good.public_pem), tmp_path)
    [sig] = report.signatures
    store = Store(tmp_path / "store")
    converted = to_zstd(store, pin.digest, ZstdLayerParams())
    entry = _entry(pin.ref, converted.digest, pin.digest, (pin.digest, *sig.blobs),
                   sig.annotations())
    assert _problems(store, tmp_path, entry) == []
    # the signed digest is the registry's: a converted entry naming another registry manifest
    # (here its own converted digest) is not what the signature covers
    forged = _entry(pin.ref, converted.digest, converted.digest, (*sig.blobs,), sig.annotations())
    found = _problems(store, tmp_path, forged)
    assert f"images.tar: {pin.ref}: signed digest {pin.digest} is neither {converted.digest} " \
           "nor an index in the archive listing it" in found, found
