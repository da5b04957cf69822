"""The release's rules: what its files are called, which arches exist, what release.env holds.

One home for every rule the builder, ``verify``, ``release``, ``pull-release`` and ``install.sh``
must agree on. ``tests/test_artifacts.py`` pins them against upstream's real values and against
what ``install.sh`` computes, so the shell and the Python cannot drift. Nothing here imports the
rest of the builder: every stage may use it.

A release directory holds, per arch (``NAME`` the release name, ``GROUP`` an image group)::

    NAME.linux-ARCH.tar.gz                      the bundle (bin/, lib/, share/NAME/release.env)
    NAME-images.linux-ARCH.{tar.zst,tar.gz,txt}  the all-in-one image archive and its list
    NAME-images-GROUP.linux-ARCH.{tar.zst,tar.gz,txt}
    NAME-images-all.linux-ARCH.txt              the sorted union of every list
    provenance.linux-ARCH.json                  the in-toto statement (listed in the checksums)
    sha256sum-ARCH.txt                          pins every file above
    sha256sum-ARCH.txt.sig, provenance.linux-ARCH.dsse.json   signatures (``sign``)

A delta directory (``build --since PREV``) holds the same files but the image archives, and
instead of each ``X.tar.zst`` / ``X.tar.gz`` its delta archive ``X.delta.tar.zst`` /
``X.delta.tar.gz`` and one description per arch, ``delta.linux-ARCH.txt`` (none of them listed in
the checksum file: the archives they rebuild are).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# -- the arch vocabulary ----------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """One arch a lock may name, as every layer spells it."""

    name: str  # the release's spelling: file names, the lock, release.env, install.sh
    architecture: str  # OCI/Go platform architecture
    variant: str | None  # OCI platform variant
    elf_machine: int  # e_machine of its ELF binaries (ELF spec)
    machines: tuple[str, ...]  # what `uname -m` / platform.machine() say on such a host
    installer: bool  # install.sh installs it (upstream ships no ppc64le RKE2)


ARCHES: dict[str, Arch] = {a.name: a for a in (
    Arch("amd64", "amd64", None, 62, ("x86_64", "amd64"), True),
    Arch("arm64", "arm64", "v8", 183, ("aarch64", "arm64"), True),
    Arch("s390x", "s390x", None, 22, ("s390x",), True),
    Arch("ppc64le", "ppc64le", None, 21, ("ppc64le",), False),
)}
KNOWN_ARCHES = tuple(ARCHES)
INSTALLER_ARCHES = tuple(a.name for a in ARCHES.values() if a.installer)
ARCH_PLATFORM = {a.name: (a.architecture, a.variant) for a in ARCHES.values()}
ELF_MACHINES = {a.elf_machine: a.name for a in ARCHES.values()}
HOST_ARCH = {machine: a.name for a in ARCHES.values() for machine in a.machines}

# -- file names -------------------------------------------------------------------------------

IMAGE_ARCHIVE_SUFFIXES = (".tar.zst", ".tar.gz")  # every image archive ships as both
LIST_SUFFIX = ".txt"
IMAGE_SUFFIXES = (*IMAGE_ARCHIVE_SUFFIXES, LIST_SUFFIX)
SIG_SUFFIX = ".sig"
RELEASE_ENV = "release.env"
ALL_GROUP = "all"  # NAME-images-all.linux-ARCH.txt: the union list, never an archive


def images_base(release: str, arch: str, group: str | None = None) -> str:
    """The image archive's name without suffix: ``NAME-images[-GROUP].linux-ARCH``."""
    return f"{release}-images.linux-{arch}" if group is None \
        else f"{release}-images-{group}.linux-{arch}"


def image_files(base: str) -> tuple[str, str, str]:
    """(.tar.zst, .tar.gz, .txt) of one image archive base."""
    return (f"{base}.tar.zst", f"{base}.tar.gz", f"{base}.txt")


def all_list_name(release: str, arch: str) -> str:
    return images_base(release, arch, ALL_GROUP) + LIST_SUFFIX


def bundle_name(release: str, arch: str) -> str:
    return f"{release}.linux-{arch}.tar.gz"


def release_env_member(release: str) -> str:
    """Where the bundle holds the release description."""
    return f"share/{release}/{RELEASE_ENV}"


def checksum_name(arch: str) -> str:
    """The checksum file's name for one arch, e.g. ``sha256sum-amd64.txt``."""
    return f"sha256sum-{arch}.txt"


def signature_name(arch: str) -> str:
    """The detached signature of the checksum file."""
    return checksum_name(arch) + SIG_SUFFIX


def statement_name(arch: str) -> str:
    """The provenance statement (an in-toto JSON document, listed in the checksum file)."""
    return f"provenance.linux-{arch}.json"


def envelope_name(arch: str) -> str:
    """The DSSE envelope ``sign`` wraps the statement in (signed itself, not listed)."""
    return f"provenance.linux-{arch}.dsse.json"


DELTA_INFIX = ".delta"  # X.tar.zst -> X.delta.tar.zst: a delta archive of the image archive X


def delta_archive_name(file: str) -> str:
    """The delta archive of image archive ``file`` (``X.tar.zst`` → ``X.delta.tar.zst``, ``X.tar.gz``
    → ``X.delta.tar.gz``): the frames a delta carries of it (builder.assemble.delta)."""
    for suffix in IMAGE_ARCHIVE_SUFFIXES:
        if file.endswith(suffix):
            return file.removesuffix(suffix) + DELTA_INFIX + suffix
    raise ValueError(f"{file!r} is not an image archive name (.tar.zst or .tar.gz)")


