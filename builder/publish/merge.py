"""``merge SHARD_DIR... --out DIR``: per-arch shards built on separate machines into one release.

Every shard must come from the same release (lock file sha256, SOURCE_DATE_EPOCH, builder version
and revision, scanner identity, release name/version and arches — the fields that reach the
artifacts' bytes), each arch exactly once and every arch of the release present, every file in a
shard directory listed by its manifest (only the builder's own ``.build-state.json`` bookkeeping
is ignored), and every file's sha256 and size equal to its manifest's, re-hashed here by streaming
whatever the manifest says. The arch's checksum file must agree with the manifest too.

Files are hard-linked into a staging directory beside ``--out`` when the shards are on the same
filesystem (a merged release of several GB must not need twice the disk on a CI runner), copied
otherwise, and hashed as staged: what is checked is what is published. Only when everything
checks out is the staging directory renamed to ``--out``; a refusal leaves nothing behind.

What a single ``build --cross`` makes beyond its per-arch files is the runtime image's multi-arch
index, which it stores in the content store (not the artifacts directory) and reports; merge makes
the same index document from the shards' per-arch manifest descriptors and reports its digest.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from builder import digest as dg
from builder.assemble.shard import SAME_RELEASE, Shard, ShardError, find
from builder.assemble.state import STATE_FILE
from builder.oci.image import index_document
from builder.progress import Reporter
from builder.store import fsync_dir
from builder.trust import checksums

REBUILD = ("rebuild every shard from the same commit (images.lock and builder) with the same "
           "SOURCE_DATE_EPOCH: `python -m builder build --arch ARCH --shard`")


@dataclass
class MergeReport:
    out: Path
    arches: tuple[str, ...] = ()
    files: int = 0
    bytes: int = 0
    linked: int = 0  # hard-linked rather than copied
    runtime_index: str | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"merged {', '.join(self.arches)} into {self.out}: {self.files} files, "
                 f"{self.bytes} bytes, every sha256 re-checked ({self.linked} hard-linked) "
                 f"in {self.seconds:.1f}s"]
        if self.runtime_index:
            lines.append(f"  runtime index (all arches): {self.runtime_index}")
        return "\n".join(lines)


def _label(s: Shard) -> str:
    return f"{s.path.name} in {s.directory}"


def check_same_release(shards: Sequence[Shard]) -> tuple[str, ...]:
    """The release's arches, once every shard agrees on what it was built from and each arch is
    given exactly once; a clear refusal otherwise."""
    first = shards[0]
    seen: dict[str, Shard] = {}
    for s in shards:
        if s.arch in seen:
            raise ShardError(f"arch {s.arch} given twice: {_label(seen[s.arch])} and {_label(s)}",
                             "give each arch's shard directory once")
        seen[s.arch] = s
        for key, what in SAME_RELEASE.items():
            if s.release_key[key] != first.release_key[key]:
                raise ShardError(
                    f"{_label(s)} was built with a different {what} than {_label(first)}: "
                    f"{s.release_key[key]!r}, expected {first.release_key[key]!r}", REBUILD)
    arches = tuple(first.release_key["arches"])
    missing = [a for a in arches if a not in seen]
    if missing:
        raise ShardError(f"no shard for {', '.join(missing)} (the release's arches: "
                         f"{', '.join(arches)})",
                         "build the missing arch with `python -m builder build --arch ARCH --shard` "
                         "and give its directory too")
    return arches


def _plan(shards: Sequence[Shard]) -> dict[str, tuple[Shard, Path]]:
    """Merged name → (its shard, its source path); refuses unlisted files and name clashes."""
    by_dir: dict[Path, list[Shard]] = {}
    for s in shards:
        by_dir.setdefault(s.directory.resolve(), []).append(s)
    plan: dict[str, tuple[Shard, Path]] = {}
    for directory, group in by_dir.items():
        listed = {n: s for s in group for n in s.files}
        manifests = {s.path.name for s in group}
        for entry in sorted(directory.iterdir()):
            if entry.name in manifests or entry.name == STATE_FILE:
                continue
            if entry.name not in listed:
                raise ShardError(f"{entry}: not listed in the shard manifest of {directory} "
                                 f"({', '.join(sorted(manifests))})",
                                 "a shard directory holds exactly what `build --arch ARCH --shard` "
                                 "wrote: build each shard into its own new --artifacts directory")
        for name, s in listed.items():
            if name in plan:
                raise ShardError(f"{name} is in two shards: {_label(plan[name][0])} and {_label(s)}",
                                 REBUILD)
            plan[name] = (s, directory / name)
    return plan


def _stage(src: Path, dst: Path) -> tuple[str, int, bool]:
    """Link (else copy) ``src`` to ``dst``; the staged bytes' (digest, size, linked)."""
    st = os.lstat(src)
    if not stat.S_ISREG(st.st_mode):
        raise ShardError(f"{src}: not a regular file", "shard files are plain files, no links")
    try:
        os.link(src, dst, follow_symlinks=False)
        linked = True
    except OSError:  # another filesystem (EXDEV), or links not allowed: copy instead
        with open(src, "rb") as fin, open(dst, "xb") as fout:
            shutil.copyfileobj(fin, fout, dg.CHUNK)
            fout.flush()
            os.fsync(fout.fileno())
        linked = False
    digest, size = dg.of_file(dst)
    return digest, size, linked


