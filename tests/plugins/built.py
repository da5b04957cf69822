"""A real release built once per session through the loopback mirror (lock → fetch → build)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.rig import loopback

REPO = Path(__file__).resolve().parents[2]
EPOCH = "1700000000"


@dataclass(frozen=True)
class Built:
    work: Path
    lock: Path
    store: Path
    out: Path
    mirrors: Path | None = None  # the host's mirrors file (plain HTTP to the loopback registry)

    def cli(self, *args: str, out: Path | None = None, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "builder", "--lock", str(self.lock), "--store", str(self.store), *args]
        res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                             env=dict(os.environ, SOURCE_DATE_EPOCH=EPOCH,
                                      **({"BUILDER_MIRRORS": str(self.mirrors)} if self.mirrors else {}),
                                      **(env or {})))
        if check:
            assert res.returncode == 0, f"{argv}\n{res.stderr}"
        return res


@pytest.fixture(scope="session")
def fetched(tmp_path_factory) -> Iterator[Built]:
    """The session's lock resolved and every input in its store, nothing built yet (lock variants
    build from it: tests/plugins/releases.py)."""
    work = tmp_path_factory.mktemp("release")
    with loopback.running(work, resolved=False) as lb:
        b = Built(work, lb.lock_path, work / "store", work / "artifacts", lb.mirrors_path)
        b.cli("lock")
        b.cli("fetch", "--cross")
    yield b
    # ~0.6 GiB: gone even when some test failed (pytest then keeps the session's temp dirs).
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def built(fetched: Built) -> Built:
    """The session's real release: `fetched`, then `build --cross` into ``out``."""
    fetched.cli("build", "--cross", "--artifacts", str(fetched.out))
    return fetched
