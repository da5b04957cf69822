"""The release's shared rules (builder/artifacts.py), pinned against upstream's real values and
against what install.sh computes: the golden tests run install.sh's own functions (dash), so the
shell and the Python cannot drift."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from builder import artifacts
from builder.artifacts import data_key
from builder.errors import BuilderError
from builder.trust import checksums
from builder.trust.verify import parse_release_env, read_release_env
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


def _sh(script: str, **env: str) -> str:
    """Run ``script`` after install.sh's definitions (dash); its stdout."""
    proc = install_functions(script, **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _install_sh_key(ref: str) -> str:
    return _sh(f"runtime_data_key '{ref}' || exit 1; printf %s \"$RUNTIME_KEY\"")


@pytest.mark.parametrize("ref", ["docker.io/rancher/rke2-runtime:v1.32.13-rke2r1",
                                 "rancher/rke2-runtime:v1.21.5-rke2r2",
                                 "registry.example.internal:5000/rancher/rke2-runtime:v1.24.9-rke2r2",
                                 "localhost/acme/runtime:v2.0.0-acme1"])
def test_builder_and_installer_data_keys_agree(ref):
    assert data_key(ref) == _install_sh_key(ref)


# -- golden: install.sh's naming rules are builder/artifacts.py's ------------------------------

def test_golden_install_sh_names_every_artifact_as_the_builder(tmp_path: Path) -> None:
    """For every arch install.sh installs and two release names: the checksum file and its
    signature, the bundle, each group's image archive and list, and where the bundle holds
    release.env, as install.sh's functions compute them; and discover_name finds the release in
    a checksum file listing the builder's whole artifact set, as artifacts.classify does."""
    groups = ("core", "canal", "x.y")
    for arch in artifacts.INSTALLER_ARCHES:
        for name in ("rke2", "acme.k8s-2"):
            script = "\n".join([
                f"sums_name {arch}", f'echo "$(sums_name {arch}).sig"', f"bundle_name {name} {arch}",
                *(f"images_base {name} {g} {arch}" for g in groups),
                f"release_env_member {name}",
            ])
            got = _sh(script).splitlines()
            bases = [artifacts.images_base(name, arch, g) for g in groups]
            assert got == [artifacts.checksum_name(arch), artifacts.signature_name(arch),
                           artifacts.bundle_name(name, arch), *bases,
                           artifacts.release_env_member(name)]
            listed = [artifacts.bundle_name(name, arch), artifacts.all_list_name(name, arch),
                      artifacts.statement_name(arch),
                      *artifacts.image_files(artifacts.images_base(name, arch)),
                      *(f for b in bases for f in artifacts.image_files(b))]
            sums = tmp_path / f"{name}-{arch}.txt"
            sums.write_text(checksums.render([checksums.Entry(n, "0" * 64) for n in listed]))
            found = _sh(f"ARCH={arch} NAME='' UPPER=$(upper_of {name}) SUMS={shlex.quote(str(sums))} "
                        "SUMS_NAME=x; discover_name; echo \"$NAME\"").strip()
            names = artifacts.classify(arch, listed)
            assert found == names.release == name
            assert names.bundle == artifacts.bundle_name(name, arch)
            assert sorted(names.archives) == sorted([artifacts.images_base(name, arch), *bases])
            assert names.all_list == artifacts.all_list_name(name, arch)


def test_golden_install_sh_arches_are_the_builders() -> None:
    """install.sh's arch vocabulary: every machine name the builder maps (HOST_ARCH) maps to the
    same arch there when install.sh installs that arch, and is refused otherwise; release.env's
    RELEASE_ARCH accepts exactly the installable arches of the builder's KNOWN_ARCHES."""
    words = sorted({*artifacts.HOST_ARCH, *artifacts.KNOWN_ARCHES, "i386", "armhf", "x86-64"})
    script = "".join(f"arch_name {w} || echo -; "
                     f"check_release_value RELEASE_ARCH {w} && echo yes || echo no; " for w in words)
    got = _sh(script).split()
    for word, mapped, accepted in zip(words, got[::2], got[1::2], strict=True):
        arch = artifacts.HOST_ARCH.get(word)
        want = arch if arch in artifacts.INSTALLER_ARCHES else "-"
        assert (word, mapped) == (word, want)
        assert (word, accepted) == (word, "yes" if word in artifacts.INSTALLER_ARCHES else "no")
    assert set(artifacts.INSTALLER_ARCHES) <= set(artifacts.KNOWN_ARCHES)


def test_golden_install_sh_reads_the_release_env_keys_the_builder_writes(tmp_path: Path) -> None:
    """RELEASE_KEYS is artifacts.RELEASE_ENV_KEYS in order; a release.env of those keys parses in
    install.sh and in verify with the same values; install.sh refuses one without any of them
    (verify's parser returns the rest, its release check names the missing ones); both refuse
    a key the builder does not write."""
    assert tuple(_sh('printf %s "$RELEASE_KEYS"').split()) == artifacts.RELEASE_ENV_KEYS
    image = "docker.io/rancher/rke2-runtime:v1.32.13-rke2r1"
    values = {"RELEASE_NAME": "rke2", "RELEASE_VERSION": "v1.32.13+rke2r1", "RELEASE_ARCH": "amd64",
              "RUNTIME_IMAGE": image, "RUNTIME_MANIFEST": "sha256:" + "1" * 64,
              "RUNTIME_LAYERS": f"sha256:{'2' * 64} sha256:{'3' * 64}",
              "RUNTIME_ARCHIVE": artifacts.images_base("rke2", "amd64", "core"),
              "DATA_KEY": data_key(image), "DEFAULT_IMAGES": artifacts.images_base("rke2", "amd64"),
              "IMAGE_GROUPS": "core canal"}
    assert tuple(values) == artifacts.RELEASE_ENV_KEYS
    echo = "; ".join(f'echo "${k}"' for k in artifacts.RELEASE_ENV_KEYS)
    for drop in (None, *artifacts.RELEASE_ENV_KEYS):
        env = tmp_path / f"release-{drop}.env"
        raw = "".join(f"{k}='{v}'\n" for k, v in values.items() if k != drop).encode()
        env.write_bytes(raw)
        proc = install_functions(f"parse_release_env {shlex.quote(str(env))} || "
                                 "{ echo \"$PARSE_ERROR\"; exit 3; }; " + echo)
        if drop is None:
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert proc.stdout.splitlines() == list(values.values())
            assert parse_release_env(raw) == values
        else:
            assert proc.returncode == 3 and f"{drop} is missing" in proc.stdout, proc.stdout
            # verify parses what is there and reports the missing keys (RELEASE_ENV_KEYS) later
            assert set(parse_release_env(raw)) == set(artifacts.RELEASE_ENV_KEYS) - {drop}
    env = tmp_path / "extra.env"
    raw = "".join(f"{k}='{v}'\n" for k, v in values.items()).encode() + b"RELEASE_EXTRA='x'\n"
    env.write_bytes(raw)
    proc = install_functions(f"parse_release_env {shlex.quote(str(env))} || "
                             "{ echo \"$PARSE_ERROR\"; exit 3; }")
    assert proc.returncode == 3 and "not KEY='value' with a known KEY" in proc.stdout
    with pytest.raises(BuilderError, match="unknown key RELEASE_EXTRA"):
        parse_release_env(raw)


def test_golden_install_sh_reads_a_real_build(built) -> None:
    """The real build's artifacts: install.sh finds the release, the bundle and the group
    archives by its own rules, and parses the bundle's release.env to verify's values."""
    for arch in artifacts.discover_arches(built.out):
        if arch not in artifacts.INSTALLER_ARCHES:
            continue
        sums = built.out / artifacts.checksum_name(arch)
        listed = [e.name for e in checksums.parse_file(sums)]
        names = artifacts.classify(arch, listed)
        assert names.release is not None and names.bundle is not None
        member, env = read_release_env(built.out / names.bundle)
        assert member == artifacts.release_env_member(names.release)
        script = (f"ARCH={arch} NAME='' UPPER=$(upper_of {names.release}) SUMS={shlex.quote(str(sums))} SUMS_NAME=x; "
                  'discover_name; echo "$NAME"; bundle_name "$NAME" "$ARCH"; '
                  + "".join(f'images_base "$NAME" {g} "$ARCH"; ' for g in env["IMAGE_GROUPS"].split()))
        got = _sh(script).splitlines()
        assert got[:2] == [names.release, names.bundle]
        assert set(got[2:]) <= set(names.archives) and env["RUNTIME_ARCHIVE"] in got[2:]
        assert env["DATA_KEY"] == data_key(env["RUNTIME_IMAGE"]) == _install_sh_key(env["RUNTIME_IMAGE"])


# -- the delta directory's names (issue 15) ---------------------------------------------------

@pytest.mark.parametrize(("file", "delta"), [
    ("rke2-images.linux-amd64.tar.zst", "rke2-images.linux-amd64.delta.tar.zst"),
    ("rke2-images-core.linux-arm64.tar.gz", "rke2-images-core.linux-arm64.delta.tar.gz"),
])
def test_a_delta_archive_is_named_for_its_archive(file: str, delta: str) -> None:
    assert artifacts.delta_archive_name(file) == delta
    assert artifacts.is_delta_file(delta) and not artifacts.is_delta_file(file)
    assert artifacts.arch_of(delta) == artifacts.arch_of(file)


def test_a_list_or_bundle_has_no_delta_archive() -> None:
    for name in ("rke2-images.linux-amd64.txt", "rke2.linux-amd64.tar"):
        with pytest.raises(ValueError):
            artifacts.delta_archive_name(name)


def test_a_delta_directorys_arches_are_discovered_and_its_files_are_no_artifacts(
        tmp_path: Path) -> None:
    """A delta directory's delta files name their arch (discover_arches finds it) but are neither
    image archives, lists nor a bundle to classify: the checksum file lists the archives."""
    names = ["delta.linux-s390x.txt", "rke2-images.linux-s390x.delta.tar.zst",
             "rke2-images-core.linux-s390x.delta.tar.gz"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert artifacts.delta_description_name("s390x") == names[0]
    assert artifacts.discover_arches(tmp_path) == ["s390x"]
    assert artifacts.classify("s390x", names) == artifacts.Names(None, None, {}, {}, None)
    assert all(artifacts.is_delta_file(n) for n in names)
    assert not artifacts.is_delta_file("delta.linux-s390x.txt.sig")
