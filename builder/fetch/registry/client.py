"""The registry client's plumbing: options, a session per thread, and one request with auth,
retries and timeouts (pull and push build on it).

Resilience. Every request has connect and read timeouts. Connection errors, timeouts, 5xx and
429 are retried by the one ``transport.RetryPolicy``; a ``Retry-After`` pauses every worker
talking to that endpoint, not only the one that was told. TLS is verified by default;
``ClientOptions.ca_file`` (or ``BUILDER_REGISTRY_CA_FILE``) names a PEM bundle to trust instead.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import requests

from builder.errors import FetchError, HttpStatusError, network_reason
from builder.fetch.auth import Keychain, parse_challenge
from builder.fetch.mirrors import HOST_MIRRORS_HINT, MirrorConfig
from builder.fetch.registry.endpoints import (
    Endpoint,
    Scope,
    endpoints_for,
    over_endpoints,
    upstream,
)
from builder.fetch.registry.exchange import AuthExchange
from builder.fetch.transport import RetryPolicy, new_session, send, ssl_reason

log = logging.getLogger(__name__)

ENV_CA_FILE = "BUILDER_REGISTRY_CA_FILE"


class Readable(Protocol):
    """A body requests streams: a file, io.BytesIO, an archive member being read."""

    def read(self, n: int = -1, /) -> bytes: ...


Body = Callable[[], bytes | Readable | None]


@dataclass(frozen=True)
class ClientOptions:
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    policy: RetryPolicy = field(default_factory=RetryPolicy)  # its attempts are per endpoint and request
    ca_file: Path | None = None  # PEM bundle to trust instead of the system's
    pool_size: int = 8  # connections kept per host (>= the number of pull workers)
    upload_chunk: int | None = None  # None: monolithic upload; else PATCH chunks of this size

    @property
    def timeout(self) -> tuple[float, float]:
        return (self.connect_timeout, self.read_timeout)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientOptions:
        """Defaults, plus ``BUILDER_REGISTRY_CA_FILE`` (a PEM bundle trusted instead of the system's)."""
        env = os.environ if env is None else env
        ca = env.get(ENV_CA_FILE)
        return cls(ca_file=Path(ca) if ca else None)


# OpenSSL's reason when the other side answers a TLS hello in plain HTTP (1.1/3.0, 3.2+).
_PLAIN_HTTP_ANSWER = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE"})


def tls_error(method: str, url: str, exc: BaseException) -> FetchError:
    """A TLS failure, telling a plain-HTTP registry (a mirrors-file setting) from a bad certificate."""
    netloc = urlsplit(url).netloc
    if ssl_reason(exc) in _PLAIN_HTTP_ANSWER:
        return FetchError(f"{method} {url}: {netloc} answered in plain HTTP, not TLS",
                          f"if {netloc} is meant to be reached without TLS: {HOST_MIRRORS_HINT} "
                          f"(e.g. `insecure: [{netloc}]`)")
    return FetchError(f"{method} {url}: TLS verification failed: {network_reason(exc)}",
                      f"trust the registry's CA with {ENV_CA_FILE}=FILE.pem (PEM), or fix its "
                      "certificate")


@dataclass(frozen=True)
class _NoMirrors:
    """No mirrors: every host is its own upstream, over HTTPS."""

    files: tuple = ()
    registries: tuple = ()
    insecure: tuple[str, ...] = ()


_NO_MIRRORS: MirrorConfig = _NoMirrors()


@dataclass
class ClientCore:
    """Talks to registries for one build; thread-safe (a session per thread, shared token cache)."""

    mirrors: MirrorConfig = field(default_factory=lambda: _NO_MIRRORS)
    keychain: Keychain = field(default_factory=Keychain)
    options: ClientOptions = field(default_factory=ClientOptions)
    _auth: AuthExchange = field(init=False, repr=False)
    _paused: dict[str, float] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def __post_init__(self) -> None:
        self._auth = AuthExchange(self.keychain, self.mirrors.insecure)

    def __repr__(self) -> str:
        return f"RegistryClient(mirrors={len(self.mirrors.registries)}, options={self.options!r})"

    @property
    def session(self) -> requests.Session:
        sess = getattr(self._local, "session", None)
        if sess is None:
            ca = self.options.ca_file
            sess = new_session(pool_size=self.options.pool_size, verify=str(ca) if ca else True)
            self._local.session = sess
        return sess

    def close(self) -> None:
        sess = getattr(self._local, "session", None)
        if sess is not None:
            sess.close()
            self._local.session = None

    def endpoints(self, host: str) -> list[Endpoint]:
        return endpoints_for(host, self.mirrors)

    def direct(self, host: str) -> Endpoint:
        """The registry itself, no mirrors (pushes go where the reference says)."""
        return upstream(host, self.mirrors.insecure)

    def check_credentials(self, hosts: Iterable[str]) -> None:
        """Before the first request of a build: refuse a credentials variable that could belong
        to more than one of the hosts it talks to (``Keychain.check_hosts``), mirrors included."""
        hosts = list(hosts)
        self.keychain.check_hosts([*hosts, *(ep.auth_host for h in hosts for ep in self.endpoints(h))])

    def _wait_pause(self, ep: Endpoint) -> None:
        with self._lock:
            until = self._paused.get(ep.netloc, 0.0)
        if (left := until - time.monotonic()) > 0:
            time.sleep(left)

    def _pause(self, ep: Endpoint, seconds: float) -> None:
        with self._lock:
            self._paused[ep.netloc] = max(self._paused.get(ep.netloc, 0.0), time.monotonic() + seconds)

    def request(self, ep: Endpoint, method: str, url: str, scope: Scope | None, *,
                headers: dict[str, str] | None = None, body: Body | None = None,
                stream: bool = False) -> requests.Response:
        """Send with auth, retries and timeouts; returns any non-401 final response.

        ``body`` is a callable so a retry can re-open the data (a file object is consumed).
        """
        refreshed = False
        while True:
            try:
                resp = send(self.options.policy, method, url,
                            lambda: self._once(ep, method, url, scope, headers, body, stream),
                            wait=lambda seconds: self._pause(ep, seconds),
                            hint="check that the registry or mirror is reachable",
                            status_hint="the registry is overloaded or failing; try again later")
            except requests.exceptions.SSLError as exc:
                # Not transient: retrying a certificate problem only delays the message.
                raise tls_error(method, url, exc) from None
            if resp.status_code != 401:
                return resp
            with resp:
                self._auth.unauthorized(ep, scope, resp, refreshed)  # raises once refreshed
            refreshed = True

    def _once(self, ep: Endpoint, method: str, url: str, scope: Scope | None,
              headers: dict[str, str] | None, body: Body | None, stream: bool) -> requests.Response:
        self._wait_pause(ep)  # a Retry-After told to any worker holds every one
        hdrs = dict(headers or {})
        auth = self._auth.header(self.session, self.options.policy, self.options.timeout, ep, scope)
        if auth:
            hdrs["Authorization"] = auth
        data = body() if body else None
        try:
            resp = self.session.request(method, url, headers=hdrs, data=data, stream=stream,
                                        timeout=self.options.timeout, allow_redirects=True)
        finally:
            if hasattr(data, "close"):
                data.close()  # type: ignore[union-attr]
        log.debug("%s %s -> %s", method, url, resp.status_code)
        return resp

    def ping(self, host: str) -> Endpoint:
        """GET /v2/ on the first endpoint that answers like a registry (200 or 401)."""
        def one(ep: Endpoint) -> Endpoint:
            try:
                resp = self.session.get(ep.url(""), timeout=self.options.timeout)
            except requests.RequestException as exc:
                raise FetchError(f"{ep.base}: {network_reason(exc)}") from None
            with resp:
                if resp.status_code not in (200, 401):
                    raise HttpStatusError(resp.status_code, ep.url(""), f"{ep.base}/v2/: HTTP "
                                          f"{resp.status_code}, not a registry API")
                challenge = parse_challenge(resp.headers.get("WWW-Authenticate"))
                if resp.status_code == 401 and challenge:
                    self._auth.learn(ep, challenge)
            return ep

        return over_endpoints(self.endpoints(host), f"ping {host}", one)

