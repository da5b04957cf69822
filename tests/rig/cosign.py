"""Sign fixture images the way `cosign sign --key` does, with the `cryptography` package.

The format (sigstore/cosign specs/SIGNATURE_SPEC.md): an OCI image manifest tagged
``sha256-<hex>.sig`` in the image's repository; each layer is a simple-signing JSON payload
(media type ``application/vnd.dev.cosign.simplesigning.v1+json``) whose descriptor carries the
base64 ECDSA P-256/SHA-256 DER signature in the annotation ``dev.cosignproject.cosign/signature``.
The payload is written as cosign's Go encoder writes it: compact JSON, keys in struct order.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from builder.fetch.registry import RegistryClient
from builder.oci import cosign
from builder.oci import model as m
from builder.oci.reference import Reference
from builder.store import Store


@dataclass(frozen=True)
class Signer:
    key: ec.EllipticCurvePrivateKey
    public_pem: Path  # the public key as a lock names it


def new_signer(directory: Path, name: str = "cosign") -> Signer:
    """A fresh P-256 key pair; the public half written to ``directory/NAME.pub`` (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    directory.mkdir(parents=True, exist_ok=True)
    pub = directory / f"{name}.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return Signer(key, pub)


def payload(docker_reference: str, digest: str, optional: dict | None = None,
            kind: str = cosign.PAYLOAD_TYPE) -> bytes:
    data = {"critical": {"identity": {"docker-reference": docker_reference},
                         "image": {"docker-manifest-digest": digest}, "type": kind},
            "optional": optional}
    return json.dumps(data, separators=(",", ":")).encode()


def sign(signer: Signer, data: bytes) -> str:
    """The base64 DER ECDSA-P256/SHA-256 signature of ``data``."""
    return base64.b64encode(signer.key.sign(data, ec.ECDSA(hashes.SHA256()))).decode()


def signature_manifest(store: Store, signed: list[tuple[bytes, str]]) -> m.Descriptor:
    """The `.sig` manifest of (payload, base64 signature) pairs, with its blobs, in ``store``."""
    layers = []
    for data, sig in signed:
        digest = store.put_bytes(data)
        layers.append(m.Descriptor(cosign.SIMPLESIGNING, digest, len(data),
                                   annotations={cosign.SIGNATURE_ANNOTATION: sig}))
    config = m.canonical_json({
        "architecture": "", "os": "", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [d.digest for d in layers]},
    })
    config_desc = m.Descriptor(m.OCI_CONFIG, store.put_bytes(config), len(config))
    raw = m.canonical_json({"schemaVersion": 2, "mediaType": m.OCI_MANIFEST,
                            "config": config_desc.to_json(),
                            "layers": [d.to_json() for d in layers]})
    return m.Descriptor(m.OCI_MANIFEST, store.put_bytes(raw), len(raw))


def push_signature(client: RegistryClient, store: Store, image: Reference, digest: str,
                   signed: list[tuple[bytes, str]]) -> m.Descriptor:
    """Push the signature of image@digest under ``sha256-<hex>.sig`` in image's repository."""
    desc = signature_manifest(store, signed)
    client.push_tree(store, cosign.signature_ref(image, digest), desc)
    return desc


def sign_image(client: RegistryClient, store: Store, signer: Signer, image: Reference,
               digest: str) -> m.Descriptor:
    """What `cosign sign --key` leaves in the registry for image@digest."""
    data = payload(image.name, digest)
    return push_signature(client, store, image, digest, [(data, sign(signer, data))])
