"""Real releases for the installer, CLI and release tests, made by the builder itself.

The session's real build (tests/plugins/built.py: lock, fetch and build through the loopback
mirror) carries real Debian binaries of about 110 MiB per arch; installing that sixty times would
cost minutes. So these fixtures build *lock variants* of the session's lock from its store
(``fetched``: nothing is fetched again, only `build` runs, and the full build is not needed): the same images, charts and supervisor, a runtime
of three of the real components (runc, kubectl, socat: about 11 MiB), and another release
version or name. Signing is the builder's own step (builder.trust.sign, what `sign` runs).

``releases`` gives, signed with ``fixture_signing_key`` (tests/plugins/install.py):
``v1`` (amd64, V1), ``arm64`` (arm64, V1, the same build), ``v2`` (amd64, V2, for upgrades and
downgrades). ``named_release`` (a release named my-k8s) and ``chartless_release`` (a runtime
without /charts) are built only when a test asks. Measured on a loaded 2-core machine: the v1
build (both arches) 6 s, v2 (amd64) 6 s, splitting and signing 0.1 s, my-k8s 4 s; a scratch
copy 12 ms. They need ``fetched`` (lock and fetch, shared with ``built``), not the full build.

``update_pair`` gives a base release and its patch release (tests/rig/update.py: one image's top
layer and one runtime binary change, served and resolved by the rig), both arches, signed.

``scratch_release`` copies one to tamper with (tests/tamper.py): small files are copied, the big
image archives hard-linked, which is safe because every tamper helper replaces a file rather
than writing through it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder import artifacts
from builder.lock import lockfile as L
from builder.oci import model as m
from builder.oci.archive import read_archive
from builder.trust import sign
from tests.plugins.built import Built
from tests.rig import payloads, update

V1 = "v1.32.13+rke2r1"
V2 = "v1.33.9+rke2r1"
# The runtime of the variants: real components, small enough that an install takes well under a
# second (containerd alone is 48 MiB). runc (8.7 MiB) is the big real file disk-full tests need.
RUNTIME_BIN = ("runc", "kubectl", "socat")
# tests/rig/mirror.py serves busybox-static as these components (stand-ins Debian does not package).
STANDINS = {"kubelet": "busybox", "kubectl": "busybox"}
BIG_FILE = 1 << 20  # archives above this are hard-linked into scratch copies, not copied


def parse_release_env(text: str) -> dict[str, str]:
    """KEY='value' lines (the bundle's release.env, as builder.assemble.bundle writes it)."""
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {key: value.strip("'") for key, value in pairs}


@dataclass(frozen=True)
class Release:
    """One arch of a real release directory, described from its own bundle and checksum file."""

    directory: Path
    name: str
    version: str
    arch: str
    groups: tuple[str, ...]
    runtime_ref: str
    data_key: str
    files: tuple[str, ...]  # every name the checksum file lists (what resum sums again)
    # The key that verifies sha256sum-ARCH.txt.sig; tests/plugins/install.Target passes it to
    # install.sh while the .sig is there.
    public_key: Path | None = None
    # bin/NAME → the payload binary it is (tests/rig/payloads), beside STANDINS: the patch
    # release of ``update_pair`` ships another real binary as kubectl.
    standins: tuple[tuple[str, str], ...] = ()

    @classmethod
    def read(cls, directory: Path, arch: str, public_key: Path | None = None) -> Release:
        files = tuple(sorted(_listed(directory, arch)))
        bundle = artifacts.classify(arch, files).bundle
        assert bundle is not None, f"{directory}: the checksum file lists no bundle"
        env = _bundle_env(directory / bundle)
        return cls(directory, env["RELEASE_NAME"], env["RELEASE_VERSION"], arch,
                   tuple(env["IMAGE_GROUPS"].split()), env["RUNTIME_IMAGE"], env["DATA_KEY"],
                   files, public_key)

    # File names by builder/artifacts.py's rules (the one home install.sh is pinned against).
    bundle = property(lambda self: artifacts.bundle_name(self.name, self.arch))
    default_images = property(lambda self: artifacts.images_base(self.name, self.arch))
    sums = property(lambda self: self.directory / artifacts.checksum_name(self.arch))

    def group(self, group: str) -> str:
        return artifacts.images_base(self.name, self.arch, group)

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def env(self) -> dict[str, str]:
        """release.env as the bundle holds it now (after any tampering)."""
        return _bundle_env(self.path(self.bundle))

    def runtime_file(self, name: str) -> bytes:
        """The bytes the runtime's bin/NAME must have on the node: the real binary the loopback
        mirror served (tests/rig/payloads), which the builder copies unchanged."""
        source = dict(self.standins).get(name) or STANDINS.get(name, name)
        return payloads.binary(source, self.arch).read_bytes()


def _listed(directory: Path, arch: str) -> list[str]:
    """The names sha256sum-ARCH.txt lists."""
    sums = directory / artifacts.checksum_name(arch)
    return [line.split(maxsplit=1)[1].lstrip("*") for line in sums.read_text().splitlines() if line.strip()]


def _bundle_env(bundle: Path) -> dict[str, str]:
    with tarfile.open(bundle) as tar:
        for info in tar:
            if info.name.endswith("/" + artifacts.RELEASE_ENV):
                fh = tar.extractfile(info)
                assert fh is not None
                return parse_release_env(fh.read().decode())
    raise AssertionError(f"{bundle} holds no release.env")


def build_variant(built: Built, out: Path, *, arches: tuple[str, ...] = (),
                  change: Callable[[L.Lock], L.Lock] = lambda lock: lock) -> Path:
    """`build` of a variant of the session's lock (written beside ``out``) into ``out``, from the
    session's store: no fetch, only the builder's offline build. ``arches`` () = every arch."""
    lock = change(L.load(built.lock))
    lock_path = out.parent / f"{out.name}.lock"
    L.save(dataclasses.replace(lock, path=None), lock_path)
    where = ["--cross"] if not arches else [a for arch in arches for a in ("--arch", arch)]
    dataclasses.replace(built, lock=lock_path).cli("build", "-q", *where, "--artifacts", str(out))
    return out


def variant(version: str = V1, name: str | None = None,
            runtime_bin: tuple[str, ...] = RUNTIME_BIN) -> Callable[[L.Lock], L.Lock]:
    """The session's lock with another release version/name and a smaller runtime."""
    def change(lock: L.Lock) -> L.Lock:
        assert lock.runtime is not None
        keep = {*runtime_bin, *lock.runtime.charts, lock.release.supervisor}
        return dataclasses.replace(
            lock, release=dataclasses.replace(lock.release, version=version, name=name or lock.release.name),
            runtime=dataclasses.replace(lock.runtime, bin=runtime_bin),
            components={k: c for k, c in lock.components.items() if k in keep})
    return change


def one_arch(built_dir: Path, arch: str, out: Path, key: tuple[sign.PrivateKey, Path] | None) -> Release:
    """The ``arch`` files of a build, hard-linked into ``out`` (a release of that arch alone),
    signed with ``key`` by the builder's sign step when given."""
    out.mkdir(parents=True)
    for name in _listed(built_dir, arch):
        os.link(built_dir / name, out / name)
    shutil.copy2(built_dir / artifacts.checksum_name(arch), out / artifacts.checksum_name(arch))
    if key is not None:
        sign.sign_checksums(out, key[0])
    return Release.read(out, arch, key[1] if key else None)


def scratch_copy(release: Release, dest: Path, linked: bool = True) -> Release:
    """A private copy of ``release`` to tamper with: files up to BIG_FILE copied, bigger ones
    hard-linked (tests/tamper.py never writes through a link) unless ``linked`` is False (for a
    test that writes into the files itself)."""
    dest.mkdir(parents=True, exist_ok=True)  # two arches may share one directory
    for src in release.directory.iterdir():
        if linked and src.is_file() and src.stat().st_size > BIG_FILE:
            os.link(src, dest / src.name)
        elif src.is_file():
            shutil.copy2(src, dest / src.name)
    return dataclasses.replace(release, directory=dest)


@pytest.fixture(scope="session")
def releases(fetched: Built, tmp_path_factory: pytest.TempPathFactory,
             fixture_signing_key) -> dict[str, Release]:
    """v1 (amd64), arm64 (same build) and v2 (amd64), signed: see the module docstring."""
    base = tmp_path_factory.mktemp("releases")
    v1 = build_variant(fetched, base / "build-v1", change=variant(V1))
    v2 = build_variant(fetched, base / "build-v2", arches=("amd64",), change=variant(V2))
    return {
        "v1": one_arch(v1, "amd64", base / "v1", fixture_signing_key),
        "arm64": one_arch(v1, "arm64", base / "arm64", fixture_signing_key),
        "v2": one_arch(v2, "amd64", base / "v2", fixture_signing_key),
    }


@dataclass(frozen=True)
class UpdatePair:
    """A base release and its patch release of the same lock, per arch (tests/rig/update.py):
    ``base`` is ``releases`` v1 (V1), ``patch`` update.PATCH, where ``image`` (the group
    ``group``'s archive) has a new top layer over the same lower layers and bin/``binary`` other
    real bytes. ``layers``: arch → (base's, patch's) shipped layer digests of that image, in
    order (the archives' form), so a test can name the one layer that changed."""

    base: dict[str, Release]
    patch: dict[str, Release]
    base_image: str  # update.OLD_REF
    image: str  # update.NEW_REF
    group: str
    binary: str
    layers: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]
    lock: Path  # the patch's lock (resolved by `lock`), beside the base's in the session store
    store: Path

    def changed_layer(self, arch: str) -> tuple[str, str]:
        """(base's, patch's) top layer of the changed image."""
        old, new = self.layers[arch]
        return old[-1], new[-1]


