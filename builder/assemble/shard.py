"""Shard manifests (issue 16): one arch of a release built on its own machine.

``build --arch A --shard`` writes ``shard-A.json`` beside A's artifacts: what the shard was built
from (the lock file's sha256 as provenance computes it, SOURCE_DATE_EPOCH, the builder version and
revision, the scanner identity, the release's arches) and what it holds (every artifact of A with
its sha256 and size, the checksum file included; the runtime image's per-arch manifest
descriptor). Canonical JSON, no wall-clock time: the same lock, epoch and builder give the same
bytes. ``merge`` (builder/publish/merge.py) reads these to prove shards belong to one release.

A shard's provenance statement names the lock's arches as the release's arches (what a single
``build --cross`` names), so the merged tree is byte-identical to a cross build.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder import artifacts
from builder import digest as dg
from builder.assemble import provenance
from builder.assemble.runtime import RuntimeImage
from builder.errors import BuilderError
from builder.lock.lockfile import Lock
from builder.oci import model as m
from builder.store import write_atomic
from builder.trust import checksums

FORMAT = "airgap-builder/shard/v1"
LIMIT = 1 << 20  # a few dozen files per arch: a few KB; anything near this is not ours
# The fields every shard of one release must agree on, with what they mean in an error.
SAME_RELEASE = {
    "lock": "lock file (sha256)",
    "SOURCE_DATE_EPOCH": "SOURCE_DATE_EPOCH",
    "builderVersion": "builder version",
    "sourceRevision": "builder source revision",
    "scanner": "scanner identity",
    "release": "release name and version",
    "arches": "release arches",
}


class ShardError(BuilderError):
    """A shard manifest cannot be written, read or trusted."""


manifest_name = artifacts.shard_manifest_name


def is_manifest_name(name: str) -> bool:
    return bool(artifacts.SHARD_PATTERN.fullmatch(name))


@dataclass(frozen=True)
class FileEntry:
    sha256: str  # bare hex, as in the checksum file
    size: int


@dataclass(frozen=True)
class Shard:
    """A shard manifest as read back from ``directory``."""

    directory: Path
    path: Path
    arch: str
    release_key: dict[str, Any]  # the SAME_RELEASE fields
    files: dict[str, FileEntry]
    runtime_ref: str
    runtime_manifest: m.Descriptor


def document(lock: Lock, arch: str, epoch: int, files: Mapping[str, FileEntry],
             runtime: RuntimeImage, scanner: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "arch": arch,
        "lock": provenance.lock_digests(lock)["sha256"],
        "SOURCE_DATE_EPOCH": epoch,
        "builderVersion": provenance.builder_version(),
        "sourceRevision": provenance.source_revision(),
        "scanner": dict(scanner) if scanner else None,
        "release": {"name": lock.release.name, "version": lock.release.version},
        "arches": list(lock.arches),
        "files": {n: {"sha256": e.sha256, "size": e.size} for n, e in sorted(files.items())},
        "runtime": {"ref": runtime.ref, "manifest": runtime.manifest.to_json()},
    }


def write(out: Path, lock: Lock, arch: str, epoch: int, files: Sequence[Path],
          runtime: RuntimeImage, scanner: Mapping[str, Any] | None) -> Path:
    """``out/shard-ARCH.json`` over ``files`` (the arch's artifacts, its checksum file among them).

    Digests come from the checksum file build just wrote (nothing is hashed twice); the checksum
    file itself is hashed here (a few KB)."""
    sums = out / checksums.checksum_name(arch)
    listed = {e.name: e.hex for e in checksums.parse_file(sums)}
    listed[sums.name] = dg.hex_of(dg.of_file(sums)[0])
    entries = {}
    for f in files:
        if f.name not in listed:
            raise ShardError(f"{arch}: {f.name} is not in {sums.name}",
                             "a builder bug: every artifact is listed in its checksum file")
        entries[f.name] = FileEntry(listed[f.name], f.stat().st_size)
    path = out / manifest_name(arch)
    write_atomic(path, m.canonical_json(document(lock, arch, epoch, entries, runtime, scanner)))
    return path


# -- reading ---------------------------------------------------------------------------------------

def _need(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ShardError(f"{where}: field {key!r} is missing or not a {getattr(kind, '__name__', kind)}"
                         f" (got {type(value).__name__})",
                         "rebuild the shard with `python -m builder build --arch ARCH --shard`")
    return value


def _files(raw: Any, where: str) -> dict[str, FileEntry]:
    out = {}
    for name, entry in raw.items():
        if not (isinstance(name, str) and checksums._NAME.fullmatch(name) and name not in (".", "..")):
            raise ShardError(f"{where}: file name {name!r} is not a plain base name")
        if not (isinstance(entry, dict) and dg.is_hex64(entry.get("sha256"))
                and isinstance(entry.get("size"), int) and not isinstance(entry.get("size"), bool)
                and entry["size"] >= 0):
            raise ShardError(f"{where}: files[{name!r}] is not {{sha256: 64 hex, size: bytes}}")
        out[name] = FileEntry(entry["sha256"], entry["size"])
    return out


def read(path: Path) -> Shard:
    """A shard manifest, every field checked for shape (nothing in it is trusted yet)."""
    where = str(path)
    raw = checksums.read_regular(path, LIMIT, "shard manifest")
    try:
        doc = m.load_json_object(raw, where)
    except BuilderError as exc:
        raise ShardError(exc.message, exc.hint) from None
    if doc.get("format") != FORMAT:
        raise ShardError(f"{where}: format is {doc.get('format')!r}, expected {FORMAT!r}",
                         "a shard manifest written by another builder version: rebuild the shard")
    arch = _need(doc, "arch", str, where)
    if path.name != manifest_name(arch):
        raise ShardError(f"{where}: names arch {arch!r}, but the file is {path.name}",
                         f"the manifest of {arch} is {manifest_name(arch)}; do not rename shard files")
    _need(doc, "lock", str, where)
    _need(doc, "SOURCE_DATE_EPOCH", int, where)
    _need(doc, "builderVersion", str, where)
    _need(doc, "release", dict, where)
    arches = _need(doc, "arches", list, where)
    if arch not in arches:
        raise ShardError(f"{where}: arch {arch} is not among the release arches {arches}")
    files = _files(_need(doc, "files", dict, where), where)
    runtime = _need(doc, "runtime", dict, where)
    try:
        desc = m.Descriptor.from_json(runtime.get("manifest"), f"{where}: runtime.manifest")
    except (BuilderError, AttributeError, TypeError) as exc:
        raise ShardError(f"{where}: runtime.manifest is not an OCI descriptor ({exc})") from None
    return Shard(path.parent, path, arch, {k: doc.get(k) for k in SAME_RELEASE}, files,
                 str(runtime.get("ref")), desc)


def find(directory: Path) -> list[Shard]:
    """Every shard manifest in ``directory`` (one per arch built there); at least one."""
    if not directory.is_dir():
        raise ShardError(f"{directory}: not a directory",
                         "give the directories `build --arch ARCH --shard` wrote")
    found = sorted(p for p in directory.iterdir() if is_manifest_name(p.name))
    if not found:
        raise ShardError(f"{directory}: no shard manifest (shard-ARCH.json)",
                         "build the shard with `python -m builder build --arch ARCH --shard`")
    return [read(p) for p in found]
