"""The CLI glue: option parsing and the order of checks (all before the first scan)."""

from __future__ import annotations

import argparse

import pytest

from builder.errors import BuilderError
from builder.scan import ScanFailed, TrivyError, command
from tests.plugins.scan import VULN_ID


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    return p.parse_args(list(argv))


def test_scan_command_end_to_end(make_image, make_db, write_policy, trivy, tmp_path):
    policy = write_policy()
    db = make_db()
    target = make_image()
    lines: list[str] = []
    args = _args("--policy", str(policy.path), "--db", str(db.dir), "--trivy", str(trivy.path),
                 "--out", str(tmp_path / "out"))
    with pytest.raises(ScanFailed) as err:
        command.run(args, lambda: [target], echo=lines.append)
    assert VULN_ID in str(err.value)
    assert lines[0].startswith("trivy 0.76.0 at ")
    assert any(line.startswith("FAIL ") for line in "\n".join(lines).splitlines())


def test_bad_inputs_stop_before_targets_are_even_prepared(write_policy, tmp_path, fake_trivy):
    prepared = []

    def targets():
        prepared.append(True)
        return []

    policy = write_policy()
    with pytest.raises(TrivyError, match="older than the minimum"):
        command.run(_args("--trivy", str(fake_trivy("0.49.9")), "--policy", str(policy.path)),
                    targets)
    with pytest.raises(BuilderError, match="no vulnerability database given"):
        command.open_database(_args(), None, None, env={})
    with pytest.raises(BuilderError, match="scan policy not found"):
        command.run(_args("--policy", str(tmp_path / "none.yaml")), targets)
    assert not prepared
