"""The recorded status and the release step's check (require_passed)."""

from __future__ import annotations

import json

import pytest

from builder.scan import ScanNotPassed, ScanTarget, require_passed, scan
from tests.plugins.scan import VULN_ID


def _artifacts(tmp_path):
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "sha256sum-amd64.txt").write_text("0" * 64 + "  rke2.linux-amd64.tar.gz\n")
    lock = tmp_path / "images.lock"
    lock.write_text("version: 1\n")
    return artifacts, [artifacts / "sha256sum-amd64.txt", lock]


def test_passing_scan_lets_the_release_through(make_image, make_db, write_policy, trivy,
                                               tmp_path):
    artifacts, covers = _artifacts(tmp_path)
    target = make_image(packages=[("libfoo1", "foo", "1.0-2")])
    verdict = scan([target], write_policy(), make_db(), artifacts / "scan", trivy, covers=covers)
    assert verdict.passed
    status = json.loads((artifacts / "scan" / "status.json").read_text())
    assert status["verdict"] == "pass"
    assert set(status["covered"]) == {"sha256sum-amd64.txt", str(covers[1].resolve())}
    require_passed(artifacts)

    # An artifact changed after the scan: the verdict no longer covers it.
    (artifacts / "sha256sum-amd64.txt").write_text("1" * 64 + "  rke2.linux-amd64.tar.gz\n")
    with pytest.raises(ScanNotPassed, match="sha256sum-amd64.txt: changed since the scan"):
        require_passed(artifacts)


def test_failed_scan_blocks_the_release_unless_overridden(make_image, make_db, write_policy,
                                                          trivy, tmp_path):
    artifacts, covers = _artifacts(tmp_path)
    scan([make_image()], write_policy(), make_db(), artifacts / "scan", trivy, covers=covers)
    with pytest.raises(ScanNotPassed) as err:
        require_passed(artifacts)
    assert f"docker.io/example/app:1.0: libfoo1 {VULN_ID}" in str(err.value)
    assert "override" in err.value.hint

    require_passed(artifacts, override=True, reason="emergency fix for CVE-2099-0002")
    status = json.loads((artifacts / "scan" / "status.json").read_text())
    assert status["verdict"] == "fail"  # the verdict itself stays what it was
    assert status["override"]["reason"] == "emergency fix for CVE-2099-0002"
    assert "failed" in status["override"]["problems"][0]
    summary = (artifacts / "scan" / "summary.md").read_text()
    assert "## Release override" in summary
    assert "emergency fix for CVE-2099-0002" in summary


def test_missing_scan_blocks_the_release(tmp_path):
    artifacts, _ = _artifacts(tmp_path)
    with pytest.raises(ScanNotPassed, match="status.json: missing"):
        require_passed(artifacts)
    require_passed(artifacts, override=True)
    status = json.loads((artifacts / "scan" / "status.json").read_text())
    assert status["verdict"] == "missing" and status["override"]["problems"]
    assert "## Release override" in (artifacts / "scan" / "summary.md").read_text()


def test_garbled_status_blocks_the_release(tmp_path):
    artifacts, _ = _artifacts(tmp_path)
    (artifacts / "scan").mkdir()
    (artifacts / "scan" / "status.json").write_text("{")
    with pytest.raises(ScanNotPassed, match="not valid JSON"):
        require_passed(artifacts)


def test_a_scan_that_stops_early_leaves_no_old_pass(make_db, write_policy, trivy, tmp_path):
    artifacts, _ = _artifacts(tmp_path)
    (artifacts / "scan").mkdir()
    (artifacts / "scan" / "status.json").write_text(json.dumps({"schema": 1, "verdict": "pass"}))
    bad = ScanTarget("docker.io/example/app:1.0", "amd64", "image", tmp_path / "app.tar.zst")
    bad.path.write_bytes(b"zstd")
    with pytest.raises(Exception, match="not a docker-archive"):
        scan([bad], write_policy(), make_db(), artifacts / "scan", trivy)
    with pytest.raises(ScanNotPassed, match="missing"):
        require_passed(artifacts)
