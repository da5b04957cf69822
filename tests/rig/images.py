"""Multi-arch fixture images from real Debian binaries, built in a scratch store and pushed.

The set shares layers the way real image sets do, so "fetched once" is visible:

- ``fixtures/busybox:1.36``       OCI index: amd64 + arm64 (busybox-static), plus a BuildKit-style
                                  attestation manifest (platform unknown/unknown)
- ``fixtures/busybox-list:1.36``  the same images as Docker schema 2 (manifest list): same layer
                                  blobs, different manifests
- ``fixtures/socat:1.7``          OCI index: base layer + busybox layer + socat layer per arch

Everything is deterministic (fixed mtime and ``created``), so digests are stable across runs.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builder import digest as dg
from builder.fetch.registry import RegistryClient
from builder.lock.lockfile import ImagePin, Lock, Mirrors, Release
from builder.oci import model as m
from builder.oci.image import build_image, build_index
from builder.oci.layer import FileEntry, Layer, write_layer
from builder.oci.reference import Reference
from builder.store import Store
from tests.rig.payloads import binary

EPOCH = 1_700_000_000
ARCHES = ("amd64", "arm64")
IN_TOTO = "application/vnd.in-toto+json"


@dataclass(frozen=True)
class FixtureImage:
    repository: str  # e.g. fixtures/busybox
    tag: str
    top: m.Descriptor  # the index, or the manifest of a single-platform image
    manifests: dict[str, m.Descriptor] = field(default_factory=dict)  # arch -> manifest

    def ref(self, host: str) -> str:
        return f"{host}/{self.repository}:{self.tag}"

    def pin(self, host: str, groups: tuple[str, ...] = ("core",), resolved: bool = True) -> ImagePin:
        if not resolved:
            return ImagePin(self.ref(host), groups)
        return ImagePin(self.ref(host), groups, self.top.digest,
                        {arch: d.digest for arch, d in sorted(self.manifests.items())},
                        tuple(sorted(self.manifests)) if len(self.manifests) == 1 else None)

    def blobs(self, store: Store) -> set[str]:
        """Every digest reachable from ``top`` (index, manifests, configs, layers)."""
        out = {self.top.digest}
        for desc in self.manifests.values():
            doc = m.parse_document(store.read_bytes(desc.digest), desc.digest)
            assert isinstance(doc, m.Manifest)
            out |= {desc.digest, doc.config.digest, *(layer.digest for layer in doc.layers)}
        return out


def base_layer(store: Store) -> Layer:
    """The same bytes for every arch and image: a blob every pull shares (public: another
    image built on it, tests/rig/update.py's patch, must have it byte for byte)."""
    return write_layer(store, [
        FileEntry("etc/fixture-release", b"airgap-builder fixture\n", 0o644),
        FileEntry("tmp", is_dir=True, mode=0o1777),
    ], EPOCH)


def busybox_layer(store: Store, arch: str) -> Layer:
    """bin/busybox and bin/sh of ``arch``, the fixture images' second layer."""
    return write_layer(store, [
        FileEntry("bin/busybox", binary("busybox", arch), 0o755),
        FileEntry("bin/sh", linkname="busybox"),
    ], EPOCH)


def _tool_layer(store: Store, name: str, arch: str) -> Layer:
    return write_layer(store, [FileEntry(f"usr/bin/{name}", binary(name, arch), 0o755)], EPOCH)


def attestation(store: Store, subject: m.Descriptor) -> m.Descriptor:
    """A BuildKit-style attestation manifest for ``subject`` (platform unknown/unknown)."""
    statement = m.canonical_json({
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": "https://slsa.dev/provenance/v0.2",
        "subject": [{"name": "fixture", "digest": {"sha256": dg.hex_of(subject.digest)}}],
        "predicate": {"builder": {"id": "airgap-builder-rig"}},
    })
    layer_digest = store.put_bytes(statement, what="attestation")
    config = m.canonical_json({"architecture": "unknown", "os": "unknown", "config": {},
                               "rootfs": {"type": "layers", "diff_ids": [layer_digest]}})
    config_digest = store.put_bytes(config, what="attestation config")
    manifest = m.canonical_json({
        "schemaVersion": 2,
        "mediaType": m.OCI_MANIFEST,
        "config": {"mediaType": m.OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": IN_TOTO, "digest": layer_digest, "size": len(statement),
                    "annotations": {"in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2"}}],
    })
    digest = store.put_bytes(manifest, what="attestation manifest")
    return m.Descriptor(m.OCI_MANIFEST, digest, len(manifest), platform=m.Platform("unknown", "unknown"),
                        annotations={"vnd.docker.reference.digest": subject.digest,
                                     "vnd.docker.reference.type": "attestation-manifest"})


def multi_arch(store: Store, repository: str, tag: str, layers_for, arches: Sequence[str],
               media: str, with_attestation: bool) -> FixtureImage:
    """An index (``media`` oci or docker) over one manifest per arch of ``layers_for(arch)``,
    each titled ``repository``; with a BuildKit-style attestation per arch if asked."""
    manifests = {arch: build_image(store, layers_for(arch), m.Platform.for_arch(arch), EPOCH,
                                   labels={"org.opencontainers.image.title": repository},
                                   config={"Cmd": ["/bin/sh"]}, media=media)
                 for arch in arches}
    entries = list(manifests.values())
    if with_attestation:
        entries += [attestation(store, d) for d in manifests.values()]
    top = build_index(store, entries, media=media)
    return FixtureImage(repository, tag, top, manifests)


