"""The gate end to end with the real Trivy: fixture images, a test database, the policy."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from builder.scan import ScanFailed, ScanTarget, scan, terminal_table
from tests.plugins.scan import VULN_ID, VULN_PACKAGE, private_key_pem
from tests.rig import payloads

TODAY = dt.datetime.now(dt.UTC).date()


def _out(tmp_path):
    return tmp_path / "artifacts" / "scan"


def test_vulnerable_package_fails_the_gate(make_image, make_db, write_policy, trivy, tmp_path):
    target = make_image()
    out = _out(tmp_path)
    verdict = scan([target], write_policy(), make_db(), out, trivy)

    assert not verdict.passed
    [failing] = verdict.failing
    assert (failing.finding.id, failing.finding.package) == (VULN_ID, VULN_PACKAGE)
    assert (failing.finding.installed, failing.finding.fixed) == ("1.0-1", "1.0-2")
    assert failing.reason == "HIGH, fixed in 1.0-2"

    # Reports: Trivy JSON, SARIF and CycloneDX per image, one summary, the status.
    files = verdict.reports[target.label]
    report = json.loads((out / files["json"]).read_text())
    assert report["SchemaVersion"] == 2
    sarif = json.loads((out / files["sarif"]).read_text())
    assert VULN_ID in json.dumps(sarif["runs"])
    bom = json.loads((out / files["cyclonedx"]).read_text())
    assert bom["bomFormat"] == "CycloneDX"
    assert any(c.get("name") == VULN_PACKAGE for c in bom["components"])

    summary = (out / "summary.md").read_text()
    assert "# Security scan: FAIL" in summary
    assert f"## {target.label}: FAIL" in summary
    assert f"| {VULN_PACKAGE} | {VULN_ID} | HIGH | 1.0-1 | 1.0-2 | fails: HIGH, fixed in 1.0-2 |" in summary

    status = json.loads((out / "status.json").read_text())
    assert status["verdict"] == "fail"
    assert status["failing"][0]["id"] == VULN_ID
    assert status["targets"][0]["digest"] == target.digest
    assert status["trivy"]["version"] == trivy.version_text

    table = terminal_table(verdict)
    [row] = [line.split() for line in table.splitlines() if line.startswith("FAIL ")]
    assert row[:5] == ["FAIL", target.name, "(amd64)", VULN_PACKAGE, VULN_ID]
    with pytest.raises(ScanFailed) as err:
        verdict.raise_if_failed()
    assert err.value.exit_code == 3
    assert f"{target.label}: {VULN_PACKAGE} {VULN_ID} HIGH" in str(err.value)


def test_acceptance_makes_it_pass(make_image, make_db, write_policy, trivy, tmp_path):
    target = make_image()
    policy = write_policy(accepted=[{
        "id": VULN_ID, "images": ["docker.io/example/*"], "packages": [VULN_PACKAGE],
        "justification": "libfoo1 is only used by the build stage, never at run time",
        "expires": (TODAY + dt.timedelta(days=30)).isoformat()}])
    verdict = scan([target], policy, make_db(), _out(tmp_path), trivy)

    assert verdict.passed, terminal_table(verdict)
    [decision] = verdict.decisions
    assert decision.outcome == "accepted"
    assert "accepted[0]" in decision.reason and "never at run time" in decision.reason
    status = json.loads(verdict.status_path.read_text())
    assert status["verdict"] == "pass"
    assert status["counts"]["accepted"] == 1
    summary = verdict.summary_path.read_text()
    assert "accepted: accepted[0] (CVE-2099-0001), until" in summary
    verdict.raise_if_failed()


def test_acceptance_scoped_to_another_image_does_not_apply(make_image, make_db, write_policy,
                                                           trivy, tmp_path):
    policy = write_policy(accepted=[{
        "id": VULN_ID, "images": ["docker.io/other/*"], "justification": "only in the other image",
        "expires": (TODAY + dt.timedelta(days=30)).isoformat()}])
    verdict = scan([make_image()], policy, make_db(), _out(tmp_path), trivy)
    assert not verdict.passed
    assert any("accepted[0] (CVE-2099-0001) matched no finding" in w for w in verdict.warnings)


def test_expired_acceptance_fails_and_names_it(make_image, make_db, write_policy, trivy, tmp_path):
    expired = TODAY - dt.timedelta(days=1)
    policy = write_policy(accepted=[
        {"id": "CVE-2000-0002", "packages": ["other"], "justification": "still valid",
         "expires": (TODAY + dt.timedelta(days=3)).isoformat()},
        {"id": VULN_ID, "packages": [VULN_PACKAGE], "justification": "was waiting for 1.0-2",
         "expires": expired.isoformat()},
    ])
    verdict = scan([make_image()], policy, make_db(), _out(tmp_path), trivy)

    assert not verdict.passed
    [failing] = verdict.failing
    assert failing.reason == f"HIGH, fixed in 1.0-2; acceptance accepted[1] ({VULN_ID}) expired on {expired}"
    assert verdict.problems == [f"scan-policy.yaml: accepted[1] ({VULN_ID}) expired on {expired}: "
                                "renew it with a fresh justification or remove it"]
    with pytest.raises(ScanFailed, match=r"accepted\[1\] \(CVE-2099-0001\) expired"):
        verdict.raise_if_failed()
    assert "## Policy problems" in verdict.summary_path.read_text()


def _vex(statements, timestamp="2026-01-01T00:00:00Z"):
    return {"@context": "https://openvex.dev/ns/v0.2.0", "@id": "https://example.org/vex/1",
            "author": "release team", "timestamp": timestamp, "version": 1,
            "statements": statements}


def test_vex_not_affected_makes_it_pass(make_image, make_db, write_policy, trivy, tmp_path):
    target = make_image()
    image_purl = f"pkg:oci/app@{target.digest}"
    policy = write_policy(vex=[_vex([{
        "vulnerability": {"name": VULN_ID},
        "products": [{"@id": image_purl,
                      "subcomponents": [{"@id": f"pkg:deb/debian/{VULN_PACKAGE}"}]}],
        "status": "not_affected", "justification": "vulnerable_code_not_in_execute_path",
        "impact_statement": "the image never loads libfoo1"}])])
    verdict = scan([target], policy, make_db(), _out(tmp_path), trivy)

    assert verdict.passed, terminal_table(verdict)
    [decision] = verdict.decisions
    assert decision.outcome == "vex"
    assert decision.reason == ("VEX not_affected (vex0.json statements[0]): "
                               "vulnerable_code_not_in_execute_path: the image never loads libfoo1")


def test_vex_later_affected_statement_takes_it_back(make_image, make_db, write_policy, trivy,
                                                    tmp_path):
    product = f"pkg:deb/debian/{VULN_PACKAGE}"
    policy = write_policy(vex=[_vex([
        {"vulnerability": VULN_ID, "products": [product], "status": "not_affected",
         "justification": "vulnerable_code_not_present", "timestamp": "2026-01-01T00:00:00Z"},
        {"vulnerability": VULN_ID, "products": [product], "status": "affected",
         "timestamp": "2026-02-01T00:00:00Z"},
    ])])
    verdict = scan([make_image()], policy, make_db(), _out(tmp_path), trivy)
    assert not verdict.passed


def test_vex_for_another_package_does_not_apply(make_image, make_db, write_policy, trivy, tmp_path):
    policy = write_policy(vex=[_vex([{
        "vulnerability": VULN_ID, "products": ["pkg:deb/debian/libbar1"],
        "status": "not_affected", "justification": "component_not_present"}])])
    verdict = scan([make_image()], policy, make_db(), _out(tmp_path), trivy)
    assert not verdict.passed


def test_planted_private_key_fails_the_gate(make_image, make_db, write_policy, trivy, tmp_path):
    target = make_image("docker.io/example/web:2.0", packages=[("base-files", "base-files", "12.4")],
                        extra={"etc/ssl/private/server.key": private_key_pem()})
    verdict = scan([target], write_policy(), make_db(), _out(tmp_path), trivy)

    assert not verdict.passed
    [failing] = verdict.failing
    assert failing.finding.kind == "secret"
    assert failing.finding.id == "private-key"
    assert failing.finding.package == "/etc/ssl/private/server.key"
    assert "secret" in failing.reason


def test_bundle_tree_is_scanned_for_secrets(make_db, write_policy, trivy, tmp_path):
    tree = tmp_path / "bundle"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "busybox").write_bytes(payloads.binary("busybox", "amd64").read_bytes())
    clean = ScanTarget("bundle", "amd64", "rootfs", tree)
    verdict = scan([clean], write_policy(), make_db(), _out(tmp_path), trivy)
    assert verdict.passed, terminal_table(verdict)

    (tree / "share").mkdir()
    (tree / "share" / "deploy.key").write_bytes(private_key_pem())
    verdict = scan([clean], write_policy(), make_db(), _out(tmp_path), trivy)
    assert [(d.finding.id, d.finding.package) for d in verdict.failing] == [
        ("private-key", "share/deploy.key")]


def test_unfixed_findings_count_only_when_the_policy_says_so(make_image, make_db, write_policy,
                                                              trivy, tmp_path):
    target = make_image()
    db = make_db(fixed="")
    verdict = scan([target], write_policy(), db, _out(tmp_path), trivy)
    assert verdict.passed
    assert [d.outcome for d in verdict.decisions] == ["ignored"]
    assert "no fixed version" in verdict.decisions[0].reason

    verdict = scan([target], write_policy(unfixed=True), db, _out(tmp_path), trivy)
    assert not verdict.passed
    assert verdict.failing[0].reason == "HIGH, no fix available (the policy counts unfixed findings)"


def test_severity_below_the_gate_passes(make_image, make_db, write_policy, trivy, tmp_path):
    verdict = scan([make_image()], write_policy(), make_db(severity="MEDIUM"), _out(tmp_path), trivy)
    assert verdict.passed
    assert verdict.decisions[0].outcome == "ignored"


def test_several_images_and_the_bundle_in_one_scan(make_image, make_db, write_policy, trivy,
                                                   tmp_path):
    vulnerable = make_image("docker.io/example/app:1.0")
    patched = make_image("docker.io/example/app:1.1",
                         packages=[(VULN_PACKAGE, "foo", "1.0-2")])
    tree = tmp_path / "bundle"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "tool").write_bytes(b"#!/bin/sh\necho ok\n")
    targets = [vulnerable, patched, ScanTarget("bundle", "amd64", "rootfs", tree)]
    verdict = scan(targets, write_policy(), make_db(), _out(tmp_path), trivy)

    assert [d.finding.target.name for d in verdict.failing] == ["docker.io/example/app:1.0"]
    summary = verdict.summary_path.read_text()
    assert "## docker.io/example/app:1.0 (amd64): FAIL" in summary
    assert "## docker.io/example/app:1.1 (amd64): FAIL" not in summary
    assert "| bundle (amd64) | rootfs | pass |" in summary


def test_single_image_docker_archive_tar_is_scanned(make_image, make_db, write_policy, trivy,
                                                    store, tmp_path):
    """The other image input: a one-image tar from builder.oci.archive (OCI layout + docker
    manifest.json), which Trivy reads as a docker archive."""
    from builder.oci.archive import write_archive
    from builder.oci.layout import ArchiveImage
    from builder.oci.model import Platform

    layout_target = make_image()
    tar = tmp_path / "app.tar"
    write_archive(store, [ArchiveImage(layout_target.name, layout_target.digest,
                                       Platform.for_arch("amd64"))], tar, 0)
    target = ScanTarget(layout_target.name, "amd64", "image", tar, layout_target.digest)
    verdict = scan([target], write_policy(), make_db(), _out(tmp_path), trivy)
    assert [(d.finding.id, d.finding.package) for d in verdict.failing] == [(VULN_ID, VULN_PACKAGE)]
