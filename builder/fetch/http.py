"""Pinned files over HTTP(S): streamed into the store, verified while streaming, resumed, retried.

- Mirrors rewrite URL prefixes (Artifactory-style proxies); candidates are tried in order, the
  original URL last unless the mirror says ``fallback: false``.
- A partial download is resumed with ``Range`` + ``If-Range`` (the ETag or Last-Modified the
  first response carried); a server that answers 200 instead of 206 starts the file over.
- Connection errors, timeouts, 5xx and 429 are retried by the one ``transport.RetryPolicy``
  (exponential backoff, ``Retry-After`` honoured); 4xx other than 408/429 goes straight to the next
  candidate: no retry storm on a 404.
- Bounded: a download stops as soon as it passes the size pinned in the lock (``size:``) or, for
  a pin without one, ``BUILDER_MAX_DOWNLOAD`` bytes (default 4 GiB); the partial is discarded.
  A server announcing a larger Content-Length is refused before its first byte is read.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

import requests

from builder.errors import BuilderError, DigestMismatch, FetchError, HttpStatusError, network_reason
from builder.fetch.mirrors import FileMirrorRule, candidates
from builder.fetch.transport import TRANSIENT, RetryPolicy, new_session
from builder.store import Ingest, Store

__all__ = ["FetchResult", "HttpFetcher", "HttpOptions", "Limit", "TooLarge"]
# Small network reads: bytes already read when a connection drops are kept for the resume.
CHUNK = 1 << 16
ENV_MAX_DOWNLOAD = "BUILDER_MAX_DOWNLOAD"
DEFAULT_MAX_DOWNLOAD = 4 << 30  # larger than any file a release pins (the biggest is ~200 MB)


def max_download_from_env(env: dict[str, str] | None = None) -> int:
    """The cap for a file pinned without ``size:``: BUILDER_MAX_DOWNLOAD bytes, else 4 GiB."""
    value = (os.environ if env is None else env).get(ENV_MAX_DOWNLOAD, "").strip()
    if not value:
        return DEFAULT_MAX_DOWNLOAD
    if not value.isdigit() or int(value) <= 0:
        raise BuilderError(f"{ENV_MAX_DOWNLOAD}: expected a positive number of bytes, got {value[:40]!r}",
                           f"e.g. {ENV_MAX_DOWNLOAD}={DEFAULT_MAX_DOWNLOAD} (4 GiB, the default)")
    return int(value)


@dataclass(frozen=True)
class HttpOptions:
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    policy: RetryPolicy = field(default_factory=RetryPolicy)  # its attempts are per candidate URL
    max_download: int = field(default_factory=max_download_from_env)  # bytes, when no size is pinned


@dataclass
class FetchResult:
    digest: str
    size: int
    transferred: int  # bytes received over the network in this call
    url: str | None  # where the bytes came from (None: already in the store)
    cached: bool


# Progress callback: (bytes_done, bytes_total_or_None)
Progress = Callable[[int, int | None], None]


@dataclass
class HttpFetcher:
    store: Store
    mirrors: tuple[FileMirrorRule, ...] = ()
    options: HttpOptions = field(default_factory=HttpOptions)
    # Pinned files come from any URL, often through the build host's HTTP(S)_PROXY: keep the
    # environment's settings for them, as requests' own session always did.
    session: requests.Session = field(default_factory=lambda: new_session(trust_env=True))
    sleep: Callable[[float], None] = time.sleep

    def fetch(self, url: str, digest: str, what: str, progress: Progress | None = None,
              size: int | None = None) -> FetchResult:
        """Make sure the blob ``digest`` is in the store, downloading it from ``url`` if needed.

        ``size`` is the pinned length; without one the download is capped at ``max_download``.
        """
        if self.store.has(digest):
            return FetchResult(digest, self.store.size(digest), 0, None, True)
        errors: list[str] = []
        status: int | None = None
        with self.store.ingest(digest, what) as ing:
            if ing.done:  # another build finished it while we waited for the lock
                return FetchResult(digest, self.store.size(digest), 0, None, True)
            limit = Limit(size, self.options.max_download)
            for cand in candidates(url, self.mirrors):
                try:
                    transferred = self._download(cand, ing, progress, limit)
                except TooLarge as exc:
                    ing.discard()  # bytes past the pin are never kept, not even for a resume
                    raise FetchError(f"{what} from {cand}: {exc}", limit.hint) from None
                except _GiveUp as exc:
                    errors.append(f"{cand}: {exc}")
                    status = exc.status
                    continue
                except DigestMismatch as exc:
                    raise DigestMismatch(f"{what} from {cand}", exc.expected, exc.actual,
                                         "the pin or the mirror is wrong; nothing was stored") from None
                return FetchResult(digest, ing.offset, transferred, cand, False)
        message = f"{what}: could not download {url}:\n    " + "\n    ".join(errors)
        hint = ("check the URL, the mirror configuration (--mirrors / BUILDER_MIRRORS) and the "
                "network; a rerun resumes what was already received")
        if status is not None:  # the last candidate answered with a status: callers may ask which
            raise HttpStatusError(status, url, message, hint)
        raise FetchError(message, hint)

    def _download(self, url: str, ing: Ingest, progress: Progress | None, limit: Limit) -> int:
        """Try ``url`` until the file is stored; resumes its own partial between attempts."""
        opts, policy = self.options, self.options.policy
        transferred = 0
        last = "no attempt"
        status: int | None = None
        for attempt in range(policy.attempts):
            pause: float | None = None  # None: go again at once (the server's range was off)
            resp = None
            try:
                resp = self.session.get(url, headers=self._range_headers(url, ing), stream=True,
                                        timeout=(opts.connect_timeout, opts.read_timeout))
                status = resp.status_code
                if status == 416:
                    ing.reset()  # our partial is longer than the file: start over
                    last = "HTTP 416 on resume"
                    continue
                if policy.retryable(status):
                    last = f"HTTP {status}"
                    pause = policy.delay(attempt, resp)
                    continue
                if status >= 400:
                    raise _GiveUp(f"HTTP {status} {resp.reason}", status)
                if not self._accept(resp, url, ing):
                    last = "server sent a range we did not ask for"
                    continue
                total = _total_size(resp, ing.offset)
                limit.check_announced(total)
                for chunk in resp.iter_content(CHUNK):
                    limit.check(ing.offset + len(chunk))
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
            except TRANSIENT as exc:
                ing.flush()
                status = None
                last = f"{type(exc).__name__}: {_short(exc)}"
                pause = policy.backoff_delay(attempt)
            finally:
                if resp is not None:
                    resp.close()
                if pause is not None and not policy.last(attempt):
                    self.sleep(pause)
        raise _GiveUp(f"gave up after {policy.attempts} attempts (last: {last})",
                      status if last.startswith("HTTP") else None)

    @staticmethod
    def _range_headers(url: str, ing: Ingest) -> dict[str, str]:
        """Ask for the rest of our partial, if it came from this URL (If-Range: the same file)."""
        headers = {"Accept-Encoding": "identity"}
        if ing.offset and ing.meta.get("url") == url:
            headers["Range"] = f"bytes={ing.offset}-"
            if ing.meta.get("validator"):
                headers["If-Range"] = ing.meta["validator"]
        elif ing.offset:
            ing.reset()  # bytes from another URL cannot be trusted to line up
        return headers

    @staticmethod
    def _accept(resp: requests.Response, url: str, ing: Ingest) -> bool:
        """Line the partial up with a 206 or 200 answer; False: a range we did not ask for."""
        if resp.status_code == 206:
            if not _range_starts_at(resp, ing.offset):
                ing.reset()
                return False
            return True
        if ing.offset:  # 200: full body, whatever we asked for
            ing.reset()
        validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
        if validator and validator.startswith("W/"):
            validator = None  # weak validators are not allowed in If-Range
        ing.set_meta(url=url, validator=validator)
        return True


class _GiveUp(Exception):
    """One candidate URL failed for good; ``status`` is the HTTP status that decided it, if any."""

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.status = status


class Readable(Protocol):
    """Anything with ``read(n)``: a file, or urllib3's raw response."""

    def read(self, n: int = -1, /) -> bytes: ...


