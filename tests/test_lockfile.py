"""images.lock: validation names the field at fault; the committed lock round-trips byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.errors import LockError, UnresolvedError
from builder.lock import lockfile

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
    # Line 1 names the JSON Schema for editors (yaml-language-server resolves it from the lock's
    # directory); the rest is the canonical form.
    modeline, rest = text.split("\n", 1)
    assert modeline == f"# yaml-language-server: $schema={lockfile.SCHEMA_FILE.relative_to(REPO)}"
    assert lockfile.SCHEMA_FILE.is_file()
    assert lockfile.dumps(lock) == rest
    # A re-lock with nothing new changes no byte (and keeps the modeline).
    assert lockfile.update_text(text, lock) is text


def counts(**given: int) -> str:
    """The per-kind counts as messages show them: every kind of pin, in order, 0 when not given."""
    return ", ".join(f"{kind}: {given.get(kind, 0)}" for kind in lockfile.PIN_KINDS)


def test_unresolved_pins_of_every_kind_are_listed_with_counts():
    text = (BASE.replace(f"sha256: {HEX}}}\n      arm64", "sha256: null}\n      arm64", 1)
            .replace(f'platforms: {{amd64: "sha256:{HEX}", arm64: "sha256:{HEX}"}}', "platforms: null"))
    lock = lockfile.parse(text)
    found = lock.unresolved(("amd64", "arm64"))
    assert found["files"] == ["components.kubelet.amd64.sha256"]
    assert found["images"] == ["images[0] docker.io/rancher/mirrored-pause:3.6: platforms.amd64, platforms.arm64"]
    assert not any(pins for kind, pins in found.items() if kind not in ("files", "images"))
    with pytest.raises(UnresolvedError) as err:
        lock.require_resolved(("amd64",))
    assert err.value.message == (
        f"images.lock: 2 pins unresolved ({counts(files=1, images=1)}) for amd64:\n"
        "  files:\n    components.kubelet.amd64.sha256\n"
        "  images:\n    images[0] docker.io/rancher/mirrored-pause:3.6: platforms.amd64")
    # Only the kinds asked for (fetch --files-only needs no image pins).
    with pytest.raises(UnresolvedError, match=r"1 pin unresolved \(files: 1[,)]") as err:
        lock.require_resolved(("amd64",), images=False)
    assert "images[" not in err.value.message
    assert lockfile.describe_unresolved(lockfile.parse(BASE).unresolved(("amd64",))) == \
        f"0 pins unresolved ({counts()})"


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


# Each edit breaks BASE in one way; tests/test_lock_schema.py holds the JSON Schema to the same list.
MALFORMED = [
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
    (lambda t: t.replace("version: v1.32.13\n", "version: v1.32.13\n    format: deb\n"),
     "components.kubelet.member: format deb needs the member path"),
    (lambda t: t.replace("ref: docker.io/rancher/mirrored-pause:3.6", "ref: rancher/mirrored-pause:3.6"),
     "images[0].ref: write the reference fully qualified with a tag and no digest"),
    (lambda t: t.replace("release: {name: rke2, version: v1.32.13+rke2r1}",
                         "release: {name: rke2, version: v1.32.13+rke2r1, supervisor: kubectl}"),
     "release.supervisor: names component 'kubectl', which components does not define"),
    (lambda t: t + "runtime: {repository: docker.io/rancher/rke2-runtime, bin: [kubectl]}\n",
     "runtime.bin[0]: names component 'kubectl', which components does not define"),
    (lambda t: t + "mirrors: []\n", "images.lock: mirrors: expected a mapping, got []"),
    (lambda t: t.replace(f"sha256: {HEX}}}\n      arm64", f"sha256: {HEX}, size: 1234.0}}\n      arm64", 1),
     "images.lock: components.kubelet.amd64.size: expected int, got 1234.0"),
    (lambda t: t.replace("version: v1.32.13+rke2r1}", "version: v1.32.13+rke2r1, layers: lz4}"),
     "images.lock: release.layers: expected one of registry, zstd, got 'lz4'"),
    (lambda t: t.replace("version: v1.32.13+rke2r1}",
                         "version: v1.32.13+rke2r1, groups: {core: {layers: lz4}}}"),
     "images.lock: release.groups.core.layers: expected one of registry, zstd, got 'lz4'"),
    (lambda t: t.replace("version: v1.32.13+rke2r1}",
                         "version: v1.32.13+rke2r1, groups: {core: {layers: zstd, level: 19}}}"),
     "images.lock: release.groups.core.level: unknown field (expected one of: layers)"),
    (lambda t: t.replace("version: v1.32.13+rke2r1}",
                         "version: v1.32.13+rke2r1, groups: {canal: {layers: zstd}}}"),
     "images.lock: release.groups.canal: group 'canal' holds no image and not the runtime, so no "
     "archive would use this mode"),
]


@pytest.mark.parametrize("edit, message", MALFORMED, ids=[m for _, m in MALFORMED])
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


def test_writing_pins_reads_nothing_the_validator_refuses():
    """The round-trip writer (ruamel.yaml) only ever sees text that passed every guard first."""
    lock = lockfile.parse(BASE)
    hostile = BASE.replace("release: {name: rke2", "release: &r {name: rke2")
    with pytest.raises(LockError, match="YAML anchors and aliases"):
        lockfile.update_text(hostile, lock)
    with pytest.raises(LockError, match="nested more than 32 levels"):
        lockfile.update_text(BASE + "x: " + "[" * 40 + "]" * 40 + "\n", lock)


LAYERED = BASE.replace("release: {name: rke2, version: v1.32.13+rke2r1}", """\
release:
  name: rke2
  version: v1.32.13+rke2r1
  layers: registry
  groups:
    canal: {layers: zstd}""") + """\
  - ref: docker.io/rancher/hardened-calico:v3.29
    groups: [canal]
