"""The release stage: publish a built, scanned, signed artifacts directory.

Three destinations, each optional, each idempotent (a re-release with nothing new sends no bytes):

- An OCI registry (``push_artifacts``): one ORAS-compatible artifact per arch. An OCI image
  manifest with ``artifactType`` ``application/vnd.NAME.release.v1``, the empty config
  (``application/vnd.oci.empty.v1+json``, the two bytes ``{}``), and one layer per file of the arch
  (its checksum file and signature included), each annotated with ``org.opencontainers.image.title``
  so ``oras pull`` writes it under its name. Tagged ``VERSION-ARCH``, plus an OCI index over the
  arches tagged ``VERSION`` (``+`` becomes ``-``: tags cannot hold ``+``). Uploads go through our
  RegistryClient in fixed-size chunks (flat memory, any file size; oras-py would read whole blobs
  and mishandles some token flows), every blob is HEADed first and skipped when present, and the
  digest the registry answers for each manifest must be the one computed here.
- Images (``push_images``): every image of the archives into a private registry, keeping each
  image manifest's digest (bytes are copied from the archives, never re-serialised), each image
  tagged with an OCI index over the release's arches (the runtime image's index is byte-identical
  to the one ``build`` made; other images get an index of ours, whose digest differs from the
  upstream index that may list more platforms). An image an archive ships converted (the zstd
  layer mode: index.json names its registry manifest) is pushed in its registry form, with the
  registry's digest (the lock's pin, what signatures and policies name), from the content store
  when the store holds that manifest and its blobs; otherwise in its converted form, and a note
  says, once per image, that its digest is not the registry's (naming both). Each blob is
  checked first (present: skipped), mounted from a repository of the same registry this run
  (or a previous one) saw holding it, else uploaded; the summary says per image and in total
  how many blobs and bytes were uploaded and how many were skipped (present or mounted).
- GitHub (``builder.publish.github``): a draft release with the files as assets.

What is published is exactly what ``sha256sum-ARCH.txt`` pins: every file is hashed and compared
with it first, so a file changed after signing is refused rather than published.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from builder import digest as dg
from builder.artifacts import (
    bundle_name,
    checksum_name,
    classify,
    discover_arches,
    envelope_name,
    image_files,
    signature_name,
)
from builder.errors import BuilderError, HttpStatusError
from builder.fetch.registry import BlobCopy, NotFound, RawManifest, RegistryClient
from builder.fetch.registry.push import CopyOutcome, Opener
from builder.humanize import human
from builder.oci import cosign
from builder.oci import model as m
from builder.oci.archive import ArchiveReader, read_archive_index
from builder.oci.convert import REGISTRY_MANIFEST
from builder.oci.reference import Reference
from builder.oci.reference import parse as parse_ref
from builder.progress import Reporter
from builder.publish.plan import Action, ActionKind, ReleaseError, ReleaseFile, ReleaseSet
from builder.store import Store
from builder.trust import checksums
from builder.trust.verify import read_release_env

EMPTY_CONFIG = b"{}"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
ANNOTATION_VERSION = "org.opencontainers.image.version"
ANNOTATION_REVISION = "org.opencontainers.image.revision"
ANNOTATION_ARCH = "vnd.airgap-builder.release.arch"
ANNOTATION_NAME = "vnd.airgap-builder.release.name"
ANNOTATION_SIGNED = "io.airgap-builder.signed"  # "true" / "false" (released with --allow-unsigned)
DEFAULT_CHUNK = 16 << 20  # one PATCH per 16 MiB: memory stays at about one chunk
def collect(directory: Path, arches: Iterable[str] | None = None,
            revision: str | None = None) -> ReleaseSet:
    """Hash every file of each arch against ``sha256sum-ARCH.txt`` and read the release name and
    version from the bundle. Refuses (naming every bad file) when anything does not match."""
    directory = Path(directory)
    wanted = list(arches or []) or discover_arches(directory)
    if not wanted:
        raise ReleaseError(f"{directory}: no sha256sum-ARCH.txt: nothing to release",
                           "run `python -m builder build` first (and point --out at it)")
    result: ReleaseSet | None = None
    per_arch: dict[str, list[ReleaseFile]] = {}
    for arch in wanted:
        sums = directory / checksum_name(arch)
        entries = checksums.parse_file(sums)
        checksums.check(directory, sums)  # raises naming every missing or mismatched file
        files = [ReleaseFile(e.name, directory / e.name, e.digest, (directory / e.name).stat().st_size)
                 for e in entries]
        extra = [sums, directory / signature_name(arch), directory / envelope_name(arch)]
        for path in extra:
            if path.is_file():
                files.append(ReleaseFile(path.name, path, dg.of_file(path)[0], path.stat().st_size))
        names = classify(arch, [e.name for e in entries])
        if names.bundle is None or names.release is None:
            raise ReleaseError(f"{sums}: lists no bundle {bundle_name('NAME', arch)}")
        try:
            _, env = read_release_env(directory / names.bundle)
        except Exception as exc:
            msg = exc.message if isinstance(exc, BuilderError) else str(exc)
            raise ReleaseError(f"{names.bundle}: cannot read release.env: {msg}") from None
        name, version = env.get("RELEASE_NAME", ""), env.get("RELEASE_VERSION", "")
        if not name or not version:
            raise ReleaseError(f"{names.bundle}: release.env lacks RELEASE_NAME or RELEASE_VERSION")
        if result is None:
            result = ReleaseSet(directory, name, version, revision)
        elif (result.name, result.version) != (name, version):
            raise ReleaseError(f"{names.bundle}: release {name} {version}, but another arch of "
                               f"this directory is {result.name} {result.version}",
                               "release one build at a time")
        per_arch[arch] = sorted(files, key=lambda f: f.name)
    assert result is not None
    result.files = per_arch
    return result


# -- the OCI artifact ---------------------------------------------------------------------------

def empty_config() -> m.Descriptor:
    return m.Descriptor(EMPTY_MEDIA_TYPE, dg.of_bytes(EMPTY_CONFIG), len(EMPTY_CONFIG))


def _annotations(rel: ReleaseSet, arch: str | None) -> dict[str, str]:
    out = {ANNOTATION_NAME: rel.name, ANNOTATION_VERSION: rel.version,
           ANNOTATION_SIGNED: str(rel.signed).lower()}
    if rel.revision:
        out[ANNOTATION_REVISION] = rel.revision
    if arch:
        out[ANNOTATION_ARCH] = arch
    return out


def artifact_manifest(rel: ReleaseSet, arch: str) -> bytes:
    """The per-arch artifact manifest (canonical JSON, so a re-release has the same digest)."""
    layers = [m.Descriptor(f.media_type, f.digest, f.size,
                           annotations={m.ANNOTATION_TITLE: f.name}).to_json()
              for f in rel.files[arch]]
    doc = {"schemaVersion": 2, "mediaType": m.OCI_MANIFEST, "artifactType": rel.artifact_type,
           "config": empty_config().to_json(), "layers": layers,
           "annotations": _annotations(rel, arch)}
    return m.canonical_json(doc)


def artifact_index(rel: ReleaseSet, manifests: dict[str, bytes]) -> bytes:
    entries = [m.Descriptor(m.OCI_MANIFEST, dg.of_bytes(raw), len(raw),
                            platform=m.Platform.for_arch(arch),
                            annotations={ANNOTATION_ARCH: arch},
                            artifact_type=rel.artifact_type).to_json()
               for arch, raw in manifests.items()]
    doc = {"schemaVersion": 2, "mediaType": m.OCI_INDEX, "artifactType": rel.artifact_type,
           "manifests": entries, "annotations": _annotations(rel, None)}
    return m.canonical_json(doc)


def registry_ref(text: str) -> Reference:
    """``HOST[:PORT]/REPO`` (no tag or digest: tags come from the version)."""
    if "/" not in text or "@" in text:
        raise ReleaseError(f"--registry {text!r}: expected HOST[:PORT]/REPOSITORY",
                           "e.g. registry.example.internal/releases/rke2")
    try:
        ref = parse_ref(text)
    except ValueError as exc:
        raise ReleaseError(f"--registry {text!r}: {exc}") from None
    if ref.tag not in (None, "latest") or text.rsplit("/", 1)[-1].count(":"):
        raise ReleaseError(f"--registry {text!r}: give the repository only; tags come from the "
                           "release version")
    return Reference(ref.host, ref.repository)


@dataclass(frozen=True)
class BlobTally:
    """What pushing did with some blobs: uploaded, or skipped because the target had them
    (present) or the registry copied them from another of its repositories (mounted). Counts and
    bytes; a skipped blob's bytes are those not sent."""

    counts: dict[CopyOutcome, int]
    sizes: dict[CopyOutcome, int]

    @classmethod
    def of(cls, copies: Iterable[BlobCopy]) -> BlobTally:
        counts: dict[CopyOutcome, int] = {"uploaded": 0, "present": 0, "mounted": 0}
        sizes = dict(counts)
        for copy in copies:
            counts[copy.outcome] += 1
            sizes[copy.outcome] += copy.size
        return cls(counts, sizes)

    @property
    def skipped(self) -> int:
        return self.counts["present"] + self.counts["mounted"]

    @property
    def skipped_bytes(self) -> int:
        return self.sizes["present"] + self.sizes["mounted"]

    def to_json(self) -> dict[str, dict[str, int]]:
        """``{"uploaded": {"blobs": N, "bytes": B}, "present": ..., "mounted": ...}``."""
        return {outcome: {"blobs": n, "bytes": self.sizes[outcome]}
                for outcome, n in self.counts.items()}

    def describe(self, dry_run: bool = False) -> str:
        """``uploaded 3 blobs (41.2 MiB), skipped 57 blobs already there (512.3 MiB: 55
        present, 2 mounted)``; in a dry run what would be done."""
        up, skip = ("would upload", "would skip") if dry_run else ("uploaded", "skipped")
        return (f"{up} {_blobs(self.counts['uploaded'])} ({human(self.sizes['uploaded'])}), "
                f"{skip} {_blobs(self.skipped)} already there ({human(self.skipped_bytes)}: "
                f"{self.counts['present']} present, {self.counts['mounted']} mounted)")


