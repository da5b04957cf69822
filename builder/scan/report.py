"""What a person reads: the markdown summary (a table per failing target) and a short terminal
table with the same rows. Trivy's own JSON, SARIF and CycloneDX files sit next to it."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

from builder.scan.findings import ScanTarget
from builder.scan.gate import Decision, Verdict
from builder.scan.policy import Policy

_OUTCOME_WORD = {"fail": "fails", "accepted": "accepted", "vex": "not affected", "ignored": "ignored"}
_TERMINAL_WORD = {"fail": "FAIL", "accepted": "ACCEPTED", "vex": "VEX", "ignored": "ignored"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or "-"


def _table(decisions: Sequence[Decision]) -> list[str]:
    rows = ["| Package | ID | Severity | Installed | Fixed | Why |",
            "|---|---|---|---|---|---|"]
    for d in decisions:
        f = d.finding
        rows.append("| " + " | ".join(_cell(x) for x in (
            f.package, f.id, f.severity, f.installed, f.fixed,
            f"{_OUTCOME_WORD[d.outcome]}: {d.reason}")) + " |")
    return rows


def summary_markdown(verdict: Verdict, targets: Sequence[ScanTarget], policy: Policy,
                     header: dict[str, str]) -> str:
    by_target: dict[str, list[Decision]] = defaultdict(list)
    for d in verdict.decisions:
        by_target[d.finding.target.label].append(d)
    totals = Counter(d.outcome for d in verdict.decisions)
    images = sum(1 for t in targets if t.kind == "image")
    lines = [f"# Security scan: {'PASS' if verdict.passed else 'FAIL'}", ""]
    lines.append(f"- Scanned {len(targets)} target(s) ({images} image(s), {len(targets) - images} "
                 f"file tree(s)) in {verdict.seconds:.1f} s")
    for key, value in header.items():
        lines.append(f"- {key}: {value}")
    lines.append(f"- Policy `{policy.path.name}` ({policy.sha256}): fails on "
                 f"{', '.join(policy.fail_severities) or 'no severity'}; unfixed findings "
                 f"{'count' if policy.fail_unfixed else 'do not count'}; secrets "
                 f"{'always fail' if policy.fail_secrets else 'fail by severity'}")
    lines.append(f"- Findings: {totals['fail']} failing, {totals['accepted']} accepted, "
                 f"{totals['vex']} not affected (VEX), {totals['ignored']} below the gate")
    if verdict.problems:
        lines += ["", "## Policy problems", ""] + [f"- {p}" for p in verdict.problems]
    if verdict.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in verdict.warnings]
    failing = [t for t in targets if any(d.outcome == "fail" for d in by_target[t.label])]
    for t in failing:
        shown = [d for d in by_target[t.label] if d.outcome != "ignored"]
        lines += ["", f"## {t.label}: FAIL", ""]
        lines += _reports_line(verdict, t)
        lines += _table(shown)
    noted = [t for t in targets if t not in failing
             and any(d.outcome in ("accepted", "vex") for d in by_target[t.label])]
    if noted:
        lines += ["", "## Passing targets with accepted or not-affected findings"]
        for t in noted:
            lines += ["", f"### {t.label}", ""]
            lines += _table([d for d in by_target[t.label] if d.outcome in ("accepted", "vex")])
    lines += ["", "## All targets", "", "| Target | Kind | Result | Failing | Accepted | VEX | "
              "Below gate | Reports |", "|---|---|---|---|---|---|---|---|"]
    for t in targets:
        c = Counter(d.outcome for d in by_target[t.label])
        files = ", ".join(f"`{name}`" for name in verdict.reports.get(t.label, {}).values())
        lines.append(f"| {_cell(t.label)} | {t.kind} | {'FAIL' if c['fail'] else 'pass'} | "
                     f"{c['fail']} | {c['accepted']} | {c['vex']} | {c['ignored']} | {files} |")
    return "\n".join(lines) + "\n"


def _reports_line(verdict: Verdict, target: ScanTarget) -> list[str]:
    files = verdict.reports.get(target.label, {})
    if not files:
        return []
    return ["Reports: " + ", ".join(f"`{name}`" for name in files.values()), ""]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def terminal_table(verdict: Verdict, limit: int = 40) -> str:
    """The same rows as the summary, short: failing first, then accepted / not affected."""
    rows = [d for d in verdict.decisions if d.outcome in ("fail", "accepted", "vex")]
    lines = []
    if rows:
        table = [("RESULT", "TARGET", "PACKAGE", "ID", "SEV", "INSTALLED→FIXED", "WHY")]
        for d in rows[:limit]:
            f = d.finding
            version = f"{f.installed}→{f.fixed or '(none)'}" if f.kind == "vuln" else ""
            table.append((_TERMINAL_WORD[d.outcome], _clip(f.target.label, 40),
                          _clip(f.package, 30), f.id, f.severity, _clip(version, 28),
                          _clip(d.reason, 70)))
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
        for r in table:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True))
                         + "  " + r[-1])
        if len(rows) > limit:
            lines.append(f"... {len(rows) - limit} more rows in {verdict.summary_path}")
    lines += [f"problem: {p}" for p in verdict.problems]
    lines += [f"warning: {w}" for w in verdict.warnings]
    totals = Counter(d.outcome for d in verdict.decisions)
    lines.append(f"scan {'PASSED' if verdict.passed else 'FAILED'}: {totals['fail']} failing, "
                 f"{totals['accepted']} accepted, {totals['vex']} not affected (VEX), "
                 f"{totals['ignored']} below the gate; summary: {verdict.summary_path}")
    return "\n".join(lines)