"""


def test_layer_mode_is_the_group_override_else_the_release_mode():
    lock = lockfile.parse(LAYERED)
    assert (lock.release.layers, dict(lock.release.group_layers)) == ("registry", {"canal": "zstd"})
    assert lock.layer_mode("canal") == "zstd"
    assert lock.layer_mode("core") == "registry"
    assert lock.layer_mode(None) == "registry"  # the all-in-one archive: release.layers


def test_layer_mode_defaults_when_the_lock_names_none():
    assert lockfile.DEFAULT_LAYER_MODE == "zstd"
    lock = lockfile.parse(BASE)
    assert (lock.release.layers, dict(lock.release.group_layers)) == (None, {})
    assert lock.layer_mode(None) == lock.layer_mode("core") == lockfile.DEFAULT_LAYER_MODE
    # A group override applies to its group only; the rest keep the default.
    only_core = lockfile.parse(BASE.replace("version: v1.32.13+rke2r1}",
                                            "version: v1.32.13+rke2r1, groups: {core: {layers: registry}}}"))
    assert only_core.layer_mode("core") == "registry"
    assert only_core.layer_mode(None) == lockfile.DEFAULT_LAYER_MODE


def test_the_runtime_group_may_carry_a_layer_override():
    """A group only the runtime is in is a used group (its archive holds the runtime image)."""
    text = LAYERED.replace("canal: {layers: zstd}", "infra: {layers: zstd}") + (
        "runtime: {repository: docker.io/rancher/rke2-runtime, groups: [infra], no_charts: none}\n")
    assert lockfile.parse(text).layer_mode("infra") == "zstd"


def test_layer_modes_are_dumped_only_when_written():
    """An old lock (no layers, no groups) dumps as before; written modes dump and read back."""
    plain = lockfile.dumps(lockfile.parse(BASE))
    assert "layers" not in plain and "\n  groups:" not in plain.split("\narches:")[0]
    assert lockfile.dumps(lockfile.parse(plain)) == plain  # (the committed lock: test above)
    lock = lockfile.parse(LAYERED)
    text = lockfile.dumps(lock)
    assert "  - core\n  layers: registry\n  groups:\n    canal:\n      layers: zstd\narches:" in text
    assert lockfile.parse(text) == lock
    assert lockfile.dumps(lockfile.parse(text)) == text


def test_writing_pins_keeps_the_layer_modes_as_written():
    """`lock` fills pins into a lock with layer modes: the modes, comments and order stay."""
    commented = LAYERED.lstrip("\n").replace("  layers: registry\n", "  layers: registry   # digests kept\n")
    unresolved = commented.replace(f"digest: sha256:{HEX}", "digest: null")
    resolved = lockfile.parse(commented)
    assert lockfile.update_text(unresolved, resolved) == commented