def _blobs(n: int) -> str:
    return f"{n} blob" if n == 1 else f"{n} blobs"


@dataclass
class PushResult:
    actions: list[Action] = field(default_factory=list)
    manifests: dict[str, str] = field(default_factory=dict)  # tag → digest
    notes: list[str] = field(default_factory=list)  # which form each converted image went in
    copies: dict[str, list[BlobCopy]] = field(default_factory=dict)  # image target → its blobs
    # blob digest → a repository of the target holding it, for the whole run: a blob another
    # image, archive (group) or arch already sent is mounted from there, not uploaded again
    held: dict[str, Reference] = field(default_factory=dict)

    def record(self, target: Reference, copy: BlobCopy) -> None:
        self.copies.setdefault(str(target), []).append(copy)
        self.held.setdefault(copy.digest, target)

    @property
    def sent(self) -> int:
        """Bytes uploaded."""
        return sum(c.sent for copies in self.copies.values() for c in copies)

    @property
    def blobs(self) -> dict[str, BlobTally]:
        return {target: BlobTally.of(copies) for target, copies in self.copies.items()}

    @property
    def total(self) -> BlobTally:
        return BlobTally.of(c for copies in self.copies.values() for c in copies)


@dataclass(frozen=True)
class PushSummary:
    """One registry push of a release run (the artifacts, or the images), for its report."""

    what: str  # "the release artifacts", "4 images"
    where: str  # the registry reference pushed to
    result: PushResult

    def lines(self, dry_run: bool) -> list[str]:
        """The total line, then one line per target when there are several (sorted)."""
        verb = "would push" if dry_run else "pushed"
        lines = [f"{verb} {self.what} to {self.where}: {self.result.total.describe(dry_run)}"]
        if len(self.result.copies) > 1:
            lines += [f"  {name}: {tally.describe(dry_run)}"
                      for name, tally in sorted(self.result.blobs.items())]
        return lines

    def to_json(self) -> dict:
        return {"what": self.what, "to": self.where, "blobs": self.result.total.to_json(),
                "targets": {name: tally.to_json() for name, tally in sorted(self.result.blobs.items())},
                "manifests": dict(self.result.manifests)}


