"""The scan policy (scan-policy.yaml): what fails the gate and what is accepted, validated with
field paths so an error names the exact entry (``scan-policy.yaml: accepted[2].expires: ...``).

    version: 1
    scanners: [vuln, secret]          # what Trivy looks for
    fail:
      severities: [CRITICAL, HIGH]    # vulnerability severities that fail the gate
      unfixed: false                  # do findings with no fixed version count?
      secrets: true                   # does any secret fail, whatever its severity?
    database:
      max_age_days: 7                 # older is a warning ...
      strict: false                   # ... or an error
    vex: [vex/not-affected.json]      # OpenVEX documents, relative to this file
    accepted:
      - id: CVE-2024-0001
        images: ["docker.io/rancher/hardened-*"]   # fnmatch patterns on the target name
        packages: [libfoo1]           # package name, or the file path of a secret
        justification: why this is acceptable, in words a reviewer can check
        expires: 2025-06-30
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from builder.errors import BuilderError
from builder.store import read_named

SEVERITIES = ("UNKNOWN", "LOW", "MEDIUM", "HIGH", "CRITICAL")
SCANNERS = ("vuln", "secret", "license", "misconfig")
DEFAULT_POLICY = "scan-policy.yaml"
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class PolicyError(BuilderError):
    """scan-policy.yaml (or a VEX document it names) is malformed."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that leaves dates as text: PyYAML turns 2030-13-01 into a ValueError with no
    field path, so dates are parsed here instead, where the error can name the entry."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


@dataclass(frozen=True)
class Acceptance:
    index: int  # position in accepted[], to name it in messages
    id: str
    images: tuple[str, ...]
    packages: tuple[str, ...]
    justification: str
    expires: dt.date

    @property
    def label(self) -> str:
        return f"accepted[{self.index}] ({self.id})"

    def expired(self, today: dt.date) -> bool:
        return today > self.expires

    def matches(self, vuln_id: str, target: str, package: str) -> bool:
        if vuln_id != self.id:
            return False
        if self.images and not any(fnmatch.fnmatchcase(target, p) for p in self.images):
            return False
        if self.packages and not any(fnmatch.fnmatchcase(package, p) for p in self.packages):
            return False
        return True


@dataclass(frozen=True)
class Policy:
    path: Path
    sha256: str
    scanners: tuple[str, ...] = ("vuln", "secret")
    fail_severities: tuple[str, ...] = ("CRITICAL", "HIGH")
    fail_unfixed: bool = False
    fail_secrets: bool = True
    max_age_days: float = 7.0
    strict: bool = False
    vex: tuple[Path, ...] = ()
    accepted: tuple[Acceptance, ...] = field(default_factory=tuple)

    def expired(self, today: dt.date) -> list[Acceptance]:
        return [a for a in self.accepted if a.expired(today)]


