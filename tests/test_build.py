"""The build stage on a real release (Debian binaries, fixture images via the loopback mirror)."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from builder.assemble.build import build
from builder.assemble.state import STATE_FILE
from builder.errors import BuilderError
from builder.fetch import elf
from builder.lock import lockfile
from builder.oci import framed, pgzip
from builder.oci.archive import read_archive_index
from builder.progress import Reporter
from builder.store import Store
from tests.plugins.built import EPOCH, REPO

ARCHES = ("amd64", "arm64")


def _names(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if not p.name.startswith(".")}


def test_every_artifact_exists_and_sha256sum_accepts_it(built):
    names = _names(built.out)
    for arch in ARCHES:
        for base in ("rke2-images", "rke2-images-core", "rke2-images-canal", "rke2-images-multus"):
            for ext in (".tar.zst", ".tar.gz", ".txt"):
                assert f"{base}.linux-{arch}{ext}" in names
        assert {f"rke2.linux-{arch}.tar.gz", f"rke2-images-all.linux-{arch}.txt", f"sha256sum-{arch}.txt"} <= names
        listed = {line.split()[1] for line in (built.out / f"sha256sum-{arch}.txt").read_text().splitlines()}
        assert listed == {n for n in names if arch in n and not n.startswith("sha256sum")}
    res = subprocess.run(["sha256sum", "--strict", "-c", "sha256sum-amd64.txt", "sha256sum-arm64.txt"],
                         cwd=built.out, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_lists_and_archive_contents(built):
    core = (built.out / "rke2-images-core.linux-amd64.txt").read_text().splitlines()
    assert core[0] == "docker.io/rancher/rke2-runtime:v1.32.13-fixture1"  # runtime first, as upstream
    assert "docker.io/rancher/mirrored-library-busybox:1.36.1" in core
    allinone = (built.out / "rke2-images.linux-amd64.txt").read_text().splitlines()
    canal = (built.out / "rke2-images-canal.linux-amd64.txt").read_text().splitlines()
    assert allinone == core + canal  # the legacy archive = default groups core + canal
    every = (built.out / "rke2-images-all.linux-amd64.txt").read_text().splitlines()
    assert every == sorted(set(every)) and set(core) | set(canal) <= set(every)
    for ext in (".tar.zst", ".tar.gz"):
        imgs = read_archive_index(built.out / f"rke2-images.linux-arm64{ext}", verify=True)
        assert [i.name for i in imgs] == allinone
        assert {str(i.platform) for i in imgs} == {"linux/arm64/v8"}


def test_compressed_forms_pass_their_own_tools(built):
    assert subprocess.run(["zstd", "-tq", *map(str, built.out.glob("*.tar.zst"))]).returncode == 0
    assert subprocess.run(["gzip", "-t", *map(str, built.out.glob("*.tar.gz"))]).returncode == 0
    assert subprocess.run(["pigz", "-t", *map(str, built.out.glob("*.tar.gz"))]).returncode == 0
    # Window within the rke2/k3s decoder's 32 MiB cap.
    res = subprocess.run(["zstd", "-lv", str(built.out / "rke2-images.linux-amd64.tar.zst")],
                         capture_output=True, text=True)
    window = next(line for line in res.stdout.splitlines() if "Window Size" in line)
    assert "MiB" not in window or float(window.split(":")[1].split()[0]) <= 32


def test_image_archives_are_the_parallel_gzip(built):
    """The image archives are gzipped by builder.oci.pgzip (their recipe says so), a member per
    tar segment (builder/oci/framed.py): each member the bytes one worker gives for what it
    holds, so any thread count gives them. (The single-stream gzip gave other bytes for anything
    over one 128 KiB block. The fixture's bundle is below one block, where both give the same
    bytes: tests/test_pgzip.py.)"""
    path = built.out / "rke2-images-core.linux-amd64.tar.gz"
    data = path.read_bytes()
    members = [data[f.offset:f.end] for f in framed.scan_frames(path).frames]
    segments = [gzip.decompress(member) for member in members]
    assert max(len(s) for s in segments) > pgzip.BLOCK_SIZE
    assert [pgzip.compress(s, threads=1) for s in segments] == members


def test_skopeo_reads_the_docker_archive(built, tmp_path):
    tar = tmp_path / "core.tar"
    subprocess.run(f"zstd -dc {built.out / 'rke2-images-core.linux-amd64.tar.zst'} > {tar}", shell=True, check=True)
    res = subprocess.run(["skopeo", "inspect", f"docker-archive:{tar}:docker.io/rancher/mirrored-library-busybox:1.36.1"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert '"Architecture": "amd64"' in res.stdout


def _runtime_layer_files(built, arch: str) -> dict[str, bytes]:
    env = {}
    with tarfile.open(built.out / f"rke2.linux-{arch}.tar.gz") as tar:
        text = tar.extractfile("share/rke2/release.env").read().decode()
    for line in text.splitlines():
        key, _, value = line.partition("=")
        env[key] = value.strip("'")
    files: dict[str, bytes] = {}
    with tarfile.open(built.out / f"{env['RUNTIME_ARCHIVE']}.tar.gz") as tar:
        for layer in env["RUNTIME_LAYERS"].split():
            blob = tar.extractfile(f"blobs/sha256/{layer.split(':')[1]}").read()
            with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as lt:
                for m in lt:
                    if m.isfile():
                        files[m.name] = lt.extractfile(m).read()
    return files


def test_runtime_binaries_run_after_extraction(built, tmp_path):
    files = _runtime_layer_files(built, "amd64")
    assert {"bin/containerd", "bin/containerd-shim-runc-v2", "bin/ctr", "bin/runc", "bin/kubelet",
            "bin/crictl", "bin/kubectl", "bin/socat", "charts/fixture-chart.yaml"} <= set(files)
    for name in ("runc", "containerd"):
        path = tmp_path / name
        path.write_bytes(files[f"bin/{name}"])
        path.chmod(0o755)
        res = subprocess.run([str(path), "--version"], capture_output=True, text=True)
        assert res.returncode == 0 and name in res.stdout.lower(), res.stdout + res.stderr


def test_arm64_archive_holds_only_arm64_elf(built):
    files = _runtime_layer_files(built, "arm64")
    arches = {elf.arch_of(io.BytesIO(data)) for name, data in files.items()} - {None}
    assert arches == {"arm64"}


def test_bundle_layout_and_release_description(built):
    with tarfile.open(built.out / "rke2.linux-amd64.tar.gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        env = tar.extractfile("share/rke2/release.env").read().decode()
    assert {"bin/rke2", "bin/rke2-killall.sh", "bin/rke2-uninstall.sh",
            "lib/systemd/system/rke2-server.service", "lib/systemd/system/rke2-agent.env",
            "share/rke2/LICENSE.txt", "share/rke2/rke2-cis-sysctl.conf", "share/rke2/release.env"} <= set(members)
    assert all(m.uid == 0 and m.gid == 0 and m.uname == "" for m in members.values())
    assert all(m.mtime == int(EPOCH) for m in members.values())
    assert "RUNTIME_IMAGE='docker.io/rancher/rke2-runtime:v1.32.13-fixture1'" in env
    assert "DATA_KEY='v1.32.13-fixture1-" in env


def _copy_store(built, dest: Path) -> Path:
    """A store with the same blobs but no derived caches: the runtime image is built anew."""
    shutil.copytree(built.store / "blobs", dest / "blobs")
    return dest


def test_reproducible_in_another_directory_at_another_time(built, tmp_path):
    store = _copy_store(built, tmp_path / "store")
    out = tmp_path / "elsewhere" / "artifacts"
    time.sleep(1.1)  # another time: every mtime must still come from SOURCE_DATE_EPOCH
    res = subprocess.run([sys.executable, "-m", "builder", "--lock", str(built.lock), "--store", str(store),
                          "build", "--cross", "--artifacts", str(out)], cwd=tmp_path,
                         env=dict(os.environ, SOURCE_DATE_EPOCH=EPOCH), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert _names(out) == _names(built.out)
    for name in _names(out):
        assert (out / name).read_bytes() == (built.out / name).read_bytes(), name


# Runs ``python -m builder`` with an audit hook that logs, as JSON lines, every file the process
# opens for writing and every rename: what a build really touches, not what it says it did.
_RECORD_WRITES = """
import json, os, runpy, sys
log = os.open(sys.argv.pop(1), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def hook(event, args):
    if event == "open" and isinstance(args[2], int) and args[2] & WRITE and not isinstance(args[0], int):
        os.write(log, (json.dumps([event, os.fsdecode(args[0])]) + "\\n").encode())
    elif event == "os.rename":
        os.write(log, (json.dumps([event, os.fsdecode(args[0]), os.fsdecode(args[1])]) + "\\n").encode())
sys.addaudithook(hook)
runpy.run_module("builder", run_name="__main__", alter_sys=True)
"""


def _written_paths(built, args: list[str], log: Path) -> set[Path]:
    """Run the CLI; the paths it opened for writing or renamed (from or to)."""
    argv = [sys.executable, "-c", _RECORD_WRITES, str(log), "--lock", str(built.lock),
            "--store", str(built.store), *args]
    res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, SOURCE_DATE_EPOCH=EPOCH))
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in log.read_text().splitlines()]
    return {Path(p).resolve() for _, *paths in events for p in paths}


def _identity(out: Path) -> dict[str, tuple[int, int, int]]:
    """Every file of the artifacts directory, hidden ones too (the state file): inode, mtime, size."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir()}


def test_noop_rebuild_does_no_packaging(built, tmp_path):
    """Nothing changed: no artifact and not the state file is rewritten (same inode and mtime),
    and nothing is written into the staging directory. Only the checksum files are rewritten,
    with the same bytes."""
    out, work = built.out.resolve(), built.out.resolve().parent / ".artifacts.work"
    sums = {p.name: p.read_bytes() for p in out.glob("sha256sum-*.txt")}
    before = _identity(out)
    assert STATE_FILE in before and len(before) > len(sums) + 1
    written = _written_paths(built, ["build", "--cross", "--artifacts", str(out)], tmp_path / "writes.log")
    after = _identity(out)
    assert after.keys() == before.keys()
    assert {n: after[n] for n in after if n not in sums} == {n: before[n] for n in before if n not in sums}
    assert {name: (out / name).read_bytes() for name in sums} == sums
    assert not [p for p in written if p.is_relative_to(work)]  # no staging at all
    assert {p.name for p in written if p.is_relative_to(out) and not p.name.startswith(".sha256sum-")} \
        == set(sums)  # in the artifacts directory, only the checksum files' temp names and renames
    assert written, "the audit log recorded nothing: the hook did not run"


def test_one_image_changed_rebuilds_only_its_archives(built, tmp_path):
    out = tmp_path / "artifacts"
    shutil.copytree(built.out, out)
    lock = lockfile.load(built.lock)
    # Point the canal image at another image's digests (all are in the store already).
    socat = next(i for i in lock.images if "socat" in i.ref)
    other = next(i for i in lock.images if "busybox-list" in i.ref)
    images = tuple(replace(i, digest=other.digest, platforms=other.platforms) if i is socat else i
                   for i in lock.images)
    report = build(replace(lock, images=images), ARCHES, Store(built.store), out, Reporter(quiet=True),
                   epoch=int(EPOCH))
    for a in report.arches:
        assert sorted(a.rebuilt) == sorted([f"rke2-images.linux-{a.arch}", f"rke2-images-canal.linux-{a.arch}"])
    subprocess.run(["sha256sum", "--strict", "-c", "sha256sum-amd64.txt"], cwd=out, check=True,
                   capture_output=True)


def test_missing_platform_manifest_stops_before_writing(built, tmp_path):
    lock = lockfile.load(built.lock)
    bad = replace(lock.images[0], platforms={**lock.images[0].platforms, "arm64": "sha256:" + "0" * 64})
    lock = replace(lock, images=(bad, *lock.images[1:]))
    out = tmp_path / "artifacts"
    with pytest.raises(BuilderError) as err:
        build(lock, ARCHES, Store(built.store), out, Reporter(quiet=True), epoch=int(EPOCH))
    assert "arm64" in str(err.value) and "0" * 64 in str(err.value)
    assert list(out.iterdir()) == []  # nothing written, for any arch


def test_build_refuses_unresolved_lock():
    res = subprocess.run([sys.executable, "-m", "builder", "build", "--arch", "amd64"], cwd=REPO,
                         capture_output=True, text=True, env=dict(os.environ, SOURCE_DATE_EPOCH=EPOCH))
    assert res.returncode == 1 and "python -m builder lock" in res.stderr and "Traceback" not in res.stderr


def _staged(work: Path) -> dict[str, int]:
    """The files in the staging directory and their sizes (none of them is published yet)."""
    sizes = {}
    for p in work.iterdir() if work.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):  # renamed into place while we looked
            sizes[p.name] = p.stat().st_size
    return sizes


