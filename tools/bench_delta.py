"""The delta section of `nox -s bench` (issue 15): a patch release carried as a delta, on the
bench's real bytes.

The base release: the loopback lock (tests/rig/loopback.py: the fixture images, charts and the
runtime of real Debian binaries; with ``small`` only socat and kubectl in the runtime) plus the
bench's images of real Debian packages (tools/bench_real.py, the 1× set), each made multi-arch
(the same layers under an amd64 and an arm64 manifest), built ``--cross`` and signed.
The patch, the same kind as tests/rig/update.py's (which serves it): one bench image gets a new
top layer over its unchanged lower layers (a real binary, as a rebuilt application's top layer
would hold), and bin/kubectl becomes another real binary; version v1.32.14+rke2r1. Its lock is
resolved by `lock` and fetched by `fetch` through the rig's loopback servers.

Measured per arch: the image archives (.tar.zst, .tar.gz) full vs delta, and the whole directory
an operator carries (every file of the arch: full release vs delta directory); the time of the
patch's full build, and of `build --since BASE` on top of it (a no-op rebuild plus writing the
delta); and, for the host's arch, install.sh into a temp root holding the base: the full
release vs the delta, and whether both leave the same files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from builder.artifacts import delta_archive_name
from builder.fetch.registry import RegistryClient
from builder.lock import lockfile as L
from builder.oci.image import load_image
from builder.oci.layer import FileEntry, Layer, write_layer
from builder.oci.reference import Reference
from builder.store import Store
from builder.trust import sign
from tests.plugins.install import upper
from tests.rig import loopback, payloads, update
from tests.rig.images import EPOCH, FixtureImage, multi_arch
from tools import bench_real as bench

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL_SH = REPO_ROOT / "install.sh"
BASE_VERSION = "v1.32.13+rke2r1"
BASE_TAG, PATCH_TAG = "v1.0.0", "v1.0.1"
ARCHES = payloads.ARCHES
SMALL_RUNTIME_BIN = ("socat", update.BINARY)


def layers_of(store: Store, manifest: str) -> list[Layer]:
    """The Layer records of an image in ``store`` (to put the same layers under another arch)."""
    doc, config = load_image(store, manifest)
    return [Layer(d.digest, diff, d.size, d.media_type)
            for d, diff in zip(doc.layers, config.diff_ids, strict=True)]


def every_arch(store: Store, repository: str, tag: str, layers: list[Layer]) -> FixtureImage:
    """An OCI index over one manifest per arch, all with ``layers`` (the rig's construction)."""
    return multi_arch(store, repository, tag, lambda _arch: layers, ARCHES, "oci", False)


def patched_top(store: Store, ref: str, small: bool) -> Layer:
    """The patch's new top layer: the image's marker file and a real binary (runc, or busybox
    when ``small``), what a rebuilt application's top layer holds."""
    binary = payloads.binary("busybox" if small else "runc", payloads.ARCHES[0])
    return write_layer(store, [
        FileEntry("etc/bench-image", f"{ref}\npatched\n".encode(), 0o644),
        FileEntry("usr/local/bin/app-fix", binary, 0o755),
    ], EPOCH)


def arch_files(directory: Path, arch: str) -> dict[str, int]:
    """Name → size of every file of ``arch`` in a release or delta directory."""
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir())
            if p.is_file() and (f"linux-{arch}." in p.name or p.name.startswith(f"sha256sum-{arch}."))}


def figures(full: Path, delta: Path, arch: str) -> dict[str, Any]:
    """Full vs delta bytes of one arch: .tar.zst and .tar.gz archives, the whole directory."""
    f, d = arch_files(full, arch), arch_files(delta, arch)

    def total(files: dict[str, int], suffix: str) -> int:
        return sum(size for name, size in files.items() if name.endswith(suffix) and "-images" in name)

    per_archive = {name: {"full": size, "delta": d.get(delta_archive_name(name), 0)}
                   for name, size in f.items() if name.endswith(".tar.zst") and "-images" in name}
    return {"archives_zst": per_archive,
            "tar_zst": {"full": total(f, ".tar.zst"), "delta": total(d, ".delta.tar.zst")},
            "tar_gz": {"full": total(f, ".tar.gz"), "delta": total(d, ".delta.tar.gz")},
            "directory": {"full": sum(f.values()), "delta": sum(d.values()),
                          "full_files": len(f), "delta_files": len(d)}}


