"""The build stage: from the lock and the store to every artifact of the chosen arches.

Nothing is fetched here. Every arch is checked completely (pins resolved, inputs in the store,
platforms right) before anything is written for it; outputs are staged in a work directory beside
the artifacts directory, and renamed into place only when every arch is packed, every store blob
in it re-hashed on the way: an interrupted build, or one that finds a blob changed in the store,
leaves the artifacts directory as it was.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from builder.assemble import bundle, images, provenance, runtime
from builder.assemble.state import BuildState
from builder.errors import BuilderError
from builder.fetch.signatures import check_lock
from builder.humanize import human
from builder.lock.lockfile import Lock
from builder.progress import Meter, Reporter
from builder.store import Store
from builder.trust import checksums


@dataclass
class ArchResult:
    arch: str
    runtime: runtime.RuntimeImage
    files: list[Path] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)
    info: bundle.ReleaseInfo | None = None


@dataclass
class BuildReport:
    out: Path
    epoch: int
    arches: list[ArchResult] = field(default_factory=list)
    runtime_index: str | None = None
    seconds: float = 0.0
    shards: list[Path] = field(default_factory=list)  # shard-ARCH.json, with --shard

    def summary(self) -> str:
        lines = [f"built {', '.join(a.arch for a in self.arches)} into {self.out} "
                 f"in {self.seconds:.1f}s (SOURCE_DATE_EPOCH={self.epoch})"]
        for a in self.arches:
            lines.append(f"  {a.arch}: {len(a.files)} artifacts, {len(a.rebuilt)} rebuilt; "
                         f"runtime {a.runtime.ref}@{a.runtime.manifest.digest}")
            lines.extend(f"    absent from the runtime image: {x}" for x in a.runtime.absent)
        if self.runtime_index:
            lines.append(f"  runtime index (all arches): {self.runtime_index}")
        lines.extend(f"  shard manifest: {p}" for p in self.shards)
        return "\n".join(lines)


def source_date_epoch(lock: Lock, env: Mapping[str, str] | None = None) -> int:
    """SOURCE_DATE_EPOCH, else the commit time of the lock, else an error with a hint."""
    env = os.environ if env is None else env
    value = env.get("SOURCE_DATE_EPOCH")
    if value:
        if not value.isdigit():
            raise BuilderError(f"SOURCE_DATE_EPOCH must be integer seconds, got {value!r}")
        return int(value)
    if lock.path is not None:
        try:
            res = subprocess.run(["git", "log", "-1", "--format=%ct", "--", lock.path.name],
                                 cwd=lock.path.resolve().parent, capture_output=True, text=True, timeout=10)
            if res.returncode == 0 and res.stdout.strip().isdigit():
                return int(res.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    raise BuilderError("no SOURCE_DATE_EPOCH and the lock is not committed to git",
                       "commit images.lock or set SOURCE_DATE_EPOCH (integer seconds) for a reproducible build")


def _work_dir(out: Path) -> Path:
    """Staging beside (not inside) the artifacts directory, on the same filesystem."""
    work = out.resolve().parent / f".{out.resolve().name}.work"
    shutil.rmtree(work, ignore_errors=True)  # leftovers of an interrupted build
    work.mkdir(parents=True)
    return work


def _write_archive(store: Store, p: images.ArchivePlan, out: Path, work: Path, epoch: int,
                   state: BuildState, same: images.ArchivePlan | None,
                   reporter: Reporter) -> tuple[list[Path], bool]:
    """One archive, with a bar of bytes packed of the total on a terminal, a line when done."""
    started = time.monotonic()
    total = images.tar_bytes(store, p, epoch) if reporter.bars else None
    with reporter.bar(p.base, total) as update:
        files, rebuilt = images.write(store, p, out, work, epoch, state, same, Meter(update, total))
    if rebuilt:
        sizes = ", ".join(f"{f.name.removeprefix(p.base)} "
                          f"{human(state.current(f.name, work, out).stat().st_size)}"
                          for f in files[:2])  # .tar.zst, .tar.gz
        reporter.line(f"packed {p.base} ({len(p.images)} images): {sizes} in "
                      f"{time.monotonic() - started:.1f}s")
    return files, rebuilt


def _write_sums_and_provenance(lock: Lock, arch: str, arches: tuple[str, ...], epoch: int,
                               out: Path, result: ArchResult, known: dict[str, str],
                               scanner: dict[str, str] | None) -> None:
    """The arch's provenance statement (subjects: every other artifact), then its checksum file
    listing the statement too; each artifact is hashed once (store digests taken as known)."""
    entries = checksums.entries_for(result.files, known)
    path, hex_value = provenance.write_statement(out, lock, arch, arches, epoch, entries, scanner)
    result.files.append(path)
    checksums.write_for_arch(out, arch, result.files,
                             {**{e.name: e.hex for e in entries}, path.name: hex_value})


def build(lock: Lock, arches: tuple[str, ...], store: Store, out: Path, reporter: Reporter,
          epoch: int | None = None, shard: bool = False,
          scanner: dict[str, str] | None = None) -> BuildReport:
    """Build ``arches`` into ``out``. ``shard``: these arches are part of a release of every arch
    of the lock, built elsewhere and merged (builder/publish/merge.py): the provenance names the lock's
    arches (as `build --cross` would) and each arch gets its shard manifest. ``scanner``: the
    identity of the scanner this release's scan is to use, recorded in the provenance (the CLI
    passes ``scan.trivy.installed_identity()``; None records none)."""
    from builder.assemble import shard as shards
    started = time.monotonic()
    if lock.runtime is None:
        raise BuilderError(f"{lock.source}: no runtime section", "add `runtime:` (see docs/images-lock.md)")
    lock.require_resolved(arches)
    signatures = check_lock(lock, arches, store)  # the publishers', again, offline
    epoch = source_date_epoch(lock) if epoch is None else epoch
    out.mkdir(parents=True, exist_ok=True)
    work = _work_dir(out)
    state = BuildState.load(out)
    report = BuildReport(out, epoch)
    try:
        # Check every arch completely before writing anything; zstd archives' images converted
        # into the store first (a cache, like the runtime image: nothing reaches the artifacts).
        images.convert(lock, arches, store, reporter)
        planned = []
        for arch in arches:
            rt = runtime.build(lock, arch, store, epoch)
            plans = images.plan(lock, arch, rt, signatures, store=store)
            try:
                images.check(store, plans)
            except BuilderError as exc:
                raise BuilderError(f"{arch}: {exc.message}", exc.hint) from None
            planned.append((arch, rt, plans))
        # Pack everything into the work directory; every store blob is re-hashed on the way.
        for arch, rt, plans in planned:
            result = ArchResult(arch, rt)
            written: dict[tuple, images.ArchivePlan] = {}
            for p in plans:
                same = written.get(p.images)
                files, rebuilt = _write_archive(store, p, out, work, epoch, state, same, reporter)
                written.setdefault(p.images, p)
                result.files.extend(files)
                if rebuilt:
                    result.rebuilt.append(p.base)
            runtime_group = lock.runtime.groups[0]
            info = bundle.ReleaseInfo(
                lock.release.name, lock.release.version, arch, rt,
                images.base_name(lock, arch, runtime_group), images.base_name(lock, arch, None),
                tuple(p.group for p in plans if p.group),
            )
            result.info = info
            path, rebuilt = bundle.write(lock, arch, store, info, out, work, epoch, state)
            result.files.append(path)
            if rebuilt:
                result.rebuilt.append(path.name)
            report.arches.append(result)
        # Only now, with every arch packed and checked, does anything reach the artifacts.
        state.commit()
        release_arches = lock.arches if shard else arches
        for result, (arch, _, plans) in zip(report.arches, planned, strict=True):
            result.files.append(images.write_all_list(lock, arch, plans, out))
            _write_sums_and_provenance(lock, arch, release_arches, epoch, out, result,
                                       state.known_digests(), scanner)
            if shard:
                files = [*result.files, out / checksums.checksum_name(arch)]
                report.shards.append(shards.write(out, lock, arch, epoch, files, result.runtime,
                                                  scanner))
        if len(arches) > 1:
            report.runtime_index = runtime.build_index(store, [a.runtime for a in report.arches]).digest
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.seconds = time.monotonic() - started
    return report
