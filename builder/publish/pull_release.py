"""Fetch a release artifact from an OCI registry into a directory (the connected side of the air
gap), ready to carry across and check with ``verify``.

``REF`` names the index (every arch, or those chosen) or one per-arch manifest, by tag or digest.
Each manifest is hashed before it is parsed (a digest reference must match); it must be one of
ours (an ``application/vnd.NAME.release.v1`` artifact with the empty config). Each layer becomes
the file named by its ``org.opencontainers.image.title``, which must be a plain base name (no
``/``, no ``..``); the blob streams into a temp file in the directory while being hashed, and is
renamed to its name only when digest and size match. A file already present with the right digest
is kept, so an interrupted pull is resumed file by file.

The registry may be hostile, so nothing is written before every manifest was checked: each
per-arch manifest names a known arch and carries that arch's ``sha256sum-ARCH.txt`` (fetched
into memory first, digest-checked and parsed strictly), and every other layer is that checksum
file's signature or a file the checksum file lists for that arch, with the digest it lists. A
layer titled for another arch, or one the checksum file does not vouch for, is refused.
"""

from __future__ import annotations

import contextlib
import io
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import requests

from builder import digest as dg
from builder.artifacts import (
    ARCH_PLATFORM,
    KNOWN_ARCHES,
    SIG_SUFFIX,
    arch_of,
    checksum_name,
    envelope_name,
)
from builder.errors import BuilderError, DigestMismatch, FetchError, HttpStatusError
from builder.fetch.registry import CHUNK, RegistryClient, Scope
from builder.humanize import human
from builder.oci import model as m
from builder.oci.compress import HashingWriter, atomic_output
from builder.oci.reference import Reference
from builder.progress import Reporter
from builder.publish.release import ANNOTATION_ARCH, ANNOTATION_SIGNED, EMPTY_MEDIA_TYPE
from builder.trust import checksums
from builder.trust.provenance import ENVELOPE_LIMIT
from builder.trust.verify import SIGNATURE_LIMIT, printable

# fullmatch only: `$` would accept a trailing newline ("name\n").
_TITLE = re.compile(r"[A-Za-z0-9._+-]+")
_ARTIFACT = re.compile(r"application/vnd\.[A-Za-z0-9._-]+\.release\.v1")


class PullError(BuilderError):
    """The artifact is not a release we can pull, or a blob did not arrive intact."""


@dataclass
class PullReport:
    out: Path
    arches: list[str] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    bytes: int = 0
    unsigned: list[str] = field(default_factory=list)  # arches released with --allow-unsigned

    def summary(self) -> str:
        line = (f"pulled {', '.join(self.arches)} into {self.out}: {len(self.fetched)} file(s) "
                f"fetched ({human(self.bytes)}), {len(self.kept)} already present")
        if self.unsigned:
            line += (f"\n  note: {', '.join(self.unsigned)} released UNSIGNED "
                     f"({ANNOTATION_SIGNED}=false: published with --allow-unsigned)")
        return line


def safe_title(title: str | None, where: str) -> str:
    if not title:
        raise PullError(f"{where}: layer without an org.opencontainers.image.title")
    if not isinstance(title, str) or "/" in title or "\\" in title or title in (".", "..") \
            or ".." in title or not _TITLE.fullmatch(title):
        raise PullError(f"{where}: refusing file name {printable(repr(title), 120)}",
                        "a release file name is a plain base name (no '/', no '..')")
    return title


def _doc(raw: bytes, where: str) -> dict:
    try:
        return m.load_json_object(raw, where)
    except BuilderError as exc:
        raise PullError(exc.message, exc.hint) from None


def _arch_of(desc: dict, where: str) -> str | None:
    """The arch an index entry or manifest names (annotation, else platform); a known one."""
    ann = desc.get("annotations") or {}
    if not isinstance(ann, dict):
        raise PullError(f"{where}: annotations is not an object")
    if ann.get(ANNOTATION_ARCH):
        arch = ann[ANNOTATION_ARCH]
        if arch not in KNOWN_ARCHES:
            raise PullError(f"{where}: unknown arch {printable(repr(arch), 80)}",
                            f"known arches: {', '.join(KNOWN_ARCHES)}")
        return arch
    try:
        plat = m.Platform.from_json(desc.get("platform"))
    except AttributeError:
        raise PullError(f"{where}: platform is not an object") from None
    if plat is None:
        return None
    return next((a for a in ARCH_PLATFORM if plat.matches(m.Platform.for_arch(a))), None)


