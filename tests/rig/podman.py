"""A private podman for tests: its own root, runroot and XDG dirs, so nothing touches the host's
images and several tests can run it at once."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Podman:
    base: list[str]
    env: dict[str, str]

    def run(self, *args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.base, *args], capture_output=True, text=True, env=self.env,
                              timeout=timeout)


@contextlib.contextmanager
def private(work: Path) -> Iterator[Podman]:
    """podman with its storage under ``work`` (vfs: no overlay mounts needed)."""
    # podman refuses a runroot longer than 50 characters: use a short private one.
    with tempfile.TemporaryDirectory(prefix="pm-") as runroot:
        base = ["podman", "--root", str(work / "root"), "--runroot", runroot,
                "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "none"]
        env = dict(os.environ, XDG_RUNTIME_DIR=str(work / "xdg"),
                   XDG_CONFIG_HOME=str(work / "cfg"), XDG_DATA_HOME=str(work / "data"))
        yield Podman(base, env)
