"""The one HTTP transport of the builder: a session factory and one retry policy.

Every client that talks HTTP (pinned files, registries, their token services, GitHub, pull-release)
gets its ``requests.Session`` from ``new_session`` and decides "again, and after how long?" with
one ``RetryPolicy``. Transient means: a connection error, a timeout, a body cut short, or one of
``RETRY_STATUS`` (408, 429, 5xx that a retry can cure). ``Retry-After`` (seconds or an HTTP date)
is honoured up to ``max_retry_after``; otherwise the delay doubles from ``backoff`` up to
``max_backoff`` with up to a quarter added at random, so parallel workers do not retry in step.

Why not urllib3's ``Retry`` mounted in the adapter: it replays the *same* request, while the
callers change it between attempts (``Range`` to resume a partial, a fresh bearer token after a
401, a re-opened upload body), a body cut half way is a read error urllib3 never retries, and a
registry's ``Retry-After`` pauses every worker on that endpoint, not only the one told. So the
adapter does no retries (``max_retries=0``) and the callers loop with this policy.
"""

from __future__ import annotations

import email.utils
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter

from builder.errors import FetchError, HttpStatusError, network_reason

USER_AGENT = "airgap-builder"
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Failures a second try can cure (an SSLError is a ConnectionError too, but never transient:
# ``send`` lets it through at once; retrying a certificate problem only delays the message).
TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)

Sleep = Callable[[float], None]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one request is tried (shared by every HTTP client)."""

    attempts: int = 5  # tries per request (and per candidate URL / endpoint), the first included
    backoff: float = 0.5  # the first delay; doubles with each retry
    max_backoff: float = 30.0
    max_retry_after: float = 120.0  # never sleep longer than this for a server's Retry-After
    statuses: frozenset[int] = RETRY_STATUS

    def retryable(self, status: int) -> bool:
        return status in self.statuses

    def last(self, attempt: int) -> bool:
        """Whether try number ``attempt`` (0-based) is the last one allowed."""
        return attempt + 1 >= self.attempts

    def backoff_delay(self, retry: int) -> float:
        """The pause before retry number ``retry`` (0-based): exponential, capped, jittered upward
        (so the second pause is always longer than the first)."""
        base = min(self.backoff * (2 ** retry), self.max_backoff)
        return base + random.uniform(0, base / 4)

    def retry_after(self, resp: requests.Response | None) -> float | None:
        """The server's ``Retry-After`` in seconds (capped), or None when it sent none we can read."""
        value = ((resp.headers.get("Retry-After") if resp is not None else None) or "").strip()
        if not value:
            return None
        if value.isdigit():
            return min(float(value), self.max_retry_after)
        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            return None
        return min(max(0.0, when - time.time()), self.max_retry_after)

    def delay(self, retry: int, resp: requests.Response | None = None) -> float:
        """What to wait before retry ``retry``: the server's word if it gave one, else the back-off."""
        told = self.retry_after(resp)
        return told if told is not None else self.backoff_delay(retry)


def ssl_reason(exc: BaseException) -> str | None:
    """OpenSSL's reason code (``WRONG_VERSION_NUMBER``) for a TLS failure, from the ``ssl.SSLError``
    that requests and urllib3 wrap twice: the code, not the wording of any one OpenSSL version."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLError):
            return cause.reason
        nxt = cause.__cause__ or cause.__context__ or getattr(cause, "reason", None)
        cause = nxt if isinstance(nxt, BaseException) else None
    return None


def new_session(*, pool_size: int = 10, verify: bool | str = True,
                headers: Mapping[str, str] | None = None, adapter: HTTPAdapter | None = None,
                trust_env: bool = False) -> requests.Session:
    """A session as every client of the builder uses it: no retries hidden in the adapter (the
    caller's ``RetryPolicy`` decides), our User-Agent, TLS verified (``verify``: True or a PEM
    bundle to trust instead), and by default no ``~/.netrc`` credentials or proxies picked up
    behind our back (``trust_env=True`` only for pinned-file downloads, which always honoured
    the environment's proxy settings).

    ``requests`` drops ``Authorization`` when a redirect changes host, port or scheme; clients
    that hold a token add their own guard as ``adapter`` on top of that."""
    sess = requests.Session()
    adapter = adapter or HTTPAdapter(pool_maxsize=pool_size, max_retries=0)
    sess.mount("https://", adapter)
    sess.mount("http://", adapter)
    sess.trust_env = trust_env
    sess.verify = verify
    sess.headers["User-Agent"] = USER_AGENT
    sess.headers.update(headers or {})
    return sess


def send(policy: RetryPolicy, method: str, url: str, attempt_once: Callable[[], requests.Response],
         *, sleep: Sleep = time.sleep, wait: Callable[[float], None] | None = None,
         hint: str = "check that the server is reachable",
         status_hint: str = "the server is overloaded or failing; try again later",
         raise_status: bool = True) -> requests.Response:
    """``attempt_once()`` until it answers with a status the policy does not retry.

    Returns that response (any status: the caller knows which ones it expects). A transient
    failure on the last try raises ``FetchError`` (or ``HttpStatusError`` for a status) that names
    the method, the URL, the cause and the number of attempts. ``wait`` replaces ``sleep`` for a
    server's ``Retry-After`` (a registry pauses every worker on the endpoint). With
    ``raise_status=False`` the last retryable response is returned instead (the caller words the
    error from its body)."""
    for attempt in range(policy.attempts):
        try:
            resp = attempt_once()
        except requests.exceptions.SSLError:
            raise
        except TRANSIENT as exc:
            if policy.last(attempt):
                raise FetchError(f"{method} {url}: {network_reason(exc)} ({_after(attempt)})",
                                 hint) from None
            sleep(policy.backoff_delay(attempt))
            continue
        if not policy.retryable(resp.status_code):
            return resp
        if policy.last(attempt):
            if not raise_status:
                return resp
            resp.close()
            raise HttpStatusError(resp.status_code, url, f"{method} {url}: HTTP {resp.status_code} "
                                  f"({_after(attempt)})", status_hint)
        told = policy.retry_after(resp)
        resp.close()
        if told is not None:
            (wait or sleep)(told)
        else:
            sleep(policy.backoff_delay(attempt))
    raise AssertionError("unreachable: the loop returns or raises")  # attempts >= 1


def _after(attempt: int) -> str:
    return f"after {attempt + 1} attempt{'s' if attempt else ''}"
