"""`python -m builder lock` for files, against the loopback mirror: pins filled from published
checksum files where they exist, by hashing otherwise; a re-lock with nothing new changes no byte."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from builder import lockfile
from builder.resolve import parse_checksum_file
from rig import mirror

REPO = Path(__file__).resolve().parents[1]


def _blank(lock: lockfile.Lock) -> lockfile.Lock:
    comps = {}
    for name, comp in lock.components.items():
        arches = {}
        for arch, art in comp.arches.items():
            checksum = mirror.UPSTREAM + "runc/runc.sha256sum" if name == "runc" else None
            arches[arch] = replace(art, sha256=None, size=None, checksum_url=checksum)
        comps[name] = replace(comp, arches=arches)
    return replace(lock, components=comps)


def test_lock_resolves_and_is_stable(file_mirror, tmp_path):
    server, files = file_mirror
    expected = mirror.lock_for(files, server.url)
    path = tmp_path / "images.lock"
    lockfile.save(_blank(expected), path)
    args = [sys.executable, "-m", "builder", "--lock", str(path), "--store", str(tmp_path / "s"),
            "lock", "--files-only"]
    first = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    got = lockfile.load(path)
    for name, comp in expected.components.items():
        for arch, art in comp.arches.items():
            assert got.components[name].arches[arch].sha256 == art.sha256, f"{name}.{arch}"
            # The size too: from the hashed length, or from a HEAD beside a published checksum.
            assert got.components[name].arches[arch].size == art.size, f"{name}.{arch}"
    # Where a published checksum exists it was used; the rest was downloaded and hashed.
    assert "published checksum https://fixtures.invalid/runc/runc.sha256sum" in first.stderr
    assert "containerd-fixture-linux-amd64.tar.gz.sha256sum" in first.stderr
    assert "downloaded and hashed" in first.stderr
    before = path.read_bytes()
    second = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 0 and "unchanged" in second.stderr
    assert path.read_bytes() == before


def test_lock_check_only_validates(tmp_path):
    bad = tmp_path / "images.lock"
    bad.write_text((REPO / "images.lock").read_text().replace("- arm64\ncomponents", "- sparc\ncomponents"))
    res = subprocess.run([sys.executable, "-m", "builder", "--lock", str(bad), "lock", "--check"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 1
    assert "images.lock: arches[1]: unknown arch 'sparc'" in res.stderr
    ok = subprocess.run([sys.executable, "-m", "builder", "lock", "--check"], cwd=REPO,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "valid" in ok.stderr


def test_parse_checksum_file_forms():
    h = "a" * 64
    assert parse_checksum_file(h + "\n", "x") == h
    assert parse_checksum_file(f"{'b' * 64}  runc.amd64\n{h}  runc.arm64\n", "runc.arm64") == h
    assert parse_checksum_file(f"{h} *file.tar.gz\n", "file.tar.gz") == h
    assert parse_checksum_file(f"{h}  other\n", "file") is None
