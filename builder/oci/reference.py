"""Image references: ``[host[:port]/]repo/path[:tag][@sha256:hex]``, normalised Docker-style."""

from __future__ import annotations

import re
from dataclasses import dataclass

from builder import digest as dg

DEFAULT_HOST = "docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")


@dataclass(frozen=True)
class Reference:
    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        out = f"{self.host}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    @property
    def name(self) -> str:
        """host/repository, without tag or digest."""
        return f"{self.host}/{self.repository}"

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.host, self.repository, self.tag, digest)

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.host, self.repository, tag, None)


def parse(text: str) -> Reference:
    """Parse and normalise a reference; raises ValueError with the reason."""
    if not text or text != text.strip():
        raise ValueError(f"not an image reference: {text!r}")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not dg.is_digest(digest):
            raise ValueError(f"{text!r}: digest must be sha256:<64 hex>")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.match(tag):
            raise ValueError(f"{text!r}: bad tag {tag!r}")
    parts = rest.split("/", 1)
    if len(parts) == 2 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        host, repo = parts
    else:
        host, repo = DEFAULT_HOST, rest
    if host == "index.docker.io":
        host = DEFAULT_HOST
    if host == DEFAULT_HOST and "/" not in repo:
        repo = f"library/{repo}"
    if not _REPO.match(repo):
        raise ValueError(f"{text!r}: bad repository name {repo!r}")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(host, repo, tag, digest)
