"""The synthetic packing bench (`nox -s bench` runs tools/bench_real.py on real bytes instead):
packing throughput and peak memory, ours vs `skopeo copy` + `zstd -16`.

    python -m tools.bench [--size-mib 1024] [--images 8] [--scales 1,4] [--out DIR] [--keep]

1. A synthetic image set is generated into a scratch content store: ``images × max(scales)``
   linux/amd64 OCI images (built with ``build_image``), whose gzip layers total
   ``size-mib × max(scales)``. Layer bytes are fresh ``os.urandom`` blocks mixed with repeated
   text, so gzip and zstd do real work and nothing dedups; scale ``s`` packs the first
   ``images × s`` images (an air-gap archive grows by holding more images).
2. Ours: ``write_archive`` → ``.tar``, ``zstd_file`` → ``.tar.zst``, ``gzip_file`` → ``.tar.gz``,
   exactly what ``builder.assemble.images.write`` does, in a fresh child process.
3. The standard tools on the same images: the set as an OCI layout (hard links into the store),
   ``skopeo copy oci:… docker-archive:…`` per image (skopeo cannot put several images into one
   docker-archive: ``--additional-tag`` only adds names to the *same* image, and it refuses to
   write into a non-empty archive), then ``zstd -T0 -16 --long=25`` (upstream's recipe) and
   ``zstd -T0 -3 --long=25`` (our level) on each, and ``sha256sum`` of the ``.zst`` files.
4. Peak memory per step, at every scale.

Peak RSS is the child's ``VmHWM`` from ``/proc/PID/status``, polled while it runs (and reported
by our own child for itself). Not ``getrusage(RUSAGE_CHILDREN)``: its ``ru_maxrss`` is a maximum
over all children ever waited for (a delta is meaningless), and Linux carries the high-water
mark of the process that called exec (here: this Python parent, via vfork) into the exec'd
child's ``ru_maxrss``, so a 2 MiB ``sha256sum`` would show the parent's size. ``wait4``'s
figure is kept in the JSON as ``maxrss_wait4`` (an upper bound), and is the fallback for a
process too short-lived to be polled. CPU seconds come from ``wait4`` (those are exact).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform as py_platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from builder.humanize import human
from builder.oci import compress
from builder.oci import model as m
from builder.oci.archive import write_archive
from builder.oci.compress import HashingWriter
from builder.oci.image import build_image
from builder.oci.layer import Layer
from builder.oci.layout import ArchiveImage, write_layout
from builder.oci.model import OCI_LAYER_GZIP
from builder.store import Store

MIB = 1 << 20
EPOCH = 1_700_000_000
PLATFORM = m.Platform("linux", "amd64")
# Share of each image's bytes per layer: a small base, a middle layer and one big layer, so a
# single layer is a sizeable fraction of the image (a per-layer buffer would show up in memory).
LAYER_SHARES = (0.05, 0.25, 0.70)
FILE_MAX = 16 * MIB  # largest file inside a layer
GEN_BLOCK = MIB
GEN_GZIP_LEVEL = 1  # generation speed only: packing copies gzip layers verbatim, at any level
# Scratch space needed, in multiples of the largest input: the store (1×) plus our tar, .tar.zst
# and .tar.gz side by side (~3×, as assemble.images.write keeps them until it publishes), plus
# slack. The standard tools' outputs are deleted per image as soon as they are measured, so their
# peak (uncompressed docker-archives, ~1/random_fraction ×) stays below ours.
DISK_FACTOR = 4.5
POLL_S = 0.01
REPO_ROOT = Path(__file__).resolve().parents[1]


# -- measuring a child process ---------------------------------------------------------------------
@dataclass
class Run:
    """One measured child process (or the sum of several, for per-image tool runs)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss: int = 0  # bytes; VmHWM polled (max over runs)
    maxrss_wait4: int = 0  # bytes; wait4's ru_maxrss (an upper bound, see module docstring)
    rss_source: str = "VmHWM"
    runs: int = 0

    def add(self, other: Run) -> None:
        self.wall_s += other.wall_s
        self.cpu_s += other.cpu_s
        self.peak_rss = max(self.peak_rss, other.peak_rss)
        self.maxrss_wait4 = max(self.maxrss_wait4, other.maxrss_wait4)
        if other.rss_source != "VmHWM":
            self.rss_source = other.rss_source
        self.runs += other.runs


