"""A realistic patch update of the session's release: what changes, served on loopback.

A patch release of a Kubernetes distribution changes a few images and a few binaries. This rig
makes the smallest honest one from real bytes:

- one image gets a new top layer, its lower layers unchanged: ``rancher/fixture-socat`` 1.7.4
  (base layer, busybox layer, socat layer) becomes 1.7.5, the same two lower layers under a top
  layer holding the same real socat plus the version file a rebuild of the package would bring;
- one runtime binary gets other real bytes: ``kubectl`` (a busybox-static stand-in in the
  session's lock, tests/rig/mirror.py) becomes Debian's ``containerd-shim`` of the same arch, a
  real ELF standing in for the next kubectl patch build.

``serving`` pushes the new image to a fresh loopback registry and lays the new binary out on a
fresh nginx, under the same upstream names the session's lock uses (``docker.io/rancher/...``
and ``https://fixtures.invalid/``); ``patched_lock`` is the session's lock with the new image pin
and the binary's URL left unresolved and its mirrors pointed at those servers, so
`python -m builder lock` resolves both through them and `fetch` fetches them like every other
input. Nothing is hand-written: every digest comes from the builder's own `lock`.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from builder.fetch.registry import RegistryClient
from builder.lock import lockfile as L
from builder.oci.layer import FileEntry, Layer, write_layer
from builder.oci.reference import Reference
from builder.store import Store
from tests.rig import images as fixture_images
from tests.rig import mirror, payloads
from tests.rig.fileserver import FileServer
from tests.rig.registry import Registry

PATCH = "v1.32.14+rke2r1"  # the patch release (the base is tests/plugins/releases.V1)
REPOSITORY = "rancher/fixture-socat"  # the image whose top layer the patch changes
OLD_TAG, NEW_TAG = "1.7.4", "1.7.5"
OLD_REF = f"docker.io/{REPOSITORY}:{OLD_TAG}"
NEW_REF = f"docker.io/{REPOSITORY}:{NEW_TAG}"
BINARY = "kubectl"  # the runtime binary the patch changes
NEW_BINARY = "containerd-shim"  # the real Debian binary (tests/rig/payloads) it becomes


def new_binary(arch: str) -> Path:
    """The bytes the patch's bin/kubectl has for ``arch``."""
    return payloads.binary(NEW_BINARY, arch)


def _top_layer(store: Store, arch: str) -> Layer:
    # The same real socat as 1.7.4's top layer, plus what a package rebuild changes beside it.
    return write_layer(store, [
        FileEntry("usr/bin/socat", payloads.binary("socat", arch), 0o755),
        FileEntry("usr/share/doc/socat/fixture-version", f"{NEW_TAG}\n".encode(), 0o644),
    ], fixture_images.EPOCH)


def patched_image(store: Store, arches: Sequence[str]) -> fixture_images.FixtureImage:
    """fixture-socat 1.7.5: tests/rig/images.py's two lower layers (byte-identical: the same
    deterministic builders) under a new top layer, as an OCI index over ``arches``."""
    base = fixture_images.base_layer(store)
    busybox = {a: fixture_images.busybox_layer(store, a) for a in arches}
    top = {a: _top_layer(store, a) for a in arches}
    return fixture_images.multi_arch(store, "fixtures/socat", NEW_TAG,
                                     lambda a: [base, busybox[a], top[a]], arches, "oci", True)


@dataclass(frozen=True)
class Served:
    registry: Registry
    files: FileServer
    mirrors_path: Path  # the host's mirrors file: plain HTTP to this registry

    def binary_url(self, arch: str) -> str:
        return f"{mirror.UPSTREAM}update/{BINARY}-{PATCH}.linux-{arch}"


@contextmanager
def serving(work: Path, arches: Sequence[str] = payloads.ARCHES,
            fixture_image: bool = True) -> Iterator[Served]:
    """A registry holding fixture-socat:1.7.5 (unless not ``fixture_image``: the bench pushes
    its own patched image there) and a file server holding the new kubectl, under ``work``;
    both stopped on exit."""
    root = work / "www"
    for arch in arches:
        dest = root / "update" / f"{BINARY}-{PATCH}.linux-{arch}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(new_binary(arch), dest)
    files = FileServer(root=root, work=work / "nginx").start()
    try:
        reg = Registry(work=work / "registry").start()
        try:
            if fixture_image:
                store = Store(work / "image-store")
                image = patched_image(store, arches)
                client = RegistryClient(mirrors=L.Mirrors(insecure=(reg.host,)))
                client.push_tree(store, Reference(reg.host, REPOSITORY, NEW_TAG), image.top)
            mirrors_path = work / "mirrors.yaml"
            mirrors_path.write_text(yaml.safe_dump({"insecure": [reg.host]}))
            yield Served(reg, files, mirrors_path)
        finally:
            reg.stop()
    finally:
        files.stop()


def patched_lock(lock: L.Lock, served: Served, image: tuple[str, str] = (OLD_REF, NEW_REF)) -> L.Lock:
    """``lock`` (the base release's) with the patch: version PATCH, ``image`` (old → new
    reference; fixture-socat 1.7.4 → 1.7.5) and kubectl at the new URL, both unresolved (for
    `lock`), mirrors onto ``served``."""
    old, new = image
    pins = tuple(L.ImagePin(new, p.groups) if p.ref == old else p for p in lock.images)
    assert pins != lock.images, f"{old} is not in the lock"
    kubectl = lock.components[BINARY]
    arts = {a: L.FileArtifact(url=served.binary_url(a)) for a in kubectl.arches}
    mirrors = L.Mirrors(
        files=(L.FileMirror(mirror.UPSTREAM, (served.files.url + "/",), fallback=False),),
        registries=(L.RegistryMirror("docker.io", (served.registry.url,), fallback=False),))
    return dataclasses.replace(
        lock, release=dataclasses.replace(lock.release, version=PATCH), images=pins,
        components={**lock.components,
                    BINARY: dataclasses.replace(kubectl, version=PATCH, arches=arts)},
        mirrors=mirrors)
