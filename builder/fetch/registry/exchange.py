"""The registry's side of auth: learning a challenge, fetching and caching tokens, and saying what
was refused. Where credentials come from (and how secrets stay out of sight) is
``builder.fetch.auth``; this module is the exchange with one registry.

``Bearer`` challenges get a token from the realm with scope ``repository:NAME:pull`` (or
``pull,push``), anonymously or with the host's credentials; tokens are cached per registry
host/realm/service/scope until they expire (a token is never handed to another registry, whatever
realm its challenge names). ``Basic`` challenges get the credentials. A 401 gets one fresh token
(or the first one), then an ``AuthError`` that names registry, repository and what was refused.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

import requests

from builder.errors import FetchError
from builder.fetch.auth import (
    AuthError,
    Challenge,
    Credentials,
    Keychain,
    Token,
    TokenCache,
    TokenKey,
    env_key,
    parse_challenge,
    token_from_response,
)
from builder.fetch.mirrors import HOST_MIRRORS_HINT
from builder.fetch.registry.endpoints import Endpoint, Scope, is_insecure
from builder.fetch.transport import RetryPolicy, send


@dataclass
class AuthExchange:
    """Challenges and tokens of one client (thread-safe: workers share them)."""

    keychain: Keychain
    insecure: tuple[str, ...]  # hosts whose token realm may be plain HTTP
    tokens: TokenCache = field(default_factory=TokenCache)
    challenges: dict[str, Challenge] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def credentials(self, ep: Endpoint) -> Credentials | None:
        return self.keychain.lookup(ep.auth_host)

    def learn(self, ep: Endpoint, challenge: Challenge) -> None:
        with self.lock:
            self.challenges[ep.netloc] = challenge

    def header(self, session: requests.Session, policy: RetryPolicy, timeout: tuple[float, float],
               ep: Endpoint, scope: Scope | None) -> str | None:
        """The Authorization value for a request to ``ep``, once its challenge is known."""
        with self.lock:
            challenge = self.challenges.get(ep.netloc)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self.credentials(ep)
            return creds.basic_header() if creds else None
        if challenge.scheme == "bearer":
            token = self.tokens.get(self.token_key(ep, challenge, scope))
            if token is None:
                token = self._fetch_token(session, policy, timeout, ep, challenge, scope)
            return f"Bearer {token.value}"
        return None

    def unauthorized(self, ep: Endpoint, scope: Scope | None, resp: requests.Response,
                     refreshed: bool) -> None:
        """After a 401: learn the scheme and drop a stale token (the caller tries once more), or
        raise the ``AuthError`` that says what was refused."""
        challenge = parse_challenge(resp.headers.get("WWW-Authenticate"))
        if refreshed or challenge is None or challenge.scheme not in ("basic", "bearer") or (
                challenge.scheme == "basic" and self.credentials(ep) is None):
            raise self.refused(ep, scope, resp)
        self.learn(ep, challenge)
        self.tokens.drop(self.token_key(ep, challenge, scope))

    @staticmethod
    def token_key(ep: Endpoint, challenge: Challenge, scope: Scope | None) -> TokenKey:
        """The registry we talk to is part of the key: the realm is only what its challenge says."""
        return (ep.netloc, challenge.realm, challenge.service or "", str(scope) if scope else "")

    def _fetch_token(self, session: requests.Session, policy: RetryPolicy,
                     timeout: tuple[float, float], ep: Endpoint, challenge: Challenge,
                     scope: Scope | None) -> Token:
        where = where_of(ep, scope)
        realm = challenge.realm
        if not realm.startswith(("https://", "http://")):
            raise AuthError(f"{where}: bearer challenge without a usable realm ({realm!r})")
        creds = self.credentials(ep)
        if creds and realm.startswith("http://") and not is_insecure(urlsplit(realm).netloc,
                                                                       self.insecure):
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
        try:
            resp = send(policy, "GET", realm,
                        lambda: session.get(url, headers=headers, timeout=timeout))
        except FetchError as exc:  # unreachable or failing after every retry
            reason = exc.message.removeprefix(f"GET {realm}: ")
            raise AuthError(f"{where}: token service {realm} unreachable: {reason}") from None
        with resp:
            if resp.status_code in (401, 403):
                who = f"user {creds.username!r}" if creds else "anonymous access"
                raise AuthError(f"{where}: token service {realm} refused {who} "
                                f"(HTTP {resp.status_code})", self.hint(ep, creds))
            if resp.status_code != 200:
                raise AuthError(f"{where}: token service {realm} answered HTTP {resp.status_code}")
            try:
                token = token_from_response(resp.json())
            except ValueError:
                token = None
        if token is None:
            raise AuthError(f"{where}: token service {realm} sent no token")
        self.tokens.put(self.token_key(ep, challenge, scope), token)
        return token

    def hint(self, ep: Endpoint, creds: Credentials | None) -> str:
        name = env_key(ep.auth_host)  # None: a host the variable naming cannot express
        if creds:
            where = f"{name} or ~/.docker/config.json" if name else "~/.docker/config.json"
            return f"check the password for {creds.username!r} on {ep.auth_host} ({where})"
        how = f"set {name}=USER:PASSWORD or `docker login`" if name else "`docker login`"
        return f"this registry needs credentials: {how} (see builder/fetch/auth.py)"

    def refused(self, ep: Endpoint, scope: Scope | None, resp: requests.Response) -> AuthError:
        challenge = parse_challenge(resp.headers.get("WWW-Authenticate"))
        creds = self.credentials(ep)
        where = where_of(ep, scope)
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
                             f"({actions})", self.hint(ep, creds))
        return AuthError(f"{where}: anonymous {actions} refused", self.hint(ep, None))


def where_of(ep: Endpoint, scope: Scope | None) -> str:
    via = f" via {ep.netloc}" if ep.mirror else ""
    repo = f" repository {scope.repository}" if scope else ""
    return f"registry {ep.host}{via}{repo}"