class TooLarge(Exception):
    """More bytes than the pin (or the cap) allows; the caller names the entry."""


@dataclass(frozen=True)
class Limit:
    """The most bytes one file may have: its pinned ``size``, else the configured maximum."""

    pinned: int | None
    maximum: int

    @property
    def bytes(self) -> int:
        return self.pinned if self.pinned is not None else self.maximum

    @property
    def expected(self) -> str:
        if self.pinned is not None:
            return f"the pinned size of {self.pinned} bytes"
        return f"the {self.maximum}-byte maximum for a file without a pinned size ({ENV_MAX_DOWNLOAD})"

    @property
    def hint(self) -> str:
        if self.pinned is not None:
            return ("the source serves another file than the lock pins: check the URL and the "
                    "mirror, or re-pin with `python -m builder lock --refresh`; nothing was stored")
        return (f"pin the size with `python -m builder lock --refresh`, or raise {ENV_MAX_DOWNLOAD} "
                "if the file really is that large; nothing was stored")

    def check_announced(self, total: int | None) -> None:
        if total is not None and total > self.bytes:
            raise TooLarge(f"expected at most {self.expected}, the server announced {total} bytes")

    def check(self, received: int) -> None:
        if received > self.bytes:
            raise TooLarge(f"expected at most {self.expected}, got at least {received} bytes "
                           "(the download was stopped there)")

    def wrap(self, stream: Readable) -> BinaryIO:
        """A reader that raises TooLarge once ``stream`` yields more than the limit."""
        return _Bounded(stream, self)  # type: ignore[return-value]


class _Bounded:
    def __init__(self, stream: Readable, limit: Limit):
        self.stream, self.limit, self.received = stream, limit, 0

    def read(self, n: int = -1) -> bytes:
        chunk = self.stream.read(n)
        self.received += len(chunk)
        self.limit.check(self.received)
        return chunk


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
    return network_reason(exc)  # the cause (`Connection refused`), not 200 chars of urllib3 text
