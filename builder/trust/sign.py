"""Signing the checksum files with the release key: the detached `.sig` beside each one.

Only ``sha256sum-ARCH.txt`` is signed: it pins every artifact of the arch by sha256, so one
detached signature over it covers the whole release, and the target needs nothing but ``openssl``
and ``sha256sum`` to check it.

- Ed25519 (default): the signature is the raw 64 bytes, which
  ``openssl pkeyutl -verify -pubin -inkey pub.pem -rawin -sigfile SIG -in FILE`` accepts
  (OpenSSL >= 3.0) and install.sh uses.
- ECDSA P-256 with SHA-256 (optional): the signature is DER, which
  ``openssl dgst -sha256 -verify pub.pem -signature SIG FILE`` and ``cosign verify-blob --key``
  (given the base64 of it) accept.

Private keys are PEM PKCS8, encrypted with a passphrase taken from an environment variable
(``BUILDER_SIGNING_PASSPHRASE`` by default) so it never appears on a command line. Writing an
unencrypted key needs an explicit ``allow_unencrypted=True``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from builder.artifacts import SIG_SUFFIX
from builder.errors import BuilderError
from builder.store import fsync_dir, write_atomic
from builder.trust.keys import PrivateKey, PublicKey, SignatureInvalid, sign_bytes, verify_bytes
from builder.trust.provenance import sign_statements

PASSPHRASE_ENV = "BUILDER_SIGNING_PASSPHRASE"
PRIVATE_KEY_MODE = 0o600
PUBLIC_KEY_MODE = 0o644
Algorithm = Literal["ed25519", "ecdsa-p256"]


class SigningError(BuilderError):
    """A key cannot be made, loaded or used."""


@dataclass(frozen=True)
class KeyPaths:
    private: Path
    public: Path


def passphrase_from_env(
    env_var: str = PASSPHRASE_ENV, env: Mapping[str, str] | None = None
) -> bytes | None:
    """The passphrase in ``env_var``, or None when it is unset or empty."""
    value = (os.environ if env is None else env).get(env_var, "")
    return value.encode() if value else None


def _public_pem(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_key(
    private_path: Path,
    public_path: Path | None = None,
    *,
    algorithm: Algorithm = "ed25519",
    passphrase: bytes | None = None,
    env_var: str = PASSPHRASE_ENV,
    allow_unencrypted: bool = False,
) -> KeyPaths:
    """Make a key pair: encrypted PKCS8 private key and SubjectPublicKeyInfo public key (PEM).

    The passphrase is ``passphrase`` or the value of ``env_var``. Without either, the key is only
    written when ``allow_unencrypted`` is set, because a plain private key on disk is a release
    key anyone with read access can use.

    Neither file is ever replaced: an existing key may already sign releases operators trust.
    The private key is created mode 0600 by the call that creates it (never wider, whatever the
    umask), and both files are created exclusively, so a key that appears while we generate
    (another keygen, a symlink planted in the directory) is refused, not overwritten.
    """
    public_path = public_path or private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise _key_exists(path)
    secret = passphrase if passphrase is not None else passphrase_from_env(env_var)
    if not secret and not allow_unencrypted:
        raise SigningError(
            f"no passphrase for the new private key {private_path}",
            f"set {env_var}, or explicitly allow an unencrypted key",
        )
    key: PrivateKey
    if algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == "ecdsa-p256":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        raise SigningError(f"unknown signing algorithm {algorithm!r}", "use ed25519 or ecdsa-p256")
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(secret) if secret else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    private_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _create_exclusive(private_path, pem, PRIVATE_KEY_MODE)
    try:
        _create_exclusive(public_path, _public_pem(key.public_key()), PUBLIC_KEY_MODE)
    except BaseException:
        private_path.unlink()  # ours, created just above: no half pair is left behind
        raise
    fsync_dir(private_path.parent)
    return KeyPaths(private_path, public_path)


def _key_exists(path: Path) -> SigningError:
    return SigningError(f"{path} exists; refusing to replace a signing key (it was left unchanged)",
                        "keep it if releases were signed with it; for a new key choose another "
                        "--out directory or --name, or move the old pair away first")


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` holding ``data``; refuse if anything (a file, a symlink) is already there.

    O_CREAT|O_EXCL gives the file its mode at creation and fails on an existing name, symlinks
    included, so there is no moment with wider permissions and no check-then-write race. A write
    that fails half-way removes the file it created.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise _key_exists(path) from None
    except OSError as exc:
        raise SigningError(f"{path}: cannot create key file: {exc.strerror}") from None
    try:
        os.fchmod(fd, mode)  # exactly ``mode``: the umask may only have narrowed it
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def load_private_key(
    path: Path, passphrase: bytes | None = None, *, env_var: str = PASSPHRASE_ENV
) -> PrivateKey:
    """Load a PEM private key; the passphrase is ``passphrase`` or ``env_var``'s value."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"{path}: cannot read private key: {exc.strerror}") from None
    secret = passphrase if passphrase is not None else passphrase_from_env(env_var)
    try:
        key = serialization.load_pem_private_key(data, password=secret)
    except TypeError:
        # cryptography raises TypeError for "encrypted but no password" and the reverse.
        if secret is None:
            raise SigningError(f"{path}: private key is encrypted and no passphrase was given",
                               f"set {env_var}") from None
        raise SigningError(f"{path}: private key is not encrypted but a passphrase was given",
                           f"unset {env_var} for this key") from None
    except ValueError:
        hint = f"check {env_var}" if secret else "is this a PEM private key?"
        raise SigningError(f"{path}: cannot load private key (wrong passphrase or not a key)",
                           hint) from None
    except UnsupportedAlgorithm:
        raise SigningError(f"{path}: unsupported key algorithm") from None
    if isinstance(key, ec.EllipticCurvePrivateKey) and not isinstance(key.curve, ec.SECP256R1):
        raise SigningError(f"{path}: EC key on {key.curve.name}; only P-256 is supported")
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise SigningError(f"{path}: {type(key).__name__} keys are not supported",
                           "use an Ed25519 or ECDSA P-256 key")
    return key


