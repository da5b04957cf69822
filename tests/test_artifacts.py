"""The release's shared rules, pinned against upstream's real values and against install.sh."""

from __future__ import annotations

import pytest

from builder.artifacts import data_key
from tests.artifacts_fixture import supervisor_data_key
from tests.plugins.install import install_functions

# Directory names real RKE2 nodes carry under /var/lib/rancher/rke2/data (issue 11): the
# supervisor's key for the runtime image of these releases.
REAL = {
    "v1.21.5-rke2r2": "v1.21.5-rke2r2-92b1ca9704d2",
    "v1.24.9-rke2r2": "v1.24.9-rke2r2-154c18a3ccf5",
}


@pytest.mark.parametrize("tag", sorted(REAL))
@pytest.mark.parametrize("registry", ["", "docker.io/", "registry.example.internal:5000/", "localhost/"])
def test_data_key_is_the_supervisors(tag, registry):
    assert data_key(f"{registry}rancher/rke2-runtime:{tag}") == REAL[tag]


@pytest.mark.parametrize("ref", ["docker.io/rancher/rke2-runtime@sha256:" + "0" * 64,
                                 "docker.io/rancher/rke2-runtime", "localhost:5000/rke2-runtime"])
def test_a_reference_without_tag_has_no_key(ref):
    with pytest.raises(ValueError):
        data_key(ref)


def _install_sh_key(ref: str) -> str:
    # install.sh's own function, called without running an install.
    proc = install_functions(f"runtime_data_key '{ref}' || exit 1; printf %s \"$RUNTIME_KEY\"")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("ref", ["docker.io/rancher/rke2-runtime:v1.32.13-rke2r1",
                                 "rancher/rke2-runtime:v1.21.5-rke2r2",
                                 "registry.example.internal:5000/rancher/rke2-runtime:v1.24.9-rke2r2",
                                 "localhost/acme/runtime:v2.0.0-acme1"])
def test_builder_installer_and_restated_formula_agree(ref):
    assert data_key(ref) == _install_sh_key(ref) == supervisor_data_key(ref)
