"""The supervisor's runtime-image lookup, replayed on an image archive as a release check.

What the RKE2 supervisor does on first start (rancher/rke2 ``pkg/bootstrap`` at v1.32.13+rke2r1,
rancher/wharfie ``pkg/tarfile`` and ``pkg/extract``, go-containerregistry ``pkg/v1/tarball``,
``pkg/v1/mutate`` and ``pkg/name``):

1. It walks ``DATA_DIR/agent/images`` for files ending (any case) in ``.tar``, ``.tar.lz4``,
   ``.tar.bz2``, ``.tbz``, ``.tar.gz``, ``.tgz``, ``.tar.zst`` or ``.tzst`` (dot files skipped) and
   tries them in no fixed order (a Go map): the first that yields the image is used. So *every*
   archive that holds the runtime image must hold all of it, not only the one we expect it to use.
2. In one archive it reads the docker ``manifest.json`` (never ``index.json``), and goes through
   the entries in order and each entry's ``RepoTags`` in order, parsing each with go-containerregistry's
   weak ``name.NewTag`` and comparing the resolved names (``docker.io/rancher/rke2-runtime:T``,
   ``rancher/rke2-runtime:T`` and ``index.docker.io/rancher/rke2-runtime:T`` are one name). A tag
   that does not parse ends the lookup in that archive.
3. The entry's ``Config`` and ``Layers`` are tar member names matched exactly; the config's
   ``rootfs.diff_ids`` are the uncompressed layers in ``Layers`` order.
4. It flattens the layers top-down (whiteouts honoured, names cleaned of ``./``) and extracts
   ``/bin`` to ``data/KEY/bin`` and ``/charts`` to ``data/KEY/charts``; the server then copies
   ``data/KEY/charts`` into its manifests and stops when that directory is missing.

``RuntimeLookup`` follows those steps inside the one verifying read ``builder.oci.archive``
already does (its blob probe), so no archive is read twice: layers are decompressed as they
stream by, their members listed, their uncompressed sha256 computed.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import tarfile
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

from builder import digest as dg
from builder.errors import BuilderError
from builder.oci.archive import members, open_tar_stream
from builder.oci.compress import open_maybe_compressed
from builder.oci.model import load_json_object

# The file names wharfie's FindImage reads (compared without regard to case).
SUPERVISOR_SUFFIXES = (".tar", ".tar.lz4", ".tar.bz2", ".tbz", ".tar.gz", ".tgz", ".tar.zst", ".tzst")
EXTRACTED = ("bin", "charts")  # the image directories the supervisor stages
KEPT_ENTRIES = 100_000  # bin/ and charts/ entries remembered per layer (ours: a few dozen)
CHUNK = 1 << 20
WHITEOUT = ".wh."

# go-containerregistry pkg/name: the characters each element may hold (checked after splitting).
_TAG_CHARS = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_REPO_CHARS = re.compile(r"[a-z0-9_./-]{2,255}")
# An RFC 3986 authority as Go's url.Parse("//" + host).Host gives it back unchanged: a host name
# or IPv4 address, or a bracketed IPv6 address, with an optional port.
_REGISTRY = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?")
DEFAULT_REGISTRY = "index.docker.io"


class BadName(ValueError):
    """A RepoTags entry the supervisor's reference parser refuses (its reason in the message)."""


def tag_name(text: str) -> str:
    """go-containerregistry's ``name.NewTag(text).Name()`` with its default (weak) options.

    ``[registry/]repository[:tag]``: the registry is the first path component when it holds a
    '.' or ':' (``docker.io`` becomes ``index.docker.io``, none means ``index.docker.io``), a
    one-component repository on the default registry gains ``library/``, no tag means ``latest``.
    """
    base, tag = text, ""
    parts = text.split(":")
    if len(parts) > 1 and "/" not in parts[-1]:  # a port is not a tag
        base, tag = ":".join(parts[:-1]), parts[-1]
    if tag and not _TAG_CHARS.fullmatch(tag):
        raise BadName(f"tag {tag!r} is not 1-128 of [A-Za-z0-9_.-]")
    tag = tag or "latest"
    if not base:
        raise BadName("a repository name must be specified")
    registry, repo = "", base
    first, sep, rest = base.partition("/")
    if sep and ("." in first or ":" in first):
        registry, repo = first, rest
    if not _REPO_CHARS.fullmatch(repo):
        raise BadName(f"repository {repo!r} is not 2-255 of [a-z0-9_./-]")
    if registry and not _REGISTRY.fullmatch(registry):
        raise BadName(f"registry {registry!r} is not a URI authority")
    registry = DEFAULT_REGISTRY if registry in ("", "docker.io") else registry
    if registry == DEFAULT_REGISTRY and "/" not in repo:
        repo = f"library/{repo}"
    return f"{registry}/{repo}:{tag}"


