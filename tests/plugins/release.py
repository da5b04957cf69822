"""Fixtures for verify / sign / release / pull-release: a real artifacts directory built once.

``built_release`` is the session's real release (tests/plugins/built.py: lock, fetch and build
through the loopback mirror with real Debian binaries and fixture images), and
``release_dir`` gives each test its own copy to tamper with. ``scan_pass`` writes the scan status
the release gate reads, by hand (see ``write_scan_status``), so these tests do not run Trivy.
``github_fake`` is the local stand-in for the GitHub REST API (tests/rig/github_fake.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder import digest as dg
from builder.lock import lockfile
from tests.plugins.built import REPO
from tests.plugins.releases import Release, unsigned_copy
from tests.rig.github_fake import FakeGitHub


@dataclass(frozen=True)
class Built:
    directory: Path
    lock: Path
    store: Path
    name: str
    version: str
    arches: tuple[str, ...]


def run_builder(*args: str, env: dict[str, str] | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python -m builder ARGS`` in a subprocess (what a person or CI runs)."""
    proc = subprocess.run([sys.executable, "-m", "builder", *args], cwd=REPO, text=True,
                          capture_output=True, env={**os.environ, **(env or {})}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m builder {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def built_release(built) -> Built:
    """The session's real release (tests/plugins/built.py), seen as a release directory."""
    lock = lockfile.load(built.lock)
    return Built(built.out, built.lock, built.store, lock.release.name, lock.release.version, lock.arches)


@pytest.fixture
def release_dir(built_release: Built, tmp_path: Path) -> Path:
    """A private copy of the built artifacts (tests flip bytes in it)."""
    dest = tmp_path / "artifacts"
    shutil.copytree(built_release.directory, dest)
    return dest


def scanned_release(release: Release, directory: Path) -> Path:
    """An unsigned copy of a real release (tests/plugins/releases.py: ``releases["v1"]``, about
    27 MiB) in ``directory``, with a passing scan status."""
    unsigned_copy(release, directory)
    write_scan_status(directory)
    return directory


def write_scan_status(directory: Path, verdict: str = "pass") -> Path:
    """The status file builder.scan.gate.require_passed reads, written by hand (no Trivy here):
    schema 1, the verdict, and the checksum files it covers (so later changes are caught)."""
    covered = {p.name: dg.of_file(p)[0] for p in sorted(directory.glob("sha256sum-*.txt"))}
    status = {"schema": 1, "verdict": verdict, "covered": covered,
              "failing": [] if verdict == "pass" else
              [{"target": "fixture", "package": "libfoo1", "id": "CVE-2099-0001"}]}
    path = directory / "scan" / "status.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(status))
    return path


@pytest.fixture
def github_fake(tmp_path: Path) -> Iterator[FakeGitHub]:
    fake = FakeGitHub(tmp_path / "github", token="ghs-test-token-0123").start()
    yield fake
    fake.stop()
