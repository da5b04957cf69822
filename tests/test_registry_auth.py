"""Credentials, TLS, basic auth and token auth against real registries (and a real JWT issuer)."""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.errors import FetchError
from builder.fetch.auth import AuthError, Credentials, Keychain, env_key
from builder.fetch.images import pull_images
from builder.fetch.registry import ClientOptions, RegistryClient
from builder.fetch.transport import RetryPolicy
from builder.oci.reference import DEFAULT_HOST, Reference, parse
from builder.store import Store
from tests.plugins.registry import USERS
from tests.rig.images import lock_for

ARCHES = ("amd64", "arm64")


def _pull(setup, client, tmp_path: Path, images=None, arches=ARCHES):
    images = images or setup.images
    lock = lock_for([i.pin(setup.host) for i in images], arches, setup.mirrors)
    return pull_images(lock, arches, Store(tmp_path / "store"), client=client, quiet=True)


def _assert_no_secret(exc: BaseException, *secrets: str) -> None:
    text = f"{exc}\n{exc!r}\n{getattr(exc, 'hint', '')}"
    for secret in secrets:
        assert secret not in text


# -- where credentials come from -------------------------------------------------------------


def test_env_variable_per_host():
    kc = Keychain(env={env_key("reg.example:5000"): "ci:pa:ss"}, config_dir=Path("/nonexistent"))
    assert env_key("reg.example:5000") == "BUILDER_REGISTRY_AUTH_REG_EXAMPLE___5000"
    assert kc.lookup("reg.example:5000") == Credentials("ci", "pa:ss")
    assert kc.lookup("other.example") is None
    assert "pa:ss" not in repr(kc.lookup("reg.example:5000")) and "pa:ss" not in repr(kc)


@pytest.fixture
def pass_store() -> Iterator[dict[str, str]]:
    """A throwaway `pass` store for Debian's real docker-credential-pass (package
    golang-docker-credential-helpers): a GnuPG home with a key generated in batch mode, no
    passphrase, so helper calls run headless. Yields the environment the helper needs."""
    helper = shutil.which("docker-credential-pass")
    if helper is None or shutil.which("pass") is None or shutil.which("gpg") is None:
        pytest.skip("docker-credential-pass, pass or gpg is not installed (scripts/setup installs them)")
    # gpg-agent's socket path must stay short: a directory directly under /tmp, not pytest's.
    root = Path(tempfile.mkdtemp(prefix="credpass-"))
    env = {"PATH": os.environ["PATH"], "HOME": str(root), "GNUPGHOME": str(root / "gnupg"),
           "PASSWORD_STORE_DIR": str(root / "store")}
    (root / "gnupg").mkdir(mode=0o700)
    try:
        run = functools.partial(subprocess.run, env=env, check=True, capture_output=True)
        run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", "",
             "--quick-gen-key", "rig test <rig@test.invalid>", "default", "default", "never"])
        listing = run(["gpg", "--batch", "--with-colons", "--list-keys"]).stdout.decode()
        fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
        run(["pass", "init", fingerprint])
        yield env
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _helper_store(env: dict[str, str], server: str, user: str, secret: str) -> None:
    """What `docker login` does with a credential helper: `docker-credential-pass store`."""
    subprocess.run(["docker-credential-pass", "store"], env=env, check=True, capture_output=True,
                   input=json.dumps({"ServerURL": server, "Username": user, "Secret": secret}).encode())


