"""`nox -s bench`: our release build against the upstream recipe, on real bytes (issue 14).

    python -m tools.bench_real [--quick] [--scales 1,4] [--images 5] [--image-mib 20]
                               [--modes registry,zstd,compact] [--repeat 1] [--fetch-images 66]
                               [--delay-ms 50] [--out DIR] [--keep]

1. Content. Image ``i`` holds real files from two Debian packages (``apt-get download``, cached by
   tests/rig/payloads.py): a library package (``LIBS``) and an application package (``APPS``, mostly
   Go binaries like a Kubernetes image), of one arch each, capped at ``--image-mib`` per image, plus
   a small layer naming the image. Every (package, arch) is used by one image only, so the 4× set
   holds four times the distinct bytes of the 1× set (nothing dedups). Layers are gzip level 6 (as
   a registry serves them: builder.oci.layer.write_layer), images are pushed to the rig's real
   registry (tests/rig/registry.py) and reached through the loopback mirror (tests/rig/loopback.py)
   as in tools/demo.py. The images are labelled with the host's platform (so containerd unpacks
   them); the bytes in them may be of either arch.
2. Per scale (the first ``images × scale`` images), on the same fetched store:
   - upstream recipe: one merged ``docker save``-style archive of all the images (manifest.json,
     ``<config>.json``, ``<diff_id>/layer.tar``: layers decompressed), then ``zstd -T0 -16
     --long=25``, ``pigz`` (level 6) and ``sha256sum`` of both (what upstream publishes);
   - ours, once per layer mode the builder accepts (``release: {layers: MODE}`` in the lock;
     a mode ``lock --check`` refuses is skipped with a note; ``registry`` without the key when the
     loader does not know the key yet, since that is the behaviour then): ``python -m builder
     build`` into a fresh artifacts directory, on a hard-linked copy of the store (a mode that
     caches recompressed layers in the store starts cold every time).
   Measured: bytes to carry (``.tar.zst``, ``.tar.gz``), build wall and CPU time (whole ``build``
   and, from its "packed" line, the bench group's archive alone), peak RSS (tools/bench.measure:
   polled VmHWM of the process), containerd import (``zstd -dc | ctr -n k8s.io images import -``
   into a fresh private containerd, tests/plugins/oci.run_containerd; median of ``--repeat``) and
   the containerd root's disk use after import (``du -sB1``). Ratios are ours/upstream.
3. Fetch: a release-shaped lock (``--fetch-images`` multi-arch images, a few small layers each)
   whose registry sits behind tests/rig/latency_proxy.py (``--delay-ms`` per request);
   ``fetch --cross`` with ``-j 1`` and ``-j 4`` into fresh stores (component files fetched before,
   unproxied, so only the images are timed); the speed-up is j1/j4.
4. No-op rebuild: ``build --cross`` of that lock, then the same again with nothing changed (timed).
5. Goals: issue 14's limits, met or missed per mode at the largest scale.
6. Delta (issue 15, tools/bench_delta.py): a base release with the first ``--delta-images``
   images (default ``--images``; 0 skips) made multi-arch, and its patch (one image's top layer,
   one runtime binary, as tests/rig/update.py), both ``--cross``: full vs delta bytes per arch
   (.tar.zst, .tar.gz, the whole directory), the delta's build time, and install.sh full vs
   delta into a temp root holding the base.

Prints markdown tables; every figure goes to ``OUT/bench_real.json``. The defaults (5 images of at
most 24 MiB at 1×, 20 at 4×, every mode, 66 release-shaped images) are sized for ≤ 15 min on an
idle 2-core machine; the first run also downloads the 40 .debs (~180 MB, cached). ``--image-mib 0``
packs both packages whole (~220 MB of files at 1×, as in the issue's first measurement).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gzip
import hashlib
import json
import multiprocessing
import os
import platform as py_platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from builder import digest as dg
from builder.fetch.registry import RegistryClient
from builder.lock import lockfile as L
from builder.oci import model as m
from builder.oci.image import build_image, build_index, load_image
from builder.oci.layer import FileEntry, Layer, write_layer
from builder.oci.reference import Reference
from builder.store import Store
from tests.rig import loopback, mirror, payloads
from tests.rig.images import save_member
from tests.rig.latency_proxy import LatencyProxy
from tools.bench import MIB, Run, measure

REPO_ROOT = Path(__file__).resolve().parents[1]
EPOCH = mirror.MTIME
MODES = ("registry", "zstd", "compact")
GROUP = "bench"  # the bench images' own group: its archive holds them and nothing else
# One (library, application) pair per image and arch: 10 pairs × 2 arches = 20 distinct images.
APPS = ("containerd", "runc", "etcd-server", "skopeo", "buildah", "podman", "restic", "influxdb",
        "caddy", "containernetworking-plugins")
LIBS = ("libc6", "libssl3", "libstdc++6", "libicu72", "libsqlite3-0", "libxml2", "libgnutls30",
        "libkrb5-3", "libpython3.11-stdlib", "libperl5.36")
CONTENT_ARCHES = payloads.ARCHES
SMALL_RUNTIME_BIN = ("socat",)  # the scale locks' runtime image: small, so a build is mostly images
RELEASE_GROUPS = ("core", "canal", "calico", "cilium", "multus")  # the release-shaped lock's
PACKED = re.compile(r"packed (\S+) .*? in ([0-9.]+) ?s\b")  # build's line per archive written


def host_arch() -> str:
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(py_platform.machine())
    if arch is None:
        sys.exit(f"bench_real: no fixture arch for this machine ({py_platform.machine()})")
    return arch


# -- content -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    index: int
    lib: str
    app: str
    arch: str  # of the packages' bytes

    @property
    def repository(self) -> str:
        return f"rancher/bench-{self.app}"

    @property
    def tag(self) -> str:
        return f"r{self.index:02d}-{self.arch}"

    @property
    def ref(self) -> str:
        return f"docker.io/{self.repository}:{self.tag}"


def recipes(n: int) -> list[Recipe]:
    pool = len(APPS) * len(CONTENT_ARCHES)
    if n > pool:
        sys.exit(f"bench_real: {n} images asked for, but the package pool gives {pool} distinct ones "
                 f"(APPS × arches in tools/bench_real.py): lower --images or --scales")
    return [Recipe(i, LIBS[i % len(LIBS)], APPS[i % len(APPS)], CONTENT_ARCHES[i // len(APPS)])
            for i in range(n)]


def package_files(package: str, arch: str, budget: int | None) -> tuple[list[FileEntry], int]:
    """The package's files and symlinks, and their bytes. With a ``budget``, the biggest files
    first, each that still fits (so an image keeps its main binaries when they fit at all)."""
    root = payloads.extracted(package, arch)
    links: list[FileEntry] = []
    files: list[tuple[int, str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in filenames + [d for d in dirnames if (here / d).is_symlink()]:
            path = here / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                links.append(FileEntry(rel, linkname=os.readlink(path)))
            elif path.is_file() and rel != ".extracted":
                files.append((path.stat().st_size, rel, path))
    entries, total = links, 0
    for size, rel, path in sorted(files, key=lambda f: (-f[0], f[1])):
        if budget is None or total + size <= budget:
            entries.append(FileEntry(rel, path, path.stat().st_mode & 0o777))
            total += size
    return entries, total  # write_layer sorts by path: the order here never reaches the tar


def _layer_task(args: tuple[str, list[FileEntry]]) -> Layer:
    return write_layer(Store(Path(args[0])), args[1], EPOCH)


@dataclass
class BenchImage:
    recipe: Recipe
    manifest: m.Descriptor
    raw_bytes: int  # file bytes in its layers
    gzip_bytes: int  # its gzip layers


def make_images(store: Store, wanted: list[Recipe], budget: int | None, arch: str,
                jobs: int) -> list[BenchImage]:
    """Pack every recipe's layers (in parallel) into ``store`` and build its image. ``budget``:
    file bytes per image at most, the application's first (None: both packages whole)."""
    plans, raws = [], []
    for r in wanted:
        app, app_bytes = package_files(r.app, r.arch, budget)
        lib, lib_bytes = package_files(r.lib, r.arch, None if budget is None else budget - app_bytes)
        meta = [FileEntry("etc/bench-image", f"{r.ref}\nlib {r.lib} app {r.app} ({r.arch})\n".encode(), 0o644)]
        plans.append([lib, app, meta])
        raws.append(lib_bytes + app_bytes)
    tasks = [(str(store.root), entries) for layers in plans for entries in layers]
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        made = list(pool.map(_layer_task, tasks))
    out = []
    for i, r in enumerate(wanted):
        layers = made[3 * i:3 * i + 3]
        desc = build_image(store, layers, m.Platform.for_arch(arch), EPOCH,
                           labels={"org.opencontainers.image.title": r.repository},
                           config={"Cmd": ["/bin/sh"]})
        out.append(BenchImage(r, desc, raws[i], sum(la.size for la in layers)))
    return out


