"""The CLI as a newcomer meets it: errors to act on, help that explains, output to follow or parse.

Everything runs ``python -m builder`` against the real rig: a plain-HTTP CNCF registry
(``anon_setup``), the session's real release (``built``), and ports where nothing listens.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from tests.plugins.release import run_builder

REPO = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    """A loopback port nothing listens on (bound once by us, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_lock(path: Path, ref: str, arches: tuple[str, ...] = ("amd64",)) -> Path:
    """A hand-written lock holding one unresolved image (what a newcomer writes first)."""
    path.write_text(yaml.safe_dump({
        "schema": 1, "release": {"name": "rke2", "version": "v1.32.13+rke2r1"},
        "arches": list(arches), "components": {}, "images": [{"ref": ref, "groups": ["core"]}],
    }, sort_keys=False))
    return path


# -- 5. errors a newcomer can act on --------------------------------------------------------------


def test_plain_http_registry_without_insecure_says_to_list_it_in_the_mirrors_file(anon_setup, tmp_path):
    """Before: `TLS verification failed: [SSL: WRONG_VERSION_NUMBER] ...`, hint `ca_file`."""
    host = anon_setup.host
    lock = image_lock(tmp_path / "other.yaml", anon_setup.images[0].ref(host))
    res = run_builder("--lock", str(lock), "--store", str(tmp_path / "store"), "lock", check=False)
    assert res.returncode == 1, res.stderr
    assert f"{host} answered in plain HTTP, not TLS" in res.stderr
    assert ("hint: if " + host + " is meant to be reached without TLS: list plain-HTTP registries "
            "under `insecure:` in this host's mirrors file (--mirrors FILE or BUILDER_MIRRORS)") in res.stderr
    assert f"`insecure: [{host}]`" in res.stderr
    assert "ca_file" not in res.stderr and "Traceback" not in res.stderr
    assert yaml.safe_load(lock.read_text())["images"][0].get("digest") is None  # nothing written


def test_insecure_written_as_an_http_url_is_accepted(anon_setup, tmp_path):
    """`insecure: [http://host:port]` used to be kept as written and so never matched a host."""
    host = anon_setup.host
    lock = image_lock(tmp_path / "other.yaml", anon_setup.images[0].ref(host))
    mirrors = tmp_path / "mirrors.yaml"
    mirrors.write_text(f"insecure: ['http://{host}/']\n")
    res = run_builder("--lock", str(lock), "--store", str(tmp_path / "store"), "--mirrors",
                      str(mirrors), "lock")
    assert f"{lock}: updated" in res.stderr
    assert yaml.safe_load(lock.read_text())["images"][0]["digest"].startswith("sha256:")


@pytest.mark.parametrize("entry", ["https://reg.internal:5000", "reg.internal:5000/v2",
                                   "user@reg.internal"])
def test_insecure_entry_that_is_no_host_is_refused(tmp_path, entry):
    lock = image_lock(tmp_path / "images.lock", "reg.internal:5000/app:1")
    mirrors = tmp_path / "host-mirrors.yaml"
    mirrors.write_text(yaml.safe_dump({"insecure": ["ok.internal", entry]}))
    res = run_builder("--lock", str(lock), "--mirrors", str(mirrors), "lock", "--check", check=False)
    assert res.returncode == 1
    assert (f"{mirrors}: insecure[1]: expected a registry host[:port] (e.g. registry.internal:5000 "
            f"or http://registry.internal:5000), got {entry!r}") in res.stderr


def test_connection_refused_keeps_its_cause(tmp_path):
    """requests' text runs past 200 characters; the cut used to drop `Connection refused`."""
    host = f"127.0.0.1:{closed_port()}"
    lock = image_lock(tmp_path / "images.lock", f"{host}/app:1")
    mirrors = tmp_path / "mirrors.yaml"
    mirrors.write_text(f"insecure: [{host}]\n")
    res = run_builder("--lock", str(lock), "--store", str(tmp_path / "store"), "--mirrors",
                      str(mirrors), "lock", check=False)
    assert res.returncode == 1
    assert f"Connection refused ({host}) (after 5 attempts)" in res.stderr, res.stderr
    assert "HTTPConnectionPool" not in res.stderr


def test_errors_name_the_lock_file_actually_used(tmp_path):
    lock = image_lock(tmp_path / "other.yaml", "reg.internal/app:1")
    res = run_builder("--lock", str(lock), "fetch", "--arch", "arm64", check=False)
    assert res.returncode == 1
    assert "error: other.yaml: arch arm64 is not in the lock (arches: amd64)" in res.stderr
    res = run_builder("--lock", str(lock), "--store", str(tmp_path / "s"), "fetch", "--arch", "amd64",
                      check=False)
    assert res.returncode == 1 and "error: other.yaml: 1 pin unresolved" in res.stderr, res.stderr
    assert "images.lock" not in res.stderr.split("hint:")[0]
