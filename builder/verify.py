"""Offline verification of a release directory (the air-gapped side: no lock, no network).

For every arch (``sha256sum-ARCH.txt`` present, or the arches asked for) it checks, and reports
*every* failure, each naming its file:

1. the signature of ``sha256sum-ARCH.txt`` (when a public key is given; required with
   ``require_signature``);
2. the checksums, ``sha256sum -c`` style, plus the reverse: every artifact for the arch in the
   directory must be listed (an unlisted file is one nobody vouched for);
3. every image archive (``.tar.zst`` and ``.tar.gz``) on its own: each blob's digest, each
   manifest's references (``read_archive_index(verify=True)``), and the platform of each image
   against the archive's arch; the two compressions must hold the same images;
4. each ``.txt`` list against its archive's image names, and ``NAME-images-all`` against the union;
5. the bundle's ``share/NAME/release.env`` against the archives: RELEASE_ARCH/NAME, the runtime
   image with RUNTIME_MANIFEST inside RUNTIME_ARCHIVE, that manifest's layers equal to
   RUNTIME_LAYERS, the DATA_KEY formula, DEFAULT_IMAGES and IMAGE_GROUPS naming archives here.

Checks 3-5 look inside the files even when a checksum already failed, so one run lists everything
wrong (a corrupt archive is named by both its checksum and its content check).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import shlex
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from builder import checksums
from builder import digest as dg
from builder.errors import BuilderError
from builder.lockfile import KNOWN_ARCHES
from builder.oci import model as m
from builder.oci.archive import ArchivedImage, read_archive_index
from builder.oci.compress import open_maybe_compressed
from builder.sign import SIG_SUFFIX, PublicKey, load_public_key, verify_signature

ARCHIVE_SUFFIXES = (".tar.zst", ".tar.gz")
RELEASE_ENV_LIMIT = 64 << 10
MANIFEST_LIMIT = 4 << 20
_SUMS = re.compile(r"^sha256sum-(?P<arch>[a-z0-9]+)\.txt$")
_ARCH_IN_NAME = re.compile(r"\.linux-(?P<arch>[a-z0-9]+)\.")


class VerifyFailed(BuilderError):
    """One or more checks failed; the message lists them all."""


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

    @property
    def passed(self) -> bool:
        return bool(self.arches) and not self.problems

    def add(self, file: str, message: str) -> None:
        problem = Problem(file, message)
        if problem not in self.problems:
            self.problems.append(problem)

    def summary(self) -> str:
        if self.passed:
            sig = ", ".join(f"{a}: {'signature verified' if ok else 'unsigned check'}"
                            for a, ok in self.signed.items())
            lines = [f"{self.directory}: OK ({len(self.checked)} files; {sig})"]
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
            + "\n  ".join(str(p) for p in self.problems),
            "do not install from this directory; copy the named files again from the release")


@dataclass(frozen=True)
class Names:
    """Base names of one arch's artifacts, by kind (parsed from file names)."""

    release: str | None  # NAME, from NAME.linux-ARCH.tar.gz
    bundle: str | None
    archives: dict[str, list[str]]  # base → the archive files present/listed
    lists: dict[str, str]  # base → its .txt
    all_list: str | None


def classify(arch: str, names: Iterable[str]) -> Names:
    images = re.compile(rf"^(?P<base>(?P<name>.+?)-images(?:-(?P<group>.+?))?\.linux-{arch})"
                        rf"(?P<ext>\.tar\.zst|\.tar\.gz|\.txt)$")
    bundle_re = re.compile(rf"^(?P<name>.+)\.linux-{arch}\.tar\.gz$")
    archives: dict[str, list[str]] = {}
    lists: dict[str, str] = {}
    release = bundle = all_list = None
    names = sorted(set(names))
    archive_bases = {mt["base"] for n in names if (mt := images.match(n)) and mt["ext"] != ".txt"}
    for n in names:
        mt = images.match(n)
        if mt:
            if mt["ext"] == ".txt":
                if mt["group"] == "all" and mt["base"] not in archive_bases:
                    all_list = n
                else:
                    lists[mt["base"]] = n
            else:
                archives.setdefault(mt["base"], []).append(n)
            continue
        mb = bundle_re.match(n)
        if mb:
            release, bundle = mb["name"], n
    for base in lists:
        archives.setdefault(base, [])
    return Names(release, bundle, archives, lists, all_list)


