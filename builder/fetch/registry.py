"""A small OCI distribution client on ``requests``: pull by digest into the store, and push.

Endpoints. A registry host from an image reference (``docker.io``, ``quay.io``, ``host:5000``)
maps, containerd style, to its mirror endpoints in order, then to the upstream as last resort
unless the mirror says ``fallback: false`` (an air-gapped build host has only its mirror). The
upstream API of most registries is the host itself; Docker Hub's follows the Docker convention of
an API host derived from the image host (``UPSTREAM_API``), so ``docker.io`` is the only literal.
A mirror endpoint is ``https://host[:port][/prefix]`` or a bare ``host[:port]`` (HTTPS);
``http://`` is accepted only for hosts listed under ``insecure:`` in the build host's mirrors
file (images.lock may not say it).

Verification. Manifests are read raw (size-capped) with the full Accept list and hashed before
anything parses them; a pinned digest that differs is refused with both digests. Blobs stream
into ``store.ingest`` (hash while writing, commit by rename only on a match); an interrupted
blob keeps its partial and the next attempt asks for the rest with ``Range``.

Resilience. Every request has connect and read timeouts. Connection errors, timeouts, 5xx and
429 are retried with exponential backoff and jitter; ``Retry-After`` is honoured and pauses every
worker talking to that endpoint, not only the one that was told. A 401 gets one fresh token (or
the first one), then an ``AuthError`` that names registry, repository and what was refused.

Auth. ``Bearer`` challenges get a token from the realm with scope ``repository:NAME:pull`` (or
``pull,push``), anonymously or with the host's credentials (see ``builder.fetch.auth``); tokens
are cached per registry host/realm/service/scope until they expire (a token is never handed to
another registry, whatever realm its challenge names). ``Basic`` challenges get the credentials.
TLS is verified by default; ``ClientOptions.ca_file`` (or ``BUILDER_REGISTRY_CA_FILE``) names a
PEM bundle to trust instead of the system's.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlencode, urljoin, urlsplit

import requests

from builder import digest as dg
from builder.errors import BuilderError, DigestMismatch, FetchError, network_reason
from builder.fetch.auth import (
    AuthError,
    Challenge,
    Credentials,
    Keychain,
    TokenCache,
    TokenKey,
    env_key,
    parse_challenge,
    token_from_response,
)
from builder.lock.lockfile import HOST_MIRRORS_HINT, Mirrors
from builder.oci import model as m
from builder.oci.reference import DEFAULT_HOST, Reference
from builder.store import Ingest, Store

log = logging.getLogger(__name__)

# Docker Hub serves its API from "registry-1." + its image host (the convention the docker CLI and
# containerd apply); every other registry serves it from its own host.
UPSTREAM_API = {DEFAULT_HOST: f"registry-1.{DEFAULT_HOST}"}
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_MANIFEST = 4 << 20  # distribution's own limit for a manifest
CHUNK = 1 << 20
USER_AGENT = "airgap-builder"
ENV_CA_FILE = "BUILDER_REGISTRY_CA_FILE"

OnBytes = Callable[[int], None]


@dataclass(frozen=True)
class ClientOptions:
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    attempts: int = 5  # per endpoint and request
    backoff: float = 0.5  # first delay; doubles each attempt, with jitter
    max_backoff: float = 30.0
    max_retry_after: float = 120.0
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


@dataclass(frozen=True)
class Endpoint:
    host: str  # the registry host of the references it serves (docker.io)
    base: str  # scheme://netloc[/prefix], without /v2
    mirror: bool

    @property
    def netloc(self) -> str:
        return urlsplit(self.base).netloc

    @property
    def auth_host(self) -> str:
        """Whose credentials to use: a mirror's own, or the registry host's for the upstream."""
        return self.netloc if self.mirror else self.host

    def url(self, path: str) -> str:
        return f"{self.base}/v2/{path}"


@dataclass(frozen=True)
class Scope:
    repository: str
    actions: tuple[str, ...] = ("pull",)

    def __str__(self) -> str:
        return f"repository:{self.repository}:{','.join(self.actions)}"


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


class NotFound(FetchError):
    """The endpoint answered 404 (try the next one)."""


class _Retry(Exception):
    """Internal: a transient failure; ``delay`` seconds before the next attempt."""

    def __init__(self, reason: str, delay: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


def _is_insecure(netloc: str, insecure: tuple[str, ...]) -> bool:
    hostname = netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc
    return netloc in insecure or hostname in insecure


def endpoint(host: str, spec: str, insecure: tuple[str, ...], mirror: bool = True) -> Endpoint:
    """One endpoint from a mirror spec (URL or bare host), refusing plain HTTP unless allowed."""
    if "://" not in spec:
        netloc = spec.split("/", 1)[0]
        spec = ("http://" if _is_insecure(netloc, insecure) else "https://") + spec
    parts = urlsplit(spec)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BuilderError(f"registry endpoint {spec!r} for {host} is not an http(s) URL")
    if parts.scheme == "http" and not _is_insecure(parts.netloc, insecure):
        raise BuilderError(f"registry endpoint {spec} for {host} is plain HTTP",
                           f"use https, or allow {parts.netloc}: {HOST_MIRRORS_HINT}")
    path = parts.path.rstrip("/")
    if path.endswith("/v2"):
        path = path[:-3]
    return Endpoint(host, f"{parts.scheme}://{parts.netloc}{path}", mirror)


def endpoints_for(host: str, mirrors: Mirrors) -> list[Endpoint]:
    """Mirror endpoints for ``host`` in order, then the upstream unless a mirror forbids it."""
    out: list[Endpoint] = []
    fallback = True
    for mirror in mirrors.registries:
        if mirror.host == host:
            out.extend(endpoint(host, ep, mirrors.insecure) for ep in mirror.endpoints)
            fallback = fallback and mirror.fallback
    if fallback or not out:
        out.append(endpoint(host, UPSTREAM_API.get(host, host), mirrors.insecure, mirror=False))
    return list(dict.fromkeys(out))


def _retry_after(resp: requests.Response, cap: float) -> float | None:
    value = (resp.headers.get("Retry-After") or "").strip()
    if value.isdigit():
        return min(float(value), cap)
    if value:
        import email.utils

        try:
            return min(max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time()), cap)
        except (TypeError, ValueError):
            return None
    return None


# What OpenSSL says when the other side answers a TLS hello in plain HTTP (1.1/3.0, 3.2+).
_PLAIN_HTTP_ANSWER = ("WRONG_VERSION_NUMBER", "wrong version number", "record layer failure",
                      "RECORD_LAYER_FAILURE")


def _tls_error(method: str, url: str, exc: BaseException) -> FetchError:
    """A TLS failure, telling a plain-HTTP registry (a mirrors-file setting) from a bad certificate."""
    text = _short(exc)
    netloc = urlsplit(url).netloc
    if any(s in str(exc) for s in _PLAIN_HTTP_ANSWER):
        return FetchError(f"{method} {url}: {netloc} answered in plain HTTP, not TLS",
                          f"if {netloc} is meant to be reached without TLS: {HOST_MIRRORS_HINT} "
                          f"(e.g. `insecure: [{netloc}]`)")
    return FetchError(f"{method} {url}: TLS verification failed: {text}",
                      f"trust the registry's CA with {ENV_CA_FILE}=FILE.pem (PEM), or fix its "
                      "certificate")


def _short(exc: BaseException) -> str:
    return network_reason(exc)  # the cause (`Connection refused`), not 200 chars of urllib3 text


@dataclass
class RegistryClient:
    """Talks to registries for one build; thread-safe (a session per thread, shared token cache)."""

    mirrors: Mirrors = field(default_factory=Mirrors)
    keychain: Keychain = field(default_factory=Keychain)
    options: ClientOptions = field(default_factory=ClientOptions)
    _tokens: TokenCache = field(default_factory=TokenCache, repr=False)
    _challenges: dict[str, Challenge] = field(default_factory=dict, repr=False)
    _paused: dict[str, float] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def __repr__(self) -> str:
        return f"RegistryClient(mirrors={len(self.mirrors.registries)}, options={self.options!r})"

    # -- plumbing ------------------------------------------------------------------------------
    @property
    def session(self) -> requests.Session:
        sess = getattr(self._local, "session", None)
        if sess is None:
            sess = requests.Session()
            adapter = requests.adapters.HTTPAdapter(pool_maxsize=self.options.pool_size)
            sess.mount("https://", adapter)
            sess.mount("http://", adapter)
            sess.headers["User-Agent"] = USER_AGENT
            sess.verify = str(self.options.ca_file) if self.options.ca_file else True
            sess.trust_env = False  # no ~/.netrc credentials or proxies picked up behind our back
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
        return endpoint(host, UPSTREAM_API.get(host, host), self.mirrors.insecure, mirror=False)

    def check_credentials(self, hosts: Iterable[str]) -> None:
        """Before the first request of a build: refuse a credentials variable that could belong
        to more than one of the hosts it talks to (``Keychain.check_hosts``), mirrors included."""
        hosts = list(hosts)
        self.keychain.check_hosts([*hosts, *(ep.auth_host for h in hosts for ep in self.endpoints(h))])

    def _delay(self, attempt: int) -> float:
        base = min(self.options.backoff * (2 ** attempt), self.options.max_backoff)
        return base * (0.5 + random.random() / 2)

    def _wait_pause(self, ep: Endpoint) -> None:
        with self._lock:
            until = self._paused.get(ep.netloc, 0.0)
        if (left := until - time.monotonic()) > 0:
            time.sleep(left)

    def _pause(self, ep: Endpoint, seconds: float) -> None:
        with self._lock:
            self._paused[ep.netloc] = max(self._paused.get(ep.netloc, 0.0), time.monotonic() + seconds)

    # -- authorisation -------------------------------------------------------------------------
    def _credentials(self, ep: Endpoint) -> Credentials | None:
        return self.keychain.lookup(ep.auth_host)

    def _auth_header(self, ep: Endpoint, scope: Scope | None) -> str | None:
        with self._lock:
            challenge = self._challenges.get(ep.netloc)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self._credentials(ep)
            return creds.basic_header() if creds else None
        if challenge.scheme == "bearer":
            token = self._tokens.get(self._token_key(ep, challenge, scope))
            if token is None:
                token = self._fetch_token(ep, challenge, scope)
            return f"Bearer {token.value}"
        return None

    @staticmethod
    def _token_key(ep: Endpoint, challenge: Challenge, scope: Scope | None) -> TokenKey:
        """The registry we talk to is part of the key: the realm is only what its challenge says."""
        return (ep.netloc, challenge.realm, challenge.service or "", str(scope) if scope else "")

    def _fetch_token(self, ep: Endpoint, challenge: Challenge, scope: Scope | None):
        where = self._where(ep, scope)
        realm = challenge.realm
        if not realm.startswith(("https://", "http://")):
            raise AuthError(f"{where}: bearer challenge without a usable realm ({realm!r})")
        creds = self._credentials(ep)
        if creds and realm.startswith("http://") and not _is_insecure(urlsplit(realm).netloc,
                                                                        self.mirrors.insecure):
            raise AuthError(f"{where}: token realm {realm} is plain HTTP; credentials not sent",
                            f"serve the token service over https, or allow {urlsplit(realm).netloc}: "
                            f"{HOST_MIRRORS_HINT}")
        params = {}
        if challenge.service:
            params["service"] = challenge.service
        if scope:
            params["scope"] = str(scope)
        headers = {"Authorization": creds.basic_header()} if creds else {}
        url = realm + ("&" if "?" in realm else "?") + urlencode(params)
        for attempt in range(self.options.attempts):
            try:
                resp = self.session.get(url, headers=headers, timeout=self.options.timeout)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt + 1 >= self.options.attempts:
                    raise AuthError(f"{where}: token service {realm} unreachable: {_short(exc)}") from None
                time.sleep(self._delay(attempt))
                continue
            with resp:
                if resp.status_code in (401, 403):
                    who = f"user {creds.username!r}" if creds else "anonymous access"
                    raise AuthError(f"{where}: token service {realm} refused {who} "
                                    f"(HTTP {resp.status_code})", self._auth_hint(ep, creds))
                if resp.status_code in RETRY_STATUS and attempt + 1 < self.options.attempts:
                    time.sleep(_retry_after(resp, self.options.max_retry_after) or self._delay(attempt))
                    continue
                if resp.status_code != 200:
                    raise AuthError(f"{where}: token service {realm} answered HTTP {resp.status_code}")
                try:
                    token = token_from_response(resp.json())
                except ValueError:
                    token = None
            if token is None:
                raise AuthError(f"{where}: token service {realm} sent no token")
            self._tokens.put(self._token_key(ep, challenge, scope), token)
            return token
        raise AuthError(f"{where}: token service {realm} kept failing")

    def _auth_hint(self, ep: Endpoint, creds: Credentials | None) -> str:
        name = env_key(ep.auth_host)  # None: a host the variable naming cannot express
        if creds:
            where = f"{name} or ~/.docker/config.json" if name else "~/.docker/config.json"
            return f"check the password for {creds.username!r} on {ep.auth_host} ({where})"
        how = f"set {name}=USER:PASSWORD or `docker login`" if name else "`docker login`"
        return f"this registry needs credentials: {how} (see builder/fetch/auth.py)"

    @staticmethod
    def _where(ep: Endpoint, scope: Scope | None) -> str:
        via = f" via {ep.netloc}" if ep.mirror else ""
        repo = f" repository {scope.repository}" if scope else ""
        return f"registry {ep.host}{via}{repo}"

    def _refused(self, ep: Endpoint, scope: Scope | None, resp: requests.Response) -> AuthError:
        challenge = parse_challenge(resp.headers.get("WWW-Authenticate"))
        creds = self._credentials(ep)
        where = self._where(ep, scope)
        actions = ",".join(scope.actions) if scope else "access"
        reason = challenge.error if challenge else None
        if reason == "insufficient_scope":
            who = f"user {creds.username!r}" if creds else "anonymous access"
            return AuthError(f"{where}: {who} has no {actions} access (insufficient_scope)",
                             "ask the registry admin for the permission, or check the repository name")
        if reason == "invalid_token":
            return AuthError(f"{where}: the registry rejected a fresh token (invalid_token: expired "
                             "or not signed by a key it trusts)",
                             "check the token service's clock and signing certificate")
        if creds:
            return AuthError(f"{where}: credentials for user {creds.username!r} were rejected "
                             f"({actions})", self._auth_hint(ep, creds))
        return AuthError(f"{where}: anonymous {actions} refused", self._auth_hint(ep, None))

    # -- one request ---------------------------------------------------------------------------
    def request(self, ep: Endpoint, method: str, url: str, scope: Scope | None, *,
                headers: dict[str, str] | None = None,
                body: Callable[[], bytes | BinaryIO | None] | None = None,
                stream: bool = False) -> requests.Response:
        """Send with auth, retries and timeouts; returns any non-401 final response.

        ``body`` is a callable so a retry can re-open the data (a file object is consumed).
        """
        refreshed = False
        attempt = 0
        while True:
            self._wait_pause(ep)
            hdrs = dict(headers or {})
            auth = self._auth_header(ep, scope)
            if auth:
                hdrs["Authorization"] = auth
            data = body() if body else None
            try:
                resp = self.session.request(method, url, headers=hdrs, data=data, stream=stream,
                                            timeout=self.options.timeout, allow_redirects=True)
            except requests.exceptions.SSLError as exc:
                # Not transient: retrying a certificate problem only delays the message.
                raise _tls_error(method, url, exc) from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                attempt += 1
                if attempt >= self.options.attempts:
                    raise FetchError(f"{method} {url}: {_short(exc)} (after {attempt} attempts)",
                                     "check that the registry or mirror is reachable") from None
                log.debug("retrying %s %s after %s", method, url, type(exc).__name__)
                time.sleep(self._delay(attempt - 1))
                continue
            finally:
                if hasattr(data, "close"):
                    data.close()  # type: ignore[union-attr]
            log.debug("%s %s -> %s", method, url, resp.status_code)
            if resp.status_code == 401:
                challenge = parse_challenge(resp.headers.get("WWW-Authenticate"))
                if refreshed or challenge is None or challenge.scheme not in ("basic", "bearer"):
                    err = self._refused(ep, scope, resp)
                    resp.close()
                    raise err
                if challenge.scheme == "basic" and self._credentials(ep) is None:
                    resp.close()
                    raise self._refused(ep, scope, resp)
                # Learn the scheme, drop a stale token, and try once more with a fresh one.
                with self._lock:
                    self._challenges[ep.netloc] = challenge
                self._tokens.drop(self._token_key(ep, challenge, scope))
                refreshed = True
                resp.close()
                continue
            if resp.status_code in RETRY_STATUS:
                attempt += 1
                wait = _retry_after(resp, self.options.max_retry_after)
                status = resp.status_code
                resp.close()
                if attempt >= self.options.attempts:
                    raise FetchError(f"{method} {url}: HTTP {status} (after {attempt} attempts)",
                                     "the registry is overloaded or failing; try again later")
                if wait is not None:
                    self._pause(ep, wait)  # every worker on this endpoint waits, not only this one
                else:
                    time.sleep(self._delay(attempt - 1))
                continue
            return resp

    # -- generic fallback over endpoints -------------------------------------------------------
    def _over_endpoints(self, eps: list[Endpoint], what: str, fn: Callable[[Endpoint], object]):
        errors: list[tuple[Endpoint, BuilderError]] = []
        for ep in eps:
            try:
                return fn(ep)
            except BuilderError as exc:
                log.debug("%s via %s failed: %s", what, ep.base, exc.message)
                errors.append((ep, exc))
        if len(errors) == 1:
            raise errors[0][1]
        # A digest mismatch or an auth refusal says more than "the next mirror was down too".
        for kind in (DigestMismatch, AuthError):
            for _, exc in errors:
                if isinstance(exc, kind):
                    raise exc
        tried = "\n    ".join(f"{ep.base}: {exc.message}" for ep, exc in errors)
        raise FetchError(f"{what}: every endpoint failed:\n    {tried}",
                         errors[-1][1].hint or "check mirrors and network")

    # -- API -----------------------------------------------------------------------------------
    def ping(self, host: str) -> Endpoint:
        """GET /v2/ on the first endpoint that answers like a registry (200 or 401)."""
        def one(ep: Endpoint) -> Endpoint:
            try:
                resp = self.session.get(ep.url(""), timeout=self.options.timeout)
            except requests.RequestException as exc:
                raise FetchError(f"{ep.base}: {_short(exc)}") from None
            with resp:
                if resp.status_code not in (200, 401):
                    raise FetchError(f"{ep.base}/v2/: HTTP {resp.status_code}, not a registry API")
                challenge = parse_challenge(resp.headers.get("WWW-Authenticate"))
                if resp.status_code == 401 and challenge:
                    with self._lock:
                        self._challenges[ep.netloc] = challenge
            return ep

        return self._over_endpoints(self.endpoints(host), f"ping {host}", one)

    def get_manifest(self, ref: Reference, digest: str | None = None) -> RawManifest:
        """The manifest or index at ``digest`` (verified before parsing) or at ``ref.tag``."""
        target = digest or ref.digest or ref.tag
        if not target:
            raise BuilderError(f"{ref}: neither a tag nor a digest to fetch")
        expected = target if dg.is_digest(target) else None
        shown = f"{ref.name}@{expected}" if expected else f"{ref.name}:{target}"

        def one(ep: Endpoint) -> RawManifest:
            scope = Scope(ref.repository)
            resp = self.request(ep, "GET", ep.url(f"{ref.repository}/manifests/{target}"), scope,
                                headers={"Accept": m.ACCEPT}, stream=True)
            with resp:
                if resp.status_code == 404:
                    raise NotFound(f"{shown}: not found at {ep.base}")
                if resp.status_code != 200:
                    raise FetchError(f"{shown}: HTTP {resp.status_code} from {ep.base}")
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

        return self._over_endpoints(self.endpoints(ref.host), f"manifest {shown}", one)

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

        return self._over_endpoints(self.endpoints(ref.host), f"{what} {desc.digest}", one)

    def _download(self, ep: Endpoint, ref: Reference, desc: m.Descriptor, ing: Ingest, what: str,
                  on_bytes: OnBytes | None) -> int:
        url = ep.url(f"{ref.repository}/blobs/{desc.digest}")
        received = 0
        for attempt in range(self.options.attempts):
            headers = {"Range": f"bytes={ing.offset}-"} if ing.offset else {}
            resp = self.request(ep, "GET", url, Scope(ref.repository), headers=headers, stream=True)
            try:
                with resp:
                    self._accept_blob_response(resp, ing, desc, url)
                    for chunk in resp.iter_content(CHUNK):
                        ing.write(chunk)
                        received += len(chunk)
                        if on_bytes:
                            on_bytes(len(chunk))
                        if ing.offset > desc.size:
                            break  # more than the descriptor says: commit() will refuse it
            except (requests.RequestException, OSError) as exc:
                ing.flush()  # keep what arrived: the next attempt (or run) resumes from here
                if attempt + 1 >= self.options.attempts:
                    raise FetchError(f"{what} {desc.digest} from {ep.base}: {_short(exc)} "
                                     f"({ing.offset} of {desc.size} bytes kept for resume)",
                                     "run the command again; it continues where it stopped") from None
                time.sleep(self._delay(attempt))
                continue
            if ing.offset < desc.size:
                ing.flush()
                if attempt + 1 >= self.options.attempts:
                    raise FetchError(f"{what} {desc.digest} from {ep.base}: stream ended at "
                                     f"{ing.offset} of {desc.size} bytes")
                continue
            ing.commit()  # raises DigestMismatch and discards the partial on bad bytes
            return received
        raise FetchError(f"{what} {desc.digest} from {ep.base}: gave up")

    @staticmethod
    def _accept_blob_response(resp: requests.Response, ing: Ingest, desc: m.Descriptor,
                              url: str) -> None:
        if resp.status_code == 404:
            raise NotFound(f"{url}: blob not found")
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
        raise FetchError(f"{url}: HTTP {resp.status_code}")

    # -- push ----------------------------------------------------------------------------------
    def blob_exists(self, ref: Reference, digest: str) -> bool:
        ep = self.direct(ref.host)
        resp = self.request(ep, "HEAD", ep.url(f"{ref.repository}/blobs/{digest}"),
                            Scope(ref.repository, ("pull", "push")))
        with resp:
            if resp.status_code == 200:
                return True
            if resp.status_code == 404:
                return False
            raise FetchError(f"HEAD {ref.name} blob {digest}: HTTP {resp.status_code}")

    def push_blob(self, ref: Reference, digest: str, size: int, opener: Callable[[], BinaryIO],
                  chunk_size: int | None = None) -> bool:
        """Upload a blob unless the registry has it; returns True when bytes were sent."""
        if self.blob_exists(ref, digest):
            return False
        ep = self.direct(ref.host)
        scope = Scope(ref.repository, ("pull", "push"))
        chunk_size = chunk_size if chunk_size is not None else self.options.upload_chunk
        location = self._start_upload(ep, ref, scope)
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
                raise FetchError(f"push {ref.name} blob {digest}: HTTP {final.status_code}: "
                                 f"{final.text[:300]}")
        return True

    def _start_upload(self, ep: Endpoint, ref: Reference, scope: Scope) -> str:
        resp = self.request(ep, "POST", ep.url(f"{ref.repository}/blobs/uploads/"), scope,
                            headers={"Content-Length": "0"})
        with resp:
            if resp.status_code != 202 or not resp.headers.get("Location"):
                raise FetchError(f"push {ref.name}: starting an upload gave HTTP {resp.status_code}")
            return urljoin(ep.base + "/", resp.headers["Location"])

    def _patch_chunks(self, ep: Endpoint, ref: Reference, scope: Scope, location: str,
                      opener: Callable[[], BinaryIO], chunk_size: int) -> str:
        offset = 0
        with opener() as src:
            while chunk := src.read(chunk_size):
                end = offset + len(chunk) - 1
                resp = self.request(ep, "PATCH", location, scope,
                                    headers={"Content-Type": "application/octet-stream",
                                             "Content-Range": f"{offset}-{end}",
                                             "Content-Length": str(len(chunk))},
                                    body=lambda c=chunk: c)
                with resp:
                    if resp.status_code != 202:
                        raise FetchError(f"push {ref.name}: chunk {offset}-{end} gave HTTP "
                                         f"{resp.status_code}")
                    location = urljoin(ep.base + "/", resp.headers.get("Location") or location)
                offset = end + 1
        return location

    def push_manifest(self, ref: Reference, target: str, raw: bytes, media_type: str) -> str:
        """PUT a manifest under a tag or its digest; returns its digest (checked against the echo)."""
        ep = self.direct(ref.host)
        digest = dg.of_bytes(raw)
        resp = self.request(ep, "PUT", ep.url(f"{ref.repository}/manifests/{target}"),
                            Scope(ref.repository, ("pull", "push")),
                            headers={"Content-Type": media_type}, body=lambda: raw)
        with resp:
            if resp.status_code != 201:
                raise FetchError(f"push {ref.name} manifest {target}: HTTP {resp.status_code}: "
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
        self.push_blob(ref, desc.digest, store.size(desc.digest),
                       lambda: store.open(desc.digest), chunk_size)


def _children(store: Store, desc: m.Descriptor) -> list[m.Descriptor]:
    doc = m.parse_document(store.read_bytes(desc.digest), f"store {desc.digest}", desc.media_type)
    if isinstance(doc, m.Index):
        return list(doc.manifests)
    return [doc.config, *doc.layers]


def _with_digest(location: str, digest: str) -> str:
    return location + ("&" if "?" in location else "?") + urlencode({"digest": digest})


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
        raise FetchError(f"{resp.url}: connection lost while reading: {_short(exc)}") from None
