"""Where to fetch from instead: the mirror rules of the network layer.

A file mirror rewrites a URL prefix (Artifactory-style proxies); a registry mirror lists the
endpoints that serve a registry host, containerd style. Candidates come in the order written, the
original last unless a mirror says ``fallback: false`` (an air-gapped host has only its mirror).

The mirror *configuration* is part of the lock's format (its ``mirrors:`` section, merged with the
build host's mirrors file, both parsed and validated in ``builder.lock.lockfile``), and the lock
layer sits below this one. So the network layer never imports the lock: it needs only the shape
below (``Protocol``s), which ``lockfile.FileMirror``/``RegistryMirror``/``Mirrors`` have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from builder.errors import HOST_MIRRORS_HINT

__all__ = ["HOST_MIRRORS_HINT", "FileMirrorRule", "MirrorConfig", "RegistryMirrorRule", "candidates"]


class MirrorRule(Protocol):
    """What every mirror rule says: where to go instead, and whether the original stays last."""

    @property
    def endpoints(self) -> tuple[str, ...]: ...
    @property
    def fallback(self) -> bool: ...


class FileMirrorRule(MirrorRule, Protocol):
    @property
    def prefix(self) -> str: ...


class RegistryMirrorRule(MirrorRule, Protocol):
    @property
    def host(self) -> str: ...


class MirrorConfig(Protocol):
    @property
    def files(self) -> Sequence[FileMirrorRule]: ...
    @property
    def registries(self) -> Sequence[RegistryMirrorRule]: ...
    @property
    def insecure(self) -> tuple[str, ...]: ...  # registry hosts allowed over plain HTTP


def candidates(url: str, mirrors: Sequence[FileMirrorRule]) -> list[str]:
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
