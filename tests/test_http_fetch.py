"""Fetching pinned files through the real nginx file server (faults injected by tests.rig.faults)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from builder import digest as dg
from builder.errors import DigestMismatch, FetchError
from builder.fetch.http import HttpFetcher, HttpOptions
from builder.fetch.mirrors import candidates
from builder.fetch.transport import RetryPolicy
from builder.lock import lockfile
from builder.lock.lockfile import FileMirror

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def big_file(fileserver) -> tuple[str, bytes]:
    data = os.urandom(8 * 1024 * 1024)
    (fileserver.root / "big.bin").write_bytes(data)
    return "/big.bin", data


def _fetcher(store, url_base, attempts: int = 5) -> tuple[HttpFetcher, list[float]]:
    slept: list[float] = []
    mirrors = (FileMirror("https://upstream.invalid/", (url_base + "/",), fallback=False),)
    f = HttpFetcher(store, mirrors, HttpOptions(policy=RetryPolicy(attempts, backoff=0.01)), sleep=slept.append)
    return f, slept


def test_cut_connection_resumes_with_range(store, fileserver, fault_proxy, big_file):
    path, data = big_file
    digest = dg.of_bytes(data)
    cut_at = 3_000_000
    fault_proxy.plan(f"cut:{cut_at}")
    fetcher, _ = _fetcher(store, fault_proxy.url, attempts=1)
    with pytest.raises(FetchError, match="connection closed|ChunkedEncodingError|ConnectionError"):
        fetcher.fetch("https://upstream.invalid" + path, digest, "components.big.amd64")
    assert not store.has(digest)
    kept = next(p for p in (store.root / "ingest").iterdir() if p.suffix != ".json").stat().st_size
    # At most one network read in flight is lost with the connection.
    assert cut_at - 65536 <= kept <= cut_at

    fileserver.clear_log()
    fetcher, _ = _fetcher(store, fault_proxy.url)
    res = fetcher.fetch("https://upstream.invalid" + path, digest, "components.big.amd64")
    assert store.read_bytes(digest) == data
    [entry] = fileserver.access_log()
    # The rerun asked only for the missing bytes, with If-Range, and nginx sent only those.
    assert entry.status == 206 and entry.range == f"bytes={kept}-"
    assert entry.if_range.startswith('"')
    assert entry.bytes_sent == len(data) - kept
    assert res.transferred == len(data) - kept


def test_changed_file_restarts_instead_of_splicing(store, fileserver, big_file):
    path, data = big_file
    digest = dg.of_bytes(data)
    with store.ingest(digest, "x") as ing:  # a partial from an older version of the file
        ing.write(b"\0" * 1000)
        ing.set_meta(url=fileserver.url + path, validator='"stale-etag"')
    fetcher = HttpFetcher(store)
    res = fetcher.fetch(fileserver.url + path, digest, "components.big.amd64")
    assert res.transferred == len(data)
    assert fileserver.access_log()[-1].status == 200  # If-Range did not match: full body
    assert store.read_bytes(digest) == data


def test_wrong_sha256_names_everything_and_stores_nothing(store, fileserver, big_file):
    path, data = big_file
    wrong = dg.of_bytes(b"not it")
    fetcher = HttpFetcher(store)
    with pytest.raises(DigestMismatch) as err:
        fetcher.fetch(fileserver.url + path, wrong, "components.kubelet.arm64")
    text = str(err.value)
    assert "components.kubelet.arm64" in text and fileserver.url + path in text
    assert wrong in text and dg.of_bytes(data) in text
    assert list((store.root / "blobs" / "sha256").iterdir()) == []
    assert list((store.root / "ingest").iterdir()) == []


def test_500_then_200_is_retried(store, fault_proxy, big_file):
    path, data = big_file
    fault_proxy.plan("status:500", "status:503")
    fetcher, slept = _fetcher(store, fault_proxy.url)
    fetcher.fetch("https://upstream.invalid" + path, dg.of_bytes(data), "x")
    assert [s.status for s in fault_proxy.requests_seen(3)] == [500, 503, 200]
    assert len(slept) == 2 and slept[1] > slept[0]  # exponential backoff


def test_429_honours_retry_after(store, fault_proxy, big_file):
    path, data = big_file
    fault_proxy.plan("status:429:retry-after=7")
    fetcher, slept = _fetcher(store, fault_proxy.url)
    fetcher.fetch("https://upstream.invalid" + path, dg.of_bytes(data), "x")
    assert slept == [7.0]
    assert store.has(dg.of_bytes(data))


def test_404_is_a_clear_error_without_retry_storm(store, fault_proxy):
    fetcher, slept = _fetcher(store, fault_proxy.url)
    with pytest.raises(FetchError) as err:
        fetcher.fetch("https://upstream.invalid/missing.bin", dg.of_bytes(b"x"), "components.runc.amd64")
    assert "components.runc.amd64" in str(err.value) and "HTTP 404" in str(err.value)
    time.sleep(0.2)  # room for a retry to show up, were there one
    assert len(fault_proxy.requests_seen(1)) == 1 and slept == []


def test_mirror_candidates_and_fallback():
    m = (FileMirror("https://dl.example/", ("http://m1/", "http://m2/")),)
    assert candidates("https://dl.example/a/b", m) == ["http://m1/a/b", "http://m2/a/b", "https://dl.example/a/b"]
    m = (FileMirror("https://dl.example/", ("http://m1/",), fallback=False),)
    assert candidates("https://dl.example/a", m) == ["http://m1/a"]
    assert candidates("https://other/x", m) == ["https://other/x"]


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builder", *args], cwd=REPO, capture_output=True,
                          text=True, **kw)


def test_fetch_cli_cold_then_warm_does_no_transfer(fixture_lock, file_mirror, tmp_path):
    server, _ = file_mirror
    store = tmp_path / "store"
    cold = _run(["--lock", str(fixture_lock), "--store", str(store), "fetch", "--cross"])
    assert cold.returncode == 0, cold.stderr
    served = [e for e in server.access_log() if e.path != "/"]
    assert len(served) >= 10 and all(e.status == 200 for e in served)
    server.clear_log()
    warm = _run(["--lock", str(fixture_lock), "--store", str(store), "fetch", "--cross"])
    assert warm.returncode == 0, warm.stderr
    assert server.access_log() == []  # no network transfer at all
    assert "0 downloaded" in warm.stderr


def test_kill_9_during_fetch_then_rerun(fixture_lock, fault_proxy, tmp_path):
    lock = lockfile.load(fixture_lock)
    mirrors = lockfile.Mirrors(files=(FileMirror("https://fixtures.invalid/", (fault_proxy.url + "/",), False),))
    mfile = tmp_path / "mirrors.yaml"
    mfile.write_text(f"files: [{{prefix: 'https://fixtures.invalid/', endpoints: ['{fault_proxy.url}/'], fallback: false}}]\n")
    assert lock.with_mirrors(mirrors).mirrors.files[0].endpoints == (fault_proxy.url + "/",)
    fault_proxy.plan(*["slow:4000000"] * 40)
    store = tmp_path / "store"
    args = ["--lock", str(fixture_lock), "--store", str(store), "--mirrors", str(mfile), "-j", "2",
            "fetch", "--cross"]
    proc = subprocess.Popen([sys.executable, "-m", "builder", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(size > 1_000_000 for size in _partial_sizes(store)):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(size > 0 for size in _partial_sizes(store))
    fault_proxy.script.clear()
    rerun = _run(args)
    assert rerun.returncode == 0, rerun.stderr
    # Consistent: every blob hashes to its name, and nothing is left half-written.
    for blob in (store / "blobs" / "sha256").iterdir():
        assert dg.of_file(blob)[0] == "sha256:" + blob.name
    assert [p for p in (store / "ingest").iterdir()] == []
    assert any(s.range for s in fault_proxy.requests_seen(1))  # the rerun resumed a partial


def _partial_sizes(store: Path) -> list[int]:
    """Sizes of the partial downloads in the store's ingest dir while a fetch runs: not their
    .json records, nor the dot-named temp files the atomic writes of those records rename away
    (one can vanish between listing and stat, which the loop above must not trip over)."""
    sizes = []
    for p in (store / "ingest").glob("*") if (store / "ingest").exists() else ():
        if p.suffix == ".json" or p.name.startswith("."):
            continue
        try:
            sizes.append(p.stat().st_size)
        except FileNotFoundError:  # finished and moved into blobs/ meanwhile
            continue
    return sizes


def test_fetch_refuses_unresolved_with_hint(tmp_path):
    res = _run(["--store", str(tmp_path / "s"), "fetch", "--files-only", "--arch", "amd64"])
    assert res.returncode == 1
    assert "components.rke2.amd64.sha256" in res.stderr and "python -m builder lock" in res.stderr
    assert "Traceback" not in res.stderr


def test_unused_replace_import_guard():
    assert replace  # keeps dataclasses.replace importable for fixtures
