"""The one transport: the retry policy against real servers, typed status errors, the blob copy.

The policy is driven through ``transport.send`` against the rig's fault proxy in front of the real
nginx file server (429 + Retry-After, 503, 404), and against two tiny loopback servers for what the
proxy cannot say: a Retry-After written as an HTTP date, and a connection dropped before any answer.
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from builder import digest as dg
from builder.errors import FetchError, HttpStatusError
from builder.fetch.http import HttpFetcher, HttpOptions
from builder.fetch.registry import ClientOptions, RegistryClient
from builder.fetch.transport import RetryPolicy, new_session, send
from builder.lock.lockfile import Mirrors, RegistryMirror
from builder.oci.reference import Reference
from builder.store import Store
from tests.rig import httpd
from tests.rig.procs import free_port


def _send(policy: RetryPolicy, url: str) -> tuple[requests.Response, list[float]]:
    slept: list[float] = []
    session = new_session()
    resp = send(policy, "GET", url, lambda: session.get(url, timeout=(2, 5)), sleep=slept.append)
    resp.close()
    return resp, slept


@pytest.fixture
def small_file(fileserver) -> str:
    (fileserver.root / "small.bin").write_bytes(b"x" * 1000)
    return "/small.bin"


# -- the policy against real servers --------------------------------------------------------------


def test_429_retry_after_seconds_is_waited_exactly(fault_proxy, small_file):
    fault_proxy.plan("status:429:retry-after=7")
    resp, slept = _send(RetryPolicy(backoff=0.01), fault_proxy.url + small_file)
    assert resp.status_code == 200
    assert slept == [7.0]  # the server's word, not the 0.01 s back-off
    assert [s.status for s in fault_proxy.requests_seen(2)] == [429, 200]


def test_retry_after_is_capped(fault_proxy, small_file):
    fault_proxy.plan("status:503:retry-after=3600")
    _, slept = _send(RetryPolicy(backoff=0.01, max_retry_after=2.5), fault_proxy.url + small_file)
    assert slept == [2.5]


@pytest.fixture
def scripted() -> Iterator[tuple[str, list[str]]]:
    """A loopback server answering from a script, one entry per request: ``date:<seconds>`` (429
    with Retry-After as an HTTP date that far ahead), ``drop`` (close the connection without a
    word: the reset a real server shows only when it crashes), ``ok`` (200). Then always 200."""
    script: list[str] = []

    class Handler(httpd.Quiet):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            action = script.pop(0) if script else "ok"
            if action == "drop":
                self.close_connection = True
                self.connection.close()
                return
            if action.startswith("date:"):
                when = email.utils.formatdate(time.time() + float(action[5:]), usegmt=True)
                self.send_response(429)
                self.send_header("Retry-After", when)
            else:
                self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = httpd.serve(Handler)
    yield httpd.url(server), script
    httpd.shutdown(server)


def test_429_retry_after_http_date(scripted):
    url, script = scripted
    script.append("date:30")
    resp, slept = _send(RetryPolicy(backoff=0.01), url + "/x")
    assert resp.status_code == 200
    [waited] = slept
    assert 27.0 <= waited <= 30.0  # the date, less the second it is rounded to


def test_503_then_success_backs_off(fault_proxy, small_file):
    fault_proxy.plan("status:503", "status:502")
    resp, slept = _send(RetryPolicy(backoff=0.2), fault_proxy.url + small_file)
    assert resp.status_code == 200
    assert [s.status for s in fault_proxy.requests_seen(3)] == [503, 502, 200]
    # Doubling with up to a quarter added: [0.2, 0.25] then [0.4, 0.5].
    assert 0.2 <= slept[0] <= 0.25 and 0.4 <= slept[1] <= 0.5


def test_connection_reset_is_retried(scripted):
    url, script = scripted
    script.append("drop")
    resp, slept = _send(RetryPolicy(backoff=0.01), url + "/x")
    assert resp.status_code == 200 and len(slept) == 1


def test_4xx_is_not_retried(fault_proxy):
    resp, slept = _send(RetryPolicy(backoff=0.01), fault_proxy.url + "/missing.bin")
    assert resp.status_code == 404 and slept == []
    time.sleep(0.2)  # room for a retry to show up, were there one
    assert len(fault_proxy.requests_seen(1)) == 1


def test_give_up_names_the_url_status_and_attempts(fault_proxy, small_file):
    fault_proxy.plan("status:503", "status:503", "status:503")
    url = fault_proxy.url + small_file
    with pytest.raises(HttpStatusError) as err:
        _send(RetryPolicy(attempts=3, backoff=0.01), url)
    assert err.value.status == 503 and err.value.url == url
    assert f"GET {url}: HTTP 503 (after 3 attempts)" == err.value.message


def test_give_up_on_a_dead_port_names_the_url_and_attempts():
    url = f"http://127.0.0.1:{free_port()}/x"
    with pytest.raises(FetchError) as err:
        _send(RetryPolicy(attempts=2, backoff=0.01), url)
    assert not isinstance(err.value, HttpStatusError)
    assert err.value.message.startswith(f"GET {url}: Connection refused")
    assert err.value.message.endswith("(after 2 attempts)")


# -- typed status errors --------------------------------------------------------------------------


def test_file_fetch_404_carries_the_status(store, fileserver):
    with pytest.raises(HttpStatusError) as err:
        HttpFetcher(store, options=HttpOptions(policy=RetryPolicy(attempts=1))).fetch(
            fileserver.url + "/nothing-here", dg.of_bytes(b"x"), "components.x.amd64")
    assert err.value.status == 404


def test_a_tag_missing_on_every_endpoint_is_a_404(registry):
    """A mirror and the upstream (the same real registry twice) both answer 404: the aggregate
    error still says 404, so a caller asks ``exc.status``, never the message."""
    logical = "reg.example"
    alias = registry.host.replace("127.0.0.1", "localhost")
    mirrors = Mirrors(registries=(RegistryMirror(logical, (registry.host, alias), fallback=False),),
                      insecure=(registry.host, alias))
    client = RegistryClient(mirrors=mirrors, options=ClientOptions(policy=RetryPolicy(attempts=1)))
    with pytest.raises(HttpStatusError) as err:
        client.get_manifest(Reference(logical, "nobody/here", tag="v0"))
    assert err.value.status == 404


# -- the one blob copy: present? → mount → upload -------------------------------------------------


def _never_opened():
    raise AssertionError("no bytes may be sent for a blob the registry can reuse")


def test_copy_blob_uploads_then_finds_then_mounts(registry, tmp_path):
    client = RegistryClient(mirrors=Mirrors(insecure=(registry.host,)),
                            options=ClientOptions(policy=RetryPolicy(attempts=2, backoff=0.01)))
    src = Store(tmp_path / "s")
    data = b"copy me " * 1000 + str(time.time_ns()).encode()
    digest = src.put_bytes(data)
    first = Reference(registry.host, "copy/first")
    second = Reference(registry.host, "copy/second")

    told: list[str] = []
    up = client.copy_blob(first, digest, len(data), lambda: src.open(digest),
                          before_upload=lambda: told.append("uploading"))
    assert (up.outcome, up.sent) == ("uploaded", len(data)) and told == ["uploading"]
    again = client.copy_blob(first, digest, len(data), _never_opened)
    assert (again.outcome, again.sent) == ("present", 0)
    planned = client.copy_blob(second, digest, len(data), _never_opened, mount_from=first,
                               dry_run=True)
    assert planned.outcome == "mounted" and not client.blob_exists(second, digest)
    mounted = client.copy_blob(second, digest, len(data), _never_opened, mount_from=first,
                               before_upload=lambda: told.append("uploading"))
    assert (mounted.outcome, mounted.sent) == ("mounted", 0) and told == ["uploading"]
    assert client.blob_exists(second, digest)


def test_copy_blob_never_mounts_from_another_host(registry, tmp_path):
    client = RegistryClient(mirrors=Mirrors(insecure=(registry.host,)),
                            options=ClientOptions(policy=RetryPolicy(attempts=2, backoff=0.01)))
    src = Store(tmp_path / "s")
    data = b"elsewhere " + str(time.time_ns()).encode()
    digest = src.put_bytes(data)
    elsewhere = Reference("other.example:5000", "copy/first")
    opened = threading.Event()

    def opener():
        opened.set()
        return src.open(digest)

    got = client.copy_blob(Reference(registry.host, "copy/third"), digest, len(data), opener,
                           mount_from=elsewhere)
    assert got.outcome == "uploaded" and opened.is_set()


def test_a_plain_http_answer_to_tls_is_told_by_openssl_reason_code(scripted):
    """The code (WRONG_VERSION_NUMBER) is read from the wrapped ssl.SSLError, not the wording."""
    url, _ = scripted
    host = url.removeprefix("http://")
    client = RegistryClient(options=ClientOptions(policy=RetryPolicy(attempts=1)))
    with pytest.raises(FetchError) as err:
        client.get_manifest(Reference(host, "x/y", tag="v1"))
    assert f"{host} answered in plain HTTP, not TLS" in err.value.message
    assert "insecure: [" in (err.value.hint or "")


def test_sessions_ignore_the_environment_except_for_pinned_files(store):
    """Registry and GitHub sessions never pick up ~/.netrc or proxies; file downloads keep the
    proxy settings they always honoured."""
    assert new_session().trust_env is False
    assert RegistryClient().session.trust_env is False
    assert HttpFetcher(store).session.trust_env is True
    assert new_session().headers["User-Agent"] == "airgap-builder"
