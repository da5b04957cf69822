"""scan-policy.yaml and OpenVEX documents: validation with field paths, before any scan."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from builder.scan import PolicyError, load_policy
from builder.scan.vex import Purl, Subject, VexIndex

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_committed_default_policy_loads():
    policy = load_policy(REPO_ROOT / "scan-policy.yaml")
    assert policy.fail_severities == ("CRITICAL", "HIGH")
    assert policy.scanners == ("vuln", "secret")
    assert not policy.fail_unfixed and policy.fail_secrets
    assert policy.accepted == () and policy.vex == ()


def test_acceptance_fields_are_read(write_policy):
    policy = write_policy(raw="""
version: 1
fail: {severities: [critical], unfixed: true}
accepted:
  - id: CVE-2024-1
    images: ["docker.io/rancher/*"]
    justification: not reachable
    expires: 2030-01-31
  - id: CVE-2024-2
    packages: [openssl]
    justification: patched downstream
    expires: "2030-02-28"
""")
    assert policy.fail_severities == ("CRITICAL",)
    assert policy.fail_unfixed
    first, second = policy.accepted
    assert first.expires == dt.date(2030, 1, 31) and second.expires == dt.date(2030, 2, 28)
    assert first.matches("CVE-2024-1", "docker.io/rancher/pause:3.9", "anything")
    assert not first.matches("CVE-2024-1", "docker.io/library/pause:3.9", "anything")
    assert second.matches("CVE-2024-2", "bundle", "openssl")


@pytest.mark.parametrize("text, message", [
    ("accepted:\n  - {id: CVE-1, packages: [a], justification: x, expires: 31.12.2030}\n",
     "scan-policy.yaml: accepted[0].expires: expected a date YYYY-MM-DD, got str '31.12.2030'"),
    ("accepted:\n  - {id: CVE-1, packages: [a], justification: x, expires: 2030-01-01}\n"
     "  - {id: CVE-2, packages: [a], justification: x, expires: 2030-13-01}\n"
     "  - {id: CVE-3, packages: [a], justification: x, expires: 2030-01-01}\n",
     "scan-policy.yaml: accepted[1].expires: expected a date YYYY-MM-DD, got str '2030-13-01'"),
    ("accepted:\n  - {id: CVE-1, packages: [a], expires: 2030-01-01}\n",
     "scan-policy.yaml: accepted[0].justification: missing"),
    ("accepted:\n  - {id: CVE-1, packages: [a], justification: '  ', expires: 2030-01-01}\n",
     "scan-policy.yaml: accepted[0].justification: expected a non-empty string"),
    ("accepted:\n  - {id: CVE-1, justification: x, expires: 2030-01-01}\n",
     "scan-policy.yaml: accepted[0]: has no scope: give images and/or packages"),
    ("accepted:\n  - {id: CVE-1, image: [a], justification: x, expires: 2030-01-01}\n",
     "scan-policy.yaml: accepted[0].image: unknown field"),
    ("accepted:\n  - {id: 7, packages: [a], justification: x, expires: 2030-01-01}\n",
     "scan-policy.yaml: accepted[0].id: expected a non-empty string, got int 7"),
    ("accepted:\n  - {id: CVE-1, packages: a, justification: x, expires: 2030-01-01}\n",
     "scan-policy.yaml: accepted[0].packages: expected a list, got str 'a'"),
    ("accepted: {id: CVE-1}\n", "scan-policy.yaml: accepted: expected a list"),
    ("fail: {severities: [HIGH, SEVERE]}\n",
     "scan-policy.yaml: fail.severities[1]: expected one of UNKNOWN, LOW, MEDIUM, HIGH, CRITICAL"),
    ("fail: {unfixed: 'no'}\n", "scan-policy.yaml: fail.unfixed: expected true or false"),
    ("fail: {ignore_unfixed: true}\n", "scan-policy.yaml: fail.ignore_unfixed: unknown field"),
    ("scanners: [vuln, malware]\n", "scan-policy.yaml: scanners[1]: expected one of vuln, secret"),
    ("database: {max_age_days: -1}\n",
     "scan-policy.yaml: database.max_age_days: expected a positive number of days"),
    ("version: 2\n", "scan-policy.yaml: version: expected 1, got int 2"),
    ("vex: [missing.json]\n", "scan-policy.yaml: vex[0]: missing.json does not exist"),
    ("severity: HIGH\n", "scan-policy.yaml: severity: unknown field"),
    ("- just\n- a list\n", "scan-policy.yaml: (top): expected a mapping, got list"),
    ("fail: [\n", "scan-policy.yaml: not valid YAML at line 2, column 1"),
])
def test_malformed_policy_is_refused_with_a_field_path(write_policy, text, message):
    with pytest.raises(PolicyError) as err:
        write_policy(raw=text)
    assert str(err.value).startswith(message), str(err.value)


def test_missing_policy_file(tmp_path):
    with pytest.raises(PolicyError, match="scan policy not found"):
        load_policy(tmp_path / "scan-policy.yaml")


def _vex_policy(write_policy, doc) -> str:
    with pytest.raises(PolicyError) as err:
        policy = write_policy(vex=[doc])
        VexIndex.load(policy.vex)
    return str(err.value)


def _doc(**statement):
    return {"@context": "https://openvex.dev/ns/v0.2.0", "timestamp": "2026-01-01T00:00:00Z",
            "statements": [{"vulnerability": {"name": "CVE-1"}, "products": ["pkg:deb/debian/a"],
                            "status": "not_affected", "justification": "component_not_present",
                            **statement}]}


@pytest.mark.parametrize("doc, message", [
    ({"statements": []}, "vex0.json: not an OpenVEX document"),
    (_doc(status="maybe"), "vex0.json: statements[0].status: expected one of not_affected"),
    (_doc(justification="it is fine"), "vex0.json: statements[0].justification: expected one of"),
    (_doc(justification=None), "vex0.json: statements[0]: a not_affected statement needs a "
                               "justification or an impact_statement"),
    (_doc(products=[]), "vex0.json: statements[0].products: expected a non-empty list"),
    (_doc(products=[{"subcomponents": []}]), "vex0.json: statements[0].products[0]: expected a "
                                             "product identifier"),
    (_doc(vulnerability=None), "vex0.json: statements[0].vulnerability: expected a name"),
])
def test_malformed_vex_is_refused(write_policy, doc, message):
    assert message in _vex_policy(write_policy, doc)


def test_vex_matching_rules(tmp_path):
    doc = tmp_path / "v.json"
    doc.write_text(json.dumps({
        "@context": "https://openvex.dev/ns/v0.2.0", "timestamp": "2026-01-01T00:00:00Z",
        "statements": [
            {"vulnerability": {"name": "CVE-1", "aliases": ["GHSA-x"]},
             "products": ["pkg:deb/debian/libfoo1@1.0-1"], "status": "not_affected",
             "justification": "component_not_present"},
            {"vulnerability": "CVE-2", "products": ["docker.io/example/app"],
             "status": "fixed"},
        ]}))
    index = VexIndex.load([doc])
    purl = "pkg:deb/debian/libfoo1@1.0-1?arch=amd64&distro=debian-12.5"
    assert index.clearing(Subject("docker.io/example/app:1", None, "CVE-1", purl))
    assert index.clearing(Subject("docker.io/example/app:1", None, "GHSA-x", purl))
    other_version = purl.replace("1.0-1", "1.0-3")
    assert not index.clearing(Subject("docker.io/example/app:1", None, "CVE-1", other_version))
    assert index.clearing(Subject("docker.io/example/app:1.2", None, "CVE-2", "pkg:deb/debian/z@1"))
    assert not index.clearing(Subject("docker.io/example/web:1", None, "CVE-2", "pkg:deb/debian/z@1"))
    assert Purl.parse("pkg:oci/app@sha256%3Aabc?repository_url=x") == Purl("oci", "", "app",
                                                                           "sha256:abc")