def _tag_state(client: PushClient, ref: Reference, tag: str) -> str | None:
    """The digest ``tag`` points at now, or None."""
    try:
        return client.get_manifest(ref.with_tag(tag)).digest
    except NotFound:
        return None
    except HttpStatusError as exc:
        if exc.status == 404:
            return None
        raise


def _put_manifest(client: PushClient, ref: Reference, tag: str, raw: bytes, media_type: str,
                  dry_run: bool, result: PushResult) -> None:
    digest = dg.of_bytes(raw)
    by_digest = dg.is_digest(tag)
    target = f"{ref.name}@{tag}" if by_digest else f"{ref.name}:{tag}"
    label = "manifest" if by_digest else f"tag {tag} -> {digest}"
    current = _tag_state(client, ref, tag)
    if current == digest:
        result.actions.append(Action("unchanged", target, label))
    else:
        result.actions.append(Action("tag", target, label
                                     + (f" (was {current})" if current else "")))
        if not dry_run:
            got = client.push_manifest(ref, tag, raw, media_type)
            if got != digest:  # push_manifest checks the registry's echo; be explicit here too
                raise ReleaseError(f"push {target}: registry stored {got}, we computed {digest}")
    result.manifests[tag] = digest


class PushClient(Protocol):
    """What pushing needs of a registry: ``RegistryClient``, or ``_Offline`` for a dry run."""

    def get_manifest(self, ref: Reference, digest: str | None = None) -> RawManifest: ...

    def push_manifest(self, ref: Reference, target: str, raw: bytes, media_type: str) -> str: ...

    def copy_blob(self, target: Reference, digest: str, size: int, opener: Opener, *,
                  mount_from: Reference | None = None, chunk_size: int | None = None,
                  dry_run: bool = False,
                  before_upload: Callable[[], None] | None = None) -> BlobCopy: ...


