"""Fetch a release artifact from an OCI registry into a directory (the connected side of the air
gap), ready to carry across and check with ``verify``.

``REF`` names the index (every arch, or those chosen) or one per-arch manifest, by tag or digest.
Each manifest is hashed before it is parsed (a digest reference must match); it must be one of
ours (an ``application/vnd.NAME.release.v1`` artifact with the empty config). Each layer becomes
the file named by its ``org.opencontainers.image.title``, which must be a plain base name (no
``/``, no ``..``); the blob streams into a temp file in the directory while being hashed, and is
renamed to its name only when digest and size match. A file already present with the right digest
is kept, so an interrupted pull is resumed file by file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from builder import digest as dg
from builder.errors import BuilderError, DigestMismatch, FetchError
from builder.oci import model as m
from builder.oci.compress import atomic_output
from builder.oci.reference import Reference
from builder.progress import Reporter
from builder.release import ANNOTATION_ARCH, EMPTY_MEDIA_TYPE
from builder.sources.registry import CHUNK, RegistryClient, Scope

_TITLE = re.compile(r"^[A-Za-z0-9._+-]+$")
_ARTIFACT = re.compile(r"^application/vnd\.[A-Za-z0-9._-]+\.release\.v1$")


class PullError(BuilderError):
    """The artifact is not a release we can pull, or a blob did not arrive intact."""


@dataclass
class PullReport:
    out: Path
    arches: list[str] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    bytes: int = 0

    def summary(self) -> str:
        return (f"pulled {', '.join(self.arches)} into {self.out}: {len(self.fetched)} file(s) "
                f"fetched ({self.bytes} bytes), {len(self.kept)} already present")


def safe_title(title: str | None, where: str) -> str:
    if not title:
        raise PullError(f"{where}: layer without an org.opencontainers.image.title")
    if "/" in title or "\\" in title or title in (".", "..") or ".." in title \
            or not _TITLE.match(title):
        raise PullError(f"{where}: refusing file name {title!r}",
                        "a release file name is a plain base name (no '/', no '..')")
    return title


def _doc(raw: bytes, where: str) -> dict:
    try:
        return m.load_json_object(raw, where)
    except BuilderError as exc:
        raise PullError(exc.message, exc.hint) from None


def _arch_of(desc: dict) -> str | None:
    ann = desc.get("annotations") or {}
    if ann.get(ANNOTATION_ARCH):
        return ann[ANNOTATION_ARCH]
    plat = m.Platform.from_json(desc.get("platform"))
    if plat is None:
        return None
    return next((a for a in m.ARCH_PLATFORM if plat.matches(m.Platform.for_arch(a))), None)


def pull_release(client: RegistryClient, ref: Reference, out: Path,
                 arches: Iterable[str] | None = None,
                 reporter: Reporter | None = None) -> PullReport:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = list(arches or [])
    top = client.get_manifest(ref)  # hashed; a digest reference must match
    doc = _doc(top.raw, str(ref))
    media = doc.get("mediaType") or top.media_type
    manifests: list[tuple[str | None, bytes, str]] = []  # (arch, raw, where)
    if media in m.INDEX_TYPES:
        entries = [(e, _arch_of(e)) for e in doc.get("manifests") or []]
        available = [a for _, a in entries if a]
        missing = [a for a in wanted if a not in available]
        if missing:
            raise PullError(f"{ref}: no manifest for {', '.join(missing)} "
                            f"(the index has {', '.join(available) or 'none'})")
        for entry, arch in entries:
            if wanted and arch not in wanted:
                continue
            desc = m.Descriptor.from_json(entry, f"{ref}: index")
            raw = client.get_manifest(ref, desc.digest).raw
            manifests.append((arch, raw, f"{ref.name}@{desc.digest}"))
    elif media == m.OCI_MANIFEST:
        manifests.append((None, top.raw, str(ref)))
    else:
        raise PullError(f"{ref}: media type {media!r} is neither an OCI index nor a manifest")
    report = PullReport(out)
    titles: dict[str, str] = {}
    plans: list[tuple[str, m.Descriptor, str]] = []
    for arch, raw, where in manifests:
        data = _doc(raw, where)
        kind = data.get("artifactType") or ""
        if not _ARTIFACT.match(kind):
            raise PullError(f"{where}: artifactType {kind!r} is not a release artifact",
                            "point at a release pushed by `python -m builder release`")
        config = (data.get("config") or {}).get("mediaType")
        if config != EMPTY_MEDIA_TYPE:
            raise PullError(f"{where}: config media type {config!r}, expected {EMPTY_MEDIA_TYPE}")
        arch = arch or (data.get("annotations") or {}).get(ANNOTATION_ARCH)
        if arch and arch not in report.arches:
            report.arches.append(arch)
        for layer in data.get("layers") or []:
            desc = m.Descriptor.from_json(layer, where)
            title = safe_title(desc.annotations.get(m.ANNOTATION_TITLE), where)
            if titles.setdefault(title, desc.digest) != desc.digest:
                raise PullError(f"{where}: two different files named {title}")
            plans.append((title, desc, where))
    seen: set[str] = set()
    for title, desc, _where in plans:
        if title in seen:
            continue
        seen.add(title)
        dest = out / title
        if dest.is_file() and dest.stat().st_size == desc.size and dg.of_file(dest)[0] == desc.digest:
            report.kept.append(title)
            continue
        if reporter:
            reporter.line(f"fetching {title} ({desc.size} bytes)")
        report.bytes += _download(client, ref, desc, dest)
        report.fetched.append(title)
    return report


def _download(client: RegistryClient, ref: Reference, desc: m.Descriptor, dest: Path) -> int:
    """Stream one blob into ``dest`` atomically; the name appears only for the right bytes."""
    ep = client.direct(ref.host)
    url = ep.url(f"{ref.repository}/blobs/{desc.digest}")
    attempts = client.options.attempts
    for attempt in range(attempts):
        resp = client.request(ep, "GET", url, Scope(ref.repository), stream=True)
        try:
            with resp:
                if resp.status_code != 200:
                    raise FetchError(f"{ref.name} blob {desc.digest} ({dest.name}): "
                                     f"HTTP {resp.status_code}")
                with atomic_output(dest) as sink:
                    for chunk in resp.iter_content(CHUNK):
                        sink.write(chunk)
                        if sink.size > desc.size:
                            raise PullError(f"{dest.name}: more than the {desc.size} bytes "
                                            "its descriptor says")
                    if sink.digest != desc.digest or sink.size != desc.size:
                        raise DigestMismatch(f"{ref.name} blob for {dest.name}", desc.digest,
                                             sink.digest, "the registry served other bytes; "
                                             "nothing was written")
                return sink.size
        except (requests.RequestException, OSError) as exc:
            if attempt + 1 >= attempts:
                raise FetchError(f"{ref.name} blob {desc.digest} ({dest.name}): "
                                 f"{type(exc).__name__}: {exc}"[:400],
                                 "run pull-release again; finished files are kept") from None
    raise FetchError(f"{ref.name} blob {desc.digest} ({dest.name}): gave up")