def discover_arches(directory: Path) -> list[str]:
    """Arches with a checksum file or with any artifact named ``*.linux-ARCH.*``."""
    found: set[str] = set()
    for p in directory.iterdir():
        if p.name.startswith("."):
            continue
        if (mt := _SUMS.match(p.name)) or (mt := _ARCH_IN_NAME.search(p.name)):
            if mt["arch"] in KNOWN_ARCHES:
                found.add(mt["arch"])
    return sorted(found)


def artifact_files(directory: Path, arch: str) -> list[str]:
    """Regular files in ``directory`` that belong to ``arch`` (what must be in its checksum file)."""
    out = []
    for p in directory.iterdir():
        if p.name.startswith(".") or not p.is_file():
            continue
        mt = _ARCH_IN_NAME.search(p.name)
        if mt and mt["arch"] == arch:
            out.append(p.name)
    return sorted(out)


def _short(exc: BaseException) -> str:
    if isinstance(exc, BuilderError):
        return exc.message
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


# -- signature and checksums -------------------------------------------------------------------

def _check_signature(directory: Path, arch: str, key: PublicKey | None, require: bool,
                     report: VerifyReport) -> None:
    sums = directory / checksums.checksum_name(arch)
    sig = sums.with_name(sums.name + SIG_SUFFIX)
    report.signed[arch] = False
    if key is None:
        if require:
            report.add(sums.name, "a signature is required but no public key was given "
                                  "(pass --public-key)")
        elif sig.exists():
            report.notes.append(f"{sig.name} present but not checked (no --public-key)")
        return
    if not sig.is_file():
        report.add(sig.name, "missing: the checksum file is not signed")
        return
    if not sums.is_file():
        return  # reported by the checksum step
    try:
        verify_signature(sums, sig, key)
        report.signed[arch] = True
    except BuilderError as exc:
        report.add(sums.name, f"signature {sig.name} does not verify with the given public key "
                              "(the file or signature changed, or another key signed it)"
                   if "does not verify" in exc.message else exc.message)


def _check_sums(directory: Path, arch: str, report: VerifyReport) -> list[str]:
    """Check every listed file and that every present artifact is listed; returns listed names."""
    sums = directory / checksums.checksum_name(arch)
    try:
        entries = checksums.parse_file(sums)
    except BuilderError as exc:
        report.add(sums.name, exc.message.removeprefix(f"{sums}: ").removeprefix(f"{sums} "))
        return []
    listed = {e.name: e.hex for e in entries}
    for name, hex_value in sorted(listed.items()):
        path = directory / name
        if not path.is_file():
            report.add(name, f"listed in {sums.name} but missing")
            continue
        actual = dg.hex_of(dg.of_file(path)[0])
        if actual != hex_value:
            report.add(name, f"checksum mismatch: {sums.name} says {hex_value}, file has {actual}")
        report.checked.append(name)
    for name in artifact_files(directory, arch):
        if name not in listed:
            report.add(name, f"not listed in {sums.name}: an artifact nobody vouched for")
    return sorted(listed)


# -- archives ----------------------------------------------------------------------------------