def build_fixtures(store: Store, arches: Sequence[str] = ARCHES,
                   with_attestation: bool = True) -> list[FixtureImage]:
    base = base_layer(store)
    busybox = {arch: busybox_layer(store, arch) for arch in arches}
    socat = {arch: _tool_layer(store, "socat", arch) for arch in arches}
    return [
        multi_arch(store, "fixtures/busybox", "1.36", lambda a: [base, busybox[a]], arches,
                   "oci", with_attestation),
        multi_arch(store, "fixtures/busybox-list", "1.36", lambda a: [base, busybox[a]], arches,
                   "docker", False),
        multi_arch(store, "fixtures/socat", "1.7", lambda a: [base, busybox[a], socat[a]], arches,
                   "oci", with_attestation),
    ]


def build_single(store: Store, repository: str, tag: str, arch: str,
                 entries: Iterable[FileEntry], media: str = "oci") -> FixtureImage:
    """A single-platform image (a manifest, no index)."""
    layer = write_layer(store, entries, EPOCH)
    desc = build_image(store, [layer], m.Platform.for_arch(arch), EPOCH, media=media)
    return FixtureImage(repository, tag, desc, {arch: desc})


def random_file(path: Path, size: int, seed: int = 1) -> Path:
    """``size`` incompressible bytes, reproducible from ``seed`` (written in 1 MiB pieces)."""
    import random

    rng = random.Random(seed)
    with open(path, "wb") as out:
        left = size
        while left:
            n = min(left, 1 << 20)
            out.write(rng.randbytes(n))
            left -= n
    return path


def push_fixtures(client: RegistryClient, store: Store, host: str,
                  images: Iterable[FixtureImage], chunk_size: int | None = None) -> None:
    for image in images:
        client.push_tree(store, Reference(host, image.repository, image.tag), image.top, chunk_size)


def lock_for(pins: Sequence[ImagePin], arches: Sequence[str] = ARCHES,
             mirrors: Mirrors | None = None) -> Lock:
    """A minimal images-only Lock around ``pins``."""
    return Lock(Release("rke2", "v0.0.0-fixture"), tuple(arches), {}, tuple(pins), None,
                mirrors or Mirrors())


def scratch_store(root: Path) -> Store:
    os.makedirs(root, exist_ok=True)
    return Store(root)


def save_member(tar: tarfile.TarFile, name: str, data: bytes | None = None, path: Path | None = None) -> None:
    """One member of a ``docker save``-style tar (mode 0644, mtime EPOCH): ``data``, or the file
    at ``path`` streamed (a layer can be larger than memory should hold)."""
    info = tarfile.TarInfo(name)
    info.mtime, info.mode = EPOCH, 0o644
    if path is not None:
        info.size = path.stat().st_size
        with open(path, "rb") as fh:
            tar.addfile(info, fh)
    else:
        assert data is not None
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def docker_archive(store: Store, manifest_digest: str, repo_tag: str, dest: Path,
                   oci_layout: bool = False, docker_manifest: bool = True) -> Path:
    """A ``docker save``-style tar of one image from the store, layers uncompressed.

    The legacy layout (``<hex>.json`` config, ``<hex>/layer.tar``) is what older engines and
    podman write; ``oci_layout=True`` writes what Docker 25+ writes instead: an OCI layout
    (``oci-layout``, ``index.json``, ``blobs/sha256/``) with ``manifest.json`` pointing into it.
    """
    import gzip
    import json

    from builder.oci.image import load_image

    manifest, config = load_image(store, manifest_digest)
    cfg_hex = dg.hex_of(manifest.config.digest)

    layer_names = []
    with tarfile.open(dest, "w") as tar:
        for i, (layer, diff_id) in enumerate(zip(manifest.layers, config.diff_ids, strict=True)):
            plain = dest.with_name(f"{dest.name}.layer{i}")
            with store.open(layer.digest) as src, gzip.GzipFile(fileobj=src) as gz, open(plain, "wb") as out:
                while chunk := gz.read(1 << 20):
                    out.write(chunk)
            name = (f"blobs/sha256/{dg.hex_of(diff_id)}" if oci_layout
                    else f"{dg.hex_of(diff_id)}/layer.tar")
            save_member(tar, name, path=plain)
            plain.unlink()
            layer_names.append(name)
        config_name = f"blobs/sha256/{cfg_hex}" if oci_layout else f"{cfg_hex}.json"
        save_member(tar, config_name, config.raw)
        if oci_layout:
            oci_manifest = m.canonical_json({
                "schemaVersion": 2, "mediaType": m.OCI_MANIFEST,
                "config": {"mediaType": m.OCI_CONFIG, "digest": manifest.config.digest,
                           "size": len(config.raw)},
                "layers": [{"mediaType": m.OCI_LAYER, "digest": d,
                            "size": tar.getmember(n).size}
                           for d, n in zip(config.diff_ids, layer_names, strict=True)]})
            save_member(tar, f"blobs/sha256/{dg.hex_of(dg.of_bytes(oci_manifest))}", oci_manifest)
            save_member(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            save_member(tar, "index.json", m.canonical_json({
                "schemaVersion": 2, "mediaType": m.OCI_INDEX,
                "manifests": [{"mediaType": m.OCI_MANIFEST, "digest": dg.of_bytes(oci_manifest),
                               "size": len(oci_manifest),
                               "annotations": {m.ANNOTATION_CONTAINERD_NAME: repo_tag,
                                               m.ANNOTATION_REF_NAME: repo_tag.rsplit(":", 1)[1]}}]}))
        if docker_manifest:
            save_member(tar, "manifest.json", json.dumps([{"Config": config_name, "RepoTags": [repo_tag],
                                                   "Layers": layer_names}]).encode())
    return dest
