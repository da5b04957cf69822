"""The operator's local trust file: which release key fingerprint belongs to whom.

`verify --trust FILE` names the signer with it. The file is YAML (so JSON too), kept by the
operator beside the public keys they received out of band, never taken from the release media::

    keys:
      "sha256:3f1c...e9": "release team (key 2026)"

A fingerprint is ``sha256:`` and 64 lowercase hex, as `keygen` and `sign` print it (sha256 of the
key's DER SubjectPublicKeyInfo); a name is one line of text.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from builder import digest as dg
from builder.errors import BuilderError
from builder.trust import checksums

TRUST_LIMIT = 1 << 20
NAME_MAX = 200


class TrustFileError(BuilderError):
    """The trust file cannot be read or is not in the documented format."""


_HINT = ('expected `keys:` mapping "sha256:<64 hex>" (as keygen prints) to a name; '
         "see README, section Provenance")


def load(path: Path) -> dict[str, str]:
    """fingerprint → name, every entry checked."""
    raw = checksums.read_regular(path, TRUST_LIMIT, "trust file",
                                 missing_hint="give --trust the path of your own trust file "
                                              "(kept off the release media); see README, "
                                              "section Provenance")
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise TrustFileError(f"{path}: not valid YAML/JSON: {str(exc)[:200]}", _HINT) from None
    if not isinstance(data, dict) or set(data) != {"keys"} or not isinstance(data["keys"], dict):
        raise TrustFileError(f"{path}: expected one top-level key `keys`", _HINT)
    out: dict[str, str] = {}
    for fp, name in data["keys"].items():
        if not dg.is_digest(fp):
            raise TrustFileError(f"{path}: keys: {str(fp)[:80]!r} is not a fingerprint", _HINT)
        if not isinstance(name, str) or not name.strip() or len(name) > NAME_MAX \
                or not name.isprintable():
            raise TrustFileError(f"{path}: keys.{fp}: the name must be one printable line of at "
                                 f"most {NAME_MAX} characters, got {str(name)[:80]!r}", _HINT)
        out[fp] = name.strip()
    return out
