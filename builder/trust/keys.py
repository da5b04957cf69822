"""Keys and signatures over bytes: what ``sign`` (checksum files) and ``provenance`` (DSSE
envelopes) both use, so neither imports the other for it.

Ed25519 signatures are the raw 64 bytes; ECDSA P-256 signatures are DER over SHA-256 (see
builder.trust.sign for the formats ``openssl`` and ``cosign`` accept).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from builder.errors import BuilderError

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


class SignatureInvalid(BuilderError):
    """A signature does not verify for the file and key given."""


def sign_bytes(data: bytes, key: PrivateKey) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def verify_bytes(data: bytes, signature: bytes, key: PublicKey, file: Path, sig: Path) -> None:
    """``verify_signature`` over bytes already read (``file`` and ``sig`` only name them), so the
    bytes that were checked are the bytes the caller goes on to use."""
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        else:
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureInvalid(
            f"{file}: signature {sig.name} does not verify with the given public key",
            "the file or signature was changed, or it was signed with another key",
        ) from None
