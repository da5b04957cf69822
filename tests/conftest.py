"""Shared fixtures. Each area keeps its own fixtures in tests/plugins/<area>.py (loaded here)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from builder.store import Store
from tests.rig.fileserver import FileServer
from tests.rig.registry import Registry

# A plugin another plugin imports is registered first (else pytest cannot rewrite its asserts).
_FIRST = ("built", "releases")
pytest_plugins = [f"tests.plugins.{stem}" for stem in sorted(
    (p.stem for p in (Path(__file__).parent / "plugins").glob("*.py") if p.stem != "__init__"),
    key=lambda stem: (stem not in _FIRST, _FIRST.index(stem) if stem in _FIRST else 0, stem))]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture
def fileserver(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("nginx")
    server = FileServer(root=base / "www", work=base / "work").start()
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)  # mktemp dirs outlive the test; a run starts dozens


@pytest.fixture
def registry(tmp_path_factory: pytest.TempPathFactory):
    """An anonymous CNCF distribution registry on 127.0.0.1."""
    work = tmp_path_factory.mktemp("registry")
    reg = Registry(work=work).start()
    yield reg
    reg.stop()
    shutil.rmtree(work, ignore_errors=True)  # up to hundreds of MiB of pushed blobs
