"""What a release scan covers: every image of every archive for every arch (the runtime image
included), and each arch's bundle file tree, as Trivy targets prepared under a work directory."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

from builder.artifacts import bundle_name
from builder.assemble import images, runtime
from builder.errors import BuilderError, UnsafeArchive
from builder.fetch.unpack import check_member
from builder.lock.lockfile import Lock
from builder.oci.layout import ArchiveImage
from builder.scan.findings import ScanTarget
from builder.scan.targets import image_targets
from builder.store import Store


def release_targets(lock: Lock, arches: tuple[str, ...], store: Store, artifacts: Path,
                    work: Path, epoch: int) -> list[ScanTarget]:
    targets: list[ScanTarget] = []
    for arch in arches:
        rt = runtime.build(lock, arch, store, epoch)  # cached in the store by recipe: a lookup
        unique: dict[str, ArchiveImage] = {}
        for plan in images.plan(lock, arch, rt, store=store):
            for img in plan.images:
                unique.setdefault(f"{img.name}@{img.manifest_digest}", img)
        arch_work = work / arch
        arch_work.mkdir(parents=True, exist_ok=True)
        targets += image_targets(store, list(unique.values()), arch, arch_work)
        targets.append(ScanTarget(f"bundle {lock.release.name}.linux-{arch}", arch, "rootfs",
                                  _unpack_bundle(lock, arch, artifacts, arch_work / "bundle")))
    return targets


def _unpack_bundle(lock: Lock, arch: str, artifacts: Path, dest: Path) -> Path:
    bundle = artifacts / bundle_name(lock.release.name, arch)
    if not bundle.is_file():
        raise BuilderError(f"scan: {bundle} is missing", "run `python -m builder build` first")
    dest.mkdir(parents=True, exist_ok=True)
    # Written member by member rather than with extractall(filter="data"): Debian 12's Python
    # (3.11.2) predates tarfile's extraction filters. A bundle holds only files and directories.
    with tarfile.open(bundle, "r:gz") as tar:
        for info in tar:
            check_member(info, str(bundle))
            target = dest / info.name
            if info.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif info.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(info)
                assert src is not None  # a regular file member (isfile above) always has one
                with src, target.open("wb") as out:
                    shutil.copyfileobj(src, out)
                target.chmod(info.mode & 0o755)  # no setuid/setgid/sticky, nothing world-writable
            else:
                raise UnsafeArchive(f"scan: {bundle}: member {info.name!r} is a link",
                                    "a bundle holds only files and directories; rebuild it")
    return dest