def archive_path(release: Release, group: str) -> Path:
    """The group's .tar.zst archive of ``release``."""
    return release.path(artifacts.image_files(release.group(group))[0])


def archived_manifests(archive: Path) -> dict[str, m.Manifest]:
    """Image name → its manifest, as the archive ships it (read and verified in one pass)."""
    contents = read_archive(archive, verify=True)
    out = {}
    for image in contents.images:
        doc = m.parse_document(contents.json[image.manifest_digest], f"{archive}: {image.name}")
        assert isinstance(doc, m.Manifest), f"{archive}: {image.name} is not one manifest"
        out[image.name] = doc
    return out


@pytest.fixture(scope="session")
def update_pair(fetched: Built, releases: dict[str, Release],
                tmp_path_factory: pytest.TempPathFactory, fixture_signing_key) -> UpdatePair:
    """The realistic patch update, both arches, signed (see UpdatePair and tests/rig/update.py).
    The patch lock is resolved by the builder's `lock` and fetched by `fetch` through the rig's
    loopback servers, then built offline from the session's store like the other variants."""
    work = tmp_path_factory.mktemp("update")
    lock_path = work / "patch.lock"
    with update.serving(work / "rig") as served:
        lock = update.patched_lock(variant(update.PATCH)(L.load(fetched.lock)), served)
        L.save(dataclasses.replace(lock, path=None), lock_path)
        patch_cli = dataclasses.replace(fetched, lock=lock_path, mirrors=served.mirrors_path)
        patch_cli.cli("lock", "-q")
        patch_cli.cli("fetch", "-q", "--cross")
    patch_cli.cli("build", "-q", "--cross", "--artifacts", str(work / "build"))
    base = {"amd64": releases["v1"], "arm64": releases["arm64"]}
    patch = {arch: dataclasses.replace(
        one_arch(work / "build", arch, work / f"patch-{arch}", fixture_signing_key),
        standins=((update.BINARY, update.NEW_BINARY),)) for arch in base}
    group = next(p.groups[0] for p in L.load(lock_path).images if p.ref == update.NEW_REF)
    layers = {}
    for arch in base:
        old = archived_manifests(archive_path(base[arch], group))[update.OLD_REF]
        new = archived_manifests(archive_path(patch[arch], group))[update.NEW_REF]
        layers[arch] = (tuple(d.digest for d in old.layers), tuple(d.digest for d in new.layers))
    return UpdatePair(base, patch, update.OLD_REF, update.NEW_REF, group, update.BINARY, layers,
                      lock_path, fetched.store)