def tree(root: Path) -> dict[str, str]:
    """Relative path → sha256 (files) or link target (symlinks): what an install left."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


class InstallFailed(RuntimeError):
    """install.sh exited non-zero; the message is its last error line."""


def install(media: Path, root: Path, arch: str, key: Path, name: str) -> float:
    """install.sh from ``media`` into ``root`` (prefix, data dir under it); its wall seconds."""
    up = upper(name)
    tmp = root / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ["PATH"], "TMPDIR": str(tmp), "HOME": str(tmp), "ARCH": arch,
           f"INSTALL_{up}_ARTIFACT_PATH": str(media), f"INSTALL_{up}_PUBLIC_KEY": str(key),
           f"INSTALL_{up}_TAR_PREFIX": str(root / "usr" / "local"),
           f"INSTALL_{up}_DATA_DIR": str(root / "var" / "lib" / "rancher" / name)}
    started = time.monotonic()
    proc = subprocess.run(["dash", str(INSTALL_SH)], env=env, cwd=tmp, capture_output=True,
                          text=True, timeout=900)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        lines = [x for x in proc.stderr.splitlines() if x.strip()] or [f"exit {proc.returncode}"]
        raise InstallFailed(f"install.sh from {media.name}/: {lines[-1]}")
    return seconds


def installs(base: Path, patch: Path, delta: Path, work: Path, arch: str, key: Path,
             name: str) -> dict[str, Any] | str:
    """Base installed, then the patch as a full release vs as a delta (each into its own temp
    root); or why not measured. A refused delta install is recorded with install.sh's error."""
    out: dict[str, Any] = {}
    trees = {}
    root = work / "root"  # the same path both times: installed files name their prefix
    for how, media in (("full", patch), ("delta", delta)):
        shutil.rmtree(root, ignore_errors=True)
        out[f"base_s_{how}"] = install(base, root, arch, key, name)
        try:
            out[f"{how}_s"] = install(media, root, arch, key, name)
        except InstallFailed as exc:
            if how == "full":
                raise
            return f"the delta install failed: {exc}"
        finally:
            trees[how] = {k: v for k, v in tree(root).items() if not k.startswith("tmp/")}
            shutil.rmtree(root, ignore_errors=True)
    out["same_files"] = trees["full"] == trees["delta"]
    out["files"] = len(trees["full"])
    out["differ"] = sorted(k for k in trees["full"].keys() | trees["delta"].keys()
                           if trees["full"].get(k) != trees["delta"].get(k))[:10]
    return out


def run(lb: loopback.Loopback, gen: Store, made: list[bench.BenchImage], work: Path,
        small: bool) -> dict[str, Any]:
    """The whole section (see the module docstring) on the bench's images ``made`` (in ``gen``,
    pushed to ``lb``'s registry by tools.bench_real)."""
    work.mkdir(parents=True, exist_ok=True)
    client = RegistryClient(mirrors=L.Mirrors(insecure=(lb.registry.host,)))
    pins, layers = [], {}
    for img in made:
        layers[img.recipe.repository] = layers_of(gen, img.manifest.digest)
        image = every_arch(gen, img.recipe.repository, BASE_TAG, layers[img.recipe.repository])
        client.push_tree(gen, Reference(lb.registry.host, image.repository, image.tag), image.top)
        pins.append(image.pin("docker.io", (bench.GROUP,)))
    base_lock = dataclasses.replace(lb.lock, release=dataclasses.replace(
        lb.lock.release, version=BASE_VERSION))
    if small and base_lock.runtime is not None:
        base_lock = dataclasses.replace(base_lock, runtime=dataclasses.replace(
            base_lock.runtime, bin=SMALL_RUNTIME_BIN))
    lock_path = bench.write_lock(base_lock, [*lb.lock.images, *pins], work / "base.lock", None)
    builder = bench.Builder(lb.mirrors_path, work / "logs")
    store, base_dir, patch_dir, delta_dir = (work / "store", work / "base", work / "patch",
                                             work / "delta")
    keys = sign.generate_key(work / "keys" / "release.key", passphrase=b"bench")
    key = sign.load_private_key(keys.private, b"bench")
    bench._progress(f"delta: base release {BASE_VERSION} (--cross, {len(made)} bench images)")
    builder.run("delta-fetch-base", lock_path, store, "fetch", "--cross")
    base_build, _ = builder.run("delta-build-base", lock_path, store, "build", "--cross",
                                "--artifacts", str(base_dir))
    sign.sign_checksums(base_dir, key)

    # The patch: the first bench image's top layer, and bin/kubectl (tests/rig/update.py).
    target = made[0].recipe.repository
    old_ref, new_ref = f"docker.io/{target}:{BASE_TAG}", f"docker.io/{target}:{PATCH_TAG}"
    top = patched_top(gen, new_ref, small)
    patch_lock = work / "patch.lock"
    with update.serving(work / "rig", ARCHES, fixture_image=False) as served:
        image = every_arch(gen, target, PATCH_TAG, [*layers[target][:-1], top])
        RegistryClient(mirrors=L.Mirrors(insecure=(served.registry.host,))).push_tree(
            gen, Reference(served.registry.host, target, PATCH_TAG), image.top)
        lock = update.patched_lock(L.load(lock_path), served, (old_ref, new_ref))
        L.save(dataclasses.replace(lock, path=None), patch_lock)
        near = bench.Builder(served.mirrors_path, work / "logs")
        bench._progress(f"delta: patch {update.PATCH}: lock and fetch {new_ref} and the new "
                        f"{update.BINARY}")
        near.run("delta-lock-patch", patch_lock, store, "lock")
        near.run("delta-fetch-patch", patch_lock, store, "fetch", "--cross")
    bench._progress("delta: the patch's full build, then build --since the base")
    full_build, _ = builder.run("delta-build-patch", patch_lock, store, "build", "--cross",
                                "--artifacts", str(patch_dir))
    since_build, log = builder.run("delta-build-since", patch_lock, store, "build", "--cross",
                                   "--artifacts", str(patch_dir), "--since", str(base_dir),
                                   "--delta-out", str(delta_dir))
    if not delta_dir.is_dir():
        raise RuntimeError(f"build --since wrote no {delta_dir} (see {log})")
    sign.sign_checksums(patch_dir, key)
    sign.sign_checksums(delta_dir, key)
    arch = bench.host_arch()
    bench._progress(f"delta: install.sh into a temp root ({arch}): full vs delta over the base")
    name = lock.release.name
    return {
        "base_version": BASE_VERSION, "version": update.PATCH, "images": len(made),
        "changed_image": new_ref, "changed_binary": update.BINARY,
        "top_layer_bytes": top.size, "small": small,
        "arches": {a: figures(patch_dir, delta_dir, a) for a in ARCHES},
        "build": {"base": dataclasses.asdict(base_build), "patch": dataclasses.asdict(full_build),
                  "since": dataclasses.asdict(since_build)},
        "install": installs(base_dir, patch_dir, delta_dir, work, arch, keys.public, name),
        "install_arch": arch,
    }


