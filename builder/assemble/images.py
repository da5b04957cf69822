"""Image archives per arch and group: `.tar.zst`, `.tar.gz` and the `.txt` list of references.

- ``NAME-images-GROUP.linux-ARCH.*`` for every group with images for the arch;
- ``NAME-images.linux-ARCH.*``, the legacy all-in-one (the release's default groups);
- ``NAME-images-all.linux-ARCH.txt``, the sorted union of every list.
One tar (OCI layout + docker manifest.json) streams once into both compressors (no `.tar` on disk);
an archive whose recipe (images, digests, epoch, compression parameters) is unchanged is not rebuilt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from builder import artifacts
from builder.assemble.runtime import RuntimeImage
from builder.assemble.state import BuildState
from builder.lock.lockfile import Lock
from builder.oci import compress, cosign
from builder.oci import model as m
from builder.oci.archive import archive_size, stream_archive
from builder.oci.layout import ArchiveImage, plan_layout
from builder.progress import Meter
from builder.store import Store
from builder.trust.checksums import write_atomic


@dataclass(frozen=True)
class ArchivePlan:
    base: str  # e.g. rke2-images-core.linux-amd64
    group: str | None  # None: the all-in-one archive
    images: tuple[ArchiveImage, ...]

    def recipe(self, epoch: int) -> str:
        data: dict = {
            "v": 1, "epoch": epoch,
            "images": [(i.name, i.manifest_digest, str(i.platform)) for i in self.images],
            "zstd": [compress.ZSTD_LEVEL, compress.ZSTD_WINDOW_LOG], "gzip": list(compress.GZIP_SCHEME),
        }
        carried = [(i.extras, i.annotations) for i in self.images if i.extras]
        if carried:  # only then: archives without signatures keep their recipes
            data["carried"] = carried
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def list_text(self) -> str:
        return "".join(f"{i.name}\n" for i in self.images)


def base_name(lock: Lock, arch: str, group: str | None) -> str:
    return artifacts.images_base(lock.release.name, arch, group)


def plan(lock: Lock, arch: str, runtime: RuntimeImage | None,
         signatures: Iterable[cosign.Verified] = ()) -> list[ArchivePlan]:
    """Which images go into which archive for this arch (runtime image first in its groups);
    each image's verified cosign signature (``signatures``) travels with it."""
    carried = {v.image: v for v in signatures}
    platform = m.Platform.for_arch(arch)
    by_group: dict[str, list[ArchiveImage]] = {g: [] for g in lock.groups}
    if runtime is not None and lock.runtime is not None:
        for g in lock.runtime.groups:
            by_group[g].append(ArchiveImage(runtime.ref, runtime.manifest.digest, platform))
    for img in lock.images_for(arch):
        digest = img.platforms.get(arch)
        assert digest, f"{img.ref}: unresolved for {arch} (require_resolved should have refused)"
        sig = carried.get(img.ref)
        entry = ArchiveImage(img.ref, digest, platform, *((sig.blobs, sig.annotations()) if sig else ()))
        for g in img.groups:
            by_group[g].append(entry)
    plans = [ArchivePlan(base_name(lock, arch, g), g, tuple(imgs)) for g, imgs in by_group.items() if imgs]
    default: dict[str, ArchiveImage] = {}
    for g in lock.release.default_groups:
        for a in by_group.get(g, []):
            default.setdefault(a.name, a)
    if default:
        plans.insert(0, ArchivePlan(base_name(lock, arch, None), None, tuple(default.values())))
    return plans


def check(store: Store, plans: list[ArchivePlan]) -> None:
    """Everything every archive needs is in the store and of the right platform; writes nothing."""
    for p in plans:
        plan_layout(store, p.images)


def tar_bytes(store: Store, p: ArchivePlan, epoch: int) -> int:
    """The bytes of the archive's tar, known before packing: its progress total (the tar streams
    once into zstd and gzip, and the meter counts it as it goes)."""
    return archive_size(store, p.images, epoch, p.base)


def write(store: Store, p: ArchivePlan, out: Path, work: Path, epoch: int,
          state: BuildState, same_as: ArchivePlan | None = None,
          meter: Meter | None = None) -> tuple[list[Path], bool]:
    """Write the archive's three files unless their recipe is unchanged; returns (files, rebuilt).

    ``same_as``: an archive of this build with the same images, already written; its bytes are
    copied instead of packing and compressing the same content again. ``meter`` counts the tar's
    bytes as they stream into both compressors (of ``tar_bytes``: progress for people).
    """
    names = list(artifacts.image_files(p.base))
    recipe = p.recipe(epoch)
    if state.fresh(p.base, recipe, out, names):
        return [out / n for n in names], False
    if same_as is not None:
        outputs = _copy_outputs(same_as, names, work, out, state)
    else:
        zst, gz = compress.zstd_and_gzip(
            lambda sink: stream_archive(store, p.images, sink, epoch, p.base),
            work / names[0], work / names[1], on_bytes=meter.add if meter else None)
        outputs = {names[0]: zst, names[1]: gz}
    write_atomic(work / names[2], p.list_text().encode())
    state.publish(p.base, recipe, work, out, names,
                  {n: o.digest for n, o in outputs.items()})
    return [out / n for n in names], True


def _copy_outputs(same_as: ArchivePlan, names: list[str], work: Path, out: Path,
                  state: BuildState) -> dict[str, compress.Output]:
    """The compressed files of ``same_as`` (written by this build or before), copied to ``names``."""
    outputs = {}
    for suffix, name in zip(artifacts.IMAGE_ARCHIVE_SUFFIXES, names[:2], strict=True):
        src = state.current(f"{same_as.base}{suffix}", work, out)
        with open(src, "rb") as fin, compress.atomic_output(work / name) as sink:
            while chunk := fin.read(compress.CHUNK):
                sink.write(chunk)
        outputs[name] = compress.Output(work / name, sink.digest, sink.size)
    return outputs


def write_all_list(lock: Lock, arch: str, plans: list[ArchivePlan], out: Path) -> Path:
    refs = sorted({i.name for p in plans for i in p.images})
    path = out / artifacts.all_list_name(lock.release.name, arch)
    data = "".join(f"{r}\n" for r in refs).encode()
    if not path.exists() or path.read_bytes() != data:
        write_atomic(path, data)
    return path
