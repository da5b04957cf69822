"""Image archives per arch and group: `.tar.zst`, `.tar.gz` and the `.txt` list of references.

- ``NAME-images-GROUP.linux-ARCH.*`` for every group with images for the arch;
- ``NAME-images.linux-ARCH.*``, the legacy all-in-one (the release's default groups);
- ``NAME-images-all.linux-ARCH.txt``, the sorted union of every list.
One tar (OCI layout + docker manifest.json) streams once into both compressors (no `.tar` on disk),
a frame per tar segment (builder/oci/framed.py), whose frame indexes the store remembers by each
file's sha256 (what a delta release reads); an archive whose recipe (images, digests, epoch,
compression parameters) is unchanged is not rebuilt.

Each archive has the layer mode the lock gives its group (``Lock.layer_mode``; the all-in-one: the
release's): ``registry`` ships every pulled image as the registry served it; ``zstd`` ships the
``tar+zstd`` conversion (builder/oci/convert.py), with the registry manifest carried beside it and
named in its index.json annotation. The runtime image we build keeps its gzip layers in every mode:
install.sh stages it before containerd exists, with only gzip sure to be on the node.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from builder import artifacts
from builder.assemble.runtime import RuntimeImage
from builder.assemble.state import BuildState
from builder.errors import BuilderError
from builder.humanize import human
from builder.lock.lockfile import ImagePin, Lock
from builder.oci import compress, cosign, framed
from builder.oci import model as m
from builder.oci.archive import archive_size, stream_archive
from builder.oci.convert import (
    REGISTRY_MANIFEST,
    ConvertedLayer,
    ZstdLayerParams,
    convert_layer,
    to_zstd,
)
from builder.oci.image import load_image
from builder.oci.layout import ArchiveImage, plan_layout
from builder.progress import Meter, Reporter
from builder.store import Store
from builder.trust.checksums import write_atomic


@dataclass(frozen=True)
class ArchivePlan:
    base: str  # e.g. rke2-images-core.linux-amd64
    group: str | None  # None: the all-in-one archive
    images: tuple[ArchiveImage, ...]
    mode: str = "registry"  # the layer mode (Lock.layer_mode): registry | zstd

    def recipe(self, epoch: int) -> str:
        data: dict = {
            "v": 2, "epoch": epoch,  # v2: framed (a frame per tar segment, blobs at BLOB_MTIME)
            "images": [(i.name, i.manifest_digest, str(i.platform)) for i in self.images],
            "zstd": [compress.ZSTD_LEVEL, compress.ZSTD_WINDOW_LOG], "gzip": list(compress.GZIP_SCHEME),
        }
        carried = [(i.extras, i.annotations) for i in self.images if i.extras]
        if carried:  # only then: archives without signatures keep their recipes
            data["carried"] = carried
        if self.mode != "registry":  # only then: registry-mode archives keep their recipes
            data["layers"] = [self.mode, ZstdLayerParams().recipe]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def list_text(self) -> str:
        return "".join(f"{i.name}\n" for i in self.images)


def base_name(lock: Lock, arch: str, group: str | None) -> str:
    return artifacts.images_base(lock.release.name, arch, group)


def plan(lock: Lock, arch: str, runtime: RuntimeImage | None,
         signatures: Iterable[cosign.Verified] = (), *, store: Store) -> list[ArchivePlan]:
    """Which images go into which archive for this arch (runtime image first in its groups), in
    the form each archive's layer mode ships; each image's verified cosign signature
    (``signatures``) travels with it. A zstd archive's images are converted here unless their
    memos hold (``convert`` first does that for the whole build, in parallel, with progress)."""
    carried = {v.image: v for v in signatures}
    platform = m.Platform.for_arch(arch)
    converted: dict[str, str] = {}  # registry manifest -> converted manifest

    def entry(item: ImagePin | None, mode: str) -> ArchiveImage:
        if item is None:  # the runtime image: gzip layers in every mode (module docstring)
            assert runtime is not None
            return ArchiveImage(runtime.ref, runtime.manifest.digest, platform)
        digest = item.platforms.get(arch)
        assert digest, f"{item.ref}: unresolved for {arch} (require_resolved should have refused)"
        sig = carried.get(item.ref)
        extras, notes = (sig.blobs, sig.annotations()) if sig else ((), ())
        if mode == "registry":
            return ArchiveImage(item.ref, digest, platform, extras, notes)
        if digest not in converted:
            converted[digest] = to_zstd(store, digest, ZstdLayerParams()).digest
        return ArchiveImage(item.ref, converted[digest], platform, (digest, *extras),
                            ((REGISTRY_MANIFEST, digest), *notes))

    return [ArchivePlan(base_name(lock, arch, g), g, tuple(entry(i, mode) for i in items), mode)
            for g, mode, items in _archives(lock, arch, runtime)]


def _archives(lock: Lock, arch: str, runtime: RuntimeImage | None
              ) -> list[tuple[str | None, str, list[ImagePin | None]]]:
    """(group, layer mode, images) of each archive of ``arch``: the all-in-one (group None: the
    release's default groups, each image once) first, then one per group holding images."""
    members = _members(lock, arch, runtime)
    archives: list[tuple[str | None, str, list[ImagePin | None]]] = [
        (g, lock.layer_mode(g), items) for g, items in members.items() if items]
    default: dict[str, ImagePin | None] = {}
    for g in lock.release.default_groups:
        for item in members.get(g, []):
            default.setdefault(item.ref if item is not None else runtime.ref if runtime else "", item)
    if default:
        archives.insert(0, (None, lock.layer_mode(None), list(default.values())))
    return archives


def _members(lock: Lock, arch: str, runtime: RuntimeImage | None) -> dict[str, list[ImagePin | None]]:
    """Each group's images for ``arch`` in archive order (None: the runtime image, first)."""
    by_group: dict[str, list[ImagePin | None]] = {g: [] for g in lock.groups}
    if runtime is not None and lock.runtime is not None:
        for g in lock.runtime.groups:
            by_group[g].append(None)
    for img in lock.images_for(arch):
        for g in img.groups:
            by_group[g].append(img)
    return by_group


def to_convert(lock: Lock, arch: str) -> list[tuple[str, str]]:
    """(reference, registry manifest) of every pulled image some zstd archive of ``arch`` ships."""
    zstd = {item.ref for _, mode, items in _archives(lock, arch, None) if mode == "zstd"
            for item in items if item is not None}
    return [(img.ref, digest) for img in lock.images_for(arch)
            if img.ref in zstd and (digest := img.platforms.get(arch))]


# Layers converted at once. Each level-19 worker holds its own match tables (~80-115 MiB): on the
# session fixture images, 1 worker peaked at 119 MiB RSS, 2 at 203 MiB (over the 200 MiB budget of
# a build) for the same wall time on the shared 2-core build machine (tests/test_layer_modes.py).
CONVERT_WORKERS = 1


def convert(lock: Lock, arches: Iterable[str], store: Store, reporter: Reporter,
            workers: int = CONVERT_WORKERS) -> None:
    """Convert, before anything is written, every image a zstd archive of ``arches`` ships: each
    distinct layer once (``workers`` at a time), then each image's manifest; a line per image
    converted. Found in the memos, nothing is compressed again and nothing is said."""
    params = ZstdLayerParams()
    images: dict[str, str] = {}  # registry manifest -> a reference naming it (for people)
    for arch in arches:
        wanted = to_convert(lock, arch)
        try:  # the registry form complete and of the right platform, as `check` would say
            plan_layout(store, [ArchiveImage(ref, digest, m.Platform.for_arch(arch))
                                for ref, digest in wanted])
        except BuilderError as exc:
            raise BuilderError(f"{arch}: {exc.message}", exc.hint) from None
        for ref, digest in wanted:
            images.setdefault(digest, f"{ref} ({arch})")
    layers: dict[tuple[str, str], tuple[str, int]] = {}  # (blob, diff_id) -> (image, index)
    pending: dict[str, set[tuple[str, str]]] = {}
    for digest in images:
        manifest, config = load_image(store, digest)
        keys = list(zip((la.digest for la in manifest.layers), config.diff_ids, strict=True))
        pending[digest] = set(keys)
        for index, key in enumerate(keys):
            layers.setdefault(key, (digest, index))
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="zstd") as pool:
        running: dict[Future[ConvertedLayer], tuple[str, str]] = {
            pool.submit(convert_layer, store, d, i, params): key for key, (d, i) in layers.items()}
        compressed: set[tuple[str, str]] = set()
        try:
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    key = running.pop(future)
                    if _result(future, images[layers[key][0]]).converted:
                        compressed.add(key)
                    for digest in [d for d, keys in pending.items() if key in keys]:
                        pending[digest].discard(key)
                        if not pending[digest]:
                            del pending[digest]
                            _finish(store, digest, images[digest], params, compressed,
                                    reporter, started)
        finally:
            for future in running:  # a failed layer: stop the rest, then report it
                future.cancel()