def release_shaped(store: Store, n: int) -> list[tuple[str, m.Descriptor, dict[str, m.Descriptor]]]:
    """``n`` multi-arch images like a release's: an index over amd64 + arm64, each a shared base
    layer (one of three per arch) and two small image-specific layers."""
    def blob(seed: str, size: int) -> bytes:
        out, i = b"", 0
        while len(out) < size:
            out += hashlib.sha256(f"{seed}/{i}".encode()).digest()
            i += 1
        return out[:size]

    bases = {a: [write_layer(store, [FileEntry("etc/os-release", blob(f"base{k}{a}", 48 << 10), 0o644)], EPOCH)
                 for k in range(3)] for a in payloads.ARCHES}
    images = []
    for i in range(n):
        manifests = {}
        for a in payloads.ARCHES:
            layers = [bases[a][i % 3]] + [
                write_layer(store, [FileEntry(f"usr/bin/tool{i}-{j}", blob(f"{i}{a}{j}", 16 << 10), 0o755)], EPOCH)
                for j in range(2)]
            manifests[a] = build_image(store, layers, m.Platform.for_arch(a), EPOCH,
                                       labels={"bench": f"release-{i}"})
        images.append((f"rancher/release-shaped-{i:02d}:v1.0.{i}", build_index(store, list(manifests.values())),
                       manifests))
    return images