class _Checker:
    """Reads one mapping with field paths; unknown keys are errors (typos must not pass)."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, path: str, message: str, hint: str | None = None) -> PolicyError:
        return PolicyError(f"{self.where}: {path}: {message}", hint)

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {_show(value)}")
        for key in value:
            if key not in allowed:
                raise self.fail(f"{path}.{key}" if path != "(top)" else str(key),
                                "unknown field", f"known fields: {', '.join(allowed)}")
        return value

    def boolean(self, value: Any, path: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(path, f"expected true or false, got {_show(value)}")
        return value

    def text(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(path, f"expected a non-empty string, got {_show(value)}")
        return value.strip()

    def text_list(self, value: Any, path: str, choices: tuple[str, ...] | None = None,
                  upper: bool = False) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(path, f"expected a list, got {_show(value)}")
        out = []
        for i, item in enumerate(value):
            text = self.text(item, f"{path}[{i}]")
            if upper:
                text = text.upper()
            if choices is not None and text not in choices:
                raise self.fail(f"{path}[{i}]", f"expected one of {', '.join(choices)}, got {item!r}")
            out.append(text)
        return tuple(out)

    def date(self, value: Any, path: str) -> dt.date:
        # Dates arrive as text (see _Loader); date objects come from callers building a policy.
        if isinstance(value, dt.datetime):
            return value.date()
        if isinstance(value, dt.date):
            return value
        if isinstance(value, str) and _DATE.match(value.strip()):
            try:
                return dt.date.fromisoformat(value.strip())
            except ValueError:
                pass
        raise self.fail(path, f"expected a date YYYY-MM-DD, got {_show(value)}")


def _show(value: Any) -> str:
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r:.60}"


def parse_policy(data: Any, path: Path, raw: bytes = b"") -> Policy:
    where = path.name
    c = _Checker(where)
    top = c.mapping(data, "(top)", ("version", "scanners", "fail", "database", "vex", "accepted"))
    if top.get("version", 1) != 1:
        raise c.fail("version", f"expected 1, got {_show(top.get('version'))}")
    scanners = c.text_list(top.get("scanners"), "scanners", SCANNERS) or ("vuln", "secret")
    fail = c.mapping(top.get("fail"), "fail", ("severities", "unfixed", "secrets"))
    severities = c.text_list(fail.get("severities"), "fail.severities", SEVERITIES, upper=True)
    if fail.get("severities") is None:
        severities = ("CRITICAL", "HIGH")
    database = c.mapping(top.get("database"), "database", ("max_age_days", "strict"))
    max_age = database.get("max_age_days", 7)
    if isinstance(max_age, bool) or not isinstance(max_age, int | float) or max_age <= 0:
        raise c.fail("database.max_age_days", f"expected a positive number of days, got {_show(max_age)}")
    vex_paths = []
    for i, item in enumerate(c.text_list(top.get("vex"), "vex")):
        vex_path = (path.parent / item) if not Path(item).is_absolute() else Path(item)
        if not vex_path.is_file():
            raise c.fail(f"vex[{i}]", f"{item} does not exist (looked at {vex_path})",
                         "VEX paths are relative to the policy file")
        vex_paths.append(vex_path)
    accepted_raw = top.get("accepted")
    if accepted_raw is not None and not isinstance(accepted_raw, list):
        raise c.fail("accepted", f"expected a list, got {_show(accepted_raw)}")
    accepted = []
    for i, entry in enumerate(accepted_raw or []):
        p = f"accepted[{i}]"
        entry = c.mapping(entry, p, ("id", "images", "packages", "justification", "expires"))
        for required in ("id", "justification", "expires"):
            if required not in entry:
                raise c.fail(f"{p}.{required}", "missing",
                             "every acceptance needs id, a scope (images and/or packages), "
                             "justification and expires")
        images = c.text_list(entry.get("images"), f"{p}.images")
        packages = c.text_list(entry.get("packages"), f"{p}.packages")
        if not images and not packages:
            raise c.fail(f"{p}", "has no scope: give images and/or packages",
                         'use images: ["*"] to accept it everywhere, on purpose')
        accepted.append(Acceptance(
            index=i,
            id=c.text(entry.get("id"), f"{p}.id"),
            images=images,
            packages=packages,
            justification=c.text(entry.get("justification"), f"{p}.justification"),
            expires=c.date(entry.get("expires"), f"{p}.expires"),
        ))
    return Policy(
        path=path,
        sha256="sha256:" + hashlib.sha256(raw).hexdigest(),
        scanners=scanners,
        fail_severities=severities,
        fail_unfixed=c.boolean(fail.get("unfixed"), "fail.unfixed", False),
        fail_secrets=c.boolean(fail.get("secrets"), "fail.secrets", True),
        max_age_days=float(max_age),
        strict=c.boolean(database.get("strict"), "database.strict", False),
        vex=tuple(vex_paths),
        accepted=tuple(accepted),
    )


def load_policy(path: Path) -> Policy:
    path = Path(path)
    raw: bytes = read_named(path, PolicyError(f"{path}: scan policy not found",
                                              f"commit a {DEFAULT_POLICY} at the repository root or pass --policy"))
    try:
        data = yaml.load(raw, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(f"{path.name}: not valid YAML{at}: {problem}") from None
    return parse_policy(data, path, raw)
