"""Fixtures for the file-fetch area: the loopback file mirror seeded with real Debian payloads."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.lock import lockfile
from tests.rig import mirror, payloads
from tests.rig.faults import FaultProxy


@pytest.fixture(scope="session")
def mirror_files() -> tuple[Path, dict]:
    """The fixture file tree, built once and cached between runs (RIG_CACHE)."""
    root = payloads.cache_dir() / "mirror"
    return root, mirror.build(root)


@pytest.fixture
def file_mirror(mirror_files, fileserver):
    """nginx serving the fixture files; yields (server, files)."""
    root, files = mirror_files
    fileserver.root.rmdir()
    fileserver.root.symlink_to(root)
    return fileserver, files


@pytest.fixture
def fixture_lock(file_mirror, tmp_path) -> Path:
    server, files = file_mirror
    path = tmp_path / "images.lock"
    lockfile.save(mirror.lock_for(files, server.url), path)
    return path


@pytest.fixture
def fault_proxy(fileserver):
    proxy = FaultProxy(fileserver.url).start()
    yield proxy
    proxy.stop()
