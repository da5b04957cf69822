"""Credentials stay with their host (issue 10, item 5).

The attacker controls a registry or API host the build talks to, or edits ``images.lock`` to add
one. What must hold:

- a bearer token issued while talking to registry A is never sent to registry B, even when B's
  challenge names A's realm, service and a scope A was asked for (two real registries, one real
  JWT issuer);
- every host has its own ``BUILDER_REGISTRY_AUTH_…`` variable (the naming reads back one way
  only), and an old-style variable that could belong to two hosts of a build is refused before
  the first request;
- the GitHub token goes only to the configured API host and its upload host, over https (plain
  http only on loopback), never to an ``upload_url``, a pagination link or a redirect elsewhere.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder.errors import FetchError
from builder.fetch.auth import (
    AuthError,
    Credentials,
    Keychain,
    env_key,
    host_of_env_key,
    legacy_env_key,
)
from builder.fetch.images import pull_images
from builder.fetch.registry import RegistryClient
from builder.fetch.transport import RetryPolicy
from builder.lock.lockfile import ImagePin, Mirrors
from builder.oci.reference import parse
from builder.publish.github import GitHubClient, GitHubError, sync_release
from builder.publish.release import collect
from builder.store import Store
from tests.plugins.release import scanned_release
from tests.rig import httpd
from tests.rig.images import lock_for
from tests.rig.registry_auth import token_registry

NO_CONFIG = Path("/nonexistent")

# -- the token cache is keyed by registry host ------------------------------------------------


def test_registry_naming_another_registrys_realm_never_gets_its_token(token_setup, test_ca,
                                                                       tmp_path):
    """Registry B is a second real docker-registry whose token challenge names A's realm and
    service (B trusts the same issuer, so a token issued for A would work on B). The client holds
    alice's credentials for A only. It talks to B (B's challenge is learnt), then to A (alice's
    token for the same realm, service and scope), then to B again: B must get only tokens asked
    for B (anonymously: B has no credentials here), never alice's. B's own log says which user
    each request was authorised as."""
    issuer = token_setup.issuer
    b = token_registry(tmp_path / "registry-b", test_ca, issuer).start()
    try:
        client = token_setup.client()  # alice's credentials, for A's host only
        image = next(i for i in token_setup.images if i.repository == "fixtures/busybox")
        at_a, at_b = parse(image.ref(token_setup.host)), parse(image.ref(b.host))
        asked = len(issuer.requests)
        with pytest.raises(FetchError, match="not found"):  # B is empty: 404 once authorised
            client.get_manifest(at_b)
        for_b = issuer.requests[asked:]
        client.get_manifest(at_a)  # alice's token, for the realm/service/scope B named too
        asked = len(issuer.requests)
        with pytest.raises(FetchError, match="not found"):
            client.get_manifest(at_b)
        for_b += issuer.requests[asked:]
        assert for_b and all(r["user"] == "" for r in for_b)  # B's tokens: its own, anonymous
        log = (b.work / "registry.log").read_text()
        assert re.search(r'auth\.user\.name=(""|\s)', log)  # B authorised requests, anonymous...
        assert not re.search(r"auth\.user\.name\W+alice", log)  # ...and none as alice
    finally:
        b.stop()


# -- one variable per host ---------------------------------------------------------------------

_LABEL = st.from_regex(r"\A[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?\Z")
HOSTS = st.builds(
    lambda labels, port: ".".join(labels) + (f":{port}" if port is not None else ""),
    st.lists(_LABEL, min_size=1, max_size=4),
    st.none() | st.integers(1, 65535),
)


@settings(max_examples=200, deadline=None)
@given(HOSTS)
def test_env_naming_reads_back_one_way_only(host):
    """Injective: the variable of every hostname[:port] reads back to that host (so no two hosts,
    up to letter case, which DNS ignores, share one), and it is a portable variable name."""
    name = env_key(host)
    assert name is not None and re.fullmatch(r"[A-Z0-9_]+", name)
    assert host_of_env_key(name) == host.lower()


@settings(max_examples=200, deadline=None)
@given(HOSTS, HOSTS)
def test_distinct_hosts_have_distinct_variables(a, b):
    """Random pairs, and each host against its look-alikes (one separator swapped for another)."""
    assert (env_key(a) == env_key(b)) == (a.lower() == b.lower())
    swaps = [(".", "-"), ("-", "."), (":", "."), (":", "-"), ("-", "--"), (".", "")]
    look_alikes = {a.lower()} | {a.lower().replace(x, y, 1) for x, y in swaps}
    names = {h: env_key(h) for h in look_alikes if env_key(h) is not None}
    assert len(set(names.values())) == len(names)


def test_the_three_look_alike_hosts_of_the_issue():
    names = {h: env_key(h) for h in ("reg.corp.example", "reg-corp.example", "reg_corp.example")}
    assert names == {"reg.corp.example": "BUILDER_REGISTRY_AUTH_REG_CORP_EXAMPLE",
                     "reg-corp.example": "BUILDER_REGISTRY_AUTH_REG__CORP_EXAMPLE",
                     "reg_corp.example": None}  # not a hostname: Docker's config file only
    assert env_key("mirror.example.com:5000") == "BUILDER_REGISTRY_AUTH_MIRROR_EXAMPLE_COM___5000"
    assert env_key("[::1]:5000") is None
    kc = Keychain(env={"BUILDER_REGISTRY_AUTH_REG__CORP_EXAMPLE": "dash:pw-dash",
                       "BUILDER_REGISTRY_AUTH_REG_CORP_EXAMPLE": "dot:pw-dot"}, config_dir=NO_CONFIG)
    assert kc.lookup("reg-corp.example") == Credentials("dash", "pw-dash")
    assert kc.lookup("reg.corp.example") == Credentials("dot", "pw-dot")
    # reg_corp.example had the dotted host's variable under the old naming: refused, not guessed.
    with pytest.raises(AuthError, match="reg_corp.example cannot have a variable"):
        kc.lookup("reg_corp.example")


def test_old_style_variable_for_a_hyphenated_host_is_refused_not_guessed():
    """Under the old naming ``…_REG_CORP_EXAMPLE`` was the variable of reg-corp.example too; now it
    names reg.corp.example. Looking reg-corp.example up with only that variable set is refused,
    naming the variable, both hosts and the new name."""
    legacy = legacy_env_key("reg-corp.example")
    kc = Keychain(env={legacy: "ci:secret-pw-1"}, config_dir=NO_CONFIG)
    with pytest.raises(AuthError) as err:
        kc.lookup("reg-corp.example")
    text = f"{err.value}\n{err.value.hint}"
    assert legacy in text and "reg-corp.example" in text and "reg.corp.example" in text
    assert "BUILDER_REGISTRY_AUTH_REG__CORP_EXAMPLE" in text and "secret-pw-1" not in text
    # An explicit (even empty) new-style variable says what is meant: no refusal.
    kc = Keychain(env={legacy: "ci:secret-pw-1", env_key("reg-corp.example"): ""},
                  config_dir=NO_CONFIG)
    assert kc.lookup("reg-corp.example") is None
    assert kc.lookup("reg.corp.example") == Credentials("ci", "secret-pw-1")
    # Ports: the old name of host:5000 wrote ':' as '_' too.
    kc = Keychain(env={legacy_env_key("reg.example:5000"): "ci:pw"}, config_dir=NO_CONFIG)
    with pytest.raises(AuthError, match="BUILDER_REGISTRY_AUTH_REG_EXAMPLE___5000"):
        kc.lookup("reg.example:5000")


def test_lock_with_look_alike_host_is_refused_before_any_request(tmp_path):
    """A pull request adds an image from reg.corp.example (the attacker's) ahead of the real
    reg-corp.example, whose secret CI still holds under the old name. The pull refuses before the
    first request: had it started, the look-alike, met first, would have been sent the secret.
    (Neither host exists: the refusal comes before any connection is tried.)"""
    digest = "sha256:" + "a" * 64
    lock = lock_for([ImagePin(f"{h}/team/app:1.0", ("core",), digest, {"amd64": digest})
                     for h in ("reg.corp.example", "reg-corp.example")], ("amd64",), Mirrors())
    keychain = Keychain(env={"BUILDER_REGISTRY_AUTH_REG_CORP_EXAMPLE": "ci:s3cret"},
                        config_dir=NO_CONFIG)
    with pytest.raises(AuthError, match="BUILDER_REGISTRY_AUTH_REG_CORP_EXAMPLE is set") as err:
        pull_images(lock, ("amd64",), Store(tmp_path / "store"),
                    client=RegistryClient(keychain=keychain), quiet=True)
    assert "reg-corp.example" in str(err.value) and "s3cret" not in str(err.value)


def test_two_variables_for_docker_hub_must_agree():
    kc = Keychain(env={env_key("docker.io"): "a:1", env_key("index.docker.io"): "b:2"},
                  config_dir=NO_CONFIG)
    with pytest.raises(AuthError, match="both hold credentials for docker.io") as err:
        kc.lookup("docker.io")
    assert "1" not in str(err.value).replace("docker.io", "")


# -- the GitHub token goes to the configured hosts only, over https ---------------------------


@dataclass
class OtherHost:
    """Any HTTP server on another origin: a stand-in for "a host that is not the configured API".
    It answers from ``routes`` (path → (status, headers, JSON body)) and records every request's
    path and whether it carried an Authorization header; what it is does not matter, only what
    reached it."""

    routes: dict[str, tuple[int, dict[str, str], object]] = field(default_factory=dict)
    seen: list[tuple[str, str, bool]] = field(default_factory=list)  # method, path, had token
    server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.server_address[1]

    def start(self) -> OtherHost:
        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                path = self.path.split("?", 1)[0]
                host.seen.append((self.command, path, "Authorization" in self.headers))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, headers, body = host.routes.get(path, (404, {}, {"message": "Not Found"}))
                data = json.dumps(body).encode()
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _any  # noqa: N815 (http.server API)

        self.server = httpd.serve(Handler)
        return self

    def stop(self) -> None:
        httpd.shutdown(self.server)


@pytest.fixture
def other_host() -> Iterator[OtherHost]:
    host = OtherHost().start()
    yield host
    host.stop()


@pytest.fixture
def release_dir(tmp_path: Path, releases) -> Path:
    return scanned_release(releases["v1"], tmp_path / "artifacts")


def test_upload_url_on_another_host_gets_no_token(release_dir, github_fake, other_host):
    """The API answers a release whose upload_url points at another host: nothing is sent
    there, and the error names both hosts."""
    client = GitHubClient("example/rke2", github_fake.token, github_fake.url)
    rel = collect(release_dir)
    created = client.create_release(rel.tag, "x", "y")
    github_fake.releases[created["id"]]["upload_url"] = (
        f"http://localhost:{other_host.port}/uploads/repos/example/rke2/releases/"
        f"{created['id']}/assets{{?name,label}}")
    with pytest.raises(GitHubError, match="not the upload host") as err:
        sync_release(client, rel, attempts=1)
    assert f"localhost:{other_host.port}" in str(err.value) and github_fake.token not in str(err.value)
    assert other_host.seen == []


@pytest.mark.parametrize("url", ["http://ghe.example/api/v3", "http://api.github.com",
                                 "ftp://ghe.example/api/v3"])
def test_plain_http_api_is_refused(url):
    with pytest.raises(GitHubError, match="must be https"):
        GitHubClient.from_env("example/rke2", {"GITHUB_TOKEN": "t0ken", "GITHUB_API_URL": url})


def test_upload_hosts_derived_from_the_api():
    assert GitHubClient("o/r", "t", "https://api.github.com").origins[1] == \
        ("https", "uploads.github.com", 443)
    assert GitHubClient("o/r", "t", "https://ghe.example/api/v3").origins[1] == \
        ("https", "ghe.example", 443)


def test_pagination_link_to_another_host_is_not_followed_with_the_token(other_host):
    """A page of releases whose ``Link: next`` names another origin: refused before sending.
    (The other-host server plays the API here: only its answer's Link header matters.)"""
    api = f"http://127.0.0.1:{other_host.port}"
    other_host.routes["/repos/o/r/releases"] = (200, {"Link": f'<http://localhost:{other_host.port}'
                                                      '/repos/o/r/releases?page=2>; rel="next"'}, [])
    client = GitHubClient("o/r", "t0ken-123", api, policy=RetryPolicy(attempts=1))
    with pytest.raises(GitHubError, match="not on the API or upload host"):
        client.find_release("v1")
    assert other_host.seen == [("GET", "/repos/o/r/releases", True)]


@pytest.mark.parametrize("target", ["localhost", "127.0.0.1"])
def test_redirect_off_the_api_drops_the_token(other_host, target):
    """The API redirects (307) to another origin: a host name that differs, or the same host on
    another port. The follow-up request reaches it without the token (requests drops it when
    host, port or scheme change; the client's guard refuses any token bound elsewhere)."""
    elsewhere = OtherHost().start()
    try:
        elsewhere.routes["/list"] = (200, {}, [])
        other_host.routes["/repos/o/r/releases"] = (
            307, {"Location": f"http://{target}:{elsewhere.port}/list"}, {})
        client = GitHubClient("o/r", "t0ken-123", f"http://127.0.0.1:{other_host.port}", policy=RetryPolicy(attempts=1))
        assert client.find_release("v1") is None
        assert other_host.seen == [("GET", "/repos/o/r/releases", True)]
        assert elsewhere.seen == [("GET", "/list", False)]
    finally:
        elsewhere.stop()


def test_session_guard_refuses_a_token_bound_elsewhere(other_host):
    """The client's session itself refuses an Authorization header to any other origin (what
    would catch a redirect hop that ``requests`` let keep the header, e.g. http:80 → https:443
    on one host, which it treats as an upgrade)."""
    client = GitHubClient("o/r", "t0ken-123", "http://127.0.0.1:9", policy=RetryPolicy(attempts=1))
    with pytest.raises(GitHubError, match="refusing to send the token to http://localhost"):
        client.session.get(f"http://localhost:{other_host.port}/x",
                           headers={"Authorization": "Bearer t0ken-123"}, timeout=5)
    assert other_host.seen == []
