"""install.sh's delta install, against real releases (tests/plugins/releases.py) and the real
delta `build --since` writes, under dash and busybox sh.

Every install keeps its verified checksum file (the base a delta checks); a delta install over
the base leaves the node exactly as a full install of the new release does; a node without the
base, or a tampered delta, is refused before anything changes.
"""

from __future__ import annotations

import pytest

from tests.plugins.install import SHELLS, Target, needs_tools, ok

pytestmark = needs_tools()

SUMS = "sha256sum-amd64.txt"


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

