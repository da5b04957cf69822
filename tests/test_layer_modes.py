"""The layer modes (issue 14) on real builds: lock variants of the session's lock built from its
store (tests/plugins/releases.py), read back by every consumer — verify, scan's targets, the
supervisor's runtime lookup, containerd 1.6 (import and run), podman, skopeo and install.sh.

- ``zstd``: the default (no ``release.layers``), every pulled image converted;
- ``registry``: ``release.layers: registry``, the registry's blobs and digests as before;
- ``override``: zstd, with ``release.groups.core.layers: registry``.

Measured on the shared 2-core build machine (the session fixture images: busybox, socat and a
Docker-schema busybox; 3 distinct layers per arch, 2.1 MiB of gzip for both arches), converting
the images of both arches from a fresh store, images.convert in a process of its own, twice each:
1 worker 2.4 s / 1.9 s wall, peak RSS 119 MiB; 2 workers 2.3 s / 2.3 s, 203 MiB (a second set of
level-19 tables, even for layers this small). Two workers break the 200 MiB budget for no gain in
wall time, so images.CONVERT_WORKERS is 1 (the other core packs and hashes meanwhile).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import platform
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from builder import artifacts
from builder.assemble import images as images_mod
from builder.lock import lockfile as L
from builder.oci import compress
from builder.oci import model as m
from builder.oci.convert import REGISTRY_MANIFEST, ZstdLayerParams, to_zstd
from builder.progress import Reporter
from builder.scan.release import release_targets
from builder.store import Store
from builder.trust.verify import verify_release
from tests.plugins.built import EPOCH, Built
from tests.plugins.install import Target, ok
from tests.plugins.oci import Containerd, host_arch
from tests.plugins.releases import V1, Release, build_variant, one_arch, variant
from tests.rig import podman
from tests.test_convert import _copy_image

ARCHES = ("amd64", "arm64")
RUNTIME = "docker.io/rancher/rke2-runtime"
REF_SOCAT = "docker.io/rancher/fixture-socat:1.7.4"


def _with_layers(layers: L.LayerMode | None, groups: dict | None = None) -> Callable[[L.Lock], L.Lock]:
    small = variant(V1)

    def change(lock: L.Lock) -> L.Lock:
        lock = small(lock)
        return dataclasses.replace(lock, release=dataclasses.replace(
            lock.release, layers=layers, group_layers=groups or {}))
    return change


@pytest.fixture(scope="module")
def modes(fetched: Built, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three builds of the session's lock variant, one per layer mode (see the module docstring)."""
    base = tmp_path_factory.mktemp("modes")
    return {
        "zstd": build_variant(fetched, base / "zstd", change=_with_layers(None)),
        "registry": build_variant(fetched, base / "registry", change=_with_layers("registry")),
        "override": build_variant(fetched, base / "override", arches=("amd64",),
                                  change=_with_layers(None, {"core": "registry"})),
    }


def _lock(out: Path) -> L.Lock:
    return L.load(out.parent / f"{out.name}.lock")


def _archive(out: Path, arch: str, group: str | None) -> Path:
    return out / f"{artifacts.images_base('rke2', arch, group)}.tar.zst"


def _members(path: Path) -> dict[str, bytes]:
    """Every file of an image archive (.tar.zst), decompressed in memory (the fixtures are small)."""
    # Every frame (an archive is a frame per tar segment: builder/oci/framed.py).
    with open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True) as raw, \
            tarfile.open(fileobj=raw, mode="r|") as tar:
        return {i.name: tar.extractfile(i).read() for i in tar if i.isfile()}  # type: ignore[union-attr]


def _index(files: dict[str, bytes]) -> list[dict]:
    return json.loads(files["index.json"])["manifests"]


def _blob(files: dict[str, bytes], digest: str) -> dict:
    return json.loads(files[f"blobs/sha256/{digest.split(':')[1]}"])


def _pins(lock: L.Lock, arch: str) -> dict[str, str]:
    return {i.ref: digest for i in lock.images_for(arch) if (digest := i.platforms.get(arch))}


def _ref(entry: dict) -> str:
    return entry["annotations"]["io.containerd.image.name"]


