"""GitHub releases through the REST API (``requests``): a draft release per version tag, its assets
uploaded, skipped when already there, replaced when they differ.

- Token from ``GITHUB_TOKEN`` (sent as ``Authorization: Bearer``; never printed, never in errors).
- API base from ``GITHUB_API_URL`` (GitHub Enterprise, or the local fake in tests), default the
  public API. Uploads go to the release's own ``upload_url`` (GitHub serves them from another host).
- The token goes to two origins only: the API's and the upload host configured with it
  (``api.X`` → ``uploads.X``, as github.com and ghe.com serve them; any other API host, such as
  GitHub Enterprise Server's ``HOST/api/v3``, uploads to itself), always over https. Plain http is
  accepted only for a loopback API URL (the test stand-in ``tests/rig/github_fake.py`` on 127.0.0.1):
  there the token never crosses a network. An ``upload_url`` or a pagination link on another
  origin is refused before anything is sent, and every request, redirects included, passes a
  guard that refuses an ``Authorization`` header bound elsewhere (``requests`` already drops it
  when a redirect changes host, port or scheme; the guard makes that a rule of this module).
- A draft's tag is not visible to "get release by tag" (the tag does not exist until publication),
  so the release is found by listing releases (paginated) and matching ``tag_name``.
- An asset is "the same" when it is in state ``uploaded`` with the same size and, when GitHub
  gives one, the same ``digest`` (``sha256:…``); a leftover of an interrupted upload (state
  ``starter``) or a differing asset is deleted and uploaded again. Assets of a *published* release
  are never changed: that is refused.
- Uploads stream the file from disk (memory does not grow with the file).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from requests.adapters import HTTPAdapter

from builder.errors import BuilderError, FetchError
from builder.fetch.transport import RetryPolicy, new_session, send
from builder.progress import Reporter
from builder.publish.plan import Action, ReleaseFile, ReleaseSet

DEFAULT_API = "https://api.github.com"
ENV_TOKEN = "GITHUB_TOKEN"
ENV_API = "GITHUB_API_URL"
_REPO = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")


class GitHubError(BuilderError):
    """The GitHub API refused or failed a request."""


Origin = tuple[str, str, int]  # scheme, lower-case host, port


def _origin(url: str) -> Origin:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    default = {"https": 443, "http": 80}.get(parts.scheme, 0)
    return (parts.scheme, (parts.hostname or "").lower(), port or default)


def _shown(origin: Origin) -> str:
    scheme, host, port = origin
    return f"{scheme}://{host}" + ("" if port == {"https": 443, "http": 80}.get(scheme) else f":{port}")


def _listed(origins: tuple[Origin, ...], sep: str) -> str:
    return sep.join(dict.fromkeys(map(_shown, origins)))  # API and uploads may be one origin


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_origins(api_url: str) -> tuple[Origin, Origin]:
    """The API's origin and its upload host's; refuses an API URL the token must not go to."""
    api = _origin(api_url)
    scheme, host, port = api
    if scheme != "https" and not (scheme == "http" and _is_loopback(host)):
        raise GitHubError(f"{ENV_API}={api_url}: the GitHub API must be https (the token would "
                          "travel in clear)",
                          "use the https:// URL of the API (plain http only for a loopback test API)")
    if not host:
        raise GitHubError(f"{ENV_API}={api_url!r}: not a URL", "e.g. https://ghe.example/api/v3")
    upload = (scheme, "uploads." + host[4:], port) if host.startswith("api.") else api
    return api, upload


class _TokenGuard(HTTPAdapter):
    """Refuses to send an Authorization header to any origin but the configured ones (redirect
    hops included: every request of the session goes through its adapter)."""

    def __init__(self, allowed: tuple[Origin, ...]) -> None:
        super().__init__(max_retries=0)  # the RetryPolicy decides, not urllib3
        self.allowed = allowed

    def send(self, request: requests.PreparedRequest, *args: Any, **kw: Any) -> requests.Response:
        origin = _origin(request.url or "")
        if "Authorization" in request.headers and origin not in self.allowed:
            raise GitHubError(f"GitHub: refusing to send the token to {_shown(origin)} (it goes only "
                              f"to {_listed(self.allowed, ' and ')})",
                              f"check {ENV_API}; the API sent us to another host")
        return super().send(request, *args, **kw)


@dataclass
class GitHubClient:
    repo: str  # OWNER/REPO
    token: str = field(repr=False)
    api_url: str = DEFAULT_API
    timeout: tuple[float, float] = (10.0, 300.0)
    policy: RetryPolicy = field(default_factory=lambda: RetryPolicy(attempts=3), repr=False)  # idempotent calls
    session: requests.Session | None = field(default=None, repr=False)  # None: the transport's
    origins: tuple[Origin, Origin] = field(init=False, repr=False)  # API's, upload host's

    @classmethod
    def from_env(cls, repo: str, env: Mapping[str, str] | None = None, **kw: Any) -> GitHubClient:
        env = os.environ if env is None else env
        if not _REPO.match(repo):
            raise GitHubError(f"--github {repo!r}: expected OWNER/REPO")
        token = env.get(ENV_TOKEN, "")
        if not token:
            raise GitHubError(f"no {ENV_TOKEN} in the environment for GitHub repository {repo}",
                              "export a token with contents:write on the repository")
        return cls(repo, token, (env.get(ENV_API) or DEFAULT_API).rstrip("/"), **kw)

    def __post_init__(self) -> None:
        self.origins = token_origins(self.api_url)
        headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}
        guard = _TokenGuard(self.origins)
        if self.session is None:
            self.session = new_session(adapter=guard, headers=headers)
        else:  # a caller's session gets the same guard and settings
            for prefix in ("https://", "http://"):
                self.session.mount(prefix, guard)
            self.session.trust_env = False
            self.session.headers.update(headers)

    # -- plumbing ------------------------------------------------------------------------------
    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **(extra or {})}

    def request(self, method: str, url: str, *, ok: tuple[int, ...] = (200,),
                retry: bool = True, **kw: Any) -> requests.Response:
        """One API call with timeouts; idempotent calls are retried on 5xx and connection errors."""
        if _origin(url) not in self.origins:
            raise GitHubError(f"GitHub {self.repo}: {method} {_path(url)} is not on the API or upload "
                              f"host configured ({_listed(self.origins, ' or ')}); the "
                              "token is not sent there",
                              f"check {ENV_API}: the API named a URL on another host")
        headers = self._headers(kw.pop("headers", None))
        session = self.session
        assert session is not None  # set in __post_init__
        policy = self.policy if retry else RetryPolicy(attempts=1)
        try:
            resp = send(policy, method, _path(url),
                        lambda: session.request(method, url, headers=headers, timeout=self.timeout,
                                                **kw), raise_status=False)
        except FetchError as exc:  # the network, or a 5xx/429 on every try
            raise GitHubError(f"GitHub {self.repo}: {exc.message}", "check the network and retry; "
                              "a rerun continues where this one stopped") from None
        if resp.status_code in (401, 403):
            raise GitHubError(f"GitHub {self.repo}: {method} {_path(url)} refused "
                              f"(HTTP {resp.status_code}: {_message(resp)})",
                              f"check {ENV_TOKEN}: it needs contents:write on {self.repo}")
        if resp.status_code not in ok:
            raise GitHubError(f"GitHub {self.repo}: {method} {_path(url)}: HTTP "
                              f"{resp.status_code}: {_message(resp)}")
        return resp

    def _paged(self, url: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        next_url: str | None = url + ("&" if "?" in url else "?") + "per_page=100"
        while next_url:
            resp = self.request("GET", next_url)
            page = resp.json()
            if not isinstance(page, list):
                raise GitHubError(f"GitHub {self.repo}: GET {_path(next_url)}: not a list")
            out.extend(page)
            next_url = resp.links.get("next", {}).get("url")
        return out

    # -- API -----------------------------------------------------------------------------------
    def find_release(self, tag: str) -> dict[str, Any] | None:
        for rel in self._paged(f"{self.api_url}/repos/{self.repo}/releases"):
            if rel.get("tag_name") == tag:
                return rel
        return None

    def create_release(self, tag: str, name: str, body: str) -> dict[str, Any]:
        resp = self.request("POST", f"{self.api_url}/repos/{self.repo}/releases", ok=(201,),
                            retry=False, json={"tag_name": tag, "name": name, "body": body,
                                               "draft": True})
        return resp.json()

    def list_assets(self, release: dict[str, Any]) -> list[dict[str, Any]]:
        return self._paged(f"{self.api_url}/repos/{self.repo}/releases/{release['id']}/assets")

    def delete_asset(self, asset: dict[str, Any]) -> None:
        self.request("DELETE", f"{self.api_url}/repos/{self.repo}/releases/assets/{asset['id']}",
                     ok=(204, 404))

    def upload_asset(self, release: dict[str, Any], file: ReleaseFile) -> dict[str, Any]:
        base = str(release.get("upload_url") or "").split("{", 1)[0]
        if not base.startswith(("https://", "http://")):
            raise GitHubError(f"GitHub {self.repo}: release {release.get('tag_name')} has no "
                              "usable upload_url")
        if _origin(base) != self.origins[1]:
            raise GitHubError(f"GitHub {self.repo}: release {release.get('tag_name')} names upload_url "
                              f"{_shown(_origin(base))}, not the upload host {_shown(self.origins[1])} "
                              f"configured with {self.api_url}; the token is not sent there",
                              f"check {ENV_API}: a GitHub API names its own upload host")
        with open(file.path, "rb") as fh:  # requests streams a file object: flat memory
            resp = self.request("POST", f"{base}?name={quote(file.name)}", ok=(201,), retry=False,
                                data=fh, headers={"Content-Type": "application/octet-stream",
                                                  "Content-Length": str(file.size)})
        return resp.json()


def _path(url: str) -> str:
    """The URL without query (never holds the token, but keep messages short)."""
    return url.split("?", 1)[0]


def _message(resp: requests.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:200]
    if isinstance(data, dict):
        msg = str(data.get("message", ""))
        codes = [e.get("code") for e in data.get("errors") or [] if isinstance(e, dict)]
        return msg + (f" ({', '.join(map(str, codes))})" if codes else "")
    return str(data)[:200]


def same_asset(asset: dict[str, Any], file: ReleaseFile) -> bool:
    if asset.get("state", "uploaded") != "uploaded" or asset.get("size") != file.size:
        return False
    digest = asset.get("digest")
    return digest is None or digest == file.digest  # older answers lack digest: size decides


def release_body(rel: ReleaseSet) -> str:
    lines = [f"Air-gap release {rel.name} {rel.version}.", "",
             "Verify before installing: `sha256sum -c sha256sum-ARCH.txt` and the signature "
             "`sha256sum-ARCH.txt.sig` with the release public key, which is distributed "
             "separately (never take it from this page).", ""]
    if not rel.signed:
        lines += ["**Unsigned release** (published with `--allow-unsigned`): there is no "
                  "signature to check.", ""]
    for arch in rel.arches:
        sums = next((f for f in rel.files[arch] if f.name.startswith("sha256sum-")), None)
        if sums:
            lines.append(f"- {arch}: {sums.name} {sums.digest}")
    return "\n".join(lines) + "\n"


def sync_release(client: GitHubClient, rel: ReleaseSet, *, dry_run: bool = False,
                 attempts: int = 2, reporter: Reporter | None = None) -> list[Action]:
    """Create or update the draft release for ``rel.tag`` and make its assets match ``rel``."""
    target = f"github:{client.repo}@{rel.tag}"
    actions: list[Action] = []
    release = client.find_release(rel.tag)
    if release is None:
        actions.append(Action("create", target, f"draft release {rel.tag}"))
        if dry_run:
            actions += [Action("upload", target, f.name, f.size) for f in rel.all_files()]
            return actions
        release = client.create_release(rel.tag, f"{rel.name} {rel.version}", release_body(rel))
    assets = {a["name"]: a for a in client.list_assets(release)}
    plan: list[tuple[str, ReleaseFile]] = []
    for file in rel.all_files():
        asset = assets.get(file.name)
        if asset is not None and same_asset(asset, file):
            actions.append(Action("skip", target, file.name, file.size))
        else:
            kind = "upload" if asset is None else "replace"
            plan.append((kind, file))
            actions.append(Action(kind, target, file.name, file.size))  # type: ignore[arg-type]
    wanted = {f.name for f in rel.all_files()}
    actions += [Action("extra", target, f"{n} (not ours, left alone)") for n in sorted(assets)
                if n not in wanted]
    if plan and not release.get("draft", False):
        raise GitHubError(f"GitHub {client.repo}: release {rel.tag} is published; refusing to "
                          f"change its assets ({', '.join(f.name for _, f in plan)})",
                          "publish a new version, or turn the release back into a draft first")
    if dry_run:
        return actions
    for _, file in plan:
        _upload(client, release, file, assets.get(file.name), attempts, reporter)
    return actions


def _upload(client: GitHubClient, release: dict[str, Any], file: ReleaseFile,
            asset: dict[str, Any] | None, attempts: int, reporter: Reporter | None) -> None:
    for attempt in range(attempts):
        if asset is not None:
            client.delete_asset(asset)  # a differing asset, or the leftover of a broken upload
        if reporter:
            reporter.line(f"uploading {file.name} to GitHub {client.repo}")
        try:
            got = client.upload_asset(release, file)
        except GitHubError as exc:
            if attempt + 1 >= attempts:
                raise GitHubError(f"{exc.message} (uploading {file.name})",
                                  "run the release again: finished assets are skipped and the "
                                  "broken one is replaced") from None
            asset = next((a for a in client.list_assets(release) if a["name"] == file.name), None)
            continue
        if not same_asset(got, file):
            raise GitHubError(f"GitHub {client.repo}: asset {file.name} stored as {got.get('size')} "
                              f"bytes / {got.get('digest')}, expected {file.size} / {file.digest}")
        return
