"""Registry credentials and the challenge/token dance, with secrets kept out of sight.

Where credentials come from, first match wins, per registry host (``host[:port]`` as written in
image references and mirror endpoints):

1. Environment: ``BUILDER_REGISTRY_AUTH_<KEY>="username:password"``. ``<KEY>`` is the host
   upper-cased with ``.`` written ``_``, each ``-`` written ``__`` and the port's ``:`` written
   ``___``: ``BUILDER_REGISTRY_AUTH_DOCKER_IO`` for Docker Hub, ``…_REG_CORP_EXAMPLE`` for
   ``reg.corp.example``, ``…_REG__CORP_EXAMPLE`` for ``reg-corp.example``,
   ``…_MIRROR_EXAMPLE_COM___5000`` for ``mirror.example.com:5000``. Labels start and end with a
   letter or digit, so a run of underscores reads back one way only (1 = ``.``, 3 = ``:``, 2n = n
   hyphens): two hosts never share a variable. A host outside ``hostname[:port]`` (an IPv6
   literal, an ``_`` in a name) has no variable; give it credentials in Docker's config file. The
   password is everything after the first ``:`` (it may contain colons); an empty value gives no
   credentials from the environment for that host (and silences the old-name check below). One
   variable per host keeps a CI secret a single value and makes its host obvious.

   The old naming wrote every non-alphanumeric character as ``_``, so ``reg-corp.example`` and
   ``reg.corp.example`` shared ``…_REG_CORP_EXAMPLE``. Such a variable now names the dotted host
   only; a host whose old name is set but whose own (new) name is not is refused, not guessed, and
   ``Keychain.check_hosts`` does that for every host of a build before the first request, so a
   look-alike host met first cannot receive another host's old-style secret.
2. Docker's config file, ``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``):
   ``credHelpers[host]`` (a ``docker-credential-NAME`` program), then ``auths[host]`` (base64
   ``auth`` = ``user:password``, or ``username``/``password``), then ``credsStore`` (a helper for
   every host). Keys of ``auths`` may be written as URLs (``https://host/v1/``); Docker Hub's
   historical key (the ``index.`` host) counts for ``docker.io``.

Credentials are sent only where the registry asks for them (a ``Basic`` challenge, or the token
realm named by a ``Bearer`` challenge) and never over plain HTTP unless that host is listed as
insecure. They never appear in logs, exception messages or reprs: ``Credentials`` hides the secret
in its repr and errors name only the registry, the repository and the user name. A bearer token
is cached per (registry host, realm, service, scope): a registry whose challenge names another
registry's realm gets a token of its own from that realm (asked with its own credentials, if
any), never the token issued while talking to the other registry.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from builder.errors import BuilderError
from builder.oci.reference import DEFAULT_HOST

ENV_PREFIX = "BUILDER_REGISTRY_AUTH_"
HELPER_TIMEOUT = 30.0
# Docker Hub's key in config.json is its old index host; derived, not a second literal host.
_DOCKER_HUB_KEYS = (DEFAULT_HOST, f"index.{DEFAULT_HOST}")


class AuthError(BuilderError):
    """A registry refused our credentials or token (or we have none and it wants some)."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:  # the dataclass repr already hides it; be explicit for subclasses
        return f"Credentials(username={self.username!r}, password=<hidden>)"

    def basic_header(self) -> str:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return f"Basic {token}"


# RFC 1123 labels (letter or digit at both ends) and an optional numeric port: the hosts the
# variable naming covers, and the reason it can be read back without ambiguity.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_ENV_HOST = re.compile(rf"{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?")
_ENV_SEP = {".": "_", "-": "__", ":": "___"}
_ENV_RUN = {1: ".", 3: ":"}  # every other run length is even: that many halves of hyphens


def env_key(host: str) -> str | None:
    """The environment variable that holds credentials for ``host`` (None: it cannot have one)."""
    if not _ENV_HOST.fullmatch(host):
        return None
    return ENV_PREFIX + re.sub(r"[.:-]", lambda m: _ENV_SEP[m.group()], host.upper())