def _same_as_clean_build(built, out: Path) -> int:
    """Every file in ``out`` is one the clean build wrote, with its bytes (the state file: the
    same digests); returns how many files were compared."""
    clean = {p.name for p in built.out.iterdir()}
    have = {p.name for p in out.iterdir()} if out.exists() else set()
    assert have <= clean, f"not artifacts of a finished build: {sorted(have - clean)}"
    for name in have - {STATE_FILE}:
        assert (out / name).read_bytes() == (built.out / name).read_bytes(), name
    if STATE_FILE in have:
        def digests(d: Path) -> dict:
            entries = json.loads((d / STATE_FILE).read_text())
            return {n: f["sha256"] for e in entries.values() for n, f in e["files"].items()}
        assert digests(out).items() <= digests(built.out).items()
    return len(have)


def test_kill_9_during_packaging_leaves_no_partial_file(built, tmp_path):
    """The build is frozen (SIGSTOP) the moment a file in .artifacts.work/ has bytes, i.e. while
    it packs, then killed with SIGKILL. Nothing half-written may be in artifacts/, and the rerun
    finishes with the bytes of a clean build."""
    store = _copy_store(built, tmp_path / "store")
    out = tmp_path / "artifacts"
    argv = [sys.executable, "-m", "builder", "--lock", str(built.lock), "--store", str(store),
            "build", "--cross", "--artifacts", str(out)]
    env = dict(os.environ, SOURCE_DATE_EPOCH=EPOCH)
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    work = tmp_path / ".artifacts.work"

    def caught() -> bool:  # a file in staging has bytes: the build is packing
        return any(_staged(work).values())

    staged: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline and not staged:
            if caught():
                os.killpg(proc.pid, signal.SIGSTOP)  # freeze it mid-write, then look again
                # SIGSTOP is delivered asynchronously: wait until it has really stopped (or ended).
                stopped = os.waitid(os.P_PID, proc.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
                if stopped.si_code == os.CLD_STOPPED and caught():
                    staged = _staged(work)
                else:  # a file was published just now (or the build ended): go on
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGCONT)
            time.sleep(0.005)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build ended before it could be killed"
    assert any(staged.values()), "not caught while packing"
    assert _staged(work) == staged  # the killed build's partial files are still in staging ...
    _same_as_clean_build(built, out)  # ... and none of them in artifacts/, which holds only
    # complete files the clean build also wrote (if anything was published before the kill)

    rerun = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert not work.exists()
    assert {p.name for p in out.iterdir()} == {p.name for p in built.out.iterdir()}
    assert _same_as_clean_build(built, out) > len(ARCHES) * 12


def test_cross_and_arch_selection(monkeypatch):
    from builder.cli import select_arches

    lock = lockfile.load(REPO / "images.lock")
    assert select_arches(lock, None, False, {"CROSS": "1"}) == ("amd64", "arm64")
    assert select_arches(lock, None, False, {"ARCH": "arm64"}) == ("arm64",)
    assert select_arches(lock, ["arm64"], False, {}) == ("arm64",)
    with pytest.raises(BuilderError, match="s390x is not in the lock"):
        select_arches(lock, ["s390x"], False, {})
