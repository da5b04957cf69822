"""The scan step: check everything first, run Trivy once per target, decide, write the reports and
the status file last.

Everything that can be wrong before scanning (targets, policy and its VEX documents, the
database, the database's age under strict mode, Trivy itself) is checked before the first Trivy
run, so a bad input costs no scan time. Trivy runs once per target for JSON; SARIF, CycloneDX and
SPDX are converted from that JSON with ``trivy convert`` (no second scan).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from builder.errors import BuilderError
from builder.scan import gate, report
from builder.scan import trivy as tv
from builder.scan.db import TrivyDatabase
from builder.scan.findings import Finding, ScanTarget, parse_report
from builder.scan.gate import Verdict
from builder.scan.policy import Policy
from builder.scan.vex import VexIndex
from builder.store import write_atomic

DEFAULT_OUT = Path("artifacts") / "scan"
DEFAULT_JOBS = min(2, os.cpu_count() or 1)  # Trivy runs at once (each target's scan + conversions)
# file kind → (suffix, trivy convert format); JSON comes from the scan itself.
CONVERSIONS = {"sarif": (".sarif", "sarif"), "cyclonedx": (".cdx.json", "cyclonedx"),
               "spdx": (".spdx.json", "spdx-json")}


def check_targets(targets: Sequence[ScanTarget]) -> None:
    if not targets:
        raise BuilderError("scan: nothing to scan", "build the images and the bundle first")
    slugs: dict[str, ScanTarget] = {}
    for t in targets:
        if t.kind == "image":
            ok = (t.path.is_dir() and (t.path / "oci-layout").is_file()) or (
                t.path.is_file() and t.path.name.endswith((".tar", ".tar.gz", ".tgz")))
            if not ok:
                raise BuilderError(
                    f"scan: {t.label}: {t.path} is not a docker-archive .tar(.gz) or an OCI "
                    "layout directory", "Trivy reads neither .tar.zst nor OCI-only tars; prepare "
                    "one layout per image (builder.scan.targets.image_targets)")
        elif t.kind == "rootfs":
            if not t.path.is_dir():
                raise BuilderError(f"scan: {t.label}: {t.path} is not a directory",
                                   "a rootfs target is an extracted file tree")
        else:
            raise BuilderError(f"scan: {t.label}: unknown kind {t.kind!r}", "use image or rootfs")
        if t.slug in slugs:
            raise BuilderError(f"scan: {t.label} and {slugs[t.slug].label} would share report "
                               f"files ({t.slug})", "give every target a distinct name and arch")
        slugs[t.slug] = t


def _scan_args(trivy: tv.Trivy, target: ScanTarget, policy: Policy, cache: Path,
               output: Path, debug: bool) -> list[str]:
    common = trivy.offline_args(cache) + trivy.hermetic_args() + [
        "--scanners", ",".join(policy.scanners), "--format", "json", "--output", str(output),
        "--no-progress",
    ]
    if debug:
        common.append("--debug")
    if target.kind == "image":
        return ["image", *common, "--input", str(target.path)]
    return ["rootfs", *common, str(target.path)]


def scan(targets: Sequence[ScanTarget], policy: Policy, db: TrivyDatabase, out_dir: Path,
         trivy: tv.Trivy, *, covers: Sequence[Path] = (), strict: bool | None = None,
         now: dt.datetime | None = None, debug: bool = False, jobs: int = DEFAULT_JOBS,
         echo: Callable[[str], None] | None = None) -> Verdict:
    """Scan ``targets`` and write reports, summary.md and status.json into ``out_dir``.

    ``covers`` are files the verdict vouches for (images.lock, sha256sum-ARCH.txt): their sha256
    goes into status.json and ``require_passed`` checks them again before a release.
    Raises BuilderError before any scan for bad input; returns the verdict otherwise (call
    ``verdict.raise_if_failed()`` for the non-zero exit).
    """
    say = echo or (lambda _msg: None)
    now = now or dt.datetime.now(dt.UTC)
    today = now.date()
    strict = policy.strict if strict is None else strict
    out_dir = Path(out_dir)

    # Any scan attempt voids the previous verdict: no stale "pass" survives one that fails or
    # stops halfway (status.json is written again only at the very end).
    status_path = out_dir / gate.STATUS_FILE
    status_path.unlink(missing_ok=True)

    # -- everything checked before the first scan --------------------------------------------
    check_targets(targets)
    vex = VexIndex.load(policy.vex)
    warnings = []
    age_warning = db.check_age(policy.max_age_days, strict, now)
    if age_warning:
        warnings.append(age_warning)
        say(f"warning: {age_warning}")
    covered = dict(gate.covered_entry(p, out_dir.parent) for p in covers)
    say(f"trivy {trivy.version_text} ({trivy.path}, {trivy.source}); database {db.source}, "
        f"updated {db.metadata.to_json()['updated_at']}")

    out_dir.mkdir(parents=True, exist_ok=True)
    logs = out_dir / "logs"
    start = time.monotonic()
    findings: list[Finding] = []
    reports: dict[str, dict[str, str]] = {}
    cache = Path(tempfile.mkdtemp(prefix=".trivy-cache-", dir=out_dir))
    try:
        db.install(cache)

        def one(target: ScanTarget) -> tuple[dict[str, str], list[Finding], float]:
            t0 = time.monotonic()
            files = _scan_one(trivy, target, policy, cache, out_dir, logs, debug)
            data = json.loads((out_dir / files["json"]).read_text())
            return files, parse_report(data, target, files["json"]), time.monotonic() - t0

        # Trivy processes are mostly single-threaded start-up and I/O for images this size, so
        # a couple at once keep both cores busy; results are collected in target order.
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for target, (files, found, took) in zip(targets, pool.map(one, targets), strict=True):
                reports[target.label] = files
                findings += found
                say(f"scanned {target.label}: {len(found)} finding(s) in {took:.1f} s")
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    decisions = gate.decide(findings, policy, vex, today)
    problems = gate.policy_problems(policy, today)
    warnings += gate.unused_acceptances(policy, decisions, today)
    passed = not problems and not any(d.outcome == "fail" for d in decisions)
    verdict = gate.Verdict(passed, decisions, problems, warnings, out_dir, status_path,
                           out_dir / gate.SUMMARY_FILE, time.monotonic() - start, reports)

    header = {
        "Trivy": f"{trivy.version_text} (`{trivy.path}`, sha256 {trivy.sha256}, {trivy.source})",
        "Database": f"{db.source}, updated {db.metadata.to_json()['updated_at']}"
                    + (f", digest {db.digest}" if db.digest else ""),
        "Date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    write_atomic(verdict.summary_path, report.summary_markdown(verdict, targets, policy, header).encode())
    gate.write_json_atomic(out_dir / "findings.json", [_decision_json(d) for d in decisions])
    gate.write_json_atomic(status_path, {
        "schema": gate.STATUS_SCHEMA,
        "verdict": "pass" if passed else "fail",
        "created": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "trivy": trivy.identity,
        "database": db.to_json(),
        "policy": {"path": str(policy.path), "sha256": policy.sha256, "strict": strict},
        "covered": covered,
        "targets": [{"name": t.name, "arch": t.arch, "kind": t.kind, "digest": t.digest,
                     "reports": reports.get(t.label, {}),
                     # The reports are outside the checksum files (scan runs after build): this
                     # is where their digests are written down.
                     "report_sha256": {n: tv.file_sha256(out_dir / n)
                                       for n in reports.get(t.label, {}).values()}}
                    for t in targets],
        "counts": {o: sum(1 for d in decisions if d.outcome == o)
                   for o in ("fail", "accepted", "vex", "ignored")},
        "failing": [_decision_json(d) for d in decisions if d.outcome == "fail"],
        "problems": problems,
        "warnings": warnings,
        "override": None,
    })
    return verdict


def _scan_one(trivy: tv.Trivy, target: ScanTarget, policy: Policy, cache: Path, out_dir: Path,
              logs: Path, debug: bool) -> dict[str, str]:
    json_name = f"{target.slug}.trivy.json"
    tmp = out_dir / f".{json_name}.tmp"
    log = logs / f"{target.slug}.log"
    log.unlink(missing_ok=True)
    try:
        tv.run(trivy, _scan_args(trivy, target, policy, cache, tmp, debug), log,
               f"scan of {target.label}")
        os.replace(tmp, out_dir / json_name)
    finally:
        tmp.unlink(missing_ok=True)
    files = {"json": json_name}
    for kind, (suffix, fmt) in CONVERSIONS.items():
        name = f"{target.slug}{suffix}"
        conv_tmp = out_dir / f".{name}.tmp"
        try:
            tv.run(trivy, ["convert", "--cache-dir", str(cache), *trivy.hermetic_args(convert=True),
                           "--format", fmt, "--output", str(conv_tmp), str(out_dir / json_name)],
                   log, f"{fmt} conversion of {target.label}")
            os.replace(conv_tmp, out_dir / name)
        finally:
            conv_tmp.unlink(missing_ok=True)
        files[kind] = name
    return files


def _decision_json(d: gate.Decision) -> dict[str, str]:
    f = d.finding
    return {"target": f.target.name, "arch": f.target.arch, "kind": f.kind, "id": f.id,
            "package": f.package, "severity": f.severity, "installed": f.installed,
            "fixed": f.fixed, "outcome": d.outcome, "reason": d.reason, "rule": d.rule,
            "where": f.where}

