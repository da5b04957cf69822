"""Build provenance: an in-toto Statement v1 with the SLSA provenance v1 predicate, per arch, and
its DSSE envelope (issue 17). This module reads, wraps and checks them, with no lock: the format's
names, the DSSE envelope (made by ``sign``, opened by ``verify``), the statement's parse, subjects
and lock digest. The statement itself is written from the lock by ``builder.assemble.provenance``.

- ``build`` writes the statement ``provenance.linux-ARCH.json``: its subjects are every other
  artifact the arch's checksum file lists, with their sha256; the build definition names the lock
  (sha256 of its bytes and of its canonical content), the parameters and every input with its
  digest. No wall-clock time and canonical JSON (sorted keys, no spaces): the same lock, epoch
  and builder give the same bytes. It is listed in ``sha256sum-ARCH.txt`` like any artifact, so
  the signed checksum file covers it too.
- ``sign`` wraps those bytes in a DSSE envelope ``provenance.linux-ARCH.dsse.json`` signed with
  the release key (the one place the key is used), keyid = the key's fingerprint (sha256 of its
  DER SubjectPublicKeyInfo). The envelope is not listed in the checksum file (it is written after
  it, like ``.sig``); its own signature vouches for it.

DSSE: https://github.com/secure-systems-lab/dsse/blob/master/protocol.md (PAE below).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from builder import digest as dg
from builder.artifacts import envelope_name, statement_name
from builder.errors import BuilderError
from builder.oci.model import canonical_json, load_json_object
from builder.store import write_atomic
from builder.trust import checksums
from builder.trust.keys import PrivateKey, PublicKey, SignatureInvalid, sign_bytes, verify_bytes

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_LIMIT = 4 << 20  # a few hundred inputs: tens of KB; anything near this is not ours
ENVELOPE_LIMIT = 8 << 20


class ProvenanceError(BuilderError):
    """A provenance statement or envelope cannot be made, read or trusted."""


def canonical(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no spaces, ASCII; the same data gives the same bytes."""
    return canonical_json(obj)  # the project's one serialisation (builder/oci/model.py)


def fingerprint(key: PublicKey) -> str:
    """sha256 of the DER SubjectPublicKeyInfo: what people compare over a second channel."""
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return dg.of_bytes(der)


# -- DSSE -----------------------------------------------------------------------------------------

def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is actually signed."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def envelope(payload: bytes, key: PrivateKey) -> bytes:
    """A DSSE envelope of ``payload`` signed by ``key`` (Ed25519 raw / ECDSA P-256 DER sig)."""
    sig = sign_bytes(pae(PAYLOAD_TYPE, payload), key)
    return canonical({
        "payload": base64.b64encode(payload).decode(),
        "payloadType": PAYLOAD_TYPE,
        "signatures": [{"keyid": fingerprint(key.public_key()),
                        "sig": base64.b64encode(sig).decode()}],
    })


def sign_statements(directory: Path, key: PrivateKey) -> list[Path]:
    """An envelope for every arch's statement that its checksum file lists with these bytes."""
    written = []
    for sums in sorted(directory.glob("sha256sum-*.txt")):
        arch = sums.name.removeprefix("sha256sum-").removesuffix(".txt")
        name = statement_name(arch)
        listed = {e.name: e.hex for e in checksums.parse_file(sums)}
        if name not in listed:
            continue  # a release built before provenance existed: nothing to wrap
        data = checksums.read_regular(directory / name, STATEMENT_LIMIT, "provenance statement")
        if dg.hex_of(dg.of_bytes(data)) != listed[name]:
            raise ProvenanceError(f"{directory / name}: does not match its line in {sums.name}",
                                  "rebuild: the statement was changed after the build")
        path = directory / envelope_name(arch)
        write_atomic(path, envelope(data, key))
        written.append(path)
    return written


