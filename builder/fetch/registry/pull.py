"""Pulling by digest into the store: manifests and blobs, over the mirror endpoints.

Manifests are read raw (size-capped) with the full Accept list and hashed before anything parses
them; a pinned digest that differs is refused with both digests. Blobs stream into
``store.ingest`` (hash while writing, commit by rename only on a match); an interrupted blob keeps
its partial and the next attempt asks for the rest with ``Range``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import requests

from builder import digest as dg
from builder.errors import BuilderError, DigestMismatch, FetchError, HttpStatusError, network_reason
from builder.fetch.registry.client import ClientCore
from builder.fetch.registry.endpoints import Endpoint, Scope, over_endpoints
from builder.oci import model as m
from builder.oci.reference import Reference
from builder.store import Ingest, Store

MAX_MANIFEST = 4 << 20  # distribution's own limit for a manifest
CHUNK = 1 << 20

OnBytes = Callable[[int], None]


class NotFound(HttpStatusError):
    """The endpoint answered 404 (try the next one)."""

    def __init__(self, message: str, hint: str | None = None, *, url: str = ""):
        super().__init__(404, url, message, hint)


@dataclass(frozen=True)
class RawManifest:
    raw: bytes
    digest: str
    media_type: str

    def parse(self, where: str) -> m.Manifest | m.Index:
        return m.parse_document(self.raw, where, self.media_type)


@dataclass(frozen=True)
class BlobResult:
    digest: str
    size: int
    transferred: int  # bytes received in this call (0 when it was already stored)
    fetched: bool


class RegistryPull(ClientCore):
    """Manifests and blobs from the first endpoint that has them."""

    def get_manifest(self, ref: Reference, digest: str | None = None) -> RawManifest:
        """The manifest or index at ``digest`` (verified before parsing) or at ``ref.tag``."""
        target = digest or ref.digest or ref.tag
        if not target:
            raise BuilderError(f"{ref}: neither a tag nor a digest to fetch")
        expected = target if dg.is_digest(target) else None
        shown = f"{ref.name}@{expected}" if expected else f"{ref.name}:{target}"

        def one(ep: Endpoint) -> RawManifest:
            url = ep.url(f"{ref.repository}/manifests/{target}")
            resp = self.request(ep, "GET", url, Scope(ref.repository),
                                headers={"Accept": m.ACCEPT}, stream=True)
            with resp:
                if resp.status_code == 404:
                    raise NotFound(f"{shown}: not found at {ep.base}", url=url)
                if resp.status_code != 200:
                    raise HttpStatusError(resp.status_code, url,
                                          f"{shown}: HTTP {resp.status_code} from {ep.base}")
                raw = _read_capped(resp, MAX_MANIFEST, shown)
                media_type = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
                served = resp.headers.get("Docker-Content-Digest")
            actual = dg.of_bytes(raw)
            # Hash first: nothing parses bytes that do not match the pin.
            if expected and actual != expected:
                raise DigestMismatch(f"{ref}: manifest from {ep.base}", expected, actual,
                                     "the registry serves other bytes for this digest; nothing was "
                                     "stored (check the mirror or re-lock)")
            if not expected and served and dg.is_digest(served) and served != actual:
                raise DigestMismatch(f"{shown}: manifest from {ep.base} (Docker-Content-Digest)",
                                     served, actual)
            return RawManifest(raw, actual, media_type)

        return over_endpoints(self.endpoints(ref.host), f"manifest {shown}", one)

    def fetch_blob(self, ref: Reference, desc: m.Descriptor, store: Store, *, what: str,
                   on_bytes: OnBytes | None = None) -> BlobResult:
        """Stream a blob into the store (verified); resumes a partial left by an earlier try."""
        if store.has(desc.digest):
            return BlobResult(desc.digest, store.size(desc.digest), 0, False)

        def one(ep: Endpoint) -> BlobResult:
            # A fresh ingest per endpoint: a mismatch discards the partial, so the next mirror
            # starts clean; a connection failure keeps it, so the next mirror resumes it.
            with store.ingest(desc.digest, what) as ing:
                if ing.done:  # another worker or build stored it while we waited for the lock
                    return BlobResult(desc.digest, store.size(desc.digest), 0, False)
                got = self._download(ep, ref, desc, ing, what, on_bytes)
                return BlobResult(desc.digest, desc.size, got, True)

        return over_endpoints(self.endpoints(ref.host), f"{what} {desc.digest}", one)

    def _download(self, ep: Endpoint, ref: Reference, desc: m.Descriptor, ing: Ingest, what: str,
                  on_bytes: OnBytes | None) -> int:
        url = ep.url(f"{ref.repository}/blobs/{desc.digest}")
        policy = self.options.policy
        received = 0
        for attempt in range(policy.attempts):
            headers = {"Range": f"bytes={ing.offset}-"} if ing.offset else {}
            resp = self.request(ep, "GET", url, Scope(ref.repository), headers=headers, stream=True)
            try:
                with resp:
                    _accept_blob_response(resp, ing, desc, url)
                    for chunk in resp.iter_content(CHUNK):
                        ing.write(chunk)
                        received += len(chunk)
                        if on_bytes:
                            on_bytes(len(chunk))
                        if ing.offset > desc.size:
                            break  # more than the descriptor says: commit() will refuse it
            except (requests.RequestException, OSError) as exc:
                ing.flush()  # keep what arrived: the next attempt (or run) resumes from here
                if policy.last(attempt):
                    raise FetchError(f"{what} {desc.digest} from {ep.base}: {network_reason(exc)} "
                                     f"({ing.offset} of {desc.size} bytes kept for resume)",
                                     "run the command again; it continues where it stopped") from None
                time.sleep(policy.backoff_delay(attempt))
                continue
            if ing.offset < desc.size:
                ing.flush()
                if policy.last(attempt):
                    raise FetchError(f"{what} {desc.digest} from {ep.base}: stream ended at "
                                     f"{ing.offset} of {desc.size} bytes")
                continue
            ing.commit()  # raises DigestMismatch and discards the partial on bad bytes
            return received
        raise FetchError(f"{what} {desc.digest} from {ep.base}: gave up")


def _accept_blob_response(resp: requests.Response, ing: Ingest, desc: m.Descriptor,
                          url: str) -> None:
    if resp.status_code == 404:
        raise NotFound(f"{url}: blob not found", url=url)
    if resp.status_code == 206:
        start = (resp.headers.get("Content-Range") or "").removeprefix("bytes ").split("-")[0]
        if start.strip() != str(ing.offset):
            raise FetchError(f"{url}: asked for bytes from {ing.offset}, got range {start!r}")
        return
    if resp.status_code == 200:
        if ing.offset:
            ing.reset()  # the server ignored Range: start over
        return
    if resp.status_code == 416 and ing.offset >= desc.size:
        return  # we already have every byte; commit() decides whether they are right
    raise HttpStatusError(resp.status_code, url)


def _read_capped(resp: requests.Response, limit: int, what: str) -> bytes:
    parts: list[bytes] = []
    size = 0
    for chunk in _iter(resp):
        size += len(chunk)
        if size > limit:
            raise FetchError(f"{what}: manifest larger than {limit} bytes; refusing it")
        parts.append(chunk)
    return b"".join(parts)


def _iter(resp: requests.Response) -> Iterator[bytes]:
    try:
        yield from resp.iter_content(64 * 1024)
    except requests.RequestException as exc:
        raise FetchError(f"{resp.url}: connection lost while reading: {network_reason(exc)}") from None