def _vm_hwm(pid: int | str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return None  # gone, or a zombie (its memory is already released)


def measure(argv: list[str], log: Path, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> Run:
    """Run ``argv`` to completion; wall time, CPU time and peak RSS of that process alone."""
    with open(log, "ab") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    peak = 0
    seen = False
    done = threading.Event()

    def poll() -> None:
        nonlocal peak, seen
        while not done.is_set():
            hwm = _vm_hwm(proc.pid)
            if hwm is not None:
                peak, seen = max(peak, hwm), True
            time.sleep(POLL_S)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    # Wait without reaping, so the pid cannot be reused while the poller still reads it.
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    wall = time.perf_counter() - start
    done.set()
    poller.join()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{argv[0]} exited with {proc.returncode}: {' '.join(argv)}\n{tail}")
    maxrss = usage.ru_maxrss * 1024
    return Run(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime,
               peak_rss=peak if seen else maxrss, maxrss_wait4=maxrss,
               rss_source="VmHWM" if seen else "wait4", runs=1)


# -- generating the synthetic image set ------------------------------------------------------------
_TEXT: bytes | None = None


def _text_block() -> bytes:
    """Log/config-like text (gzip shrinks it ~10×); made once per worker."""
    global _TEXT
    if _TEXT is None:
        lines = [f"{i:08d} level=info component=kubelet path=/usr/lib/x86_64-linux-gnu/lib{i % 97}"
                 f".so.{i % 7} msg=\"synced pod sandbox\" took={i * 37 % 1000}ms\n"
                 for i in range(4096)]
        _TEXT = "".join(lines).encode()
    return _TEXT


class _SyntheticFile:
    """A readable stream of ``size`` bytes: per MiB, ``random_fraction`` fresh random bytes and
    the rest text, so nothing repeats across layers and zstd --long cannot dedup the random part."""

    def __init__(self, size: int, random_fraction: float, offset: int):
        self.left = size
        self.rand = int(GEN_BLOCK * random_fraction)
        self.offset = offset
        self.buf = b""

    def read(self, n: int = -1) -> bytes:
        while (n < 0 or len(self.buf) < n) and self.left > len(self.buf):
            text = _text_block()
            start = self.offset % (len(text) // 2)
            self.offset += 4099
            self.buf += os.urandom(self.rand) + text[start:start + GEN_BLOCK - self.rand]
        n = self.left if n < 0 else min(n, self.left)
        out, self.buf = self.buf[:n], self.buf[n:]
        self.left -= len(out)
        return out


class _GzipSink:
    """tar → (diff_id hash) → gzip → (digest hash) → memory; one layer at a time per worker."""

    def __init__(self) -> None:
        self.diff = HashingWriter()
        self.blob = HashingWriter()
        self.chunks: list[bytes] = []
        # wbits 31: a gzip header with mtime 0 and no name, like builder.oci.compress.gzip_writer
        self.z = zlib.compressobj(GEN_GZIP_LEVEL, zlib.DEFLATED, 31)

    def write(self, data: bytes) -> int:
        self.diff.write(data)
        self._emit(self.z.compress(data))
        return len(data)

    def _emit(self, data: bytes) -> None:
        if data:
            self.blob.write(data)
            self.chunks.append(data)

    def close(self) -> bytes:
        self._emit(self.z.flush())
        return b"".join(self.chunks)


def _make_layer(args: tuple[str, int, int, float]) -> dict[str, Any]:
    """Worker: one gzip layer of ``raw_size`` tar content into the store (a pool task)."""
    store_root, seed, raw_size, random_fraction = args
    store = Store(Path(store_root))
    sink = _GzipSink()
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT,  # type: ignore[arg-type]
                      bufsize=MIB) as tar:
        left, n = raw_size, 0
        while left > 0:
            size = min(left, FILE_MAX)
            info = tarfile.TarInfo(f"usr/share/bench/{seed:05d}/data-{n:03d}.bin")
            info.size, info.mode, info.mtime = size, 0o644, EPOCH
            tar.addfile(info, _SyntheticFile(size, random_fraction, seed * 7919 + n))  # type: ignore[arg-type]
            left, n = left - size, n + 1
    data = sink.close()
    digest = store.put_bytes(data, expected=sink.blob.digest, what="synthetic layer")
    return asdict(Layer(digest=digest, diff_id=sink.diff.digest, size=len(data),
                        media_type=OCI_LAYER_GZIP)) | {"raw": sink.diff.size}


@dataclass
class ImageSet:
    images: list[ArchiveImage]
    layer_bytes: list[int]  # gzip bytes per image (what "input" means in MiB/s)
    raw_bytes: list[int]  # uncompressed tar bytes per image

    def first(self, n: int) -> tuple[list[ArchiveImage], int, int]:
        return self.images[:n], sum(self.layer_bytes[:n]), sum(self.raw_bytes[:n])


def image_name(i: int) -> str:
    # A unique tag per image: `skopeo copy oci:DIR:TAG` finds an image by its ref.name (the tag).
    return f"docker.io/rig/bench-{i:03d}:v{i:03d}"


def generate(store: Store, n_images: int, per_image: int, random_fraction: float,
             jobs: int) -> ImageSet:
    """``n_images`` images of at least ``per_image`` gzip bytes each (the random part alone)."""
    raw_per_image = int(per_image / random_fraction) + 1
    tasks = []
    for i in range(n_images):
        for j, share in enumerate(LAYER_SHARES):
            tasks.append((str(store.root), i * 10 + j, max(1, int(raw_per_image * share)),
                          random_fraction))
    # Fork is fine: the parent holds nothing big, and each worker holds one layer at a time.
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        made = pool.map(_make_layer, tasks, chunksize=1)
    images, sizes, raws = [], [], []
    for i in range(n_images):
        rows = made[i * len(LAYER_SHARES):(i + 1) * len(LAYER_SHARES)]
        layers = [Layer(r["digest"], r["diff_id"], r["size"], r["media_type"]) for r in rows]
        desc = build_image(store, layers, PLATFORM, EPOCH, labels={"bench": str(i)})
        images.append(ArchiveImage(image_name(i), desc.digest, PLATFORM))
        sizes.append(sum(r["size"] for r in rows))
        raws.append(sum(r["raw"] for r in rows))
    return ImageSet(images, sizes, raws)


# -- our side: the child process -------------------------------------------------------------------
def _reset_hwm() -> None:
    # Writing 5 to clear_refs resets this process's VmHWM, so each phase gets its own peak. It
    # also resets what wait4 will report as ru_maxrss (only the last phase's peak) - the parent's
    # polled VmHWM and the per-phase figures are the ones to read for our child.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def child_main(kind: str, spec_path: Path) -> None:
    """`--child ours SPEC`: pack as assemble.images.write does; `--child baseline`: imports only."""
    spec = json.loads(spec_path.read_text())
    result: dict[str, Any] = {"phases": {}}
    if kind == "ours":
        store = Store(Path(spec["store"]))
        images = [ArchiveImage(n, d, PLATFORM) for n, d in spec["images"]]
        out = Path(spec["out"])
        tar = out / "bench.tar"
        steps = [
            ("archive", lambda: write_archive(store, images, tar, EPOCH)),
            ("zstd", lambda: compress.zstd_file(tar, out / "bench.tar.zst")),
            ("gzip", lambda: compress.gzip_file(tar, out / "bench.tar.gz")),
        ]
        for name, step in steps:
            _reset_hwm()
            t = time.perf_counter()
            output = step()
            result["phases"][name] = {"wall_s": time.perf_counter() - t,
                                      "peak_rss": _vm_hwm("self") or 0,
                                      "size": output.size, "digest": output.digest}
        tar.unlink()  # as images.write does once both compressed files exist
    result["vm_hwm_end"] = _vm_hwm("self") or 0
    Path(spec["result"]).write_text(json.dumps(result))


def run_child(kind: str, spec: dict[str, Any], work: Path) -> tuple[Run, dict[str, Any]]:
    spec_path = work / f"child-{kind}.json"
    spec = dict(spec, result=str(work / f"child-{kind}.result.json"))
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p))
    run = measure([sys.executable, "-m", "tools.bench", "--child", kind, str(spec_path)],
                  work / f"child-{kind}.log", env=env, cwd=REPO_ROOT)
    return run, json.loads(Path(spec["result"]).read_text())


