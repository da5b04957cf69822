"""`make ci` says up front what its build step needs (scripts/preflight.py), before lint and tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEX = "4bc04c3f50725fa29ac9f0626c553941cfe07d128b3a313b7f5d176b07ab786e"
NEEDS_VARS = ("BUILDER_MIRRORS", "BUILDER_TRIVY_DB", "BUILDER_TRIVY_DB_REF")


def _lock(files_host: str, registry_host: str) -> str:
    return f"""schema: 1
release: {{name: rke2, version: v1.32.13+rke2r1}}
arches: [amd64]
components:
  kubelet:
    version: v1.32.13
    arches:
      amd64: {{url: "http://{files_host}/kubelet", sha256: {HEX}}}
images:
  - ref: {registry_host}/rancher/mirrored-pause:3.6
    groups: [core]
    digest: sha256:{HEX}
    platforms: {{amd64: "sha256:{HEX}"}}
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in NEEDS_VARS and k != "MAKEFLAGS"}
    return dict(env, **extra)


def _preflight(lock: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/preflight.py", "--lock", str(lock)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def closed_port() -> Iterator[str]:
    """127.0.0.1:PORT bound but not listening: a real `Connection refused`, as from a host with no
    route to the lock's servers (no port to race for while the test runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_make_ci_stops_before_lint_and_says_what_build_needs() -> None:
    started = time.monotonic()
    res = subprocess.run(["make", "ci"], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode != 0
    assert time.monotonic() - started < 60  # before lint and the tests, not after them
    assert "ruff" not in res.stdout + res.stderr
    assert "make ci: the build step (fetch, build, scan of images.lock) cannot run on this host:" in res.stderr
    assert ("  - no vulnerability database (BUILDER_TRIVY_DB and BUILDER_TRIVY_DB_REF are not set)"
            in res.stderr)
    assert "It needs a connected host, or mirrors for the lock's files and registries" in res.stderr
    assert "`make demo` runs the whole pipeline through a loopback mirror" in res.stderr


def test_unreachable_hosts_and_no_mirrors_are_named(tmp_path: Path, closed_port: str) -> None:
    lock = tmp_path / "images.lock"
    lock.write_text(_lock(closed_port, closed_port))
    res = _preflight(lock, _env(BUILDER_TRIVY_DB=str(tmp_path)))
    assert res.returncode == 2
    problems = [line for line in res.stderr.splitlines() if line.startswith("  - ")]
    assert problems == [f"  - no mirrors (BUILDER_MIRRORS is not set) and no connection to 1 of the "
                        f"lock's hosts: {closed_port} (Connection refused)"]


def test_mirrors_file_and_database_are_enough(tmp_path: Path, closed_port: str) -> None:
    lock = tmp_path / "images.lock"
    lock.write_text(_lock(closed_port, closed_port))
    mirrors = tmp_path / "mirrors.yaml"
    mirrors.write_text("files: []\n")
    res = _preflight(lock, _env(BUILDER_MIRRORS=str(mirrors), BUILDER_TRIVY_DB_REF=f"x@sha256:{HEX}"))
    assert (res.returncode, res.stderr) == (0, "")
    missing = _preflight(lock, _env(BUILDER_MIRRORS=str(tmp_path / "nope.yaml"),
                                    BUILDER_TRIVY_DB=str(tmp_path)))
    assert missing.returncode == 2
    assert f"  - BUILDER_MIRRORS names {tmp_path / 'nope.yaml'}, which is not a file" in missing.stderr


def test_reachable_hosts_and_database_are_enough(tmp_path: Path, fileserver, registry) -> None:
    lock = tmp_path / "images.lock"
    lock.write_text(_lock(fileserver.url.split("//", 1)[1], registry.host))
    res = _preflight(lock, _env(BUILDER_TRIVY_DB=str(tmp_path)))
    assert (res.returncode, res.stderr) == (0, "")
