"""`python -m builder lock` for files, against the loopback mirror: pins filled from published
checksum files where they exist, by hashing otherwise; a re-lock with nothing new changes no byte."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import yaml

from builder.fetch.resolve import parse_checksum_file
from builder.lock import lockfile
from tests.rig import mirror
from tests.test_lockfile import counts

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


# -- every unresolved pin at once ---------------------------------------------------------------

def _expected_unresolved(path: Path, arches: tuple[str, ...]) -> dict[str, int]:
    """Counts restated from the raw YAML: a file pin per component and arch, a pin per image
    (other kinds, e.g. charts, as the lock counts them)."""
    found = lockfile.load(path).unresolved(arches)
    data = yaml.safe_load(path.read_text())
    files = sum(1 for comp in data["components"].values() if not comp.get("absent")
                for arch, art in comp.get("arches", {}).items()
                if arch in arches and not art.get("absent") and not art.get("sha256"))
    images = sum(1 for img in data.get("images") or []
                 if any(a in (img.get("arches") or arches) for a in arches)
                 and (not img.get("digest") or any(not (img.get("platforms") or {}).get(a)
                                                   for a in arches if a in (img.get("arches") or arches))))
    return {**{kind: len(pins) for kind, pins in found.items()}, "files": files, "images": images}


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builder", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_lock_check_counts_and_lists_every_unresolved_pin_of_the_committed_lock():
    lock = lockfile.load(REPO / "images.lock")
    want = _expected_unresolved(REPO / "images.lock", lock.arches)
    assert want["files"] and want["images"]  # the committed lock has both kinds unresolved
    res = _cli("lock", "--check")
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    total = sum(want.values())
    assert lines[0] == (f"images.lock: valid, {total} pins unresolved ({counts(**want)}) for "
                        f"amd64, arm64 ({len(lock.components)} components, {len(lock.images)} images)")
    # One line per pin under its kind, then what to do.
    assert lines[1] == "  files:" and lines[2 + want["files"]] == "  images:"
    assert "    components.rke2.amd64.sha256" in lines
    pins = [ln for ln in lines if ln.startswith("    ")]
    assert len(pins) == total
    assert sum(ln.startswith("    images[") for ln in pins) == want["images"]
    assert lines[-1].startswith("  hint: run `python -m builder lock`")


def test_lock_check_on_a_fully_resolved_lock(fixture_lock):
    lock = lockfile.load(fixture_lock)
    assert not any(_expected_unresolved(fixture_lock, lock.arches).values())
    res = _cli("--lock", str(fixture_lock), "lock", "--check")
    assert res.returncode == 0, res.stderr
    assert res.stderr == (f"{fixture_lock}: valid, 0 pins unresolved ({counts()}) for "
                          f"amd64, arm64 ({len(lock.components)} components, 0 images)\n")


def test_fetch_and_build_list_every_unresolved_pin_of_every_kind_before_any_work(tmp_path):
    want = _expected_unresolved(REPO / "images.lock", ("arm64",))
    total = sum(want.values())
    store, out = tmp_path / "store", tmp_path / "artifacts"
    for command in (["fetch"], ["build", "--artifacts", str(out)]):
        res = _cli("--store", str(store), *command, "--arch", "arm64")
        assert res.returncode == 1, res.stderr
        assert res.stderr.startswith(
            f"error: images.lock: {total} pins unresolved ({counts(**want)}) for arm64:\n"
            "  files:\n    components.rke2.arm64.sha256\n")
        assert "\n  images:\n    images[0] " in res.stderr
        assert res.stderr.count("\n    images[") == want["images"]
        assert "Traceback" not in res.stderr
    assert not out.exists()
    assert not [p for p in store.rglob("*") if p.is_file()]  # nothing downloaded or stored
    # --files-only needs (and lists) only the files.
    res = _cli("--store", str(store), "fetch", "--files-only", "--arch", "arm64")
    assert res.returncode == 1
    assert re.search(rf"unresolved \(files: {want['files']}[,)]", res.stderr), res.stderr
    assert "images[" not in res.stderr
