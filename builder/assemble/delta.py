"""``build --since PREV``: the delta directory that turns PREV (the release a site installed) into
the release just built, carrying only the compressed frames PREV does not already hold.

Every image archive is framed (builder/oci/framed.py: one compressed frame per tar segment, the
same blob giving the same frame bytes in any archive), so a new archive FILE is a sequence of
frames, each either copied from PREV's FILE (a layer frame PREV's FILE has with the same
compressed sha256) or carried in FILE's delta archive (head, tail, manifests, configs, indexes,
carried signatures, and every layer PREV lacks). The description (builder.trust.delta) says which
piece comes from where; ``verify DIR --base PREV`` and install.sh rebuild FILE from it and check it
against the new release's signed checksum file, so nothing here has to be trusted.

PREV's frames come from the store's memo (``framed.recall`` by the sha256 PREV's checksum file
lists: PREV may hold only its checksum files and lists) or from PREV's archive itself; an archive
without either (absent and unknown, or built before framing) is carried whole, which the summary
says.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from builder import digest as dg
from builder.artifacts import (
    classify,
    delta_archive_name,
    delta_description_name,
    envelope_name,
    signature_name,
    statement_name,
)
from builder.errors import BuilderError
from builder.humanize import human
from builder.oci import compress, framed
from builder.oci import model as m
from builder.oci.archive import parse_document, read_archive_index
from builder.oci.framed import Frame, FrameIndex
from builder.store import Store, atomic_file, fsync_dir
from builder.trust import checksums
from builder.trust import delta as d


@dataclass(frozen=True)
class Planned:
    """One archive's pieces and the frames of the new archive its delta archive carries."""

    pieces: tuple[d.Piece, ...]
    carried: tuple[Frame, ...]


def plan_pieces(new: FrameIndex, base: FrameIndex | None, layers: frozenset[str]) -> Planned:
    """Each frame of ``new`` in order: from ``base`` when it is a layer (``layers``: the digests
    of the layers of the archive's images) that ``base`` holds as the very same compressed bytes
    (label and sha256), else carried in the delta archive, which the carried frames tile."""
    held = base.by_label() if base is not None else {}
    pieces: list[d.Piece] = []
    carried: list[Frame] = []
    at = 0
    for frame in new.frames:
        same = held.get(frame.label)
        hex_value = dg.hex_of(frame.sha256)
        if frame.label in layers and same is not None and same.sha256 == frame.sha256 \
                and same.length == frame.length:
            pieces.append(d.Piece(d.BASE, same.offset, same.length, hex_value, frame.label))
        else:
            pieces.append(d.Piece(d.DELTA, at, frame.length, hex_value, frame.label))
            carried.append(frame)
            at += frame.length
    return Planned(tuple(pieces), tuple(carried))


def layers_of(store: Store, manifests: list[str], where: str) -> frozenset[str]:
    """The layer digests of the images (manifest digests, an index's manifests followed) whose
    manifests the store holds (the build packed them from there)."""
    layers: set[str] = set()
    todo, seen = list(manifests), set()
    while todo:
        digest = todo.pop()
        if digest in seen:
            continue
        seen.add(digest)
        if not store.has(digest):
            raise BuilderError(f"{where}: manifest {digest} is not in the content store",
                               "build --since runs with the store the build used (--store)")
        doc = parse_document(store.read_bytes(digest), f"{where}: {digest}")
        if isinstance(doc, m.Index):
            todo.extend(x.digest for x in doc.manifests)
        else:
            layers.update(x.digest for x in doc.layers)
    return frozenset(layers)


# -- the base (PREV) ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Base:
    """PREV's side of one arch: its checksum file and what it lists."""

    directory: Path
    arch: str
    sums_hex: str
    listed: dict[str, str]  # name -> hex
    version: str


