"""images.lock: the one pinned description of a release.

People edit the intent (which components, which images in which groups, where files come from);
``python -m builder lock`` fills in the pins (sha256 of files, index and per-platform digests of
images). A pin that is ``null`` is *unresolved*: loading accepts it, building refuses it.

Loading validates everything and names the field at fault, e.g.
``images.lock: components.kubelet.arm64.sha256: expected 64 hex digits, got 'abc'``.
Dumping writes one canonical form, so re-locking with nothing new changes no byte.

The lock arrives by pull request, so loading treats it as hostile input (anyone who can open a
pull request can write it; tests/adversarial/test_lock.py holds each guard):
names that become file names are ASCII ``[a-z0-9][a-z0-9._-]*`` (never ``.``, ``..`` or a ``/``),
file modes carry no setuid/setgid/sticky/world-writable bit, plain-HTTP registries come only from
the host's mirrors file, every pattern matches the whole value, YAML anchors/aliases (the
"billion laughs") and absurd nesting are refused before anything expands, and error messages
show at most ``SHOW_MAX`` characters of any value.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args, overload
from urllib.parse import unquote, urlparse

import yaml

from builder import digest as dg
from builder.artifacts import KNOWN_ARCHES
from builder.errors import HOST_MIRRORS_HINT, LockError, UnresolvedError
from builder.oci import reference
from builder.store import read_named, write_atomic

SCHEMA = 1
FORMATS = ("raw", "tar.gz", "deb")
LOCK_HINT = "run `python -m builder lock` on a connected build host (or through its mirrors)"
# Names that end up in file names (archives, /bin targets): ASCII, no leading dot, no '/', and
# short enough that "<release>-images-<group>.linux-<arch>.tar.zst" stays a valid file name. A
# name such as ``a..b`` passes, and is harmless: it is only ever one path part or part of one.
NAME_MAX = 63
NAME = re.compile(rf"[a-z0-9][a-z0-9._-]{{0,{NAME_MAX - 1}}}")
# The release version becomes an image tag, a registry tag and a value in release.env.
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")  # an OCI tag is at most 128
# A reference's host and tag, in ASCII (the reference parser alone lets Unicode word characters
# into a tag and anything without '/' into a host; both end up in URLs, lists and annotations).
REF_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?")
KEY_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,254}")  # relative; '..' refused apart
REF_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
MODE = re.compile(r"[0-7]{3,4}")  # '0755' / '755'; the special-bits digit is checked below
FORBIDDEN_MODE_BITS = 0o7002  # setuid, setgid, sticky, world-writable
MAX_YAML_DEPTH = 32  # the lock nests 5 deep; a deeper document is an attack, not a lock
SHOW_MAX = 80
# The JSON Schema of this file, for editors (named in the committed lock's first line) and tests.
SCHEMA_FILE = Path(__file__).resolve().parent / "images-lock.schema.json"

# How an image archive carries the layers of pulled images (issue 14; docs/images-lock.md):
# `registry`: the blobs exactly as the registry serves them (gzip), registry digests kept;
# `zstd`: each layer recompressed as an OCI tar+zstd layer (new manifest and layer digests, same
# config digest; the registry digests recorded in annotations).
LayerMode = Literal["registry", "zstd"]
LAYER_MODES: tuple[LayerMode, ...] = get_args(LayerMode)
# The mode of a lock that names none. README's bench table (both modes against the upstream
# recipe, on the four axes) gives the figures this default was chosen from.
DEFAULT_LAYER_MODE: LayerMode = "zstd"

HEADER = """\
# images.lock: the pinned description of one release.
# People edit the intent; `python -m builder lock` resolves and rewrites the pins (null = unresolved).
# Every sha256/digest here was computed by `lock` or copied from the source named beside it.
"""


@dataclass(frozen=True)
class FileArtifact:
    """One arch's file of a component."""

    url: str | None = None
    sha256: str | None = None  # bare hex; None while unresolved
    size: int | None = None  # bytes; filled by `lock`, bounds `fetch` (None: the configured maximum)
    checksum_url: str | None = None  # a published checksum file `lock` may read
    absent: str | None = None  # why this arch has no such file

    @property
    def digest(self) -> str | None:
        return dg.from_hex(self.sha256) if self.sha256 else None


@dataclass(frozen=True)
class Component:
    name: str
    version: str | None
    format: str  # raw | tar.gz | deb
    member: str | None  # path inside the archive, for tar.gz and deb
    target: str  # file name inside /bin or /charts (default: the component's name)
    mode: int
    arches: dict[str, FileArtifact]
    absent: str | None = None  # why the component is absent for every arch
    source: str | None = None  # where the pins come from

    def artifact(self, arch: str) -> FileArtifact | None:
        return self.arches.get(arch)


REMOVED_VERSION = "0.0.0"  # upstream's chart_versions.yaml: a chart the release no longer ships
DEFAULT_CHART_NAMESPACE = "kube-system"
# A chart's name is also the HelmChart's metadata.name and the Helm release name: a Kubernetes
# object name (no '_', ends with a letter or digit) of at most 53 characters (Helm's limit).
CHART_NAME_MAX = 53
K8S_NAME = re.compile(rf"[a-z0-9](?:[a-z0-9.-]{{0,{CHART_NAME_MAX - 2}}}[a-z0-9])?")
K8S_NAMESPACE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")  # a DNS-1123 label
# The Kubernetes version the charts are constrained to (`kubeVersion: >= vX.Y.Z`), taken from the
# release version as upstream does (v1.32.13+rke2r1 -> v1.32.13).
KUBE_VERSION = re.compile(r"v[0-9]+\.[0-9]+\.[0-9]+")


def default_chart_package(name: str) -> str:
    """Upstream's package directory for a chart: its name without a ``-crd`` suffix."""
    return name.removesuffix("-crd")


@dataclass(frozen=True)
class Chart:
    """One chart of the runtime image's /charts, as upstream's charts/chart_versions.yaml lists it.

    The chart ``.tgz`` is a pinned file like a component's; `build` turns it into a HelmChart
    manifest ``/charts/<name>.yaml``. A chart at version 0.0.0 was removed by the release: it
    has no file, and its manifest is the comment ``# <name> has been removed``.
    """

    name: str
    version: str
    url: str | None = None  # None only for a removed chart
    sha256: str | None = None  # bare hex; None while unresolved
    size: int | None = None
    bootstrap: bool = False
    namespace: str = DEFAULT_CHART_NAMESPACE
    package: str = ""  # the chart repository's directory (upstream: assets/<package>/)
    source: str | None = None

    @property
    def removed(self) -> bool:
        return self.version == REMOVED_VERSION

    @property
    def artifact(self) -> FileArtifact:
        """The chart file as a file pin, for the machinery shared with component files."""
        return FileArtifact(url=self.url, sha256=self.sha256, size=self.size)

    @property
    def what(self) -> str:
        return f"charts.{self.name}"


