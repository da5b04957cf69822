"""A small OCI distribution client on ``requests``: pull by digest into the store, and push.

One concern per module: ``endpoints`` (which URLs serve a registry host, mirror fallback),
``exchange`` (challenges and tokens), ``client`` (options, sessions, one request with auth,
retries and timeouts), ``pull`` (manifests and blobs into the store), ``push`` (the one blob copy,
manifests, trees). ``RegistryClient`` is all of them; callers import from here.
"""

from __future__ import annotations

from builder.fetch.registry.client import ENV_CA_FILE, ClientOptions
from builder.fetch.registry.endpoints import (
    UPSTREAM_API,
    Endpoint,
    Scope,
    endpoint,
    endpoints_for,
)
from builder.fetch.registry.pull import (
    CHUNK,
    MAX_MANIFEST,
    BlobResult,
    NotFound,
    RawManifest,
    RegistryPull,
)
from builder.fetch.registry.push import BlobCopy, RegistryPush
from builder.fetch.transport import USER_AGENT


class RegistryClient(RegistryPull, RegistryPush):
    """Talks to registries for one build; thread-safe (a session per thread, shared token cache)."""


__all__ = ["CHUNK", "ENV_CA_FILE", "MAX_MANIFEST", "UPSTREAM_API", "USER_AGENT", "BlobCopy",
           "BlobResult", "ClientOptions", "Endpoint", "NotFound", "RawManifest", "RegistryClient",
           "Scope", "endpoint", "endpoints_for"]