def push_artifacts(client: PushClient, rel: ReleaseSet, ref: Reference, *,
                   dry_run: bool = False, chunk_size: int = DEFAULT_CHUNK,
                   reporter: Reporter | None = None) -> PushResult:
    """Push one artifact per arch and the index; returns what was (or would be) done."""
    result = PushResult()
    seen: set[str] = set()
    config = empty_config()
    manifests: dict[str, bytes] = {}
    for arch in rel.arches:
        blobs: list[tuple[str, int, str, Path | None]] = [
            (config.digest, config.size, "empty config", None)]
        blobs += [(f.digest, f.size, f.name, f.path) for f in rel.files[arch]]
        for digest, size, what, path in blobs:
            if digest in seen:
                continue  # the same bytes under two names (identical archives): one blob
            seen.add(digest)
            opener = _bytes_opener(EMPTY_CONFIG) if path is None else _file_opener(path)
            copy = client.copy_blob(ref, digest, size, opener, chunk_size=chunk_size,
                                    dry_run=dry_run,
                                    before_upload=_announce(reporter, f"pushing {what} "
                                                            f"({human(size)}) to {ref.name}"))
            kind: ActionKind = "skip" if copy.outcome == "present" else "push"
            result.actions.append(Action(kind, ref.name, f"{what} {digest}", size))
            result.record(ref, copy)
        raw = artifact_manifest(rel, arch)
        manifests[arch] = raw
        _put_manifest(client, ref, f"{rel.tag}-{arch}", raw, m.OCI_MANIFEST, dry_run, result)
    _put_manifest(client, ref, rel.tag, artifact_index(rel, manifests), m.OCI_INDEX, dry_run,
                  result)
    return result


def _file_opener(path: Path) -> Opener:
    return lambda: open(path, "rb")


def _bytes_opener(data: bytes) -> Opener:
    return lambda: io.BytesIO(data)


def _announce(reporter: Reporter | None, line: str) -> Callable[[], None] | None:
    """``copy_blob``'s ``before_upload``: the progress line, said only when bytes go out."""
    return (lambda: reporter.line(line)) if reporter else None


# -- images into a private registry -------------------------------------------------------------

@dataclass
class _Pushed:
    """One image manifest copied to the target (per arch), for the index made afterwards."""

    target: Reference
    raw: bytes
    media_type: str
    platform: m.Platform


@dataclass(frozen=True)
class _RegistryForm:
    """The registry form of an image an archive ships converted, all of it in the store."""

    digest: str  # the registry manifest's (the annotation's, the lock's pin)
    raw: bytes
    blobs: tuple[m.Descriptor, ...]  # its config and (gzip) layers


@dataclass(frozen=True)
class _Form:
    """Which form of a converted image one arch pushed, for the note said once per image."""

    arch: str
    registry: str  # the registry manifest's digest
    pushed: str  # the manifest digest pushed
    why: str = ""  # why not the registry form (empty when it was)


def _registry_form(store: Store | None, digest: str) -> _RegistryForm | str:
    """The registry form of a converted image from ``store``, or why it cannot come from there."""
    if store is None:
        return "no content store to take it from"
    if not dg.is_digest(digest):
        return f"its {REGISTRY_MANIFEST} annotation {digest!r:.80} is not a digest"
    if not store.has(digest):
        return f"the store at {store.root} does not hold the registry manifest"
    raw = store.read_bytes(digest)  # re-hashed: a blob changed on disk raises StoreCorrupt
    doc = m.parse_document(raw, f"store: {digest}")
    if isinstance(doc, m.Index):
        return f"the store's {digest} is an index, not an image manifest"
    blobs = (doc.config, *doc.layers)
    missing = [d.digest for d in blobs if not store.has(d.digest) or store.size(d.digest) != d.size]
    if missing:
        return (f"the store at {store.root} lacks {len(missing)} of its {len(blobs)} blobs "
                f"(first {missing[0]})")
    return _RegistryForm(digest, raw, blobs)


def _store_opener(store: Store, digest: str) -> Opener:
    # Re-hashed as it is read; the registry checks the digest of what it receives as well.
    return lambda: store.open_verified(digest, f"pushing {digest}")


def _form_notes(forms: dict[str, list[_Form]]) -> list[str]:
    """One line per converted image: the form pushed, and when it is not the registry's, both
    digests of each arch (a pin, signature or policy naming the registry digest will not match)."""
    notes = []
    for image, done in sorted(forms.items()):
        if all(not f.why for f in done):
            notes.append(f"{image}: pushed in its registry form (gzip layers from the store), "
                         "the registry's digest kept: "
                         + ", ".join(f"{f.arch} {f.pushed}" for f in done))
            continue
        notes.append(f"{image}: pushed in its converted form (zstd layers): its digest differs "
                     "from the registry's, so a pin, signature or policy naming the registry "
                     "digest does not match it: "
                     + "; ".join(f"{f.arch} {f.pushed} (registry {f.registry}"
                                 + (", pushed in its registry form" if not f.why else
                                    f": {f.why}") + ")" for f in done))
    return notes


