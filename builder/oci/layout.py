"""OCI image layouts: the plan shared with archives, and a layout *directory* writer.

A plan turns (name, manifest digest, platform) triples into what any layout needs: the
``index.json`` entries (named with both ``io.containerd.image.name`` and
``org.opencontainers.image.ref.name``, the way ``docker save`` does and containerd's import
reads) and the ordered, de-duplicated list of blobs. Building the plan checks, before anything is
written, that every blob is in the store and that each image's config is for the platform it is
packed for: an amd64 image in an arm64 archive is an error naming the image.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builder import digest as dg
from builder.errors import BuilderError
from builder.oci import model as m
from builder.oci import reference
from builder.oci.image import load_image
from builder.store import Store

OCI_LAYOUT = m.canonical_json({"imageLayoutVersion": "1.0.0"})


@dataclass(frozen=True)
class ArchiveImage:
    name: str  # full reference "docker.io/rancher/x:tag"
    manifest_digest: str
    platform: m.Platform
    # Carried beside the image: more blobs (e.g. its cosign signature, builder/oci/cosign.py), in no
    # image's tree, and the index.json annotations that say what they are.
    extras: tuple[str, ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int


@dataclass(frozen=True)
class PlannedImage:
    image: ArchiveImage
    ref: reference.Reference
    manifest: m.Manifest
    config: m.ImageConfig


@dataclass
class LayoutPlan:
    images: list[PlannedImage] = field(default_factory=list)
    blobs: list[Blob] = field(default_factory=list)  # first-use order, each digest once

    def index_json(self) -> bytes:
        entries = []
        for p in self.images:
            entries.append(m.Descriptor(
                p.manifest.media_type, p.manifest.digest, len(p.manifest.raw),
                platform=p.config.platform,
                annotations={**dict(p.image.annotations),
                             m.ANNOTATION_CONTAINERD_NAME: str(p.ref),
                             m.ANNOTATION_REF_NAME: p.ref.tag or ""},
            ).to_json())
        return m.canonical_json({"schemaVersion": 2, "mediaType": m.OCI_INDEX,
                                 "manifests": entries})


def _parse_name(name: str) -> reference.Reference:
    try:
        ref = reference.parse(name)
    except ValueError as exc:
        raise BuilderError(f"archive: bad image name {name!r}: {exc}") from None
    # Exactly the normalised form: the name is written verbatim into index.json/manifest.json,
    # and an implicit ":latest" or host would make two spellings of one image differ.
    if ref.digest or str(ref) != name:
        raise BuilderError(f"archive: image name {name!r} must be a full tagged reference "
                           "without a digest", f"write it as {ref.with_tag(ref.tag or 'latest')}")
    return ref


def plan_layout(store: Store, images: Sequence[ArchiveImage]) -> LayoutPlan:
    """Check every image against the store and its platform; list the blobs to write."""
    plan = LayoutPlan()
    seen_names: dict[str, str] = {}
    seen_blobs: set[str] = set()
    for image in images:
        ref = _parse_name(image.name)
        if str(ref) in seen_names:
            if seen_names[str(ref)] == image.manifest_digest:
                continue  # the same image listed twice: pack it once
            raise BuilderError(f"archive: {ref} is listed twice with different manifests "
                               f"({seen_names[str(ref)]} and {image.manifest_digest})",
                               "one name can point at one image per archive")
        seen_names[str(ref)] = image.manifest_digest
        if not dg.is_digest(image.manifest_digest):
            raise BuilderError(f"archive: {image.name}: not a sha256 digest: "
                               f"{image.manifest_digest!r}")
        manifest, config = load_image(store, image.manifest_digest)
        if not config.platform.matches(image.platform):
            raise BuilderError(
                f"archive: {image.name} ({image.manifest_digest}) is built for "
                f"{config.platform}, not {image.platform}",
                "the lock resolved the wrong platform for this arch; re-resolve the image")
        descs = [m.Descriptor(manifest.media_type, manifest.digest, len(manifest.raw)),
                 manifest.config, *manifest.layers]
        for desc in descs:
            if desc.digest in seen_blobs:
                continue
            if not store.has(desc.digest):
                raise BuilderError(f"archive: {image.name}: blob {desc.digest} is not in the store",
                                   "run `python -m builder fetch` first")
            size = store.size(desc.digest)
            if size != desc.size:
                raise BuilderError(f"archive: {image.name}: blob {desc.digest} has {size} bytes, "
                                   f"the manifest says {desc.size}")
            seen_blobs.add(desc.digest)
            plan.blobs.append(Blob(desc.digest, desc.size))
        for digest in image.extras:
            if digest in seen_blobs:
                continue
            if not store.has(digest):
                raise BuilderError(f"archive: {image.name}: blob {digest} (carried with it) is not "
                                   "in the store", "run `python -m builder fetch` first")
            seen_blobs.add(digest)
            plan.blobs.append(Blob(digest, store.size(digest)))
        plan.images.append(PlannedImage(image, ref, manifest, config))
    return plan


def blob_member(digest: str) -> str:
    return f"blobs/sha256/{dg.hex_of(digest)}"


def write_layout(store: Store, images: Sequence[ArchiveImage], out_dir: Path,
                 link: bool = False) -> LayoutPlan:
    """Write an OCI layout directory (for Trivy, umoci, ``skopeo oci:``), replacing ``out_dir``.

    Built in a sibling temp directory and renamed into place, so a reader never sees half a
    layout. ``link=True`` hard-links blobs from the store (same filesystem only); the default
    copies, so a tool that rewrites the layout can never touch the store's verified blobs.
    """
    plan = plan_layout(store, images)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        blobs = tmp / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        for blob in plan.blobs:
            dest = blobs / dg.hex_of(blob.digest)
            if link:
                os.link(store.blob_path(blob.digest), dest)
            else:
                shutil.copyfile(store.blob_path(blob.digest), dest)
        (tmp / "oci-layout").write_bytes(OCI_LAYOUT)
        (tmp / "index.json").write_bytes(plan.index_json())
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}-{secrets.token_hex(4)}.old")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return plan
