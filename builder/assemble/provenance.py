"""Writing a build's provenance statement (in-toto Statement v1, SLSA provenance v1) from the lock.

``build`` writes ``provenance.linux-ARCH.json`` per arch: its subjects are every other artifact
the arch's checksum file lists, with their sha256; the build definition names the lock (sha256 of
its bytes and of its canonical content), the parameters and every input with its digest. No
wall-clock time and canonical JSON: the same lock, epoch and builder give the same bytes. Reading,
the DSSE envelope and checking are ``builder.trust.provenance`` (which needs no lock).
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from builder import digest as dg
from builder.artifacts import statement_name
from builder.lock.lockfile import Lock, to_data
from builder.store import write_atomic
from builder.trust import checksums
from builder.trust.provenance import PREDICATE_TYPE, STATEMENT_TYPE, canonical

BUILD_TYPE = "urn:airgap-builder:buildtype:release:v1"
BUILDER_ID = "urn:airgap-builder:builder:python-module"
DIST_NAME = "airgap-builder"


def builder_version() -> str:
    try:
        return metadata.version(DIST_NAME)
    except metadata.PackageNotFoundError:
        from builder import __version__
        return __version__


def source_revision() -> str | None:
    """``git rev-parse HEAD`` of the checkout this builder runs from, or None outside one."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    rev = res.stdout.strip()
    return rev if res.returncode == 0 and len(rev) in (40, 64) else None


def lock_digests(lock: Lock) -> dict[str, str | None]:
    """sha256 of the lock file's bytes (None for a lock not read from a file) and of its content
    in canonical form (the same pins written with other comments or layout hash the same)."""
    file_digest = dg.of_file(lock.path)[0] if lock.path is not None else None
    return {"sha256": file_digest, "contentSha256": dg.of_bytes(canonical(to_data(lock)))}


def _dep(uri: str, digest: str, name: str, **annotations: str) -> dict[str, Any]:
    out: dict[str, Any] = {"uri": uri, "digest": {"sha256": dg.hex_of(digest)}, "name": name}
    if annotations:
        out["annotations"] = annotations
    return out


def resolved_dependencies(lock: Lock, arch: str) -> list[dict[str, Any]]:
    """Every pinned input of the arch: component files, chart files, images (by the platform
    manifest this arch uses, the index digest beside it), sorted by name."""
    deps = []
    for name, comp in lock.components.items():
        art = comp.artifact(arch)
        if art is not None and art.url and art.digest:
            deps.append(_dep(art.url, art.digest, f"components.{name}"))
    for chart in lock.charts.values():
        if not chart.removed and chart.url and chart.sha256:
            deps.append(_dep(chart.url, dg.from_hex(chart.sha256), chart.what))
    for img in lock.images_for(arch):
        manifest = img.platforms.get(arch) or img.digest
        if manifest is None:
            continue  # unresolved: build refuses such a lock before any statement is made
        extra = {"index": img.digest} if img.digest and img.digest != manifest else {}
        if img.daemon:
            extra["daemon"] = img.daemon
        deps.append(_dep(f"oci://{img.ref}@{manifest}", manifest, f"images.{img.ref}", **extra))
    return sorted(deps, key=lambda d: (d["name"], d["uri"]))


def statement(lock: Lock, arch: str, arches: Sequence[str], epoch: int,
              subjects: Mapping[str, str], scanner: Mapping[str, Any] | None = None) -> bytes:
    """The canonical bytes of one arch's statement; ``subjects`` maps a name to its hex sha256."""
    doc = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": n, "digest": {"sha256": h}} for n, h in sorted(subjects.items())],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "lock": lock_digests(lock),
                    "release": {"name": lock.release.name, "version": lock.release.version},
                    "arch": arch,
                    "arches": list(arches),
                    "SOURCE_DATE_EPOCH": epoch,
                },
                "internalParameters": {
                    "builderVersion": builder_version(),
                    "sourceRevision": source_revision(),
                    "scanner": dict(scanner) if scanner else None,
                },
                "resolvedDependencies": resolved_dependencies(lock, arch),
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {DIST_NAME: builder_version()}},
                # No startedOn/finishedOn: a wall-clock time would make every build's bytes new.
                "metadata": {"invocationId": f"{lock.release.name}-{lock.release.version}-"
                                             f"{arch}-{epoch}"},
            },
        },
    }
    return canonical(doc)


def write_statement(out: Path, lock: Lock, arch: str, arches: Sequence[str], epoch: int,
                    entries: Sequence[checksums.Entry],
                    scanner: Mapping[str, Any] | None = None) -> tuple[Path, str]:
    """Write ``out/provenance.linux-ARCH.json`` for the checksum ``entries``; (path, hex)."""
    name = statement_name(arch)
    data = statement(lock, arch, arches, epoch,
                     {e.name: e.hex for e in entries if e.name != name}, scanner)
    path = out / name
    try:
        same = path.read_bytes() == data
    except OSError:
        same = False
    if not same:  # a no-op rebuild leaves the file (and its mtime) as it was
        write_atomic(path, data)
    return path, dg.hex_of(dg.of_bytes(data))
