"""The runtime image's layers are content-addressed (builder/assemble/runtime.py), so a delta
release carries only the runtime files that changed.

One layer per component file (``bin/TARGET`` then ``charts/TARGET``, the lock's order), then one
with the generated HelmChart manifests; every header at mtime 0, so a component's layer is the
same blob in every release that ships the same file. The supervisor extracts every layer of the
image in order (rancher/rke2 v1.32.13+rke2r1 ``pkg/bootstrap/bootstrap.go`` Stage →
rancher/wharfie v0.6.9 ``pkg/extract/extract.go`` ExtractDirs → go-containerregistry v0.20.2
``pkg/v1/mutate/mutate.go`` extract, which walks ``img.Layers()`` top-down and keeps the first
entry per name); install.sh's stage_runtime extracts RUNTIME_LAYERS in order, and
tests/test_install.py checks the staged files against the real binaries.

Real releases and a real store only: ``update_pair`` (tests/plugins/releases.py: base v1 and its
patch, where bin/kubectl is other real bytes) and runtime.build run on the session's lock and
store (``fetched``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from builder.assemble import charts, runtime
from builder.assemble.delta import write_delta
from builder.errors import BuilderError
from builder.lock import lockfile as L
from builder.oci import image as oci_image
from builder.oci import model as m
from builder.oci.layer import FileEntry, write_layer
from builder.store import Store
from builder.trust import delta as d
from tests.plugins.built import Built
from tests.plugins.install import SHELLS, Target, ok
from tests.plugins.releases import Release, UpdatePair, variant

ARCHES = ("amd64", "arm64")


def _members(store: Store, layer: str) -> list[tarfile.TarInfo]:
    with store.open(layer) as fh, tarfile.open(fileobj=fh, mode="r|gz") as tar:
        return list(tar)


def _files(store: Store, layers: list[str]) -> dict[str, list[str]]:
    """Layer digest → the names of its regular files."""
    return {layer: [i.name for i in _members(store, layer) if i.isfile()] for layer in layers}


def _layers(release: Release) -> list[str]:
    return release.env["RUNTIME_LAYERS"].split()


@pytest.mark.parametrize("arch", ARCHES)
def test_one_layer_per_component_file_then_the_manifests(update_pair: UpdatePair, arch: str):
    """The patch's runtime: a layer per component file in the lock's order (its directory and
    its file), then the manifests; every header at mtime 0, owner 0/0, directories alike in
    every layer (so extraction order never matters)."""
    patch = update_pair.patch[arch]
    store = Store(update_pair.store)
    lock = L.load(update_pair.lock)
    assert lock.runtime is not None
    layers = _layers(patch)
    want = [f"bin/{lock.components[n].target}" for n in lock.runtime.bin] + \
        [f"charts/{lock.components[n].target}" for n in lock.runtime.charts]
    files = _files(store, layers)
    assert [files[la] for la in layers[:-1]] == [[w] for w in want]
    assert sorted(files[layers[-1]]) == sorted(f"charts/{c}.yaml" for c in lock.charts)
    dirs = set()
    for layer in layers:
        members = _members(store, layer)
        top = members[-1].name.split("/")[0]
        assert [i.name for i in members if i.isdir()] == [top], layer
        for info in members:
            assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (0, 0, 0, "", ""), info.name
            if info.isdir():
                dirs.add((info.name, info.mode, info.mtime, info.type))
    assert dirs == {("bin", 0o755, 0, tarfile.DIRTYPE), ("charts", 0o755, 0, tarfile.DIRTYPE)}
    # The manifest names them in that order; the config's diff_ids match, one per layer.
    manifest, config = oci_image.load_image(store, patch.env["RUNTIME_MANIFEST"])
    assert [la.digest for la in manifest.layers] == layers
    assert len(config.diff_ids) == len(layers)


@pytest.mark.parametrize("arch", ARCHES)
def test_a_patch_carries_only_the_changed_binarys_runtime_layer(update_pair: UpdatePair,
                                                               tmp_path: Path, arch: str):
    """Only bin/kubectl changed between base and patch: its layer is the one runtime component
    layer the patch does not share with the base (the others are the base's very blobs, the
    release epoch and version notwithstanding), and the delta carries it and the manifests
    layer (the HelmChart manifests carry the Kubernetes version, v1.32.13 -> v1.32.14) while
    every other runtime layer comes from the base archive."""
    base, patch = update_pair.base[arch], update_pair.patch[arch]
    store = Store(update_pair.store)
    old, new = _layers(base), _layers(patch)
    out = tmp_path / "delta"
    report = write_delta(patch.directory, base.directory, out, [arch], store, patch.name,
                         patch.version)
    figures = report.arches[0]
    print(f"\n{arch}: image archives {figures.full} bytes full, {figures.delta} bytes delta "
          f"({100 * figures.delta / figures.full:.1f}%); runtime {len(new)} layer(s), "
          f"{sum(store.size(la) for la in new)} bytes\n{report.summary()}")

    files = _files(store, new)
    kubectl = next(la for la in new if files[la] == [f"bin/{update_pair.binary}"])
    at, manifests = new.index(kubectl), new[-1]
    assert set(new) - set(old) == {kubectl, manifests}
    assert new[:-1] == old[:at] + [kubectl] + old[at + 1:-1]
    desc = d.parse((out / f"delta.linux-{arch}.txt").read_bytes(), "delta description")
    carried: set[str] = set()
    from_base: set[str] = set()
    for archive in desc.archives:
        for p in archive.pieces:
            if p.label in new:
                (carried if p.source == d.DELTA else from_base).add(p.label)
    assert carried == {kubectl, manifests}
    assert from_base == set(new) - {kubectl, manifests}
    print(f"carried: bin/{update_pair.binary} {store.size(kubectl)} bytes, manifests "
          f"{store.size(manifests)} bytes")


@pytest.mark.parametrize("shell", SHELLS)
def test_install_sh_stages_every_layer(update_pair: UpdatePair, scratch_target: Target,
                                       shell: str):
    """install.sh extracts each of RUNTIME_LAYERS in order into data/KEY: the staged tree is
    exactly the layers' files, each with its bytes and mode (bin/kubectl the patch's binary)."""
    patch = update_pair.patch["amd64"]
    store = Store(update_pair.store)
    want: dict[str, tuple[bytes, int]] = {}
    assert len(_layers(patch)) > 2
    for layer in _layers(patch):
        with store.open(layer) as fh, tarfile.open(fileobj=fh, mode="r|gz") as tar:
            for info in tar:
                data = tar.extractfile(info) if info.isfile() else None
                if data is not None:
                    want[info.name] = (data.read(), info.mode)
    ok(scratch_target.install(patch, shell))
    key_dir = scratch_target.data_dir() / "data" / patch.data_key
    got = {str(p.relative_to(key_dir)): (p.read_bytes(), p.stat().st_mode & 0o7777)
           for p in key_dir.rglob("*") if p.is_file() and p.name != ".extracted"}
    assert got == want
    assert want[f"bin/{update_pair.binary}"][0] == patch.runtime_file(update_pair.binary)


def _small_lock(fetched: Built, version: str) -> L.Lock:
    return variant(version)(L.load(fetched.lock))


def test_a_component_layer_depends_only_on_its_file(fetched: Built):
    """Another release epoch and version: the same component layers (the very blobs), while
    the config (created, version labels) and the manifests (kubeVersion, packed charts' times)
    change."""
    store = Store(fetched.store)
    one = runtime.build(_small_lock(fetched, "v1.32.13+rke2r1"), "amd64", store, 1_700_000_000)
    two = runtime.build(_small_lock(fetched, "v1.33.9+rke2r1"), "amd64", store, 1_800_000_000)
    lock = _small_lock(fetched, "v1.32.13+rke2r1")
    assert lock.runtime is not None
    assert len(one.layers) == len(lock.runtime.bin) + len(lock.runtime.charts) + 1
    assert one.layers[:-1] == two.layers[:-1]
    assert one.layers[-1] != two.layers[-1] and one.manifest.digest != two.manifest.digest


def test_a_path_given_twice_is_refused_and_a_component_listed_twice_is_one_layer(fetched: Built):
    """As in the one-layer image: two components with one target but other bytes are refused
    (in separate layers the top one would silently win); one component listed twice is packed
    once."""
    lock = _small_lock(fetched, "v1.32.13+rke2r1")
    assert lock.runtime is not None
    store = Store(fetched.store)
    socat = dataclasses.replace(lock.components["socat"], target="kubectl")
    clash = dataclasses.replace(lock, components={**lock.components, "socat": socat})
    with pytest.raises(BuilderError, match="layer: bin/kubectl is given twice with different "
                                           "content or mode"):
        runtime.build(clash, "amd64", store, 1_700_000_000)
    twice = dataclasses.replace(lock, runtime=dataclasses.replace(lock.runtime,
                                                                  bin=("runc", "runc")))
    image = runtime.build(twice, "amd64", store, 1_700_000_000)
    packed = _files(store, list(image.layers[:-1])).values()
    assert [f for f in packed if f[0].startswith("bin/")] == [["bin/runc"]]


def test_a_runtime_cached_by_the_one_layer_recipe_is_not_reused(fetched: Built):
    """A store holding the runtime an older builder cached (recipe v1: one layer at the epoch,
    keyed as runtime.py keyed it then) builds the layered image instead of reusing it."""
    lock = _small_lock(fetched, "v1.31.0+rke2r1")  # a version no other test builds
    store, epoch = Store(fetched.store), 1_600_000_000
    files, _ = runtime._entries(lock, "amd64", store)
    made = charts.manifests(lock, store, epoch)
    platform = m.Platform.for_arch("amd64")
    old_recipe = hashlib.sha256(json.dumps(  # runtime.py's recipe before the layers (v1)
        {"v": 1, "files": [f[:3] for f in files], "epoch": epoch, "labels": runtime.labels(lock),
         "platform": str(platform),
         "charts": [(c.path, hashlib.sha256(c.data).hexdigest()) for c in made]},
        sort_keys=True).encode()).hexdigest()
    entries = [runtime.store_file(store, *f) for f in files]
    entries += [FileEntry(c.path, c.data, 0o644) for c in made]
    one = oci_image.build_image(store, [write_layer(store, entries, epoch)], platform, epoch,
                                runtime.labels(lock))
    store.index_put("runtime", old_recipe, one.digest)
    image = runtime.build(lock, "amd64", store, epoch)
    assert image.manifest.digest != one.digest and len(image.layers) == len(files) + 1