@dataclass(frozen=True)
class Opened:
    payload: bytes
    keyid: str


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise ProvenanceError(f"{what} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProvenanceError(f"{what} is not valid base64") from None


def _json_object(raw: bytes, name: str) -> dict[str, Any]:
    """A JSON object from the media, size- and depth-capped like every document we parse."""
    try:
        return load_json_object(raw, name)
    except UnicodeDecodeError:
        raise ProvenanceError(f"{name}: not JSON") from None
    except BuilderError as exc:
        raise ProvenanceError(exc.message, exc.hint) from None


def open_envelope(raw: bytes, key: PublicKey, name: str = "envelope") -> Opened:
    """The payload of a DSSE envelope if one of its signatures verifies with ``key``."""
    doc = _json_object(raw, name)
    if doc.get("payloadType") != PAYLOAD_TYPE:
        raise ProvenanceError(f"{name}: payloadType is not {PAYLOAD_TYPE}")
    payload = _b64(doc.get("payload"), f"{name}: payload")
    sigs = doc.get("signatures")
    if not isinstance(sigs, list) or not sigs:
        raise ProvenanceError(f"{name}: no signatures")
    want = fingerprint(key)
    message = pae(PAYLOAD_TYPE, payload)
    for i, entry in enumerate(sigs):
        if not isinstance(entry, dict):
            raise ProvenanceError(f"{name}: signatures[{i}] is not an object")
        sig = _b64(entry.get("sig"), f"{name}: signatures[{i}].sig")
        try:
            verify_bytes(message, sig, key, Path(name), Path(name))
        except SignatureInvalid:
            continue
        return Opened(payload, str(entry.get("keyid", want)))
    raise ProvenanceError(f"{name}: no signature verifies with the given public key "
                          f"({want}): changed, or signed by another key")


def parse_statement(raw: bytes, name: str) -> dict[str, Any]:
    """A statement's JSON, its type and predicate type checked, subjects well-formed."""
    doc = _json_object(raw, name)
    if doc.get("_type") != STATEMENT_TYPE:
        raise ProvenanceError(f"{name}: _type is not {STATEMENT_TYPE}")
    if doc.get("predicateType") != PREDICATE_TYPE:
        raise ProvenanceError(f"{name}: predicateType is not {PREDICATE_TYPE}")
    subjects = doc.get("subject")
    if not isinstance(subjects, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("digest"), dict)
            and dg.is_hex64(s["digest"].get("sha256")) for s in subjects):
        raise ProvenanceError(f"{name}: subject is not a list of {{name, digest: {{sha256}}}}")
    if not isinstance(doc.get("predicate"), dict):
        raise ProvenanceError(f"{name}: no predicate")
    return doc


def subjects_of(doc: Mapping[str, Any]) -> dict[str, str]:
    return {s["name"]: s["digest"]["sha256"] for s in doc["subject"]}


def build_definition(doc: Mapping[str, Any]) -> dict[str, Any]:
    bd = doc["predicate"].get("buildDefinition")
    return bd if isinstance(bd, dict) else {}


def describe(doc: Mapping[str, Any]) -> list[str]:
    """What `verify --show-provenance` prints: what the arch was built from."""
    bd = build_definition(doc)
    ext = bd.get("externalParameters") or {}
    internal = bd.get("internalParameters") or {}
    lock = ext.get("lock") or {}
    deps = bd.get("resolvedDependencies") or []
    scanner = internal.get("scanner")
    lines = [
        f"lock: sha256 {lock.get('sha256')}, content {lock.get('contentSha256')}",
        f"release: {(ext.get('release') or {}).get('name')} {(ext.get('release') or {}).get('version')}; "
        f"arches {', '.join(map(str, ext.get('arches') or []))}; "
        f"SOURCE_DATE_EPOCH={ext.get('SOURCE_DATE_EPOCH')}",
        f"builder: {internal.get('builderVersion')} at revision {internal.get('sourceRevision')}",
        "scanner: " + (f"trivy {scanner.get('version')} sha256 {scanner.get('sha256')}"
                       if isinstance(scanner, dict) else "none recorded"),
        f"inputs: {len(deps)}",
    ]
    for d in deps:
        if isinstance(d, dict):
            lines.append(f"  {d.get('name')}: {d.get('uri')} sha256:{(d.get('digest') or {}).get('sha256')}")
    return lines


def lock_sha256(doc: Mapping[str, Any]) -> str | None:
    """The sha256 of the lock file the statement says the arch was built from."""
    lock = (build_definition(doc).get("externalParameters") or {}).get("lock") or {}
    value = lock.get("sha256") if isinstance(lock, dict) else None
    return value if isinstance(value, str) else None
