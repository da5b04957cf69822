"""`keygen` and `sign` through the CLI; signatures checked with openssl, as install.sh does."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from builder import cli
from builder.trust import sign
from tests.plugins.releases import unsigned_copy

PASS = "correct horse battery staple"


def main(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def release(tmp_path: Path, releases) -> Path:
    """An unsigned copy of a real release (tests/plugins/releases.py)."""
    return unsigned_copy(releases["v1"], tmp_path / "artifacts").directory


@pytest.mark.parametrize("algorithm", ["ed25519", "ecdsa-p256"])
def test_keygen_sign_verify(algorithm: str, release: Path, tmp_path: Path, monkeypatch,
                            capsys) -> None:
    monkeypatch.setenv(sign.PASSPHRASE_ENV, PASS)
    code, out = main(capsys, "keygen", "--out", str(tmp_path / "keys"), "--algorithm", algorithm)
    assert code == 0, out
    pem, pub = tmp_path / "keys/signing-key.pem", tmp_path / "keys/signing-key.pub"
    assert b"ENCRYPTED PRIVATE KEY" in pem.read_bytes()
    assert pem.stat().st_mode & 0o777 == 0o600
    assert PASS not in out and "out of band" in out
    code, out = main(capsys, "sign", "--artifacts", str(release), "--key", str(pem))
    assert code == 0, out
    sums, sig = release / "sha256sum-amd64.txt", release / "sha256sum-amd64.txt.sig"
    assert sig.is_file()
    # The public key is not placed beside the artifacts: it must come out of band.
    assert not list(release.glob("*.pub")) and not list(release.glob("*.pem"))
    if algorithm == "ed25519" and shutil.which("openssl"):
        proc = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(pub),
                               "-rawin", "-sigfile", str(sig), "-in", str(sums)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    elif shutil.which("openssl"):
        proc = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(pub), "-signature",
                               str(sig), str(sums)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    code, out = main(capsys, "verify", str(release), "--public-key", str(pub),
                     "--require-signature")
    assert code == 0, out


def test_keygen_needs_a_passphrase_or_explicit_unencrypted(tmp_path: Path, monkeypatch,
                                                           capsys) -> None:
    monkeypatch.delenv(sign.PASSPHRASE_ENV, raising=False)
    code, out = main(capsys, "keygen", "--out", str(tmp_path))
    assert code == 1 and "BUILDER_SIGNING_PASSPHRASE" in out
    assert not list(tmp_path.iterdir())
    code, out = main(capsys, "keygen", "--out", str(tmp_path), "--unencrypted")
    assert code == 0
    code, out = main(capsys, "keygen", "--out", str(tmp_path), "--unencrypted")
    assert code == 1 and "refusing to replace" in out


def test_sign_with_wrong_passphrase_or_no_checksums(tmp_path: Path, release: Path, monkeypatch,
                                                    capsys) -> None:
    monkeypatch.setenv(sign.PASSPHRASE_ENV, PASS)
    main(capsys, "keygen", "--out", str(tmp_path / "k"))
    monkeypatch.setenv(sign.PASSPHRASE_ENV, "not it")
    code, out = main(capsys, "sign", "--artifacts", str(release), "--key", str(tmp_path / "k/signing-key.pem"))
    assert code == 1 and "wrong passphrase" in out and "not it" not in out
    assert not list(release.glob("*.sig"))
    monkeypatch.setenv(sign.PASSPHRASE_ENV, PASS)
    (tmp_path / "empty").mkdir()
    code, out = main(capsys, "sign", "--artifacts", str(tmp_path / "empty"), "--key",
                     str(tmp_path / "k/signing-key.pem"))
    assert code == 1 and "no sha256sum-ARCH.txt" in out