def host_of_env_key(name: str) -> str | None:
    """The host (lower case) a ``BUILDER_REGISTRY_AUTH_…`` name belongs to: ``env_key`` read back."""
    if not name.startswith(ENV_PREFIX):
        return None
    parts = re.split(r"(_+)", name[len(ENV_PREFIX):])
    out = []
    for part in parts:
        if not part.startswith("_"):
            out.append(part.lower())
        elif len(part) in _ENV_RUN:
            out.append(_ENV_RUN[len(part)])
        elif len(part) % 2 == 0:
            out.append("-" * (len(part) // 2))
        else:
            return None
    host = "".join(out)
    return host if env_key(host) == name else None


def legacy_env_key(host: str) -> str:
    """The old, ambiguous naming (every non-alphanumeric character ``_``): only to refuse it."""
    return ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", host.upper())


def _host_of_key(key: str) -> str:
    """``https://host:5000/v1/`` or ``host:5000`` → ``host:5000``."""
    if "://" in key:
        return urlsplit(key).netloc
    return key.split("/", 1)[0]


def _aliases(host: str) -> tuple[str, ...]:
    return _DOCKER_HUB_KEYS if host in _DOCKER_HUB_KEYS else (host,)


@dataclass
class Keychain:
    """Looks credentials up for a host; ``env`` and ``config_dir`` are injectable for tests."""

    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ), repr=False)
    config_dir: Path | None = None
    helper_timeout: float = HELPER_TIMEOUT
    _cache: dict[str, Credentials | None] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __repr__(self) -> str:
        return f"Keychain(config_dir={self.config_path.parent!s})"

    @property
    def config_path(self) -> Path:
        if self.config_dir is not None:
            return Path(self.config_dir) / "config.json"
        base = self.env.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
        return Path(base) / "config.json"

    def lookup(self, host: str) -> Credentials | None:
        with self._lock:
            if host not in self._cache:
                self._cache[host] = self._from_env(host) or self._from_docker_config(host)
            return self._cache[host]

    def check_hosts(self, hosts: Iterable[str]) -> None:
        """Refuse, before any request, an old-style variable that could belong to one of ``hosts``."""
        for host in dict.fromkeys(hosts):
            for alias in _aliases(host):
                self._refuse_legacy(alias)

    # -- environment ---------------------------------------------------------------------------
    def _from_env(self, host: str) -> Credentials | None:
        found = {name: self.env[name] for alias in _aliases(host)
                 if (name := env_key(alias)) is not None and name in self.env}
        if len(set(found.values())) > 1:
            raise AuthError(f"{' and '.join(sorted(found))} both hold credentials for {host}",
                            "keep one of them")
        if not found:
            for alias in _aliases(host):
                self._refuse_legacy(alias)
            return None
        name, value = next(iter(found.items()))
        if value == "":
            return None  # none from the environment, on purpose (silences the old-name check)
        user, sep, password = value.partition(":")
        if not sep or not user:
            raise AuthError(f"{name} is not of the form username:password",
                            "set it to USER:PASSWORD (the password may contain ':')")
        return Credentials(user, password)

    def _refuse_legacy(self, host: str) -> None:
        """An old-style variable that may have been meant for ``host`` but now names another."""
        legacy, own = legacy_env_key(host), env_key(host)
        if legacy == own or legacy not in self.env or (own is not None and own in self.env):
            return
        owner = host_of_env_key(legacy)  # never None when ``own`` is not: dots read back as dots
        if own:
            fix = (f"if it is for {host}, rename it to {own}; if it is for {owner}, also set "
                   f"{own}= (empty: no credentials for {host} from the environment)")
        else:
            fix = (f"{host} cannot have a variable (not hostname[:port]): move its credentials to "
                   "~/.docker/config.json"
                   + (f", and {owner}'s there too if {legacy} is for {owner}" if owner else "")
                   + f"; then unset {legacy}")
        raise AuthError(f"{legacy} is set: under the old naming it could hold credentials for {host}, "
                        f"but it now names {owner or 'no host'}; refusing to guess whose secret it is",
                        fix)

    # -- docker config.json --------------------------------------------------------------------
    def _load_config(self) -> dict:
        path = self.config_path
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise AuthError(f"{path}: cannot read Docker config: {exc}",
                            "fix or remove the file, or use BUILDER_REGISTRY_AUTH_<HOST> (see builder/fetch/auth.py)") from None
        return data if isinstance(data, dict) else {}

    def _from_docker_config(self, host: str) -> Credentials | None:
        config = self._load_config()
        if not config:
            return None
        aliases = _aliases(host)
        helpers = config.get("credHelpers") or {}
        for alias in aliases:
            if alias in helpers:
                return self._from_helper(helpers[alias], alias)
        auths = {_host_of_key(k): v for k, v in (config.get("auths") or {}).items()}
        for alias in aliases:
            entry = auths.get(alias)
            creds = self._from_auth_entry(entry, alias) if isinstance(entry, dict) else None
            if creds:
                return creds
        if config.get("credsStore"):
            # docker login stores Docker Hub under its historical URL; ask the helper the same way.
            key = f"https://{_DOCKER_HUB_KEYS[1]}/v1/" if host == DEFAULT_HOST else host
            return self._from_helper(config["credsStore"], key)
        return None

    def _from_auth_entry(self, entry: dict, host: str) -> Credentials | None:
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise AuthError(f"{self.config_path}: auths.{host}.auth is not base64 of user:password",
                                "run `docker login` again or fix the entry") from None
            user, sep, password = decoded.partition(":")
            if sep and user:
                return Credentials(user, password)
        if entry.get("username") and entry.get("password") is not None:
            return Credentials(entry["username"], entry["password"])
        return None

    def _from_helper(self, name: str, host: str) -> Credentials | None:
        program = f"docker-credential-{name}"
        exe = shutil.which(program, path=self.env.get("PATH"))
        if exe is None:
            raise AuthError(f"{self.config_path} names credential helper {program}, which is not on PATH",
                            f"install {program} or remove it from the Docker config")
        try:
            done = subprocess.run([exe, "get"], input=host.encode(), capture_output=True,
                                  timeout=self.helper_timeout, env=dict(self.env), check=False)
        except subprocess.TimeoutExpired:
            raise AuthError(f"{program} get {host}: no answer in {self.helper_timeout:.0f}s") from None
        out = done.stdout.decode(errors="replace").strip()
        if done.returncode != 0:
            # The helper protocol's "not found" is a normal miss: anonymous access may still work.
            if "credentials not found" in out.lower():
                return None
            # Only the first line of stderr, and never stdout (it could hold a secret).
            reason = done.stderr.decode(errors="replace").strip().splitlines()[:1]
            raise AuthError(f"{program} get {host} failed (exit {done.returncode})"
                            + (f": {reason[0][:200]}" if reason else ""))
        try:
            data = json.loads(out)
            user, secret = data["Username"], data["Secret"]
        except (ValueError, KeyError, TypeError):
            raise AuthError(f"{program} get {host}: answer is not the helper protocol's JSON") from None
        if not user and not secret:
            # docker-credential-pass 0.6 answers a miss with exit 0 and empty fields: a miss, and
            # never a Basic ":" sent as if it were a login.
            return None
        if user == "<token>":
            raise AuthError(f"{program} get {host}: returned an identity token, which this builder "
                            "does not support", "use a username and password or access token")
        return Credentials(user, secret)