def supervisor_reads(file_name: str) -> bool:
    """Whether the supervisor's archive walk would open a file of this name."""
    return not file_name.startswith(".") and file_name.lower().endswith(SUPERVISOR_SUFFIXES)


# -- one layer ---------------------------------------------------------------------------------

class Rewind:
    """A forward-only stream that can go back to its start while only its first bytes were read:
    ``open_maybe_compressed`` sniffs the magic and seeks back, which a blob streamed out of a
    compressed archive cannot do by itself."""

    HEAD = 18  # the longest zstd frame header, so its window can be read from the head alone

    def __init__(self, fh: BinaryIO):
        self.fh, self.head, self.pos = fh, fh.read(self.HEAD), 0

    def read(self, n: int = -1) -> bytes:
        if self.pos >= len(self.head):
            data = self.fh.read(n)
        else:
            data = self.head[self.pos:] if n < 0 else self.head[self.pos:self.pos + n]
            if n < 0:
                data += self.fh.read()
        self.pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0 or offset > len(self.head) or self.pos > len(self.head):
            raise OSError("a layer stream only rewinds over its first bytes")
        self.pos = offset
        return offset

    def tell(self) -> int:
        return self.pos


class _Hashing:
    """The uncompressed layer as tarfile reads it, hashed: its sha256 is the layer's diff_id.
    Reads are at most CHUNK bytes (a hostile layer can decompress to gigabytes)."""

    def __init__(self, fh: BinaryIO):
        self.fh, self.hash = fh, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(CHUNK if n < 0 else min(n, CHUNK))
        self.hash.update(data)
        return data


@dataclass
class LayerSeen:
    """One runtime layer as read: its diff_id and its entries under bin/ and charts/."""

    member: str
    diff_id: str | None = None
    entries: list[tuple[str, str]] = field(default_factory=list)  # (clean name, dir|file|other)
    error: str | None = None


def _kind(info: tarfile.TarInfo) -> str:
    return "dir" if info.isdir() else "file" if info.isfile() else "other"


def _relevant(name: str) -> bool:
    top = name.split("/", 1)[0]
    return top in EXTRACTED or top.removeprefix(WHITEOUT) in EXTRACTED


def read_layer(member: str, fh: BinaryIO) -> LayerSeen:
    """Decompress one layer (gzip, zstd or plain, by magic), list it, compute its diff_id."""
    seen = LayerSeen(member)
    try:
        with open_maybe_compressed(Rewind(fh)) as raw:  # type: ignore[arg-type]
            hashing = _Hashing(raw)
            with open_tar_stream(hashing) as tar:  # type: ignore[arg-type]
                for info in members(tar, member):
                    # mutate.Extract cleans each name (Go filepath.Clean); wharfie roots it at /.
                    name = posixpath.normpath(info.name).lstrip("/")
                    if _relevant(name):
                        if len(seen.entries) >= KEPT_ENTRIES:
                            raise BuilderError(f"more than {KEPT_ENTRIES} entries under "
                                               "bin/ and charts/")
                        seen.entries.append((name, _kind(info)))
            while hashing.read(CHUNK):  # the tar's end blocks and padding count for the diff_id
                pass
        seen.diff_id = "sha256:" + hashing.hash.hexdigest()
    except Exception as exc:  # corrupt gzip/zstd/tar: reported, never raised into the reader
        seen.error = exc.message if isinstance(exc, BuilderError) else \
            f"{type(exc).__name__}: {exc}"[:300]
    return seen


def flatten(layers: list[LayerSeen]) -> list[tuple[str, str]]:
    """What go-containerregistry's mutate.Extract yields from these layers (bottom first): the
    top layer wins, ``.wh.NAME`` hides NAME below, a non-directory hides everything under it."""
    marks: dict[str, bool] = {}  # name → hides what is below it
    out: list[tuple[str, str]] = []

    def hidden(name: str) -> bool:
        while (parent := posixpath.dirname(name)) != name and name:
            if marks.get(parent):
                return True
            name = parent
        return False

    for layer in reversed(layers):
        for name, kind in layer.entries:
            folder, base = posixpath.split(name)
            tombstone = base.startswith(WHITEOUT)
            key = name if kind == "dir" else posixpath.join(folder, base.removeprefix(WHITEOUT))
            if key in marks or hidden(key):
                continue
            marks[key] = tombstone or kind != "dir"
            if not tombstone:
                out.append((key, kind))
    return out