def _check_archive(path: Path, arch: str, report: VerifyReport) -> list[ArchivedImage] | None:
    try:
        images = read_archive_index(path, verify=True)
    except Exception as exc:  # corrupt zstd/deflate streams raise non-Builder errors
        report.add(path.name, f"archive check failed: {_short(exc)}")
        return None
    want = m.Platform.for_arch(arch)
    blobs: dict[str, bytes] | None = None
    for img in images:
        platform = img.platform
        if platform is None:
            # `docker save` style index.json without platforms: the config says it.
            try:
                blobs = json_blobs(path) if blobs is None else blobs
                platform = config_platform(blobs, img.manifest_digest, path.name)
            except Exception as exc:
                report.add(path.name, f"{img.name}: no platform in index.json and none readable "
                                      f"from its config: {_short(exc)}")
                continue
        if not platform.matches(want):
            report.add(path.name, f"{img.name}: platform {platform}, expected {want} "
                                  f"for a linux-{arch} archive")
    if not images:
        report.add(path.name, "holds no images")
    return images


def _read_lines(path: Path, report: VerifyReport) -> list[str] | None:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        report.add(path.name, "missing")
        return None
    except UnicodeDecodeError as exc:
        report.add(path.name, f"not UTF-8 text at byte {exc.start}")
        return None
    if text and not text.endswith("\n"):
        report.add(path.name, "last line has no newline (truncated?)")
    return [line for line in text.splitlines() if line]


def json_blobs(path: Path, limit: int = MANIFEST_LIMIT) -> dict[str, bytes]:
    """Every small JSON blob (manifests, configs) of an image archive, digest-checked, in one pass."""
    out: dict[str, bytes] = {}
    with open_maybe_compressed(path) as stream, \
            tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
        for info in tar:
            name = posixpath.normpath(info.name).removeprefix("./")
            if not name.startswith("blobs/sha256/") or not info.isfile() or info.size > limit:
                continue
            fh = tar.extractfile(info)
            assert fh is not None
            data = fh.read()
            if not data.startswith(b"{"):
                continue
            digest = dg.from_hex(name.rsplit("/", 1)[1])
            if dg.of_bytes(data) != digest:
                raise BuilderError(f"{path.name}: {name} does not hash to its name")
            out[digest] = data
    return out


def config_platform(blobs: dict[str, bytes], manifest: str, where: str) -> m.Platform:
    """The platform an image's config says (for archives whose index.json names none)."""
    if manifest not in blobs:
        raise BuilderError(f"{where}: manifest {manifest} not in the archive")
    doc = m.parse_document(blobs[manifest], f"{where}: {manifest}")
    if isinstance(doc, m.Index):
        raise BuilderError(f"{where}: {manifest} is an index, expected an image manifest")
    if doc.config.digest not in blobs:
        raise BuilderError(f"{where}: config {doc.config.digest} not in the archive")
    return m.parse_config(blobs[doc.config.digest], f"{where}: {doc.config.digest}").platform


# -- bundle ------------------------------------------------------------------------------------

def read_release_env(bundle: Path) -> tuple[str, dict[str, str]]:
    """(member name, values) of the bundle's ``share/NAME/release.env``; members are checked."""
    found: list[tuple[str, bytes]] = []
    with open_maybe_compressed(bundle) as stream, \
            tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
        for info in tar:
            clean = posixpath.normpath(info.name)
            if info.name.startswith("/") or clean == ".." or clean.startswith("../"):
                raise BuilderError(f"member {info.name!r} leaves the bundle root")
            if info.issym() or info.islnk():
                target = posixpath.normpath(posixpath.join(posixpath.dirname(clean), info.linkname))
                if info.linkname.startswith("/") or target.startswith(".."):
                    raise BuilderError(f"link {info.name!r} points outside the bundle")
            parts = clean.split("/")
            if len(parts) == 3 and parts[0] == "share" and parts[2] == "release.env" and info.isfile():
                if info.size > RELEASE_ENV_LIMIT:
                    raise BuilderError(f"{clean} is larger than {RELEASE_ENV_LIMIT} bytes")
                fh = tar.extractfile(info)
                assert fh is not None
                found.append((clean, fh.read()))
    if len(found) != 1:
        raise BuilderError(f"holds {len(found)} share/*/release.env files, expected exactly one")
    name, raw = found[0]
    values: dict[str, str] = {}
    for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
            raise BuilderError(f"{name} line {number}: not KEY='value': {line[:80]!r}")
        try:
            words = shlex.split(value)
        except ValueError:
            raise BuilderError(f"{name} line {number}: unbalanced quotes") from None
        values[key] = " ".join(words)
    return name, values


