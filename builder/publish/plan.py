"""What one release publishes, and the steps a publish takes: the model ``release`` (OCI registry)
and ``github`` (release assets) share, so neither imports the other for it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from builder.artifacts import envelope_name, signature_name, statement_name
from builder.errors import BuilderError
from builder.humanize import human

_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


MEDIA_TYPES = {  # by suffix, longest first
    ".dsse.json": "application/vnd.dsse.envelope.v1+json",
    ".json": "application/vnd.in-toto+json",  # the provenance statement, the only other .json
    ".tar.zst": "application/zstd",
    ".tar.gz": "application/gzip",
    ".txt.sig": "application/octet-stream",
    ".txt": "text/plain",
}

ActionKind = Literal["push", "skip", "tag", "unchanged", "create", "upload", "replace", "extra"]


class ReleaseError(BuilderError):
    """The release cannot be published as asked."""


@dataclass(frozen=True)
class Action:
    """One step of a release plan (printed by --dry-run, and as the summary of a real run)."""

    kind: ActionKind
    target: str  # where: registry reference or GitHub release
    what: str  # file name, blob or tag
    size: int = 0

    def __str__(self) -> str:
        size = f" ({human(self.size)})" if self.size else ""
        return f"{self.kind:9} {self.what}{size} -> {self.target}"



@dataclass(frozen=True)
class ReleaseFile:
    name: str
    path: Path
    digest: str
    size: int

    @property
    def media_type(self) -> str:
        for suffix, media in MEDIA_TYPES.items():
            if self.name.endswith(suffix):
                return media
        return "application/octet-stream"


@dataclass
class ReleaseSet:
    """Everything one release publishes, checked against the checksum files."""

    directory: Path
    name: str
    version: str
    revision: str | None
    files: dict[str, list[ReleaseFile]] = field(default_factory=dict)  # arch → files

    @property
    def arches(self) -> list[str]:
        return list(self.files)

    @property
    def tag(self) -> str:
        return version_tag(self.version)

    @property
    def artifact_type(self) -> str:
        return f"application/vnd.{self.name}.release.v1"

    def all_files(self) -> list[ReleaseFile]:
        return [f for files in self.files.values() for f in files]

    @property
    def unsigned(self) -> list[str]:
        """The signatures a signed release would have and this one lacks: each arch's
        sha256sum-ARCH.txt.sig, and the provenance envelope when there is a statement."""
        missing = []
        for arch, files in self.files.items():
            names = {f.name for f in files}
            if signature_name(arch) not in names:
                missing.append(signature_name(arch))
            if statement_name(arch) in names and envelope_name(arch) not in names:
                missing.append(envelope_name(arch))
        return missing

    @property
    def signed(self) -> bool:
        return not self.unsigned


def version_tag(version: str) -> str:
    """A registry tag for a version: ``+`` is not allowed in tags, so it becomes ``-``."""
    tag = version.replace("+", "-")
    if not _TAG.match(tag):
        raise ReleaseError(f"version {version!r} does not make a valid tag ({tag!r})",
                           "tags are [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
    return tag