def pull_release(client: RegistryClient, ref: Reference, out: Path,
                 arches: Iterable[str] | None = None,
                 reporter: Reporter | None = None) -> PullReport:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = list(arches or [])
    manifests = _manifests(client, ref, wanted)
    report = PullReport(out)
    titles: dict[str, str] = {}
    plans: list[tuple[str, m.Descriptor]] = []
    sums_bytes: dict[str, bytes] = {}  # checksum files, already fetched and checked
    for index_arch, raw, where in manifests:
        arch, layers, sums = _check_manifest(client, ref, index_arch, raw, where)
        if arch not in report.arches:
            report.arches.append(arch)
        annotations = _doc(raw, where).get("annotations")
        if isinstance(annotations, dict) and annotations.get(ANNOTATION_SIGNED) == "false":
            report.unsigned.append(arch)
        sums_bytes[checksum_name(arch)] = sums
        for title, desc in layers:
            if titles.setdefault(title, desc.digest) != desc.digest:
                raise PullError(f"{where}: two different files named {title}")
            plans.append((title, desc))
    # Everything was checked: only now does anything land in ``out``.
    seen: set[str] = set()
    for title, desc in plans:
        if title in seen:
            continue
        seen.add(title)
        dest = out / title
        if dest.is_file() and not dest.is_symlink() and dest.stat().st_size == desc.size \
                and dg.of_file(dest)[0] == desc.digest:
            report.kept.append(title)
            continue
        if reporter:
            reporter.line(f"fetching {title} ({human(desc.size)})")
        if title in sums_bytes:
            with atomic_output(dest) as sink:
                sink.write(sums_bytes[title])
            report.bytes += desc.size
        else:
            report.bytes += _download(client, ref, desc, dest)
        report.fetched.append(title)
    return report


def _manifests(client: RegistryClient, ref: Reference,
               wanted: list[str]) -> list[tuple[str | None, bytes, str]]:
    """(arch the index names, raw manifest, where) of each per-arch manifest to pull."""
    top = client.get_manifest(ref)  # hashed; a digest reference must match
    doc = _doc(top.raw, str(ref))
    media = doc.get("mediaType") or top.media_type
    if media == m.OCI_MANIFEST:
        return [(None, top.raw, str(ref))]
    if media not in m.INDEX_TYPES:
        raise PullError(f"{ref}: media type {printable(repr(media), 120)} is neither an OCI "
                        "index nor a manifest")
    entries = doc.get("manifests") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise PullError(f"{ref}: index manifests is not a list of descriptors")
    entries = [(e, _arch_of(e, f"{ref}: index")) for e in entries]
    available = [a for _, a in entries if a]
    missing = [a for a in wanted if a not in available]
    if missing:
        raise PullError(f"{ref}: no manifest for {', '.join(printable(a, 20) for a in missing)} "
                        f"(the index has {', '.join(available) or 'none'})")
    out: list[tuple[str | None, bytes, str]] = []
    for entry, arch in entries:
        if wanted and arch not in wanted:
            continue
        desc = m.Descriptor.from_json(entry, f"{ref}: index")
        raw = client.get_manifest(ref, desc.digest).raw
        out.append((arch, raw, f"{ref.name}@{desc.digest}"))
    return out


