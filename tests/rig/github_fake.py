"""A small local stand-in for the GitHub REST API's release endpoints, on 127.0.0.1 (tests only).

This is NOT GitHub: it implements just the handful of endpoints builder/publish/github.py uses, with the
behaviour of the real API that matters to it:

- ``GET  /repos/O/R/releases``                   list (drafts included for an authorised token),
                                                  paginated with ``per_page``/``page`` and ``Link``
- ``GET  /repos/O/R/releases/tags/TAG``          published releases only (like GitHub: a draft's
                                                  tag does not exist yet, so it is a 404)
- ``POST /repos/O/R/releases``                   create (422 when the tag already has a release)
- ``GET  /repos/O/R/releases/ID``, ``PATCH`` of the same
- ``GET  /repos/O/R/releases/ID/assets``         list assets (``digest`` "sha256:…" unless disabled)
- ``POST /uploads/repos/O/R/releases/ID/assets?name=N``  upload, on the path named by the
  release's ``upload_url`` (GitHub serves it from another host; here another path prefix)
- ``DELETE /repos/O/R/releases/assets/ID``

Uploads stream to disk (a 1 GiB asset does not live in memory). Faults for tests:
``fail_upload_after`` (bytes) drops the connection half way and leaves the asset in state
``starter`` holding its name, as GitHub does; a second upload of that name is a 422
``already_exists`` until the client deletes it. ``with_digest=False`` omits the ``digest`` field
(older API answers). Every request is logged in ``requests`` as (method, path).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.rig import httpd

CHUNK = 1 << 20


@dataclass
class FakeGitHub:
    work: Path
    token: str = field(repr=False, default="test-token")
    with_digest: bool = True
    fail_upload_after: int | None = None  # drop the connection after this many body bytes (once)
    per_page_max: int = 100
    releases: dict[int, dict[str, Any]] = field(default_factory=dict)
    assets: dict[int, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    _ids: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return httpd.url(self._server)

    def start(self) -> FakeGitHub:
        self.work.mkdir(parents=True, exist_ok=True)
        fake = self

        class Handler(_Handler):
            gh = fake

        self._server = httpd.serve(Handler)
        return self

    def stop(self) -> None:
        httpd.shutdown(self._server)

    def next_id(self) -> int:
        with self._lock:
            self._ids += 1
            return self._ids

    def asset_json(self, asset: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in asset.items() if not k.startswith("_")}
        if not self.with_digest:
            out.pop("digest", None)
        return out

    def release_json(self, rel: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in rel.items() if not k.startswith("_")}
        out["assets"] = [self.asset_json(a) for a in self.assets.values()
                         if a["_release"] == rel["id"]]
        return out

    def asset_bytes(self, asset_id: int) -> bytes:
        return Path(self.assets[asset_id]["_path"]).read_bytes()

    def release_assets(self, tag: str) -> list[dict[str, Any]]:
        rel = next(r for r in self.releases.values() if r["tag_name"] == tag)
        return [a for a in self.assets.values() if a["_release"] == rel["id"]]


class _Handler(httpd.Quiet):
    gh: FakeGitHub
    protocol_version = "HTTP/1.1"

    # -- helpers -------------------------------------------------------------------------------
    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") != f"Bearer {self.gh.token}":
            self._drain()
            self._send(401, {"message": "Bad credentials"})
            return False
        return True

    def _drain(self) -> None:
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            chunk = self.rfile.read(min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)

    def _json_body(self) -> dict[str, Any]:
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"{}")

    def _route(self, method: str) -> None:
        parts = urlsplit(self.path)
        self.gh.requests.append((method, parts.path))
        if not self._authorised():
            return
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        for pattern, handler in ROUTES.get(method, []):
            match = re.fullmatch(pattern, parts.path)
            if match:
                handler(self, query, *match.groups())
                return
        self._drain()
        self._send(404, {"message": "Not Found"})

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PATCH(self) -> None:
        self._route("PATCH")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def _send_page(self, query: dict[str, str], items: list[dict[str, Any]],
                   render: Callable[[dict[str, Any]], dict[str, Any]], path: str) -> None:
        """One page of a list endpoint (``per_page``, ``page``), with GitHub's ``Link: <...>;
        rel="next"`` header while more pages remain."""
        per_page = min(int(query.get("per_page", 30)), self.gh.per_page_max)
        page = int(query.get("page", 1))
        headers = {}
        if page * per_page < len(items):
            headers["Link"] = f'<{self.gh.url}{path}?per_page={per_page}&page={page + 1}>; rel="next"'
        self._send(200, [render(i) for i in items[(page - 1) * per_page: page * per_page]], headers)

    # -- endpoints -----------------------------------------------------------------------------
    def list_releases(self, query: dict[str, str], owner: str, repo: str) -> None:
        rels = sorted((r for r in self.gh.releases.values() if r["_repo"] == f"{owner}/{repo}"),
                      key=lambda r: -r["id"])
        self._send_page(query, rels, self.gh.release_json, f"/repos/{owner}/{repo}/releases")

    def release_by_tag(self, query: dict[str, str], owner: str, repo: str, tag: str) -> None:
        for r in self.gh.releases.values():
            if r["_repo"] == f"{owner}/{repo}" and r["tag_name"] == tag and not r["draft"]:
                self._send(200, self.gh.release_json(r))
                return
        self._send(404, {"message": "Not Found"})

    def create_release(self, query: dict[str, str], owner: str, repo: str) -> None:
        body = self._json_body()
        tag = body.get("tag_name")
        if not tag:
            self._send(422, {"message": "Validation Failed", "errors": [{"field": "tag_name"}]})
            return
        if any(r["_repo"] == f"{owner}/{repo}" and r["tag_name"] == tag
               for r in self.gh.releases.values()):
            self._send(422, {"message": "Validation Failed",
                             "errors": [{"resource": "Release", "code": "already_exists",
                                         "field": "tag_name"}]})
            return
        rid = self.gh.next_id()
        rel = {"id": rid, "tag_name": tag, "name": body.get("name") or tag,
               "body": body.get("body") or "", "draft": bool(body.get("draft", False)),
               "prerelease": bool(body.get("prerelease", False)),
               "url": f"{self.gh.url}/repos/{owner}/{repo}/releases/{rid}",
               "upload_url": f"{self.gh.url}/uploads/repos/{owner}/{repo}/releases/{rid}/assets"
                             "{?name,label}",
               "_repo": f"{owner}/{repo}"}
        self.gh.releases[rid] = rel
        self._send(201, self.gh.release_json(rel))

    def get_release(self, query: dict[str, str], owner: str, repo: str, rid: str) -> None:
        rel = self.gh.releases.get(int(rid))
        if rel is None:
            self._send(404, {"message": "Not Found"})
            return
        self._send(200, self.gh.release_json(rel))

    def patch_release(self, query: dict[str, str], owner: str, repo: str, rid: str) -> None:
        rel = self.gh.releases.get(int(rid))
        body = self._json_body()
        if rel is None:
            self._send(404, {"message": "Not Found"})
            return
        for key in ("name", "body", "draft", "prerelease"):
            if key in body:
                rel[key] = body[key]
        self._send(200, self.gh.release_json(rel))

    def list_assets(self, query: dict[str, str], owner: str, repo: str, rid: str) -> None:
        if int(rid) not in self.gh.releases:
            self._send(404, {"message": "Not Found"})
            return
        assets = [a for a in self.gh.assets.values() if a["_release"] == int(rid)]
        self._send_page(query, assets, self.gh.asset_json, f"/repos/{owner}/{repo}/releases/{rid}/assets")

    def upload_asset(self, query: dict[str, str], owner: str, repo: str, rid: str) -> None:
        name = query.get("name", "")
        size = int(self.headers.get("Content-Length") or -1)
        if int(rid) not in self.gh.releases or not name or size < 0:
            self._drain()
            self._send(404 if int(rid) not in self.gh.releases else 400, {"message": "Bad upload"})
            return
        if any(a["_release"] == int(rid) and a["name"] == name for a in self.gh.assets.values()):
            self._drain()
            self._send(422, {"message": "Validation Failed",
                             "errors": [{"resource": "ReleaseAsset", "code": "already_exists",
                                         "field": "name"}]})
            return
        aid = self.gh.next_id()
        path = self.gh.work / f"asset-{aid}"
        asset = {"id": aid, "name": name, "label": None, "state": "starter", "size": 0,
                 "content_type": self.headers.get("Content-Type", ""),
                 "url": f"{self.gh.url}/repos/{owner}/{repo}/releases/assets/{aid}",
                 "browser_download_url": f"{self.gh.url}/download/{aid}/{name}",
                 "_release": int(rid), "_path": str(path)}
        self.gh.assets[aid] = asset
        h = hashlib.sha256()
        left = size
        limit = self.gh.fail_upload_after
        got = 0
        with open(path, "wb") as out:
            while left > 0:
                chunk = self.rfile.read(min(CHUNK, left))
                if not chunk:
                    break
                out.write(chunk)
                h.update(chunk)
                left -= len(chunk)
                got += len(chunk)
                if limit is not None and got >= limit:
                    # The fault: drop the connection mid-body, leaving a "starter" asset behind.
                    self.gh.fail_upload_after = None
                    asset["size"] = got
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
        if left:
            asset["size"] = got
            return
        asset.update(state="uploaded", size=size, digest="sha256:" + h.hexdigest())
        self._send(201, self.gh.asset_json(asset))

    def delete_asset(self, query: dict[str, str], owner: str, repo: str, aid: str) -> None:
        asset = self.gh.assets.pop(int(aid), None)
        if asset is None:
            self._send(404, {"message": "Not Found"})
            return
        Path(asset["_path"]).unlink(missing_ok=True)
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()


_R = r"/repos/([^/]+)/([^/]+)/releases"
ROUTES = {
    "GET": [(rf"{_R}", _Handler.list_releases), (rf"{_R}/tags/([^/]+)", _Handler.release_by_tag),
            (rf"{_R}/(\d+)", _Handler.get_release), (rf"{_R}/(\d+)/assets", _Handler.list_assets)],
    "POST": [(rf"{_R}", _Handler.create_release),
             (rf"/uploads{_R}/(\d+)/assets", _Handler.upload_asset)],
    "PATCH": [(rf"{_R}/(\d+)", _Handler.patch_release)],
    "DELETE": [(rf"{_R}/assets/(\d+)", _Handler.delete_asset)],
}
