"""Upstream image signatures: cosign's key-based "simple signing" format, checked offline.

What is checked follows cosign's own specification (sigstore/cosign ``specs/SIGNATURE_SPEC.md``,
sections "Tag-based Discovery", "OCI Image Manifest V1" and "Simple Signing"):

- the signature of an image whose manifest (or index) digest is ``sha256:<hex>`` is an OCI image
  manifest in the same repository under the tag ``sha256-<hex>.sig`` (``:`` → ``-``, ``.sig``
  appended);
- each of its layers with media type ``application/vnd.dev.cosign.simplesigning.v1+json`` is one
  signed payload; the layer descriptor's annotation ``dev.cosignproject.cosign/signature`` holds
  the base64 signature over the payload bytes (ECDSA P-256 with SHA-256, DER, for cosign's default
  key type; "no information about the signature scheme is included in the object");
- the payload is JSON ``{"critical": {"identity": {"docker-reference": REPO}, "image":
  {"docker-manifest-digest": "sha256:<hex>"}, "type": "cosign container image signature"},
  "optional": ...}``. The spec's own example spells ``Docker-manifest-digest``; cosign (Go) reads
  the keys case-insensitively, so do we, refusing a payload that says one key twice.

Stricter than cosign, on purpose: the spec says ``docker-reference`` "is ignored"; here it must
name the pinned image's repository (``index.docker.io`` and ``docker.io`` are the same host), so a
signature made for another repository's image of the same digest is not accepted for this one.

This module is the format and its checks, with no lock and no network: ``builder.fetch.signatures``
decides which pinned image needs which key, fetches the signature manifest and its payloads into the
content store (remembering which manifest signed which image in the store's index), and ``build``
verifies them again from the store (``verify_stored`` here) without any network; ``verify`` checks
what an image archive carries (``check_archived``).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from builder import digest as dg
from builder.errors import BuilderError
from builder.oci import model as m
from builder.oci import reference
from builder.oci.reference import Reference
from builder.store import Store

SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PAYLOAD_TYPE = "cosign container image signature"
STORE_INDEX = "cosign-signature"  # store index: "REPO@DIGEST" → the signature manifest's digest
PAYLOAD_LIMIT = 64 << 10  # a payload is ~250 bytes; a bigger "payload" is not one
MAX_SIGNATURES = 64  # layers of one signature manifest looked at
# In an image archive's index.json entry: which digest the publisher signed (this manifest, or
# the upstream index, carried as a blob) and the `.sig` manifest carried with it (its config and
# payloads too, as blobs). `release --push-images` pushes it as the `sha256-<hex>.sig` tag.
ANNOTATION_SIGNED = "io.airgap-builder.cosign.signed-digest"
ANNOTATION_SIGNATURE = "io.airgap-builder.cosign.signature-manifest"


class SignatureError(BuilderError):
    """An image pinned with a cosign key has no valid signature by that key."""


@dataclass(frozen=True)
class Payload:
    docker_reference: str
    manifest_digest: str
    type: str


@dataclass(frozen=True)
class Verified:
    image: str  # the image as the lock names it
    digest: str  # the signed manifest/index digest
    signature_manifest: str  # digest of the `.sig` manifest holding the signature
    payload: str  # digest of the payload blob that verified
    key: str  # the key file, as shown to people
    blobs: tuple[str, ...] = ()  # what carries it: the signed document, the `.sig` manifest and its blobs

    def annotations(self) -> tuple[tuple[str, str], ...]:
        return ((ANNOTATION_SIGNED, self.digest), (ANNOTATION_SIGNATURE, self.signature_manifest))


def signature_tag(digest: str) -> str:
    """``sha256:<hex>`` → ``sha256-<hex>.sig`` (the spec's tag-based discovery)."""
    if not dg.is_digest(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest.replace(":", "-", 1) + ".sig"


def signature_ref(image: Reference, digest: str) -> Reference:
    return Reference(image.host, image.repository, signature_tag(digest))


def load_key(path: Path, image: str) -> ec.EllipticCurvePublicKey:
    """The PEM public key at ``path``; an ECDSA P-256 key (cosign's default key type)."""
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise SignatureError(f"{image}: cosign key {path}: cannot read it ({exc.strerror})",
                             "fix `cosign_key:` (or `signatures:`) in the lock; the path is "
                             "relative to the lock's directory") from None
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise SignatureError(f"{image}: cosign key {path}: not a PEM public key",
                             "use the publisher's cosign.pub (-----BEGIN PUBLIC KEY-----)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SignatureError(f"{image}: cosign key {path}: expected an ECDSA P-256 public key, "
                             f"got {type(key).__name__.removeprefix('_')}",
                             "only cosign's default key type (ECDSA P-256) is supported")
    return key


def _field(obj: object, name: str, where: str) -> object:
    """``obj[name]`` matched case-insensitively (as cosign's Go decoder does), said once."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is not an object")
    found = [k for k in obj if isinstance(k, str) and k.lower() == name]
    if len(found) > 1:
        raise ValueError(f"{where} says {name} twice ({', '.join(found)})")
    if not found:
        raise ValueError(f"{where} has no {name}")
    return obj[found[0]]


def parse_payload(raw: bytes) -> Payload:
    """The simple-signing claims; ValueError with the reason when they are not well formed."""
    try:
        data = m.load_json_object(raw, "the payload")  # size- and depth-capped
    except UnicodeDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    except BuilderError as exc:
        raise ValueError(exc.message) from None
    critical = _field(data, "critical", "the payload")
    ref = _field(_field(critical, "identity", "critical"), "docker-reference", "critical.identity")
    digest = _field(_field(critical, "image", "critical"), "docker-manifest-digest", "critical.image")
    kind = _field(critical, "type", "critical")
    if not all(isinstance(v, str) for v in (ref, digest, kind)):
        raise ValueError("critical.identity/image/type values must be strings")
    return Payload(str(ref), str(digest), str(kind))


def _same_repository(named: str, image: Reference) -> bool:
    try:
        ref = reference.parse(named)  # normalises index.docker.io, library/
    except ValueError:
        return False
    return ref.name == image.name


def _check_claims(payload: Payload, image: Reference, digest: str) -> str | None:
    """Why these claims do not cover ``image@digest`` (None when they do)."""
    if payload.type != PAYLOAD_TYPE:
        return f"payload type {payload.type!r}, expected {PAYLOAD_TYPE!r}"
    if payload.manifest_digest != digest:
        return f"payload names digest {payload.manifest_digest}, expected {digest}"
    if not _same_repository(payload.docker_reference, image):
        return f"payload names repository {payload.docker_reference!r}, expected {image.name}"
    return None


def _signature_ok(key: ec.EllipticCurvePublicKey, signature_b64: str, payload: bytes) -> bool:
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    except (binascii.Error, ValueError, InvalidSignature):
        return False
    return True


def payload_layers(manifest: m.Manifest) -> list[m.Descriptor]:
    return [d for d in manifest.layers if d.media_type == SIMPLESIGNING][:MAX_SIGNATURES]


def verify_manifest(store: Store, manifest: m.Manifest, image: Reference, digest: str,
                    key: ec.EllipticCurvePublicKey, key_name: str, shown: str) -> Verified:
    """A layer of the `.sig` manifest (payloads in ``store``) signed by ``key`` for image@digest.

    The signature is checked before the payload is parsed: nothing unsigned is interpreted.
    """
    reasons: list[str] = []
    for desc in payload_layers(manifest):
        if desc.size > PAYLOAD_LIMIT or not store.has(desc.digest):
            reasons.append(f"payload {desc.digest}: missing or larger than {PAYLOAD_LIMIT} bytes")
            continue
        raw = store.read_bytes(desc.digest)  # re-hashed against its digest
        if not _signature_ok(key, desc.annotations.get(SIGNATURE_ANNOTATION, ""), raw):
            reasons.append(f"payload {desc.digest[:19]}: signature does not verify with {key_name}")
            continue
        try:
            why = _check_claims(parse_payload(raw), image, digest)
        except ValueError as exc:
            why = f"signed payload is not simple signing: {exc}"
        if why is None:
            blobs = (digest, manifest.digest, manifest.config.digest,
                     *(d.digest for d in manifest.layers))
            return Verified(shown, digest, manifest.digest, desc.digest, key_name,
                            tuple(dict.fromkeys(blobs)))
        reasons.append(f"payload {desc.digest[:19]}: {why}")
    if not reasons:
        reasons.append(f"no {SIMPLESIGNING} layer in {manifest.digest}")
    raise SignatureError(
        f"{shown}: no valid cosign signature by {key_name} for {digest} "
        f"(signature {image.name}:{signature_tag(digest)}): " + "; ".join(reasons),
        "the image is not signed by this key for this digest; check with the publisher which key "
        "signs it, and fix `cosign_key:` (or `signatures:`) in the lock, or re-lock if the image "
        "was re-published")


def read_manifest(raw: bytes, where: str) -> m.Manifest:
    doc = m.parse_document(raw, where, fallback_type=m.OCI_MANIFEST)
    if not isinstance(doc, m.Manifest):
        raise SignatureError(f"{where}: is an index, not a cosign signature manifest",
                             "cosign stores signatures as an OCI image manifest")
    return doc


def remember(store: Store, image: Reference, digest: str, signature_manifest: str) -> None:
    """Note in the store's index that ``signature_manifest`` signs image@digest (for ``stored``)."""
    store.index_put(STORE_INDEX, f"{image.name}@{digest}", signature_manifest)


def stored(store: Store, shown: str, image: Reference, digest: str) -> m.Manifest | None:
    """The `.sig` manifest ``fetch`` kept for image@digest, if any."""
    found = store.index_get(STORE_INDEX, f"{image.name}@{digest}")
    if found is None:
        return None
    return read_manifest(store.read_bytes(found), f"{shown} signature {found}")


def verify_stored(store: Store, shown: str, image: Reference, digest: str,
                  key: ec.EllipticCurvePublicKey, key_name: str) -> Verified:
    """Offline: the signature ``fetch`` stored, verified again with the lock's key."""
    manifest = stored(store, shown, image, digest)
    if manifest is None:
        raise SignatureError(f"{shown}: the lock requires a cosign signature by {key_name} for "
                             f"{digest}, and the store has none",
                             "run `python -m builder fetch` (it fetches and checks signatures)")
    return verify_manifest(store, manifest, image, digest, key, key_name, shown)


def signature_blobs(store: Store, manifest: m.Manifest) -> list[m.Descriptor]:
    """What carries the signature: its manifest, config and payload layers (all in the store)."""
    own = m.Descriptor(manifest.media_type, manifest.digest, len(manifest.raw))
    return [own, manifest.config, *manifest.layers]


def check_archived(name: str, manifest_digest: str, annotations: dict[str, str],
                   blobs: dict[str, bytes]) -> str | None:
    """What is wrong with a signature an archive carries for image ``name`` (None: nothing).

    Without the publisher's key (verify has only the release key), this checks what ties the
    signature to the image: the `.sig` manifest and a payload are in the archive, the payload
    names the signed digest and the image's repository, and the signed digest is this manifest
    or an index in the archive that lists it. The signature bytes are checked at the site, by its
    admission policy, with the publisher's key.
    """
    signed, sig = annotations.get(ANNOTATION_SIGNED), annotations.get(ANNOTATION_SIGNATURE)
    if signed is None and sig is None:
        return None
    if not (isinstance(signed, str) and dg.is_digest(signed) and isinstance(sig, str)
            and dg.is_digest(sig)):
        return f"malformed cosign annotations {signed!r:.80} / {sig!r:.80}"
    try:
        image = reference.parse(name)
        manifest = read_manifest(blobs[sig], f"signature {sig}") if sig in blobs else None
        if manifest is None:
            return f"cosign signature manifest {sig} is not in the archive"
        if signed != manifest_digest:
            top = m.parse_document(blobs[signed], signed) if signed in blobs else None
            if not isinstance(top, m.Index) or manifest_digest not in {d.digest for d in top.manifests}:
                return f"signed digest {signed} is neither {manifest_digest} nor an index in the archive listing it"
        problems = []
        for desc in payload_layers(manifest):
            raw = blobs.get(desc.digest)
            if raw is None:
                problems.append(f"payload {desc.digest} is not in the archive")
                continue
            why = _check_claims(parse_payload(raw), image, signed)
            if why is None:
                return None
            problems.append(why)
        return "; ".join(problems) or f"no {SIMPLESIGNING} layer in {sig}"
    except (BuilderError, ValueError) as exc:
        return f"cosign signature {sig}: {exc}"