def _check_manifest(client: RegistryClient, ref: Reference, index_arch: str | None, raw: bytes,
                    where: str) -> tuple[str, list[tuple[str, m.Descriptor]], bytes]:
    """(arch, [(title, descriptor) of every layer], checksum file's bytes) of one manifest.

    The manifest must name a known arch and carry that arch's checksum file; every other layer is
    its signature or a file the checksum file lists for that arch, with the digest it lists.
    """
    data = _doc(raw, where)
    kind = data.get("artifactType") or ""
    if not isinstance(kind, str) or not _ARTIFACT.fullmatch(kind):
        raise PullError(f"{where}: artifactType {printable(repr(kind), 120)} is not a release "
                        "artifact", "point at a release pushed by `python -m builder release`")
    config = (data.get("config") or {}).get("mediaType") if isinstance(data.get("config"), dict) \
        else None
    if config != EMPTY_MEDIA_TYPE:
        raise PullError(f"{where}: config media type {printable(repr(config), 120)}, "
                        f"expected {EMPTY_MEDIA_TYPE}")
    layers_json = data.get("layers") or []
    if not isinstance(layers_json, list):
        raise PullError(f"{where}: layers is not a list")
    layers: list[tuple[str, m.Descriptor]] = []
    for layer in layers_json:
        desc = m.Descriptor.from_json(layer, where) if isinstance(layer, dict) else None
        if desc is None:
            raise PullError(f"{where}: a layer is not a descriptor object")
        layers.append((safe_title(desc.annotations.get(m.ANNOTATION_TITLE), where), desc))
    own = _arch_of({"annotations": data.get("annotations") or {}}, where)
    if index_arch and own and own != index_arch:
        raise PullError(f"{where}: the index lists it for {index_arch}, it says {own}")
    arch = index_arch or own
    if arch is None:
        raise PullError(f"{where}: names no arch (annotation {ANNOTATION_ARCH})",
                        "point at a release pushed by `python -m builder release`")
    sums_name = checksum_name(arch)
    by_title = dict(layers)
    if len(by_title) != len(layers):
        raise PullError(f"{where}: two layers with one title")
    if sums_name not in by_title:
        raise PullError(f"{where}: no {sums_name} among its layers: nothing vouches for its files")
    sums = _fetch_small(client, ref, by_title[sums_name], checksums.SIZE_LIMIT)
    try:
        listed = {e.name: e.digest for e in
                  checksums.parse(sums.decode("ascii"), f"{where}: {sums_name}")}
    except UnicodeDecodeError as exc:
        raise PullError(f"{where}: {sums_name} is not ASCII text (byte {exc.start})") from None
    except BuilderError as exc:
        raise PullError(exc.message, exc.hint) from None
    for title, desc in layers:
        if title == sums_name:
            continue
        if title == sums_name + SIG_SUFFIX:
            if desc.size > SIGNATURE_LIMIT:
                raise PullError(f"{where}: {title} is {desc.size} bytes; a signature is tiny")
            continue
        if title == envelope_name(arch):  # signed itself, written after the checksum file
            if desc.size > ENVELOPE_LIMIT:
                raise PullError(f"{where}: {title} is {desc.size} bytes, over {ENVELOPE_LIMIT}")
            continue
        if arch_of(title) != arch:
            raise PullError(f"{where}: layer {title} is not a linux-{arch} file (NAME.linux-"
                            f"{arch}.*) but sits in the {arch} artifact")
        if title not in listed:
            raise PullError(f"{where}: layer {title} is not listed in {sums_name}",
                            "a file the checksum file does not list is nobody's word; "
                            "re-release from a verified build")
        if listed[title] != desc.digest:
            raise PullError(f"{where}: layer {title} is {desc.digest}, {sums_name} lists "
                            f"{listed[title]}")
    return arch, layers, sums


def _fetch_small(client: RegistryClient, ref: Reference, desc: m.Descriptor, limit: int) -> bytes:
    """A small blob into memory (at most ``limit`` bytes), digest-checked."""
    if desc.size > limit:
        raise PullError(f"{ref.name} blob {desc.digest}: {desc.size} bytes, more than the "
                        f"{limit} a checksum file may have")
    buf = io.BytesIO()

    @contextlib.contextmanager
    def memory() -> Iterator[HashingWriter]:
        buf.seek(0)
        buf.truncate()  # a retry starts over
        yield HashingWriter(buf)

    _transfer(client, ref, desc, desc.annotations.get(m.ANNOTATION_TITLE, ""), memory)
    return buf.getvalue()


def _download(client: RegistryClient, ref: Reference, desc: m.Descriptor, dest: Path) -> int:
    """Stream one blob into ``dest`` atomically; the name appears only for the right bytes."""
    return _transfer(client, ref, desc, dest.name, lambda: atomic_output(dest))


def _transfer(client: RegistryClient, ref: Reference, desc: m.Descriptor, name: str,
              open_sink: Callable[[], AbstractContextManager[HashingWriter]]) -> int:
    """Stream one blob into a fresh sink per attempt; raises unless digest and size match."""
    ep = client.direct(ref.host)
    url = ep.url(f"{ref.repository}/blobs/{desc.digest}")
    policy = client.options.policy
    for attempt in range(policy.attempts):
        resp = client.request(ep, "GET", url, Scope(ref.repository), stream=True)
        try:
            with resp:
                if resp.status_code != 200:
                    raise HttpStatusError(resp.status_code, url, f"{ref.name} blob {desc.digest} "
                                          f"({name}): HTTP {resp.status_code}")
                with open_sink() as sink:
                    for chunk in resp.iter_content(CHUNK):
                        sink.write(chunk)
                        if sink.size > desc.size:
                            raise PullError(f"{name}: more than the {desc.size} bytes "
                                            "its descriptor says")
                    if sink.digest != desc.digest or sink.size != desc.size:
                        raise DigestMismatch(f"{ref.name} blob for {name}", desc.digest,
                                             sink.digest, "the registry served other bytes; "
                                             "nothing was written")
                return sink.size
        except (requests.RequestException, OSError) as exc:
            if policy.last(attempt):
                raise FetchError(f"{ref.name} blob {desc.digest} ({name}): "
                                 f"{type(exc).__name__}: {exc}"[:400],
                                 "run pull-release again; finished files are kept") from None
            time.sleep(policy.backoff_delay(attempt))  # the body broke off: the policy's pause
    raise FetchError(f"{ref.name} blob {desc.digest} ({name}): gave up")
