"""Build image configs, manifests and indexes into the store (OCI or Docker schema 2).

Every document is serialised once with ``canonical_json`` and stored by digest, so a rebuild of
the same layers, platform, labels and ``created`` epoch gives the same manifest digest.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from builder.errors import BuilderError
from builder.oci import model as m
from builder.oci.layer import Layer
from builder.store import Store

MEDIA = ("oci", "docker")
CREATED_BY = "airgap-builder"

# Layer media types per family: a Docker manifest must name Docker layer types.
_TO_DOCKER_LAYER = {m.OCI_LAYER_GZIP: m.DOCKER_LAYER_GZIP, m.DOCKER_LAYER_GZIP: m.DOCKER_LAYER_GZIP}
_TO_OCI_LAYER = {m.DOCKER_LAYER_GZIP: m.OCI_LAYER_GZIP}


def rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(int(epoch), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_media(media: str) -> None:
    if media not in MEDIA:
        raise BuilderError(f"image: unknown media family {media!r}", "use 'oci' or 'docker'")


def _layer_type(layer: Layer, media: str) -> str:
    if media == "docker":
        try:
            return _TO_DOCKER_LAYER[layer.media_type]
        except KeyError:
            raise BuilderError(f"image: layer {layer.digest} ({layer.media_type}) cannot go in a "
                               "Docker schema 2 manifest", "build it as an OCI image") from None
    return _TO_OCI_LAYER.get(layer.media_type, layer.media_type)


def image_config(layers: Sequence[Layer], platform: m.Platform, created: int,
                 labels: dict[str, str] | None = None,
                 config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config document: platform, rootfs diff_ids, history, and the runtime config."""
    runtime: dict[str, Any] = dict(config or {})
    if labels:
        runtime["Labels"] = {**(runtime.get("Labels") or {}), **labels}
    stamp = rfc3339(created)
    doc: dict[str, Any] = {
        "architecture": platform.architecture,
        "os": platform.os,
        "created": stamp,
        "config": runtime,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": stamp, "created_by": CREATED_BY} for _ in layers],
    }
    if platform.variant:
        doc["variant"] = platform.variant
    return doc


def build_image(store: Store, layers: Sequence[Layer], platform: m.Platform, created: int,
                labels: dict[str, str] | None = None, config: dict | None = None,
                media: str = "oci") -> m.Descriptor:
    """Store the config and manifest of an image; return the manifest descriptor (with platform)."""
    _check_media(media)
    for layer in layers:
        if not store.has(layer.digest):
            raise BuilderError(f"image: layer {layer.digest} is not in the store",
                               "write it with write_layer first")
    config_type = m.DOCKER_CONFIG if media == "docker" else m.OCI_CONFIG
    manifest_type = m.DOCKER_MANIFEST if media == "docker" else m.OCI_MANIFEST
    config_raw = m.canonical_json(image_config(layers, platform, created, labels, config))
    config_digest = store.put_bytes(config_raw, what="image config")
    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": m.Descriptor(config_type, config_digest, len(config_raw)).to_json(),
        "layers": [m.Descriptor(_layer_type(layer, media), layer.digest, layer.size).to_json()
                   for layer in layers],
    }
    raw = m.canonical_json(manifest)
    digest = store.put_bytes(raw, what="image manifest")
    return m.Descriptor(manifest_type, digest, len(raw), platform=platform)


def index_document(manifests: Sequence[m.Descriptor], media: str = "oci",
                   annotations: dict[str, str] | None = None) -> bytes:
    """The canonical bytes of an OCI index or a Docker manifest list over ``manifests``."""
    _check_media(media)
    want = m.DOCKER_MANIFEST if media == "docker" else m.OCI_MANIFEST
    for desc in manifests:
        # A Docker list may only hold Docker manifests; an OCI index may hold either kind.
        if media == "docker" and desc.media_type != want:
            raise BuilderError(f"index: {desc.digest} is {desc.media_type}, a Docker manifest "
                               "list can only hold Docker manifests", "build the index as OCI")
        if desc.media_type not in m.MANIFEST_TYPES + m.INDEX_TYPES:
            raise BuilderError(f"index: {desc.digest} has unsupported type {desc.media_type!r}")
    if annotations and media == "docker":
        raise BuilderError("index: a Docker manifest list cannot carry annotations",
                           "build the index as OCI")
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": m.DOCKER_LIST if media == "docker" else m.OCI_INDEX,
        "manifests": [d.to_json() for d in manifests],
    }
    if annotations:
        doc["annotations"] = dict(sorted(annotations.items()))
    return m.canonical_json(doc)


def build_index(store: Store, manifests: Sequence[m.Descriptor], media: str = "oci",
                annotations: dict[str, str] | None = None) -> m.Descriptor:
    """Store an OCI index or a Docker manifest list over ``manifests`` (all in the store)."""
    raw = index_document(manifests, media, annotations)
    for desc in manifests:
        if not store.has(desc.digest):
            raise BuilderError(f"index: manifest {desc.digest} is not in the store")
    digest = store.put_bytes(raw, what="image index")
    return m.Descriptor(m.DOCKER_LIST if media == "docker" else m.OCI_INDEX, digest, len(raw))


def load_image(store: Store, manifest_digest: str) -> tuple[m.Manifest, m.ImageConfig]:
    """The manifest and config of a single-platform image in the store."""
    where = f"image {manifest_digest}"
    doc = m.parse_document(store.read_bytes(manifest_digest), where)
    if not isinstance(doc, m.Manifest):
        raise BuilderError(f"{where}: is an index, not an image manifest",
                           "select one platform's manifest from the index first")
    config = m.parse_config(store.read_bytes(doc.config.digest), f"{where} config")
    if len(config.diff_ids) != len(doc.layers):
        raise BuilderError(f"{where}: {len(doc.layers)} layers but {len(config.diff_ids)} diff_ids")
    return doc, config
