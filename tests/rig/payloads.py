"""Real fixture payloads: binaries from Debian packages for amd64 and arm64, fetched once.

`apt-get download` needs `dpkg --add-architecture arm64 && apt-get update` to have run (the
set-up script and .ci/run do it). Everything lands under one cache directory reused across runs
(``RIG_CACHE``, default ``~/.cache/airgap-builder-rig``).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("containerd", "runc", "socat", "busybox-static")
ARCHES = ("amd64", "arm64")

# Where each fixture binary sits inside its package.
BINARIES = {
    "containerd": ("containerd", "./usr/bin/containerd"),
    "containerd-shim": ("containerd", "./usr/bin/containerd-shim"),
    "containerd-shim-runc-v1": ("containerd", "./usr/bin/containerd-shim-runc-v1"),
    "containerd-shim-runc-v2": ("containerd", "./usr/bin/containerd-shim-runc-v2"),
    "ctr": ("containerd", "./usr/bin/ctr"),
    "runc": ("runc", "./usr/sbin/runc"),
    "socat": ("socat", "./usr/bin/socat"),
    "busybox": ("busybox-static", "./bin/busybox"),
}


def cache_dir() -> Path:
    root = os.environ.get("RIG_CACHE") or str(Path.home() / ".cache" / "airgap-builder-rig")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Deb:
    package: str
    arch: str
    path: Path

    @property
    def filename(self) -> str:
        return self.path.name


def deb(package: str, arch: str) -> Deb:
    """The package's .deb for that arch, downloaded on first use."""
    debs = cache_dir() / "debs" / arch
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*_{arch}.deb"))
    if not found:
        subprocess.run(["apt-get", "download", f"{package}:{arch}"], cwd=debs, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        found = sorted(debs.glob(f"{package}_*_{arch}.deb"))
        if not found:
            raise RuntimeError(f"apt-get download {package}:{arch} produced no .deb in {debs}")
    return Deb(package, arch, found[-1])


def extracted(package: str, arch: str) -> Path:
    root = cache_dir() / "root" / f"{package}_{arch}"
    marker = root / ".extracted"
    if not marker.exists():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(deb(package, arch).path), str(root)], check=True)
        marker.write_text("ok\n")
    return root


def binary(name: str, arch: str) -> Path:
    """A real binary for the arch, e.g. binary('runc', 'arm64')."""
    package, member = BINARIES[name]
    return extracted(package, arch) / member
