"""The realistic update fixture itself (tests/plugins/releases.py ``update_pair``): between the
base release and its patch exactly one image differs, only in its top layer, and exactly one
runtime file differs, and both releases are signed releases of the same lock otherwise."""

from __future__ import annotations

import hashlib
import tarfile

import pytest

from builder.lock import lockfile
from builder.oci.archive import read_archive_index
from builder.oci.convert import REGISTRY_MANIFEST
from builder.store import Store
from builder.trust.verify import verify_release
from tests.plugins.releases import UpdatePair, archive_path, archived_manifests
from tests.rig import update

ARCHES = ("amd64", "arm64")


def _runtime_files(pair: UpdatePair, side: str, arch: str) -> dict[str, str]:
    """Path → sha256 of every file of the runtime image (its gzip layers in the store, as
    release.env names them)."""
    release = getattr(pair, side)[arch]
    store = Store(pair.store)
    out: dict[str, str] = {}
    for layer in release.env["RUNTIME_LAYERS"].split():
        with store.open(layer) as fh, tarfile.open(fileobj=fh, mode="r|gz") as tar:
            for member in tar:
                data = tar.extractfile(member) if member.isfile() else None
                if data is not None:
                    out[member.name] = hashlib.sha256(data.read()).hexdigest()
    return out


@pytest.mark.parametrize("arch", ARCHES)
def test_exactly_one_image_differs_in_its_top_layer_only(update_pair: UpdatePair,
                                                          arch: str) -> None:
    base, patch = update_pair.base[arch], update_pair.patch[arch]
    assert (base.version, patch.version) == ("v1.32.13+rke2r1", update.PATCH)
    assert base.groups == patch.groups and base.name == patch.name
    old = {n: d for g in base.groups for n, d in _manifests(update_pair, "base", arch, g).items()}
    new = {n: d for g in patch.groups for n, d in _manifests(update_pair, "patch", arch, g).items()}
    runtime = {base.runtime_ref, patch.runtime_ref}
    same = {n for n in old.keys() & new.keys() if old[n] == new[n]}
    assert set(old) - same - runtime == {update.OLD_REF}
    assert set(new) - same - runtime == {update.NEW_REF}
    layers_old, layers_new = update_pair.layers[arch]
    assert len(layers_old) == len(layers_new) == 3
    assert layers_old[:-1] == layers_new[:-1], "the lower layers are the base's"
    assert layers_old[-1] != layers_new[-1], "the top layer changed"
    assert update_pair.changed_layer(arch) == (layers_old[-1], layers_new[-1])
    # The lock's pin was resolved by `lock` from the rig's registry: the archive ships the image
    # converted (the zstd layer mode) and names that registry manifest in its annotation.
    pin = next(p for p in lockfile.load(update_pair.lock).images if p.ref == update.NEW_REF)
    assert pin.digest and new[update.NEW_REF][2] == pin.platforms[arch]
    print(f"{arch}: {update.NEW_REF} top layer {layers_old[-1][:19]} -> {layers_new[-1][:19]}")


def _manifests(pair: UpdatePair, side: str, arch: str, group: str) -> dict[str, tuple]:
    """Image name → (its layers, its registry manifest digest when converted) in one archive."""
    release = getattr(pair, side)[arch]
    archive = archive_path(release, group)
    pinned = {i.name: i.annotations.get(REGISTRY_MANIFEST) for i in read_archive_index(archive)}
    return {n: (tuple(d.digest for d in doc.layers), doc.config.digest, pinned.get(n))
            for n, doc in archived_manifests(archive).items()}


@pytest.mark.parametrize("arch", ARCHES)
def test_exactly_one_runtime_file_differs(update_pair: UpdatePair, arch: str) -> None:
    old = _runtime_files(update_pair, "base", arch)
    new = _runtime_files(update_pair, "patch", arch)
    assert old.keys() == new.keys()
    changed = {p for p in old if old[p] != new[p]}
    assert {p for p in changed if p.startswith("bin/")} == {f"bin/{update.BINARY}"}
    # Besides: every packed chart's HelmChart manifest, which carries the release's Kubernetes
    # version (kubeVersion, builder/assemble/charts.py, as upstream's build-chart.sh): a patch
    # bump changes them all. The lock's plain /charts file (fixture-chart.yaml) stays.
    assert changed - {f"bin/{update.BINARY}"} <= {p for p in old if p.startswith("charts/rke2-")}
    assert "charts/fixture-chart.yaml" not in changed
    got = new[f"bin/{update.BINARY}"]
    assert got == hashlib.sha256(update.new_binary(arch).read_bytes()).hexdigest()
    assert update_pair.patch[arch].runtime_file(update.BINARY) == update.new_binary(arch).read_bytes()


def test_both_releases_are_signed(update_pair: UpdatePair) -> None:
    for side in ("base", "patch"):
        for arch in ARCHES:
            release = getattr(update_pair, side)[arch]
            report = verify_release(release.directory, public_key=release.public_key,
                                    require_signature=True)
            assert report.passed, report.summary()
