"""Lock pins whose bytes come from a local Docker-API daemon (``daemon: docker-daemon:NAME:TAG``).

A daemon holds one platform per name, so such a pin is a single manifest (no index): `lock`
records the manifest the daemon's image converts to, and `fetch` converts it again and requires
the same digest (the conversion is deterministic), so a rebuilt image with other bytes is caught
instead of silently shipped. Already-stored images never touch the daemon.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace

from builder.errors import BuilderError
from builder.fetch.docker_api import DaemonSource
from builder.lock.lockfile import LOCK_HINT, ImagePin
from builder.oci.image import load_image
from builder.store import Store

ENV_DAEMON = "BUILDER_DOCKER_HOST"  # else DOCKER_HOST, else the SDK's default socket


def source(env: Mapping[str, str] | None = None) -> DaemonSource:
    env = os.environ if env is None else env
    return DaemonSource(env.get(ENV_DAEMON) or None)


def _arches(pin: ImagePin, arches: list[str]) -> list[str]:
    wanted = [a for a in arches if pin.applies_to(a)]
    if len(wanted) != 1:
        raise BuilderError(f"{pin.ref}: a daemon image has one platform; it applies to {wanted or 'no arch'}",
                           "restrict the pin with `arches: [ARCH]`")
    return wanted


def resolve(pin: ImagePin, arches: list[str], store: Store, daemon: DaemonSource) -> ImagePin:
    [arch] = _arches(pin, arches)
    assert pin.daemon
    taken = daemon.take(pin.daemon, arch, store)
    digest = taken.image.manifest.digest
    return replace(pin, digest=digest, platforms={arch: digest})


def _complete(store: Store, digest: str) -> bool:
    if not store.has(digest):
        return False
    manifest, _ = load_image(store, digest)
    return store.has(manifest.config.digest) and all(store.has(la.digest) for la in manifest.layers)


def take(pin: ImagePin, arches: list[str], store: Store, daemon: DaemonSource) -> bool:
    """Make sure the pinned image is in the store; returns True when the daemon was asked."""
    [arch] = _arches(pin, arches)
    want = pin.platforms.get(arch)
    if not want:
        raise BuilderError(f"{pin.ref}: platforms.{arch} is unresolved", LOCK_HINT)
    if _complete(store, want):
        return False
    assert pin.daemon
    taken = daemon.take(pin.daemon, arch, store)
    got = taken.image.manifest.digest
    if got != want:
        raise BuilderError(f"{pin.ref} ({pin.daemon}): the daemon's image converts to {got}, "
                           f"the lock pins {want}",
                           "the image was rebuilt since `lock`; re-run `python -m builder lock --refresh` "
                           "if the new image is the one to ship")
    return True
