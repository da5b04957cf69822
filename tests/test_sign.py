"""builder.trust.sign: key handling, detached signatures, and what openssl on the target accepts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from builder.trust import checksums, sign
from builder.trust.sign import SignatureInvalid, SigningError

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture
def release_dir(tmp_path: Path) -> Path:
    d = tmp_path / "artifacts"
    d.mkdir()
    for arch in ("amd64", "arm64"):
        f = d / f"rke2.linux-{arch}.tar.gz"
        f.write_bytes(f"bundle {arch}".encode())
        checksums.write_for_arch(d, arch, [f])
    return d


def _openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True)


def test_generate_refuses_unencrypted_without_consent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sign.PASSPHRASE_ENV, raising=False)
    with pytest.raises(SigningError, match="no passphrase") as info:
        sign.generate_key(tmp_path / "k.pem")
    assert sign.PASSPHRASE_ENV in str(info.value)
    assert not (tmp_path / "k.pem").exists()
    paths = sign.generate_key(tmp_path / "k.pem", allow_unencrypted=True)
    assert b"ENCRYPTED" not in paths.private.read_bytes()
    assert isinstance(sign.load_private_key(paths.private), sign.ed25519.Ed25519PrivateKey)


def test_passphrase_from_env_and_wrong_passphrase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sign.PASSPHRASE_ENV, "correct horse")
    paths = sign.generate_key(tmp_path / "k.pem")
    pem = paths.private.read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert oct(paths.private.stat().st_mode & 0o777) == "0o600"
    assert paths.public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    sign.load_private_key(paths.private)  # from the environment
    with pytest.raises(SigningError, match="wrong passphrase"):
        sign.load_private_key(paths.private, b"battery staple")
    monkeypatch.delenv(sign.PASSPHRASE_ENV)
    with pytest.raises(SigningError, match="encrypted and no passphrase"):
        sign.load_private_key(paths.private)
    with pytest.raises(SigningError, match="refusing to replace"):
        sign.generate_key(tmp_path / "k.pem", passphrase=b"x")


def test_openssl_reads_encrypted_key(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    paths = sign.generate_key(tmp_path / "k.pem", passphrase=b"pw")
    assert _openssl("pkey", "-in", str(paths.private), "-passin", "pass:pw", "-noout").returncode == 0
    assert _openssl("pkey", "-in", str(paths.private), "-passin", "pass:bad", "-noout").returncode != 0


@needs_openssl
def test_ed25519_signature_verifies_with_openssl_rawin(release_dir: Path, tmp_path: Path) -> None:
    paths = sign.generate_key(tmp_path / "k.pem", passphrase=b"pw")
    key = sign.load_private_key(paths.private, b"pw")
    sigs = sign.sign_checksums(release_dir, key)
    assert [s.name for s in sigs] == ["sha256sum-amd64.txt.sig", "sha256sum-arm64.txt.sig"]
    assert all(len(s.read_bytes()) == 64 for s in sigs)
    pub = sign.export_public_key(key, tmp_path / "exported.pub")
    assert pub.read_bytes() == paths.public.read_bytes()
    for sig in sigs:
        data = sig.with_suffix("")
        proc = _openssl("pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-rawin",
                        "-sigfile", str(sig), "-in", str(data))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        sign.verify_signature(data, sig, pub)
    # The signature of the arm64 file does not verify the amd64 file.
    amd64, arm64_sig = release_dir / "sha256sum-amd64.txt", release_dir / "sha256sum-arm64.txt.sig"
    proc = _openssl("pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-rawin",
                    "-sigfile", str(arm64_sig), "-in", str(amd64))
    assert proc.returncode != 0
    with pytest.raises(SignatureInvalid, match="sha256sum-amd64.txt"):
        sign.verify_signature(amd64, arm64_sig, pub)


@needs_openssl
def test_wrong_key_and_changed_file(release_dir: Path, tmp_path: Path) -> None:
    key = sign.load_private_key(sign.generate_key(tmp_path / "a.pem", passphrase=b"a").private, b"a")
    other = sign.generate_key(tmp_path / "b.pem", passphrase=b"b").public
    sums = release_dir / "sha256sum-amd64.txt"
    sig = sign.sign_file(sums, key)
    with pytest.raises(SignatureInvalid, match=str(sums)):
        sign.verify_signature(sums, sig, other)
    proc = _openssl("pkeyutl", "-verify", "-pubin", "-inkey", str(other), "-rawin",
                    "-sigfile", str(sig), "-in", str(sums))
    assert proc.returncode != 0
    sums.write_text(sums.read_text().replace("a", "b", 1))
    with pytest.raises(SignatureInvalid, match="does not verify"):
        sign.verify_signature(sums, sig, key.public_key())
    with pytest.raises(SignatureInvalid, match="cannot read"):
        sign.verify_signature(release_dir / "missing.txt", sig, key.public_key())


@needs_openssl
def test_ecdsa_p256_signature_verifies_with_openssl_dgst(release_dir: Path, tmp_path: Path) -> None:
    paths = sign.generate_key(tmp_path / "ec.pem", algorithm="ecdsa-p256", passphrase=b"pw")
    key = sign.load_private_key(paths.private, b"pw")
    sums = release_dir / "sha256sum-amd64.txt"
    sig = sign.sign_file(sums, key)
    assert sig.read_bytes()[0] == 0x30  # DER SEQUENCE, what cosign and openssl expect
    proc = _openssl("dgst", "-sha256", "-verify", str(paths.public), "-signature", str(sig), str(sums))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sign.verify_signature(sums, sig, paths.public)
    with pytest.raises(SignatureInvalid):
        sign.verify_signature(release_dir / "sha256sum-arm64.txt", sig, paths.public)


def test_unsupported_keys_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "rsa.pem"
    path.write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    with pytest.raises(SigningError, match="not supported"):
        sign.load_private_key(path)
    p384 = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(p384.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    with pytest.raises(SigningError, match="only P-256"):
        sign.load_private_key(path)
    (tmp_path / "junk.pub").write_text("junk")
    with pytest.raises(SigningError, match="not a PEM public key"):
        sign.load_public_key(tmp_path / "junk.pub")


def test_sign_checksums_needs_files(tmp_path: Path) -> None:
    key = sign.ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(SigningError, match="no sha256sum-ARCH.txt"):
        sign.sign_checksums(tmp_path, key)