# -- one scale: ours, then the standard tools ------------------------------------------------------
@dataclass
class ScaleResult:
    scale: int
    images: int
    input_bytes: int  # gzip layer bytes packed
    raw_bytes: int  # the same layers uncompressed (what a docker-archive holds)
    ours: dict[str, Any] = field(default_factory=dict)
    standard: dict[str, Any] | None = None
    ratios: dict[str, float] = field(default_factory=dict)


def _sha256sum(files: list[Path], work: Path, log: Path) -> tuple[Run, dict[str, str]]:
    run = measure(["sha256sum", *map(str, files)], log, cwd=work)
    digests = {}
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 64:
            digests[Path(parts[1].lstrip("*")).name] = "sha256:" + parts[0]
    return run, digests


def run_ours(store: Store, images: list[ArchiveImage], work: Path) -> dict[str, Any]:
    out = work / "ours"
    out.mkdir()
    spec = {"store": str(store.root), "images": [(i.name, i.manifest_digest) for i in images],
            "out": str(out)}
    run, child = run_child("ours", spec, work)
    zst, gz = out / "bench.tar.zst", out / "bench.tar.gz"
    sha_run, digests = _sha256sum([zst, gz], out, work / "ours-sha256sum.log")
    phases = child["phases"]
    agree = (digests.get(zst.name) == phases["zstd"]["digest"]
             and digests.get(gz.name) == phases["gzip"]["digest"])
    if not agree:
        raise RuntimeError(f"bench: sha256sum disagrees with our own digests: {digests} {phases}")
    zst.unlink()
    gz.unlink()
    return {"total": asdict(run), "phases": phases,
            "sizes": {"tar": phases["archive"]["size"], "tar_zst": phases["zstd"]["size"],
                      "tar_gz": phases["gzip"]["size"]},
            "digest_extra_passes": 0, "sha256sum_check": asdict(sha_run),
            "sha256sum_agrees": agree}


