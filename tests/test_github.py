"""`release --github` against tests/rig/github_fake.py, a local stand-in for the GitHub REST API's
release endpoints (NOT GitHub itself: only the endpoints builder/publish/github.py uses, with GitHub's
behaviour for drafts, pagination, asset states and digests). Releases here are copies
of a real build (tests/plugins/releases.py), with the scan status written by hand."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from builder import cli
from builder import digest as dg
from builder.fetch.transport import RetryPolicy
from builder.publish.github import GitHubClient, GitHubError, sync_release
from builder.publish.release import collect
from tests import tamper
from tests.plugins.release import scanned_release, write_scan_status
from tests.plugins.releases import Release

REPO = "example/rke2"


@pytest.fixture
def release(tmp_path: Path, releases) -> Path:
    return scanned_release(releases["v1"], tmp_path / "artifacts")


@pytest.fixture
def gh_env(github_fake, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", github_fake.token)
    monkeypatch.setenv("GITHUB_API_URL", github_fake.url)
    return github_fake


def uploads(fake) -> int:
    return sum(1 for method, path in fake.requests if method == "POST" and path.startswith("/uploads/"))


def release_cli(capsys, directory: Path, *extra: str) -> tuple[int, str]:
    code = cli.main(["release", "--allow-unsigned", "--artifacts", str(directory), "--github", REPO,
                     *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


def assert_assets_match(fake, directory: Path, tag: str) -> None:
    rel = collect(directory)
    assets = fake.release_assets(tag)
    names = [a["name"] for a in assets]
    assert sorted(names) == sorted(f.name for f in rel.all_files())  # no duplicates, none missing
    for a in assets:
        assert a["state"] == "uploaded"
        assert dg.of_bytes(fake.asset_bytes(a["id"])) == dg.of_file(directory / a["name"])[0]


def test_draft_release_created_then_noop(release: Path, gh_env, capsys) -> None:
    code, out = release_cli(capsys, release)
    assert code == 0, out
    (rel,) = gh_env.releases.values()
    assert rel["draft"] and rel["tag_name"] == "v1.32.13-rke2r1"
    assert_assets_match(gh_env, release, "v1.32.13-rke2r1")
    first = uploads(gh_env)
    code, out = release_cli(capsys, release)
    assert code == 0, out
    assert uploads(gh_env) == first  # nothing uploaded again
    assert "upload" not in out.split("\n", 1)[0] and "skip" in out


def test_dry_run_changes_nothing(release: Path, gh_env, capsys) -> None:
    code, out = release_cli(capsys, release, "--dry-run")
    assert code == 0, out
    assert "create" in out and "upload" in out and "dry run" in out
    assert not gh_env.releases and all(m == "GET" for m, _ in gh_env.requests)


def test_changed_asset_is_replaced(release: Path, gh_env, capsys) -> None:
    assert release_cli(capsys, release)[0] == 0
    lst = release / "rke2-images-all.linux-amd64.txt"
    lst.write_text(lst.read_text() + "docker.io/rancher/extra:v1\n")
    tamper.resum(Release.read(release, "amd64"))
    write_scan_status(release)
    before = uploads(gh_env)
    code, out = release_cli(capsys, release)
    assert code == 0, out
    # The list and the checksum file changed (and nothing else): two replaced.
    assert uploads(gh_env) - before == 2
    assert_assets_match(gh_env, release, "v1.32.13-rke2r1")


def test_size_decides_without_digest(release: Path, github_fake, monkeypatch) -> None:
    github_fake.with_digest = False
    client = GitHubClient(REPO, github_fake.token, github_fake.url)
    rel = collect(release)
    sync_release(client, rel)
    actions = sync_release(client, rel)
    assert {a.kind for a in actions} == {"skip"}


def test_interrupted_upload_then_rerun(release: Path, github_fake) -> None:
    client = GitHubClient(REPO, github_fake.token, github_fake.url)
    rel = collect(release)
    big = max(rel.all_files(), key=lambda f: f.size)
    github_fake.fail_upload_after = big.size // 2
    with pytest.raises(GitHubError) as err:
        sync_release(client, rel, attempts=1)
    assert "run the release again" in str(err.value)
    states = {a["name"]: a["state"] for a in github_fake.release_assets(rel.tag)}
    assert "starter" in states.values()  # what GitHub leaves behind
    sync_release(client, rel, attempts=1)
    assert_assets_match(github_fake, release, rel.tag)


def test_interrupted_upload_recovers_within_one_run(release: Path, github_fake) -> None:
    client = GitHubClient(REPO, github_fake.token, github_fake.url)
    rel = collect(release)
    github_fake.fail_upload_after = 1 << 20
    sync_release(client, rel, attempts=2)
    assert_assets_match(github_fake, release, rel.tag)


def test_pagination(release: Path, github_fake) -> None:
    github_fake.per_page_max = 2
    client = GitHubClient(REPO, github_fake.token, github_fake.url)
    rel = collect(release)
    sync_release(client, rel)
    assert {a.kind for a in sync_release(client, rel)} == {"skip"}
    assert_assets_match(github_fake, release, rel.tag)


def test_published_release_is_not_changed(release: Path, github_fake) -> None:
    client = GitHubClient(REPO, github_fake.token, github_fake.url)
    rel = collect(release)
    sync_release(client, rel)
    (published,) = github_fake.releases.values()
    published["draft"] = False
    assert {a.kind for a in sync_release(client, rel)} == {"skip"}  # a no-op is fine
    github_fake.assets.pop(next(iter(github_fake.assets)))
    with pytest.raises(GitHubError, match="is published; refusing"):
        sync_release(client, rel)


def test_bad_token_names_repo_not_token(release: Path, gh_env, monkeypatch, capsys) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "ghp-wrong-secret-999")
    code, out = release_cli(capsys, release)
    assert code == 1
    assert REPO in out and "HTTP 401" in out and "ghp-wrong-secret-999" not in out
    monkeypatch.delenv("GITHUB_TOKEN")
    code, out = release_cli(capsys, release)
    assert code == 1 and "GITHUB_TOKEN" in out


def test_the_api_is_retried_by_the_transport_policy(github_fake):
    """The rig's fault proxy in front of the fake API answers 429 + Retry-After: 1, then 503 (the
    fake cannot be made to), then passes through: the GitHub client waits as told and gets on."""
    from tests.rig.faults import FaultProxy

    proxy = FaultProxy(github_fake.url).start()
    try:
        proxy.plan("status:429:retry-after=1", "status:503")
        client = GitHubClient(REPO, github_fake.token, proxy.url, policy=RetryPolicy(attempts=3, backoff=0.01))
        started = time.monotonic()
        assert client.find_release("v0.0.0-nowhere") is None
        assert time.monotonic() - started >= 0.95  # Retry-After honoured (GitHub's 429)
        assert [s.status for s in proxy.requests_seen(3)] == [429, 503, 200]
        proxy.plan("status:503", "status:503", "status:503")
        with pytest.raises(GitHubError, match=r"HTTP 503: "):
            client.find_release("v0.0.0-nowhere")  # the last answer, worded from its body
    finally:
        proxy.stop()
