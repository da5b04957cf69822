"""The gate: decide each finding under the policy, the verdict, the recorded status the release
step checks (``require_passed``).

status.json (``<artifacts>/scan/status.json``) is written last by a scan, after every report, and
removed when a scan starts, so a crashed or interrupted scan never leaves an old "pass" behind.
It records what the verdict covered (the sha256 of the lock and checksum files, each target's
digest), so a release of artifacts changed after the scan is refused too.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from builder import digest as dg
from builder.errors import BuilderError
from builder.scan.findings import Finding
from builder.scan.policy import Policy
from builder.scan.vex import Subject, VexIndex
from builder.store import write_atomic

STATUS_SCHEMA = 1
STATUS_FILE = "status.json"
SUMMARY_FILE = "summary.md"
SCAN_SUBDIR = "scan"

Outcome = Literal["fail", "accepted", "vex", "ignored"]


class ScanFailed(BuilderError):
    """The gate failed: findings the policy does not accept (a distinct exit code for CI)."""

    exit_code = 3


class ScanNotPassed(BuilderError):
    """The release step found no passing scan for the artifacts it would publish."""


@dataclass(frozen=True)
class Decision:
    finding: Finding
    outcome: Outcome
    reason: str
    rule: str = ""  # the acceptance or VEX statement that decided it, e.g. "accepted[2] (CVE-…)"


@dataclass
class Verdict:
    passed: bool
    decisions: list[Decision]
    problems: list[str]  # policy-level failures (expired acceptances)
    warnings: list[str]
    out_dir: Path
    status_path: Path
    summary_path: Path
    seconds: float = 0.0
    reports: dict[str, dict[str, str]] = field(default_factory=dict)  # target label → files

    @property
    def failing(self) -> list[Decision]:
        return [d for d in self.decisions if d.outcome == "fail"]

    def raise_if_failed(self) -> None:
        if self.passed:
            return
        lines = [f"{d.finding.target.label}: {d.finding.package} {d.finding.id} "
                 f"{d.finding.severity}: {d.reason}" for d in self.failing[:20]]
        if len(self.failing) > 20:
            lines.append(f"... and {len(self.failing) - 20} more")
        lines += self.problems
        raise ScanFailed(f"scan gate failed: {len(self.failing)} finding(s) the policy does not "
                         f"accept, {len(self.problems)} policy problem(s)\n  " + "\n  ".join(lines),
                         f"see {self.summary_path}; fix, accept (with a justification and an "
                         "expiry) in scan-policy.yaml, or record a VEX not_affected statement")


def _counts(policy: Policy, f: Finding) -> tuple[bool, str]:
    """Does the finding count against the gate, and in words why (or why not)."""
    if f.kind == "secret":
        if policy.fail_secrets or f.severity in policy.fail_severities:
            return True, f"secret ({f.title or f.id}) in {f.where}"
        return False, f"secret of severity {f.severity}; the policy fails secrets only by severity"
    if f.severity not in policy.fail_severities:
        return False, f"severity {f.severity} is below the gate ({', '.join(policy.fail_severities)})"
    if f.unfixed and not policy.fail_unfixed:
        return False, "no fixed version yet; the policy does not count unfixed findings"
    if f.unfixed:
        return True, f"{f.severity}, no fix available (the policy counts unfixed findings)"
    return True, f"{f.severity}, fixed in {f.fixed}"


def decide(findings: Iterable[Finding], policy: Policy, vex: VexIndex,
           today: dt.date) -> list[Decision]:
    out = []
    for f in findings:
        if f.kind == "vuln":
            statement = vex.clearing(Subject(f.target.name, f.target.digest, f.id, f.purl))
            if statement is not None:
                out.append(Decision(f, "vex", statement.reason, statement.label))
                continue
        counts, why = _counts(policy, f)
        if not counts:
            out.append(Decision(f, "ignored", why))
            continue
        matches = [a for a in policy.accepted if a.matches(f.id, f.target.name, f.package)]
        live = [a for a in matches if not a.expired(today)]
        if live:
            a = live[0]
            out.append(Decision(f, "accepted", f"{a.label}, until {a.expires}: {a.justification}",
                                a.label))
        elif matches:
            a = matches[0]
            out.append(Decision(f, "fail", f"{why}; acceptance {a.label} expired on {a.expires}",
                                a.label))
        else:
            out.append(Decision(f, "fail", why))
    order = {"fail": 0, "accepted": 1, "vex": 2, "ignored": 3}
    sev = {"CRITICAL": 0, "HIGH": 1, "MEDIUM": 2, "LOW": 3, "UNKNOWN": 4}
    out.sort(key=lambda d: (d.finding.target.label, order[d.outcome],
                            sev.get(d.finding.severity, 5), d.finding.package, d.finding.id))
    return out


def policy_problems(policy: Policy, today: dt.date) -> list[str]:
    """An expired acceptance fails the gate even when nothing matches it any more: it is a
    promise to look again that has come due."""
    return [f"{policy.path.name}: {a.label} expired on {a.expires}: renew it with a fresh "
            "justification or remove it" for a in policy.expired(today)]


def unused_acceptances(policy: Policy, decisions: list[Decision], today: dt.date) -> list[str]:
    used = {d.rule for d in decisions if d.outcome == "accepted"}
    return [f"{policy.path.name}: {a.label} matched no finding; remove it if it is obsolete"
            for a in policy.accepted if a.label not in used and not a.expired(today)]


# -- the recorded status -----------------------------------------------------------------------

def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def covered_entry(path: Path, base: Path) -> tuple[str, str]:
    """(name relative to ``base`` when inside it, sha256) of a file the verdict covers."""
    path = Path(path)
    try:
        name = str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        name = str(path.resolve())
    return name, dg.of_file(path)[0]


def _resolve_covered(name: str, artifacts_dir: Path) -> Path:
    p = Path(name)
    return p if p.is_absolute() else artifacts_dir / p


def require_passed(artifacts_dir: Path, override: bool = False, reason: str | None = None,
                   now: dt.datetime | None = None) -> None:
    """For the release step: refuse ``artifacts_dir`` unless its scan passed and still covers the
    files it names. With ``override`` the problem is recorded (status.json ``override`` and a
    section in summary.md) instead of raised."""
    artifacts_dir = Path(artifacts_dir)
    scan_dir = artifacts_dir / SCAN_SUBDIR
    status_path = scan_dir / STATUS_FILE
    problems: list[str] = []
    status: dict[str, Any] | None = None
    try:
        status = json.loads(status_path.read_text())
        if not isinstance(status, dict) or status.get("schema") != STATUS_SCHEMA:
            problems.append(f"{status_path}: not a scan status file (schema {STATUS_SCHEMA})")
            status = None
    except FileNotFoundError:
        problems.append(f"{status_path}: missing: the artifacts were never scanned, or the last "
                        "scan did not finish")
    except (ValueError, UnicodeDecodeError):
        problems.append(f"{status_path}: not valid JSON")
    if status is not None:
        if status.get("verdict") != "pass":
            failing = status.get("failing") or []
            names = ", ".join(f"{f.get('target')}: {f.get('package')} {f.get('id')}"
                              for f in failing[:5])
            problems.append(f"the scan of {artifacts_dir} failed ({len(failing)} finding(s)"
                            + (f": {names}" if names else "") + ")")
        for name, digest in sorted((status.get("covered") or {}).items()):
            path = _resolve_covered(name, artifacts_dir)
            if not path.is_file():
                problems.append(f"{name}: covered by the scan but gone now")
            elif dg.of_file(path)[0] != digest:
                problems.append(f"{name}: changed since the scan (scanned {digest})")
    if not problems:
        return
    if not override:
        raise ScanNotPassed(f"release refused: {problems[0]}"
                            + "".join(f"\n  {p}" for p in problems[1:]),
                            "run `python -m builder scan` on these artifacts; to release anyway, "
                            "pass the explicit override (it is recorded in the scan summary)")
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    record = {"at": stamp, "reason": reason or "", "problems": problems}
    data: dict[str, Any] = (status if status is not None
                            else {"schema": STATUS_SCHEMA, "verdict": "missing"})
    data.setdefault("overrides", []).append(record)
    data["override"] = record
    write_json_atomic(status_path, data)
    summary = scan_dir / SUMMARY_FILE
    lines = [f"\n## Release override ({stamp})\n",
             "The release step was told to publish these artifacts despite:\n"]
    lines += [f"- {p}" for p in problems]
    if reason:
        lines.append(f"\nReason given: {reason}")
    with open(summary, "a") as fh:
        fh.write("\n".join(lines) + "\n")
