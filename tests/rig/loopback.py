"""A complete loopback mirror for a fixture release: files on nginx, images on the registry.

The images are pushed under the names a real release uses (``rancher/...``) and the lock names
them as ``docker.io/rancher/...``; the lock's registry mirror maps docker.io onto the loopback
registry with no fallback, which is exactly how an air-gapped build host is configured.
Image and chart pins are left unresolved when asked, so `python -m builder lock` has real work
to do (chart files are downloaded and hashed through the file mirror).
The registry is plain HTTP, which only the host's mirrors file (``mirrors_path``) may allow.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from builder.fetch.registry import RegistryClient
from builder.lock import lockfile as L
from builder.oci.reference import Reference
from builder.store import Store
from tests.rig import images as fixture_images
from tests.rig import mirror, payloads, trivydb
from tests.rig.fileserver import FileServer
from tests.rig.registry import Registry

# fixture image -> (repository on the registry, tag, groups)
IMAGES = {
    "fixtures/busybox": ("rancher/mirrored-library-busybox", "1.36.1", ("core",)),
    "fixtures/socat": ("rancher/fixture-socat", "1.7.4", ("canal",)),
    "fixtures/busybox-list": ("rancher/fixture-busybox-list", "1.36.1", ("multus",)),
}


@dataclass
class Loopback:
    files: FileServer
    registry: Registry
    lock_path: Path
    lock: L.Lock
    mirrors_path: Path  # the build host's mirrors file: pass as --mirrors or BUILDER_MIRRORS
    trivy_db_ref: str  # HOST/aquasec/trivy-db@sha256:..., a small offline vulnerability DB


def seed_trivy_db(reg: Registry, scratch: Path) -> str:
    """A small vulnerability DB (one Debian advisory) as a trivy-db:2 artifact on the registry.

    The fixture images carry no OS package database, so a scan with it passes; the scan tests
    plant a vulnerable package to see the gate fail.
    """
    db = trivydb.TrivyDB().add("debian 12", "openssl", "CVE-2099-0001", fixed="3.0.99-1",
                               severity="HIGH", title="fixture advisory")
    client = RegistryClient(mirrors=L.Mirrors(insecure=(reg.host,)))
    return trivydb.push_artifact(client, reg.host, Store(scratch), db.tarball())


def seed_images(reg: Registry, scratch: Path, resolved: bool) -> tuple[L.ImagePin, ...]:
    store = Store(scratch)
    built = fixture_images.build_fixtures(store)
    client = RegistryClient(mirrors=L.Mirrors(insecure=(reg.host,)))
    pins = []
    for img in built:
        repo, tag, groups = IMAGES[img.repository]
        client.push_tree(store, Reference(reg.host, repo, tag), img.top)
        ref = f"docker.io/{repo}:{tag}"
        if resolved:
            pins.append(L.ImagePin(ref, groups, img.top.digest,
                                   {a: d.digest for a, d in sorted(img.manifests.items())}))
        else:
            pins.append(L.ImagePin(ref, groups))
    return tuple(pins)


@contextmanager
def running(work: Path, resolved: bool = True, name: str = "rke2") -> Iterator[Loopback]:
    """Start nginx + registry under ``work``, seed them, write ``work/images.lock``; stop on exit."""
    work.mkdir(parents=True, exist_ok=True)
    root = payloads.cache_dir() / "mirror"
    files = mirror.build(root)
    fs = FileServer(root=work / "www", work=work / "nginx")
    if not fs.root.exists():
        fs.root.parent.mkdir(parents=True, exist_ok=True)
        fs.root.symlink_to(root)
    reg = Registry(work=work / "registry")
    fs.start()
    try:
        reg.start()
        try:
            pins = seed_images(reg, work / "fixture-store", resolved)
            lock = mirror.lock_for(
                files, fs.url, images=pins,
                registry_mirrors=(L.RegistryMirror("docker.io", (reg.url,), fallback=False),),
                name=name, charts_resolved=resolved,
            )
            lock_path = work / "images.lock"
            L.save(lock, lock_path)
            # The loopback registry speaks plain HTTP; only a host's mirrors file may allow that.
            mirrors_path = work / "mirrors.yaml"
            mirrors_path.write_text(yaml.safe_dump({"insecure": [reg.host]}))
            yield Loopback(fs, reg, lock_path, lock, mirrors_path,
                           seed_trivy_db(reg, work / "fixture-store"))
        finally:
            reg.stop()
    finally:
        fs.stop()