def run_standard(store: Store, images: list[ArchiveImage], work: Path) -> dict[str, Any]:
    layout = work / "oci-layout"
    write_layout(store, images, layout, link=True)  # hard links: no copy, same bytes
    out = work / "std"
    out.mkdir()
    tmp = work / "skopeo-tmp"  # skopeo buffers each decompressed layer here ($TMPDIR)
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    logs = work / "std.log"
    copy, z16, z3, sha = Run(), Run(), Run(), Run()
    sizes = {"docker_archive": 0, "zst16": 0, "zst3": 0}
    for i, image in enumerate(images):
        tar = out / f"{i:03d}.tar"
        tag = image.name.rsplit(":", 1)[1]
        copy.add(measure(["skopeo", "--insecure-policy", "copy", "-q", f"oci:{layout}:{tag}",
                          f"docker-archive:{tar}:{image.name}"], logs, env=env))
        sizes["docker_archive"] += tar.stat().st_size
        for level, acc, key in ((16, z16, "zst16"), (3, z3, "zst3")):
            dest = out / f"{i:03d}.tar.{level}.zst"
            acc.add(measure(["zstd", "-q", "-f", "-T0", f"-{level}", "--long=25", str(tar),
                             "-o", str(dest)], logs))
            sizes[key] += dest.stat().st_size
            if level == 16:  # the release's checksum file needs a separate pass over the output
                sha.add(_sha256sum([dest], out, work / "std-sha256sum.log")[0])
            dest.unlink()
        tar.unlink()
    shutil.rmtree(layout)
    return {"multi_image_archive": False, "skopeo_copy": asdict(copy),
            "zstd16": asdict(z16), "zstd3": asdict(z3), "sha256sum": asdict(sha),
            "sizes": sizes}