@dataclass(frozen=True)
class ImagePin:
    ref: str  # as written, fully qualified, with tag
    groups: tuple[str, ...]
    digest: str | None = None  # index (or the only manifest); None while unresolved
    platforms: dict[str, str | None] = field(default_factory=dict)  # arch -> manifest digest
    arches: tuple[str, ...] | None = None  # restrict to these arches (e.g. vsphere: no arm64)
    source: str | None = None
    # Taken from a local Docker-API daemon instead of a registry (an image a CI job just built),
    # e.g. "docker-daemon:ci/app:dev"; `ref` is the name it gets in the archives.
    daemon: str | None = None
    # A cosign public key (PEM file, relative to the lock's directory): fetch and build then
    # require the publisher's key-based signature of `digest` (see builder/trust/cosign.py).
    cosign_key: str | None = None

    @property
    def reference(self) -> reference.Reference:
        return reference.parse(self.ref)

    def applies_to(self, arch: str) -> bool:
        return self.arches is None or arch in self.arches


@dataclass(frozen=True)
class FileMirror:
    prefix: str
    endpoints: tuple[str, ...]
    fallback: bool = True  # try the original URL last


@dataclass(frozen=True)
class RegistryMirror:
    host: str
    endpoints: tuple[str, ...]
    fallback: bool = True


@dataclass(frozen=True)
class Mirrors:
    files: tuple[FileMirror, ...] = ()
    registries: tuple[RegistryMirror, ...] = ()
    insecure: tuple[str, ...] = ()  # registry hosts allowed over plain HTTP

    def merged(self, override: Mirrors) -> Mirrors:
        """A host's own mirror config wins over the lock's for the same prefix/host."""
        prefixes = {m.prefix for m in override.files}
        hosts = {m.host for m in override.registries}
        return Mirrors(
            files=override.files + tuple(m for m in self.files if m.prefix not in prefixes),
            registries=override.registries
            + tuple(m for m in self.registries if m.host not in hosts),
            insecure=tuple(sorted(set(self.insecure) | set(override.insecure))),
        )


@dataclass(frozen=True)
class Runtime:
    repository: str  # e.g. docker.io/rancher/rke2-runtime; tag = version with + -> -
    groups: tuple[str, ...]
    bin: tuple[str, ...]  # component names placed in /bin
    charts: tuple[str, ...]  # component names placed in /charts
    no_charts: str | None = None  # why this runtime image has no charts (build refuses otherwise)

    def reference(self, version: str) -> str:
        return f"{self.repository}:{version.replace('+', '-')}"


@dataclass(frozen=True)
class Release:
    name: str
    version: str
    revision: str | None = None
    source: str | None = None
    default_groups: tuple[str, ...] = ("core",)  # the legacy all-in-one archive
    supervisor: str | None = None  # component placed in the bundle's bin/
    # `release.layers`; None = not written (DEFAULT_LAYER_MODE applies, and nothing is dumped).
    # Read the mode through Lock.layer_mode, which applies the default and the group overrides.
    layers: LayerMode | None = None
    # `release.groups: {NAME: {layers: MODE}}`: a group archive's own mode, in the order written.
    group_layers: Mapping[str, LayerMode] = field(default_factory=dict)