# -- locks -------------------------------------------------------------------------------------------
def write_lock(base: L.Lock, pins: list[L.ImagePin], path: Path, mode: str | None,
               default_groups: tuple[str, ...] = ("core",), registry_url: str | None = None,
               small_runtime: bool = False) -> Path:
    """``base`` (the loopback lock) with these images; ``release.layers: mode`` unless None;
    ``small_runtime``: the runtime image holds socat alone (its fixed cost out of the way)."""
    runtime = base.runtime
    if small_runtime and runtime is not None:
        runtime = dataclasses.replace(runtime, bin=SMALL_RUNTIME_BIN)
    mirrors = base.mirrors
    if registry_url is not None:
        mirrors = dataclasses.replace(mirrors, registries=(
            L.RegistryMirror("docker.io", (registry_url,), fallback=False),))
    lock = dataclasses.replace(base, images=tuple(pins), mirrors=mirrors, path=None, runtime=runtime,
                               release=dataclasses.replace(base.release, default_groups=default_groups))
    L.save(lock, path)
    if mode is not None:
        data = yaml.safe_load(path.read_text())
        data["release"]["layers"] = mode
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Builder:
    """``python -m builder`` with the bench's mirrors file and epoch; logs under ``logs``."""

    def __init__(self, mirrors: Path, logs: Path):
        self.mirrors, self.logs = mirrors, logs
        logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, SOURCE_DATE_EPOCH=str(EPOCH), PYTHONPATH=str(REPO_ROOT))
        self.env.pop("CROSS", None)

    def argv(self, lock: Path, store: Path, *args: str) -> list[str]:
        return [sys.executable, "-m", "builder", "--lock", str(lock), "--store", str(store),
                "--mirrors", str(self.mirrors), *args]

    def run(self, name: str, lock: Path, store: Path, *args: str) -> tuple[Run, Path]:
        log = self.logs / f"{name}.log"
        log.unlink(missing_ok=True)
        return measure(self.argv(lock, store, *args), log, env=self.env, cwd=REPO_ROOT), log

    def accepts(self, lock: Path) -> str | None:
        """None when ``lock --check`` passes, else its first error line."""
        res = subprocess.run(self.argv(lock, self.logs / "unused-store", "lock", "--check"),
                             capture_output=True, text=True, env=self.env, cwd=REPO_ROOT)
        if res.returncode == 0:
            return None
        lines = [x for x in (res.stderr + res.stdout).splitlines() if x.strip()]
        return lines[0] if lines else f"exit {res.returncode}"


def resolve_mode(builder: Builder, base: L.Lock, pins: list[L.ImagePin], path: Path,
                 mode: str) -> tuple[Path | None, str]:
    """The lock (at ``path``) to build ``mode`` from, or None and why the builder refuses it today."""
    lock = write_lock(base, pins, path, mode, small_runtime=True)
    why = builder.accepts(lock)
    if why is None:
        return lock, f"release.layers: {mode}"
    if mode == "registry":  # the loader predates the key: no key means registry layers
        lock = write_lock(base, pins, path, None, small_runtime=True)
        if builder.accepts(lock) is None:
            return lock, "no release.layers key (the loader does not know it yet; registry is what it builds)"
    return None, why


# -- the upstream recipe -----------------------------------------------------------------------------
def docker_save(store: Store, images: list[tuple[str, str]], dest: Path) -> int:
    """One ``docker save``-style archive of every (ref, manifest digest): layers decompressed,
    each diff_id once; returns the tar's size. ``ctr import`` takes it whole."""
    scratch = dest.with_name(dest.name + ".layer")
    index, seen = [], set()
    with open(dest, "wb") as raw, tarfile.open(fileobj=raw, mode="w|", format=tarfile.GNU_FORMAT,
                                              bufsize=MIB) as tar:

        for ref, digest in images:
            manifest, config = load_image(store, digest)
            names = []
            for layer, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
                name = f"{dg.hex_of(diff_id)}/layer.tar"
                if diff_id not in seen:
                    with store.open(layer.digest) as src, gzip.GzipFile(fileobj=src) as gz, \
                            open(scratch, "wb") as out:
                        shutil.copyfileobj(gz, out, MIB)
                    save_member(tar, name, path=scratch)
                    seen.add(diff_id)
                names.append(name)
            config_name = f"{dg.hex_of(manifest.config.digest)}.json"
            save_member(tar, config_name, config.raw)
            index.append({"Config": config_name, "RepoTags": [ref], "Layers": names})
        save_member(tar, "manifest.json", json.dumps(index).encode())
    scratch.unlink(missing_ok=True)
    return dest.stat().st_size