def _check_sums_file(s: Shard, staged: Path) -> None:
    """The arch's checksum file must list exactly the manifest's other files, same digests."""
    sums = checksums.checksum_name(s.arch)
    if sums not in s.files:
        raise ShardError(f"{_label(s)}: does not list {sums}", REBUILD)
    listed = {e.name: e.hex for e in checksums.parse_file(staged / sums)}
    manifest = {n: e.sha256 for n, e in s.files.items() if n != sums}
    if listed != manifest:
        diff = sorted(set(listed.items()) ^ set(manifest.items()))
        raise ShardError(f"{_label(s)}: {sums} and the manifest disagree on "
                         f"{', '.join(sorted({n for n, _ in diff}))}", REBUILD)


def runtime_index(shards: Sequence[Shard], arches: Sequence[str]) -> str:
    """The digest of the runtime image's index over the arches, in the release's arch order:
    the document builder.oci.image.build_index stores for `build --cross`."""
    by_arch = {s.arch: s for s in shards}
    return dg.of_bytes(index_document([by_arch[a].runtime_manifest for a in arches]))


def _prepare_out(out: Path) -> Path:
    """The staging directory beside ``out``; ``out`` must not exist or be empty."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ShardError(f"{out}: exists and is not an empty directory",
                         "merge into a new directory (or remove this one first)")
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    staging = out.resolve().parent / f".{out.resolve().name}.merge"
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted merge
    staging.mkdir()
    return staging


def merge(dirs: Sequence[Path], out: Path, reporter: Reporter) -> MergeReport:
    started = time.monotonic()
    shards = [s for d in dirs for s in find(d)]
    arches = check_same_release(shards)
    plan = _plan(shards)
    staging = _prepare_out(out)
    report = MergeReport(out, arches)
    try:
        for name, (s, src) in sorted(plan.items()):
            digest, size, linked = _stage(src, staging / name)
            want = s.files[name]
            if (dg.hex_of(digest), size) != (want.sha256, want.size):
                raise ShardError(f"{src}: sha256 {dg.hex_of(digest)} ({size} bytes), but "
                                 f"{s.path.name} says {want.sha256} ({want.size} bytes)",
                                 "the shard changed after its build or in transfer: download it "
                                 "again, or rebuild it with `build --arch ARCH --shard`")
            report.files += 1
            report.bytes += size
            report.linked += linked
        for s in shards:
            _check_sums_file(s, staging)
            reporter.line(f"shard {s.arch}: {len(s.files)} files checked ({s.directory})")
        if len(arches) > 1:
            report.runtime_index = runtime_index(shards, arches)
        fsync_dir(staging)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(staging, out)
        fsync_dir(out.resolve().parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report.seconds = time.monotonic() - started
    return report
