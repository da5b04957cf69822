"""Which pinned images need a cosign signature, by which key; fetching and re-checking them.

The lock says which images must be signed and by which public key (``cosign_key:`` or
``signatures:``). ``fetch`` pulls each such image's `.sig` manifest and payloads into the content
store and verifies them (``fetch_signature``); ``build`` verifies them again from the store, without
any network (``check_lock``). The signature format and its checks are ``builder.oci.cosign``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from builder.fetch.registry import NotFound, RegistryClient
from builder.lock.lockfile import ImagePin, Lock
from builder.oci.cosign import (
    PAYLOAD_LIMIT,
    SignatureError,
    Verified,
    load_key,
    payload_layers,
    read_manifest,
    remember,
    signature_ref,
    verify_manifest,
    verify_stored,
)
from builder.oci.reference import Reference
from builder.store import Store


def fetch_signature(client: RegistryClient, store: Store, shown: str, image: Reference,
                    digest: str, key: ec.EllipticCurvePublicKey, key_name: str,
                    at: Reference | None = None) -> Verified:
    """Fetch the `.sig` manifest and payloads of image@digest into ``store`` and verify them.

    ``at``: where the signature is when not beside ``image`` (a copy of it under another name,
    as `release --push-images` makes); the payload must still name ``image``.
    """
    sig = signature_ref(at or image, digest)
    try:
        got = client.get_manifest(sig)
    except NotFound:
        raise SignatureError(
            f"{shown}: unsigned: no cosign signature {sig} for {digest} (the lock requires one "
            f"by {key_name})",
            "ask the publisher to sign the image (cosign sign --key), or mirror its signature "
            "with it; the lock's key stays as it is") from None
    where = f"{sig} ({got.digest})"
    manifest = read_manifest(got.raw, where)
    for desc in [manifest.config, *payload_layers(manifest)]:  # the config too: archives carry it
        if desc.size <= PAYLOAD_LIMIT:
            client.fetch_blob(sig, desc, store, what=f"{shown} signature blob")
    verified = verify_manifest(store, manifest, image, digest, key, key_name, shown)
    store.put_bytes(got.raw, expected=got.digest, what=where)
    remember(store, image, digest, got.digest)
    return verified


@dataclass(frozen=True)
class CosignKey:
    key: ec.EllipticCurvePublicKey
    shown: str  # the key file as people name it


def cosign_keys(lock: Lock, pins: Iterable[ImagePin]) -> dict[str, CosignKey]:
    """image ref → the key its signature must verify with; every key file read before any request."""
    out: dict[str, CosignKey] = {}
    for pin in pins:
        path = lock.cosign_key(pin)
        if path is not None:
            out[pin.ref] = CosignKey(load_key(path, pin.ref), str(path))
    return out


def check_lock(lock: Lock, arches: Iterable[str], store: Store) -> list[Verified]:
    """Offline (build): every signature the lock requires, from the store, checked again."""
    arches = tuple(arches)
    pins = [p for p in lock.images if any(p.applies_to(a) for a in arches)]
    keys = cosign_keys(lock, pins)
    return [verify_stored(store, p.ref, p.reference, p.digest, keys[p.ref].key, keys[p.ref].shown)
            for p in pins if p.ref in keys and p.digest]