@dataclass(frozen=True)
class Lock:
    release: Release
    arches: tuple[str, ...]
    components: dict[str, Component]
    images: tuple[ImagePin, ...]
    runtime: Runtime | None
    mirrors: Mirrors = Mirrors()
    path: Path | None = None
    charts: dict[str, Chart] = field(default_factory=dict)  # in the order written
    # registry host -> cosign public key (PEM file) for every image of that registry without a
    # `cosign_key:` of its own.
    signatures: dict[str, str] = field(default_factory=dict)

    def cosign_key(self, pin: ImagePin) -> Path | None:
        """The key that must have signed ``pin`` (its own, else its registry's), or None."""
        written = pin.cosign_key or self.signatures.get(pin.reference.host)
        if written is None or pin.daemon:  # a daemon's image has no registry signature
            return None
        base = self.path.parent if self.path is not None else Path.cwd()
        return base / written

    @property
    def groups(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        if self.runtime:
            seen.update(dict.fromkeys(self.runtime.groups))
        for img in self.images:
            seen.update(dict.fromkeys(img.groups))
        return tuple(seen)

    def layer_mode(self, group: str | None) -> LayerMode:
        """The layer mode of ``group``'s archive (None: the all-in-one archive, NAME-images).

        The group's override, else ``release.layers``, else DEFAULT_LAYER_MODE.
        """
        if group is not None and group in self.release.group_layers:
            return self.release.group_layers[group]
        return self.release.layers or DEFAULT_LAYER_MODE

    def images_for(self, arch: str) -> list[ImagePin]:
        return [i for i in self.images if i.applies_to(arch)]

    def with_mirrors(self, override: Mirrors) -> Lock:
        return replace(self, mirrors=self.mirrors.merged(override))

    @property
    def source(self) -> str:
        """How errors name this lock: the file it was read from."""
        return self.path.name if self.path is not None else "images.lock"

    def unresolved(self, arches: Iterable[str], kinds: Iterable[str] = ()) -> dict[str, list[str]]:
        """Every unresolved pin the arches need, by kind (all of PIN_KINDS unless ``kinds``).

        A pin is one component's file for one arch, or one image (its digest and the platform
        digests of the arches it applies to).
        """
        arches = tuple(arches)
        for arch in arches:
            if arch not in KNOWN_ARCHES:
                raise LockError(f"{self.source}: unknown arch {arch!r}",
                                f"known arches: {', '.join(KNOWN_ARCHES)}")
        return {kind: list(dict.fromkeys(find(self, arches)))
                for kind, find in PIN_KINDS.items() if not kinds or kind in kinds}

    def require_resolved(self, arches: Iterable[str], *, images: bool = True,
                         components: bool = True) -> None:
        """Refuse to go on with unresolved pins, listing every one of them, of every kind."""
        arches = tuple(arches)
        kinds = [k for k, wanted in (("files", components), ("images", images),
                                     ("charts", components)) if wanted]
        found = self.unresolved(arches, kinds)
        if any(found.values()):
            raise UnresolvedError(f"{self.source}: {describe_unresolved(found)} for "
                                  f"{', '.join(arches)}:\n{list_unresolved(found)}", LOCK_HINT)


def _unresolved_files(lock: Lock, arches: tuple[str, ...]) -> Iterator[str]:
    for arch in arches:
        for comp in lock.components.values():
            art = None if comp.absent else comp.artifact(arch)
            if comp.absent or (art is not None and art.absent):
                continue
            if art is None:
                yield f"components.{comp.name}.{arch}: no entry for this arch"
            elif not art.url:
                yield f"components.{comp.name}.{arch}.url"
            elif not art.sha256:
                yield f"components.{comp.name}.{arch}.sha256"


def _unresolved_images(lock: Lock, arches: tuple[str, ...]) -> Iterator[str]:
    for i, img in enumerate(lock.images):
        wanted = [a for a in arches if img.applies_to(a)]
        missing = ([] if img.digest or not wanted else ["digest"])
        missing += [f"platforms.{a}" for a in wanted if not img.platforms.get(a)]
        if missing:
            yield f"images[{i}] {img.ref}: {', '.join(missing)}"


def _unresolved_charts(lock: Lock, arches: tuple[str, ...]) -> Iterator[str]:
    # A chart is the same file for every arch: needed whatever the arches.
    for chart in lock.charts.values():
        if not chart.removed and not chart.sha256:
            yield f"{chart.what}.sha256"


# Every kind of pin, in the order they are listed. A new kind is one more entry.
PIN_KINDS: dict[str, Callable[[Lock, tuple[str, ...]], Iterable[str]]] = {
    "files": _unresolved_files,
    "images": _unresolved_images,
    "charts": _unresolved_charts,
}


def describe_unresolved(found: dict[str, list[str]]) -> str:
    """E.g. ``3 pins unresolved (files: 1, images: 2)``."""
    total = sum(len(v) for v in found.values())
    counts = ", ".join(f"{kind}: {len(entries)}" for kind, entries in found.items())
    return f"{total} {'pin' if total == 1 else 'pins'} unresolved ({counts})"


def list_unresolved(found: dict[str, list[str]], indent: str = "  ") -> str:
    """One block per kind that has unresolved pins, one line per pin."""
    lines = []
    for kind, entries in found.items():
        if entries:
            lines.append(f"{indent}{kind}:")
            lines.extend(f"{indent}  {entry}" for entry in entries)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Loading with field paths
# ---------------------------------------------------------------------------------------------


class _V:
    """Reads one YAML mapping, naming the field path in every error."""

    def __init__(self, source: str, data: Any, path: str):
        self.source = source
        self.path = path
        if not isinstance(data, dict):
            self.fail(f"expected a mapping, got {_show(data)}")
        self.data = data

    def fail(self, msg: str, at: str | None = None) -> NoReturn:
        where = at if at is not None else self.path
        raise LockError(f"{self.source}: {where}: {msg}" if where else f"{self.source}: {msg}")

    def at(self, key: str) -> str:
        key = _clip(str(key))  # keys are input too: a 1 MB key must not make a 1 MB message
        return f"{self.path}.{key}" if self.path else key

    def only(self, *allowed: str) -> None:
        for key in self.data:
            if key not in allowed:
                self.fail(f"unknown field (expected one of: {', '.join(allowed)})", self.at(str(key)))

    def get(self, key: str, kind: type | tuple[type, ...], *, required: bool = False,
            default: Any = None) -> Any:
        if key not in self.data or self.data[key] is None:
            if required:
                self.fail("missing required field", self.at(key))
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.fail(f"expected {want}, got {_show(value)}", self.at(key))
        return value

    def str_list(self, key: str, *, required: bool = False) -> tuple[str, ...]:
        value = self.get(key, list, required=required, default=[])
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                self.fail(f"expected a non-empty string, got {_show(item)}", f"{self.at(key)}[{i}]")
        return tuple(value)

    # A required sub-mapping is never None (a missing one fails), so callers need not check.
    @overload
    def sub(self, key: str, *, required: Literal[True]) -> _V: ...
    @overload
    def sub(self, key: str, *, required: bool = False) -> _V | None: ...
    def sub(self, key: str, *, required: bool = False) -> _V | None:
        if key not in self.data or self.data[key] is None:
            if required:
                self.fail("missing required field", self.at(key))
            return None
        return _V(self.source, self.data[key], self.at(key))


def _clip(text: str, limit: int = SHOW_MAX) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _show(value: Any) -> str:
    """A value as it appears in an error: repr (so a newline shows as \\n), at most SHOW_MAX chars."""
    return _clip(repr(value))


def _name(v: _V, key: str, value: Any, what: str = "name") -> str:
    """A name that becomes (part of) a file name: the whole value must match NAME."""
    if not isinstance(value, str) or not NAME.fullmatch(value):
        v.fail(f"expected a {what} of lowercase ASCII letters, digits, '.', '_' and '-' "
               f"(starting with a letter or digit, at most {NAME_MAX}), got {_show(value)}", key)
    return value


def _names(v: _V, key: str, what: str = "group name", *, required: bool = False) -> tuple[str, ...]:
    values = v.str_list(key, required=required)
    for i, value in enumerate(values):
        _name(v, f"{v.at(key)}[{i}]", value, what)
    return values


def _hex(v: _V, key: str) -> str | None:
    value = v.get(key, str)
    if value is not None and not dg.is_hex64(value):
        v.fail(f"expected 64 hex digits, got {_show(value)}", v.at(key))
    return value


def _digest(v: _V, key: str, value: Any) -> str | None:
    if value is not None and not dg.is_digest(value):
        v.fail(f"expected sha256:<64 hex digits>, got {_show(value)}", v.at(key))
    return value


def _arch(v: _V, arch: Any, at: str) -> str:
    if arch not in KNOWN_ARCHES:
        v.fail(f"unknown arch {_show(arch)} (known: {', '.join(KNOWN_ARCHES)})", at)
    return arch


def _url(v: _V, key: str) -> str | None:
    value = v.get(key, str)
    if value is not None and not value.startswith(("http://", "https://")):
        v.fail(f"expected an http(s) URL, got {_show(value)}", v.at(key))
    return value


def _mode(v: _V, default: int) -> int:
    # Only a quoted string: YAML reads an unquoted 0755 as 493 but 755 as decimal 755 (= 0o1363,
    # the sticky bit), so an integer cannot be told apart from a mistake.
    value = v.get("mode", (str, int))
    if value is None:
        return default
    if not isinstance(value, str) or not MODE.fullmatch(value):
        v.fail(f"expected a quoted octal mode such as '0755' or '0644', got {_show(value)}",
               v.at("mode"))
    mode = int(value, 8)
    if mode & FORBIDDEN_MODE_BITS:
        v.fail(f"mode {value} sets a setuid, setgid, sticky or world-writable bit, which a "
               "release never ships; use e.g. '0755' or '0644'", v.at("mode"))
    return mode


def _size(v: _V, key: str) -> int | None:
    value = v.get(key, int)
    if value is not None and value <= 0:
        v.fail(f"expected a positive number of bytes, got {_show(value)}", v.at(key))
    return value


def _component(src: str, name: str, data: Any) -> Component:
    v = _V(src, data, f"components.{_clip(name)}")
    _name(v, v.path, name, "component name")
    v.only("version", "format", "member", "target", "mode", "absent", "source", "arches")
    fmt = v.get("format", str, default="raw")
    if fmt not in FORMATS:
        v.fail(f"unknown format {_show(fmt)} (expected one of: {', '.join(FORMATS)})", v.at("format"))
    member = v.get("member", str)
    if fmt != "raw" and not member:
        v.fail(f"format {fmt} needs the member path to take from the archive", v.at("member"))
    if member and (member.startswith("/") or ".." in member.split("/")):
        v.fail(f"member must be a relative path inside the archive, got {_show(member)}", v.at("member"))
    target = _name(v, v.at("target"), v.get("target", str, default=name), "target file name")
    absent = v.get("absent", str)
    arches: dict[str, FileArtifact] = {}
    av = v.sub("arches")
    if av is None and not absent:
        v.fail("missing required field (or `absent: <reason>` when there is no file)", v.at("arches"))
    for arch, entry in (av.data.items() if av else []):
        # Errors name `components.NAME.ARCH.FIELD`, the way people think of the entry.
        _arch(v, arch, v.at(str(arch)))
        ev = _V(src, entry, v.at(arch))
        ev.only("url", "sha256", "size", "checksum_url", "absent")
        art = FileArtifact(
            url=_url(ev, "url"),
            sha256=_hex(ev, "sha256"),
            size=_size(ev, "size"),
            checksum_url=_url(ev, "checksum_url"),
            absent=ev.get("absent", str),
        )
        if not art.absent and not art.url:
            ev.fail("missing required field (or `absent: <reason>`)", ev.at("url"))
        arches[arch] = art
    return Component(
        name=name,
        version=v.get("version", str),
        format=fmt,
        member=member,
        target=target,
        mode=_mode(v, 0o755),
        arches=dict(sorted(arches.items())),
        absent=absent,
        source=v.get("source", str),
    )


def _image(src: str, i: int, data: Any) -> ImagePin:
    v = _V(src, data, f"images[{i}]")
    v.only("ref", "groups", "digest", "platforms", "arches", "source", "daemon", "cosign_key")
    ref = v.get("ref", str, required=True)
    try:
        parsed = reference.parse(ref)
    except ValueError as exc:
        v.fail(_clip(str(exc)), v.at("ref"))
    if not REF_HOST.fullmatch(parsed.host) or not REF_TAG.fullmatch(parsed.tag or "latest"):
        v.fail(f"expected an ASCII registry host and tag, got {_show(ref)}", v.at("ref"))
    if parsed.digest or str(parsed) != ref:
        v.fail(f"write the reference fully qualified with a tag and no digest, e.g. {parsed.name}:{parsed.tag or 'TAG'}",
               v.at("ref"))
    v.path = f"images[{i}] ({_clip(ref)})"
    groups = _names(v, "groups", required=True)
    if not groups:
        v.fail("needs at least one group", v.at("groups"))
    digest = _digest(v, "digest", v.get("digest", str))
    platforms: dict[str, str | None] = {}
    pv = v.sub("platforms")
    if pv is not None:
        for arch, value in pv.data.items():
            _arch(v, arch, pv.at(str(arch)))
            if value is not None and not isinstance(value, str):
                v.fail(f"expected a digest string, got {_show(value)}", pv.at(arch))
            platforms[arch] = _digest(pv, arch, value)
    restrict = None
    if "arches" in v.data:
        restrict = v.str_list("arches")
        for j, arch in enumerate(restrict):
            _arch(v, arch, f"{v.at('arches')}[{j}]")
    daemon = v.get("daemon", str)
    if daemon is not None and not daemon.startswith("docker-daemon:"):
        v.fail(f"expected docker-daemon:NAME:TAG, got {_show(daemon)}", v.at("daemon"))
    cosign_key = _key_path(v, "cosign_key", v.get("cosign_key", str))
    if cosign_key is not None and daemon is not None:
        v.fail("an image taken from a daemon has no registry signature to check; drop cosign_key",
               v.at("cosign_key"))
    return ImagePin(ref, groups, digest, dict(sorted(platforms.items())), restrict,
                    v.get("source", str), daemon, cosign_key)


def _layer_mode(v: _V, key: str) -> LayerMode:
    """``v[key]``, one of LAYER_MODES (any other value or type is refused alike)."""
    value = v.data.get(key)
    if value not in LAYER_MODES:  # a str compared by value; a list or mapping never equals one
        v.fail(f"expected one of {', '.join(LAYER_MODES)}, got {_show(value)}", v.at(key))
    return value


def _group_layers(rv: _V) -> dict[str, LayerMode]:
    """``release.groups``: group name -> that group archive's layer mode, in the order written."""
    gv = rv.sub("groups")
    if gv is None:
        return {}
    out: dict[str, LayerMode] = {}
    for group, entry in gv.data.items():
        at = gv.at(str(group))
        _name(gv, at, group, "group name")
        ev = _V(gv.source, entry, at)
        ev.only("layers")
        ev.get("layers", object, required=True)  # "missing required field" when absent or null
        out[group] = _layer_mode(ev, "layers")
    return out


def _check_layer_groups(rv: _V, release: Release, runtime: Runtime | None,
                        images: tuple[ImagePin, ...]) -> None:
    """Each group of ``release.groups`` is one some image or the runtime is in (else a typo)."""
    used = dict.fromkeys(g for img in images for g in img.groups)
    used.update(dict.fromkeys(runtime.groups if runtime is not None else ()))
    for group in release.group_layers:
        if group not in used:
            existing = ", ".join(used) if used else "none yet"
            raise LockError(f"{rv.source}: {rv.at('groups')}.{group}: group {group!r} holds no "
                            "image and not the runtime, so no archive would use this mode",
                            _clip(f"groups in this lock (images[].groups, runtime.groups): "
                                  f"{existing}", 400))


def _key_path(v: _V, at: str, value: str | None) -> str | None:
    """A key file's path as written: relative, inside the lock's directory tree, no '..'."""
    if value is None:
        return None
    if not KEY_PATH.fullmatch(value) or ".." in value.split("/"):
        v.fail(f"expected the path of a PEM public key relative to the lock's directory "
               f"(e.g. keys/cosign.pub), got {_show(value)}", v.at(at) if at in v.data else at)
    return value


def _signatures(src: str, data: Any) -> dict[str, str]:
    v = _V(src, data, "signatures")
    if not isinstance(data, dict) or not data:
        v.fail("expected a mapping of registry host to cosign public key file, "
               "e.g. {ghcr.io: keys/cosign.pub}")
    out: dict[str, str] = {}
    for host, path in data.items():
        if not isinstance(host, str) or not REF_HOST.fullmatch(host):
            v.fail(f"expected a registry host (host[:port]), got {_show(host)}", f"signatures.{_clip(str(host))}")
        if not isinstance(path, str):
            v.fail(f"expected a key file path, got {_show(path)}", f"signatures.{host}")
        out[host] = _key_path(v, f"signatures.{host}", path)  # type: ignore[assignment]
    return out


def _version(v: _V, what: str) -> str:
    """The required ``version`` of ``v``: plain ASCII, as it ends up in file names and tags."""
    version = v.get("version", str, required=True)
    if not VERSION.fullmatch(version):
        v.fail(f"expected a {what} of ASCII letters, digits, '.', '_', '+' and '-', "
               f"got {_show(version)}", v.at("version"))
    return version


def _chart(src: str, name: str, data: Any) -> Chart:
    v = _V(src, data, f"charts.{_clip(name)}")
    _name(v, v.path, name, "chart name")
    if not K8S_NAME.fullmatch(name):
        v.fail(f"a chart name is also its HelmChart's name and Helm release name: no '_', ending "
               f"with a letter or digit, at most {CHART_NAME_MAX} characters, got {_show(name)}")
    v.only("version", "bootstrap", "namespace", "package", "url", "sha256", "size", "source")
    version = _version(v, "chart version")
    chart = Chart(
        name=name,
        version=version,
        url=_url(v, "url"),
        sha256=_hex(v, "sha256"),
        size=_size(v, "size"),
        bootstrap=v.get("bootstrap", bool, default=False),
        namespace=v.get("namespace", str, default=DEFAULT_CHART_NAMESPACE),
        package=_name(v, v.at("package"), v.get("package", str, default=default_chart_package(name)),
                      "package name"),
        source=v.get("source", str),
    )
    if not K8S_NAMESPACE.fullmatch(chart.namespace):
        v.fail("expected a Kubernetes namespace (lowercase letters, digits and '-', at most 63), "
               f"got {_show(chart.namespace)}", v.at("namespace"))
    if chart.removed:
        for key in ("url", "sha256", "size"):
            if v.data.get(key) is not None:
                v.fail(f"a removed chart (version {REMOVED_VERSION}) has no file: drop {key}", v.at(key))
        return chart
    if not chart.url:
        v.fail(f"missing required field (or `version: {REMOVED_VERSION}` for a chart the release "
               "removed)", v.at("url"))
    assert chart.url
    filename = f"{name}-{version}.tgz"  # what `helm package` names it, in every chart repository
    if url_basename(chart.url) != filename:
        v.fail(f"expected the URL of {filename} (the chart's name and version), got {_show(chart.url)}",
               v.at("url"))
    return chart


def url_basename(url: str) -> str:
    """The file name a URL names (its path's last part, %-escapes decoded)."""
    return unquote(posixpath.basename(urlparse(url).path))


def _mirrors(src: str, data: Any, path: str, *, host: bool) -> Mirrors:
    """Mirrors from the lock (``host=False``) or from the build host's own mirrors file.

    ``insecure`` (plain HTTP) is a fact about the build host's network, so only the host's file
    may say it: a pull request must not be able to turn TLS off for a registry.
    """
    v = _V(src, data, path)
    if not host and "insecure" in v.data:
        raise LockError(f"{src}: {v.at('insecure')}: plain-HTTP registries are not allowed in images.lock",
                        HOST_MIRRORS_HINT)
    v.only("files", "registries", "insecure")
    files = []
    for i, entry in enumerate(v.get("files", list, default=[])):
        fv = _V(src, entry, f"{v.at('files')}[{i}]")
        fv.only("prefix", "endpoints", "fallback")
        prefix = fv.get("prefix", str, required=True)
        endpoints = fv.str_list("endpoints", required=True)
        for j, ep in enumerate(endpoints):
            if not ep.startswith(("http://", "https://")):
                fv.fail(f"expected an http(s) URL prefix, got {_show(ep)}", f"{fv.at('endpoints')}[{j}]")
        files.append(FileMirror(prefix, endpoints, fv.get("fallback", bool, default=True)))
    registries = []
    rv = v.sub("registries")
    if rv is not None:
        for host, entry in rv.data.items():
            ev = _V(src, entry, rv.at(str(host)))
            ev.only("endpoints", "fallback")
            registries.append(
                RegistryMirror(str(host), ev.str_list("endpoints", required=True),
                               ev.get("fallback", bool, default=True))
            )
    insecure = tuple(_insecure_host(v, i, entry) for i, entry in enumerate(v.str_list("insecure")))
    return Mirrors(tuple(files), tuple(registries), insecure)


def _insecure_host(v: _V, i: int, entry: str) -> str:
    """An ``insecure:`` entry as the registry client compares it: ``host[:port]``.

    ``http://host:5000`` is what people paste from a URL, so it is accepted and normalised;
    before, it was kept as written and never matched, so the registry stayed refused. Anything
    else (https://, a path, a user) is refused rather than silently matching nothing.
    """
    host = entry.removeprefix("http://").removesuffix("/")
    if not REF_HOST.fullmatch(host):
        raise LockError(f"{v.source}: {v.at('insecure')}[{i}]: expected a registry host[:port] "
                        f"(e.g. registry.internal:5000 or http://registry.internal:5000), "
                        f"got {_show(entry)}",
                        "list each plain-HTTP registry as host or host:port, the way image "
                        "references name it")
    return host


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses anchors/aliases and deep nesting while composing, before anything
    is expanded: a 516-byte alias bomb would otherwise take seconds and gigabytes."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused("YAML anchors and aliases (&name, *name, <<) are not allowed; "
                           "write each value out", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _Refused(f"nested more than {MAX_YAML_DEPTH} levels deep", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Refused(Exception):
    def __init__(self, problem: str, mark: Any):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, _Refused, ValueError) as exc:
        # ValueError: PyYAML builds dates and ints itself (2020-02-30, a 5000-digit number).
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise LockError(f"{source}: not valid YAML{where}: {_clip(str(problem), 200)}",
                        "fix the syntax; `python -m builder lock --check` validates") from None


def parse_mirrors(text: str, source: str) -> Mirrors:
    """The build host's own mirrors file (--mirrors / BUILDER_MIRRORS)."""
    return _mirrors(source, _load_yaml(text, source) or {}, "", host=True)


def parse(text: str, source: str = "images.lock", path: Path | None = None) -> Lock:
    v = _V(source, _load_yaml(text, source), "")
    v.only("schema", "release", "arches", "mirrors", "components", "charts", "images", "runtime",
           "signatures")
    schema = v.get("schema", int, required=True)
    if schema != SCHEMA:
        v.fail(f"unsupported schema {schema} (this builder reads schema {SCHEMA})", "schema")

    rv = v.sub("release", required=True)
    rv.only("name", "version", "revision", "source", "default_groups", "supervisor", "layers",
            "groups")
    name = _name(rv, rv.at("name"), rv.get("name", str, default="rke2"), "release name")
    version = _version(rv, "version")
    release = Release(
        name=name,
        version=version,
        revision=rv.get("revision", str),
        source=rv.get("source", str),
        default_groups=_names(rv, "default_groups") or ("core",),
        supervisor=rv.get("supervisor", str),
        layers=_layer_mode(rv, "layers") if rv.data.get("layers") is not None else None,
        group_layers=_group_layers(rv),
    )

    arches = v.str_list("arches", required=True)
    if not arches:
        v.fail("needs at least one arch", "arches")
    for i, arch in enumerate(arches):
        _arch(v, arch, f"arches[{i}]")

    components: dict[str, Component] = {}
    cv = v.sub("components")
    for cname, entry in (cv.data.items() if cv else []):
        components[str(cname)] = _component(source, str(cname), entry)

    charts: dict[str, Chart] = {}
    chv = v.sub("charts")
    for chname, entry in (chv.data.items() if chv else []):
        charts[str(chname)] = _chart(source, str(chname), entry)
    if any(not c.removed for c in charts.values()) and not KUBE_VERSION.match(version):
        rv.fail(f"charts are constrained to the release's Kubernetes version, which must start "
                f"the release version (e.g. v1.32.13+rke2r1), got {_show(version)}", rv.at("version"))

    images = tuple(_image(source, i, e) for i, e in enumerate(v.get("images", list, default=[])))
    seen: dict[str, int] = {}
    for i, img in enumerate(images):
        if img.ref in seen:
            v.fail(f"{img.ref} is listed twice (also images[{seen[img.ref]}]); list it once with all its groups",
                   f"images[{i}]")
        seen[img.ref] = i

    runtime = None
    rtv = v.sub("runtime")
    if rtv is not None:
        rtv.only("repository", "groups", "bin", "charts", "no_charts")
        repo = rtv.get("repository", str, required=True)
        try:
            parsed = reference.parse(repo)
        except ValueError as exc:
            rtv.fail(_clip(str(exc)), rtv.at("repository"))
        if not REF_HOST.fullmatch(parsed.host):
            rtv.fail(f"expected an ASCII registry host, got {_show(repo)}", rtv.at("repository"))
        if parsed.name != repo:
            rtv.fail(f"expected host/repository without tag, e.g. {parsed.name}", rtv.at("repository"))
        runtime = Runtime(repo, _names(rtv, "groups") or ("core",), rtv.str_list("bin"),
                          rtv.str_list("charts"), rtv.get("no_charts", str))
        if runtime.no_charts == "":
            rtv.fail("expected the reason this runtime image has no charts, got ''",
                     rtv.at("no_charts"))
        if runtime.no_charts is not None and any(not c.removed for c in charts.values()):
            rtv.fail("says the runtime image has no charts, but charts: lists some; drop one of them",
                     rtv.at("no_charts"))
        for key in ("bin", "charts"):
            for j, cname in enumerate(getattr(runtime, key)):
                if cname not in components:
                    rtv.fail(f"names component {_show(cname)}, which components does not define",
                             f"{rtv.at(key)}[{j}]")
    _check_layer_groups(rv, release, runtime, images)
    if release.supervisor and release.supervisor not in components:
        rv.fail(f"names component {_show(release.supervisor)}, which components does not define",
                rv.at("supervisor"))

    has_mirrors = v.data.get("mirrors") is not None  # `mirrors: []` is an error, not "none"
    mirrors = _mirrors(source, v.data["mirrors"], "mirrors", host=False) if has_mirrors else Mirrors()
    if runtime is not None and rtv is not None:  # runtime is set only from rtv
        for j, cname in enumerate(runtime.charts):
            target = components[cname].target
            clash = target.removesuffix(".yaml")
            if target.endswith(".yaml") and clash in charts:
                rtv.fail(f"component {_show(cname)} would be /charts/{components[cname].target}, "
                         f"the manifest of charts.{clash}", f"{rtv.at('charts')}[{j}]")
    signatures = _signatures(source, v.data["signatures"]) if "signatures" in v.data else {}
    return Lock(release, arches, components, images, runtime, mirrors, path, charts, signatures)


def load(path: Path) -> Lock:
    path = Path(path)
    text = read_named(path, LockError(f"{path}: no such lock file",
                                      "pass --lock PATH or run from the directory holding images.lock"),
                      Path.read_text)
    return parse(text, source=path.name, path=path)


def load_mirrors(path: Path) -> Mirrors:
    return parse_mirrors(read_named(path, LockError(f"{path}: no such mirrors file"), Path.read_text), str(path))


# ---------------------------------------------------------------------------------------------
# Dumping in one canonical form
# ---------------------------------------------------------------------------------------------


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _component_data(c: Component) -> dict:
    out: dict[str, Any] = {"version": c.version}
    if c.format != "raw":
        out["format"] = c.format
        out["member"] = c.member
    if c.target != c.name:
        out["target"] = c.target
    if c.mode != 0o755:
        out["mode"] = f"{c.mode:04o}"
    out["source"] = c.source
    out["absent"] = c.absent
    if c.arches:
        arches = {}
        for arch, art in c.arches.items():
            if art.absent:
                arches[arch] = {"absent": art.absent}
                continue
            entry: dict[str, Any] = {"url": art.url, "sha256": art.sha256}
            if art.size is not None:
                entry["size"] = art.size
            if art.checksum_url:
                entry["checksum_url"] = art.checksum_url
            arches[arch] = entry
        out["arches"] = arches
    return _drop_none(out)


def _chart_data(c: Chart) -> dict:
    out: dict[str, Any] = {"version": c.version, "package": c.package, "bootstrap": c.bootstrap}
    if c.namespace != DEFAULT_CHART_NAMESPACE:
        out["namespace"] = c.namespace
    if not c.removed:
        out["url"] = c.url
        out["sha256"] = c.sha256
        if c.size is not None:
            out["size"] = c.size
    if c.source:
        out["source"] = c.source
    return out


def _image_data(img: ImagePin) -> dict:
    out: dict[str, Any] = {"ref": img.ref, "groups": list(img.groups)}
    if img.arches is not None:
        out["arches"] = list(img.arches)
    if img.daemon:
        out["daemon"] = img.daemon
    out["digest"] = img.digest
    out["platforms"] = dict(img.platforms) if img.platforms else None
    if img.source:
        out["source"] = img.source
    if img.cosign_key:
        out["cosign_key"] = img.cosign_key
    if out["platforms"] is None:
        del out["platforms"]
    return out


def _mirrors_data(m: Mirrors) -> dict | None:
    out: dict[str, Any] = {}
    if m.files:
        out["files"] = [
            {"prefix": f.prefix, "endpoints": list(f.endpoints), **({} if f.fallback else {"fallback": False})}
            for f in m.files
        ]
    if m.registries:
        out["registries"] = {
            r.host: {"endpoints": list(r.endpoints), **({} if r.fallback else {"fallback": False})}
            for r in m.registries
        }
    # `insecure` is never written: only the host's mirrors file may say it (see _mirrors).
    return out or None


def to_data(lock: Lock) -> dict:
    r = lock.release
    release = _drop_none({
        "name": r.name,
        "version": r.version,
        "revision": r.revision,
        "source": r.source,
        "default_groups": list(r.default_groups),
        "supervisor": r.supervisor,
        "layers": r.layers,
        # Written only when set, so a lock that never named a mode dumps as it did.
        "groups": {g: {"layers": m} for g, m in r.group_layers.items()} or None,
    })
    data: dict[str, Any] = {"schema": SCHEMA, "release": release, "arches": list(lock.arches)}
    mirrors = _mirrors_data(lock.mirrors)
    if mirrors:
        data["mirrors"] = mirrors
    if lock.signatures:
        data["signatures"] = dict(lock.signatures)
    data["components"] = {name: _component_data(c) for name, c in sorted(lock.components.items())}
    if lock.charts:
        data["charts"] = {name: _chart_data(c) for name, c in lock.charts.items()}
    if lock.runtime:
        data["runtime"] = _drop_none({
            "repository": lock.runtime.repository,
            "groups": list(lock.runtime.groups),
            "bin": list(lock.runtime.bin),
            "charts": list(lock.runtime.charts),
            "no_charts": lock.runtime.no_charts,
        })
    # Images keep the order people wrote (it is the order of the .txt lists upstream).
    data["images"] = [_image_data(i) for i in lock.images]
    return data


class _Dumper(yaml.SafeDumper):
    pass


def _str_presenter(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str_presenter)


def dumps(lock: Lock) -> str:
    body = yaml.dump(to_data(lock), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     width=200, allow_unicode=True)
    return HEADER + body


def save(lock: Lock, path: Path) -> bool:
    """Write atomically; returns False (and touches nothing) when the bytes would not change."""
    text = dumps(lock)
    path = Path(path)
    if path.exists() and path.read_text() == text:
        return False
    write_atomic(path, text.encode())
    return True


# ---------------------------------------------------------------------------------------------
# Writing resolved pins back into the file people wrote (round trip)
# ---------------------------------------------------------------------------------------------
#
# `dumps`/`save` above write a new lock in one canonical form (the rig, tests). `lock` instead
# writes the pins it resolved into the existing file: only pin values change, and comments, key
# order, quoting and flow style stay as people wrote them. The file is validated by `parse` (the
# hostile-input guards: no anchors or aliases, bounded nesting) before ruamel.yaml sees a byte of
# it, and what ruamel writes must read back through `parse` as exactly the resolved lock.


def _pins(lock: Lock) -> tuple:
    files = {(n, a): (art.sha256, art.size) for n, c in lock.components.items()
             for a, art in c.arches.items()}
    charts = {n: (c.sha256, c.size) for n, c in lock.charts.items()}
    return files, [(i.digest, i.platforms) for i in lock.images], charts


def _same_intent(a: Lock, b: Lock) -> bool:
    """Equal but for pins (and where each was read from)."""
    def strip(lock: Lock) -> Lock:
        comps = {n: replace(c, arches={a: replace(art, sha256=None, size=None)
                                       for a, art in c.arches.items()})
                 for n, c in lock.components.items()}
        images = tuple(replace(i, digest=None, platforms={}) for i in lock.images)
        charts = {n: replace(c, sha256=None, size=None) for n, c in lock.charts.items()}
        return replace(lock, components=comps, images=images, charts=charts, path=None)
    return strip(a) == strip(b)


def _indents(text: str) -> tuple[int, int, int]:
    """(mapping, sequence, offset) as this file writes them, so ruamel writes them alike.

    Taken from the first nested block mapping and block sequence, outermost first.
    """
    mapping = sequence = None
    queue = [yaml.compose(text, Loader=_Loader)]  # noqa: S506 - the guarded SafeLoader subclass
    while queue and (mapping is None or sequence is None):
        node = queue.pop(0)
        if isinstance(node, yaml.SequenceNode) and not node.flow_style:
            queue.extend(node.value)
        if not isinstance(node, yaml.MappingNode) or node.flow_style:
            continue
        for key, value in node.value:
            col = key.start_mark.column
            block = not value.flow_style if isinstance(value, yaml.CollectionNode) else False
            if block and value.value and isinstance(value, yaml.MappingNode) and mapping is None:
                mapping = value.value[0][0].start_mark.column - col
            if block and value.value and isinstance(value, yaml.SequenceNode) and sequence is None:
                sequence = (value.value[0].start_mark.column - col, value.start_mark.column - col)
            queue.append(value)
    seq, offset = sequence or (2, 0)
    return mapping or 2, seq, offset


def _round_trip_yaml(text: str) -> Any:
    from ruamel.yaml import YAML

    rt = YAML()  # round-trip mode: comments, order, flow style and quotes are kept
    rt.preserve_quotes = True
    rt.width = 1 << 30  # never fold a long line people wrote on one line
    mapping, sequence, offset = _indents(text)
    rt.indent(mapping=mapping, sequence=sequence, offset=offset)
    # `null` stays `null` (ruamel would write an empty value).
    rt.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    return rt


def _child(node: Any, key: str) -> Any:
    """``node[key]`` matched as the validator read it (``str(key)``)."""
    for k in node:
        if str(k) == key:
            return node[k]
    raise KeyError(key)


def _last_line(node: Any, key: Any) -> tuple[Any, Any]:
    """The mapping and key whose line is the last one ``node[key]`` is written on."""
    value = node[key]
    while hasattr(value, "ca") and hasattr(value, "keys") and len(value):
        node, key = value, list(value.keys())[-1]
        value = value[key]
    return node, key


def _move_following_comments(node: Any, src: Any, dest: tuple[Any, Any]) -> None:
    """Comment lines written below ``node[src]``'s line go below the line of ``dest``.

    ruamel keeps them with the entry they follow (``ca.items[key][2]``: the end-of-line comment
    plus every comment line up to the next entry). When a key is inserted after that entry, or
    its null becomes a mapping, they would otherwise land in the middle.
    """
    from ruamel.yaml.error import CommentMark
    from ruamel.yaml.tokens import CommentToken

    item = node.ca.items.get(src)
    token = item[2] if item and len(item) > 2 else None
    if token is None or dest == (node, src):
        return
    head, _, tail = token.value.partition("\n")
    if not tail.strip():
        return  # only an end-of-line comment: it stays on its line
    if head.strip():
        token.value = head + "\n"
    else:
        item[2] = None
    holder, key = dest
    holder.ca.items[key] = [None, None, CommentToken("\n" + tail, CommentMark(0)), None]


def _put(node: Any, key: str, value: Any, after: tuple[str, ...]) -> None:
    """Set ``key``; a key not there yet goes right after the last present key of ``after``."""
    for k in node:
        if str(k) == key:
            node[k] = value
            _move_following_comments(node, k, _last_line(node, k))
            return
    present = [k for k in node if str(k) in after]
    pos = list(node).index(present[-1]) + 1 if present else len(node)
    node.insert(pos, key, value)
    if present:
        _move_following_comments(node, present[-1], _last_line(node, key))


def _drop(node: Any, key: str) -> None:
    for k in list(node):
        if str(k) == key:
            del node[k]


def _apply_file_pins(tree: Any, old: Lock, new: Lock) -> None:
    for name, comp in new.components.items():
        for arch, art in comp.arches.items():
            was = old.components[name].arches[arch]
            if (was.sha256, was.size) == (art.sha256, art.size):
                continue
            entry = _child(_child(_child(tree, "components"), name), "arches")
            _put_file_pin(_child(entry, arch), art.sha256, art.size)


def _put_file_pin(entry: Any, sha256: str | None, size: int | None) -> None:
    """A file's pin (a component's file for one arch, or a chart): sha256, then size."""
    _put(entry, "sha256", sha256, after=("url",))
    if size is None:
        _drop(entry, "size")
    else:
        _put(entry, "size", size, after=("url", "sha256"))


def _apply_chart_pins(tree: Any, old: Lock, new: Lock) -> None:
    for name, chart in new.charts.items():
        was = old.charts[name]
        if (was.sha256, was.size) != (chart.sha256, chart.size):
            _put_file_pin(_child(_child(tree, "charts"), name), chart.sha256, chart.size)


def _apply_image_pins(tree: Any, old: Lock, new: Lock) -> None:
    from ruamel.yaml.comments import CommentedMap

    for i, (was, img) in enumerate(zip(old.images, new.images, strict=True)):
        if (was.digest, was.platforms) == (img.digest, img.platforms):
            continue
        entry = _child(tree, "images")[i]
        _put(entry, "digest", img.digest, after=("ref", "groups", "arches", "daemon"))
        platforms = next((entry[k] for k in entry if str(k) == "platforms"), None)
        if platforms is None:
            _put(entry, "platforms", CommentedMap(img.platforms),
                 after=("ref", "groups", "arches", "daemon", "digest"))
            continue
        for arch, digest in img.platforms.items():
            if was.platforms.get(arch) != digest:
                _put(platforms, arch, digest, after=KNOWN_ARCHES)


def update_text(text: str, new: Lock, source: str = "images.lock") -> str:
    """``text`` with the pins of ``new`` written in and nothing else changed.

    ``text`` is returned as it is when no pin differs. ``new`` must differ from what ``text``
    says only in pins (sha256 and size of files and charts, digest and platforms of images).
    """
    old = parse(text, source)  # validates, with every guard, before ruamel reads anything
    new = replace(new, mirrors=old.mirrors)  # the file's own mirrors, never the host's merged in
    if not _same_intent(old, new):
        raise LockError(f"{source}: the lock to write differs from the file in more than its pins",
                        f"write the change into {source} by hand, then run `python -m builder lock`")
    if _pins(old) == _pins(new):
        return text
    from io import StringIO

    rt = _round_trip_yaml(text)
    tree = rt.load(text)
    _apply_file_pins(tree, old, new)
    _apply_image_pins(tree, old, new)
    _apply_chart_pins(tree, old, new)
    out = StringIO()
    rt.dump(tree, out)
    result = out.getvalue()
    # What we write must read back as exactly the lock we meant, through the same validator.
    if replace(parse(result, source), path=None) != replace(new, path=None):
        raise LockError(f"{source}: writing the resolved pins while keeping the file's layout "
                        "gave a different lock; nothing was written",
                        "rewrite the file in block style (or `null` for each pin) and run "
                        "`python -m builder lock` again")
    return result


def write_pins(new: Lock, path: Path) -> bool:
    """Write ``new``'s pins into the lock file at ``path``, atomically.

    Returns False, and writes nothing (the file keeps its bytes and mtime), when no pin changed.
    """
    path = Path(path)
    text = path.read_text()
    updated = update_text(text, new, path.name)
    if updated == text:
        return False
    write_atomic(path, updated.encode())
    return True