def image_target(registry: str, image: str) -> Reference:
    """``docker.io/rancher/x:tag`` → ``REGISTRY[/PREFIX]/rancher/x:tag`` (host swapped, path kept,
    the way a system-default-registry rewrite works)."""
    ref = parse_ref(image)
    host, _, prefix = registry.strip("/").partition("/")
    repo = f"{prefix}/{ref.repository}" if prefix else ref.repository
    return Reference(host, repo, ref.tag, None)


def _archives_for(directory: Path, arch: str) -> list[Path]:
    names = classify(arch, [e.name for e in checksums.parse_file(directory / checksum_name(arch))])
    return [directory / zst for base in sorted(names.archives)
            if (zst := image_files(base)[0]) in names.archives[base]]


def push_images(client: PushClient, rel: ReleaseSet, registry: str, *, dry_run: bool = False,
                chunk_size: int = DEFAULT_CHUNK, reporter: Reporter | None = None,
                store: Store | None = None) -> PushResult:
    """Copy every image of the release's archives into ``registry`` with its digests; an image
    shipped converted goes in its registry form from ``store`` when it holds it (module doc)."""
    result = PushResult()
    pushed: dict[str, dict[str, _Pushed]] = {}  # image name → arch → manifest
    forms: dict[str, list[_Form]] = {}  # converted image → the form each arch pushed
    for arch in rel.arches:
        done: set[tuple[str, str]] = set()
        for archive in _archives_for(rel.directory, arch):
            images = read_archive_index(archive)  # the index at the front only (cheap)
            todo = {(i.name, i.manifest_digest) for i in images} - done
            if not todo:
                continue  # every image already came from another archive of this arch
            _copy_archive(client, archive, registry, arch, dry_run, chunk_size, result, pushed,
                          reporter, store, forms)
            done |= {(i.name, i.manifest_digest) for i in images}
    order = {a: n for n, a in enumerate(rel.arches)}
    for _image, per_arch in sorted(pushed.items()):
        items = sorted(per_arch.items(), key=lambda kv: order[kv[0]])
        first = items[0][1]
        tag = first.target.tag or "latest"
        if len(items) == 1:
            _put_manifest(client, first.target, tag, first.raw, first.media_type, dry_run, result)
            continue
        # Same construction as builder.oci.image.build_index, so the runtime image's index has the
        # digest the build reported.
        doc = {"schemaVersion": 2, "mediaType": m.OCI_INDEX,
               "manifests": [m.Descriptor(p.media_type, dg.of_bytes(p.raw), len(p.raw),
                                          p.platform).to_json() for _, p in items]}
        _put_manifest(client, first.target, tag, m.canonical_json(doc), m.OCI_INDEX, dry_run,
                      result)
    result.notes += _form_notes(forms)
    return result


