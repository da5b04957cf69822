"""End to end: a release built through the loopback mirror (real Debian containerd, shim, ctr and
runc in the runtime image; stand-ins only for kubelet/crictl/kubectl), installed with install.sh
into a scratch root, then the *staged* containerd runs the air-gapped busybox image."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.plugins.install import ok
from tests.plugins.oci import containerd_missing, run_containerd

BUSYBOX = "docker.io/rancher/mirrored-library-busybox:1.36.1"


@dataclass(frozen=True)
class RealRelease:
    """The built artifacts, in the shape tests/plugins/install.Target expects."""

    directory: Path
    name: str = "rke2"
    arch: str = "amd64"


@pytest.mark.parametrize("shell", ["dash", "busybox"])
def test_install_then_run_busybox_from_the_air_gapped_archive(built, scratch_target, shell, tmp_path):
    reason = containerd_missing()
    if reason:
        pytest.skip(reason)
    release = RealRelease(built.out)
    before = scratch_target.snapshot(dir_mtimes=False)

    started = time.monotonic()
    ok(scratch_target.install(release, shell, SKIP_ENABLE="true", SKIP_START="true"))
    seconds = time.monotonic() - started
    print(f"install.sh ({shell}) took {seconds:.2f}s")

    data = scratch_target.data_dir()
    bin_dir = (data / "bin").resolve()
    assert bin_dir.parent.parent.name == "data" and (bin_dir.parent / ".extracted").exists()
    for name in ("containerd", "containerd-shim-runc-v2", "ctr", "runc"):
        assert (bin_dir / name).is_file()
    archive = scratch_target.images_dir() / "rke2-images.linux-amd64.tar.zst"
    assert archive.is_file()

    # ctr 1.6 cannot read zstd (the rke2 supervisor decompresses itself): decompress first.
    tar = tmp_path / "images.tar"
    subprocess.run(f"zstd -dc '{archive}' > '{tar}'", shell=True, check=True)
    with run_containerd(bin_dir) as daemon:
        res = daemon.ctr("images", "import", str(tar), timeout=120)
        assert res.returncode == 0, res.stderr
        assert BUSYBOX in daemon.images()
        run = daemon.ctr("run", "--rm", BUSYBOX, f"e2e-{shell}", "/bin/sh", "-c",
                         "echo hello from the air gap; uname -m", timeout=60)
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["hello", "from", "the", "air", "gap", "x86_64"]
    # A second run changes nothing; uninstall removes exactly what was installed.
    installed = scratch_target.snapshot()
    ok(scratch_target.install(release, shell, SKIP_ENABLE="true", SKIP_START="true"))
    assert scratch_target.snapshot() == installed
    ok(scratch_target.uninstall(shell=shell))
    assert scratch_target.snapshot(dir_mtimes=False) == before