def delta_description_name(arch: str) -> str:
    """What a delta directory holds per arch beside the new checksum file: how each image archive
    is rebuilt from the base release's and the delta's (builder.trust.delta)."""
    return f"delta.linux-{arch}.txt"


def is_delta_file(name: str) -> bool:
    """A file only a delta directory has: a description or a delta archive (never listed in a
    checksum file: the rebuilt archives are, and they are what a delta proves)."""
    return bool(DELTA_DESCRIPTION_PATTERN.fullmatch(name)) or any(
        name.endswith(DELTA_INFIX + suffix) for suffix in IMAGE_ARCHIVE_SUFFIXES)


def shard_manifest_name(arch: str) -> str:
    """What ``build --shard`` writes beside one arch's artifacts for ``merge``."""
    return f"shard-{arch}.json"


# Every pattern is applied with fullmatch (or search for a fragment): `$` would accept "x\n".
SUMS_PATTERN = re.compile(r"sha256sum-(?P<arch>[a-z0-9]+)\.txt(?:\.sig)?")
SHARD_PATTERN = re.compile(r"shard-(?P<arch>[a-z0-9]+)\.json")
DELTA_DESCRIPTION_PATTERN = re.compile(r"delta\.linux-(?P<arch>[a-z0-9]+)\.txt")
_ARCH_IN_NAME = re.compile(r"\.linux-(?P<arch>[a-z0-9]+)\.")


def arch_of(name: str) -> str | None:
    """The known arch a release file belongs to, from ``*.linux-ARCH.*`` or ``sha256sum-ARCH``."""
    mt = SUMS_PATTERN.fullmatch(name) or _ARCH_IN_NAME.search(name)
    return mt["arch"] if mt and mt["arch"] in ARCHES else None


def discover_arches(directory: Path) -> list[str]:
    """Arches with a checksum file or with any artifact named ``*.linux-ARCH.*``."""
    return sorted({a for p in directory.iterdir()
                   if not p.name.startswith(".") and (a := arch_of(p.name))})


@dataclass(frozen=True)
class Names:
    """Base names of one arch's artifacts, by kind (parsed from file names)."""

    release: str | None  # NAME, from NAME.linux-ARCH.tar.gz
    bundle: str | None
    archives: dict[str, list[str]]  # base → the archive files present/listed
    lists: dict[str, str]  # base → its .txt
    all_list: str | None


def classify(arch: str, names: Iterable[str]) -> Names:
    """Sort one arch's file names into bundle, image archives, lists and the union list."""
    images = re.compile(rf"(?P<base>(?P<name>.+?)-images(?:-(?P<group>.+?))?\.linux-{arch})"
                        rf"(?P<ext>\.tar\.zst|\.tar\.gz|\.txt)")
    bundle_re = re.compile(rf"(?P<name>.+)\.linux-{arch}\.tar\.gz")
    archives: dict[str, list[str]] = {}
    lists: dict[str, str] = {}
    release = bundle = all_list = None
    names = sorted(set(names))
    archive_bases = {mt["base"] for n in names if (mt := images.fullmatch(n)) and mt["ext"] != ".txt"}
    for n in names:
        mt = images.fullmatch(n)
        if mt:
            if mt["ext"] == LIST_SUFFIX:
                if mt["group"] == ALL_GROUP and mt["base"] not in archive_bases:
                    all_list = n
                else:
                    lists[mt["base"]] = n
            else:
                archives.setdefault(mt["base"], []).append(n)
            continue
        mb = bundle_re.fullmatch(n)
        if mb:
            release, bundle = mb["name"], n
    for base in lists:
        archives.setdefault(base, [])
    return Names(release, bundle, archives, lists, all_list)


# -- the release description (share/NAME/release.env) ----------------------------------------

# Exactly what bundle.ReleaseInfo.env() writes, one KEY='value' line each, in this order; what
# verify's parser and install.sh's parse_release_env accept.
RELEASE_ENV_KEYS = ("RELEASE_NAME", "RELEASE_VERSION", "RELEASE_ARCH", "RUNTIME_IMAGE",
                    "RUNTIME_MANIFEST", "RUNTIME_LAYERS", "RUNTIME_ARCHIVE", "DATA_KEY",
                    "DEFAULT_IMAGES", "IMAGE_GROUPS")


def _without_registry(ref: str) -> str:
    """The reference as the supervisor's compile-time default spells it: no registry host.

    Docker's naming rule: the first path component is a registry host when it holds a '.' or ':'
    or is ``localhost``.
    """
    first, sep, rest = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return rest
    return ref


def data_key(runtime_ref: str) -> str:
    """The directory name under ``DATA_DIR/data`` the supervisor gives a runtime image.

    Upstream's ``releaseRefDigest`` (rancher/rke2 ``pkg/bootstrap``) hashes the text of the
    reference it was built with, ``rancher/rke2-runtime:TAG`` — the registry a node pulls from
    does not change the key. So: TAG, '-', the first 12 hex digits of sha256 of the reference
    without its registry host.
    """
    path = _without_registry(runtime_ref)
    repo, sep, tag = path.rpartition(":")
    if not sep or "/" in tag or "@" in path:
        raise ValueError(f"runtime image {runtime_ref!r} is not a reference by tag")
    return f"{tag}-{hashlib.sha256(path.encode()).hexdigest()[:12]}"
