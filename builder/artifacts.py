"""The release's rules shared by the builder, `verify` and `install.sh`.

Only rules that must agree across the three live here; `tests/test_artifacts.py` pins them against
upstream's real values and against what `install.sh` computes.
"""

from __future__ import annotations

import hashlib


def _without_registry(ref: str) -> str:
    """The reference as the supervisor's compile-time default spells it: no registry host.

    Docker's naming rule: the first path component is a registry host when it holds a '.' or ':'
    or is ``localhost``.
    """
    first, sep, rest = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return rest
    return ref


def data_key(runtime_ref: str) -> str:
    """The directory name under ``DATA_DIR/data`` the supervisor gives a runtime image.

    Upstream's ``releaseRefDigest`` (rancher/rke2 ``pkg/bootstrap``) hashes the text of the
    reference it was built with, ``rancher/rke2-runtime:TAG`` — the registry a node pulls from
    does not change the key. So: TAG, '-', the first 12 hex digits of sha256 of the reference
    without its registry host.
    """
    path = _without_registry(runtime_ref)
    repo, sep, tag = path.rpartition(":")
    if not sep or "/" in tag or "@" in path:
        raise ValueError(f"runtime image {runtime_ref!r} is not a reference by tag")
    return f"{tag}-{hashlib.sha256(path.encode()).hexdigest()[:12]}"