def upstream_recipe(store: Store, images: list[tuple[str, str]], work: Path) -> dict[str, Any]:
    """save → zstd -16 → pigz → sha256sum, each step measured in its own process."""
    work.mkdir(parents=True, exist_ok=True)
    tar = work / "images.tar"
    spec = work / "save.json"
    spec.write_text(json.dumps({"store": str(store.root), "images": images, "dest": str(tar)}))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    steps = {
        "save": [sys.executable, "-m", "tools.bench_real", "--child-save", str(spec)],
        "zstd16": ["zstd", "-T0", "-16", "--long=25", "-q", "-f", str(tar), "-o", f"{tar}.zst"],
        "pigz": ["pigz", "-k", "-f", str(tar)],
        "sha256sum": ["sha256sum", f"{tar}.zst", f"{tar}.gz"],
    }
    runs = {name: measure(argv, work / f"{name}.log", env=env, cwd=REPO_ROOT) for name, argv in steps.items()}
    total = Run()
    for r in runs.values():
        total.add(r)
    result = {"steps": {k: dataclasses.asdict(v) for k, v in runs.items()},
              "total": dataclasses.asdict(total),
              "sizes": {"tar": tar.stat().st_size, "tar_zst": Path(f"{tar}.zst").stat().st_size,
                        "tar_gz": Path(f"{tar}.gz").stat().st_size},
              "zst": f"{tar}.zst"}
    tar.unlink()
    Path(f"{tar}.gz").unlink()
    return result


# -- containerd import -------------------------------------------------------------------------------
def import_archive(zst: Path, expect: int, repeat: int, logs: Path) -> dict[str, Any] | str:
    """Decompress + ``ctr images import`` into a fresh containerd, ``repeat`` times; or why not."""
    from tests.plugins.oci import containerd_missing, run_containerd

    why = containerd_missing()
    if why:
        return why
    walls, cpus, roots, counts = [], [], [], []
    for i in range(repeat):
        with run_containerd() as ctd:
            cmd = (f"zstd -dc --long=31 {shlex.quote(str(zst))} | "
                   f"ctr -a {shlex.quote(str(ctd.socket))} -n k8s.io images import -")
            run = measure(["sh", "-c", "set -e; " + cmd], logs / f"import-{zst.stem}-{i}.log")
            walls.append(run.wall_s)
            cpus.append(run.cpu_s)
            counts.append(len(ctd.images()))
            roots.append(int(subprocess.run(["du", "-sB1", str(ctd.root / "root")], capture_output=True,
                                            text=True, check=True).stdout.split()[0]))
    if min(counts) < expect:
        raise RuntimeError(f"ctr import of {zst} gave {min(counts)} images, expected {expect}")
    return {"wall_s": statistics.median(walls), "walls": walls, "cpu_s_client": statistics.median(cpus),
            "root_bytes": max(roots), "images": min(counts)}


# -- one scale ---------------------------------------------------------------------------------------
def cold_build(builder: Builder, lock: Path, store: Path, work: Path, name: str,
               arch: str) -> tuple[Run, dict[str, float], Path]:
    """One cold ``build --arch`` of ``lock`` on a hard-linked copy of ``store``: the run, the
    seconds of each archive's "packed" line, and the artifacts directory."""
    copy, art = work / f"store-{name}", work / f"artifacts-{name}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.rmtree(art, ignore_errors=True)
    subprocess.run(["cp", "-al", str(store), str(copy)], check=True)
    try:
        run, log = builder.run(f"build-{name}", lock, copy, "build", "--arch", arch, "--artifacts", str(art))
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return run, {m_.group(1): float(m_.group(2)) for m_ in PACKED.finditer(log.read_text())}, art


def ours(builder: Builder, lock: Path, store: Path, work: Path, name: str, arch: str) -> dict[str, Any]:
    run, packed, art = cold_build(builder, lock, store, work, name, arch)
    base = f"{L.load(lock).release.name}-images-{GROUP}.linux-{arch}"
    zst, gz = art / f"{base}.tar.zst", art / f"{base}.tar.gz"
    if not zst.exists() or not gz.exists():
        raise RuntimeError(f"build {name}: no {zst.name} / {gz.name} in {art} (see {builder.logs})")
    return {"build": dataclasses.asdict(run), "archive_wall_s": packed.get(base),
            "sizes": {"tar_zst": zst.stat().st_size, "tar_gz": gz.stat().st_size},
            "zst": str(zst), "artifacts": str(art)}


