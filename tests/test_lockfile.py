"""images.lock: validation names the field at fault; the committed lock round-trips byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder import lockfile
from builder.errors import LockError, UnresolvedError

REPO = Path(__file__).resolve().parents[1]
HEX = "4bc04c3f50725fa29ac9f0626c553941cfe07d128b3a313b7f5d176b07ab786e"

BASE = f"""
schema: 1
release: {{name: rke2, version: v1.32.13+rke2r1}}
arches: [amd64, arm64]
components:
  kubelet:
    version: v1.32.13
    arches:
      amd64: {{url: "https://dl.k8s.io/release/v1.32.13/bin/linux/amd64/kubelet", sha256: {HEX}}}
      arm64: {{url: "https://dl.k8s.io/release/v1.32.13/bin/linux/arm64/kubelet", sha256: {HEX}}}
images:
  - ref: docker.io/rancher/mirrored-pause:3.6
    groups: [core]
    digest: sha256:{HEX}
    platforms: {{amd64: "sha256:{HEX}", arm64: "sha256:{HEX}"}}
"""


def test_committed_lock_is_valid_and_canonical():
    text = (REPO / "images.lock").read_text()
    lock = lockfile.parse(text)
    assert lock.release.name == "rke2" and lock.release.version == "v1.32.13+rke2r1"
    assert lock.arches == ("amd64", "arm64")
    # A re-lock with nothing new must change no byte.
    assert lockfile.dumps(lock) == text


def test_committed_lock_pins_come_from_the_reference():
    import yaml

    source = REPO.parent / "shared" / "reference" / "upstream-pins.yaml"
    if not source.exists():
        pytest.skip(f"{source} is not beside this checkout")
    pins = yaml.safe_load(source.read_text())
    lock = lockfile.load(REPO / "images.lock")
    known = {e["sha256"] for b in pins["upstream_binaries"].values()
             for e in b["artifacts"].values() if isinstance(e, dict) and e.get("sha256")}
    for comp in lock.components.values():
        for art in comp.arches.values():
            if art.sha256:
                assert art.sha256 in known, f"{comp.name}: {art.sha256} has no named source"


def test_committed_lock_build_is_refused_until_locked():
    lock = lockfile.load(REPO / "images.lock")
    with pytest.raises(UnresolvedError) as err:
        lock.require_resolved(("amd64",))
    text = str(err.value)
    assert "components.rke2.amd64.sha256" in text
    assert "platforms.amd64" in text
    assert "python -m builder lock" in text


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace(f"sha256: {HEX}}}\n      arm64", "sha256: abc}\n      arm64", 1),
         "images.lock: components.kubelet.amd64.sha256: expected 64 hex digits, got 'abc'"),
        (lambda t: t.replace("arches: [amd64, arm64]", "arches: [amd64, mips]"),
         "images.lock: arches[1]: unknown arch 'mips'"),
        (lambda t: t.replace("release: {name: rke2, version: v1.32.13+rke2r1}", "release: {name: rke2}"),
         "images.lock: release.version: missing required field"),
        (lambda t: t.replace(f'amd64: "sha256:{HEX}"', 'amd64: "sha256:zz"'),
         "platforms.amd64: expected sha256:<64 hex digits>, got 'sha256:zz'"),
        (lambda t: t.replace("groups: [core]", "groupz: [core]"),
         "images[0].groupz: unknown field"),
        (lambda t: t + "  - ref: docker.io/rancher/mirrored-pause:3.6\n    groups: [canal]\n",
         "listed twice"),
        (lambda t: t.replace("schema: 1", "schema: 9"), "unsupported schema 9"),
        (lambda t: t.replace('arm64: {url: "https://dl.k8s.io/release/v1.32.13/bin/linux/arm64/kubelet", ', "arm64: {"),
         "images.lock: components.kubelet.arm64.url: missing required field"),
        (lambda t: t.replace("version: v1.32.13\n", "version: v1.32.13\n    format: zip\n"),
         "components.kubelet.format: unknown format 'zip'"),
    ],
)
def test_malformed_lock_gives_one_clear_error(edit, message):
    text = edit(BASE)
    with pytest.raises(LockError) as err:
        lockfile.parse(text)
    assert message in str(err.value)


def test_bad_yaml_names_line():
    with pytest.raises(LockError) as err:
        lockfile.parse("schema: 1\nrelease: [unclosed\n")
    assert "not valid YAML" in str(err.value) and "line" in str(err.value)


def test_unresolved_is_loadable_but_refused():
    text = BASE.replace(f"sha256: {HEX}}}\n      arm64", "sha256: null}\n      arm64", 1)
    lock = lockfile.parse(text)
    lock.require_resolved(("arm64",))  # arm64 is fully pinned
    with pytest.raises(UnresolvedError, match=r"components\.kubelet\.amd64\.sha256"):
        lock.require_resolved(("amd64",))


def test_mirrors_override_merges_by_prefix():
    lock = lockfile.parse(BASE + """
mirrors:
  files:
    - {prefix: "https://dl.k8s.io/", endpoints: ["http://a.example/"]}
""")
    override = lockfile.parse_mirrors(
        'files: [{prefix: "https://dl.k8s.io/", endpoints: ["http://b.example/"], fallback: false}]', "m.yaml")
    merged = lock.with_mirrors(override).mirrors
    assert [m.endpoints for m in merged.files] == [("http://b.example/",)]
    assert merged.files[0].fallback is False
