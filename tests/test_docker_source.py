"""Images from a Docker-API daemon (podman's compatible service from Debian) into the store."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import docker
import pytest

from builder import digest as dg
from builder.errors import BuilderError
from builder.fetch.docker_api import DaemonSource, import_archive
from builder.fetch.images import pull_images
from builder.fetch.registry import ClientOptions, RegistryClient
from builder.fetch.transport import RetryPolicy
from builder.lock.lockfile import ImagePin, Mirrors
from builder.oci import model as m
from builder.oci.image import load_image
from builder.oci.reference import parse
from builder.store import Store
from tests.rig.images import docker_archive, lock_for

NAME = "example.com/ci/app:dev"
SHORT = "ci-short:dev"  # podman files it as localhost/ci-short:dev


@pytest.fixture(scope="module")
def loaded(podman_service, fixture_set, tmp_path_factory):
    """The arm64 busybox fixture loaded into podman under two names (like a CI-built image)."""
    src, images = fixture_set
    manifest = images[0].manifests["arm64"].digest
    work = tmp_path_factory.mktemp("daemon-archives")
    client = docker.DockerClient(base_url=podman_service, timeout=60)
    try:
        for name in (NAME, SHORT):
            archive = docker_archive(src, manifest, name, work / f"{name.replace('/', '_')}.tar")
            with open(archive, "rb") as fh:
                client.images.load(fh)
    finally:
        client.close()
    return src, manifest


def test_take_image_from_daemon(podman_service, loaded, tmp_path):
    """Name kept, platform checked, config byte for byte (= the daemon's image ID), layers
    verified against diff_ids and gzipped deterministically: a second take is identical."""
    src, fixture_manifest = loaded
    store = Store(tmp_path / "store")
    source = DaemonSource(podman_service)
    taken = source.take(f"docker-daemon:{NAME}", "arm64", store)
    assert taken.ref == NAME and taken.name == NAME
    manifest, config = load_image(store, taken.image.manifest.digest)
    fixture, fixture_config = load_image(src, fixture_manifest)
    assert manifest.config.digest == fixture.config.digest and config.diff_ids == fixture_config.diff_ids
    assert manifest.media_type == m.DOCKER_MANIFEST
    for layer, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
        assert layer.media_type == m.DOCKER_LAYER_GZIP
        with store.open(layer.digest) as fh, gzip.GzipFile(fileobj=fh) as gz:
            assert dg.of_stream(gz)[0] == diff_id
    again = source.take(NAME, "arm64", Store(tmp_path / "again"))
    assert again.image.manifest.digest == taken.image.manifest.digest

    short = source.take(SHORT, "arm64", store)
    assert short.name == f"localhost/{SHORT}" and short.image.config == taken.image.config


def test_daemon_image_of_another_arch_is_refused(podman_service, loaded, tmp_path):
    with pytest.raises(BuilderError, match="linux/arm64, not linux/amd64") as err:
        DaemonSource(podman_service).take(NAME, "amd64", Store(tmp_path / "s"))
    assert NAME in str(err.value)


def test_missing_daemon_image(podman_service, tmp_path):
    with pytest.raises(BuilderError, match="no such image"):
        DaemonSource(podman_service).take("docker-daemon:example.com/nope:1", "amd64", Store(tmp_path))


def test_taken_image_is_pushable_and_pullable(podman_service, loaded, registry, tmp_path):
    """The manifest made from the daemon's save pushes to a real registry and pulls back."""
    store = Store(tmp_path / "store")
    taken = DaemonSource(podman_service).take(NAME, "arm64", store)
    mirrors = Mirrors(insecure=(registry.host,))
    client = RegistryClient(mirrors=mirrors, options=ClientOptions(policy=RetryPolicy(attempts=2, backoff=0.01)))
    ref = parse(f"{registry.host}/ci/app:dev")
    client.push_tree(store, ref, taken.image.manifest)
    digest = taken.image.manifest.digest
    pin = ImagePin(str(ref), ("core",), digest, {"arm64": digest}, ("arm64",))
    report = pull_images(lock_for([pin], ["arm64"], mirrors), ["arm64"], Store(tmp_path / "back"),
                         client=client, quiet=True)
    assert report.images[0].manifest == digest


def test_archive_layouts_give_the_same_image(fixture_set, tmp_path):
    """Legacy layout, OCI layout with manifest.json (Docker 25+), and OCI layout alone: one
    image, one manifest digest (layers are re-gzipped deterministically)."""
    src, images = fixture_set
    manifest = images[2].manifests["amd64"].digest  # socat: three layers
    digests = set()
    for i, kwargs in enumerate([{}, {"oci_layout": True},
                                {"oci_layout": True, "docker_manifest": False}]):
        archive = docker_archive(src, manifest, NAME, tmp_path / f"a{i}.tar", **kwargs)
        taken = import_archive(Store(tmp_path / f"s{i}"), archive, NAME)
        assert taken.platform == m.Platform("linux", "amd64")
        assert taken.repo_tags == (NAME,)
        digests.add(taken.manifest.digest)
    assert len(digests) == 1


def test_corrupt_layer_in_archive_is_refused(fixture_set, tmp_path):
    src, images = fixture_set
    archive = docker_archive(src, images[0].manifests["amd64"].digest, NAME, tmp_path / "a.tar")
    bad = tmp_path / "bad.tar"
    with tarfile.open(archive) as tin, tarfile.open(bad, "w") as tout:
        for info in tin.getmembers():
            data = tin.extractfile(info).read()
            if info.name.endswith("layer.tar") and info.size > 4096:
                data = data[:-2000] + bytes(b ^ 0x5A for b in data[-2000:-1024]) + data[-1024:]
            tout.addfile(info, io.BytesIO(data))
    store = Store(tmp_path / "s")
    with pytest.raises(BuilderError, match="diff_id"):
        import_archive(store, bad, NAME)
    assert not list(Path(store.root / "tmp").iterdir())


def test_lock_and_fetch_an_image_from_the_daemon(podman_service, loaded, tmp_path, monkeypatch):
    """A lock pin with `daemon:`: `lock` records the converted manifest, `fetch` takes it again
    and requires the same digest; a stored image never asks the daemon again."""
    from dataclasses import replace

    from builder.errors import BuilderError
    from builder.fetch.images import pull_images, resolve_images
    from builder.lock import lockfile

    monkeypatch.setenv("BUILDER_DOCKER_HOST", podman_service)
    pin = lockfile.ImagePin("docker.io/ci/app:dev", ("core",), arches=("arm64",),
                            daemon=f"docker-daemon:{NAME}")
    locked = resolve_images(lock_for([pin]), store=Store(tmp_path / "lock-store"))
    [got] = locked.images
    assert got.digest and got.platforms == {"arm64": got.digest}
    assert lockfile.parse(lockfile.dumps(locked)).images == locked.images  # `daemon:` round-trips

    store = Store(tmp_path / "store")
    pull_images(locked, ["amd64", "arm64"], store, quiet=True)
    manifest, config = load_image(store, got.digest)
    assert config.platform.architecture == "arm64" and all(store.has(la.digest) for la in manifest.layers)

    monkeypatch.setenv("BUILDER_DOCKER_HOST", "unix:///nonexistent/daemon.sock")
    pull_images(locked, ["amd64", "arm64"], store, quiet=True)  # stored: the daemon is not asked

    monkeypatch.setenv("BUILDER_DOCKER_HOST", podman_service)
    stale = replace(got, digest="sha256:" + "1" * 64, platforms={"arm64": "sha256:" + "1" * 64})
    with pytest.raises(BuilderError, match="rebuilt since `lock`"):
        pull_images(replace(locked, images=(stale,)), ["arm64"], Store(tmp_path / "other"), quiet=True)
