"""The CLI as a newcomer meets it: errors to act on, help that explains, output to follow or parse.

Everything runs ``python -m builder`` against the real rig: a plain-HTTP CNCF registry
(``anon_setup``), the session's real release (``built``), and ports where nothing listens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from builder import cli, digest
from builder.humanize import human
from tests.plugins.release import run_builder, write_scan_status
from tests.plugins.releases import unsigned_copy
from tests.plugins.scan import VULN_ID, VULN_SOURCE
from tests.rig.trivydb import TrivyDB

REPO = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    """A loopback port nothing listens on (bound once by us, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_lock(path: Path, ref: str, arches: tuple[str, ...] = ("amd64",)) -> Path:
    """A hand-written lock holding one unresolved image (what a newcomer writes first)."""
    path.write_text(yaml.safe_dump({
        "schema": 1, "release": {"name": "rke2", "version": "v1.32.13+rke2r1"},
        "arches": list(arches), "components": {}, "images": [{"ref": ref, "groups": ["core"]}],
    }, sort_keys=False))
    return path


# -- 5. errors a newcomer can act on --------------------------------------------------------------


def test_plain_http_registry_without_insecure_says_to_list_it_in_the_mirrors_file(anon_setup, tmp_path):
    """Before: `TLS verification failed: [SSL: WRONG_VERSION_NUMBER] ...`, hint `ca_file`."""
    host = anon_setup.host
    lock = image_lock(tmp_path / "other.yaml", anon_setup.images[0].ref(host))
    res = run_builder("--lock", str(lock), "--store", str(tmp_path / "store"), "lock", check=False)
    assert res.returncode == 1, res.stderr
    assert f"{host} answered in plain HTTP, not TLS" in res.stderr
    assert ("hint: if " + host + " is meant to be reached without TLS: list plain-HTTP registries "
            "under `insecure:` in this host's mirrors file (--mirrors FILE or BUILDER_MIRRORS)") in res.stderr
    assert f"`insecure: [{host}]`" in res.stderr
    assert "ca_file" not in res.stderr and "Traceback" not in res.stderr
    assert yaml.safe_load(lock.read_text())["images"][0].get("digest") is None  # nothing written


def test_plain_http_mirror_endpoint_without_insecure_says_the_same(tmp_path):
    """A lock's `http://` mirror endpoint is refused before any request, with the same advice."""
    lock = image_lock(tmp_path / "images.lock", "docker.io/library/busybox:1.36")
    data = yaml.safe_load(lock.read_text())
    data["mirrors"] = {"registries": {"docker.io": {"endpoints": [f"http://127.0.0.1:{closed_port()}"]}}}
    lock.write_text(yaml.safe_dump(data))
    res = run_builder("--lock", str(lock), "--store", str(tmp_path / "store"), "lock", check=False)
    assert res.returncode == 1
    assert "is plain HTTP" in res.stderr
    assert "list plain-HTTP registries under `insecure:` in this host's mirrors file" in res.stderr


def test_insecure_written_as_an_http_url_is_accepted(anon_setup, tmp_path):
    """`insecure: [http://host:port]` used to be kept as written and so never matched a host."""
    host = anon_setup.host
    lock = image_lock(tmp_path / "other.yaml", anon_setup.images[0].ref(host))
    mirrors = tmp_path / "mirrors.yaml"
    mirrors.write_text(f"insecure: ['http://{host}/']\n")
    res = run_builder("--lock", str(lock), "--store", str(tmp_path / "store"), "--mirrors",
                      str(mirrors), "lock")
    assert f"{lock}: updated" in res.stderr
    assert yaml.safe_load(lock.read_text())["images"][0]["digest"].startswith("sha256:")


@pytest.mark.parametrize("entry", ["https://reg.internal:5000", "reg.internal:5000/v2",
                                   "user@reg.internal"])
def test_insecure_entry_that_is_no_host_is_refused(tmp_path, entry):
    lock = image_lock(tmp_path / "images.lock", "reg.internal:5000/app:1")
    mirrors = tmp_path / "host-mirrors.yaml"
    mirrors.write_text(yaml.safe_dump({"insecure": ["ok.internal", entry]}))
    res = run_builder("--lock", str(lock), "--mirrors", str(mirrors), "lock", "--check", check=False)
    assert res.returncode == 1
    assert (f"{mirrors}: insecure[1]: expected a registry host[:port] (e.g. registry.internal:5000 "
            f"or http://registry.internal:5000), got {entry!r}") in res.stderr


def test_connection_refused_keeps_its_cause(tmp_path):
    """requests' text runs past 200 characters; the cut used to drop `Connection refused`."""
    host = f"127.0.0.1:{closed_port()}"
    lock = image_lock(tmp_path / "images.lock", f"{host}/app:1")
    mirrors = tmp_path / "mirrors.yaml"
    mirrors.write_text(f"insecure: [{host}]\n")
    res = run_builder("--lock", str(lock), "--store", str(tmp_path / "store"), "--mirrors",
                      str(mirrors), "lock", check=False)
    assert res.returncode == 1
    assert f"Connection refused ({host}) (after 5 attempts)" in res.stderr, res.stderr
    assert "HTTPConnectionPool" not in res.stderr


def test_errors_name_the_lock_file_actually_used(tmp_path):
    lock = image_lock(tmp_path / "other.yaml", "reg.internal/app:1")
    res = run_builder("--lock", str(lock), "fetch", "--arch", "arm64", check=False)
    assert res.returncode == 1
    assert "error: other.yaml: arch arm64 is not in the lock (arches: amd64)" in res.stderr
    res = run_builder("--lock", str(lock), "--store", str(tmp_path / "s"), "fetch", "--arch", "amd64",
                      check=False)
    assert res.returncode == 1 and "error: other.yaml: 1 pin unresolved" in res.stderr, res.stderr
    assert "images.lock" not in res.stderr.split("hint:")[0]


# -- 6. a CLI that explains itself ----------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _all_commands() -> dict[str, argparse.ArgumentParser]:
    out = {}
    for name, sub in _subcommands(cli.parser()).items():
        out[name] = sub
        out.update({f"{name} {n}": s for n, s in _subcommands(sub).items()})
    return out


def test_top_level_help_tells_what_the_tool_does_and_the_pipeline_order():
    text = cli.parser().format_help()
    assert "air-gap release" in text and "images.lock" in text
    steps = ["lock", "fetch", "build", "scan", "sign", "verify", "release"]
    pipeline = text.split("The pipeline, in this order:")[1]
    positions = [pipeline.index(f"\n  {step} ") for step in steps]
    assert positions == sorted(positions)
    assert "python -m builder COMMAND --help" in text
    examples = [line.strip() for line in cli.EPILOG.splitlines() if line.startswith("  python -m")]
    assert len(examples) >= 4
    for example in examples:  # each parses (SystemExit, a failed test, if not)
        cli.parser().parse_args(shlex.split(example.split(" > ")[0].removeprefix("python -m builder ")))


def test_every_command_has_a_description_and_examples_that_parse():
    for name, sub in _all_commands().items():
        assert sub.description and len(sub.description) > 60, name
        assert sub.epilog and sub.epilog.startswith("example:\n  "), name
        examples = [line.strip() for line in sub.epilog.splitlines()[1:] if line.strip()]
        assert examples, name
        for example in examples:
            command = example.split(" > ")[0].split("python -m builder ", 1)[1]
            words = shlex.split(command)
            assert " ".join(w for w in words if not w.startswith("-")).find(name) >= 0, example
            cli.parser().parse_args(words)  # SystemExit (a failed test) if it does not parse


def test_artifacts_is_the_one_name_for_the_artifacts_directory(capsys):
    commands = _all_commands()
    for name in ("build", "scan", "sign", "release"):
        help_text = commands[name].format_help()
        assert "--artifacts DIR" in help_text and "the artifacts directory" in help_text, name
        assert "--out" not in help_text.replace("--out DIR]", "").split("options:")[1] or name == "scan"
    assert "--out DIR" in commands["keygen"].format_help()  # a new output keeps --out
    # The old spelling still works (scripts keep running) and says the new one.
    args = cli.parser().parse_args(["build", "--out", "old-dir"])
    assert args.artifacts == "old-dir" and args.renamed == ["--out is now --artifacts (the old "
                                                            "spelling still works)"]
    assert cli.parser().parse_args(["release", "--registry", "h/r"]).artifacts == "artifacts"


class ConnectionCounter:
    """A loopback listener that accepts and counts every TCP connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.count = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_release_dry_run_makes_no_network_call_and_prints_the_plan(tmp_path, releases):
    rel = unsigned_copy(releases["v1"], tmp_path / "artifacts")
    write_scan_status(rel.directory)
    listener = ConnectionCounter()
    host = f"127.0.0.1:{listener.port}"
    try:
        res = run_builder("release", "--allow-unsigned", "--artifacts", str(rel.directory), "--registry", f"{host}/rel",
                          "--push-images", f"{host}/mirror", "--insecure", "--github", "owner/repo",
                          "--dry-run", env={"GITHUB_TOKEN": "t0ken", "GITHUB_API_URL": f"http://{host}"})
    finally:
        listener.close()
    assert listener.count == 0
    assert "plan (dry run, nothing changed)" in res.stdout
    assert f"-> {host}/rel" in res.stdout and f"-> {host}/mirror/" in res.stdout
    assert "upload " in res.stdout and "-> github:owner/repo@" in res.stdout
    assert "note: dry run: no registry or GitHub contacted" in res.stdout


def test_sizes_have_one_human_form():
    assert [human(n) for n in (0, 1023, 1024, 1536, 10 << 20, 5 << 30, 3 << 40, -2048)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "10.0 MiB", "5.0 GiB", "3.0 TiB", "-2.0 KiB"]
    # Everything that prints sizes to people: the builder, the demo and benches, the test rig.
    sources = [p for top in ("builder", "tools", "tests/rig") for p in sorted((REPO / top).glob("**/*.py"))
               if "node_modules" not in p.parts]
    lines = [(f"{p.relative_to(REPO)}", line.strip()) for p in sources for line in p.read_text().splitlines()]
    formatters = [f"{where}: {line}" for where, line in lines if re.match(r"def _?(human|mib|gib)|def \w*size\w*\(.*-> str", line)]
    assert formatters == ["builder/humanize.py: def human(n: float) -> str:"]
    # A size written out by hand (`{n / 2**30:.1f} GiB`, `{n >> 20} MiB`) is a formatter too.
    by_hand = sorted({where for where, line in lines if re.search(r"\{[^}]*\} ?[KMGT]iB\b", line)})
    # Two limits quoted in the unit they are set in (a refusal's message, a bench goal's label).
    assert by_hand == ["builder/oci/archive.py", "tools/bench_real.py"]


# -- 7. seeing long work --------------------------------------------------------------------------


def test_build_json_is_one_object_with_every_artifact_size_and_digest(built, tmp_path):
    out = tmp_path / "artifacts"
    res = built.cli("build", "--cross", "--artifacts", str(out), "--json")
    summary = json.loads(res.stdout)  # the whole of stdout is one JSON object
    assert summary["command"] == "build" and summary["ok"] is True
    assert summary["artifacts"] == str(out)
    assert [a["arch"] for a in summary["arches"]] == ["amd64", "arm64"]
    listed = set()
    for arch in summary["arches"]:
        assert arch["runtime"].startswith("docker.io/rancher/rke2-runtime:")
        assert arch["files"][-1]["name"] == f"sha256sum-{arch['arch']}.txt"
        for f in arch["files"]:
            path = out / f["name"]
            assert f["size"] == path.stat().st_size
            assert f["sha256"] == digest.of_file(path)[0]
            listed.add(f["name"])
    assert listed == {p.name for p in out.iterdir() if not p.name.startswith(".")}
    # Without a terminal: one plain line per archive, no bar.
    assert "packed rke2-images-core.linux-amd64 (" in res.stderr and ".tar.zst " in res.stderr
    assert "\r" not in res.stderr and "%|" not in res.stderr


def test_quiet_prints_nothing_on_success(built, tmp_path):
    res = built.cli("build", "--arch", "arm64", "--artifacts", str(tmp_path / "a"), "-q")
    assert (res.stdout, res.stderr) == ("", "")
    res = built.cli("-q", "verify", str(tmp_path / "a"))
    assert (res.stdout, res.stderr) == ("", "")
    res = built.cli("fetch", "--cross", "-q")
    assert (res.stdout, res.stderr) == ("", "")
    res = built.cli("--lock", str(built.lock), "lock", "--check", "-q")
    assert (res.stdout, res.stderr) == ("", "")


def test_build_on_a_terminal_shows_bytes_packed_of_the_total(built, tmp_path):
    """`script` gives build a pseudo-terminal, as a person's shell would."""
    out = tmp_path / "artifacts"
    argv = [sys.executable, "-m", "builder", "--lock", str(built.lock), "--store", str(built.store),
            "build", "--arch", "amd64", "--artifacts", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(SOURCE_DATE_EPOCH="1700000000", TERM="xterm", COLUMNS="120")
    res = subprocess.run(["script", "-q", "-e", "-c", shlex.join(argv), "/dev/null"], cwd=REPO,
                         env=env, capture_output=True, timeout=600)
    screen = res.stdout.decode()  # bytes: text mode would turn each bar's "\r" into a newline
    assert res.returncode == 0, screen
    # e.g. "\rrke2-images-core.linux-amd64:  40%|████      | 48.6M/122M [00:01<00:01, 41.0MB/s]"
    bars = re.findall(r"\rrke2-images-core\.linux-amd64:\s+(\d+)%\|[^|]*\| ([\d.]+[kMG]?)/([\d.]+[kMG]?) ",
                      screen)
    assert len(bars) >= 2, screen[-2000:]  # redrawn in place as bytes are packed
    percents = [int(p) for p, _, _ in bars]
    assert percents == sorted(percents) and percents[-1] > percents[0]
    assert bars[-1][2].endswith("M")  # the total: the tar's exact size (tens of MiB), known before packing
    assert "packed rke2-images-core.linux-amd64 (" in screen  # and the line when it is done


@pytest.mark.parametrize(("env", "bars"), [({}, True), ({"CI": "true"}, False), ({"TERM": "dumb"}, False)])
def test_bars_only_on_a_real_terminal_outside_ci(env, bars):
    """stderr on a pseudo-terminal: bars, unless CI says it is a log (or the terminal is dumb)."""
    import pty

    main, child = pty.openpty()
    try:
        base = {k: v for k, v in os.environ.items() if k != "CI"}
        res = subprocess.run([sys.executable, "-c", "from builder.progress import Reporter; "
                              "print(Reporter.auto().bars, Reporter.auto(quiet=True).bars)"],
                             stderr=child, capture_output=False, stdout=subprocess.PIPE, text=True,
                             env={**base, "TERM": "xterm", **env}, timeout=60, cwd=REPO)
    finally:
        os.close(main)
        os.close(child)
    assert res.stdout.split() == [str(bars), "False"]


def test_fetch_json_counts_blobs_and_bytes(built):
    res = built.cli("fetch", "--cross", "--json")
    summary = json.loads(res.stdout)
    assert summary["command"] == "fetch" and summary["ok"] is True
    assert summary["blobs_fetched"] == 0 and summary["bytes_transferred"] == 0  # all in the store
    assert summary["files"]["count"] == summary["files"]["cached"] > 0
    assert summary["images"]["blobs_present"] > 0 and summary["images"]["count"] > 0
    assert summary["store"] == str(built.store)


def test_verify_json_passes_then_lists_failures(built, tmp_path):
    res = built.cli("verify", str(built.out), "--json")
    summary = json.loads(res.stdout)
    assert summary["passed"] is True and summary["failures"] == []
    assert summary["files_checked"] > 0 and sorted(summary["signed"]) == ["amd64", "arm64"]
    copy = tmp_path / "release"
    shutil.copytree(built.out, copy, copy_function=os.link)  # hard links: no 0.6 GiB copy
    victim = copy / "rke2-images-core.linux-amd64.txt"
    text = victim.read_text()
    victim.unlink()  # a new file: the session's release keeps its bytes
    victim.write_text(text + "docker.io/x/y:z\n")
    res = built.cli("verify", str(copy), "--json", check=False)
    assert res.returncode == 1
    summary = json.loads(res.stdout)
    assert summary["passed"] is False and summary["ok"] is False
    assert any(f["file"] == victim.name for f in summary["failures"]), summary
    assert "error: verify" in res.stderr


def test_scan_json_carries_the_verdict(built, tmp_path):
    out = tmp_path / "artifacts"
    shutil.copytree(built.out, out, copy_function=os.link)  # scan only adds out/scan/
    db = TrivyDB().add("debian 12", VULN_SOURCE, VULN_ID, fixed="1.0-2", severity="HIGH").write(tmp_path / "db")
    res = built.cli("scan", "--cross", "--artifacts", str(out), "--db", str(db), "--json")
    summary = json.loads(res.stdout)
    assert summary["command"] == "scan" and summary["verdict"] == "pass" and summary["ok"] is True
    assert summary["failing"] == [] and summary["status"] == str(out / "scan" / "status.json")


def test_json_error_is_one_object_too(tmp_path):
    res = run_builder("--lock", str(tmp_path / "none.lock"), "build", "--json", check=False)
    assert res.returncode == 1
    assert json.loads(res.stdout) == {
        "command": "build", "ok": False, "error": f"{tmp_path / 'none.lock'}: no such lock file",
        "hint": "pass --lock PATH or run from the directory holding images.lock", "exit_code": 1}