# ---------------------------------------------------------------------------------------------
# Challenges and tokens
# ---------------------------------------------------------------------------------------------

_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer"
    params: dict[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def error(self) -> str | None:
        return self.params.get("error")


def parse_challenge(header: str | None) -> Challenge | None:
    """``Bearer realm="…",service="…",scope="…"`` → Challenge (first scheme only)."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
              for m in _PARAM.finditer(rest)}
    return Challenge(scheme.lower(), params)


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    expires_at: float

    def __repr__(self) -> str:
        return f"Token(<hidden>, expires_at={self.expires_at:.0f})"

    def fresh(self, now: float | None = None, margin: float = 5.0) -> bool:
        return (now or time.time()) + margin < self.expires_at


TokenKey = tuple[str, str, str, str]  # (registry host[:port], realm, service, scope)


@dataclass
class TokenCache:
    """Bearer tokens by (registry host, realm, service, scope); thread-safe; never printed.

    The registry host is part of the key because the realm is whatever the registry's challenge
    says: without it, registry B naming A's realm, service and a scope A was asked for would be
    handed A's token (and could replay it at A).
    """

    _tokens: dict[TokenKey, Token] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def get(self, key: TokenKey) -> Token | None:
        with self._lock:
            token = self._tokens.get(key)
        return token if token is not None and token.fresh() else None

    def put(self, key: TokenKey, token: Token) -> None:
        with self._lock:
            self._tokens[key] = token

    def drop(self, key: TokenKey) -> None:
        with self._lock:
            self._tokens.pop(key, None)


def token_from_response(data: object, now: float | None = None) -> Token | None:
    """The token endpoint's JSON (``token`` or ``access_token``, ``expires_in`` default 60 s)."""
    if not isinstance(data, dict):
        return None
    value = data.get("token") or data.get("access_token")
    if not isinstance(value, str) or not value:
        return None
    try:
        expires_in = float(data.get("expires_in") or 60)
    except (TypeError, ValueError):
        expires_in = 60.0
    return Token(value, (now or time.time()) + max(expires_in, 1.0))