def data_key(runtime_image: str) -> str:
    """install.sh's data directory key: the image tag plus 12 hex of sha256(reference)."""
    tag = runtime_image.rsplit(":", 1)[1]
    return f"{tag}-{hashlib.sha256(runtime_image.encode()).hexdigest()[:12]}"


def _check_bundle(directory: Path, arch: str, names: Names,
                  contents: dict[str, list[ArchivedImage]], report: VerifyReport) -> None:
    if names.bundle is None:
        report.add(checksums.checksum_name(arch), f"no bundle (NAME.linux-{arch}.tar.gz) listed")
        return
    bundle = directory / names.bundle
    try:
        member, env = read_release_env(bundle)
    except Exception as exc:
        report.add(names.bundle, f"release.env unreadable: {_short(exc)}")
        return
    where = f"{member}"

    def bad(message: str) -> None:
        report.add(names.bundle, f"{where}: {message}")

    required = ("RELEASE_NAME", "RELEASE_VERSION", "RELEASE_ARCH", "RUNTIME_IMAGE",
                "RUNTIME_MANIFEST", "RUNTIME_LAYERS", "RUNTIME_ARCHIVE", "DATA_KEY",
                "DEFAULT_IMAGES", "IMAGE_GROUPS")
    missing = [k for k in required if k not in env]
    if missing:
        bad(f"missing {', '.join(missing)}")
        return
    if env["RELEASE_ARCH"] != arch:
        bad(f"RELEASE_ARCH is {env['RELEASE_ARCH']!r}, expected {arch!r} (file name)")
    if env["RELEASE_NAME"] != names.release:
        bad(f"RELEASE_NAME is {env['RELEASE_NAME']!r}, the bundle is named for {names.release!r}")
    if member != f"share/{env['RELEASE_NAME']}/release.env":
        bad(f"expected at share/{env['RELEASE_NAME']}/release.env")
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
    group_bases = {f"{names.release}-images-{g}.linux-{arch}" for g in groups}
    present = {b for b in names.archives if b != env["DEFAULT_IMAGES"]}
    for b in sorted(group_bases - set(names.archives)):
        bad(f"IMAGE_GROUPS names {b}, which is not here")
    for b in sorted(present - group_bases):
        bad(f"archive {b} is not in IMAGE_GROUPS")
    # The runtime image: in RUNTIME_ARCHIVE (every readable compression) with that manifest.
    base = env["RUNTIME_ARCHIVE"]
    manifest = env["RUNTIME_MANIFEST"]
    if not dg.is_digest(manifest):
        bad(f"RUNTIME_MANIFEST {manifest!r} is not a sha256 digest")
        return
    source: Path | None = None
    for file in names.archives.get(base, []):
        images = contents.get(file)
        if images is None:
            continue  # unreadable: already reported for that file
        hits = [i for i in images if i.name == image]
        if not hits:
            bad(f"RUNTIME_IMAGE {image} is not in {file}")
        elif hits[0].manifest_digest != manifest:
            bad(f"RUNTIME_MANIFEST is {manifest}, {file} holds {image} as "
                f"{hits[0].manifest_digest}")
        elif source is None:
            source = directory / file
    if source is None:
        return
    try:
        blobs = json_blobs(source)
        if manifest not in blobs:
            raise BuilderError(f"has no blob {manifest}")
        doc = m.parse_document(blobs[manifest], f"{source.name}: {manifest}")
    except Exception as exc:
        report.add(source.name, f"runtime manifest {manifest}: {_short(exc)}")
        return
    if isinstance(doc, m.Index):
        report.add(source.name, f"runtime manifest {manifest} is an index, not an image")
        return
    layers = [d.digest for d in doc.layers]
    if env["RUNTIME_LAYERS"].split() != layers:
        bad(f"RUNTIME_LAYERS is {env['RUNTIME_LAYERS']!r}, the manifest in {source.name} has "
            f"{' '.join(layers)!r}")