@pytest.fixture(scope="session")
def named_release(fetched: Built, tmp_path_factory: pytest.TempPathFactory) -> Release:
    """An unsigned amd64 release named my-k8s (INSTALL_MY_K8S_* drives its installer)."""
    base = tmp_path_factory.mktemp("named")
    out = build_variant(fetched, base / "build", arches=("amd64",), change=variant(V1, name="my-k8s"))
    return one_arch(out, "amd64", base / "my-k8s", None)


@pytest.fixture(scope="session")
def chartless_release(fetched: Built, tmp_path_factory: pytest.TempPathFactory) -> Release:
    """An unsigned amd64 release whose runtime image has no /charts (the lock says why)."""
    def change(lock: L.Lock) -> L.Lock:
        lock = variant(V1)(lock)
        assert lock.runtime is not None
        return dataclasses.replace(
            lock, charts={}, components={k: c for k, c in lock.components.items()
                                         if k not in lock.runtime.charts},
            runtime=dataclasses.replace(lock.runtime, charts=(), no_charts="fixture: a runtime without charts"))
    base = tmp_path_factory.mktemp("chartless")
    out = build_variant(fetched, base / "build", arches=("amd64",), change=change)
    return one_arch(out, "amd64", base / "nocharts", None)


@pytest.fixture
def scratch_release(tmp_path: Path, releases: dict[str, Release]) -> Callable[[str], Release]:
    """A copy of a session release to tamper with: scratch_release('v1') (see scratch_copy)."""
    def make(which: str = "v1", linked: bool = True) -> Release:
        dest = tmp_path / f"artifacts-{which}"
        if dest.exists():
            shutil.rmtree(dest)
        return scratch_copy(releases[which], dest, linked)
    return make


def unsigned_copy(release: Release, dest: Path) -> Release:
    """A full copy (no hard links: its user may write anywhere in it) without the signature:
    what `build` alone leaves."""
    copy = scratch_copy(release, dest, linked=False)
    for sig in dest.glob("sha256sum-*.txt.sig"):
        sig.unlink()
    return dataclasses.replace(copy, public_key=None)
