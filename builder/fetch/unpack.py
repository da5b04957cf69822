"""Safe extraction of one member from a stored archive (``.tar.gz`` or a Debian ``.deb``).

The whole archive is checked before anything is taken from it: a member with an absolute path or
``..``, a link that would escape the root, or a device/fifo makes the archive refused, because an
upstream archive holding such a thing is not one we want to ship from. The member's bytes go to
the store (never to a path on disk), so extraction itself cannot write outside anything.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from builder.errors import BuilderError, UnsafeArchive
from builder.store import Store

MAX_LINK_HOPS = 16


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return posixpath.normpath(name or ".").lstrip("/")


def check_member(info: tarfile.TarInfo, what: str) -> None:
    name = info.name
    parts = name.split("/")
    if name.startswith("/") or ".." in parts:
        raise UnsafeArchive(f"{what}: member {name!r} has an absolute path or '..'",
                            "refusing the archive; check where it came from")
    if info.ischr() or info.isblk() or info.isfifo() or not (info.isfile() or info.isdir()
                                                              or info.issym() or info.islnk()):
        raise UnsafeArchive(f"{what}: member {name!r} is a device or special file",
                            "refusing the archive; check where it came from")
    if info.issym() or info.islnk():
        target = info.linkname
        if target.startswith("/"):
            raise UnsafeArchive(f"{what}: link {name!r} -> {target!r} is absolute",
                                "refusing the archive; check where it came from")
        base = posixpath.dirname(_norm(name)) if info.issym() else ""
        resolved = posixpath.normpath(posixpath.join(base, target))
        if resolved == ".." or resolved.startswith("../"):
            raise UnsafeArchive(f"{what}: link {name!r} -> {target!r} escapes the archive root",
                                "refusing the archive; check where it came from")


class _Readable(Protocol):
    """What a streamed tar read needs: the store's BlobReader, an ar member (_Limited)."""

    def read(self, n: int = -1, /) -> bytes: ...


class _Limited:
    """A read-only view of the next ``size`` bytes of a stream (an ar member)."""

    def __init__(self, raw: _Readable, size: int):
        self.raw, self.left = raw, size

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if n < 0 else min(n, self.left)
        data = self.raw.read(n)
        self.left -= len(data)
        return data


@contextmanager
def _open_tar(store: Store, digest: str, fmt: str, what: str) -> Iterator[tarfile.TarFile]:
    # Read through sha256: members are only taken from the archive that was pinned and verified
    # (finish() below), never from one changed in the store since.
    with store.open_verified(digest, what) as raw:
        if fmt == "tar.gz":
            stream: _Readable = raw
        elif fmt == "deb":
            stream = _deb_data(raw, what)
        else:
            raise BuilderError(f"{what}: cannot take a member from format {fmt!r}")
        try:
            # A stream mode ("r|*") only ever calls read(); typeshed's fileobj type asks for the
            # whole file API (seek, tell, write) that a one-pass verified read does not have.
            with tarfile.open(fileobj=stream, mode="r|*") as tar:  # type: ignore[call-overload]
                yield tar
        except tarfile.TarError as exc:
            raw.finish()  # a blob changed on disk explains a broken archive better
            raise UnsafeArchive(f"{what}: not a readable {fmt} archive: {exc}") from None
        raw.finish()


def _deb_data(raw: _Readable, what: str) -> _Limited:
    if raw.read(8) != b"!<arch>\n":
        raise UnsafeArchive(f"{what}: not a Debian package (no ar header)")
    while True:
        header = raw.read(60)
        if len(header) < 60:
            raise UnsafeArchive(f"{what}: Debian package has no data.tar member")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if name.startswith("data.tar"):
            return _Limited(raw, size)
        raw.read(size + (size & 1))  # ar pads members to even offsets


def _resolve(members: dict[str, tarfile.TarInfo], name: str, what: str) -> str:
    current = _norm(name)
    for _ in range(MAX_LINK_HOPS):
        info = members.get(current)
        if info is None:
            have = ", ".join(sorted(n for n, i in members.items() if i.isfile())[:20])
            raise BuilderError(f"{what}: the archive has no member {name!r}",
                               f"regular files in it include: {have}")
        if info.isfile():
            return current
        if info.isdir():
            raise BuilderError(f"{what}: member {name!r} is a directory, not a file")
        base = posixpath.dirname(current) if info.issym() else ""
        current = posixpath.normpath(posixpath.join(base, info.linkname))
    raise UnsafeArchive(f"{what}: member {name!r} is a link loop")


def _take(store: Store, archive_digest: str, fmt: str, names: set[str], what: str
          ) -> tuple[dict[str, tarfile.TarInfo], dict[str, str]]:
    """One pass: check every member, store the regular files named in ``names``."""
    index: dict[str, tarfile.TarInfo] = {}
    taken: dict[str, str] = {}
    with _open_tar(store, archive_digest, fmt, what) as tar:
        for info in tar:
            check_member(info, what)
            name = _norm(info.name)
            index[name] = info
            if name in names and info.isfile():
                fileobj = tar.extractfile(info)
                assert fileobj is not None
                taken[name] = store.put_stream(fileobj, what=f"{what} member {name}")
    return index, taken


def extract_members(store: Store, archive_digest: str, fmt: str, members: list[str],
                    what: str) -> dict[str, str]:
    """Store several members' bytes; returns member -> digest.

    One pass over the archive checks every member and takes the wanted files; a second pass runs
    only when a wanted name is a link (its target may come earlier in the stream). Nothing is
    recorded until the whole archive passed the checks, and results are cached per archive +
    member, so later calls do not read the archive at all.
    """
    keys = {m: f"{archive_digest}:{fmt}:{_norm(m)}" for m in members}
    out = {m: d for m, k in keys.items() if (d := store.index_get("members", k))}
    wanted = [m for m in members if m not in out]
    if not wanted:
        return out
    index, taken = _take(store, archive_digest, fmt, {_norm(m) for m in wanted}, what)
    targets = {m: _resolve(index, m, what) for m in wanted}
    missing = {t for t in targets.values() if t not in taken}
    if missing:
        taken.update(_take(store, archive_digest, fmt, missing, what)[1])
    for m in wanted:
        out[m] = taken[targets[m]]
        store.index_put("members", keys[m], out[m])
    return out


def extract_member(store: Store, archive_digest: str, fmt: str, member: str, what: str) -> str:
    """Store one member's bytes and return their digest."""
    return extract_members(store, archive_digest, fmt, [member], what)[member]