def _result(future: Future[ConvertedLayer], who: str) -> ConvertedLayer:
    """The layer's conversion; its error names the image by reference and arch too."""
    try:
        return future.result()
    except BuilderError as exc:
        raise BuilderError(f"{who}: {exc.message}", exc.hint) from exc


def _finish(store: Store, digest: str, who: str, params: ZstdLayerParams,
            compressed: set[tuple[str, str]], reporter: Reporter, started: float) -> None:
    """The image's converted manifest (its layers are all in the store now); a line for people
    when some layer of it was compressed by this build."""
    image = to_zstd(store, digest, params)
    mine = [la for la in image.layers if (la.source, la.diff_id) in compressed]
    if mine:
        before = sum(store.size(la.source) for la in image.layers)
        after = sum(la.descriptor.size for la in image.layers)
        reporter.line(f"converted {who} to zstd layers: {len(image.layers)} layers, "
                      f"{human(before)} -> {human(after)}, {time.monotonic() - started:.1f}s into the conversion")


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
    if state.fresh(p.base, recipe, out, names) and _frames_known(store, state, out, names[:2]):
        return [out / n for n in names], False
    if same_as is not None:
        outputs = _copy_outputs(same_as, names, work, out, state)
        if not _frames_known(store, state, work, names[:2], {n: o.digest for n, o in outputs.items()}):
            raise BuilderError(f"{p.base}: the archive copied from {same_as.base} is not framed",
                               "delete the artifacts directory's .build-state.json and build again")
    else:
        zst, gz = framed.zstd_and_gzip(
            lambda sink: stream_archive(store, p.images, sink, epoch, p.base),
            work / names[0], work / names[1], on_bytes=meter.add if meter else None)
        for f in (zst, gz):
            framed.remember(store, f.output.digest, f.index)
        outputs = {names[0]: zst.output, names[1]: gz.output}
    write_atomic(work / names[2], p.list_text().encode())
    state.publish(p.base, recipe, work, out, names,
                  {n: o.digest for n, o in outputs.items()})
    return [out / n for n in names], True


def _frames_known(store: Store, state: BuildState, where: Path, names: list[str],
                  digests: dict[str, str] | None = None) -> bool:
    """The store remembers the frame index of each compressed file ``names`` in ``where``
    (by its sha256: ``digests``, else the build state's record); a file it does not know (a
    copy, an artifacts dir built with another store) is scanned once and remembered. False
    when a file is not framed after all: then it is rebuilt."""
    known = digests or state.known_digests()
    try:
        for name in names:
            framed.frames_of(store, where / name, known[name])
    except BuilderError:
        return False
    return True


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
