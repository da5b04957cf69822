"""Image archives: one uncompressed tar that is both an OCI layout and a docker-archive.

Member order (metadata first, so one image can be found without reading the whole archive)::

    oci-layout, index.json, manifest.json, repositories, blobs/, blobs/sha256/, blobs/sha256/<hex>...

``index.json`` keeps the registry manifests (containerd keeps registry digests only when it
imports the OCI layout); ``manifest.json``/``repositories`` point into the same ``blobs/`` for
docker-archive readers (podman, skopeo docker-archive:, the rke2 runtime-image lookup). Every blob
is stored once however many images share it, streamed from the store with its digest re-checked,
headers are normalised (0/0, no names, one mtime), and the file appears under its final name only
when complete (temp + fsync + rename).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from builder import digest as dg
from builder.errors import BuilderError, DigestMismatch
from builder.oci import model as m
from builder.oci.compress import Output, atomic_output, open_maybe_compressed
from builder.oci.layout import OCI_LAYOUT, ArchiveImage, LayoutPlan, blob_member, plan_layout
from builder.store import Store

__all__ = ["ArchiveImage", "ArchivedImage", "read_archive_index", "write_archive"]

FILE_MODE = 0o644
DIR_MODE = 0o755
COPY_BUF = 1 << 20
METADATA_LIMIT = 16 << 20  # index.json / manifest.json bigger than this is not ours to trust
KEEP_LIMIT = 4 << 20  # JSON blobs up to this size are kept while streaming, to check references


@dataclass(frozen=True)
class ArchivedImage:
    name: str
    manifest_digest: str
    platform: m.Platform | None


# -- writing --------------------------------------------------------------------------------------
def docker_manifest_json(plan: LayoutPlan) -> bytes:
    entries = [{
        "Config": blob_member(p.manifest.config.digest),
        "RepoTags": [str(p.ref)],
        "Layers": [blob_member(layer.digest) for layer in p.manifest.layers],
    } for p in plan.images]
    return json.dumps(entries, separators=(",", ":")).encode()


def repositories_json(plan: LayoutPlan) -> bytes:
    # Legacy docker field: repository → tag → top layer id. Our layers have no v1 ids, so the
    # top layer's blob hex (a real file in blobs/) stands in; readers only use it to list tags.
    repos: dict[str, dict[str, str]] = {}
    for p in plan.images:
        if p.manifest.layers:
            top = dg.hex_of(p.manifest.layers[-1].digest)
            repos.setdefault(p.ref.name, {})[p.ref.tag or ""] = top
    return m.canonical_json(repos)


class _VerifyingReader:
    """Reads a store blob for tarfile while hashing it, so a corrupt store blob is caught."""

    def __init__(self, fh: BinaryIO):
        self.fh = fh
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.hash.update(data)
        return data


def _info(name: str, mtime: int, size: int = 0, is_dir: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = int(mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = DIR_MODE if is_dir else FILE_MODE
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.size = size
    return info


def write_archive(store: Store, images: Sequence[ArchiveImage], out_path: Path,
                  mtime: int) -> Output:
    """Write the archive of ``images`` to ``out_path``; returns its sha256 and size.

    Everything is checked before the first byte is written (platforms, blobs present, sizes).
    """
    plan = plan_layout(store, images)
    if not plan.images:
        raise BuilderError(f"archive: no images for {out_path}", "an image list must not be empty")
    metadata = [("oci-layout", OCI_LAYOUT), ("index.json", plan.index_json()),
                ("manifest.json", docker_manifest_json(plan)),
                ("repositories", repositories_json(plan))]
    with atomic_output(out_path) as out:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,  # type: ignore[arg-type]
                          bufsize=COPY_BUF) as tar:
            for name, data in metadata:
                tar.addfile(_info(name, mtime, len(data)), io.BytesIO(data))
            tar.addfile(_info("blobs", mtime, is_dir=True))
            tar.addfile(_info("blobs/sha256", mtime, is_dir=True))
            for blob in plan.blobs:
                with store.open(blob.digest) as fh:
                    reader = _VerifyingReader(fh)
                    tar.addfile(_info(blob_member(blob.digest), mtime, blob.size), reader)  # type: ignore[arg-type]
                actual = "sha256:" + reader.hash.hexdigest()
                if actual != blob.digest:
                    raise DigestMismatch(f"store blob {blob.digest} (packing {out_path.name})",
                                         blob.digest, actual,
                                         "the store was modified on disk; run `verify --deep`")
    return Output(Path(out_path), out.digest, out.size)


# -- reading --------------------------------------------------------------------------------------
def _safe_member(name: str, path: Path) -> str:
    clean = posixpath.normpath(name)
    if name.startswith("/") or clean == ".." or clean.startswith("../"):
        raise BuilderError(f"{path}: archive member {name!r} leaves the archive root",
                           "the archive is corrupt or hostile; do not use it")
    return clean.removeprefix("./")


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise BuilderError(f"{what}: not valid JSON: {exc}") from None


def _read_all(fh: BinaryIO, limit: int, what: str) -> bytes:
    data = fh.read(limit + 1)
    if len(data) > limit:
        raise BuilderError(f"{what}: larger than {limit} bytes")
    return data


def read_archive_index(path: Path, verify: bool = False) -> list[ArchivedImage]:
    """The images named in an archive's ``index.json`` (plain, .gz or .zst, streamed).

    Without ``verify`` this stops as soon as the metadata at the front was read. With ``verify``
    it reads the whole archive once: every ``blobs/sha256/<hex>`` must hash to its name, and every
    manifest, config and layer that index.json or manifest.json refers to must be present (sizes
    matching the descriptors).
    """
    path = Path(path)
    index: dict[str, Any] | None = None
    docker: list[dict[str, Any]] | None = None
    sizes: dict[str, int] = {}
    kept: dict[str, bytes] = {}
    try:
        with open_maybe_compressed(path) as stream, \
                tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                name = _safe_member(member.name, path)
                if not member.isfile():
                    continue
                if name in ("index.json", "manifest.json"):
                    fh = tar.extractfile(member)
                    assert fh is not None
                    data = _json(_read_all(fh, METADATA_LIMIT, f"{path}: {name}"), f"{path}: {name}")
                    if name == "index.json":
                        index = data
                    else:
                        docker = data
                    if not verify and index is not None and docker is not None:
                        break
                elif name.startswith("blobs/sha256/"):
                    if not verify:
                        if index is not None:
                            break  # past the metadata: everything needed was read
                        continue
                    digest = dg.from_hex(name.rsplit("/", 1)[1])
                    if not dg.is_digest(digest):
                        raise BuilderError(f"{path}: unexpected blob member {name!r}")
                    fh = tar.extractfile(member)
                    assert fh is not None
                    h = hashlib.sha256()
                    head = b""
                    while chunk := fh.read(COPY_BUF):
                        h.update(chunk)
                        if member.size <= KEEP_LIMIT:
                            head += chunk
                    actual = "sha256:" + h.hexdigest()
                    if actual != digest:
                        raise DigestMismatch(f"{path}: {name}", digest, actual,
                                             "the archive is corrupt; rebuild or re-download it")
                    sizes[digest] = member.size
                    if head.startswith(b"{"):
                        kept[digest] = head
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BuilderError(f"{path}: not a readable image archive: {exc}",
                           "it may be truncated or corrupt; rebuild or re-download it") from None
    except Exception as exc:  # zstandard raises its own error type for corrupt frames
        if type(exc).__module__.startswith("zstandard"):
            raise BuilderError(f"{path}: corrupt zstd stream: {exc}") from None
        raise
    if index is None:
        raise BuilderError(f"{path}: has no index.json", "it is not an OCI image archive")
    images = []
    for raw in index.get("manifests") or []:
        desc = m.Descriptor.from_json(raw, f"{path}: index.json")
        name = desc.annotations.get(m.ANNOTATION_CONTAINERD_NAME) or \
            desc.annotations.get(m.ANNOTATION_REF_NAME, "")
        images.append(ArchivedImage(name, desc.digest, desc.platform))
        if verify:
            _check_tree(path, desc, sizes, kept)
    if verify and docker is not None:
        for entry in docker:
            for member in [entry.get("Config", ""), *(entry.get("Layers") or [])]:
                hex_part = member.rsplit("/", 1)[-1]
                if not member.startswith("blobs/sha256/") or dg.from_hex(hex_part) not in sizes:
                    raise BuilderError(f"{path}: manifest.json refers to missing member {member!r}")
    return images


def _check_tree(path: Path, desc: m.Descriptor, sizes: dict[str, int],
                kept: dict[str, bytes]) -> None:
    """Every blob reachable from an index entry is present with the size its descriptor says."""
    def present(d: m.Descriptor) -> None:
        if sizes.get(d.digest) != d.size:
            got = sizes.get(d.digest)
            raise BuilderError(f"{path}: blob {d.digest} is "
                               + ("missing" if got is None else f"{got} bytes, expected {d.size}"))

    present(desc)
    raw = kept.get(desc.digest)
    if raw is None:
        raise BuilderError(f"{path}: manifest {desc.digest} could not be read")
    doc = m.parse_document(raw, f"{path}: {desc.digest}")
    if isinstance(doc, m.Index):
        for child in doc.manifests:
            _check_tree(path, child, sizes, kept)
        return
    for d in (doc.config, *doc.layers):
        present(d)