def _copy_archive(client: PushClient, archive: Path, registry: str, arch: str, dry_run: bool,
                  chunk_size: int, result: PushResult, pushed: dict[str, dict[str, _Pushed]],
                  reporter: Reporter | None, store: Store | None = None,
                  forms: dict[str, list[_Form]] | None = None) -> None:
    """One streaming pass: the archive's metadata comes first (index.json names the manifests,
    docker manifest.json says which repository needs which config and layers), then the blobs,
    each pushed to every repository that needs it (uploaded once, mounted into the others).
    A converted image whose registry form ``store`` holds takes none of its blobs from the
    archive: its registry manifest, config and gzip layers are pushed from the store instead."""
    needs: dict[str, list[Reference]] = {}  # blob digest → repositories
    manifests: dict[str, tuple[str, m.Platform | None]] = {}  # manifest digest → (image, platform)
    signed: dict[str, tuple[str, str]] = {}  # image → (signed digest, `.sig` manifest digest)
    from_store: dict[str, _RegistryForm] = {}  # converted manifest digest → its registry form
    why_not: dict[str, str] = {}  # converted manifest digest → why it goes converted
    converted_from: dict[str, str] = {}  # converted manifest digest → registry manifest digest
    with ArchiveReader(archive) as reader:
        if reader.front.docker is None:
            raise ReleaseError(f"{archive.name}: blobs before index.json/manifest.json",
                               "rebuild the archive with this builder")
        for img in reader.front.images:
            manifests[img.manifest_digest] = (img.name, img.platform)
            if cosign.ANNOTATION_SIGNATURE in img.annotations:
                signed[img.name] = (img.annotations.get(cosign.ANNOTATION_SIGNED, ""),
                                    img.annotations[cosign.ANNOTATION_SIGNATURE])
            if REGISTRY_MANIFEST in img.annotations:
                converted_from[img.manifest_digest] = img.annotations[REGISTRY_MANIFEST]
                found = _registry_form(store, converted_from[img.manifest_digest])
                if isinstance(found, str):
                    why_not[img.manifest_digest] = found
                else:
                    from_store[img.manifest_digest] = found
        in_store = {image_target(registry, manifests[d][0]) for d in from_store}
        for entry in _docker_entries(archive, reader.front.docker):
            target = image_target(registry, (entry.get("RepoTags") or [""])[0])
            if target in in_store:
                continue  # its registry form comes from the store
            for member in [entry["Config"], *entry["Layers"]]:
                needs.setdefault(dg.from_hex(member.rsplit("/", 1)[1]), []).append(target)
        for blob in reader.blobs():  # manifests and small JSON are kept by the reader
            for target in needs.get(blob.digest, []):
                _push_blob_from(client, target, blob.digest, blob.size, blob.open,
                                dry_run, chunk_size, result, reporter)
        kept = reader.json
    for digest, (image, platform) in manifests.items():
        raw = kept.get(digest)
        if raw is None or dg.of_bytes(raw) != digest:
            raise ReleaseError(f"{archive.name}: manifest {digest} of {image} missing or corrupt",
                               "run `python -m builder verify` on the release directory")
        doc = m.parse_document(raw, f"{archive.name}: {digest}")
        target = image_target(registry, image)
        form = from_store.get(digest)
        if form is not None:
            raw, digest = _push_registry_form(client, archive, store, target, image, doc, form,
                                              dry_run, chunk_size, result, reporter)
        for d in [] if isinstance(doc, m.Index) or form else [doc.config, *doc.layers]:
            if target.repository not in {r.repository for r in needs.get(d.digest, [])}:
                raise ReleaseError(f"{archive.name}: manifest.json does not list {d.digest} for "
                                   f"{image}, though its manifest does", "rebuild the archive")
        media_type = m.media_type_of(raw, m.OCI_MANIFEST)
        _put_manifest(client, target, digest, raw, media_type, dry_run, result)
        if forms is not None and (form is not None or digest in why_not):
            forms.setdefault(image, []).append(
                _Form(arch, form.digest if form else converted_from[digest], digest,
                      why_not.get(digest, "")))
        pushed.setdefault(image, {})[arch] = _Pushed(target, raw, media_type,
                                                     platform or m.Platform.for_arch(arch))
    for image, (digest, sig) in signed.items():
        _push_signature(client, archive, image_target(registry, image), digest, sig, kept,
                        dry_run, result)


def _push_registry_form(client: PushClient, archive: Path, store: Store | None,
                        target: Reference, image: str, converted: m.Manifest | m.Index,
                        form: _RegistryForm, dry_run: bool,
                        chunk_size: int, result: PushResult, reporter: Reporter | None,
                        ) -> tuple[bytes, str]:
    """The registry form's config and layers from the store into ``target``; returns the
    registry manifest (bytes, digest) to push in place of the converted one. The converted
    manifest must name the same config: otherwise the archive does not hold what it says it
    was converted from."""
    assert store is not None
    if isinstance(converted, m.Index) or converted.config.digest != form.blobs[0].digest:
        got = "an index" if isinstance(converted, m.Index) else f"config {converted.config.digest}"
        raise ReleaseError(f"{archive.name}: {image}: the converted manifest names {got}, its "
                           f"registry manifest {form.digest} config {form.blobs[0].digest}",
                           "run `python -m builder verify` on the release directory")
    for d in form.blobs:
        _push_blob_from(client, target, d.digest, d.size, _store_opener(store, d.digest),
                        dry_run, chunk_size, result, reporter)
    return form.raw, form.digest


def _docker_entries(archive: Path, docker: Any) -> list[dict[str, Any]]:
    """manifest.json's entries, each naming its Config and Layers as blob members."""
    ok = isinstance(docker, list) and all(
        isinstance(e, dict) and isinstance(e.get("Config"), str) and isinstance(e.get("Layers"), list)
        and all(isinstance(x, str) and x.startswith("blobs/sha256/") for x in [e["Config"], *e["Layers"]])
        for e in docker)
    if not ok:
        raise ReleaseError(f"{archive.name}: manifest.json is not a list of {{Config, Layers}} "
                           "entries naming blobs/sha256/<hex>", "rebuild the archive with this builder")
    return docker


def _push_signature(client: PushClient, archive: Path, target: Reference, digest: str,
                    sig: str, blobs: dict[str, bytes], dry_run: bool, result: PushResult) -> None:
    """The publisher's cosign signature an archive carries for an image, as the
    ``sha256-<hex>.sig`` tag beside it: what the site's admission policy looks up."""
    raw = blobs.get(sig)
    if raw is None or dg.of_bytes(raw) != sig or not dg.is_digest(digest):
        raise ReleaseError(f"{archive.name}: cosign signature {sig} of {target.name} missing or "
                           "corrupt", "run `python -m builder verify` on the release directory")
    doc = m.parse_document(raw, f"{archive.name}: {sig}")
    assert isinstance(doc, m.Manifest), "verify and build only carry signature manifests"
    for d in (doc.config, *doc.layers):
        data = blobs.get(d.digest)
        if data is None or dg.of_bytes(data) != d.digest:
            raise ReleaseError(f"{archive.name}: blob {d.digest} of cosign signature {sig} missing",
                               "run `python -m builder verify` on the release directory")
        _push_blob_from(client, target, d.digest, len(data), _bytes_opener(data), dry_run, 0,
                        result, None)
    _put_manifest(client, target, cosign.signature_tag(digest), raw,
                  m.media_type_of(raw, m.OCI_MANIFEST), dry_run, result)


