"""OCI / Docker schema 2 model: media types, descriptors, platforms, manifests and indexes.

Parsing always starts from raw bytes whose digest was already checked; the parsed objects keep
those bytes (``raw``) so nothing is ever re-serialised and re-hashed differently. A checked digest
says nothing about size or shape (a hostile registry or release medium serves what it pinned), so
a JSON document is at most ``MAX_DOCUMENT`` bytes (distribution's and containerd's manifest cap)
and ``MAX_DEPTH`` levels deep, refused with a BuilderError before ``json`` sees it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from builder import digest as dg
from builder.artifacts import ARCH_PLATFORM  # Go/OCI names of the arches a lock may name
from builder.errors import BuilderError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join(INDEX_TYPES + MANIFEST_TYPES)

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
ANNOTATION_TITLE = "org.opencontainers.image.title"

MAX_DOCUMENT = 4 << 20  # bytes, a manifest, index or image config
MAX_DEPTH = 64  # an OCI document nests 4 or 5 deep



@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def for_arch(cls, arch: str) -> Platform:
        architecture, variant = ARCH_PLATFORM[arch]
        return cls("linux", architecture, variant)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Platform | None:
        if not data:
            return None
        return cls(data.get("os", ""), data.get("architecture", ""), data.get("variant") or None)

    def to_json(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out

    def matches(self, other: Platform) -> bool:
        """arm64 images often omit the v8 variant; treat a missing variant as v8 there."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        if self.architecture == "arm64":
            return (self.variant or "v8") == (other.variant or "v8")
        return self.variant == other.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    artifact_type: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> Descriptor:
        try:
            digest, size = data["digest"], int(data["size"])
        except (KeyError, TypeError, ValueError):
            raise BuilderError(f"{where}: descriptor without digest/size: {data!r:.200}") from None
        if not dg.is_digest(digest):
            raise BuilderError(f"{where}: unsupported digest {digest!r}", "only sha256 is supported")
        return cls(
            media_type=data.get("mediaType", ""),
            digest=digest,
            size=size,
            platform=Platform.from_json(data.get("platform")),
            annotations=dict(data.get("annotations") or {}),
            artifact_type=data.get("artifactType"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.platform:
            out["platform"] = self.platform.to_json()
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        return out

    @property
    def is_attestation(self) -> bool:
        return (self.platform is not None and self.platform.os == "unknown") or (
            self.annotations.get("vnd.docker.reference.type") == "attestation-manifest"
        )


@dataclass(frozen=True)
class Manifest:
    raw: bytes
    digest: str
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Index:
    raw: bytes
    digest: str
    media_type: str
    manifests: tuple[Descriptor, ...]

    def platforms(self) -> list[Platform]:
        return [m.platform for m in self.manifests if m.platform and not m.is_attestation]

    def select(self, platform: Platform) -> Descriptor | None:
        for m in self.manifests:
            if m.is_attestation or m.platform is None:
                continue
            if m.platform.matches(platform):
                return m
        return None


@dataclass(frozen=True)
class ImageConfig:
    raw: bytes
    os: str
    architecture: str
    variant: str | None
    diff_ids: tuple[str, ...]

    @property
    def platform(self) -> Platform:
        return Platform(self.os, self.architecture, self.variant)


_HOSTILE = "a manifest, index or image config is far smaller and flatter: the source is broken or hostile"


def _too_deep(data: Any, limit: int) -> bool:
    """Whether ``data`` nests more than ``limit`` arrays/objects, walked without recursion."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def load_json_object(raw: bytes, where: str, limit: int = MAX_DOCUMENT) -> dict[str, Any]:
    if len(raw) > limit:
        raise BuilderError(f"{where}: a JSON document of {len(raw)} bytes, more than the "
                           f"{limit}-byte limit; refusing it", _HOSTILE)
    try:
        data = json.loads(raw)
    except RecursionError:
        # json's C scanner guards its recursion; what it refuses is far past MAX_DEPTH anyway.
        data = None
        too_deep = True
    except ValueError as exc:
        raise BuilderError(f"{where}: not valid JSON: {str(exc)[:200]}") from None
    else:
        too_deep = _too_deep(data, MAX_DEPTH)
    if too_deep:
        raise BuilderError(f"{where}: JSON nested more than {MAX_DEPTH} levels deep; refusing it",
                           _HOSTILE)
    if not isinstance(data, dict):
        raise BuilderError(f"{where}: expected a JSON object")
    return data


def media_type_of(raw: bytes, fallback: str | None = None, where: str = "manifest") -> str:
    """The document's own mediaType, else the one the server declared, else guessed from shape."""
    return _type_of(load_json_object(raw, where), fallback)


def _type_of(data: dict[str, Any], fallback: str | None) -> str:
    if data.get("mediaType"):
        return data["mediaType"]
    if fallback and fallback in INDEX_TYPES + MANIFEST_TYPES:
        return fallback
    return OCI_INDEX if "manifests" in data else OCI_MANIFEST


def parse_document(raw: bytes, where: str, fallback_type: str | None = None) -> Manifest | Index:
    data = load_json_object(raw, where)  # once: the size and depth checks walk the whole document
    media_type = _type_of(data, fallback_type)
    digest = dg.of_bytes(raw)
    if media_type in INDEX_TYPES:
        return Index(raw, digest, media_type,
                     tuple(Descriptor.from_json(m, where) for m in data.get("manifests") or []))
    if media_type in MANIFEST_TYPES:
        if "config" not in data:
            raise BuilderError(f"{where}: manifest has no config")
        return Manifest(
            raw, digest, media_type,
            Descriptor.from_json(data["config"], where),
            tuple(Descriptor.from_json(layer, where) for layer in data.get("layers") or []),
            dict(data.get("annotations") or {}),
        )
    raise BuilderError(f"{where}: unsupported media type {media_type!r}",
                       "only OCI and Docker schema 2 images are supported (not schema 1)")


def parse_config(raw: bytes, where: str) -> ImageConfig:
    data = load_json_object(raw, where)
    rootfs = data.get("rootfs") or {}
    return ImageConfig(raw, data.get("os", ""), data.get("architecture", ""),
                       data.get("variant") or None, tuple(rootfs.get("diff_ids") or []))


def canonical_json(data: Any) -> bytes:
    """The one serialisation used for documents built here (sorted keys, no spaces)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
