"""Scan targets and the findings read back from Trivy's JSON report."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from builder.errors import BuilderError

Kind = Literal["image", "rootfs"]


@dataclass(frozen=True)
class ScanTarget:
    """One thing to scan: ``image`` = a single-image docker-archive tar (maybe gzipped) or an
    OCI layout directory; ``rootfs`` = an extracted directory tree (the bundle)."""

    name: str  # what the policy's ``images`` patterns match, e.g. docker.io/rancher/pause:3.9
    arch: str
    kind: Kind
    path: Path
    digest: str | None = None  # the image manifest digest, when known (recorded, VEX matching)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.arch})"

    @property
    def slug(self) -> str:
        """A file-name-safe stem for this target's reports."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.name}_{self.arch}").strip("_")


@dataclass(frozen=True)
class Finding:
    target: ScanTarget
    kind: Literal["vuln", "secret"]
    id: str  # CVE/GHSA id, or the secret rule id
    package: str  # package name, or the file path holding the secret
    severity: str
    installed: str = ""
    fixed: str = ""
    status: str = ""
    title: str = ""
    purl: str = ""
    where: str = ""  # Trivy's result target (OS / lock file / file path)

    @property
    def unfixed(self) -> bool:
        return self.kind == "vuln" and not self.fixed

    def key(self) -> tuple[str, str, str, str, str]:
        return (self.target.label, self.kind, self.package, self.id, self.installed)


def parse_report(data: Any, target: ScanTarget, where: str) -> list[Finding]:
    """Findings from one Trivy JSON report (SchemaVersion 2)."""
    if not isinstance(data, dict) or data.get("SchemaVersion") != 2:
        raise BuilderError(f"{where}: not a Trivy JSON report (SchemaVersion 2)",
                           "the scan needs Trivy's --format json output")
    out: dict[tuple, Finding] = {}
    for result in data.get("Results") or []:
        result_target = str(result.get("Target", ""))
        for v in result.get("Vulnerabilities") or []:
            purl = ((v.get("PkgIdentifier") or {}).get("PURL")) or ""
            f = Finding(target, "vuln", str(v.get("VulnerabilityID", "")), str(v.get("PkgName", "")),
                        str(v.get("Severity", "UNKNOWN")).upper(), str(v.get("InstalledVersion", "")),
                        str(v.get("FixedVersion", "") or ""), str(v.get("Status", "")),
                        str(v.get("Title", "") or ""), purl, result_target)
            out.setdefault(f.key() + (result_target,), f)
        for s in result.get("Secrets") or []:
            f = Finding(target, "secret", str(s.get("RuleID", "")), result_target,
                        str(s.get("Severity", "UNKNOWN")).upper(), title=str(s.get("Title", "")),
                        where=f"{result_target}:{s.get('StartLine', '')}")
            out.setdefault(f.key() + (f.where,), f)
    return list(out.values())