# -- one arch ----------------------------------------------------------------------------------

def _verify_arch(directory: Path, arch: str, key: PublicKey | None, require: bool,
                 report: VerifyReport) -> None:
    sums = directory / checksums.checksum_name(arch)
    if not sums.is_file():
        report.add(sums.name, "missing: nothing vouches for this arch's artifacts")
    _check_signature(directory, arch, key, require, report)
    listed = _check_sums(directory, arch, report) if sums.is_file() else []
    names = classify(arch, set(listed) | set(artifact_files(directory, arch)))
    contents: dict[str, list[ArchivedImage]] = {}
    for base, files in sorted(names.archives.items()):
        for suffix in ARCHIVE_SUFFIXES:
            if f"{base}{suffix}" not in files:
                report.add(f"{base}{suffix}", "missing: every image archive comes as "
                                              ".tar.zst and .tar.gz")
        held: dict[str, list[tuple[str, str]]] = {}
        for file in files:
            path = directory / file
            if not path.is_file():
                continue  # reported as missing by the checksum step
            images = _check_archive(path, arch, report)
            if images is not None:
                contents[file] = images
                held[file] = sorted((i.name, i.manifest_digest) for i in images)
        if len({tuple(v) for v in held.values()}) > 1:
            report.add(files[0], f"{' and '.join(sorted(held))} hold different images")
        txt = names.lists.get(base)
        if txt is None:
            report.add(f"{base}.txt", "missing: every archive has a .txt list of its images")
            continue
        lines = _read_lines(directory / txt, report)
        if lines is None:
            continue
        if len(set(lines)) != len(lines):
            report.add(txt, "lists an image twice")
        for file, pairs in sorted(held.items()):
            in_archive = sorted(n for n, _ in pairs)
            if sorted(lines) != in_archive:
                report.add(txt, f"lists {sorted(set(lines) - set(in_archive)) or 'no extra'}"
                                f" not in {file}, and misses {sorted(set(in_archive) - set(lines)) or 'nothing'}")
    if names.all_list is None:
        if names.lists:
            report.add(f"{names.release or 'NAME'}-images-all.linux-{arch}.txt", "missing")
    else:
        lines = _read_lines(directory / names.all_list, report)
        union: set[str] = set()
        for txt in names.lists.values():
            if (directory / txt).is_file():
                union.update(line for line in (directory / txt).read_text(errors="replace")
                             .splitlines() if line)
        if lines is not None and lines != sorted(union):
            report.add(names.all_list, "is not the sorted union of the per-archive lists "
                                       f"(extra {sorted(set(lines) - union)}, "
                                       f"missing {sorted(union - set(lines))})")
    _check_bundle(directory, arch, names, contents, report)


def verify_release(directory: Path, arches: Iterable[str] | None = None,
                   public_key: Path | PublicKey | None = None,
                   require_signature: bool = False) -> VerifyReport:
    """Check a release directory; returns the report (``raise_if_failed`` for an exception)."""
    directory = Path(directory)
    report = VerifyReport(directory)
    if not directory.is_dir():
        report.add(str(directory), "not a directory")
        return report
    key = load_public_key(public_key) if isinstance(public_key, Path) else public_key
    wanted = list(dict.fromkeys(arches or [])) or discover_arches(directory)
    for arch in wanted:
        if arch not in KNOWN_ARCHES:
            raise BuilderError(f"unknown arch {arch!r}", f"known arches: {', '.join(KNOWN_ARCHES)}")
    report.arches = wanted
    for arch in wanted:
        _verify_arch(directory, arch, key, require_signature, report)
    return report