def _push_blob_from(client: PushClient, target: Reference, digest: str, size: int,
                    opener: Opener, dry_run: bool, chunk_size: int, result: PushResult,
                    reporter: Reporter | None) -> None:
    """One blob into ``target``'s repository, mounted from a repository this run saw holding it
    (``result.held``) rather than uploaded again. Counted for the image."""
    source = result.held.get(digest)
    copy = client.copy_blob(target, digest, size, opener, mount_from=source,
                            chunk_size=chunk_size or DEFAULT_CHUNK, dry_run=dry_run,
                            before_upload=_announce(reporter, f"pushing {target.name} blob "
                                                    f"{digest[:19]} ({human(size)})"))
    if copy.outcome == "present":
        result.actions.append(Action("skip", target.name, f"blob {digest}", size))
    elif copy.outcome == "mounted":
        assert source is not None, "copy_blob mounts only from the mount_from it was given"
        result.actions.append(Action("push", target.name, f"blob {digest} (mount from "
                                     f"{source.repository})", 0))
    else:
        result.actions.append(Action("push", target.name, f"blob {digest}", size))
    result.record(target, copy)


# -- the whole stage ----------------------------------------------------------------------------

@dataclass(frozen=True)
class PublishOptions:
    directory: Path
    registry: str | None = None  # HOST/REPO for the release artifact
    github: str | None = None  # OWNER/REPO
    push_images: str | None = None  # HOST[/PREFIX] for the images
    insecure: bool = False  # plain HTTP to the registry hosts named here
    dry_run: bool = False
    override_scan: bool = False
    override_reason: str | None = None
    arches: tuple[str, ...] = ()
    chunk_size: int = DEFAULT_CHUNK
    revision: str | None = None
    allow_unsigned: bool = False
    store: Path | None = None  # the content store: registry forms of converted images come from it


@dataclass
class PublishReport:
    release: ReleaseSet
    dry_run: bool
    actions: list[Action] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sent: int = 0
    pushes: list[PushSummary] = field(default_factory=list)  # what each registry push sent and skipped

    @property
    def pushed(self) -> list[str]:
        return [line for p in self.pushes for line in p.lines(self.dry_run)]

    def summary(self) -> str:
        head = "plan (dry run, nothing changed)" if self.dry_run else "released"
        counts: dict[str, int] = {}
        for a in self.actions:
            counts[a.kind] = counts.get(a.kind, 0) + 1
        lines = [f"{head}: {self.release.name} {self.release.version} "
                 f"({', '.join(self.release.arches)}); "
                 + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                 + (f"; {human(self.sent)} sent" if not self.dry_run else "")]
        lines += [f"  {a}" for a in self.actions]
        lines += self.pushed  # after the long list of steps, where a person looks last
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict:
        """`release --json`: the same facts as ``summary``, for CI (sizes in bytes)."""
        return {"dry_run": self.dry_run, "release": self.release.name,
                "version": self.release.version, "arches": list(self.release.arches),
                "sent": self.sent,
                "actions": [asdict(a) for a in self.actions],
                "pushes": [p.to_json() for p in self.pushes], "notes": list(self.notes)}


def registry_client(hosts: Iterable[str], insecure: bool, chunk_size: int) -> RegistryClient:
    """A client for pushes: credentials from BUILDER_REGISTRY_AUTH_<HOST> or Docker's config,
    a CA bundle from BUILDER_REGISTRY_CA_FILE, plain HTTP only for the hosts named with --insecure."""
    from dataclasses import replace

    from builder.fetch.registry import ClientOptions
    from builder.lock.lockfile import Mirrors

    options = replace(ClientOptions.from_env(), upload_chunk=chunk_size or None)
    mirrors = Mirrors(insecure=tuple(hosts) if insecure else ())
    return RegistryClient(mirrors=mirrors, options=options)


def check_signed(rel: ReleaseSet, allow_unsigned: bool, notes: list[str]) -> None:
    """A release is signed (every arch's sha256sum-ARCH.txt.sig and provenance envelope) or
    says it is not: refused without --allow-unsigned, annotated signed=false with it."""
    unsigned = rel.unsigned
    if not unsigned:
        return
    if not allow_unsigned:
        raise ReleaseError(f"{rel.directory}: not signed (missing {', '.join(unsigned)})",
                           "run `python -m builder sign --key KEY` first, or pass "
                           "--allow-unsigned to publish it marked unsigned")
    notes.append(f"released UNSIGNED (--allow-unsigned; missing {', '.join(unsigned)}): "
                 f"annotated {ANNOTATION_SIGNED}=false")


