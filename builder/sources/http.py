"""Pinned files over HTTP(S): streamed into the store, verified while streaming, resumed, retried.

- Mirrors rewrite URL prefixes (Artifactory-style proxies); candidates are tried in order, the
  original URL last unless the mirror says ``fallback: false``.
- A partial download is resumed with ``Range`` + ``If-Range`` (the ETag or Last-Modified the
  first response carried); a server that answers 200 instead of 206 starts the file over.
- Connection errors, timeouts, 5xx and 429 are retried with exponential backoff (``Retry-After``
  honoured); 4xx other than 429 goes straight to the next candidate: no retry storm on a 404.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import requests

from builder.errors import DigestMismatch, FetchError
from builder.lockfile import FileMirror
from builder.store import Ingest, Store

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Small network reads: bytes already read when a connection drops are kept for the resume.
CHUNK = 1 << 16


@dataclass(frozen=True)
class HttpOptions:
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    attempts: int = 5  # per candidate URL
    backoff: float = 0.5  # first delay; doubles each attempt
    max_backoff: float = 30.0
    max_retry_after: float = 120.0  # never sleep longer than this for a server's Retry-After


@dataclass
class FetchResult:
    digest: str
    size: int
    transferred: int  # bytes received over the network in this call
    url: str | None  # where the bytes came from (None: already in the store)
    cached: bool


# Progress callback: (bytes_done, bytes_total_or_None)
Progress = Callable[[int, int | None], None]


def candidates(url: str, mirrors: tuple[FileMirror, ...]) -> list[str]:
    """Mirror URLs for ``url`` in order, then the original unless a matching mirror forbids it."""
    out: list[str] = []
    fallback = True
    for m in mirrors:
        if url.startswith(m.prefix):
            out.extend(ep + url[len(m.prefix):] for ep in m.endpoints)
            fallback = fallback and m.fallback
    if fallback or not out:
        out.append(url)
    return list(dict.fromkeys(out))


def retry_after(resp: requests.Response | None, default: float, cap: float) -> float:
    value = resp.headers.get("Retry-After") if resp is not None else None
    if value:
        if value.strip().isdigit():
            return min(float(value), cap)
        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
            return min(max(0.0, when - time.time()), cap)
        except (TypeError, ValueError):
            pass
    return default


@dataclass
class HttpFetcher:
    store: Store
    mirrors: tuple[FileMirror, ...] = ()
    options: HttpOptions = field(default_factory=HttpOptions)
    session: requests.Session = field(default_factory=requests.Session)
    sleep: Callable[[float], None] = time.sleep

    def fetch(self, url: str, digest: str, what: str, progress: Progress | None = None) -> FetchResult:
        """Make sure the blob ``digest`` is in the store, downloading it from ``url`` if needed."""
        if self.store.has(digest):
            return FetchResult(digest, self.store.size(digest), 0, None, True)
        errors: list[str] = []
        with self.store.ingest(digest, what) as ing:
            if ing.done:  # another build finished it while we waited for the lock
                return FetchResult(digest, self.store.size(digest), 0, None, True)
            for cand in candidates(url, self.mirrors):
                try:
                    transferred = self._download(cand, ing, progress)
                except _GiveUp as exc:
                    errors.append(f"{cand}: {exc}")
                    continue
                except DigestMismatch as exc:
                    raise DigestMismatch(f"{what} from {cand}", exc.expected, exc.actual,
                                         "the pin or the mirror is wrong; nothing was stored") from None
                return FetchResult(digest, ing.offset, transferred, cand, False)
        raise FetchError(
            f"{what}: could not download {url}:\n    " + "\n    ".join(errors),
            "check the URL, the mirror configuration (--mirrors / BUILDER_MIRRORS) and the network; "
            "a rerun resumes what was already received",
        )

    def _download(self, url: str, ing: Ingest, progress: Progress | None) -> int:
        opts = self.options
        transferred = 0
        delay = opts.backoff
        last = "no attempt"
        for attempt in range(1, opts.attempts + 1):
            resp = None
            try:
                headers = {"Accept-Encoding": "identity"}
                if ing.offset and ing.meta.get("url") == url:
                    headers["Range"] = f"bytes={ing.offset}-"
                    if ing.meta.get("validator"):
                        headers["If-Range"] = ing.meta["validator"]
                elif ing.offset:
                    ing.reset()  # bytes from another URL cannot be trusted to line up
                resp = self.session.get(url, headers=headers, stream=True,
                                        timeout=(opts.connect_timeout, opts.read_timeout))
                if resp.status_code == 416:
                    ing.reset()  # our partial is longer than the file: start over
                    last = "HTTP 416 on resume"
                    continue
                if resp.status_code in RETRY_STATUS:
                    last = f"HTTP {resp.status_code}"
                    wait = retry_after(resp, delay, opts.max_retry_after)
                    resp.close()
                    if attempt < opts.attempts:
                        self.sleep(wait)
                        delay = min(delay * 2, opts.max_backoff)
                    continue
                if resp.status_code >= 400:
                    raise _GiveUp(f"HTTP {resp.status_code} {resp.reason}")
                if resp.status_code == 206:
                    if not _range_starts_at(resp, ing.offset):
                        ing.reset()
                        resp.close()
                        last = "server sent a range we did not ask for"
                        continue
                else:  # 200: full body, whatever we asked for
                    if ing.offset:
                        ing.reset()
                    validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
                    if validator and validator.startswith("W/"):
                        validator = None  # weak validators are not allowed in If-Range
                    ing.set_meta(url=url, validator=validator)
                total = _total_size(resp, ing.offset)
                for chunk in resp.iter_content(CHUNK):
                    ing.write(chunk)
                    transferred += len(chunk)
                    if progress:
                        progress(ing.offset, total)
                ing.flush()
                if total is not None and ing.offset < total:
                    last = f"connection closed at {ing.offset} of {total} bytes"
                    continue
                ing.commit()
                return transferred
            except (requests.ConnectionError, requests.Timeout,
                    requests.exceptions.ChunkedEncodingError) as exc:
                ing.flush()
                last = f"{type(exc).__name__}: {_short(exc)}"
                if attempt < opts.attempts:
                    self.sleep(delay + random.uniform(0, delay / 4))
                    delay = min(delay * 2, opts.max_backoff)
            finally:
                if resp is not None:
                    resp.close()
        raise _GiveUp(f"gave up after {opts.attempts} attempts (last: {last})")


class _GiveUp(Exception):
    pass


def _range_starts_at(resp: requests.Response, offset: int) -> bool:
    content_range = resp.headers.get("Content-Range", "")
    # "bytes START-END/TOTAL"
    try:
        start = int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return False
    return start == offset


def _total_size(resp: requests.Response, offset: int) -> int | None:
    length = resp.headers.get("Content-Length")
    if length is None or not length.isdigit():
        return None
    return int(length) + (offset if resp.status_code == 206 else 0)


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 200 else text[:197] + "..."