def load_public_key(path: Path) -> PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise SigningError(f"{path}: cannot read public key: {exc.strerror}") from None
    except (ValueError, UnsupportedAlgorithm):
        raise SigningError(f"{path}: not a PEM public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise SigningError(f"{path}: {type(key).__name__} keys are not supported")
    return key


def export_public_key(private_key: PrivateKey, out: Path) -> Path:
    """Write the public half as PEM SubjectPublicKeyInfo (what install.sh's openssl reads)."""
    write_atomic(out, _public_pem(private_key.public_key()))
    return out


def sign_file(path: Path, key: PrivateKey, sig_path: Path | None = None) -> Path:
    """Write a detached signature for ``path`` (default ``path.sig``); returns its path.

    Checksum files are small, so reading one whole is fine; Ed25519 needs the full message anyway.
    """
    sig_path = sig_path or path.with_name(path.name + SIG_SUFFIX)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"{path}: cannot read file to sign: {exc.strerror}") from None
    write_atomic(sig_path, sign_bytes(data, key))
    return sig_path


def sign_checksums(directory: Path, key: PrivateKey) -> list[Path]:
    """Sign every ``sha256sum-*.txt`` in ``directory``, and wrap each arch's provenance
    statement in its DSSE envelope (builder.trust.provenance); returns the .sig paths."""
    files = sorted(directory.glob("sha256sum-*.txt"))
    if not files:
        raise SigningError(f"{directory}: no sha256sum-ARCH.txt to sign",
                           "write the checksum files first")
    sigs = [sign_file(f, key) for f in files]
    sign_statements(directory, key)
    return sigs


def verify_signature(file: Path, sig: Path, pubkey: Path | PublicKey) -> None:
    """Raise SignatureInvalid (naming the file) unless ``sig`` is a valid signature of ``file``."""
    key = load_public_key(pubkey) if isinstance(pubkey, Path) else pubkey
    try:
        data = file.read_bytes()
        signature = sig.read_bytes()
    except OSError as exc:
        raise SignatureInvalid(f"{exc.filename}: cannot read: {exc.strerror}") from None
    verify_bytes(data, signature, key, file, sig)
