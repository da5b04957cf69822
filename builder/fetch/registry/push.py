"""Pushing to a registry: the one blob copy (present? → mount → upload), manifests, whole trees.

Every path of the builder that puts a blob into a registry goes through ``copy_blob``, the
algorithm of containers/image's ``TryReusingBlob``: a blob the repository already has is not
sent; one the registry holds in another repository of the same host is mounted (no bytes
travel); only then is it uploaded, monolithic or in ``PATCH`` chunks. Pushes go to the registry
the reference names, never to a mirror.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Protocol
from urllib.parse import urlencode, urljoin

from builder import digest as dg
from builder.errors import DigestMismatch, HttpStatusError
from builder.fetch.registry.client import ClientCore, Readable
from builder.fetch.registry.endpoints import Endpoint, Scope
from builder.oci import model as m
from builder.oci.reference import Reference
from builder.store import Store


class BlobSource(Readable, Protocol):
    """What an ``Opener`` gives: bytes by read(), closed by ``with``."""

    def __enter__(self) -> Readable: ...

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None, /) -> object: ...


Opener = Callable[[], BlobSource]  # called again for a retry: each call reads from the start
CopyOutcome = Literal["present", "mounted", "uploaded"]


@dataclass(frozen=True)
class BlobCopy:
    """What ``copy_blob`` did (or, with ``dry_run``, would do) for one blob."""

    outcome: CopyOutcome
    digest: str
    size: int  # the blob's
    sent: int  # bytes uploaded (0 unless ``uploaded`` and not a dry run)


def _push_scope(ref: Reference) -> Scope:
    return Scope(ref.repository, ("pull", "push"))


class RegistryPush(ClientCore):
    """Blobs and manifests into the registry a reference names."""

    def blob_exists(self, ref: Reference, digest: str) -> bool:
        ep = self.direct(ref.host)
        url = ep.url(f"{ref.repository}/blobs/{digest}")
        resp = self.request(ep, "HEAD", url, _push_scope(ref))
        with resp:
            if resp.status_code == 200:
                return True
            if resp.status_code == 404:
                return False
            raise HttpStatusError(resp.status_code, url, f"HEAD {ref.name} blob {digest}: HTTP "
                                  f"{resp.status_code}")

    def copy_blob(self, target: Reference, digest: str, size: int, opener: Opener, *,
                  mount_from: Reference | None = None, chunk_size: int | None = None,
                  dry_run: bool = False,
                  before_upload: Callable[[], None] | None = None) -> BlobCopy:
        """Make ``target``'s repository hold the blob: present? → mount → upload.

        ``mount_from`` names a repository of the same registry host known to hold the blob (one
        on another host is ignored: a registry mounts only its own blobs). A registry that does
        not mount answers the mount with a fresh upload session (202), which the upload uses.
        ``dry_run`` asks only whether the blob is there and says what would happen.
        ``before_upload`` is called once bytes are about to be sent (a progress line).
        """
        if self.blob_exists(target, digest):
            return BlobCopy("present", digest, size, 0)
        source = mount_from if mount_from is not None and mount_from.host == target.host else None
        if dry_run:
            return BlobCopy("mounted" if source else "uploaded", digest, size, 0)
        ep = self.direct(target.host)
        location = None
        if source is not None:
            location = self._mount(ep, target, digest, source)
            if location is None:
                return BlobCopy("mounted", digest, size, 0)
        if before_upload is not None:
            before_upload()
        self._upload(ep, target, digest, size, opener, chunk_size, location)
        return BlobCopy("uploaded", digest, size, size)

    def push_blob(self, ref: Reference, digest: str, size: int, opener: Opener,
                  chunk_size: int | None = None) -> bool:
        """Upload a blob unless the registry has it; returns True when bytes were sent."""
        return self.copy_blob(ref, digest, size, opener, chunk_size=chunk_size).outcome == "uploaded"

    def _mount(self, ep: Endpoint, target: Reference, digest: str, source: Reference) -> str | None:
        """Cross-repository mount; None when it took, else the upload session the registry opened
        instead (202: it does not mount, or does not have the blob there)."""
        url = ep.url(f"{target.repository}/blobs/uploads/?"
                     + urlencode({"mount": digest, "from": source.repository}))
        resp = self.request(ep, "POST", url, _push_scope(target), headers={"Content-Length": "0"})
        with resp:
            if resp.status_code == 201:
                return None
            if resp.status_code == 202 and resp.headers.get("Location"):
                return urljoin(ep.base + "/", resp.headers["Location"])
            raise HttpStatusError(resp.status_code, url,
                                  f"mount {digest} from {source.repository} into {target.name}: "
                                  f"HTTP {resp.status_code}",
                                  "the registry does not mount across repositories; push again")

    def _upload(self, ep: Endpoint, ref: Reference, digest: str, size: int, opener: Opener,
                chunk_size: int | None, location: str | None) -> None:
        scope = _push_scope(ref)
        chunk_size = chunk_size if chunk_size is not None else self.options.upload_chunk
        location = location or self._start_upload(ep, ref, scope)
        if chunk_size:
            location = self._patch_chunks(ep, ref, scope, location, opener, chunk_size)
            final = self.request(ep, "PUT", _with_digest(location, digest), scope,
                                 headers={"Content-Length": "0"})
        else:
            final = self.request(ep, "PUT", _with_digest(location, digest), scope,
                                 headers={"Content-Type": "application/octet-stream",
                                          "Content-Length": str(size)},
                                 body=opener)
        with final:
            if final.status_code != 201:
                raise HttpStatusError(final.status_code, location,
                                      f"push {ref.name} blob {digest}: HTTP {final.status_code}: "
                                      f"{final.text[:300]}")

    def _start_upload(self, ep: Endpoint, ref: Reference, scope: Scope) -> str:
        url = ep.url(f"{ref.repository}/blobs/uploads/")
        resp = self.request(ep, "POST", url, scope, headers={"Content-Length": "0"})
        with resp:
            if resp.status_code != 202 or not resp.headers.get("Location"):
                raise HttpStatusError(resp.status_code, url, f"push {ref.name}: starting an upload "
                                      f"gave HTTP {resp.status_code}")
            return urljoin(ep.base + "/", resp.headers["Location"])

    def _patch_chunks(self, ep: Endpoint, ref: Reference, scope: Scope, location: str,
                      opener: Opener, chunk_size: int) -> str:
        offset = 0
        with opener() as src:
            while chunk := src.read(chunk_size):
                end = offset + len(chunk) - 1
                resp = self.request(ep, "PATCH", location, scope,
                                    headers={"Content-Type": "application/octet-stream",
                                             "Content-Range": f"{offset}-{end}",
                                             "Content-Length": str(len(chunk))},
                                    body=_constant(chunk))
                with resp:
                    if resp.status_code != 202:
                        raise HttpStatusError(resp.status_code, location,
                                              f"push {ref.name}: chunk {offset}-{end} gave HTTP "
                                              f"{resp.status_code}")
                    location = urljoin(ep.base + "/", resp.headers.get("Location") or location)
                offset = end + 1
        return location

    def push_manifest(self, ref: Reference, target: str, raw: bytes, media_type: str) -> str:
        """PUT a manifest under a tag or its digest; returns its digest (checked against the echo)."""
        ep = self.direct(ref.host)
        digest = dg.of_bytes(raw)
        url = ep.url(f"{ref.repository}/manifests/{target}")
        resp = self.request(ep, "PUT", url, _push_scope(ref), headers={"Content-Type": media_type},
                            body=lambda: raw)
        with resp:
            if resp.status_code != 201:
                raise HttpStatusError(resp.status_code, url,
                                      f"push {ref.name} manifest {target}: HTTP {resp.status_code}: "
                                      f"{resp.text[:300]}")
            echoed = resp.headers.get("Docker-Content-Digest")
        if echoed and echoed != digest:
            raise DigestMismatch(f"push {ref.name} manifest {target}", digest, echoed)
        return digest

    def push_tree(self, store: Store, ref: Reference, desc: m.Descriptor,
                  chunk_size: int | None = None) -> str:
        """Push an image or index from the store (children first), tagged ``ref.tag``."""
        for child in _children(store, desc):
            self._push_one(store, ref, child, chunk_size)
        raw = store.read_bytes(desc.digest)
        return self.push_manifest(ref, ref.tag or desc.digest, raw, m.media_type_of(raw, desc.media_type))

    def _push_one(self, store: Store, ref: Reference, desc: m.Descriptor, chunk_size: int | None) -> None:
        if desc.media_type in m.INDEX_TYPES + m.MANIFEST_TYPES:
            for child in _children(store, desc):
                self._push_one(store, ref, child, chunk_size)
            raw = store.read_bytes(desc.digest)
            self.push_manifest(ref, desc.digest, raw, m.media_type_of(raw, desc.media_type))
            return
        self.copy_blob(ref, desc.digest, store.size(desc.digest), lambda: store.open(desc.digest),
                       chunk_size=chunk_size)


def _children(store: Store, desc: m.Descriptor) -> list[m.Descriptor]:
    doc = m.parse_document(store.read_bytes(desc.digest), f"store {desc.digest}", desc.media_type)
    if isinstance(doc, m.Index):
        return list(doc.manifests)
    return [doc.config, *doc.layers]


def _constant(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _with_digest(location: str, digest: str) -> str:
    return location + ("&" if "?" in location else "?") + urlencode({"digest": digest})


__all__ = ["BlobCopy", "CopyOutcome", "RegistryPush"]