def check_scan(opts: PublishOptions, notes: list[str]) -> None:
    """The scan gate (builder.scan.gate.require_passed); in a dry run nothing is recorded."""
    from builder.scan.gate import ScanNotPassed, require_passed

    if not opts.dry_run:
        require_passed(opts.directory, opts.override_scan, opts.override_reason)
        if opts.override_scan:
            notes.append("scan gate overridden; recorded in scan/status.json and scan/summary.md")
        return
    try:
        require_passed(opts.directory, False)
    except ScanNotPassed as exc:
        if not opts.override_scan:
            raise
        notes.append(f"would override the scan gate (and record it): {exc.message}")


class _Offline:
    """Stands in for the registry and GitHub clients in a dry run: the plan is made from the
    artifacts alone, without one network call (a dry run must work, and prove nothing leaks,
    before any credential or route to the target exists). Every target reads as empty, so the
    plan lists each blob, tag and asset as to be pushed; a real run skips those already there."""

    def __init__(self, repo: str = "") -> None:
        self.repo = repo

    def copy_blob(self, target: Reference, digest: str, size: int, opener: Opener, *,
                  mount_from: Reference | None = None, chunk_size: int | None = None,
                  dry_run: bool = False,
                  before_upload: Callable[[], None] | None = None) -> BlobCopy:
        """What ``RegistryClient.copy_blob`` would do with an empty target: mount from a
        repository of the same host, else upload; nothing is sent."""
        same_host = mount_from is not None and mount_from.host == target.host
        return BlobCopy("mounted" if same_host else "uploaded", digest, size, 0)

    def get_manifest(self, ref: Reference, digest: str | None = None) -> RawManifest:
        raise NotFound(f"{ref}: not asked (dry run)")

    def push_manifest(self, ref: Reference, target: str, raw: bytes, media_type: str) -> str:
        raise AssertionError(f"{ref}: a dry run pushes nothing")  # _put_manifest never asks

    def find_release(self, tag: str) -> None:
        return None


OFFLINE_NOTE = ("dry run: no registry or GitHub contacted; what a target already holds would be "
                "skipped by the real run")


def _open_store(root: Path | None) -> Store | None:
    """The content store at ``root`` if one is there (a release host may have none: then every
    converted image goes in its converted form, and the notes say so)."""
    return Store(root) if root is not None and (root / "blobs" / "sha256").is_dir() else None


def publish(opts: PublishOptions, reporter: Reporter | None = None) -> PublishReport:
    if not (opts.registry or opts.github or opts.push_images):
        raise ReleaseError("release: nothing to do",
                           "give --registry HOST/REPO, --github OWNER/REPO and/or --push-images HOST")
    notes: list[str] = []
    check_scan(opts, notes)
    rel = collect(opts.directory, opts.arches, opts.revision)
    check_signed(rel, opts.allow_unsigned, notes)
    report = PublishReport(rel, opts.dry_run, notes=notes)
    target = registry_ref(opts.registry) if opts.registry else None
    hosts = [h for h in (target.host if target else None,
                         (opts.push_images or "").split("/", 1)[0] or None) if h]
    if opts.dry_run:
        report.notes.append(OFFLINE_NOTE)
    if hosts:
        client = _Offline() if opts.dry_run else registry_client(hosts, opts.insecure, opts.chunk_size)
        if target is not None:
            res = push_artifacts(client, rel, target, dry_run=opts.dry_run,
                                 chunk_size=opts.chunk_size, reporter=reporter)
            report.actions += res.actions
            report.sent += res.sent
            report.pushes.append(PushSummary("the release artifacts", target.name, res))
        if opts.push_images:
            res = push_images(client, rel, opts.push_images, dry_run=opts.dry_run,
                              chunk_size=opts.chunk_size, reporter=reporter,
                              store=_open_store(opts.store))
            report.actions += res.actions
            report.sent += res.sent
            images = len(res.copies)
            report.pushes.append(PushSummary(f"{images} image{'' if images == 1 else 's'}",
                                             opts.push_images, res))
            report.notes += res.notes
    if opts.github:
        from builder.publish.github import GitHubClient, sync_release

        gh = GitHubClient.from_env(opts.github)  # checks the repository name and token first
        actions = sync_release(_Offline(gh.repo) if opts.dry_run else gh,  # type: ignore[arg-type]
                               rel, dry_run=opts.dry_run, reporter=reporter)
        report.actions += actions
        report.sent += 0 if opts.dry_run else sum(a.size for a in actions
                                                  if a.kind in ("upload", "replace"))
    return report
