"""`make ci`'s first step: can this host run the build step (fetch, build, scan of the lock)?

The build step needs its inputs and a vulnerability database. Inputs come from the lock's own hosts
(a connected host) or from the mirrors in the file BUILDER_MIRRORS names; the database from
BUILDER_TRIVY_DB (a directory) or BUILDER_TRIVY_DB_REF (an OCI mirror of trivy-db:2): the scan never
downloads one. When one is missing, this says so before lint and the tests spend minutes on a run
whose last step must fail, and points at `make demo`, which needs neither.

Exit 0: the build step can start; 2: it cannot, with what to provide.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from builder.errors import BuilderError
from builder.fetch.registry import UPSTREAM_API
from builder.lock import lockfile
from builder.scan.command import ENV_DB, ENV_DB_REF

TIMEOUT = 3.0  # seconds per host, all hosts at once
NEEDS = f"""\
It needs a connected host, or mirrors for the lock's files and registries in a file named by
BUILDER_MIRRORS (README: "Mirrors"); and a vulnerability database: {ENV_DB}=DIR (trivy.db +
metadata.json) or {ENV_DB_REF}=REPO@sha256:... (an OCI mirror of trivy-db:2).
Without internet, `make demo` runs the whole pipeline through a loopback mirror, and
`make lint test` runs the checks alone."""


def lock_hosts(lock: lockfile.Lock) -> set[tuple[str, int]]:
    """(host, port) of every file URL and registry `fetch` reaches for this lock."""
    hosts: set[tuple[str, int]] = set()
    for comp in lock.components.values():
        for art in comp.arches.values():
            if art.url and not art.absent:
                url = urlsplit(art.url)
                hosts.add((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)))
    for image in lock.images:
        if not image.daemon:
            ref = image.reference
            api = urlsplit(f"//{UPSTREAM_API.get(ref.host, ref.host)}")
            hosts.add((api.hostname or "", api.port or 443))
    return hosts


def _connect(host: tuple[str, int]) -> str | None:
    try:
        socket.create_connection(host, timeout=TIMEOUT).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    return None


def unreachable(hosts: set[tuple[str, int]]) -> list[str]:
    """`host:port (why)` for each host a TCP connection fails to (the builder uses no proxy)."""
    ordered = sorted(hosts)
    with ThreadPoolExecutor(max_workers=16) as pool:
        errors = list(pool.map(_connect, ordered))
    return [f"{h}:{p} ({err})" for (h, p), err in zip(ordered, errors, strict=True) if err]


def problems(lock_path: Path, env: dict[str, str]) -> list[str]:
    found = []
    mirrors = env.get("BUILDER_MIRRORS")
    if mirrors and not Path(mirrors).is_file():
        found.append(f"BUILDER_MIRRORS names {mirrors}, which is not a file")
    elif not mirrors:
        down = unreachable(lock_hosts(lockfile.load(lock_path)))
        if down:
            found.append(f"no mirrors (BUILDER_MIRRORS is not set) and no connection to "
                         f"{len(down)} of the lock's hosts: {', '.join(down)}")
    if not env.get(ENV_DB) and not env.get(ENV_DB_REF):
        found.append(f"no vulnerability database ({ENV_DB} and {ENV_DB_REF} are not set)")
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/preflight.py", description=__doc__.split("\n")[0])
    ap.add_argument("--lock", type=Path, default=Path("images.lock"), help="default: images.lock")
    args = ap.parse_args(argv)
    try:
        found = problems(args.lock, dict(os.environ))
    except BuilderError as exc:
        found = [str(exc)]
    if not found:
        return 0
    print(f"make ci: the build step (fetch, build, scan of {args.lock}) cannot run on this host:",
          file=sys.stderr)
    for problem in found:
        print(f"  - {problem}", file=sys.stderr)
    print(NEEDS, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
