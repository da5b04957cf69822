"""Fixtures for install.sh tests: a scratch target, signing keys, tree snapshots, tmpfs, a private
mount namespace with "running" systemd and a recording systemctl, install.sh's functions without
its main, an nginx that answers redirects (a channel server), and the delta of the realistic
update (``delta``). The releases they install are real builds (tests/plugins/releases.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from builder import artifacts
from builder.trust import delta as D
from builder.trust import sign
from tests.plugins.built import Built
from tests.plugins.releases import Release, UpdatePair, one_arch
from tests.rig.fileserver import CONF as NGINX_CONF
from tests.rig.procs import Process, free_port, wait_for

REPO = Path(__file__).resolve().parent.parent.parent
INSTALL_SH = REPO / "install.sh"
SHELLS = {"dash": ["dash"], "busybox": ["busybox", "sh"]}


def needs_tools(*extra: str) -> pytest.MarkDecorator:
    """Skip an installer test module on a machine without the tools install.sh runs under."""
    needed = ("dash", "busybox", "zstd", "gzip", "tar", "sha256sum", "openssl", *extra)
    missing = [t for t in needed if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")


def upper(name: str) -> str:
    return name.upper().replace("-", "_").replace(".", "_")


def snapshot(root: Path, dir_mtimes: bool = True) -> dict[str, tuple]:
    """Every entry under root (root included): type, mode, owner, size, mtime, content digest.

    ``dir_mtimes=False`` leaves out directory mtimes: a directory that held a staged temp file
    (or an installed file, for uninstall) gets a new mtime even when its content is as before.
    """
    out: dict[str, tuple] = {}

    def record(path: Path) -> None:
        st = path.lstat()
        rel = path.relative_to(root).as_posix()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("l", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("d", st.st_mode, st.st_uid, st.st_gid,
                        st.st_mtime_ns if dir_mtimes else None)
        else:
            out[rel] = ("f", st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                        hashlib.sha256(path.read_bytes()).hexdigest())

    record(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            record(Path(dirpath) / name)
    return out


@dataclass
class Target:
    """A scratch root holding prefix, data dir and images dir, plus the installer's TMPDIR."""

    root: Path
    tmp: Path

    def prefix(self, name: str = "rke2") -> Path:
        return self.root / "usr" / "local"

    def data_dir(self, name: str = "rke2") -> Path:
        return self.root / "var" / "lib" / "rancher" / name

    def images_dir(self, name: str = "rke2") -> Path:
        return self.data_dir(name) / "agent" / "images"

    def env(self, release: Release, *, raw: dict[str, str | None] | None = None,
            **settings: str) -> dict[str, str]:
        """The installer's environment: INSTALL_<NAME>_<KEY> for each setting, then ``raw``
        (plain variables such as ARCH or PATH; None removes one)."""
        up = upper(release.name)
        env = {"PATH": os.environ["PATH"], "TMPDIR": str(self.tmp), "HOME": str(self.tmp),
               "ARCH": release.arch, f"INSTALL_{up}_ARTIFACT_PATH": str(release.directory),
               f"INSTALL_{up}_TAR_PREFIX": str(self.prefix(release.name)),
               f"INSTALL_{up}_DATA_DIR": str(self.data_dir(release.name))}
        # A signed release is installed with its key unless the test chooses otherwise.
        sig = release.directory / f"sha256sum-{release.arch}.txt.sig"
        if release.public_key is not None and sig.exists() and not {"PUBLIC_KEY", "SKIP_SIGNATURE"} & settings.keys():
            env[f"INSTALL_{up}_PUBLIC_KEY"] = str(release.public_key)
        env.update({f"INSTALL_{up}_{key}": value for key, value in settings.items()})
        for key, value in (raw or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def run(self, env: dict[str, str], shell: str = "dash") -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*SHELLS[shell], str(INSTALL_SH)], env=env, cwd=self.tmp,
                              capture_output=True, text=True, timeout=120)
        # The installer's private work dir must be gone whatever happened.
        leftovers = [p.name for p in self.tmp.iterdir() if p.name.startswith("install.")]
        assert not leftovers, f"installer left {leftovers} in TMPDIR"
        return proc

    def install(self, release: Release, shell: str = "dash", *,
                raw: dict[str, str | None] | None = None,
                **settings: str) -> subprocess.CompletedProcess[str]:
        return self.run(self.env(release, raw=raw, **settings), shell)

    def uninstall(self, name: str = "rke2", shell: str = "dash", **env: str) -> subprocess.CompletedProcess[str]:
        """PREFIX/bin/NAME-uninstall.sh, without killall; ``env`` adds variables (e.g. RKE2_DATA_DIR)."""
        script = self.prefix(name) / "bin" / f"{name}-uninstall.sh"
        env = {"PATH": os.environ["PATH"], "TMPDIR": str(self.tmp), "UNINSTALL_SKIP_KILLALL": "true", **env}
        return subprocess.run([*SHELLS[shell], str(script)], env=env, capture_output=True,
                              text=True, timeout=60)

    def snapshot(self, dir_mtimes: bool = True) -> dict[str, tuple]:
        return snapshot(self.root, dir_mtimes)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def failed(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode != 0, f"expected failure\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in stderr:\n{proc.stderr}"
    return proc.stderr


@contextmanager
def tmpfs(mountpoint: Path, size: str, *options: str) -> Iterator[Path]:
    """Mount a tmpfs (skips the test when mounting is not permitted); always unmounted."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    opts = ",".join([f"size={size}", "mode=0755", *options])
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mountpoint)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def tools_without(names: set[str], where: Path) -> str:
    """A PATH of symlinks to every tool on PATH except ``names`` (to hide zstd, openssl...)."""
    where.mkdir(parents=True, exist_ok=True)
    for directory in reversed(os.environ["PATH"].split(os.pathsep)):
        d = Path(directory)
        if not d.is_dir():
            continue
        for tool in d.iterdir():
            if tool.name not in names and (where / tool.name).exists() is False:
                (where / tool.name).symlink_to(tool)
    return str(where)


@pytest.fixture(scope="session")
def fixture_signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[sign.PrivateKey, Path]:
    d = tmp_path_factory.mktemp("key")
    paths = sign.generate_key(d / "release.key", passphrase=b"fixture")
    return sign.load_private_key(paths.private, b"fixture"), paths.public


@pytest.fixture(scope="session")
def fixture_other_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[sign.PrivateKey, Path]:
    d = tmp_path_factory.mktemp("otherkey")
    paths = sign.generate_key(d / "other.key", passphrase=b"other")
    return sign.load_private_key(paths.private, b"other"), paths.public


@pytest.fixture(scope="session")
def fixture_ecdsa_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[sign.PrivateKey, Path]:
    """An ECDSA P-256 release key (install.sh verifies it with `openssl dgst -sha256`)."""
    d = tmp_path_factory.mktemp("ecdsakey")
    paths = sign.generate_key(d / "ecdsa.key", passphrase=b"ecdsa", algorithm="ecdsa-p256")
    return sign.load_private_key(paths.private, b"ecdsa"), paths.public


@pytest.fixture
def scratch_target(tmp_path: Path) -> Target:
    root = tmp_path / "root"
    root.mkdir()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # Something that was there before: it must survive install and uninstall untouched.
    (root / "usr" / "local" / "bin").mkdir(parents=True)
    (root / "usr" / "local" / "bin" / "other-tool").write_text("#!/bin/sh\n")
    return Target(root, tmp)


@dataclass(frozen=True)
class Delta:
    """The realistic update (tests/plugins/releases.py ``update_pair``, amd64) and the delta
    directory `build --since BASE` writes for it, signed like a release (`sign DIR`)."""

    base: Release  # V1, what the node installed
    new: Release  # the patch release, full
    media: Release  # the delta directory (holds the patch's checksum file, bundle, lists)
    pair: UpdatePair

    @property
    def description(self) -> D.Description:
        name = artifacts.delta_description_name("amd64")
        return D.parse((self.media.directory / name).read_bytes(), name)


def make_delta(fetched: Built, pair: UpdatePair, key: tuple[sign.PrivateKey, Path],
               work: Path) -> Delta:
    base = pair.base["amd64"]
    patch = dataclasses.replace(fetched, lock=pair.lock)
    patch.cli("build", "-q", "--arch", "amd64", "--artifacts", str(work / "new"),
              "--since", str(base.directory), "--delta-out", str(work / "delta"))
    sign.sign_checksums(work / "delta", key[0])
    new = one_arch(work / "new", "amd64", work / "full", key)
    # The delta completes into this build (the same checksum file); its image archives are the
    # fixture's patch release's (only the provenance says how each build was invoked).
    assert (work / "delta" / artifacts.checksum_name("amd64")).read_bytes() == new.sums.read_bytes()
    for name in new.files:
        if name.endswith((".tar.zst", ".tar.gz")) and "-images" in name:
            assert new.path(name).read_bytes() == pair.patch["amd64"].path(name).read_bytes(), name
    return Delta(base, new, Release.read(work / "delta", "amd64", key[1]), pair)


@pytest.fixture(scope="session")
def delta(fetched: Built, update_pair: UpdatePair, fixture_signing_key,
          tmp_path_factory: pytest.TempPathFactory) -> Delta:
    """The realistic update's delta (see Delta), for install.sh's delta tests."""
    return make_delta(fetched, update_pair, fixture_signing_key,
                      tmp_path_factory.mktemp("install-delta"))


def install_functions(script: str, shell: str = "dash", **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` after install.sh's definitions (the script without its last line,
    ``main "$@"``), so a test calls the installer's own functions."""
    text = INSTALL_SH.read_text()
    tail = 'main "$@"\n'
    assert text.endswith(tail), "install.sh must end with main \"$@\""
    return subprocess.run([*SHELLS[shell], "-c", text[: -len(tail)] + script],
                          env={"PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True, timeout=30)


# A private mount namespace (and network namespace, so killall cannot touch the host) in which
# /run/systemd/system exists: install.sh and the uninstaller see a running systemd.
SYSTEMD_NS = """
mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system || exit 99
exec "$@"
"""


def in_systemd_namespace(argv: list[str], env: dict[str, str],
                         setup: str = "") -> subprocess.CompletedProcess[str]:
    """Run argv in the namespace; ``setup`` is shell run first (more mounts); exit 99 skips."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    proc = subprocess.run(["unshare", "-m", "-n", "sh", "-c", setup + SYSTEMD_NS, "sh", *argv],
                          env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode == 99 or "unshare failed" in proc.stderr:
        pytest.skip(f"cannot make a private mount namespace here: {proc.stderr.strip()}")
    return proc


@pytest.fixture
def fake_systemctl(tmp_path: Path) -> tuple[str, Path]:
    """A PATH whose systemctl records its arguments (a line per call) in the returned log."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    log = tmp_path / "systemctl.log"
    script = bin_dir / "systemctl"
    script.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    script.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}", log


@contextmanager
def nginx_redirecting(root: Path, work: Path, redirects: dict[str, str]) -> Iterator[str]:
    """The rig's nginx (tests/rig/fileserver.py's config) serving ``root``, plus one ``return 302``
    location per entry of ``redirects`` (path -> target): a real channel server. Yields its URL."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    locations = "".join(f"        location = {path} {{ return 302 {target}; }}\n"
                        for path, target in redirects.items())
    conf = NGINX_CONF.format(work=work, port=port, root=root)
    conf = conf.replace("        autoindex on;\n", "        autoindex on;\n" + locations)
    (work / "nginx.conf").write_text(conf)
    proc = Process([nginx, "-p", str(work), "-c", str(work / "nginx.conf")], work / "nginx.out").start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(url + "/", timeout=1).status_code < 500, "nginx",
                 proc=proc.proc, log=work / "error.log")
        yield url
    finally:
        proc.stop()