def _old_registry_recipe(p: images_mod.ArchivePlan, epoch: int) -> str:
    """ArchivePlan.recipe as it was before the layer modes (a registry archive's must gain no
    layer-mode key), at the framed archives' version (issue 15: "v" 2, every archive rebuilt)."""
    data: dict = {"v": 2, "epoch": epoch,
                  "images": [(i.name, i.manifest_digest, str(i.platform)) for i in p.images],
                  "zstd": [compress.ZSTD_LEVEL, compress.ZSTD_WINDOW_LOG], "gzip": list(compress.GZIP_SCHEME)}
    carried = [(i.extras, i.annotations) for i in p.images if i.extras]
    if carried:
        data["carried"] = carried
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# -- what each mode ships ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHES)
def test_registry_mode_ships_the_lock_pins_with_the_recipe_of_before(modes, fetched: Built, arch: str) -> None:
    out = modes["registry"]
    lock = _lock(out)
    pins = _pins(lock, arch)
    for p in images_mod.plan(lock, arch, None, store=Store(fetched.store)):
        assert p.mode == "registry" and p.recipe(int(EPOCH)) == _old_registry_recipe(p, int(EPOCH))
        index = _index(_members(_archive(out, arch, p.group)))
        for entry in index:
            if _ref(entry).startswith(RUNTIME):
                continue
            assert entry["digest"] == pins[_ref(entry)], _ref(entry)
            assert REGISTRY_MANIFEST not in entry["annotations"]


@pytest.mark.parametrize("arch", ARCHES)
def test_zstd_mode_ships_converted_images_that_name_their_registry_manifest(modes, fetched: Built,
                                                                           arch: str) -> None:
    out = modes["zstd"]
    pins = _pins(_lock(out), arch)
    store = Store(fetched.store)
    for group in (None, "core", "canal", "multus"):
        files = _members(_archive(out, arch, group))
        index = _index(files)
        assert index
        for entry in index:
            manifest = _blob(files, entry["digest"])
            types = {la["mediaType"] for la in manifest["layers"]}
            if _ref(entry).startswith(RUNTIME):  # ours, staged by install.sh: gzip in every mode
                assert types == {m.OCI_LAYER_GZIP}
                continue
            registry = pins[_ref(entry)]
            assert entry["digest"] != registry
            assert entry["annotations"][REGISTRY_MANIFEST] == registry
            assert manifest["annotations"][REGISTRY_MANIFEST] == registry
            assert types == {m.OCI_LAYER_ZSTD}
            # The registry manifest travels in the archive; the config is the registry's own.
            carried = _blob(files, registry)
            assert manifest["config"]["digest"] == carried["config"]["digest"]
            assert files[f"blobs/sha256/{registry.split(':')[1]}"] == store.read_bytes(registry)


def test_group_override_ships_its_group_in_the_registry_form(modes) -> None:
    out = modes["override"]
    pins = _pins(_lock(out), "amd64")
    for group, converted in ((None, True), ("core", False), ("canal", True), ("multus", True)):
        for entry in _index(_members(_archive(out, "amd64", group))):
            if _ref(entry).startswith(RUNTIME):
                continue
            assert (entry["digest"] != pins[_ref(entry)]) is converted, (group, _ref(entry))
    # The registry-mode group archive is the very archive the registry mode builds.
    core = _archive(out, "amd64", "core")
    assert core.read_bytes() == _archive(modes["registry"], "amd64", "core").read_bytes()


def test_zstd_recipe_names_the_mode_and_the_layer_parameters(modes, fetched: Built) -> None:
    lock = _lock(modes["zstd"])
    plans = images_mod.plan(lock, "amd64", None, store=Store(fetched.store))
    assert {p.mode for p in plans} == {"zstd"}
    p = plans[0]
    as_registry = dataclasses.replace(p, mode="registry")
    assert p.recipe(1) != as_registry.recipe(1)
    assert ZstdLayerParams().recipe.startswith("l19-w25-zstd")


def test_zstd_archives_are_smaller_than_the_registry_ones(modes) -> None:
    for arch in ARCHES:
        for group in (None, "canal"):
            zstd, registry = (_archive(modes[k], arch, group).stat().st_size for k in ("zstd", "registry"))
            assert zstd < registry, (arch, group, zstd, registry)


# -- the consumers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHES)
def test_verify_passes_on_the_zstd_release_and_finds_the_runtime(modes, arch: str) -> None:
    report = verify_release(modes["zstd"], [arch])
    assert report.passed, report.summary()
    # The supervisor's lookup (builder/trust/runtime_lookup.py) finds the runtime in the zstd
    # archives that hold it: the all-in-one and core's.
    held = [h.split(" ")[0] for h in report.runtime[arch]]
    assert sorted(held) == sorted(f"{artifacts.images_base('rke2', arch, g)}{suffix}"
                                  for g in (None, "core") for suffix in artifacts.IMAGE_ARCHIVE_SUFFIXES)