def ratios(o: dict[str, Any], u: dict[str, Any]) -> dict[str, float | None]:
    def r(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    oi, ui = o.get("import"), u.get("import")
    oi = oi if isinstance(oi, dict) else {}
    ui = ui if isinstance(ui, dict) else {}
    return {
        "tar_zst": r(o["sizes"]["tar_zst"], u["sizes"]["tar_zst"]),
        "tar_gz": r(o["sizes"]["tar_gz"], u["sizes"]["tar_gz"]),
        "build_wall": r(o["build"]["wall_s"], u["total"]["wall_s"]),
        "archive_wall": r(o["archive_wall_s"], u["total"]["wall_s"]),
        "build_cpu": r(o["build"]["cpu_s"], u["total"]["cpu_s"]),
        "peak_rss": r(o["build"]["peak_rss"], u["total"]["peak_rss"]),
        "import_wall": r(oi.get("wall_s"), ui.get("wall_s")),
        "containerd_root": r(oi.get("root_bytes"), ui.get("root_bytes")),
    }


def run_scale(scale: int, images: list[BenchImage], lb: loopback.Loopback, builder: Builder,
              modes: list[str], gen_store: Store, work: Path, arch: str, repeat: int,
              baselines: dict[str, Any]) -> dict[str, Any]:
    """Upstream and every accepted mode on the first ``len(images)`` images; ``baselines`` (per
    mode, filled on first use): a build of the same lock without the bench images."""
    work.mkdir(parents=True, exist_ok=True)
    pins = [L.ImagePin(i.recipe.ref, (GROUP,), i.manifest.digest, {arch: i.manifest.digest}, (arch,))
            for i in images]
    res: dict[str, Any] = {"scale": scale, "images": len(images), "raw_bytes": sum(i.raw_bytes for i in images),
                           "gzip_layer_bytes": sum(i.gzip_bytes for i in images), "modes": {}, "skipped": {}}
    fetch_lock = write_lock(lb.lock, pins, work / "images-fetch.lock", None, small_runtime=True)
    store = work / "store"
    _progress(f"scale {scale}×: fetch {len(images)} images through the loopback mirror")
    builder.run(f"fetch-{scale}", fetch_lock, store, "fetch", "--arch", arch)
    _progress(f"scale {scale}×: upstream recipe (docker save → zstd -T0 -16 --long=25, pigz, sha256sum)")
    up = upstream_recipe(gen_store, [(i.recipe.ref, i.manifest.digest) for i in images], work / "upstream")
    up["import"] = import_archive(Path(up["zst"]), len(images), repeat, builder.logs)
    res["upstream"] = up
    for mode in modes:
        lock, how = resolve_mode(builder, lb.lock, pins, work / f"images-{mode}.lock", mode)
        if lock is None:
            print(f"bench_real: layer mode {mode!r} skipped: the builder refuses it today ({how})",
                  file=sys.stderr, flush=True)
            res["skipped"][mode] = how
            continue
        if mode not in baselines:
            _progress(f"layers {mode}: baseline build (runtime image and bundle, no bench images)")
            empty, _ = resolve_mode(builder, lb.lock, [], work / f"images-{mode}-empty.lock", mode)
            assert empty is not None
            run, _, art = cold_build(builder, empty, store, work, f"baseline-{mode}", arch)
            shutil.rmtree(art, ignore_errors=True)
            baselines[mode] = dataclasses.asdict(run)
        _progress(f"scale {scale}×: ours, layers {mode} ({how})")
        o = ours(builder, lock, store, work, f"{scale}x-{mode}", arch)
        o["lock"] = how
        o["baseline"] = baselines[mode]
        o["import"] = import_archive(Path(o["zst"]), len(images), repeat, builder.logs)
        shutil.rmtree(o.pop("artifacts"), ignore_errors=True)
        o["ratios"] = ratios(o, up)
        res["modes"][mode] = o
    Path(up["zst"]).unlink(missing_ok=True)
    shutil.rmtree(store, ignore_errors=True)
    return res


# -- fetch with latency, and the no-op rebuild -------------------------------------------------------
def fetch_and_noop(lb: loopback.Loopback, builder: Builder, n: int, delay: float,
                   work: Path, small_runtime: bool = False) -> dict[str, Any]:
    """Fetch ``n`` release-shaped images behind the latency proxy with -j 1 and -j 4, then build
    them twice (the second time timed as the no-op rebuild). ``small_runtime``: --quick's."""
    work.mkdir(parents=True, exist_ok=True)
    gen = Store(work / "gen-store")
    client = RegistryClient(mirrors=L.Mirrors(insecure=(lb.registry.host,)))
    pins = []
    for i, (name, index, manifests) in enumerate(release_shaped(gen, n)):
        repo, tag = name.rsplit(":", 1)
        client.push_tree(gen, Reference(lb.registry.host, repo, tag), index)
        pins.append(L.ImagePin(f"docker.io/{name}", (RELEASE_GROUPS[i % len(RELEASE_GROUPS)],), index.digest,
                               {a: d.digest for a, d in sorted(manifests.items())}))
    direct = write_lock(lb.lock, pins, work / "release-shaped.lock", None, ("core", "canal"),
                        small_runtime=small_runtime)
    files = work / "store-files"
    builder.run("fetch-files", direct, files, "fetch", "--cross", "--files-only")
    out: dict[str, Any] = {"images": n, "arches": list(payloads.ARCHES), "delay_ms": delay * 1000}
    with LatencyProxy(lb.registry.url, delay) as proxy:
        mirrors = work / "mirrors-proxy.yaml"
        mirrors.write_text(yaml.safe_dump({"insecure": [proxy.host]}))
        slow = write_lock(lb.lock, pins, work / "release-shaped-proxy.lock", None, ("core", "canal"),
                          proxy.url, small_runtime)
        far = Builder(mirrors, builder.logs)
        for jobs in (1, 4):
            store = work / f"store-j{jobs}"
            subprocess.run(["cp", "-al", str(files), str(store)], check=True)
            before = proxy.requests
            _progress(f"fetch: {n} release-shaped images, {delay * 1000:.0f} ms per request, -j {jobs}")
            run, _ = far.run(f"fetch-j{jobs}", slow, store, "-j", str(jobs), "fetch", "--cross")
            out[f"j{jobs}"] = dataclasses.asdict(run) | {"requests": proxy.requests - before}
    out["speedup"] = out["j1"]["wall_s"] / out["j4"]["wall_s"]
    store, art = work / "store-j4", work / "artifacts"
    _progress(f"no-op rebuild: build --cross of {n} images, then again")
    first, _ = builder.run("build-release-shaped", direct, store, "build", "--cross", "--artifacts", str(art))
    again, log = builder.run("build-release-shaped-noop", direct, store, "build", "--cross", "--artifacts", str(art))
    out["build_first"] = dataclasses.asdict(first)
    out["noop_rebuild"] = dataclasses.asdict(again)
    return out


# -- report ------------------------------------------------------------------------------------------
def _mb(n: float | None) -> str:
    return "—" if n is None else f"{n / 1e6:,.1f} MB"


def _s(n: float | None) -> str:
    return "—" if n is None else f"{n:.2f} s"


def _x(n: float | None) -> str:
    return "—" if n is None else f"**{n:.2f}×**"


def table(res: dict[str, Any]) -> str:
    up = res["upstream"]
    ui = up["import"] if isinstance(up["import"], dict) else {}
    head = (f"### scale {res['scale']}×: {res['images']} images, {_mb(res['raw_bytes'])} of real files, "
            f"{_mb(res['gzip_layer_bytes'])} as gzip-6 layers\n\n")
    cols = ["upstream recipe"] + [f"ours: {m_}" for m_ in res["modes"]] + [f"{m_}/upstream" for m_ in res["modes"]]
    rows = [f"| | {' | '.join(cols)} |", "|---" * (len(cols) + 1) + "|"]

    def row(label: str, up_value: str, getter, fmt, key: str) -> str:
        vals = [fmt(getter(o)) for o in res["modes"].values()]
        rats = [_x(o["ratios"][key]) for o in res["modes"].values()]
        return f"| {label} | {up_value} | {' | '.join(vals + rats)} |"

    def imp(o: dict[str, Any], k: str) -> float | None:
        return o["import"].get(k) if isinstance(o["import"], dict) else None

    rows += [
        row(".tar.zst to carry", _mb(up["sizes"]["tar_zst"]), lambda o: o["sizes"]["tar_zst"], _mb, "tar_zst"),
        row(".tar.gz to carry", _mb(up["sizes"]["tar_gz"]), lambda o: o["sizes"]["tar_gz"], _mb, "tar_gz"),
        row("build wall: the images' archive (`packed` line) vs save+zstd+pigz+sha256sum",
            _s(up["total"]["wall_s"]), lambda o: o["archive_wall_s"], _s, "archive_wall"),
        row("build wall: whole `build` (adds runtime image, bundle, start-up)", _s(up["total"]["wall_s"]),
            lambda o: o["build"]["wall_s"], _s, "build_wall"),
        row("build CPU (whole `build`)", _s(up["total"]["cpu_s"]), lambda o: o["build"]["cpu_s"], _s, "build_cpu"),
        row("peak RSS (whole `build`)", _mb(up["total"]["peak_rss"]), lambda o: o["build"]["peak_rss"], _mb, "peak_rss"),
        row("containerd import (zstd -dc, ctr import)", _s(ui.get("wall_s")), lambda o: imp(o, "wall_s"), _s,
            "import_wall"),
        row("containerd root after import", _mb(ui.get("root_bytes")), lambda o: imp(o, "root_bytes"), _mb,
            "containerd_root"),
    ]
    notes = ["- upstream steps: " + ", ".join(f"{k} {_s(v['wall_s'])}" for k, v in up["steps"].items())]
    notes += [f"- layers {k}: {o['lock']}; the same build without the bench images: "
              f"{_s(o['baseline']['wall_s'])} wall, {_s(o['baseline']['cpu_s'])} CPU" for k, o in res["modes"].items()]
    notes += [f"- layers {k}: skipped, the builder refuses it today: {why}" for k, why in res["skipped"].items()]
    if not ui:
        notes.append(f"- containerd import not run: {up['import']}")
    return head + "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n"


def rss_growth(scales: list[dict[str, Any]]) -> dict[str, float]:
    """Per mode (and upstream): peak RSS at the largest scale over the smallest."""
    if len(scales) < 2:
        return {}
    lo, hi = scales[0], scales[-1]
    out = {"upstream": hi["upstream"]["total"]["peak_rss"] / lo["upstream"]["total"]["peak_rss"]}
    for mode in hi["modes"]:
        if mode in lo["modes"]:
            out[mode] = hi["modes"][mode]["build"]["peak_rss"] / lo["modes"][mode]["build"]["peak_rss"]
    return out


# Issue 14's goals for the default mode: (what, the figure's key, the limit it must not pass).
GOALS = (
    (".tar.zst to carry ≤ 0.95× upstream", "tar_zst", 0.95),
    (".tar.gz ≤ 1.0× pigz's", "tar_gz", 1.0),
    ("containerd import ≤ 0.75×", "import_wall", 0.75),
    ("containerd root after import ≤ 0.7×", "containerd_root", 0.7),
    ("build wall (whole `build`) ≤ 1.0×", "build_wall", 1.0),
)
RSS_LIMIT = 200 * MIB
RSS_FLAT = 1.25  # "flat from 1× to 4×": at most this growth
FETCH_SPEEDUP = 2.5
NOOP_LIMIT_S = 1.0


def goals(report: dict[str, Any]) -> dict[str, dict[str, bool | None]]:
    """Per measured mode, each of issue 14's goals: met (True), missed (False) or not measured
    (None); ratios are the largest scale's."""
    if not report["scales"]:
        return {}
    top = report["scales"][-1]
    growth = report.get("peak_rss_growth") or {}
    fetch = report.get("fetch")
    out: dict[str, dict[str, bool | None]] = {}
    for mode, o in top["modes"].items():
        row: dict[str, bool | None] = {}
        for label, key, limit in GOALS:
            value = o["ratios"].get(key)
            row[label] = None if value is None else value <= limit
        rss = max(s["modes"][mode]["build"]["peak_rss"] for s in report["scales"] if mode in s["modes"])
        flat = growth.get(mode)
        row[f"peak RSS ≤ {RSS_LIMIT // MIB} MiB and flat (≤ {RSS_FLAT}× across scales)"] = \
            rss <= RSS_LIMIT and (flat is None or flat <= RSS_FLAT)
        row[f"fetch at latency: -j 4 ≥ {FETCH_SPEEDUP}× faster than -j 1"] = \
            None if fetch is None else fetch["speedup"] >= FETCH_SPEEDUP
        row[f"no-op rebuild ≤ {NOOP_LIMIT_S:g} s"] = \
            None if fetch is None else fetch["noop_rebuild"]["wall_s"] <= NOOP_LIMIT_S
        out[mode] = row
    return out


def goals_table(met: dict[str, dict[str, bool | None]]) -> str:
    if not met:
        return ""
    modes = list(met)
    mark = {True: "met", False: "**missed**", None: "—"}
    rows = [f"| goal (issue 14) | {' | '.join(modes)} |", "|---" * (len(modes) + 1) + "|"]
    for goal in met[modes[0]]:
        rows.append(f"| {goal} | {' | '.join(mark[met[m_][goal]] for m_ in modes)} |")
    return "### goals, at the largest scale\n\n" + "\n".join(rows) + "\n"


def fetch_table(f: dict[str, Any]) -> str:
    return (f"### fetch at {f['delay_ms']:.0f} ms per request ({f['images']} release-shaped images, "
            f"{'+'.join(f['arches'])})\n\n"
            "| | -j 1 | -j 4 | speed-up |\n|---|---|---|---|\n"
            f"| `fetch --cross` (images only) | {_s(f['j1']['wall_s'])} ({f['j1']['requests']} requests) | "
            f"{_s(f['j4']['wall_s'])} ({f['j4']['requests']} requests) | **{f['speedup']:.2f}×** |\n\n"
            f"No-op rebuild (`build --cross`, {f['images']} images, nothing changed): "
            f"**{_s(f['noop_rebuild']['wall_s'])}** wall, {_s(f['noop_rebuild']['cpu_s'])} CPU, "
            f"peak RSS {_mb(f['noop_rebuild']['peak_rss'])} (first build {_s(f['build_first']['wall_s'])}).\n")


def _progress(msg: str) -> None:
    print(f"bench_real: {msg} ...", file=sys.stderr, flush=True)


# -- main --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench_real", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny run for the smoke test: 2 images of 2 MiB, scale 1, 4 release-shaped images "
                        "and a small runtime image")
    p.add_argument("--scales", default="1,4", help="comma-separated multiples of --images")
    p.add_argument("--images", type=int, default=5, help="images at scale 1")
    p.add_argument("--image-mib", type=float, default=24,
                   help="real file bytes per image, at most (0: both packages whole, ~45 MB an image)")
    p.add_argument("--modes", default=",".join(MODES), help="layer modes to try (skipped if refused)")
    p.add_argument("--repeat", type=int, default=1, help="containerd imports per archive (median)")
    p.add_argument("--fetch-images", type=int, default=66, help="images of the release-shaped lock (0: skip)")
    p.add_argument("--delta-images", type=int, default=None,
                   help="bench images in the delta section's releases (default --images; 0: skip)")
    p.add_argument("--delay-ms", type=float, default=50, help="latency the proxy adds per request")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="layer generator processes")
    p.add_argument("--out", type=Path, default=None, help="results dir (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--child-save", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.scales, args.images, args.image_mib, args.fetch_images = "1", 2, 2, 4
    if args.delta_images is None:
        args.delta_images = args.images
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child_save:  # the upstream recipe's save step, measured as its own process
        spec = json.loads(args.child_save.read_text())
        docker_save(Store(Path(spec["store"])), [tuple(i) for i in spec["images"]], Path(spec["dest"]))
        return {}
    scales = sorted({int(s) for s in args.scales.split(",") if s.strip()})
    modes = [x.strip() for x in args.modes.split(",") if x.strip()]
    if not scales or min(scales) < 1 or args.images < 1 or args.image_mib < 0 or args.repeat < 1:
        sys.exit("bench_real: need --scales ≥ 1, --images ≥ 1, --image-mib ≥ 0, --repeat ≥ 1")
    for tool in ("zstd", "pigz", "sha256sum", "du", "cp"):
        if shutil.which(tool) is None:
            sys.exit(f"bench_real: {tool} is not installed (scripts/setup installs it)")
    wanted = recipes(args.images * max(scales))
    arch = host_arch()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-real-"))
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=out))
    started = time.monotonic()
    report: dict[str, Any] = {
        "params": {"scales": scales, "images": args.images, "image_mib": args.image_mib, "modes": modes,
                   "delta_images": args.delta_images,
                   "repeat": args.repeat, "fetch_images": args.fetch_images, "delay_ms": args.delay_ms,
                   "arch": arch, "quick": args.quick},
        "machine": {"cpus": os.cpu_count(), "python": py_platform.python_version(),
                    "kernel": py_platform.release(), "zstd": _version(["zstd", "--version"]),
                    "pigz": _version(["pigz", "--version"]), "containerd": _version(["containerd", "--version"])},
        "scales": [],
    }
    try:
        with loopback.running(scratch / "loopback", resolved=True) as lb:
            builder = Builder(lb.mirrors_path, scratch / "logs")
            _progress(f"content: {len(wanted)} images of real Debian files"
                      + (f", ≤ {args.image_mib:g} MiB each" if args.image_mib else ""))
            t = time.monotonic()
            gen = Store(scratch / "gen-store")
            made = make_images(gen, wanted, int(args.image_mib * MIB) or None, arch, max(1, args.jobs))
            client = RegistryClient(mirrors=L.Mirrors(insecure=(lb.registry.host,)))
            for img in made:
                client.push_tree(gen, Reference(lb.registry.host, img.recipe.repository, img.recipe.tag),
                                 img.manifest)
            report["content_s"] = time.monotonic() - t
            baselines: dict[str, Any] = {}
            for scale in scales:
                res = run_scale(scale, made[:args.images * scale], lb, builder, modes, gen,
                                scratch / f"scale-{scale}", arch, args.repeat, baselines)
                report["scales"].append(res)
                (out / "bench_real.json").write_text(json.dumps(report, indent=2))
            if args.delta_images > 0:
                from tools import bench_delta

                report["delta"] = bench_delta.run(lb, gen, made[:args.delta_images],
                                                  scratch / "delta", small=args.quick)
                (out / "bench_real.json").write_text(json.dumps(report, indent=2))
            if args.fetch_images > 0:
                report["fetch"] = fetch_and_noop(lb, builder, args.fetch_images, args.delay_ms / 1000,
                                                 scratch / "fetch", small_runtime=args.quick)
    finally:
        if args.keep:
            print(f"bench_real: kept {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    report["wall_s"] = time.monotonic() - started
    report["peak_rss_growth"] = rss_growth(report["scales"])
    report["goals"] = goals(report)
    (out / "bench_real.json").write_text(json.dumps(report, indent=2))
    print(f"## tools.bench_real: ours vs the upstream recipe on real bytes ({report['machine']['cpus']} CPUs, "
          f"{report['machine']['zstd']}, {report['machine']['containerd']})\n")
    print("Ratios are ours/upstream (< 1: ours smaller or faster). Upstream = one merged docker-save "
          "archive (layers decompressed), zstd -T0 -16 --long=25, pigz, sha256sum. Import = "
          "zstd -dc | ctr -n k8s.io images import - into a fresh containerd.\n")
    for res in report["scales"]:
        print(table(res))
    growth = report["peak_rss_growth"]
    if growth:
        lo, hi = report["scales"][0]["scale"], report["scales"][-1]["scale"]
        print(f"Peak RSS of `build`, {hi}× vs {lo}×: "
              + ", ".join(f"{k} {v:.2f}×" for k, v in growth.items()) + "\n")
    if "fetch" in report:
        print(fetch_table(report["fetch"]))
    if "delta" in report:
        from tools import bench_delta

        print(bench_delta.table(report["delta"]))
    if report["goals"]:
        print(goals_table(report["goals"]))
    print(f"Whole bench: {report['wall_s']:.0f} s. Raw figures: {out / 'bench_real.json'}")
    return report


def _version(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except OSError:
        return "missing"
    text = (res.stdout or res.stderr).strip()
    return text.splitlines()[0] if text else ""


if __name__ == "__main__":
    # SIGTERM (a timeout, kill PID) unwinds like Ctrl-C: the loopback servers are stopped and the
    # scratch directory removed by main's finally blocks instead of being left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