def table(d: dict[str, Any]) -> str:
    """The markdown table and notes of the section."""
    head = (f"### delta: {d['base_version']} → {d['version']} (one image's top layer: "
            f"{d['changed_image']}, {bench._mb(d['top_layer_bytes'])} gzip; one runtime binary: "
            f"bin/{d['changed_binary']})\n\n")
    cols = [f"{a} {k}" for a in d["arches"] for k in ("full", "delta", "delta/full")]
    rows = [f"| | {' | '.join(cols)} |", "|---" * (len(cols) + 1) + "|"]
    for label, key in (("image archives .tar.zst", "tar_zst"), ("image archives .tar.gz", "tar_gz"),
                       ("the directory an operator carries", "directory")):
        cells = []
        for f in d["arches"].values():
            full, delta = f[key]["full"], f[key]["delta"]
            cells += [bench._mb(full), bench._mb(delta), f"**{delta / full:.3f}×**" if full else "—"]
        rows.append(f"| {label} | {' | '.join(cells)} |")
    b = d["build"]
    notes = [f"- build (--cross): the patch's full build {b['patch']['wall_s']:.2f} s; `build --since "
             f"BASE` after it (no-op rebuild + the delta) {b['since']['wall_s']:.2f} s (base build "
             f"{b['base']['wall_s']:.2f} s)"]
    inst = d["install"]
    if isinstance(inst, dict):
        notes.append(f"- install.sh ({d['install_arch']}, dash, into a temp root holding the base): "
                     f"full release {inst['full_s']:.2f} s, delta {inst['delta_s']:.2f} s; the two "
                     f"leave {'the same' if inst['same_files'] else '**different**'} files "
                     f"({inst['files']})" + (f": {', '.join(inst['differ'])}" if inst["differ"] else ""))
    else:
        notes.append(f"- install not measured: {inst}")
    for arch, f in d["arches"].items():
        notes.append(f"- {arch} .tar.zst per archive, full → delta: " + ", ".join(
            f"{name} {bench._mb(x['full'])} → {bench._mb(x['delta'])}" for name, x in f["archives_zst"].items()))
    d_files = {a: f["directory"] for a, f in d["arches"].items()}
    notes.append("- the directory: every file of the arch (full: "
                 + ", ".join(f"{a} {x['full_files']} files" for a, x in d_files.items())
                 + "; delta: " + ", ".join(f"{a} {x['delta_files']} files" for a, x in d_files.items())
                 + "), both archive forms included")
    return head + "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n"
