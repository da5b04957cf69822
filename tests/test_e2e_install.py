"""End to end: a release built through the loopback mirror (real Debian containerd, shim, ctr and
runc in the runtime image; stand-ins only for kubelet/crictl/kubectl), installed with install.sh
into a scratch root (with systemd "running": a private mount namespace and a recording systemctl),
then the *staged* containerd runs the air-gapped busybox image. The same bundle unpacked with a
bare `tar xzf`, as upstream's air-gap docs do, is removed by its uninstaller."""

from __future__ import annotations

import subprocess
import time

import pytest

from builder.artifacts import data_key
from tests.plugins.install import INSTALL_SH, SHELLS, in_systemd_namespace, ok
from tests.plugins.oci import containerd_missing, run_containerd
from tests.plugins.releases import Release

BUSYBOX = "docker.io/rancher/mirrored-library-busybox:1.36.1"


@pytest.mark.parametrize("shell", ["dash", "busybox"])
def test_install_then_run_busybox_from_the_air_gapped_archive(built, scratch_target, shell, tmp_path,
                                                              fake_systemctl):
    reason = containerd_missing()
    if reason:
        pytest.skip(reason)
    release = Release.read(built.out, "amd64")  # the session's full build, unsigned
    before = scratch_target.snapshot(dir_mtimes=False)
    path, log = fake_systemctl

    started = time.monotonic()
    env = scratch_target.env(release, raw={"PATH": path})
    proc = ok(in_systemd_namespace([*SHELLS[shell], str(INSTALL_SH)], env))
    seconds = time.monotonic() - started
    print(f"install.sh ({shell}) took {seconds:.2f}s")
    # Upstream's default: installed, systemd reloaded, the unit neither enabled nor started.
    assert log.read_text().splitlines() == ["daemon-reload"]
    unit = scratch_target.prefix() / "lib/systemd/system/rke2-server.service"
    assert "write /etc/rancher/rke2/config.yaml" in proc.stdout
    assert f"systemctl enable --now {unit}" in proc.stdout

    data = scratch_target.data_dir()
    bin_dir = (data / "bin").resolve()
    # The supervisor's key: the runtime image's tag and 12 hex of sha256 of its reference
    # without the registry (docker.io/rancher/rke2-runtime:T -> rancher/rke2-runtime:T).
    runtime_ref = (bin_dir.parent / ".extracted").read_text().strip()
    assert bin_dir.parent.parent.name == "data" and bin_dir.parent.name == data_key(runtime_ref)
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
    ok(scratch_target.install(release, shell))
    assert scratch_target.snapshot() == installed
    ok(scratch_target.uninstall(shell=shell))
    assert scratch_target.snapshot(dir_mtimes=False) == before


def test_uninstall_after_bare_tar_of_the_real_bundle(built, scratch_target):
    """`tar xzf rke2.linux-amd64.tar.gz -C PREFIX` and nothing else: the bundle's own uninstaller
    (no installed-files manifest) leaves the scratch root exactly as it was."""
    before = scratch_target.snapshot(dir_mtimes=False)
    subprocess.run(["tar", "xzf", str(built.out / "rke2.linux-amd64.tar.gz"), "-C",
                    str(scratch_target.prefix())], check=True)
    assert (scratch_target.prefix() / "bin" / "rke2-uninstall.sh").is_file()
    proc = ok(scratch_target.uninstall(RKE2_DATA_DIR=str(scratch_target.data_dir())))
    assert "removing the bundle's layout" in proc.stdout
    assert scratch_target.snapshot(dir_mtimes=False) == before
