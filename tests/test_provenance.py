"""Build provenance (issue 17): the per-arch in-toto statement `build` writes, the DSSE envelope
`sign` wraps it in, checked by an independent implementation (securesystemslib), and what
`verify` shows and refuses. Runs on copies of the session's real release (tests/plugins/built.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from securesystemslib.dsse import Envelope
from securesystemslib.signer import SSlibKey

from builder.trust import checksums, provenance, sign
from tests.plugins.built import EPOCH, REPO

pytestmark = pytest.mark.slow


def _copy(built, tmp_path: Path) -> Path:
    dest = tmp_path / "artifacts"
    shutil.copytree(built.out, dest, ignore=shutil.ignore_patterns("scan", ".*"))
    return dest


def _signed(built, tmp_path: Path, algorithm: sign.Algorithm = "ed25519") -> tuple[Path, Path]:
    """(artifacts copy signed with a new key, its public key)."""
    out = _copy(built, tmp_path)
    keys = sign.generate_key(tmp_path / "k.pem", algorithm=algorithm, allow_unencrypted=True)
    built.cli("sign", "--artifacts", str(out), "--key", str(keys.private))
    return out, keys.public


def _verify(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builder", "verify", str(out), *args], cwd=REPO,
                          capture_output=True, text=True)


def test_statement_lists_every_artifact_and_every_input(built):
    lock_bytes = built.lock.read_bytes()
    for sums in sorted(built.out.glob("sha256sum-*.txt")):
        arch = sums.name.removeprefix("sha256sum-").removesuffix(".txt")
        listed = {e.name: e.hex for e in checksums.parse_file(sums)}
        name = provenance.statement_name(arch)
        raw = (built.out / name).read_bytes()
        assert listed[name] == hashlib.sha256(raw).hexdigest()  # the checksum file covers it
        doc = json.loads(raw)
        assert raw == provenance.canonical(doc)  # canonical JSON: sorted keys, no spaces
        assert doc["_type"] == "https://in-toto.io/Statement/v1"
        assert doc["predicateType"] == "https://slsa.dev/provenance/v1"
        assert provenance.subjects_of(doc) == {n: h for n, h in listed.items() if n != name}
        bd = doc["predicate"]["buildDefinition"]
        ext, internal = bd["externalParameters"], bd["internalParameters"]
        assert ext["lock"]["sha256"] == "sha256:" + hashlib.sha256(lock_bytes).hexdigest()
        assert ext["SOURCE_DATE_EPOCH"] == int(EPOCH) and ext["arch"] == arch
        assert internal["builderVersion"] == "0.1.0"
        assert len(internal["sourceRevision"]) == 40  # the tests run from a checkout
        assert internal["scanner"]["version"] == "0.76.0"  # the pinned Trivy (issue 17 item 6)
        deps = bd["resolvedDependencies"]
        assert deps and all(len(d["digest"]["sha256"]) == 64 and d["uri"] for d in deps)
        assert any(d["name"].startswith("images.") and d["uri"].startswith("oci://") for d in deps)
        assert any(d["name"].startswith("components.") for d in deps)
        assert "startedOn" not in json.dumps(doc) and "finishedOn" not in json.dumps(doc)


@pytest.mark.parametrize("algorithm", ["ed25519", "ecdsa-p256"])
def test_envelope_verifies_with_securesystemslib(built, tmp_path, algorithm):
    """An independent DSSE implementation (securesystemslib) accepts our envelope, keyid = the
    key fingerprint; its payload is the statement listed in the checksum file."""
    out, pub = _signed(built, tmp_path, algorithm)
    public = sign.load_public_key(pub)
    fp = provenance.fingerprint(public)
    key = SSlibKey.from_crypto(public, keyid=fp)
    envelopes = sorted(out.glob("provenance.linux-*.dsse.json"))
    assert len(envelopes) == len(list(out.glob("sha256sum-*.txt"))) >= 1
    for path in envelopes:
        env = Envelope.from_dict(json.loads(path.read_bytes()))
        assert set(env.verify([key], 1)) == {fp}
        assert env.payload_type == "application/vnd.in-toto+json"
        arch = path.name.removeprefix("provenance.linux-").removesuffix(".dsse.json")
        assert env.payload == (out / provenance.statement_name(arch)).read_bytes()
        # A flipped payload byte: the independent verifier refuses it too.
        bad = Envelope(env.payload[:-2] + b" }", env.payload_type, env.signatures)
        with pytest.raises(Exception, match="Found: 0"):
            bad.verify([key], 1)


def test_same_lock_same_statement_bytes(built, tmp_path):
    """Two real builds of the same lock and epoch write the same statements, byte for byte."""
    outs = [tmp_path / "one", tmp_path / "two"]
    for out in outs:
        built.cli("build", "--cross", "--artifacts", str(out))
    names = sorted(p.name for p in outs[0].glob("provenance.linux-*.json"))
    assert names
    for name in names:
        one, two = ((out / name).read_bytes() for out in outs)
        if one != two:
            # The statement names the builder's git HEAD: in this shared work tree another
            # commit may land between the two builds. Only that field may then differ.
            docs = [json.loads(x) for x in (one, two)]
            revs = [d["predicate"]["buildDefinition"]["internalParameters"].pop("sourceRevision")
                    for d in docs]
            assert revs[0] != revs[1] and docs[0] == docs[1], name


def test_verify_names_the_signer_and_shows_provenance(built, tmp_path):
    out, pub = _signed(built, tmp_path)
    fp = provenance.fingerprint(sign.load_public_key(pub))
    trust = tmp_path / "trust.yaml"
    trust.write_text(f'keys:\n  "{fp}": "release team (2026 key)"\n')
    res = _verify(out, "--public-key", str(pub), "--require-signature", "--trust", str(trust),
                  "--lock", str(built.lock), "--show-provenance")
    assert res.returncode == 0, res.stderr
    assert f"signed by {fp} (release team (2026 key), from the trust file)" in res.stderr
    assert "subjects match; lock sha256 sha256:" in res.stderr
    assert "built from" in res.stdout and "builder: 0.1.0 at revision" in res.stdout
    assert "inputs: " in res.stdout and "oci://" in res.stdout
    # A trust file that does not know the key: refused, the fingerprint named.
    trust.write_text('keys:\n  "sha256:' + "0" * 64 + '": "someone else"\n')
    res = _verify(out, "--public-key", str(pub), "--trust", str(trust))
    assert res.returncode != 0 and f"key {fp} is not in the trust file" in res.stderr
    # A malformed trust file: which entry, what is expected.
    trust.write_text('keys:\n  "abc": "x"\n')
    res = _verify(out, "--public-key", str(pub), "--trust", str(trust))
    assert res.returncode != 0 and "'abc' is not a fingerprint" in res.stderr
    # Another lock than the one the release was built from.
    other = tmp_path / "other.lock"
    other.write_bytes(built.lock.read_bytes() + b"# changed\n")
    res = _verify(out, "--public-key", str(pub), "--lock", str(other))
    assert res.returncode != 0 and "built from a lock with sha256" in res.stderr


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("target", ["artifact", "statement", "envelope"])
def test_a_flipped_byte_fails_verify(built, tmp_path, target):
    out, pub = _signed(built, tmp_path)
    arch = sorted(out.glob("sha256sum-*.txt"))[0].name.removeprefix("sha256sum-")[:-4]
    path = {"artifact": next(out.glob(f"*-images-all.linux-{arch}.txt")),
            "statement": out / provenance.statement_name(arch),
            "envelope": out / provenance.envelope_name(arch)}[target]
    _flip(path, len(path.read_bytes()) // 2)
    res = _verify(out, "--public-key", str(pub), "--require-signature")
    assert res.returncode != 0
    assert path.name in res.stderr


def test_a_statement_missing_a_subject_fails_verify(built, tmp_path):
    """Re-summed and re-signed, so only the subject check can catch it."""
    out = _copy(built, tmp_path)
    arch = sorted(out.glob("sha256sum-*.txt"))[0].name.removeprefix("sha256sum-")[:-4]
    path = out / provenance.statement_name(arch)
    doc = json.loads(path.read_bytes())
    dropped = doc["subject"].pop(0)["name"]
    path.write_bytes(provenance.canonical(doc))
    sums = out / checksums.checksum_name(arch)
    checksums.write(sums, [out / e.name for e in checksums.parse_file(sums)])
    keys = sign.generate_key(tmp_path / "k.pem", allow_unencrypted=True)
    built.cli("sign", "--artifacts", str(out), "--key", str(keys.private))
    res = _verify(out, "--public-key", str(keys.public), "--arch", arch)
    assert res.returncode != 0
    assert f"artifact {dropped} is not a subject of the statement" in res.stderr
