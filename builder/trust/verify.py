"""Offline verification of a release directory (the air-gapped side: no lock, no network).

For every arch (``sha256sum-ARCH.txt`` present, or the arches asked for) it checks, and reports
*every* failure, each naming its file:

1. the signature of ``sha256sum-ARCH.txt`` (when a public key is given; required with
   ``require_signature``), over the very bytes the next step parses;
2. the checksums, ``sha256sum -c`` style, plus the reverse: every file in the directory must be
   listed by the checksum file of its arch (an unlisted file is one nobody vouched for, whether it
   is ``NAME-images-x.linux-ARCH.txt`` or an ``install.sh`` someone added);
3. every image archive (``.tar.zst`` and ``.tar.gz``) on its own: each blob's digest, each
   manifest's references (``read_archive(verify=True)``), and the platform of each image
   against the archive's arch; the two compressions must hold the same images; an image shipped
   in the zstd layer mode (index.json names its registry manifest) is tied to the registry's
   image, which a carried cosign signature covers: ``check_converted``, with every zstd blob
   decompressed (rke2's 32 MiB window cap) in the same read;
4. each ``.txt`` list against its archive's image names, and ``NAME-images-all`` against the union;
5. the bundle's ``share/NAME/release.env`` against the archives: RELEASE_ARCH/NAME, the runtime
   image with RUNTIME_MANIFEST inside RUNTIME_ARCHIVE, that manifest's layers equal to
   RUNTIME_LAYERS, the DATA_KEY formula, DEFAULT_IMAGES and IMAGE_GROUPS naming archives here;
6. the supervisor's own lookup of the runtime image (builder.trust.runtime_lookup), in every archive
   that should hold it (RUNTIME_ARCHIVE, DEFAULT_IMAGES, and every archive whose index.json names
   it) and in every other archive that holds it: docker manifest.json RepoTags resolving to
   RUNTIME_IMAGE as go-containerregistry resolves names, config and layers by exact member name,
   each layer uncompressing to its config diff_id in order, bin/ and charts/ in the flattened
   layers. The summary names the archives that hold it.
7. the provenance (builder.trust.provenance): the statement ``provenance.linux-ARCH.json`` the checksum
   file lists, its subjects exactly the other listed artifacts with their digests, the lock it
   names (with ``lock``), and with a public key its DSSE envelope over those very bytes; the
   signer's fingerprint, named from the operator's trust file.

A delta directory (``build --since``) holds no image archives: ``verify DIR --base PREV`` passes
a ``rebuild`` hook (builder.trust.delta) through which each listed archive is read rebuilt from
PREV's and the delta's bytes, and every check above runs on it; without one, a delta directory
is refused with a message that says to give ``--base``.

The media may be hostile. Checks 3-5 run only on files whose checksum passed (the content of a
file nobody vouched for is not worth reading, and reading it is how a tiny archive that unpacks
to gigabytes would get in); while they read a file they hash it again, so a file that changes
between the two reads is reported, not trusted. Every file read is a regular file (never a
symlink, FIFO or device), small files are read up to a limit, archives with bounded memory
(builder.oci.archive), and nothing read from the media reaches the terminal unescaped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import zstandard

from builder import digest as dg
from builder.artifacts import (
    IMAGE_ARCHIVE_SUFFIXES,
    KNOWN_ARCHES,
    RELEASE_ENV,
    RELEASE_ENV_KEYS,
    SIG_SUFFIX,
    SUMS_PATTERN,
    Names,
    all_list_name,
    arch_of,
    classify,
    data_key,
    delta_description_name,
    discover_arches,
    images_base,
    release_env_member,
)
from builder.errors import BuilderError
from builder.oci import cosign
from builder.oci import model as m
from builder.oci.archive import (
    ArchiveContents,
    ArchivedImage,
    members,
    open_tar_stream,
    parse_document,
    read_archive,
)
from builder.oci.compress import CHUNK, ZSTD_MAGIC, ZSTD_MAX_WINDOW, open_maybe_compressed
from builder.oci.convert import REGISTRY_LAYER, REGISTRY_MANIFEST
from builder.trust import checksums, provenance
from builder.trust.runtime_lookup import (
    BadName,
    LayerSeen,
    LookupResult,
    Rewind,
    RuntimeLookup,
    blob_digest,
    tag_name,
)
from builder.trust.sign import PublicKey, load_public_key, verify_bytes

ARCHIVE_SUFFIXES = IMAGE_ARCHIVE_SUFFIXES
RELEASE_ENV_LIMIT = 64 << 10
LIST_LIMIT = 1 << 20  # an image list: one reference per line, a few KB in practice
SIGNATURE_LIMIT = 64 << 10  # an Ed25519 or ECDSA signature: under 100 bytes
# Directories the build writes beside a release that are not part of it (scan reports).
BUILD_ONLY_DIRS = frozenset({"scan"})
# release.env: exactly what bundle.ReleaseInfo.env() writes (artifacts.RELEASE_ENV_KEYS), one
# KEY='value' per line; applied with fullmatch (`$` would accept "x\n").
_ENV_LINE = re.compile(r"(?P<key>[A-Z][A-Z0-9_]*)='(?P<value>[A-Za-z0-9._:/@+ -]*)'")


class VerifyFailed(BuilderError):
    """One or more checks failed; the message lists them all."""


class Rebuilt(Protocol):
    """Image archives a directory lists but does not hold, whose bytes are rebuilt for the check
    (a delta directory: from the base release and the delta archives, builder.trust.delta)."""

    files: frozenset[str]  # listed archives not looked for here: their bytes come from elsewhere
    ready: frozenset[str]  # those of them that can be rebuilt (the others are reported)
    extra: frozenset[str]  # files here no checksum file lists that belong (delta files)

    def open(self, path: Path) -> contextlib.AbstractContextManager[BinaryIO]:
        """The rebuilt bytes of ``path`` (a name in ``files``), as a forward stream."""
        ...


class Rebuild(Protocol):
    """Called per arch with the checksum file's bytes, once read: what is rebuilt (None when
    nothing can be, after reporting why)."""

    def __call__(self, directory: Path, arch: str, sums: bytes,
                 report: VerifyReport) -> Rebuilt | None: ...


def printable(text: str, limit: int = 300) -> str:
    """``text`` safe for a terminal: control and other non-printable characters escaped
    (``\\x1b``, ``\\n``, ``\\u202e``), at most ``limit`` characters."""
    out = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                  for ch in text[:limit + 1])
    return out if len(out) <= limit else out[:limit] + "..."


@dataclass(frozen=True)
class Problem:
    file: str  # base name in the release directory (or the directory itself)
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


@dataclass
class VerifyReport:
    directory: Path
    arches: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # files whose checks ran
    notes: list[str] = field(default_factory=list)
    signed: dict[str, bool] = field(default_factory=dict)  # arch → signature verified
    runtime: dict[str, list[str]] = field(default_factory=dict)  # arch → "file (what it holds)"
    signer: dict[str, str | None] = field(default_factory=dict)  # fingerprint → trust-file name
    provenance: dict[str, dict] = field(default_factory=dict)  # arch → its checked statement
    # What to do when it failed (a delta's problems each say which base or file to fetch).
    hint: str = "do not install from this directory; copy the named files again from the release"

    @property
    def passed(self) -> bool:
        return bool(self.arches) and not self.problems

    def add(self, file: str, message: str) -> None:
        # Names and messages can carry bytes from the media: escaped here, once for every check.
        problem = Problem(printable(file, 200), printable(message, 600))
        if problem not in self.problems:
            self.problems.append(problem)

    def note(self, message: str) -> None:
        self.notes.append(printable(message, 600))

    def summary(self) -> str:
        if self.passed:
            sig = ", ".join(f"{a}: {'signature verified' if ok else 'unsigned check'}"
                            for a, ok in self.signed.items())
            lines = [f"{self.directory}: OK ({len(self.checked)} files; {sig})"]
            lines += [f"  {arch}: the supervisor finds the runtime image in {', '.join(held)}"
                      for arch, held in self.runtime.items()]
            lines += [f"  signed by {fp}" + (f" ({name}, from the trust file)" if name else
                                             " (no name: no --trust file given)")
                      for fp, name in self.signer.items()]
            lines += [f"  {arch}: provenance {provenance.statement_name(arch)}: "
                      f"{len(provenance.subjects_of(doc))} subjects match; lock sha256 "
                      f"{provenance.lock_sha256(doc)}"
                      for arch, doc in self.provenance.items()]
        else:
            lines = [f"{self.directory}: {len(self.problems)} problem(s)"]
            lines += [f"  {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if self.passed:
            return
        if not self.arches:
            raise VerifyFailed(f"{self.directory}: no sha256sum-ARCH.txt: nothing to verify",
                               "copy the whole release directory, checksum files included")
        raise VerifyFailed(
            f"verify {self.directory}: {len(self.problems)} problem(s):\n  "
            + "\n  ".join(str(p) for p in self.problems), self.hint)


def _short(exc: BaseException) -> str:
    if isinstance(exc, BuilderError):
        return exc.message
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


# -- reading the media -------------------------------------------------------------------------

class NotRegular(BuilderError):
    """A release file is a symlink, FIFO, device or directory."""


@contextlib.contextmanager
def open_regular(path: Path) -> Iterator[BinaryIO]:
    """``path`` opened for reading if it is a regular file: a symlink is refused, not followed,
    and a FIFO cannot block the open; the check and the read use one descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            raise NotRegular("a symlink, not a regular file") from None
        raise BuilderError(f"cannot open: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegular("not a regular file (a device, FIFO or directory)")
        yield fh


class Rehash:
    """A read-only view of an open file that hashes each byte once, in file order, as a reader
    consumes it (a rewind to peek at the magic bytes is not hashed twice); ``finish`` hashes
    whatever the reader left unread and returns the digest of the whole file."""

    def __init__(self, fh: BinaryIO):
        self.fh, self.hash, self.pos, self.hashed = fh, hashlib.sha256(), 0, 0

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        end = self.pos + len(data)
        if end > self.hashed:
            self.hash.update(memoryview(data)[self.hashed - self.pos:])
            self.hashed = end
        self.pos = end
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        pos = self.fh.seek(offset, whence)
        if pos > self.hashed:
            raise BuilderError("a reader skipped bytes it did not read")
        self.pos = pos
        return pos

    def tell(self) -> int:
        return self.pos

    def finish(self) -> str:
        self.seek(self.hashed)
        while self.read(dg.CHUNK):
            pass
        return self.hash.hexdigest()


def _unchanged(rehash: Rehash, hex_value: str, name: str, report: VerifyReport) -> bool:
    actual = rehash.finish()
    if actual == hex_value:
        return True
    report.add(name, f"changed while it was being verified (first read matched, now {actual})")
    return False


# -- signature and checksums -------------------------------------------------------------------

def _read_small(path: Path, limit: int, what: str, report: VerifyReport) -> bytes | None:
    """A small release file's bytes (regular file, at most ``limit``), or None after reporting."""
    try:
        return checksums.read_regular(path, limit, what)
    except BuilderError as exc:
        report.add(path.name, exc.message.removeprefix(f"{path}: "))
        return None


def _check_signature(directory: Path, arch: str, sums: bytes | None, key: PublicKey | None,
                     require: bool, report: VerifyReport) -> None:
    """The signature over ``sums``: the bytes read once, which the checksum step then parses."""
    sums_path = directory / checksums.checksum_name(arch)
    sig = sums_path.with_name(sums_path.name + SIG_SUFFIX)
    report.signed[arch] = False
    if key is None:
        if require:
            report.add(sums_path.name, "a signature is required but no public key was given "
                                       "(pass --public-key)")
        elif os.path.lexists(sig):
            report.note(f"{sig.name} present but not checked (no --public-key)")
        return
    if not os.path.lexists(sig):
        report.add(sig.name, "missing: the checksum file is not signed")
        return
    signature = _read_small(sig, SIGNATURE_LIMIT, "signature", report)
    if signature is None or sums is None:
        return  # reported by _read_small
    try:
        verify_bytes(sums, signature, key, sums_path, sig)
        report.signed[arch] = True
    except BuilderError:
        report.add(sums_path.name, f"signature {sig.name} does not verify with the given public "
                                   "key (the file or signature changed, or another key signed it)")


@dataclass
class Vouched:
    """One arch's checksum step: what the checksum file lists, and what matched it."""

    readable: bool = False  # the checksum file was read and parsed
    listed: dict[str, str] = field(default_factory=dict)  # name → hex
    passed: dict[str, bytes | None] = field(default_factory=dict)  # name → bytes of a small file


def _hash_listed(path: Path) -> tuple[str, bytes | None]:
    """(hex, the bytes of a .txt list) of one listed file, read once as a regular file."""
    with open_regular(path) as fh:
        if path.name.endswith(".txt"):
            data = fh.read(LIST_LIMIT + 1)
            if len(data) > LIST_LIMIT:
                raise BuilderError(f"larger than {LIST_LIMIT} bytes: not an image list")
            return hashlib.sha256(data).hexdigest(), data
        return dg.hex_of(dg.of_stream(fh)[0]), None


def _check_sums(directory: Path, arch: str, sums: bytes, report: VerifyReport,
                rebuilt: Rebuilt | None = None) -> Vouched:
    """Check every listed file against ``sums`` (the checksum file's bytes); those in ``rebuilt``
    are not looked for here (their rebuilt bytes are hashed when they are read)."""
    sums_name = checksums.checksum_name(arch)
    out = Vouched()
    try:
        entries = checksums.parse(sums.decode("ascii"), sums_name)
    except UnicodeDecodeError as exc:
        report.add(sums_name, f"not ASCII text at byte {exc.start}")
        return out
    except BuilderError as exc:
        report.add(sums_name, exc.message.removeprefix(f"{sums_name}: ")
                   .removeprefix(f"{sums_name} "))
        return out
    out.readable = True
    for entry in entries:
        name = entry.name
        out.listed[name] = entry.hex
        if arch_of(name) != arch or SUMS_PATTERN.fullmatch(name):
            report.add(name, f"listed in {sums_name} but not a linux-{arch} artifact "
                             f"(NAME.linux-{arch}.*)")
            continue
        if rebuilt is not None and name in rebuilt.files:
            if name in rebuilt.ready:
                out.passed[name] = None
            continue
        path = directory / name
        if not os.path.lexists(path):
            report.add(name, f"listed in {sums_name} but missing")
            continue
        try:
            actual, data = _hash_listed(path)
        except BuilderError as exc:
            report.add(name, exc.message)
            continue
        if actual != entry.hex:
            report.add(name, f"checksum mismatch: {sums_name} says {entry.hex}, file has {actual}")
            continue
        out.passed[name] = data
        report.checked.append(name)
    return out


def _check_unlisted(directory: Path, arches: list[str], vouched: dict[str, Vouched],
                    report: VerifyReport, extra: frozenset[str] = frozenset()) -> None:
    """Every entry of the directory is listed by the checksum file of its arch, or is a checksum
    file or signature: anything else is something nobody vouched for (an added install.sh too)."""
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        name = entry.name
        if name.startswith("."):
            continue  # the build's own state (.build-state.json); never read by install.sh
        if name in BUILD_ONLY_DIRS and entry.is_dir(follow_symlinks=False):
            continue
        if name in extra:
            continue  # a delta file the rebuild check read (builder.trust.delta)
        arch = arch_of(name)
        if (SUMS_PATTERN.fullmatch(name) or name == provenance.envelope_name(arch or "")) \
                and arch is not None:
            if arch in arches and not entry.is_file(follow_symlinks=False) \
                    and not any(p.file == name for p in report.problems):
                report.add(name, "not a regular file (a symlink, device or directory)")
            continue
        if arch is not None and (arch not in arches or not vouched[arch].readable):
            continue  # another arch's file, or one whose checksum file is reported already
        if arch is None:
            report.add(name, "not listed in any checksum file: a file nobody vouched for "
                             "(remove it; take files only from the release)")
        elif name not in vouched[arch].listed:
            report.add(name, f"not listed in {checksums.checksum_name(arch)}: an artifact "
                             "nobody vouched for")


# -- archives ----------------------------------------------------------------------------------

def _check_archive(path: Path, arch: str, hex_value: str, report: VerifyReport,
                   lookup: RuntimeLookup | None = None,
                   unzstd: dict[str, LayerSeen] | None = None,
                   rebuilt: Rebuilt | None = None) -> ArchiveContents | None:
    """One archive: its blobs and trees, platforms, carried signatures and converted images.
    ``unzstd``: zstd blobs (by digest) already decompressed in an earlier archive of this run,
    which this one adds to once every blob of it hashed to its name. ``rebuilt``: where the
    bytes come from when the directory does not hold the archive."""
    probe = _LayerProbe(lookup, unzstd if unzstd is not None else {})
    opener = rebuilt.open if rebuilt is not None and path.name in rebuilt.files else open_regular
    try:
        with opener(path) as fh:
            rehash = Rehash(fh)
            contents = read_archive(path, verify=True, stream=rehash,  # type: ignore[arg-type]
                                    probe=probe)
            if opener is open_regular:
                if not _unchanged(rehash, hex_value, path.name, report):
                    return None
            elif (actual := rehash.finish()) != hex_value:  # the pieces each matched their line
                report.add(path.name, f"the pieces rebuild it with sha256 {actual}, its checksum "
                                      f"file lists {hex_value}")
                return None
    except Exception as exc:  # corrupt zstd/deflate streams raise non-Builder errors
        report.add(path.name, f"archive check failed: {_short(exc).removeprefix(f'{path}: ')}")
        return None
    if opener is not open_regular:
        report.checked.append(path.name)  # rebuilt, and its sha256 the one listed
    probe.known.update(probe.layers)  # every blob hashed to its name: its diff_id holds anywhere
    want = m.Platform.for_arch(arch)
    for img in contents.images:
        platform = img.platform
        if platform is None:
            # `docker save` style index.json without platforms: the config says it.
            try:
                platform = config_platform(contents.json, img.manifest_digest, path.name)
            except Exception as exc:
                report.add(path.name, f"{img.name}: no platform in index.json and none readable "
                                      f"from its config: {_short(exc)}")
                continue
        if not platform.matches(want):
            report.add(path.name, f"{img.name}: platform {platform}, expected {want} "
                                  f"for a linux-{arch} archive")
        signed_for = img.manifest_digest
        registry = img.annotations.get(REGISTRY_MANIFEST)
        if registry is not None:
            for problem in check_converted(img, contents.json, probe.layers):
                report.add(path.name, f"{img.name}: {problem}")
            # A signature is over the registry's digest: the chain just checked ties it to
            # the converted image that ships.
            signed_for = registry if dg.is_digest(registry) else signed_for
        carried = cosign.check_archived(img.name, signed_for, img.annotations, contents.json)
        if carried is not None:
            report.add(path.name, f"{img.name}: {carried}")
    if not contents.images:
        report.add(path.name, "holds no images")
    return contents


# -- converted images (the zstd layer mode) --------------------------------------------------------

class _LayerProbe:
    """What ``read_archive`` shows each blob as it streams: the runtime lookup's (if any), then
    every zstd blob decompressed and hashed, with the rke2/k3s decoder's window cap, so the
    converted images' diff_ids are checked in the same single read, with bounded memory.
    ``layers``: this archive's zstd blobs by digest; ``known``: those of earlier archives."""

    def __init__(self, lookup: RuntimeLookup | None, known: dict[str, LayerSeen]):
        self.lookup, self.known = lookup, known
        self.layers: dict[str, LayerSeen] = {}

    def __call__(self, member: str, docker: Any, fh: BinaryIO) -> None:
        head = Rewind(fh)
        seen = self.lookup.probe(member, docker, head) if self.lookup else None  # type: ignore[arg-type]
        digest = blob_digest(member)
        if digest is None or not head.head.startswith(ZSTD_MAGIC) or digest in self.layers:
            return
        self.layers[digest] = self.known.get(digest) or seen or unzstd_layer(member, head)


def unzstd_layer(member: str, fh: Rewind) -> LayerSeen:
    """A zstd layer's diff_id (the sha256 of its decompressed bytes, every frame), or why it
    has none: a frame whose window is larger than the rke2/k3s decoder accepts (ZSTD_MAX_WINDOW)
    is refused from its header, as that decoder refuses it, before anything is decompressed."""
    seen = LayerSeen(member)
    try:
        window = zstandard.get_frame_parameters(fh.head).window_size
        if window > ZSTD_MAX_WINDOW:
            seen.error = (f"its zstd frame needs a {window}-byte window (2**{window.bit_length() - 1}"
                          f"), more than the {ZSTD_MAX_WINDOW} (2**25) the rke2/k3s decoder accepts")
            return seen
        digest = hashlib.sha256()
        dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        with dctx.stream_reader(fh, read_size=CHUNK, closefd=False,  # type: ignore[arg-type]
                                read_across_frames=True) as reader:
            while chunk := reader.read(CHUNK):
                digest.update(chunk)
        seen.diff_id = "sha256:" + digest.hexdigest()
    except zstandard.ZstdError as exc:
        seen.error = f"not a zstd stream the rke2/k3s decoder reads: {exc}"
    return seen


def _image_manifest(blobs: dict[str, bytes], digest: str, what: str) -> m.Manifest:
    raw = blobs.get(digest)
    if raw is None:
        raise BuilderError(f"{what} {digest} is not in the archive")
    doc = parse_document(raw, f"{what} {digest}")
    if isinstance(doc, m.Index):
        raise BuilderError(f"{what} {digest} is an index, expected an image manifest")
    return doc


def check_converted(img: ArchivedImage, blobs: dict[str, bytes],
                    layers: dict[str, LayerSeen]) -> list[str]:
    """What is wrong with an image shipped in the zstd layer mode (its index.json entry names
    the registry manifest it was converted from): the chain a signature over the registry
    digest needs. The carried registry manifest is in the archive (the reader hashed it to its
    name); it and the converted manifest name the same config and as many layers; each layer
    is tar+zstd, names the registry layer at its position, and decompresses to the config's
    diff_id there. ``blobs``: the archive's JSON blobs; ``layers``: its zstd blobs, read."""
    registry = img.annotations[REGISTRY_MANIFEST]
    if not dg.is_digest(registry):
        return [f"annotation {REGISTRY_MANIFEST} {registry!r:.80} is not a sha256 digest"]
    try:
        converted = _image_manifest(blobs, img.manifest_digest, "converted manifest")
        source = _image_manifest(blobs, registry, f"carried registry manifest ({REGISTRY_MANIFEST})")
    except BuilderError as exc:
        return [exc.message]
    named = converted.annotations.get(REGISTRY_MANIFEST)
    if named is None:
        return [f"manifest {img.manifest_digest} names no registry manifest (no {REGISTRY_MANIFEST} "
                f"annotation): not a converted image, though index.json says it was converted "
                f"from {registry}"]
    if named != registry:
        return [f"converted manifest {img.manifest_digest} was converted from {named}, "
                f"index.json says from {registry}"]
    if converted.config.digest != source.config.digest:
        return [f"converted manifest {img.manifest_digest} names config {converted.config.digest}, "
                f"the registry manifest {registry} names {source.config.digest}"]
    if len(converted.layers) != len(source.layers):
        return [f"converted manifest {img.manifest_digest} has {len(converted.layers)} layers, "
                f"the registry manifest {registry} has {len(source.layers)}"]
    try:
        config = m.parse_config(blobs[converted.config.digest], f"config {converted.config.digest}")
    except (KeyError, TypeError, ValueError, AttributeError, BuilderError):
        return [f"config {converted.config.digest} is not a readable image config"]
    if len(config.diff_ids) != len(converted.layers):
        return [f"config {converted.config.digest} has {len(config.diff_ids)} rootfs.diff_ids for "
                f"{len(converted.layers)} layers"]
    problems = []
    for i, (layer, origin, diff_id) in enumerate(zip(converted.layers, source.layers,
                                                     config.diff_ids, strict=True)):
        at = f"layer {i} ({layer.digest})"
        if layer.media_type != m.OCI_LAYER_ZSTD:
            problems.append(f"{at}: media type {layer.media_type!r}, expected {m.OCI_LAYER_ZSTD!r}")
        traced = layer.annotations.get(REGISTRY_LAYER)
        if traced != origin.digest:
            problems.append(f"{at}: annotation {REGISTRY_LAYER} is {traced}, expected "
                            f"{origin.digest} (layer {i} of the registry manifest {registry})")
        seen = layers.get(layer.digest)
        if seen is None:
            problems.append(f"{at}: not a zstd stream (no zstd frame at its start)")
        elif seen.error is not None:
            problems.append(f"{at}: {seen.error}")
        elif seen.diff_id != diff_id:
            problems.append(f"{at}: decompresses to {seen.diff_id}, expected {diff_id} (the "
                            f"config's rootfs.diff_ids[{i}])")
    return problems


def _lines(name: str, data: bytes, report: VerifyReport) -> list[str] | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        report.add(name, f"not UTF-8 text at byte {exc.start}")
        return None
    if text and not text.endswith("\n"):
        report.add(name, "last line has no newline (truncated?)")
    return [line for line in text.split("\n") if line]


def config_platform(blobs: dict[str, bytes], manifest: str, where: str) -> m.Platform:
    """The platform an image's config says (for archives whose index.json names none)."""
    if manifest not in blobs:
        raise BuilderError(f"{where}: manifest {manifest} not in the archive")
    doc = parse_document(blobs[manifest], f"{where}: {manifest}")
    if isinstance(doc, m.Index):
        raise BuilderError(f"{where}: {manifest} is an index, expected an image manifest")
    if doc.config.digest not in blobs:
        raise BuilderError(f"{where}: config {doc.config.digest} not in the archive")
    return m.parse_config(blobs[doc.config.digest], f"{where}: {doc.config.digest}").platform


# -- bundle ------------------------------------------------------------------------------------

def read_release_env(bundle: Path, stream: BinaryIO | None = None) -> tuple[str, dict[str, str]]:
    """(member name, values) of the bundle's ``share/NAME/release.env``; members are checked.

    ``stream`` reads already-opened bytes (``bundle`` then only names it). The file must be
    exactly what the builder writes: one ``KEY='value'`` line per known key, each once, values of
    reference/digest characters only (install.sh reads it with the shell).
    """
    found: list[tuple[str, bytes]] = []
    with open_maybe_compressed(stream if stream is not None else bundle) as raw, \
            open_tar_stream(raw) as tar:
        for info in members(tar, str(bundle)):
            clean = posixpath.normpath(info.name)
            if info.name.startswith("/") or clean == ".." or clean.startswith("../"):
                raise BuilderError(f"member {info.name!r:.200} leaves the bundle root")
            if info.issym() or info.islnk():
                target = posixpath.normpath(posixpath.join(posixpath.dirname(clean), info.linkname))
                if info.linkname.startswith("/") or target.startswith(".."):
                    raise BuilderError(f"link {info.name!r:.200} points outside the bundle")
            parts = clean.split("/")
            if len(parts) == 3 and parts[0] == "share" and parts[2] == RELEASE_ENV and info.isfile():
                if info.size > RELEASE_ENV_LIMIT:
                    raise BuilderError(f"{clean} is larger than {RELEASE_ENV_LIMIT} bytes")
                if found:
                    raise BuilderError(f"holds more than one share/*/release.env ({found[0][0]}, "
                                       f"{clean})")
                fh = tar.extractfile(info)
                assert fh is not None
                found.append((clean, fh.read()))
    if len(found) != 1:
        raise BuilderError("holds no share/*/release.env, expected exactly one")
    name, raw_env = found[0]
    return name, parse_release_env(raw_env, name)


def parse_release_env(raw: bytes, name: str = "release.env") -> dict[str, str]:
    """The values of a release.env, strictly (see ``read_release_env``)."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise BuilderError(f"{name}: not ASCII text at byte {exc.start}") from None
    if not text.endswith("\n"):
        raise BuilderError(f"{name}: empty, or the last line has no newline (truncated?)")
    values: dict[str, str] = {}
    for number, line in enumerate(text.split("\n")[:-1], 1):
        mt = _ENV_LINE.fullmatch(line)
        if mt is None:
            raise BuilderError(f"{name} line {number}: expected KEY='value' (value of letters, "
                               f"digits and ._:/@+- and spaces), got {line[:80]!r}")
        key, value = mt["key"], mt["value"]
        if key not in RELEASE_ENV_KEYS:
            raise BuilderError(f"{name} line {number}: unknown key {key}",
                               f"release.env holds {', '.join(RELEASE_ENV_KEYS)}")
        if key in values:
            raise BuilderError(f"{name} line {number}: {key} set twice")
        values[key] = " ".join(value.split())
    return values


def _read_bundle(directory: Path, arch: str, names: Names, vouched: Vouched,
                 report: VerifyReport) -> tuple[str, dict[str, str]] | None:
    """(member, values) of the bundle's release.env, or None after reporting why not. Read before
    the archives, so their one read can follow the supervisor's lookup of RUNTIME_IMAGE."""
    if names.bundle is None:
        report.add(checksums.checksum_name(arch), f"no bundle (NAME.linux-{arch}.tar.gz) listed")
        return None
    if names.bundle not in vouched.passed:
        return None  # its checksum failed (reported): its content is nobody's word
    bundle = directory / names.bundle
    try:
        with open_regular(bundle) as fh:
            rehash = Rehash(fh)
            found = read_release_env(bundle, stream=rehash)  # type: ignore[arg-type]
            if not _unchanged(rehash, vouched.listed[names.bundle], names.bundle, report):
                return None
    except Exception as exc:
        report.add(names.bundle, f"release.env unreadable: {_short(exc)}")
        return None
    return found


def _runtime_lookup(release: tuple[str, dict[str, str]] | None,
                    known: dict[str, LayerSeen]) -> RuntimeLookup | None:
    """A fresh lookup of RUNTIME_IMAGE for one archive read (None when release.env has none
    usable: that is reported by the bundle check); ``known``: layers read by earlier lookups."""
    image = release[1].get("RUNTIME_IMAGE", "") if release else ""
    try:
        return RuntimeLookup(image, known=known) if image else None
    except ValueError:
        return None


def _check_bundle(arch: str, names: Names, release: tuple[str, dict[str, str]] | None,
                  contents: dict[str, ArchiveContents], report: VerifyReport) -> None:
    if release is None or names.bundle is None:
        return  # reported by _read_bundle
    member, env = release
    where, bundle = f"{member}", names.bundle  # a local: the closure keeps it narrowed to str

    def bad(message: str) -> None:
        report.add(bundle, f"{where}: {message}")

    missing = [k for k in RELEASE_ENV_KEYS if k not in env]
    if missing:
        bad(f"missing {', '.join(missing)}")
        return
    if env["RELEASE_ARCH"] != arch:
        bad(f"RELEASE_ARCH is {env['RELEASE_ARCH']!r}, expected {arch!r} (file name)")
    if env["RELEASE_NAME"] != names.release:
        bad(f"RELEASE_NAME is {env['RELEASE_NAME']!r}, the bundle is named for {names.release!r}")
    if member != release_env_member(env["RELEASE_NAME"]):
        bad(f"expected at {release_env_member(env['RELEASE_NAME'])}")
    image = env["RUNTIME_IMAGE"]
    if ":" not in image.rsplit("/", 1)[-1]:
        bad(f"RUNTIME_IMAGE {image!r} has no tag")
    elif env["DATA_KEY"] != data_key(image):
        bad(f"DATA_KEY is {env['DATA_KEY']!r}, expected {data_key(image)!r} "
            "(tag-sha256(RUNTIME_IMAGE)[:12])")
    for key in ("RUNTIME_ARCHIVE", "DEFAULT_IMAGES"):
        base = env[key]
        if not base.endswith(f".linux-{arch}") or base not in names.archives:
            bad(f"{key} names {base!r}, which is not an image archive of this release for {arch}")
    groups = env["IMAGE_GROUPS"].split()
    group_bases = {images_base(names.release or "", arch, g) for g in groups}
    present = {b for b in names.archives if b != env["DEFAULT_IMAGES"]}
    for b in sorted(group_bases - set(names.archives)):
        bad(f"IMAGE_GROUPS names {b}, which is not here")
    for b in sorted(present - group_bases):
        bad(f"archive {b} is not in IMAGE_GROUPS")
    _check_runtime(arch, names, env, contents, bad, report)


def _check_runtime(arch: str, names: Names, env: dict[str, str],
                   contents: dict[str, ArchiveContents], bad: Callable[[str], None],
                   report: VerifyReport) -> None:
    """The runtime image: in RUNTIME_ARCHIVE (every readable compression) with RUNTIME_MANIFEST,
    whose layers are RUNTIME_LAYERS."""
    image, base, manifest = env["RUNTIME_IMAGE"], env["RUNTIME_ARCHIVE"], env["RUNTIME_MANIFEST"]
    if not dg.is_digest(manifest):
        bad(f"RUNTIME_MANIFEST {manifest!r} is not a sha256 digest")
        return
    source: str | None = None
    for file in names.archives.get(base, []):
        held = contents.get(file)
        if held is None:
            continue  # unreadable or not vouched for: already reported for that file
        hits = [i for i in held.images if i.name == image]
        if not hits:
            bad(f"RUNTIME_IMAGE {image} is not in {file}")
        elif hits[0].manifest_digest != manifest:
            bad(f"RUNTIME_MANIFEST is {manifest}, {file} holds {image} as "
                f"{hits[0].manifest_digest}")
        elif source is None:
            source = file
    if source is None:
        return
    try:
        raw = contents[source].json.get(manifest)
        if raw is None:
            raise BuilderError(f"has no blob {manifest}")
        doc = parse_document(raw, f"{source}: {manifest}")
    except Exception as exc:
        report.add(source, f"runtime manifest {manifest}: {_short(exc)}")
        return
    if isinstance(doc, m.Index):
        report.add(source, f"runtime manifest {manifest} is an index, not an image")
        return
    layers = [d.digest for d in doc.layers]
    if env["RUNTIME_LAYERS"].split() != layers:
        bad(f"RUNTIME_LAYERS is {env['RUNTIME_LAYERS']!r}, the manifest in {source} has "
            f"{' '.join(layers)!r}")


# -- the supervisor's lookup ---------------------------------------------------------------------

def runtime_holders(names: Names, env: dict[str, str],
                    contents: dict[str, ArchiveContents]) -> list[str]:
    """The archive files that must hold the runtime image, sorted: RUNTIME_ARCHIVE and
    DEFAULT_IMAGES (install.sh installs the latter by default and stages the runtime from either),
    and every archive whose index.json names the image (what containerd imports, the supervisor
    must find too); each in both compressions."""
    image = env.get("RUNTIME_IMAGE", "")
    bases = {env.get("RUNTIME_ARCHIVE", ""), env.get("DEFAULT_IMAGES", "")}
    bases |= {b for b, files in names.archives.items()
              if any(file in contents and any(i.name == image for i in contents[file].images)
                     for file in files)}
    return sorted(file for b in bases for file in names.archives.get(b, []))


def _check_runtime_lookup(arch: str, names: Names, env: dict[str, str],
                          contents: dict[str, ArchiveContents], lookups: dict[str, LookupResult],
                          report: VerifyReport) -> None:
    """Every archive that should hold the runtime yields it to the supervisor's lookup; so does
    every other archive that holds it (the supervisor tries the archives in no fixed order)."""
    image = env.get("RUNTIME_IMAGE", "")
    try:
        tag_name(image)
    except BadName as exc:
        report.add(names.bundle or checksums.checksum_name(arch),
                   f"RUNTIME_IMAGE {image!r} is not a reference the supervisor can parse ({exc}): "
                   "no archive can hold it under that name")
        return
    should = runtime_holders(names, env, contents)
    held: list[str] = []
    for file in sorted(set(should) | {f for f, r in lookups.items() if r.matched}):
        result = lookups.get(file)
        if result is None:
            continue  # missing, not vouched for or unreadable: reported for that file already
        if result.problems:
            if file in should or result.matched:
                for problem in result.problems:
                    report.add(file, f"runtime image {image}, as the supervisor looks it "
                                     f"up: {problem}")
            continue
        held.append(f"{file} ({result.summary})")
    if held:
        report.runtime[arch] = held


# -- provenance and signer ---------------------------------------------------------------------

def _name_signer(key: PublicKey, trust: dict[str, str] | None, report: VerifyReport) -> None:
    """The key's fingerprint and, from the operator's trust file, whose it is; with a trust
    file, a key it does not name is a problem (whoever signed, the operator did not vouch)."""
    fp = provenance.fingerprint(key)
    name = (trust or {}).get(fp)
    report.signer[fp] = name
    if trust is not None and name is None:
        report.add("--public-key", f"key {fp} is not in the trust file: nobody this operator "
                                   "trusts is known to hold it")


def _check_provenance(directory: Path, arch: str, vouched: Vouched, key: PublicKey | None,
                      require: bool, lock_sha256: str | None, report: VerifyReport) -> None:
    """The statement against the checksum file (its subjects are exactly the other listed
    artifacts, digests equal), the lock it names, and its DSSE envelope with the release key."""
    name, env_name = provenance.statement_name(arch), provenance.envelope_name(arch)
    sums_name = checksums.checksum_name(arch)
    if name not in vouched.listed:
        if os.path.lexists(directory / env_name) or lock_sha256:
            report.add(sums_name, f"lists no provenance statement {name}")
        else:
            report.note(f"{arch}: no provenance statement {name} (built before provenance?)")
        return
    if name not in vouched.passed:
        return  # missing or checksum failed: reported by the checksum step
    raw = _read_small(directory / name, provenance.STATEMENT_LIMIT, "provenance statement", report)
    if raw is None:
        return
    if hashlib.sha256(raw).hexdigest() != vouched.listed[name]:
        report.add(name, "changed while it was being verified")
        return
    try:
        doc = provenance.parse_statement(raw, name)
    except BuilderError as exc:
        report.add(name, exc.message.removeprefix(f"{name}: "))
        return
    ok = _check_subjects(name, provenance.subjects_of(doc), vouched.listed, sums_name, report)
    named = provenance.lock_sha256(doc)
    if lock_sha256 is not None and named != lock_sha256:
        report.add(name, f"built from a lock with sha256 {named}, not the --lock file's "
                         f"{lock_sha256}")
        ok = False
    if _check_envelope(directory, env_name, raw, key, report) and ok:
        report.provenance[arch] = doc


def _check_subjects(name: str, subjects: dict[str, str], listed: dict[str, str], sums_name: str,
                    report: VerifyReport) -> bool:
    before = len(report.problems)
    for subject, hex_value in sorted(subjects.items()):
        if subject not in listed:
            report.add(name, f"subject {subject} is not listed in {sums_name}")
        elif listed[subject] != hex_value:
            report.add(name, f"subject {subject}: the statement says sha256 {hex_value}, "
                             f"{sums_name} {listed[subject]}")
    for artifact in sorted(set(listed) - set(subjects) - {name}):
        report.add(name, f"artifact {artifact} is not a subject of the statement")
    return len(report.problems) == before


def _check_envelope(directory: Path, env_name: str, statement: bytes, key: PublicKey | None,
                    report: VerifyReport) -> bool:
    """True when the statement's DSSE envelope verifies with ``key`` over these very bytes (or
    no key was given: then there is nothing to check it with, and the note says so)."""
    path = directory / env_name
    if key is None:
        if os.path.lexists(path):
            report.note(f"{env_name} present but not checked (no --public-key)")
        return True
    if not os.path.lexists(path):
        report.add(env_name, "missing: the provenance statement is not signed (run `sign`)")
        return False
    raw = _read_small(path, provenance.ENVELOPE_LIMIT, "provenance envelope", report)
    if raw is None:
        return False
    try:
        opened = provenance.open_envelope(raw, key, env_name)
    except BuilderError as exc:
        report.add(env_name, exc.message.removeprefix(f"{env_name}: "))
        return False
    if opened.payload != statement:
        report.add(env_name, "signs other bytes than the provenance statement listed here")
        return False
    return True


# -- one arch ----------------------------------------------------------------------------------

def _check_archives(directory: Path, arch: str, names: Names, vouched: Vouched,
                    report: VerifyReport, release: tuple[str, dict[str, str]] | None = None,
                    rebuilt: Rebuilt | None = None,
                    ) -> tuple[dict[str, ArchiveContents], dict[str, LookupResult]]:
    """Each vouched-for archive, the two compressions alike, and each archive's .txt list; with
    ``release``, the supervisor's lookup of its runtime image in each archive, in the same read."""
    contents: dict[str, ArchiveContents] = {}
    lookups: dict[str, LookupResult] = {}
    known: dict[str, LayerSeen] = {}
    unzstd: dict[str, LayerSeen] = {}  # zstd blobs read so far, by digest (each read once)
    for base, files in sorted(names.archives.items()):
        for suffix in ARCHIVE_SUFFIXES:
            if f"{base}{suffix}" not in files:
                report.add(f"{base}{suffix}", "missing: every image archive comes as "
                                              ".tar.zst and .tar.gz")
        held: dict[str, list[tuple[str, str]]] = {}
        for file in files:
            if file not in vouched.passed:
                continue  # missing or checksum failed: reported by the checksum step
            lookup = _runtime_lookup(release, known)
            found = _check_archive(directory / file, arch, vouched.listed[file], report, lookup,
                                   unzstd, rebuilt)
            if found is not None:
                contents[file] = found
                if lookup is not None:
                    lookups[file] = lookup.result(found.json)
                held[file] = sorted((i.name, i.manifest_digest) for i in found.images)
        if len({tuple(v) for v in held.values()}) > 1:
            report.add(files[0], f"{' and '.join(sorted(held))} hold different images")
        txt = names.lists.get(base)
        if txt is None:
            report.add(f"{base}.txt", "missing: every archive has a .txt list of its images")
            continue
        data = vouched.passed.get(txt)
        lines = None if data is None else _lines(txt, data, report)
        if lines is None:
            continue
        if len(set(lines)) != len(lines):
            report.add(txt, "lists an image twice")
        for file, pairs in sorted(held.items()):
            in_archive = sorted(n for n, _ in pairs)
            if sorted(lines) != in_archive:
                report.add(txt, f"lists {sorted(set(lines) - set(in_archive)) or 'no extra'}"
                                f" not in {file}, and misses {sorted(set(in_archive) - set(lines)) or 'nothing'}")
    return contents, lookups


def _check_union(arch: str, names: Names, vouched: Vouched, report: VerifyReport) -> None:
    if names.all_list is None:
        if names.lists:
            report.add(all_list_name(names.release or "NAME", arch), "missing")
        return
    parts = [vouched.passed.get(t) for t in [names.all_list, *names.lists.values()]]
    if any(p is None for p in parts):
        return  # a list failed its checksum (reported): the union cannot be judged
    lists = [_lines(t, p, report) for t, p in zip([names.all_list, *names.lists.values()],
                                                   parts, strict=True) if p is not None]
    if any(x is None for x in lists):
        return
    lines, union = lists[0], {line for x in lists[1:] for line in x or []}
    if lines != sorted(union):
        report.add(names.all_list, "is not the sorted union of the per-archive lists "
                                   f"(extra {sorted(set(lines or []) - union)}, "
                                   f"missing {sorted(union - set(lines or []))})")


def _verify_arch(directory: Path, arch: str, key: PublicKey | None, require: bool,
                 report: VerifyReport, lock_sha256: str | None = None,
                 rebuild: Rebuild | None = None) -> tuple[Vouched, Rebuilt | None]:
    sums_path = directory / checksums.checksum_name(arch)
    sums: bytes | None = None
    if not os.path.lexists(sums_path):
        report.add(sums_path.name, "missing: nothing vouches for this arch's artifacts")
    else:
        sums = _read_small(sums_path, checksums.SIZE_LIMIT, "checksum file", report)
    _check_signature(directory, arch, sums, key, require, report)
    if sums is None:
        return Vouched(), None
    rebuilt = rebuild(directory, arch, sums, report) if rebuild is not None else None
    vouched = _check_sums(directory, arch, sums, report, rebuilt)
    if not vouched.listed:
        return vouched, rebuilt
    _check_provenance(directory, arch, vouched, key, require, lock_sha256, report)
    names = classify(arch, vouched.listed)
    release = _read_bundle(directory, arch, names, vouched, report)
    contents, lookups = _check_archives(directory, arch, names, vouched, report, release, rebuilt)
    _check_union(arch, names, vouched, report)
    _check_bundle(arch, names, release, contents, report)
    if release is not None:
        _check_runtime_lookup(arch, names, release[1], contents, lookups, report)
    return vouched, rebuilt


def verify_release(directory: Path, arches: Iterable[str] | None = None,
                   public_key: Path | PublicKey | None = None,
                   require_signature: bool = False, trust: dict[str, str] | None = None,
                   lock: Path | None = None, rebuild: Rebuild | None = None) -> VerifyReport:
    """Check a release directory; returns the report (``raise_if_failed`` for an exception).
    ``trust`` (fingerprint → name, builder.trust.trustfile) names the signer and, when given, must
    know the key; ``lock``: the provenance must name this lock file's sha256. ``rebuild``: the
    directory is a delta directory, its archives rebuilt by this (builder.trust.delta)."""
    directory = Path(directory)
    report = VerifyReport(directory)
    if not directory.is_dir():
        report.add(str(directory), "not a directory")
        return report
    key = load_public_key(public_key) if isinstance(public_key, Path) else public_key
    wanted = list(dict.fromkeys(arches or [])) or discover_arches(directory)
    for arch in wanted:
        if arch not in KNOWN_ARCHES:
            raise BuilderError(f"unknown arch {printable(arch, 40)!r}",
                               f"known arches: {', '.join(KNOWN_ARCHES)}")
    if rebuild is None:
        _refuse_delta(directory, wanted)
    report.arches = wanted
    lock_sha256 = dg.of_file(lock)[0] if lock is not None else None
    checked = {arch: _verify_arch(directory, arch, key, require_signature, report, lock_sha256,
                                  rebuild) for arch in wanted}
    vouched = {arch: v for arch, (v, _) in checked.items()}
    extra = frozenset(name for _, r in checked.values() if r is not None for name in r.extra)
    if key is not None:
        _name_signer(key, trust, report)
    if wanted:
        _check_unlisted(directory, wanted, vouched, report, extra)
    return report


def _refuse_delta(directory: Path, arches: list[str]) -> None:
    """A delta directory holds no image archives to check: they are rebuilt from the base."""
    for arch in arches:
        name = delta_description_name(arch)
        if os.path.lexists(directory / name):
            raise BuilderError(
                f"{directory}: a delta directory ({name}): its image archives are rebuilt from "
                "the release it updates, so it is checked against that release",
                f"give the base release's directory: verify {directory} --base PREV")