def read_base(directory: Path, arch: str) -> Base:
    """PREV's checksum file for ``arch`` and the version it is of."""
    data, listed = d.read_sums(directory / checksums.checksum_name(arch), f"--since {directory}")
    version = d.release_version(directory, arch, listed)
    if version is None:
        raise BuilderError(f"--since {directory}: cannot tell which release it holds for {arch}: "
                           f"neither {statement_name(arch)} nor the bundle is there as "
                           f"{checksums.checksum_name(arch)} lists it",
                           "keep the base release's provenance statement (or its bundle) beside "
                           "its checksum files")
    return Base(directory, arch, dg.hex_of(dg.of_bytes(data)), listed, version)


def base_frames(base: Base, file: str, store: Store) -> tuple[FrameIndex | None, str | None]:
    """(frames of PREV's ``file``, None) or (None, why it is carried whole)."""
    hex_value = base.listed.get(file)
    if hex_value is None:
        return None, f"{base.directory.name} has no {file}"
    known = framed.recall(store, dg.from_hex(hex_value))
    if known is not None:
        return known, None
    path = base.directory / file
    if not path.is_file():
        return None, (f"{base.directory.name}/{file} is absent and the store does not know its "
                      "frames")
    actual = dg.hex_of(dg.of_file(path)[0])
    if actual != hex_value:
        raise BuilderError(f"{path}: sha256 {actual}, its checksum file says {hex_value}",
                           "the base release directory was changed; copy it again from the release")
    try:
        return framed.scan_and_remember(store, path, dg.from_hex(hex_value)), None
    except BuilderError:
        return None, f"{base.directory.name}/{file} is not a framed archive (built before delta support)"


# -- writing -------------------------------------------------------------------------------------

@dataclass
class ArchiveFigures:
    file: str
    full: int
    delta: int
    whole: str | None = None  # why it is carried whole


@dataclass
class ArchDelta:
    arch: str
    base_version: str
    archives: list[ArchiveFigures] = field(default_factory=list)

    @property
    def full(self) -> int:
        return sum(a.full for a in self.archives)

    @property
    def delta(self) -> int:
        return sum(a.delta for a in self.archives)


@dataclass
class DeltaReport:
    out: Path
    since: Path
    arches: list[ArchDelta] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"delta against {self.since} into {self.out}"]
        for a in self.arches:
            share = f"{100 * a.delta / a.full:.1f}%" if a.full else "-"
            lines.append(f"  {a.arch}: from {a.base_version}: image archives {human(a.full)} full, "
                         f"{human(a.delta)} delta ({share}): " + ", ".join(
                             f"{x.file} {human(x.full)} -> {human(x.delta)}" for x in a.archives))
            lines.extend(f"    {x.file}: carried whole ({x.whole})" for x in a.archives if x.whole)
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"out": str(self.out), "since": str(self.since), "arches": [
            {"arch": a.arch, "base_version": a.base_version, "full_bytes": a.full,
             "delta_bytes": a.delta,
             "archives": [{"file": x.file, "full_bytes": x.full, "delta_bytes": x.delta,
                           "carried_whole": x.whole} for x in a.archives]}
            for a in self.arches]}


def _copy_frames(src: Path, frames: tuple[Frame, ...], dest: Path) -> tuple[str, int]:
    """The concatenation of ``frames`` of ``src`` into ``dest`` (atomic); each frame's bytes are
    checked against its sha256 on the way. (hex, size) of what was written."""
    with open(src, "rb") as fin, compress.atomic_output(dest) as out:
        for frame in frames:
            fin.seek(frame.offset)
            piece, left = compress.HashingWriter(out), frame.length
            while left:
                chunk = fin.read(min(compress.CHUNK, left))
                if not chunk:
                    raise BuilderError(f"{src}: ends inside frame {frame.label} at {frame.offset}")
                piece.write(chunk)
                left -= len(chunk)
            if piece.digest != frame.sha256:
                raise BuilderError(f"{src}: frame {frame.label} at {frame.offset} does not hash to "
                                   "its index's sha256", "rebuild the artifacts directory")
    return dg.hex_of(out.digest), out.size


def _new_frames(path: Path, hex_value: str, store: Store) -> FrameIndex:
    index = framed.frames_of(store, path, dg.from_hex(hex_value))
    if index.size != path.stat().st_size:
        raise BuilderError(f"{path}: its frames end at {index.size}, the file has "
                           f"{path.stat().st_size} bytes", "rebuild the artifacts directory")
    return index


