"""Fixtures for the OCI area: real busybox images built with our own layer/image code, and a
private containerd 1.6 (own root, state and socket under tmp) to import and run them."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.oci.image import build_image
from builder.oci.layer import FileEntry, write_layer
from builder.oci.model import Descriptor, Platform
from builder.store import Store
from tests.rig import payloads
from tests.rig.procs import Process, wait_for

EPOCH = 1_700_000_000  # SOURCE_DATE_EPOCH of the fixture images
APPLETS = ("cat", "echo", "ls", "sh")


@dataclass(frozen=True)
class BusyboxImage:
    name: str
    arch: str
    manifest: Descriptor


def busybox_image(store: Store, arch: str, label: str = "a", media: str = "oci") -> Descriptor:
    """A runnable image: layer 1 is the real busybox-static binary of the arch, layer 2 adds
    applet links and a text file. Images with different labels share both layers."""
    binary = payloads.binary("busybox", arch)
    base = write_layer(store, [FileEntry("bin/busybox", binary, 0o755)], EPOCH)
    extra = write_layer(store, [
        *(FileEntry(f"bin/{a}", linkname="busybox") for a in APPLETS),
        FileEntry("etc/motd", b"built without docker\n", 0o644),
    ], EPOCH)
    return build_image(store, [base, extra], Platform.for_arch(arch), EPOCH,
                       labels={"fixture": label},
                       config={"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}, media=media)


def host_arch() -> str | None:
    """The fixture arch this machine can execute natively (None when it is neither)."""
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine())


@pytest.fixture(scope="session")
def busybox_binaries() -> dict[str, Path]:
    """The Debian busybox-static binary for amd64 and arm64 (apt-get download once, cached)."""
    return {arch: payloads.binary("busybox", arch) for arch in ("amd64", "arm64")}


# -- containerd --------------------------------------------------------------------------------
CONTAINERD_BINARIES = ("containerd", "ctr", "runc", "containerd-shim-runc-v2")


def containerd_missing() -> str | None:
    """Why a real containerd cannot run here, or None when it can."""
    missing = [b for b in CONTAINERD_BINARIES if shutil.which(b) is None]
    if missing:
        return f"containerd test needs {', '.join(missing)} on PATH (apt-get install containerd runc)"
    if os.geteuid() != 0:
        return "containerd test needs root (it mounts snapshots and runs runc)"
    return None


@dataclass
class Containerd:
    root: Path
    socket: Path
    process: Process
    namespace: str = "k8s.io"
    bin_dir: Path | None = None  # run containerd/ctr/shim/runc from here (a staged runtime)

    def ctr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        ctr = str(self.bin_dir / "ctr") if self.bin_dir else "ctr"
        return subprocess.run([ctr, "-a", str(self.socket), "-n", self.namespace, *args],
                              capture_output=True, text=True, timeout=timeout, env=_env(self.bin_dir))

    def images(self) -> dict[str, str]:
        """name → target digest of every image in the namespace."""
        out = self.ctr("images", "ls")
        assert out.returncode == 0, out.stderr
        rows = [line.split() for line in out.stdout.splitlines()[1:] if line.strip()]
        return {row[0]: row[2] for row in rows}


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return [p for p in points if p.startswith(prefix)]


def _shim_pids(socket: Path) -> list[int]:
    """Shims started for this containerd (they name its socket on their command line)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and str(socket).encode() in argv:
                pids.append(int(entry.name))
    return pids


def _env(bin_dir: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if bin_dir is not None:  # containerd finds its shim, and the shim finds runc, on PATH
        env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    return env


@pytest.fixture
def containerd() -> Iterator[Containerd]:
    reason = containerd_missing()
    if reason:
        pytest.skip(reason)
    with run_containerd() as daemon:
        yield daemon


@contextlib.contextmanager
def run_containerd(bin_dir: Path | None = None) -> Iterator[Containerd]:
    """A private containerd (own root, state and socket), optionally from a staged bin dir."""
    # A short private directory: socket paths must fit in sockaddr_un (108 bytes), which a deep
    # pytest basetemp may not.
    base = Path(tempfile.mkdtemp(prefix="ctd-"))
    socket = base / "c.sock"
    config = base / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{base}/root"\n'
        f'state = "{base}/state"\n'
        # No CRI: it wants CNI and a kubelet; the image and task services are all we need.
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{socket}"\n'
        f'[ttrpc]\n  address = "{socket}.ttrpc"\n'
        f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{base}/opt"\n'
    )
    exe = str(bin_dir / "containerd") if bin_dir else "containerd"
    proc = Process([exe, "--config", str(config)], log=base / "containerd.log", env=_env(bin_dir)).start()
    daemon = Containerd(base, socket, proc, bin_dir=bin_dir)
    try:
        wait_for(lambda: socket.exists() and daemon.ctr("version", timeout=5).returncode == 0,
                 "containerd", timeout=30, proc=proc.proc, log=proc.log)
        yield daemon
    finally:
        # Shims outlive containerd by design; stop ours by pid, then containerd's process group,
        # then unmount whatever snapshot mounts are left (deepest first).
        for pid in _shim_pids(socket):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        proc.stop()
        for point in sorted(_mounts_under(base), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        if not _mounts_under(base):  # never delete through a mount that is still there
            shutil.rmtree(base, ignore_errors=True)
