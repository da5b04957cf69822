"""The runtime image, built here `FROM scratch`: /bin (the lock's runtime components) and /charts
(a HelmChart manifest per chart of the lock, see assemble/charts.py, plus the lock's
``runtime.charts`` component files).

Its layers are content-addressed, so a delta release (issue 15) carries only what changed: one
layer per component file (``bin/TARGET`` for each of ``runtime.bin``, then ``charts/TARGET`` for
each of ``runtime.charts``, in the lock's order), then one layer with the generated HelmChart
manifests (``charts/*.yaml``). A component layer holds its parent directory and its file, with
mtime 0 throughout, so its bytes depend only on the file's path, mode and bytes: every release
that ships the same kubectl ships the same layer blob, which the node already has. The manifests
change with every release anyway (they carry its Kubernetes version as kubeVersion, and each
packed chart's members have the release's SOURCE_DATE_EPOCH), so grouping them costs nothing.
What changes per release besides is the image config and manifest (labels with the version,
``created``): small metadata.

The supervisor extracts every layer of the image in order, the top layer winning for a name:
rancher/rke2 v1.32.13+rke2r1 ``pkg/bootstrap/bootstrap.go`` Stage → rancher/wharfie v0.6.9
``pkg/extract/extract.go`` ExtractDirs → go-containerregistry v0.20.2 ``mutate.Extract``
(``pkg/v1/mutate/mutate.go`` extract: ``img.Layers()`` walked from the top down, the first entry
seen for a name kept). wharfie sets no file times, so mtime 0 costs the node nothing; install.sh's
stage_runtime extracts ``RUNTIME_LAYERS`` in order likewise. Each layer carries the directory
entries it needs (``bin/``, ``charts/``) with the same mode and mtime, so extraction order never
changes the result.

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
from builder.oci.layer import FileEntry, plan_entries, write_layer
from builder.store import Store

# A layer's tar headers carry no time: a component file has none of its own that a node needs
# (the supervisor's extraction sets no file times), and its layer must be the same blob in every
# release that ships the same file, whatever that release's SOURCE_DATE_EPOCH. The manifests
# layer uses it too, so the bin/ and charts/ entries are the same in every layer.
LAYER_MTIME = 0
# The cache recipe's version. 2: one layer per component file plus the manifests layer, at
# LAYER_MTIME (1: one layer at the release epoch); a runtime an older recipe built is not reused.
RECIPE_VERSION = 2


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


def _layer_entries(store: Store, files: list[tuple[str, str, int, str]],
                   made: list[charts.ChartManifest]) -> list[list[FileEntry]]:
    """The entries of each layer, in order: one layer per component file (the lock's order),
    then one with the generated manifests (none when the lock has no charts). write_layer adds
    each layer's parent directories (bin/, charts/) at DIR_MODE and LAYER_MTIME."""
    entries = [store_file(store, *f) for f in files]
    manifests = [FileEntry(c.path, c.data, 0o644) for c in made]
    # The one-layer image refused a path given twice with other content or mode; so do the
    # layers (in separate layers the top one would silently win). No file is read here.
    plan_entries(entries + manifests)
    layers: list[list[FileEntry]] = []
    seen: set[str] = set()
    for entry in entries:
        if entry.path not in seen:  # a component listed twice: one layer, as one file before
            seen.add(entry.path)
            layers.append([entry])
    if manifests:
        layers.append(manifests)
    return layers


def build(lock: Lock, arch: str, store: Store, epoch: int) -> RuntimeImage:
    charts.require_charts(lock)
    files, absent = _entries(lock, arch, store)
    # Made from the chart blobs on every build (for each arch), so each chart is re-hashed
    # before anything ships, also when the image itself comes from the cache.
    made = charts.manifests(lock, store, epoch)
    platform = m.Platform.for_arch(arch)
    recipe = hashlib.sha256(json.dumps(
        {"v": RECIPE_VERSION, "files": [f[:3] for f in files], "epoch": epoch,
         "labels": labels(lock), "platform": str(platform),
         "charts": [(c.path, hashlib.sha256(c.data).hexdigest()) for c in made]},
        sort_keys=True).encode()).hexdigest()
    cached = _cached(store, recipe)
    if cached:
        manifest, _ = oci_image.load_image(store, cached)
        desc = m.Descriptor(manifest.media_type, cached, len(manifest.raw), platform)
    else:
        layers = [write_layer(store, entries, LAYER_MTIME)
                  for entries in _layer_entries(store, files, made)]
        # The config's ``created`` keeps the release epoch: the config changes per release anyway
        # (its version labels), and it is metadata, not a layer.
        desc = oci_image.build_image(store, layers, platform, epoch, labels(lock))
        store.index_put("runtime", recipe, desc.digest)
        manifest, _ = oci_image.load_image(store, desc.digest)
    return RuntimeImage(reference(lock), arch, desc, tuple(lay.digest for lay in manifest.layers),
                        tuple(absent))


def build_index(store: Store, images: list[RuntimeImage]) -> m.Descriptor:
    """One multi-arch index over the per-arch runtime images (what a registry push would tag)."""
    return oci_image.build_index(store, [img.manifest for img in images])
