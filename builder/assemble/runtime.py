"""The runtime image, built here `FROM scratch`: /bin (the lock's runtime components) and /charts
(a HelmChart manifest per chart of the lock, see assemble/charts.py, plus the lock's
``runtime.charts`` component files).

Built into the store per arch (cached by recipe, so a rebuild with nothing changed costs a lookup),
plus a multi-arch index over the per-arch images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from builder.assemble import charts
from builder.fetch import components
from builder.lock.lockfile import Lock
from builder.oci import image as oci_image
from builder.oci import model as m
from builder.oci.layer import FileEntry, write_layer
from builder.store import Store


@dataclass(frozen=True)
class RuntimeImage:
    ref: str  # docker.io/rancher/rke2-runtime:v1.32.13-rke2r1
    arch: str
    manifest: m.Descriptor
    layers: tuple[str, ...]  # gzip layer digests, in order
    absent: tuple[str, ...]  # "name: reason" for components the lock says are absent


def reference(lock: Lock) -> str:
    assert lock.runtime is not None
    return lock.runtime.reference(lock.release.version)


def labels(lock: Lock) -> dict[str, str]:
    r = lock.release
    out = {"org.opencontainers.image.title": f"{r.name}-runtime",
           "org.opencontainers.image.version": r.version}
    if r.source:
        out["org.opencontainers.image.source"] = r.source
    if r.revision:
        out["org.opencontainers.image.revision"] = r.revision
    return out


def store_file(store: Store, path: str, digest: str, mode: int, origin: str) -> FileEntry:
    """A file packed from the store: re-hashed while packed, so a blob changed on disk since it
    was verified stops the build (naming ``origin``, the lock entry) instead of shipping."""
    return FileEntry(path, store.blob_path(digest), mode, digest=digest, origin=origin)


def _entries(lock: Lock, arch: str, store: Store) -> tuple[list[tuple[str, str, int, str]], list[str]]:
    assert lock.runtime is not None
    files: list[tuple[str, str, int, str]] = []  # (path, digest, mode, lock entry)
    absent: list[str] = []
    for folder, names in (("bin", lock.runtime.bin), ("charts", lock.runtime.charts)):
        for name in names:
            comp = lock.components[name]
            digest = components.file_digest(store, comp, arch, check_arch=(folder == "bin"))
            if digest is None:
                art = comp.artifact(arch)
                absent.append(f"{name}: {comp.absent or (art.absent if art else 'no entry for ' + arch)}")
                continue
            files.append((f"{folder}/{comp.target}", digest, comp.mode, f"components.{name}.{arch}"))
    return files, absent


def _cached(store: Store, recipe: str) -> str | None:
    """The runtime image built from this recipe before, if every blob of it is still stored
    (`store verify` may have removed a bad layer: then it is built again, not looked for)."""
    digest = store.index_get("runtime", recipe)  # None when the manifest blob is gone
    if digest is None:
        return None
    doc = m.parse_document(store.read_bytes(digest), f"runtime image {digest}")
    if not isinstance(doc, m.Manifest):
        return None
    return digest if all(store.has(d.digest) for d in (doc.config, *doc.layers)) else None


def build(lock: Lock, arch: str, store: Store, epoch: int) -> RuntimeImage:
    charts.require_charts(lock)
    files, absent = _entries(lock, arch, store)
    # Made from the chart blobs on every build (for each arch), so each chart is re-hashed
    # before anything ships, also when the image itself comes from the cache.
    made = charts.manifests(lock, store, epoch)
    platform = m.Platform.for_arch(arch)
    recipe = hashlib.sha256(json.dumps(
        {"v": 1, "files": [f[:3] for f in files], "epoch": epoch, "labels": labels(lock),
         "platform": str(platform),
         "charts": [(c.path, hashlib.sha256(c.data).hexdigest()) for c in made]},
        sort_keys=True).encode()).hexdigest()
    cached = _cached(store, recipe)
    if cached:
        manifest, _ = oci_image.load_image(store, cached)
        desc = m.Descriptor(manifest.media_type, cached, len(manifest.raw), platform)
    else:
        entries = [store_file(store, *f) for f in files]
        entries += [FileEntry(c.path, c.data, 0o644) for c in made]
        layer = write_layer(store, entries, epoch)
        desc = oci_image.build_image(store, [layer], platform, epoch, labels(lock))
        store.index_put("runtime", recipe, desc.digest)
        manifest, _ = oci_image.load_image(store, desc.digest)
    return RuntimeImage(reference(lock), arch, desc, tuple(lay.digest for lay in manifest.layers),
                        tuple(absent))


def build_index(store: Store, images: list[RuntimeImage]) -> m.Descriptor:
    """One multi-arch index over the per-arch runtime images (what a registry push would tag)."""
    return oci_image.build_index(store, [img.manifest for img in images])