def ratios(ours: dict[str, Any], std: dict[str, Any]) -> dict[str, float]:
    """ours / standard: below 1 means ours is faster or smaller."""
    ph = ours["phases"]
    cp, z16, z3 = std["skopeo_copy"], std["zstd16"], std["zstd3"]
    zst_path_ours = ph["archive"]["wall_s"] + ph["zstd"]["wall_s"]
    zst_path_std = cp["wall_s"] + z16["wall_s"] + std["sha256sum"]["wall_s"]
    peak_std = max(cp["peak_rss"], z16["peak_rss"], std["sha256sum"]["peak_rss"])
    return {
        "pack_time": ph["archive"]["wall_s"] / cp["wall_s"],
        "pack_rss": ph["archive"]["peak_rss"] / cp["peak_rss"],
        "zstd_vs_16_time": ph["zstd"]["wall_s"] / z16["wall_s"],
        "zstd_vs_16_rss": ph["zstd"]["peak_rss"] / z16["peak_rss"],
        "zstd_vs_16_size": ours["sizes"]["tar_zst"] / std["sizes"]["zst16"],
        "zstd_vs_3_time": ph["zstd"]["wall_s"] / z3["wall_s"],
        "zstd_vs_3_rss": ph["zstd"]["peak_rss"] / z3["peak_rss"],
        "zstd_vs_3_size": ours["sizes"]["tar_zst"] / std["sizes"]["zst3"],
        "tar_zst_total_time": zst_path_ours / zst_path_std,
        "tar_zst_total_rss": ours["total"]["peak_rss"] / peak_std,
    }


# -- report ----------------------------------------------------------------------------------------
def _t(run: dict[str, Any], input_bytes: int | None = None) -> str:
    s = f"{run['wall_s']:.1f} s"
    if input_bytes:
        s += f" ({human(input_bytes / max(run['wall_s'], 1e-9))}/s)"
    return s


def table(res: ScaleResult) -> str:
    o, s, r = res.ours, res.standard, res.ratios
    ph = o["phases"]
    head = (f"### scale {res.scale}×: {res.images} images, {human(res.input_bytes)} of gzip layers "
            f"({human(res.raw_bytes)} uncompressed)\n\n")
    if s is None:
        rows = [
            "| step (ours) | time | peak RSS | output |",
            "|---|---|---|---|",
            f"| write_archive → .tar | {_t(ph['archive'], res.input_bytes)} | {human(ph['archive']['peak_rss'])} | {human(o['sizes']['tar'])} |",
            f"| zstd_file (-3 --long=25) | {_t(ph['zstd'], res.input_bytes)} | {human(ph['zstd']['peak_rss'])} | {human(o['sizes']['tar_zst'])} |",
            f"| gzip_file (-6) | {_t(ph['gzip'], res.input_bytes)} | {human(ph['gzip']['peak_rss'])} | {human(o['sizes']['tar_gz'])} |",
            f"| whole step (one process) | {_t(o['total'], res.input_bytes)} | {human(o['total']['peak_rss'])} | |",
        ]
        return head + "\n".join(rows) + "\n\n(standard tools not run at this scale)\n"
    cp, z16, z3, sha = s["skopeo_copy"], s["zstd16"], s["zstd3"], s["sha256sum"]
    n = cp["runs"]
    ours_zst = {"wall_s": ph["archive"]["wall_s"] + ph["zstd"]["wall_s"]}
    std_zst = {"wall_s": cp["wall_s"] + z16["wall_s"] + sha["wall_s"]}
    rows = [
        "| step | ours | standard | time ours/std | peak RSS ours | peak RSS std | RSS ours/std |",
        "|---|---|---|---|---|---|---|",
        f"| pack (write_archive vs skopeo copy ×{n}) | {_t(ph['archive'], res.input_bytes)} | {_t(cp, res.input_bytes)} | {r['pack_time']:.2f} | {human(ph['archive']['peak_rss'])} | {human(cp['peak_rss'])} | {r['pack_rss']:.2f} |",
        f"| zstd: ours -3 --long=25 vs zstd -T0 -16 --long=25 | {_t(ph['zstd'])} | {_t(z16)} | {r['zstd_vs_16_time']:.3f} | {human(ph['zstd']['peak_rss'])} | {human(z16['peak_rss'])} | {r['zstd_vs_16_rss']:.2f} |",
        f"| zstd: ours vs zstd -T0 -3 --long=25 | {_t(ph['zstd'])} | {_t(z3)} | {r['zstd_vs_3_time']:.2f} | {human(ph['zstd']['peak_rss'])} | {human(z3['peak_rss'])} | {r['zstd_vs_3_rss']:.2f} |",
        f"| sha256 of .tar.zst | hashed while writing (0 extra passes) | sha256sum {_t(sha)} | 0 | 0 | {human(sha['peak_rss'])} | |",
        f"| **to .tar.zst + sha256** | {_t(ours_zst, res.input_bytes)} | {_t(std_zst, res.input_bytes)} | **{r['tar_zst_total_time']:.3f}** | {human(o['total']['peak_rss'])} | {human(max(cp['peak_rss'], z16['peak_rss']))} | **{r['tar_zst_total_rss']:.2f}** |",
        f"| gzip_file -6 → .tar.gz (ours only) | {_t(ph['gzip'], res.input_bytes)} | — | | {human(ph['gzip']['peak_rss'])} | | |",
        f"| whole step, ours (one process: tar+zst+gz) | {_t(o['total'], res.input_bytes)} | | | {human(o['total']['peak_rss'])} | | |",
    ]
    sizes = (f"\nOutput sizes: ours .tar {human(o['sizes']['tar'])}, .tar.zst "
             f"{human(o['sizes']['tar_zst'])}, .tar.gz {human(o['sizes']['tar_gz'])}; standard "
             f"docker-archives {human(s['sizes']['docker_archive'])} (layers decompressed), "
             f"zstd -16 {human(s['sizes']['zst16'])} (ours/std {r['zstd_vs_16_size']:.3f}), "
             f"zstd -3 {human(s['sizes']['zst3'])} (ours/std {r['zstd_vs_3_size']:.3f}).\n")
    return head + "\n".join(rows) + "\n" + sizes