def test_docker_config_auths_helpers_and_store(tmp_path, pass_store):
    """auths (base64 and username/password, URL keys, Docker Hub's legacy key), credHelpers and
    credsStore through Debian's real docker-credential-pass over a throwaway pass store."""
    _helper_store(pass_store, "helped.example", "helper-user", "s-helped")
    _helper_store(pass_store, "other.example", "store-user", "s-other")
    config = {
        "auths": {
            "b64.example": {"auth": base64.b64encode(b"u1:p1").decode()},
            "https://plain.example/v1/": {"username": "u2", "password": "p2"},
            f"https://index.{DEFAULT_HOST}/v1/": {"auth": base64.b64encode(b"hub:hubpw").decode()},
        },
        "credHelpers": {"helped.example": "pass"},
        "credsStore": "pass",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    kc = Keychain(env=pass_store, config_dir=tmp_path)
    assert kc.lookup("b64.example") == Credentials("u1", "p1")
    assert kc.lookup("plain.example") == Credentials("u2", "p2")
    assert kc.lookup(DEFAULT_HOST) == Credentials("hub", "hubpw")
    assert kc.lookup("helped.example") == Credentials("helper-user", "s-helped")
    assert kc.lookup("other.example") == Credentials("store-user", "s-other")
    # docker-credential-pass 0.6 answers a miss with exit 0 and empty fields: still a miss.
    assert kc.lookup("nothere.example") is None

    env_first = Keychain(env={**pass_store, env_key("b64.example"): "envu:envp"}, config_dir=tmp_path)
    assert env_first.lookup("b64.example") == Credentials("envu", "envp")


def test_helper_not_found_protocol(tmp_path):
    """Newer helpers (docker-credential-helpers 0.7+) answer a miss with exit 1 and "credentials
    not found in native keychain"; Debian 12 ships 0.6, which cannot produce that answer, so this
    one case uses a stand-in script speaking the protocol's miss, then a failure that is not a
    miss (whose stdout, which could hold a secret, stays out of the error)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-standin"
    helper.write_text('#!/bin/sh\nread host\ncase "$host" in\n'
                      '  *miss*) echo "credentials not found in native keychain"; exit 1;;\n'
                      '  *) echo "leaky-secret-out"; echo "store locked" >&2; exit 3;;\nesac\n')
    helper.chmod(0o755)
    (tmp_path / "config.json").write_text(json.dumps({"credsStore": "standin"}))
    kc = Keychain(env={"PATH": str(bindir)}, config_dir=tmp_path)
    assert kc.lookup("miss.example") is None
    with pytest.raises(AuthError, match="exit 3.*store locked") as err:
        kc.lookup("locked.example")
    assert "leaky-secret-out" not in str(err.value)


# -- basic auth over TLS ---------------------------------------------------------------------


def test_basic_tls_pull_with_credentials(basic_setup, tmp_path):
    report = _pull(basic_setup, basic_setup.client(), tmp_path)
    assert report.blobs_fetched > 0 and report.bytes_transferred > 0


def test_basic_wrong_password_names_registry_and_repository(basic_setup, tmp_path):
    client = basic_setup.client("alice", "not-the-password-123")
    with pytest.raises(AuthError) as err:
        _pull(basic_setup, client, tmp_path)
    text = str(err.value)
    assert basic_setup.host in text and "fixtures/" in text and "'alice'" in text
    _assert_no_secret(err.value, "not-the-password-123", USERS["alice"])
    assert "not-the-password-123" not in repr(client)


def test_basic_anonymous_is_told_how_to_log_in(basic_setup, tmp_path):
    with pytest.raises(AuthError, match="anonymous .* refused") as err:
        _pull(basic_setup, basic_setup.client(anonymous=True), tmp_path)
    assert env_key(basic_setup.host) in (err.value.hint or "")


def test_tls_verified_by_default(basic_setup):
    """Without the test CA the registry's certificate is not trusted: refused, never ignored."""
    client = RegistryClient(options=ClientOptions(policy=RetryPolicy(attempts=1)))
    with pytest.raises(FetchError, match="(?i)certificate"):
        client.get_manifest(parse(basic_setup.images[0].ref(basic_setup.host)))


# -- token auth ------------------------------------------------------------------------------


def test_token_pull_with_credentials_asks_per_repository_scope(token_setup, tmp_path):
    issuer = token_setup.issuer
    before = len(issuer.requests)
    report = _pull(token_setup, token_setup.client(), tmp_path)
    assert report.blobs_fetched > 0
    scopes = {s for r in issuer.requests[before:] for s in r["scope"]}
    assert scopes == {f"repository:{i.repository}:pull" for i in token_setup.images}
    assert all(r["user"] == "alice" and r["service"] for r in issuer.requests[before:])


def test_token_anonymous_pull_where_allowed_and_refused_elsewhere(token_setup, tmp_path):
    anon = token_setup.client(anonymous=True)
    busybox = [i for i in token_setup.images if i.repository == "fixtures/busybox"]
    assert _pull(token_setup, anon, tmp_path / "ok", busybox).blobs_fetched > 0
    socat = [i for i in token_setup.images if i.repository == "fixtures/socat"]
    with pytest.raises(AuthError) as err:
        _pull(token_setup, token_setup.client(anonymous=True), tmp_path / "no", socat)
    assert "fixtures/socat" in str(err.value) and token_setup.host in str(err.value)
    assert "anonymous" in str(err.value)


def test_token_wrong_password(token_setup, tmp_path):
    with pytest.raises(AuthError) as err:
        _pull(token_setup, token_setup.client("alice", "wrong-pw-777"), tmp_path)
    text = str(err.value)
    assert "refused user 'alice'" in text and token_setup.host in text and "fixtures/" in text
    _assert_no_secret(err.value, "wrong-pw-777", USERS["alice"])


def test_token_missing_scope(token_setup, fixture_set, tmp_path):
    """bob may pull busybox only: pulling socat and pushing busybox are refused by scope."""
    bob = token_setup.client("bob")
    socat = [i for i in token_setup.images if i.repository == "fixtures/socat"]
    with pytest.raises(AuthError, match="insufficient_scope") as err:
        _pull(token_setup, bob, tmp_path, socat)
    assert "fixtures/socat" in str(err.value) and "'bob'" in str(err.value)
    _assert_no_secret(err.value, USERS["bob"])

    store, images = fixture_set
    with pytest.raises(AuthError, match="no pull,push access.*insufficient_scope") as err:
        bob.push_tree(store, Reference(token_setup.host, "fixtures/busybox", "bob"), images[0].top)
    assert "fixtures/busybox" in str(err.value)


def test_token_expired_is_a_clear_error(token_setup, tmp_path):
    """The issuer hands out tokens that are already expired: one fresh token is tried, then a
    clear error (invalid_token) naming registry and repository."""
    issuer = token_setup.issuer
    issuer.ttl = -300  # well past distribution's 60 s leeway
    try:
        with pytest.raises(AuthError, match="invalid_token") as err:
            _pull(token_setup, token_setup.client(), tmp_path)
    finally:
        issuer.ttl = 300
    assert token_setup.host in str(err.value) and "fixtures/" in str(err.value)


def test_token_expiring_in_use_is_refreshed_on_401(token_setup, tmp_path):
    """Tokens usable for ~2 s (distribution allows 60 s of leeway past ``exp``, so exp = now-58)
    but advertised for 300 s, so the client keeps using one: after it expires, the registry's
    401 gets one fresh token and the pull goes on."""
    issuer = token_setup.issuer
    client = token_setup.client()
    busybox = [i for i in token_setup.images if i.repository == "fixtures/busybox"]
    issuer.ttl, issuer.advertised_ttl = -58, 300
    try:
        _pull(token_setup, client, tmp_path / "a", busybox, ("amd64",))
        asked = len(issuer.requests)
        time.sleep(2.5)
        report = _pull(token_setup, client, tmp_path / "b", busybox, ("amd64",))
    finally:
        issuer.ttl, issuer.advertised_ttl = 300, None
    assert report.blobs_fetched > 0
    assert len(issuer.requests) == asked + 1  # exactly one refresh, not one per request
