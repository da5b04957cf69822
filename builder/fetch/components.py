"""Component files: which blob of the store is the file a component contributes for an arch."""

from __future__ import annotations

from dataclasses import dataclass

from builder.errors import BuilderError, UnresolvedError
from builder.fetch import elf
from builder.fetch.unpack import extract_member, extract_members
from builder.lock.lockfile import LOCK_HINT, Component, FileArtifact, Lock
from builder.store import Store


@dataclass(frozen=True)
class FileJob:
    """One download: a pinned URL; several components may share it (one containerd tarball)."""

    url: str
    digest: str
    users: tuple[str, ...]  # "components.NAME.ARCH" entries served by this file
    size: int | None = None  # pinned length: the download stops past it (None: the configured cap)

    @property
    def what(self) -> str:
        return self.users[0] if len(self.users) == 1 else f"{self.users[0]} (+{len(self.users) - 1})"


def plan(lock: Lock, arches: tuple[str, ...]) -> list[FileJob]:
    """The downloads the arches need (component files and charts), one per distinct file;
    refuses unresolved pins."""
    lock.require_resolved(arches, images=False)
    by_digest: dict[str, tuple[str, list[str], list[int]]] = {}
    for arch in arches:
        for comp in lock.components.values():
            art = None if comp.absent else comp.artifact(arch)
            if art is None or art.absent:
                continue
            _add_job(by_digest, art, f"components.{comp.name}.{arch}")
    for chart in lock.charts.values():  # one file for every arch
        if not chart.removed:
            _add_job(by_digest, chart.artifact, chart.what)
    # One file pinned twice with different sizes cannot match both: the smaller bound holds.
    return [FileJob(url, digest, tuple(users), min(sizes, default=None))
            for digest, (url, users, sizes) in by_digest.items()]


def _add_job(by_digest: dict[str, tuple[str, list[str], list[int]]], art: FileArtifact, user: str) -> None:
    assert art.url and art.digest
    entry = by_digest.setdefault(art.digest, (art.url, [], []))
    entry[1].append(user)
    if art.size is not None:
        entry[2].append(art.size)


def file_digest(store: Store, comp: Component, arch: str, check_arch: bool = True) -> str | None:
    """The digest of the file the component puts in the image/bundle (None: absent)."""
    art = None if comp.absent else comp.artifact(arch)
    if art is None or art.absent:
        return None
    what = f"components.{comp.name}.{arch}"
    if not art.digest:
        raise UnresolvedError(f"images.lock: {what}.sha256 is unresolved", LOCK_HINT)
    if not store.has(art.digest):
        raise BuilderError(f"{what}: {art.url} is not in the store", "run `python -m builder fetch` first")
    digest = art.digest
    if comp.format != "raw":
        assert comp.member
        digest = extract_member(store, art.digest, comp.format, comp.member, what)
    if check_arch:
        with store.open(digest) as f:
            found = elf.arch_of(f)
        if found is not None and found != arch:
            raise BuilderError(
                f"{what}: {art.url} is an {found} ELF binary, pinned for {arch}",
                "the lock points this arch at another arch's file; fix the URL and sha256",
            )
    return digest


def extract_all(lock: Lock, arches: tuple[str, ...], store: Store) -> None:
    """Take every archived component out of its archive, one archive read for all its members."""
    groups: dict[tuple[str, str], list[Component]] = {}
    for arch in arches:
        for comp in lock.components.values():
            art = None if comp.absent else comp.artifact(arch)
            if art is None or art.absent or comp.format == "raw" or not art.digest:
                continue
            groups.setdefault((art.digest, comp.format), []).append(comp)
    for (digest, fmt), comps in groups.items():
        members = sorted({c.member for c in comps if c.member})
        extract_members(store, digest, fmt, members, f"{art_label(comps)}")
    for arch in arches:
        for comp in lock.components.values():
            file_digest(store, comp, arch)  # cached now; checks each file's arch


def art_label(comps: list[Component]) -> str:
    names = sorted({c.name for c in comps})
    return f"components.{names[0]}" + (f" (+{len(names) - 1})" if len(names) > 1 else "")
