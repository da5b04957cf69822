"""`python -m builder scan` over a real built release; a planted vulnerable image turns it red
and `release` then refuses the directory."""

from __future__ import annotations

import io
import json
import shutil
import stat
import tarfile
from dataclasses import replace

import pytest

from builder.errors import UnsafeArchive
from builder.lock import lockfile
from builder.oci.image import build_image, build_index
from builder.oci.layer import FileEntry, write_layer
from builder.oci.model import Platform
from builder.scan.release import _unpack_bundle
from builder.store import Store
from tests.plugins.scan import EPOCH, OS_RELEASE, VULN_ID, VULN_PACKAGE, VULN_SOURCE, dpkg_status
from tests.rig import payloads
from tests.rig.trivydb import TrivyDB

VULNERABLE = "docker.io/rancher/fixture-vulnerable:1.0"


def _db(tmp_path):
    return TrivyDB().add("debian 12", VULN_SOURCE, VULN_ID, fixed="1.0-2", severity="HIGH").write(tmp_path / "db")


def test_scan_of_the_fixture_release_passes_and_records_status(built, tmp_path):
    out = tmp_path / "artifacts"
    shutil.copytree(built.out, out)
    res = built.cli("scan", "--cross", "--artifacts", str(out), "--db", str(_db(tmp_path)), check=False)
    assert res.returncode == 0, res.stderr
    status = json.loads((out / "scan" / "status.json").read_text())
    assert status["verdict"] == "pass"
    summary = (out / "scan" / "summary.md").read_text()
    for arch in ("amd64", "arm64"):
        assert f"docker.io/rancher/rke2-runtime:v1.32.13-fixture1 ({arch})" in summary
        assert f"bundle rke2.linux-{arch} ({arch})" in summary
    assert list((out / "scan").glob("*.sarif")) and list((out / "scan").glob("*.cdx.json"))


def _vulnerable_image(store: Store) -> tuple[str, dict[str, str]]:
    manifests = []
    for arch in ("amd64", "arm64"):
        layers = [write_layer(store, [
            FileEntry("bin/busybox", payloads.binary("busybox", arch)),
            FileEntry("etc/os-release", OS_RELEASE, 0o644),
            FileEntry("etc/debian_version", b"12.5\n", 0o644),
            FileEntry("var/lib/dpkg/status", dpkg_status([(VULN_PACKAGE, VULN_SOURCE, "1.0-1")]), 0o644),
        ], EPOCH)]
        manifests.append(build_image(store, layers, Platform.for_arch(arch), EPOCH))
    index = build_index(store, manifests)
    return index.digest, {"amd64": manifests[0].digest, "arm64": manifests[1].digest}


def test_planted_vulnerable_image_turns_the_build_red(built, tmp_path):
    store = Store(built.store)
    index, platforms = _vulnerable_image(store)
    lock = lockfile.load(built.lock)
    pin = lockfile.ImagePin(VULNERABLE, ("core",), index, platforms)
    lock_path = tmp_path / "images.lock"
    lockfile.save(replace(lock, images=(*lock.images, pin)), lock_path)
    out = tmp_path / "artifacts"
    built.cli("--lock", str(lock_path), "build", "--cross", "--artifacts", str(out))
    res = built.cli("--lock", str(lock_path), "scan", "--cross", "--artifacts", str(out),
                    "--db", str(_db(tmp_path)), check=False)
    assert res.returncode == 3, res.stdout + res.stderr
    text = res.stdout + res.stderr
    assert VULN_ID in text and VULN_PACKAGE in text and VULNERABLE in text
    assert json.loads((out / "scan" / "status.json").read_text())["verdict"] == "fail"
    # The release step refuses a directory whose scan failed.
    rel = built.cli("release", "--allow-unsigned", "--artifacts", str(out), "--registry", "127.0.0.1:9/none", "--dry-run",
                    check=False)
    assert rel.returncode != 0 and "scan" in rel.stderr.lower()


def _bundle_with(path, *members: tuple[tarfile.TarInfo, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)


def test_bundle_unpacked_for_the_scan_holds_plain_files_only(built, tmp_path):
    """The scan writes the bundle member by member (Debian 12's Python 3.11.2 has no tarfile
    extraction filters): setuid and world-write bits go, a link member is refused."""
    lock = lockfile.load(built.lock)
    bundle = tmp_path / "artifacts" / f"{lock.release.name}.linux-amd64.tar.gz"
    bundle.parent.mkdir()
    bindir, tool = tarfile.TarInfo("bin"), tarfile.TarInfo("bin/tool")
    bindir.type, bindir.mode, tool.mode = tarfile.DIRTYPE, 0o755, 0o4777
    _bundle_with(bundle, (bindir, b""), (tool, b"#!/bin/sh\n"))
    tree = _unpack_bundle(lock, "amd64", bundle.parent, tmp_path / "tree")
    assert (tree / "bin/tool").read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE((tree / "bin/tool").stat().st_mode) == 0o755

    link = tarfile.TarInfo("bin/sh")
    link.type, link.linkname = tarfile.SYMTYPE, "tool"
    _bundle_with(bundle, (link, b""))
    with pytest.raises(UnsafeArchive, match="member 'bin/sh' is a link"):
        _unpack_bundle(lock, "amd64", bundle.parent, tmp_path / "tree2")
