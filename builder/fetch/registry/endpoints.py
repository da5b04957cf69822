"""Which URLs serve a registry host, and trying them in order (mirror fallback).

A registry host from an image reference (``docker.io``, ``quay.io``, ``host:5000``) maps,
containerd style, to its mirror endpoints in order, then to the upstream as last resort unless the
mirror says ``fallback: false`` (an air-gapped build host has only its mirror). The upstream API of
most registries is the host itself; Docker Hub's follows the Docker convention of an API host
derived from the image host (``UPSTREAM_API``), so ``docker.io`` is the only literal. A mirror
endpoint is ``https://host[:port][/prefix]`` or a bare ``host[:port]`` (HTTPS); ``http://`` is
accepted only for hosts listed under ``insecure:`` in the build host's mirrors file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

from builder.errors import BuilderError, DigestMismatch, FetchError, HttpStatusError
from builder.fetch.auth import AuthError
from builder.fetch.mirrors import HOST_MIRRORS_HINT, MirrorConfig
from builder.oci.reference import DEFAULT_HOST

log = logging.getLogger(__name__)

# Docker Hub serves its API from "registry-1." + its image host (the convention the docker CLI and
# containerd apply); every other registry serves it from its own host.
UPSTREAM_API = {DEFAULT_HOST: f"registry-1.{DEFAULT_HOST}"}

T = TypeVar("T")


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


def is_insecure(netloc: str, insecure: tuple[str, ...]) -> bool:
    hostname = netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc
    return netloc in insecure or hostname in insecure


def endpoint(host: str, spec: str, insecure: tuple[str, ...], mirror: bool = True) -> Endpoint:
    """One endpoint from a mirror spec (URL or bare host), refusing plain HTTP unless allowed."""
    if "://" not in spec:
        netloc = spec.split("/", 1)[0]
        spec = ("http://" if is_insecure(netloc, insecure) else "https://") + spec
    parts = urlsplit(spec)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BuilderError(f"registry endpoint {spec!r} for {host} is not an http(s) URL")
    if parts.scheme == "http" and not is_insecure(parts.netloc, insecure):
        raise BuilderError(f"registry endpoint {spec} for {host} is plain HTTP",
                           f"use https, or allow {parts.netloc}: {HOST_MIRRORS_HINT}")
    path = parts.path.rstrip("/")
    if path.endswith("/v2"):
        path = path[:-3]
    return Endpoint(host, f"{parts.scheme}://{parts.netloc}{path}", mirror)


def endpoints_for(host: str, mirrors: MirrorConfig) -> list[Endpoint]:
    """Mirror endpoints for ``host`` in order, then the upstream unless a mirror forbids it."""
    out: list[Endpoint] = []
    fallback = True
    for mirror in mirrors.registries:
        if mirror.host == host:
            out.extend(endpoint(host, ep, mirrors.insecure) for ep in mirror.endpoints)
            fallback = fallback and mirror.fallback
    if fallback or not out:
        out.append(upstream(host, mirrors.insecure))
    return list(dict.fromkeys(out))


def upstream(host: str, insecure: tuple[str, ...]) -> Endpoint:
    """The registry itself, no mirrors (pushes go where the reference says)."""
    return endpoint(host, UPSTREAM_API.get(host, host), insecure, mirror=False)


def over_endpoints(eps: list[Endpoint], what: str, fn: Callable[[Endpoint], T]) -> T:
    """``fn`` on each endpoint in turn until one succeeds; the most telling error otherwise."""
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
        for _, err in errors:
            if isinstance(err, kind):
                raise err
    tried = "\n    ".join(f"{ep.base}: {err.message}" for ep, err in errors)
    message = f"{what}: every endpoint failed:\n    {tried}"
    hint = errors[-1][1].hint or "check mirrors and network"
    statuses = {err.status if isinstance(err, HttpStatusError) else None for _, err in errors}
    if len(statuses) == 1 and (status := statuses.pop()) is not None:
        # Every endpoint said the same status (404 everywhere): callers decide by the number.
        raise HttpStatusError(status, what, message, hint)
    raise FetchError(message, hint)