def _delta_archive(new_dir: Path, file: str, hex_value: str, base: Base, store: Store,
                   stage: Path) -> tuple[d.ArchiveDelta, ArchiveFigures]:
    path = new_dir / file
    frames = _new_frames(path, hex_value, store)
    layers = layers_of(store, [i.manifest_digest for i in read_archive_index(path)], file)
    old, whole = base_frames(base, file, store)
    planned = plan_pieces(frames, old, layers)
    delta_hex, delta_size = _copy_frames(path, planned.carried, stage / delta_archive_name(file))
    archive = d.ArchiveDelta(file, hex_value, frames.size,
                             None if old is None else base.listed[file], delta_hex, delta_size,
                             planned.pieces)
    return archive, ArchiveFigures(file, frames.size, delta_size, whole)


def _copy(src: Path, dest: Path) -> None:
    with open(src, "rb") as fin, atomic_file(dest) as out:
        shutil.copyfileobj(fin, out, compress.CHUNK)


def write_arch(new_dir: Path, arch: str, base: Base, store: Store, stage: Path,
               name: str, version: str) -> ArchDelta:
    """One arch's delta into ``stage``: the small files, the delta archives, the description."""
    sums_bytes, listed = d.read_sums(new_dir / checksums.checksum_name(arch), "the delta")
    names = classify(arch, listed)
    archive_files = sorted(f for files in names.archives.values() for f in files)
    result = ArchDelta(arch, base.version)
    described = []
    for file in archive_files:
        archive, figures = _delta_archive(new_dir, file, listed[file], base, store, stage)
        described.append(archive)
        result.archives.append(figures)
    extra = [checksums.checksum_name(arch), signature_name(arch), envelope_name(arch)]
    for file in sorted(set(listed) - set(archive_files)) + extra:
        if file in listed or (new_dir / file).is_file():
            _copy(new_dir / file, stage / file)
    description = d.Description(name, version, arch, base.version, base.sums_hex,
                                dg.hex_of(dg.of_bytes(sums_bytes)), tuple(described))
    with atomic_file(stage / delta_description_name(arch)) as out:
        out.write(description.render())
    return result


def _replace_dir(stage: Path, out: Path) -> None:
    """``stage`` becomes ``out`` (an older ``out`` is removed only once the new one is complete)."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(stage, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def check_since(since: Path, new_dir: Path, out: Path, arches: list[str]) -> None:
    """Before the build: PREV is a release directory with a checksum file for every arch, and
    the delta goes somewhere else than PREV or the artifacts."""
    if not since.is_dir():
        raise BuilderError(f"--since {since}: not a directory",
                           "give the directory of the release the site has installed")
    for arch in arches:
        if not (since / checksums.checksum_name(arch)).is_file():
            raise BuilderError(f"--since {since}: no {checksums.checksum_name(arch)}: it holds no "
                               f"{arch} release to make a delta against",
                               "give the base release's directory (its checksum files, lists and "
                               "normally its archives), or build the other arches with --arch")
    resolved = out.resolve()
    if resolved in (since.resolve(), new_dir.resolve()):
        raise BuilderError(f"--delta-out {out}: is the {'base' if resolved == since.resolve() else 'artifacts'} "
                           "directory", "give the delta its own directory")


def default_out(artifacts: Path) -> Path:
    """``<artifacts>-delta`` beside the artifacts directory."""
    return artifacts.resolve().with_name(artifacts.resolve().name + "-delta")


def write_delta(new_dir: Path, since: Path, out: Path, arches: list[str], store: Store,
                name: str, version: str) -> DeltaReport:
    """The delta of release ``name`` ``version`` (built in ``new_dir``) against ``since`` into
    ``out`` (replaced whole, staged beside it: nothing partial is ever under ``out``)."""
    check_since(since, new_dir, out, arches)
    report = DeltaReport(out, since)
    stage = out.resolve().with_name(f".{out.resolve().name}.work")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        for arch in arches:
            report.arches.append(write_arch(new_dir, arch, read_base(since, arch), store, stage,
                                            name, version))
        _replace_dir(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report
