"""install.sh's delta install, against real releases (tests/plugins/releases.py) and the real
delta `build --since` writes, under dash and busybox sh.

Every install keeps its verified checksum file (the base a delta checks); a delta install over
the base leaves the node exactly as a full install of the new release does; a node without the
base, or a tampered delta, is refused before anything changes.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from builder import artifacts
from tests.plugins.install import SHELLS, Delta, Target, needs_tools, ok, tools_without
from tests.plugins.oci import containerd_missing, host_arch, run_containerd
from tests.rig import payloads, update

pytestmark = needs_tools()

SUMS = "sha256sum-amd64.txt"


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under root: type, mode, and the bytes (files) or target (links)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("f", stat.S_IMODE(st.st_mode), path.read_bytes())
    return out


def node(target: Target) -> dict[str, dict[str, tuple]]:
    """What an install leaves: prefix and data dir (images dir included), the scratch root taken
    out of the files that name paths (installed-files, units, killall)."""
    root = str(target.root).encode()

    def unrooted(entries: dict[str, tuple]) -> dict[str, tuple]:
        return {k: v[:2] + (v[2].replace(root, b"ROOT"),) if v[0] == "f" else v
                for k, v in entries.items()}
    return {"prefix": unrooted(tree(target.prefix())), "data": unrooted(tree(target.data_dir()))}


def kept(target: Target) -> str:
    return str(target.prefix() / "share" / "rke2" / SUMS)


# --- every install keeps its verified checksum file ---------------------------------------------

@pytest.mark.parametrize("shell", SHELLS)
def test_every_install_keeps_its_verified_checksum_file(scratch_target: Target, releases,
                                                        shell: str) -> None:
    v1, v2 = releases["v1"], releases["v2"]
    before = scratch_target.snapshot(dir_mtimes=False)
    ok(scratch_target.install(v1, shell))
    manifest = scratch_target.prefix() / "share" / "rke2" / "installed-files"
    assert (scratch_target.prefix() / "share/rke2" / SUMS).read_bytes() == v1.sums.read_bytes()
    assert f"f {kept(scratch_target)}\n" in manifest.read_text()
    # A second identical install changes nothing, the kept file included.
    installed = scratch_target.snapshot()
    assert "nothing changed" in ok(scratch_target.install(v1, shell)).stdout
    assert scratch_target.snapshot() == installed
    # An upgrade keeps the new release's; the uninstaller removes it with the rest.
    ok(scratch_target.install(v2, shell))
    assert (scratch_target.prefix() / "share/rke2" / SUMS).read_bytes() == v2.sums.read_bytes()
    ok(scratch_target.uninstall(shell=shell))
    assert scratch_target.snapshot(dir_mtimes=False) == before



# --- the delta install -------------------------------------------------------------------------

def _target(tmp_path: Path, name: str) -> Target:
    root, tmp = tmp_path / name / "root", tmp_path / name / "tmp"
    root.mkdir(parents=True)
    tmp.mkdir()
    return Target(root, tmp)


@pytest.mark.parametrize("shell", SHELLS)
def test_delta_install_leaves_exactly_what_a_full_install_leaves(delta: Delta, tmp_path: Path,
                                                                 shell: str) -> None:
    """Root A: the base, then the full patch release. Root B: the base, then the delta. Every
    file of prefix, data dir and images dir, and installed-files, are the same."""
    full, by_delta = _target(tmp_path, "full"), _target(tmp_path, "delta")
    for target in (full, by_delta):
        ok(target.install(delta.base, shell))
    started = time.monotonic()
    ok(full.install(delta.new, shell))
    full_seconds = time.monotonic() - started
    started = time.monotonic()
    proc = ok(by_delta.install(delta.media, shell))
    delta_seconds = time.monotonic() - started
    media = {name: sum(f.stat().st_size for f in r.directory.iterdir())
             for name, r in (("full", delta.new), ("delta", delta.media))}
    print(f"\n{shell}: full install of the patch {full_seconds:.2f}s ({media['full']} bytes of media), "
          f"delta install {delta_seconds:.2f}s ({media['delta']} bytes of media)")
    assert f"delta install: rke2 {update.PATCH} (amd64) over {delta.base.version}" in proc.stdout
    archive = "rke2-images.linux-amd64.tar.zst"
    assert f"rebuilding {archive} from {by_delta.images_dir()}" in proc.stdout
    assert not (delta.media.directory / archive).exists(), "the delta must not carry the archive"

    got, want = node(by_delta), node(full)
    for part in want:
        differ = sorted(k for k in want[part].keys() | got[part].keys()
                        if want[part].get(k) != got[part].get(k))
        assert not differ, (part, differ)
    assert (by_delta.images_dir() / archive).read_bytes() == delta.new.path(archive).read_bytes()
    assert (by_delta.prefix() / "share/rke2" / SUMS).read_bytes() == delta.new.sums.read_bytes()
    binary = by_delta.data_dir() / "bin" / delta.pair.binary
    assert binary.read_bytes() == update.new_binary("amd64").read_bytes()

    # The same delta again: the node already has the patch; nothing changes.
    installed = by_delta.snapshot()
    again = ok(by_delta.install(delta.media, shell))
    assert f"the {update.PATCH} archive is already in" in again.stdout
    assert "nothing changed" in again.stdout
    assert by_delta.snapshot() == installed


def test_delta_install_then_containerd_runs_the_image_whose_lower_layers_came_from_the_base(
        delta: Delta, tmp_path: Path) -> None:
    """The changed image's lower layers are pieces of the node's base archive, its new top layer
    comes from the delta; containerd imports the rebuilt archive and runs the image."""
    reason = containerd_missing()
    if reason:
        pytest.skip(reason)
    if host_arch() != "amd64":
        pytest.skip("the amd64 fixture images run on amd64 only")
    pair = delta.pair
    group = delta.new.group(pair.group)
    archive = artifacts.image_files(group)[0]
    target = _target(tmp_path, "node")
    ok(target.install(delta.base, IMAGES=f"default {pair.group}"))
    ok(target.install(delta.media, IMAGES=f"default {pair.group}"))

    pieces = {p.label: p.source for p in delta.description.archive(archive).pieces}
    old_layers, new_layers = pair.layers["amd64"]
    assert old_layers[:-1] == new_layers[:-1]
    assert [pieces[layer] for layer in new_layers] == ["base"] * (len(new_layers) - 1) + ["delta"]

    tar = tmp_path / "images.tar"
    # ctr 1.6 reads no zstd (the rke2 supervisor decompresses itself); zstd -dc reads every frame.
    subprocess.run(f"zstd -dcq < '{target.images_dir() / archive}' > '{tar}'", shell=True, check=True)
    with run_containerd() as daemon:
        res = daemon.ctr("images", "import", str(tar), timeout=120)
        assert res.returncode == 0, res.stderr
        assert pair.image in daemon.images()
        # busybox and /etc/fixture-release come from the lower layers (the base's bytes), the
        # version file and socat from the new top layer (the delta's).
        run = daemon.ctr("run", "--rm", pair.image, f"delta-{os.getpid()}", "/bin/busybox", "sh", "-c",
                         "cat /etc/fixture-release /usr/share/doc/socat/fixture-version; "
                         "busybox sha256sum /usr/bin/socat", timeout=60)
        assert run.returncode == 0, run.stderr
        socat = hashlib.sha256(payloads.binary("socat", "amd64").read_bytes()).hexdigest()
        assert run.stdout.splitlines() == ["airgap-builder fixture", update.NEW_TAG,
                                           f"{socat}  /usr/bin/socat"]


def test_a_node_without_zstd_rebuilds_the_gzip_archive(delta: Delta, tmp_path: Path) -> None:
    """Without zstd the install takes the .tar.gz archives (the base's too): the delta rebuilds
    the .tar.gz from the base's gzip members."""
    path = tools_without({"zstd"}, tmp_path / "nozstd")
    full, by_delta = _target(tmp_path, "full"), _target(tmp_path, "delta")
    for target in (full, by_delta):
        ok(target.install(delta.base, raw={"PATH": path}))
    ok(full.install(delta.new, raw={"PATH": path}))
    proc = ok(by_delta.install(delta.media, raw={"PATH": path}))
    archive = "rke2-images.linux-amd64.tar.gz"
    assert f"rebuilding {archive} from" in proc.stdout
    assert sorted(p.name for p in by_delta.images_dir().iterdir()) == [archive]
    assert node(by_delta) == node(full)