def _scan_vulnerable(fetched: Built, mode: L.LayerMode, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """Build the lock variant in ``mode`` with test_scan_release's planted vulnerable image
    (a dpkg status naming a vulnerable package, in a layer of its own) and `scan` it with real
    Trivy and the rig's DB: (what scan said, {image: shipped digest} of its targets)."""
    from tests.test_scan_release import VULNERABLE, _db, _vulnerable_image
    index, platforms = _vulnerable_image(Store(fetched.store))
    pin = L.ImagePin(VULNERABLE, ("canal",), index, dict(platforms.items()))
    add = _with_layers(mode)

    def change(lock: L.Lock) -> L.Lock:
        return dataclasses.replace(add(lock), images=(*lock.images, pin))
    out = build_variant(fetched, tmp_path / mode, arches=("amd64",), change=change)
    res = dataclasses.replace(fetched, lock=out.parent / f"{out.name}.lock").cli(
        "scan", "--arch", "amd64", "--artifacts", str(out), "--db", str(_db(tmp_path / f"db-{mode}")),
        check=False)
    assert res.returncode == 3, res.stdout + res.stderr  # the planted finding turns it red
    targets = release_targets(_lock(out), ("amd64",), Store(fetched.store), out,
                              tmp_path / f"targets-{mode}", int(EPOCH))
    return res.stdout + res.stderr, {t.name: t.digest or "" for t in targets if t.kind == "image"}


def test_scan_reads_the_shipped_converted_images_and_finds_the_same_packages(
        fetched: Built, tmp_path: Path) -> None:
    from tests.test_scan_release import VULN_ID, VULN_PACKAGE, VULNERABLE
    said, shipped = {}, {}
    for mode in ("zstd", "registry"):
        said[mode], shipped[mode] = _scan_vulnerable(fetched, mode, tmp_path)
        assert VULN_ID in said[mode] and VULN_PACKAGE in said[mode] and VULNERABLE in said[mode]
    # Trivy found the package inside the zstd layer: the target was the converted image.
    zstd_archive = _archive(tmp_path / "zstd", "amd64", "canal")
    assert shipped["zstd"][VULNERABLE] == next(e["digest"] for e in _index(_members(zstd_archive))
                                               if _ref(e) == VULNERABLE)
    assert shipped["zstd"][VULNERABLE] != shipped["registry"][VULNERABLE]
    findings = {mode: sorted(line for line in text.splitlines() if VULN_ID in line)
                for mode, text in said.items()}
    assert findings["zstd"] == findings["registry"]


def test_containerd_imports_the_built_archive_and_runs_a_converted_image(
        modes, containerd: Containerd, tmp_path: Path) -> None:
    if host_arch() != "amd64":
        pytest.skip(f"the amd64 fixture images do not run on {platform.machine()}")
    archive = _archive(modes["zstd"], "amd64", "canal")
    tar_path = tmp_path / "canal.tar"
    with open(archive, "rb") as fh, open(tar_path, "wb") as dst:
        zstandard.ZstdDecompressor().copy_stream(fh, dst)
    imp = containerd.ctr("images", "import", str(tar_path), timeout=120)
    assert imp.returncode == 0, imp.stderr
    ref = next(_ref(e) for e in _index(_members(archive)) if "socat" in _ref(e))
    assert containerd.images()[ref] != _pins(_lock(modes["zstd"]), "amd64")[ref]
    run = containerd.ctr("run", "--rm", ref, f"modes-{os.getpid()}",
                         "/bin/busybox", "cat", "/etc/fixture-release", timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "airgap-builder fixture\n"


@pytest.fixture
def canal_tar(modes, tmp_path: Path) -> Path:
    tar_path = tmp_path / "canal.tar"
    with open(_archive(modes["zstd"], "amd64", "canal"), "rb") as fh, open(tar_path, "wb") as dst:
        zstandard.ZstdDecompressor().copy_stream(fh, dst)
    return tar_path


def test_podman_loads_the_built_zstd_archive(canal_tar: Path, tmp_path: Path) -> None:
    with podman.private(tmp_path) as pm:
        load = pm.run("load", "-i", str(canal_tar))
        assert load.returncode == 0, load.stderr
        assert "socat" in load.stdout + load.stderr


def test_skopeo_copies_from_the_built_zstd_archive(canal_tar: Path, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    layout.mkdir()
    with tarfile.open(canal_tar) as tar:
        tar.extractall(layout, filter="data")
    entry = next(e for e in json.loads((layout / "index.json").read_bytes())["manifests"]
                 if "socat" in _ref(e))
    out = tmp_path / "dir"
    tag = entry["annotations"]["org.opencontainers.image.ref.name"]  # what skopeo's oci: names
    copy = subprocess.run(["skopeo", "copy", f"oci:{layout}:{tag}", f"dir:{out}"],
                          capture_output=True, text=True, timeout=120)
    assert copy.returncode == 0, copy.stderr
    manifest = json.loads((out / "manifest.json").read_bytes())
    assert {la["mediaType"] for la in manifest["layers"]} == {m.OCI_LAYER_ZSTD}
    assert hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest() == entry["digest"].split(":")[1]


def test_install_sh_installs_the_zstd_release_and_stages_the_runtime(
        modes, scratch_target: Target, tmp_path: Path) -> None:
    release: Release = one_arch(modes["zstd"], "amd64", tmp_path / "release", None)
    ok(scratch_target.install(release, SKIP_SIGNATURE="true"))
    key_dir = scratch_target.data_dir() / "data" / release.data_key
    assert (key_dir / ".extracted").read_text() == f"{release.runtime_ref}\n"
    assert (key_dir / "bin" / "runc").read_bytes() == release.runtime_file("runc")
    archive = "rke2-images.linux-amd64.tar.zst"
    assert (scratch_target.images_dir() / archive).read_bytes() == release.path(archive).read_bytes()


# -- the conversion step -----------------------------------------------------------------------------

def test_convert_says_one_line_per_image_converted_and_nothing_from_memos_whatever_the_workers(
        fetched: Built, tmp_path: Path) -> None:
    lock = _with_layers(None)(L.load(fetched.lock))
    store = Store(tmp_path / "store")  # the images alone, no memos: every layer converted here
    for arch in ARCHES:
        for _, digest in images_mod.to_convert(lock, arch):
            _copy_image(Store(fetched.store), digest, store)
    stream = io.StringIO()
    images_mod.convert(lock, ARCHES, store, Reporter(stream=stream), workers=2)
    lines = stream.getvalue().splitlines()
    expected = {f"{ref} ({arch})" for arch in ARCHES for ref, _ in images_mod.to_convert(lock, arch)}
    assert {line.split(" to zstd layers")[0].removeprefix("converted ") for line in lines} == expected
    assert all(" -> " in line for line in lines), lines
    again = io.StringIO()
    images_mod.convert(lock, ARCHES, store, Reporter(stream=again))
    assert again.getvalue() == ""
    # Two workers wrote what the session's builds (one worker, another store) wrote.
    for arch in ARCHES:
        for _, digest in images_mod.to_convert(lock, arch):
            assert to_zstd(store, digest).digest == to_zstd(Store(fetched.store), digest).digest


def test_a_layer_not_matching_its_diff_id_stops_the_build_naming_the_image(
        fetched: Built, tmp_path: Path) -> None:
    """A real registry serves what it was pushed, so the broken image is forged in a store of its
    own (test_convert._forged): the build's conversion step names the image by reference and arch,
    the layer, expected vs got, and writes no artifact."""
    from builder.assemble.build import build
    from builder.errors import BuilderError
    from tests.test_convert import _forged
    lock = _with_layers(None)(L.load(fetched.lock))
    store = Store(tmp_path / "store")
    _copy_image(Store(fetched.store), _pins(lock, "amd64")[REF_SOCAT], store)
    socat = _pins(lock, "amd64")[REF_SOCAT]
    config = json.loads(store.read_bytes(json.loads(store.read_bytes(socat))["config"]["digest"]))
    wrong = "sha256:" + "1" * 64
    forged = _forged(store, socat, [*config["rootfs"]["diff_ids"][:2], wrong])
    pin = L.ImagePin("docker.io/rancher/forged:1", ("canal",), forged, {"amd64": forged},
                     ("amd64",))
    lock = dataclasses.replace(lock, images=(pin,))
    with pytest.raises(BuilderError) as err:
        images_mod.convert(lock, ("amd64",), store, Reporter(quiet=True))
    text = str(err.value)
    assert text.startswith("docker.io/rancher/forged:1 (amd64): image ")
    assert "layer 2" in text and f"expected {wrong}" in text
    assert "hint: the registry served a broken or tampered image" in text
    out = tmp_path / "out"
    with pytest.raises(BuilderError) as err:
        build(lock, ("amd64",), store, out, Reporter(quiet=True), epoch=int(EPOCH))
    assert str(err.value) == text  # the build's conversion step, before anything is written
    assert not out.exists() or not any(out.iterdir())