# -- one archive -------------------------------------------------------------------------------

@dataclass
class LookupResult:
    """What the supervisor would find in one archive."""

    matched: bool  # a manifest.json entry whose RepoTags resolve to the runtime reference
    problems: list[str]
    summary: str = ""  # e.g. "1 layer, bin/ 10 files, charts/ 0 manifests"


def blob_digest(member: str) -> str | None:
    hex_value = posixpath.basename(member)
    return dg.from_hex(hex_value) if dg.is_hex64(hex_value) else None


class RuntimeLookup:
    """The lookup of ``reference`` in one archive: pass ``probe`` to ``read_archive(verify=True)``,
    then ``result(contents.json)``. ``charts_required``: the release says its runtime has charts,
    so ``charts/*.yaml`` must exist (otherwise an empty ``charts/`` is enough).

    ``known`` is shared by the lookups of one verify run: a layer blob (by digest) already read
    in an archive whose every blob hashed to its name is not decompressed again, since the
    reader hashes it again here and the same bytes list and uncompress the same way (a release
    has each runtime layer in four archives per arch)."""

    def __init__(self, reference: str, charts_required: bool = False,
                 known: dict[str, LayerSeen] | None = None):
        self.reference = reference
        self.want = tag_name(reference)
        self.charts_required = charts_required
        self.known = known if known is not None else {}
        self.decided = False
        self.entry: dict[str, Any] | None = None
        self.position = 0  # 1-based index of the entry in manifest.json
        self.stopped: str | None = None  # why the lookup ended before a match
        self.early: list[str] = []  # blobs that came before manifest.json
        self.names: set[str] = set()  # blob member names as written, of the entry's files
        self.layers: dict[str, LayerSeen] = {}

    # -- during the read

    def probe(self, name: str, docker: Any, fh: BinaryIO) -> LayerSeen | None:
        """Look at one blob as the archive streams it; the layer read from it, if it was one of
        the runtime's (so a caller that also wants its diff_id need not read it again)."""
        if not self.decided:
            if docker is None:
                if len(self.early) < 3:
                    self.early.append(name)
                return None
            self._select(docker)
        if self.entry is None:
            return None
        wanted = self._layer_members()
        if name == self.entry.get("Config") or name in wanted:
            self.names.add(name)
        if name in wanted and name not in self.layers:
            digest = blob_digest(name)
            cached = self.known.get(digest) if digest else None
            self.layers[name] = replace(cached, member=name) if cached else read_layer(name, fh)
            return self.layers[name]
        return None

    def _select(self, docker: Any) -> None:
        """manifest.json's entries and RepoTags in order, as tarball.Image's findDescriptor."""
        self.decided = True
        if not isinstance(docker, list):
            self.stopped = "manifest.json is not a list of entries"
            return
        for position, entry in enumerate(docker, 1):
            tags = entry.get("RepoTags") if isinstance(entry, dict) else []
            if not isinstance(tags, list | None):  # Go's JSON decoder refuses the whole file
                self.stopped = f"manifest.json entry {position}: RepoTags is not a list"
                return
            for tag in tags or []:
                try:
                    resolved = tag_name(tag) if isinstance(tag, str) else None
                    if resolved is None:
                        raise BadName("not a string")
                except BadName as exc:
                    self.stopped = (f"manifest.json entry {position}: RepoTags value {tag!r:.120} "
                                    f"does not parse as a reference ({exc}); the supervisor's "
                                    "lookup stops there")
                    return
                if resolved == self.want:
                    self.entry, self.position = entry, position
                    return

    def _layer_members(self) -> list[str]:
        layers = self.entry.get("Layers") if self.entry else None
        return [x for x in layers if isinstance(x, str)] if isinstance(layers, list) else []

    # -- after the read

    def result(self, blobs: dict[str, bytes]) -> LookupResult:
        """The outcome; ``blobs`` are the JSON blobs the read kept (``ArchiveContents.json``).
        Call it only after ``read_archive`` returned: every blob then hashed to its name."""
        for name, seen in self.layers.items():
            if (digest := blob_digest(name)) and seen.error is None:
                self.known.setdefault(digest, seen)
        if self.stopped:
            return LookupResult(False, [self.stopped])
        if self.entry is None:
            if self.early and not self.decided:
                return LookupResult(False, [f"blob {self.early[0]} comes before manifest.json: "
                                            "not an archive this builder wrote"])
            return LookupResult(False, [f"manifest.json has no entry whose RepoTags resolve to "
                                        f"{self.want} (the supervisor's name for {self.reference})"])
        at = f"manifest.json entry {self.position}"
        diff_ids, problem = self._diff_ids(blobs, at)
        if problem:
            return LookupResult(True, [problem])
        layers = self._layer_members()
        problems = self._check_layers(layers, diff_ids, at)
        if problems:
            return LookupResult(True, problems)
        return self._check_content([self.layers[x] for x in layers], at)

    def _diff_ids(self, blobs: dict[str, bytes], at: str) -> tuple[list[str], str | None]:
        config = self.entry.get("Config") if self.entry else None
        if not isinstance(config, str) or config not in self.names:
            return [], f"{at}: Config {config!r:.120} is not a member of the archive (by exact name)"
        raw = blobs.get(dg.from_hex(posixpath.basename(config)))
        try:
            doc = load_json_object(raw, at) if raw is not None else None
        except (BuilderError, UnicodeDecodeError):
            doc = None
        ids = doc.get("rootfs", {}).get("diff_ids") if isinstance(doc, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            return [], f"{at}: config {config} has no rootfs.diff_ids list"
        return ids, None

    def _check_layers(self, layers: list[str], diff_ids: list[str], at: str) -> list[str]:
        """Each layer present by exact name, read, and uncompressing to its diff_id in order."""
        raw_layers = self.entry.get("Layers") if self.entry else None
        if not isinstance(raw_layers, list) or len(layers) != len(raw_layers):
            return [f"{at}: Layers is not a list of member names"]
        if not layers:
            return [f"{at} lists no layers: the supervisor would extract nothing (no bin/, "
                    "no charts/)"]
        problems = []
        if len(layers) != len(diff_ids):
            problems.append(f"{at} lists {len(layers)} layer(s), its config's rootfs.diff_ids "
                            f"has {len(diff_ids)} (a layer dropped or added)")
        for i, member in enumerate(layers):
            seen = self.layers.get(member)
            if member not in self.names or seen is None:
                problems.append(f"{at}: layer {i + 1} {member!r:.120} is not a member of the "
                                "archive (by exact name)")
            elif seen.error:
                problems.append(f"{at}: layer {i + 1} {member} does not read as a layer: "
                                f"{seen.error}")
            elif i < len(diff_ids) and seen.diff_id != diff_ids[i]:
                where = (f", which is diff_ids[{diff_ids.index(seen.diff_id)}]: layers out of order"
                         if seen.diff_id in diff_ids else "")
                problems.append(f"{at}: layer {i + 1} {member} uncompresses to {seen.diff_id}, "
                                f"the config's rootfs.diff_ids[{i}] is {diff_ids[i]}{where}")
        return problems

    def _check_content(self, layers: list[LayerSeen], at: str) -> LookupResult:
        files = flatten(layers)
        bins = [n for n, k in files if n.startswith("bin/") and k != "dir"]
        has_charts = any(n == "charts" or n.startswith("charts/") for n, _ in files)
        manifests = [n for n, k in files if k == "file" and posixpath.dirname(n) == "charts"
                     and n.endswith((".yaml", ".yml"))]
        problems = []
        if not bins:
            problems.append(f"{at}: no file under bin/ in its layers: the supervisor would stage "
                            "an empty data/KEY/bin")
        if not has_charts:
            problems.append(f"{at}: no charts/ in its layers: the server cannot copy "
                            "data/KEY/charts and stops")
        elif self.charts_required and not manifests:
            problems.append(f"{at}: charts/ holds no *.yaml manifests, but the release has charts")
        summary = (f"{len(layers)} layer{'s' if len(layers) != 1 else ''}, bin/ {len(bins)} "
                   f"file{'s' if len(bins) != 1 else ''}, charts/ {len(manifests)} "
                   f"manifest{'s' if len(manifests) != 1 else ''}")
        return LookupResult(True, problems, summary)
