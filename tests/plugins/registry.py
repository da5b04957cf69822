"""Fixtures for the registry client, pulls and the daemon source: real registries, real podman.

Session-scoped set-ups (built and pushed once, read-only for tests):
- ``fixture_set``: the multi-arch fixture images built in a scratch store (tests/rig/images.py)
- ``anon_setup``: anonymous docker-registry over plain HTTP (listed insecure)
- ``basic_setup``: docker-registry over TLS (test CA) with htpasswd basic auth
- ``token_setup``: docker-registry over TLS with token auth and a JWT issuer on loopback
Tests that break a registry (corrupt storage, stop it) use the function-scoped ``registry``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from builder.fetch.auth import Keychain, env_key
from builder.fetch.registry import ClientOptions, RegistryClient
from builder.fetch.transport import RetryPolicy
from builder.lock.lockfile import Mirrors
from builder.store import Store
from tests.rig.images import FixtureImage, build_fixtures, push_fixtures
from tests.rig.procs import Process, wait_for
from tests.rig.registry import Registry
from tests.rig.registry_auth import TestCA, TokenIssuer, basic_registry, token_registry

USERS = {"alice": "alice-pw-Zx81", "bob": "bob-pw-Qm42"}
# alice may push and pull everything; bob may only pull busybox; anonymous may pull busybox.
ACL = {"alice": {"*": ("pull", "push")}, "bob": {"fixtures/busybox": ("pull",)},
       "": {"fixtures/busybox": ("pull",)}}


@dataclass
class Setup:
    name: str
    registry: Registry
    images: list[FixtureImage]
    ca_file: Path | None = None
    creds: tuple[str, str] | None = field(default=None, repr=False)
    issuer: TokenIssuer | None = None
    extra: dict = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.registry.host

    @property
    def mirrors(self) -> Mirrors:
        return Mirrors(insecure=(self.host,)) if self.registry.scheme == "http" else Mirrors()

    def client(self, user: str | None = None, password: str | None = None, *,
               anonymous: bool = False, **options) -> RegistryClient:
        """A client with the set-up's credentials (or ``user``'s, or none when ``anonymous``)."""
        if not anonymous and user is None and self.creds:
            user, password = self.creds
        env: dict[str, str] = {}
        if user and not anonymous:
            env[env_key(self.host)] = f"{user}:{password if password is not None else USERS[user]}"
        opts = ClientOptions(**{"ca_file": self.ca_file, "policy": RetryPolicy(attempts=3, backoff=0.05),
                                **options})
        keychain = Keychain(env=env, config_dir=Path("/nonexistent"))
        return RegistryClient(mirrors=self.mirrors, keychain=keychain, options=opts)


@pytest.fixture(scope="session")
def fixture_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, list[FixtureImage]]:
    store = Store(tmp_path_factory.mktemp("fixture-store"))
    return store, build_fixtures(store)


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


def _push(setup: Setup, fixture_set) -> Setup:
    store, images = fixture_set
    client = setup.client()
    push_fixtures(client, store, setup.host, images)
    return setup


@pytest.fixture(scope="session")
def anon_setup(tmp_path_factory, fixture_set) -> Iterator[Setup]:
    reg = Registry(work=tmp_path_factory.mktemp("anon-registry")).start()
    try:
        yield _push(Setup("anonymous", reg, fixture_set[1]), fixture_set)
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def basic_setup(tmp_path_factory, fixture_set, test_ca) -> Iterator[Setup]:
    reg = basic_registry(tmp_path_factory.mktemp("basic-registry"), test_ca, USERS).start()
    try:
        yield _push(Setup("basic+tls", reg, fixture_set[1], test_ca.ca_file, ("alice", USERS["alice"])),
                    fixture_set)
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def token_issuer(tmp_path_factory, test_ca) -> Iterator[TokenIssuer]:
    issuer = TokenIssuer(tmp_path_factory.mktemp("token-issuer"), test_ca, USERS, ACL).start()
    try:
        yield issuer
    finally:
        issuer.stop()


@pytest.fixture(scope="session")
def token_setup(tmp_path_factory, fixture_set, test_ca, token_issuer) -> Iterator[Setup]:
    reg = token_registry(tmp_path_factory.mktemp("token-registry"), test_ca, token_issuer).start()
    try:
        yield _push(Setup("token+tls", reg, fixture_set[1], test_ca.ca_file, ("alice", USERS["alice"]),
                          token_issuer), fixture_set)
    finally:
        reg.stop()


@pytest.fixture(params=["anonymous", "basic+tls", "token+tls"])
def any_setup(request) -> Setup:
    name = {"anonymous": "anon_setup", "basic+tls": "basic_setup", "token+tls": "token_setup"}
    return request.getfixturevalue(name[request.param])


@pytest.fixture(scope="session")
def podman_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """podman's Docker-compatible API on a private unix socket (vfs storage under tmp)."""
    exe = shutil.which("podman")
    if exe is None:
        pytest.skip("podman is not installed")
    work = tmp_path_factory.mktemp("podman")
    sock = work / "podman.sock"
    proc = Process([exe, "--storage-driver", "vfs", "--root", str(work / "root"),
                    "--runroot", str(work / "runroot"), "--tmpdir", str(work / "tmp"),
                    "--cgroup-manager", "cgroupfs", "--events-backend", "file",
                    "system", "service", "--time", "0", f"unix://{sock}"],
                   work / "podman.log").start()
    try:
        wait_for(lambda: _podman_ready(f"unix://{sock}"), "podman system service",
                 proc=proc.proc, log=work / "podman.log")
        yield f"unix://{sock}"
    finally:
        proc.stop()


def _podman_ready(url: str) -> bool:
    import docker

    client = docker.DockerClient(base_url=url, timeout=5)
    try:
        return bool(client.ping())
    finally:
        client.close()