def memory_table(results: list[ScaleResult]) -> str:
    rows = ["| scale | input | ours: whole step | ours: archive / zstd / gzip | skopeo copy | zstd -16 | zstd -3 |",
            "|---|---|---|---|---|---|---|"]
    for res in results:
        ph, s = res.ours["phases"], res.standard
        std = (f"{human(s['skopeo_copy']['peak_rss'])} | {human(s['zstd16']['peak_rss'])} | "
               f"{human(s['zstd3']['peak_rss'])}") if s else "— | — | —"
        rows.append(f"| {res.scale}× | {human(res.input_bytes)} | {human(res.ours['total']['peak_rss'])} | "
                    f"{human(ph['archive']['peak_rss'])} / {human(ph['zstd']['peak_rss'])} / "
                    f"{human(ph['gzip']['peak_rss'])} | {std} |")
    return "### peak RSS by input size\n\n" + "\n".join(rows) + "\n"


# -- main ------------------------------------------------------------------------------------------
def _tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except OSError:
        return "missing"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n")[0])
    p.add_argument("--size-mib", type=int, default=1024, help="gzip layer MiB at scale 1")
    p.add_argument("--images", type=int, default=8, help="images at scale 1")
    p.add_argument("--scales", default="1,4", help="comma-separated multiples of the input")
    p.add_argument("--std-scales", default=None,
                   help="scales at which to run the standard tools too (default: all)")
    p.add_argument("--random-fraction", type=float, default=0.75,
                   help="share of each MiB of layer content that is random (the rest is text)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="generator processes")
    p.add_argument("--out", type=Path, default=None, help="results dir (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the scratch store and layouts")
    p.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        child_main(args.child[0], Path(args.child[1]))
        return {}
    scales = sorted({int(s) for s in args.scales.split(",") if s.strip()})
    std_scales = set(scales) if args.std_scales is None else \
        {int(s) for s in args.std_scales.split(",") if s.strip()}
    if not scales or min(scales) < 1 or args.size_mib < 1 or args.images < 1 \
            or not 0.05 <= args.random_fraction <= 1:
        sys.exit("bench: need --scales ≥ 1, --size-mib ≥ 1, --images ≥ 1, --random-fraction in 0.05..1")
    for tool in ("skopeo", "zstd", "sha256sum"):
        if std_scales & set(scales) and shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is not installed (scripts/setup installs it)")

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="rig-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    largest = args.size_mib * MIB * max(scales)
    need = int(DISK_FACTOR * largest)
    free = shutil.disk_usage(out).free
    if free < need:
        sys.exit(f"bench: {out} has {human(free)} free; the {max(scales)}× run needs about "
                 f"{human(need)} ({DISK_FACTOR}× its {human(largest)} of layers: "
                 "store, .tar, .tar.zst, .tar.gz). Use a smaller --size-mib or --scales, or "
                 "--out on a bigger disk.")
    scratch = out / "scratch"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    report: dict[str, Any] = {
        "params": {"size_mib": args.size_mib, "images": args.images, "scales": scales,
                   "std_scales": sorted(std_scales & set(scales)),
                   "random_fraction": args.random_fraction, "layer_shares": LAYER_SHARES,
                   "zstd_level_ours": compress.ZSTD_LEVEL, "gzip_level_ours": compress.GZIP_LEVEL,
                   "zstd_threads_ours": compress.default_threads()},
        "machine": {"cpus": os.cpu_count(), "python": py_platform.python_version(),
                    "kernel": py_platform.release(),
                    "skopeo": _tool_version(["skopeo", "--version"]),
                    "zstd": _tool_version(["zstd", "--version"])},
        "scales": [],
    }
    try:
        store = Store(scratch / "store")
        t = time.perf_counter()
        n_max = args.images * max(scales)
        print(f"bench: generating {n_max} images, {human(largest)} of gzip layers "
              f"in {scratch} ...", file=sys.stderr, flush=True)
        image_set = generate(store, n_max, args.size_mib * MIB // args.images,
                             args.random_fraction, max(1, args.jobs))
        report["generation"] = {"wall_s": time.perf_counter() - t,
                                "gzip_bytes": sum(image_set.layer_bytes),
                                "raw_bytes": sum(image_set.raw_bytes), "images": n_max}
        base, _ = run_child("baseline", {}, scratch)
        report["python_baseline_rss"] = base.peak_rss  # interpreter + builder imports, no work
        results = []
        for scale in scales:
            images, input_bytes, raw_bytes = image_set.first(args.images * scale)
            work = scratch / f"scale-{scale}"
            work.mkdir()
            print(f"bench: scale {scale}×: ours ...", file=sys.stderr, flush=True)
            res = ScaleResult(scale, len(images), input_bytes, raw_bytes)
            res.ours = run_ours(store, images, work)
            if scale in std_scales:
                print(f"bench: scale {scale}×: skopeo + zstd ...", file=sys.stderr, flush=True)
                res.standard = run_standard(store, images, work)
                res.ratios = ratios(res.ours, res.standard)
            results.append(res)
            report["scales"].append(asdict(res))
            (out / "bench.json").write_text(json.dumps(report, indent=2))  # partial results too
        if len(results) > 1:
            lo, hi = results[0], results[-1]
            report["ours_peak_rss_growth"] = hi.ours["total"]["peak_rss"] / lo.ours["total"]["peak_rss"]
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    print(f"## tools.bench: ours vs skopeo + zstd ({report['machine']['cpus']} CPUs, "
          f"{report['machine']['zstd']}; {report['machine']['skopeo']})\n")
    print(f"Generation: {report['generation']['wall_s']:.1f} s. Python + builder imports "
          f"alone: {human(report['python_baseline_rss'])} RSS. Ratios are ours/standard "
          "(< 1: ours faster or smaller). Standard = one `skopeo copy` per image (skopeo cannot "
          "write several images into one docker-archive), times summed.\n")
    for res in results:
        print(table(res))
    print(memory_table(results))
    if "ours_peak_rss_growth" in report:
        print(f"Ours, peak RSS {results[-1].scale}× vs {results[0].scale}× input: "
              f"{report['ours_peak_rss_growth']:.2f}×\n")
    print(f"Raw figures: {out / 'bench.json'}")
    return report


if __name__ == "__main__":
    main()
