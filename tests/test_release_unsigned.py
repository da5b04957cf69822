"""Releases are signed or say why not (issue 17, item 5): `release` refuses an unsigned artifacts
directory unless --allow-unsigned is given, and records the choice in the artifact's annotations
(io.airgap-builder.signed), which pull-release reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.publish import release as rl
from builder.trust import sign
from tests.plugins.release import run_builder, scanned_release

REPO = "releases/unsigned"


@pytest.fixture
def unsigned(tmp_path: Path, releases) -> Path:
    return scanned_release(releases["v1"], tmp_path / "artifacts")


def test_an_unsigned_directory_is_refused(unsigned):
    proc = run_builder("release", "--artifacts", str(unsigned), "--registry", "127.0.0.1:9/x",
                       "--dry-run", check=False)
    assert proc.returncode != 0
    assert f"{unsigned}: not signed (missing sha256sum-" in proc.stderr
    assert "--allow-unsigned" in proc.stderr and "builder sign --key" in proc.stderr


def test_allow_unsigned_is_recorded_and_reported(unsigned, registry, tmp_path):
    target = f"{registry.host}/{REPO}"
    proc = run_builder("release", "--allow-unsigned", "--artifacts", str(unsigned),
                       "--registry", target, "--insecure")
    assert "released UNSIGNED (--allow-unsigned; missing sha256sum-" in proc.stdout
    rel = rl.collect(unsigned)
    pulled = run_builder("pull-release", f"{target}:{rel.tag}", str(tmp_path / "pulled"),
                         "--insecure")
    assert "released UNSIGNED (io.airgap-builder.signed=false" in pulled.stderr


def test_the_annotation_says_whether_it_is_signed(unsigned, tmp_path):
    rel = rl.collect(unsigned)
    rl.check_signed(rel, True, [])
    arch = rel.arches[0]
    assert json.loads(rl.artifact_manifest(rel, arch))["annotations"][rl.ANNOTATION_SIGNED] == "false"
    keys = sign.generate_key(tmp_path / "k.pem", allow_unencrypted=True)
    run_builder("sign", "--artifacts", str(unsigned), "--key", str(keys.private))
    rel = rl.collect(unsigned)
    rl.check_signed(rel, False, [])  # signed: no flag needed
    assert json.loads(rl.artifact_manifest(rel, arch))["annotations"][rl.ANNOTATION_SIGNED] == "true"
