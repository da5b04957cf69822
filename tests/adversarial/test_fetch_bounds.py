"""Bounded resources on the fetch side (issue 10, item 8): attacker (a) runs a file server,
registry or mirror the build host talks to, attacker (c) edits the lock.

Downloads stop at the size pinned in the lock (``size:``, filled by `lock`) or at
BUILDER_MAX_DOWNLOAD; a manifest is capped at 4 MiB; a deeply nested JSON document is a clear
BuilderError, not a RecursionError. Real nginx and the real CLI where they can show it; a small
local server where they cannot (see ``Hostile``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder import digest as dg
from builder.errors import BuilderError, FetchError
from builder.fetch.http import (
    DEFAULT_MAX_DOWNLOAD,
    HttpFetcher,
    HttpOptions,
    max_download_from_env,
)
from builder.fetch.registry import MAX_MANIFEST, RegistryClient
from builder.fetch.resolve import resolve_artifact
from builder.fetch.transport import RetryPolicy
from builder.lock import lockfile
from builder.lock.lockfile import FileArtifact, FileMirror
from builder.oci import model as m
from builder.oci.reference import Reference
from builder.store import Store
from tests.rig import httpd

REPO = Path(__file__).resolve().parents[2]
UPSTREAM = "https://upstream.invalid"
SERVER_CAP = 256 << 20  # the hostile server gives up after this much, so a regression ends


class Hostile:
    """A server no real one imitates on demand: an endless chunked body, or a Content-Length far
    larger than what it sends. nginx always sends an honest Content-Length for a static file, so
    these two misbehaviours are faked here; ``sent`` records how much the client let through."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802 (http.server naming)
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802
                if self.path.endswith(".sha256") or self.path.endswith(".sha256sum"):
                    if "/endless-checksum/" not in self.path:
                        return self.do_HEAD()
                self.send_response(200)
                self.send_header("Content-Type", m.OCI_MANIFEST)
                lying = "/liar/" in self.path
                if lying:
                    self.send_header("Content-Length", str(10 << 30))
                else:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk, sent = b"0" * 65536, 0
                try:
                    while sent < SERVER_CAP:
                        self.wfile.write(chunk if lying else b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        sent += len(chunk)
                except OSError:  # the client hung up: exactly what a bounded client does
                    pass
                finally:
                    hostile.sent[self.path] = sent
                self.close_connection = True

        self.server = httpd.serve(Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def sent_for(self, path: str, timeout: float = 30.0) -> int:
        """Bytes sent on ``path``, once the server noticed the client hung up."""
        deadline = time.monotonic() + timeout
        while path not in self.sent and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.sent[path]

    def stop(self) -> None:
        httpd.shutdown(self.server)


@pytest.fixture
def hostile():
    server = Hostile()
    yield server
    server.stop()


def _fetcher(store: Store, base: str, **opts) -> HttpFetcher:
    mirrors = (FileMirror(UPSTREAM + "/", (base + "/",), fallback=False),)
    return HttpFetcher(store, mirrors, HttpOptions(policy=RetryPolicy(attempts=1, backoff=0.01), **opts),
                       sleep=lambda _s: None)


def _nothing_kept(store: Store, digest: str) -> None:
    assert not store.has(digest)
    assert list((store.root / "ingest").iterdir()) == []  # no partial kept for a "resume"


# -- files: the pinned size ---------------------------------------------------------------------

def test_file_larger_than_its_pinned_size_is_refused(store, fileserver):
    """Real nginx serves a file bigger than the pin: refused on its Content-Length, nothing kept."""
    data = os.urandom(3 << 20)
    (fileserver.root / "big.bin").write_bytes(data)
    digest = dg.of_bytes(data)
    with pytest.raises(FetchError) as err:
        _fetcher(store, fileserver.url).fetch(UPSTREAM + "/big.bin", digest, "components.big.amd64",
                                              size=1 << 20)
    assert err.value.message == (f"components.big.amd64 from {fileserver.url}/big.bin: expected at "
                                 f"most the pinned size of {1 << 20} bytes, the server announced "
                                 f"{len(data)} bytes")
    assert "nothing was stored" in err.value.hint
    _nothing_kept(store, digest)
    # The right pin fetches it.
    res = _fetcher(store, fileserver.url).fetch(UPSTREAM + "/big.bin", digest, "components.big.amd64",
                                                size=len(data))
    assert res.size == len(data)


def test_endless_body_stops_at_the_pinned_size(store, hostile):
    digest = dg.of_bytes(b"anything")
    with pytest.raises(FetchError) as err:
        _fetcher(store, hostile.url).fetch(UPSTREAM + "/endless/file", digest, "components.x.amd64",
                                           size=1 << 20)
    assert err.value.message.startswith(f"components.x.amd64 from {hostile.url}/endless/file: "
                                        f"expected at most the pinned size of {1 << 20} bytes, got at least ")
    _nothing_kept(store, digest)
    assert hostile.sent_for("/endless/file") < 16 << 20


def test_endless_body_without_a_pin_stops_at_the_configured_maximum(store, hostile):
    digest = dg.of_bytes(b"anything")
    with pytest.raises(FetchError) as err:
        _fetcher(store, hostile.url, max_download=2 << 20).fetch(
            UPSTREAM + "/endless/file", digest, "components.x.amd64")
    assert f"expected at most the {2 << 20}-byte maximum for a file without a pinned size " \
           "(BUILDER_MAX_DOWNLOAD)" in err.value.message
    assert "BUILDER_MAX_DOWNLOAD" in err.value.hint and "lock --refresh" in err.value.hint
    _nothing_kept(store, digest)
    assert hostile.sent_for("/endless/file") < 16 << 20


def test_a_lying_content_length_is_refused_before_the_body(store, hostile):
    digest = dg.of_bytes(b"anything")
    with pytest.raises(FetchError, match=r"the server announced 10737418240 bytes"):
        _fetcher(store, hostile.url).fetch(UPSTREAM + "/liar/file", digest, "components.x.amd64",
                                           size=1 << 20)
    _nothing_kept(store, digest)


def test_max_download_from_env():
    assert max_download_from_env({}) == DEFAULT_MAX_DOWNLOAD == 4 << 30
    assert max_download_from_env({"BUILDER_MAX_DOWNLOAD": "1048576"}) == 1 << 20
    for bad in ("-1", "0", "1G", "lots"):
        with pytest.raises(BuilderError, match="BUILDER_MAX_DOWNLOAD: expected a positive number"):
            max_download_from_env({"BUILDER_MAX_DOWNLOAD": bad})


def test_fetch_cli_stops_at_the_lock_size(fixture_lock, tmp_path):
    """End to end through nginx: a lock whose size: is smaller than the real file."""
    lock = lockfile.load(fixture_lock)
    comp = lock.components["runc"]
    art = comp.arches["amd64"]
    assert art.size and art.size > 1
    comps = {**lock.components, "runc": replace(comp, arches={**comp.arches,
                                                               "amd64": replace(art, size=art.size - 1)})}
    lockfile.save(replace(lock, components=comps), fixture_lock)
    res = subprocess.run([sys.executable, "-m", "builder", "--lock", str(fixture_lock), "--store",
                          str(tmp_path / "s"), "fetch", "--arch", "amd64"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    assert ("components.runc.amd64 from " in res.stderr
            and f"expected at most the pinned size of {art.size - 1} bytes, the server announced "
                f"{art.size} bytes" in res.stderr), res.stderr
    assert not Store(tmp_path / "s").has(art.digest)


# -- lock: what it reads while resolving --------------------------------------------------------

def test_lock_stops_hashing_an_endless_file(store, hostile):
    art = FileArtifact(url=UPSTREAM + "/endless/file")
    with pytest.raises(FetchError, match="maximum for a file without a pinned size"):
        resolve_artifact(_fetcher(store, hostile.url, max_download=2 << 20), art, "components.x.amd64")
    assert hostile.sent_for("/endless/file") < 16 << 20


def test_lock_reads_at_most_a_mebibyte_of_a_checksum_file(store, hostile):
    art = FileArtifact(url=UPSTREAM + "/liar/file",
                       checksum_url=UPSTREAM + "/endless-checksum/file.sha256")
    with pytest.raises(FetchError):  # no checksum found; hashing the lying file is refused
        resolve_artifact(_fetcher(store, hostile.url, max_download=2 << 20), art, "components.x.amd64")
    assert hostile.sent_for("/endless-checksum/file.sha256") < 16 << 20


def test_lock_records_the_size(store, fileserver):
    data = os.urandom(12345)
    (fileserver.root / "f.bin").write_bytes(data)
    (fileserver.root / "f.bin.sha256").write_text(dg.of_bytes(data)[7:] + "  f.bin\n")
    resolved, how = resolve_artifact(_fetcher(store, fileserver.url),
                                     FileArtifact(url=UPSTREAM + "/f.bin"), "components.f.amd64")
    assert how.startswith("published checksum") and resolved.size == len(data)
    (fileserver.root / "f.bin.sha256").unlink()
    resolved, how = resolve_artifact(_fetcher(store, fileserver.url),
                                     FileArtifact(url=UPSTREAM + "/f.bin"), "components.f.amd64")
    assert how == "downloaded and hashed" and resolved.size == len(data)


# -- manifests and JSON -------------------------------------------------------------------------

def test_registry_manifest_is_capped(hostile):
    client = RegistryClient(mirrors=lockfile.Mirrors(insecure=(hostile.url[7:],)))
    host = hostile.url[7:]
    with pytest.raises(FetchError, match=f"manifest larger than {MAX_MANIFEST} bytes"):
        client.get_manifest(Reference(host, "evil/endless", "v1"))
    assert hostile.sent_for("/v2/evil/endless/manifests/v1") < MAX_MANIFEST + (16 << 20)


def _nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, _nested(100_000), _nested(65)],
                         ids=["arrays-100k", "objects-100k", "objects-65"])
def test_deep_json_is_a_clear_error(raw):
    with pytest.raises(BuilderError) as err:
        m.parse_document(raw, "docker.io/evil/deep@sha256:x")
    assert err.value.message == ("docker.io/evil/deep@sha256:x: JSON nested more than 64 levels "
                                 "deep; refusing it")


def test_oversized_json_is_refused_before_parsing():
    raw = json.dumps({"schemaVersion": 2, "pad": "x" * (4 << 20)}).encode()
    with pytest.raises(BuilderError, match=r"more than the 4194304-byte limit"):
        m.load_json_object(raw, "config")


@settings(max_examples=100, deadline=None)
@given(st.recursive(st.integers(0, 1) | st.text(alphabet="[]{}\"\\", max_size=3),
                    lambda kids: st.lists(kids, max_size=2) | st.dictionaries(st.text(max_size=2), kids, max_size=2),
                    max_leaves=120))
def test_json_depth_limit_is_exact(value):
    wrapped = {"v": value}
    raw = json.dumps(wrapped).encode()

    def depth(x) -> int:
        kids = list(x.values()) if isinstance(x, dict) else x if isinstance(x, list) else None
        return 0 if kids is None else 1 + max((depth(k) for k in kids), default=0)

    if depth(wrapped) > m.MAX_DEPTH:
        with pytest.raises(BuilderError, match="nested more than"):
            m.load_json_object(raw, "doc")
    else:
        assert m.load_json_object(raw, "doc") == wrapped
