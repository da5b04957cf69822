"""install.sh and NAME-uninstall.sh against upstream RKE2's semantics (rancher/rke2 v1.32.13+rke2r1:
install.sh, pkg/bootstrap/bootstrap.go, bundle/bin/rke2-uninstall.sh):

- the runtime is staged under the supervisor's data key (TAG-<12 hex of sha256 of the reference
  without its registry>), pinned by two directory names real nodes carry;
- the unit is neither enabled nor started unless asked; SKIP_RELOAD, METHOD, EXEC, CHANNEL;
- the tarball prefix is /opt/NAME when /usr/local is read-only or a mount point (real mounts);
- uninstall after a bare `tar xzf` of the bundle (no installed-files manifest).

Everything runs the real install.sh under dash and busybox sh with the real tools; systemd is a
private mount namespace with /run/systemd/system and a recording systemctl (a real systemd
cannot be run per test), the channel server is the rig's real nginx answering a redirect.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from builder.artifacts import data_key
from tests import tamper
from tests.plugins.install import (
    INSTALL_SH,
    SHELLS,
    Target,
    failed,
    in_systemd_namespace,
    install_functions,
    needs_tools,
    nginx_redirecting,
    ok,
    tmpfs,
    tools_without,
)
from tests.plugins.releases import V1, V2, Release

pytestmark = needs_tools()


# --- 1. the supervisor's data key ---------------------------------------------------------------

# Directory names real RKE2 nodes carry under /var/lib/rancher/rke2/data/.
REAL_KEYS = {
    "v1.21.5-rke2r2": "v1.21.5-rke2r2-92b1ca9704d2",
    "v1.24.9-rke2r2": "v1.24.9-rke2r2-154c18a3ccf5",
}


def data_key_of(ref: str, shell: str = "dash") -> str:
    """install.sh's own runtime_data_key for ``ref`` (or 'refused: <why>')."""
    proc = install_functions(f"if runtime_data_key '{ref}'; then echo \"$RUNTIME_KEY\"; "
                             "else echo \"refused: $KEY_ERROR\"; fi", shell)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("tag", sorted(REAL_KEYS))
def test_data_key_is_the_supervisors(tag: str, shell: str) -> None:
    """The registry is not part of the hashed text: every spelling gives the real key."""
    for ref in (f"docker.io/rancher/rke2-runtime:{tag}", f"rancher/rke2-runtime:{tag}",
                f"registry.example:5000/rancher/rke2-runtime:{tag}",
                f"localhost/rancher/rke2-runtime:{tag}"):
        assert data_key_of(ref, shell) == REAL_KEYS[tag], ref


@pytest.mark.parametrize("ref, why", [
    ("docker.io/rancher/rke2-runtime@sha256:" + "a" * 64, "pinned by digest"),
    ("docker.io/rancher/rke2-runtime", "has no tag"),
    ("docker.io/rancher/rke2-runtime:latest", "does not start with v<digit>"),
])
def test_data_key_refuses_what_the_supervisor_has_no_key_for(ref: str, why: str) -> None:
    assert why in data_key_of(ref)


def test_builder_and_install_sh_agree() -> None:
    """The key the builder writes (builder.artifacts.data_key) is install.sh's."""
    for ref in ("docker.io/rancher/my-k8s-runtime:v1.32.13-rke2r1", "ghcr.io/a/b/c:v2.0.0-x1"):
        assert data_key_of(ref) == data_key(ref)


def test_install_stages_under_the_supervisors_key(scratch_target: Target, releases) -> None:
    release = releases["v1"]
    want = "v1.32.13-rke2r1-" + hashlib.sha256(b"rancher/rke2-runtime:v1.32.13-rke2r1").hexdigest()[:12]
    assert release.data_key == want
    ok(scratch_target.install(release))
    data = scratch_target.data_dir()
    assert sorted(p.name for p in (data / "data").iterdir()) == [want]
    assert {p.name for p in (data / "data" / want).iterdir()} == {".extracted", "bin", "charts"}
    assert os.readlink(data / "bin") == f"data/{want}/bin"
    # The uninstall manifest describes the disk.
    manifest = (scratch_target.prefix() / "share/rke2/installed-files").read_text()
    assert f"r {data}/data/{want}\n" in manifest and f"l {data}/bin\n" in manifest


def test_runtime_without_charts_gets_an_empty_charts_dir(scratch_target: Target, chartless_release: Release) -> None:
    """The supervisor re-extracts unless bin/, charts/ and .extracted exist, and a server copies
    charts/ at start: install.sh stages an empty charts/ and says the cluster gets no charts."""
    release = chartless_release
    proc = ok(scratch_target.install(release))
    assert "has no charts/: a server deploys no bundled charts" in proc.stderr
    key_dir = scratch_target.data_dir() / "data" / release.data_key
    assert sorted(p.name for p in key_dir.iterdir()) == [".extracted", "bin", "charts"]
    assert not any((key_dir / "charts").iterdir())
    ok(scratch_target.uninstall())
    assert not key_dir.exists()


def test_release_with_another_data_key_is_refused(scratch_target: Target, scratch_release) -> None:
    """A builder that hashed docker.io/rancher/rke2-runtime:TAG (the old formula): nothing is
    installed, and the message gives the key the supervisor will use."""
    old = "v1.32.13-rke2r1-" + hashlib.sha256(b"docker.io/rancher/rke2-runtime:v1.32.13-rke2r1").hexdigest()[:12]
    release = scratch_release("v1")
    tamper.edit_release_env(release, lambda text: text.replace(release.data_key, old))
    tamper.unsign(release)
    tamper.resum(release)
    before = scratch_target.snapshot()
    err = failed(scratch_target.install(release), "DATA_KEY is not the supervisor's key for RUNTIME_IMAGE",
                 f"expected {data_key(release.runtime_ref)}",
                 "python -m builder build")
    assert old not in err, "a value that failed a check is printed"
    assert scratch_target.snapshot() == before


# --- 2. upstream installer semantics ------------------------------------------------------------

def _install_with_systemd(scratch_target: Target, release, path: str, shell: str = "dash",
                          **settings: str) -> subprocess.CompletedProcess[str]:
    env = scratch_target.env(release, raw={"PATH": path}, **settings)
    return in_systemd_namespace([*SHELLS[shell], str(INSTALL_SH)], env)


@pytest.mark.parametrize("shell", SHELLS)
def test_default_installs_without_enabling_or_starting(scratch_target: Target, releases,
                                                       fake_systemctl, shell: str) -> None:
    path, log = fake_systemctl
    proc = ok(_install_with_systemd(scratch_target, releases["v1"], path, shell))
    assert log.read_text().splitlines() == ["daemon-reload"]
    unit = scratch_target.prefix() / "lib/systemd/system/rke2-server.service"
    assert "next steps:" in proc.stdout
    assert "1. write /etc/rancher/rke2/config.yaml: token" in proc.stdout and "tls-san" in proc.stdout
    assert f"and data-dir: {scratch_target.data_dir()}" in proc.stdout
    # The prefix is not /usr/local: the unit is enabled by its full path.
    assert f"2. systemctl enable --now {unit}\n" in proc.stdout


def test_agent_via_upstreams_exec_alias(scratch_target: Target, releases, fake_systemctl) -> None:
    path, log = fake_systemctl
    proc = ok(_install_with_systemd(scratch_target, releases["v1"], path, EXEC="agent"))
    assert "server: https://<a server>:9345 and token" in proc.stdout
    assert "rke2-agent.service" in proc.stdout
    # TYPE wins over EXEC, as upstream.
    log.unlink()
    proc = ok(_install_with_systemd(scratch_target, releases["v1"], path, TYPE="server", EXEC="agent",
                                    ENABLE="true"))
    unit = scratch_target.prefix() / "lib/systemd/system/rke2-server.service"
    assert log.read_text().splitlines() == ["daemon-reload", f"enable {unit}"]
    assert "2. systemctl start rke2-server.service" in proc.stdout


def test_start_without_enable_links_the_unit(scratch_target: Target, releases, fake_systemctl) -> None:
    path, log = fake_systemctl
    proc = ok(_install_with_systemd(scratch_target, releases["v1"], path, START="true"))
    unit = scratch_target.prefix() / "lib/systemd/system/rke2-server.service"
    assert log.read_text().splitlines() == ["daemon-reload", f"link {unit}", "restart rke2-server.service"]
    assert "next steps" not in proc.stdout


def test_skip_reload(scratch_target: Target, releases, fake_systemctl) -> None:
    path, log = fake_systemctl
    proc = ok(_install_with_systemd(scratch_target, releases["v1"], path, SKIP_RELOAD="true"))
    assert not log.exists(), log.read_text()
    assert "INSTALL_RKE2_SKIP_RELOAD=true: not running systemctl daemon-reload" in proc.stdout


@pytest.mark.parametrize("settings, message", [
    ({"START": "true", "SKIP_START": "true"},
     "INSTALL_RKE2_START=true and INSTALL_RKE2_SKIP_START=true contradict each other"),
    ({"ENABLE": "ture"}, "INSTALL_RKE2_ENABLE=ture: expected true or false"),
    ({"SKIP_RELOAD": "y"}, "INSTALL_RKE2_SKIP_RELOAD=y: expected true or false"),
    ({"METHOD": "rpm"}, "INSTALL_RKE2_METHOD=rpm: this installer only installs the tarball"),
    ({"METHOD": "pip"}, "INSTALL_RKE2_METHOD=pip: unknown method"),
    ({"COMMIT": "0123abc"}, "INSTALL_RKE2_COMMIT is upstream's way to install a CI build"),
    ({"RPM_RELEASE_VERSION": "1.el9"}, "INSTALL_RKE2_RPM_RELEASE_VERSION belongs to upstream's rpm method"),
    ({"EXEC": "worker"}, "INSTALL_RKE2_EXEC=worker: use server or agent"),
    ({"CHANNEL": "stable"}, "INSTALL_RKE2_CHANNEL=stable: a channel is resolved to a version by asking a channel server"),
])
def test_bad_settings_are_refused_before_anything_changes(settings: dict[str, str], message: str,
                                                          scratch_target: Target, releases) -> None:
    before = scratch_target.snapshot()
    failed(scratch_target.install(releases["v1"], **settings), message)
    assert scratch_target.snapshot() == before


@pytest.fixture
def channel_server(tmp_path: Path, releases):
    """nginx serving a releases root (one directory per version, as GitHub's releases/download/)
    and a channel root whose 'stable' redirects like update.rke2.io's (to .../tag/v1.32.13%2Brke2r1)
    and whose 'latest' names v1.33.9+rke2r1, a directory that holds v1 (a lying mirror)."""
    root = tmp_path / "www"
    (root / "releases").mkdir(parents=True)
    (root / "releases" / V1).symlink_to(releases["v1"].directory)
    (root / "releases" / V2).symlink_to(releases["v1"].directory)
    redirects = {"/channels/stable": "/releases/tag/v1.32.13%2Brke2r1",
                 "/channels/latest": "/releases/tag/v1.33.9%2Brke2r1"}
    with nginx_redirecting(root, tmp_path / "nginx", redirects) as url:
        yield url


@pytest.mark.parametrize("downloader", ["curl", "wget"])
def test_channel_in_online_mode(downloader: str, scratch_target: Target, releases, channel_server: str,
                                tmp_path: Path) -> None:
    path = tools_without({"curl"} if downloader == "wget" else set(), tmp_path / "tools")
    release = releases["v1"]

    def env(channel: str, **more: str) -> dict[str, str]:
        return scratch_target.env(release, RELEASE_URL=f"{channel_server}/releases", CHANNEL=channel,
                                  raw={"INSTALL_RKE2_ARTIFACT_PATH": None, "PATH": path}, **more)

    before = scratch_target.snapshot()
    failed(scratch_target.run(env("stable")), "INSTALL_RKE2_CHANNEL=stable needs INSTALL_RKE2_CHANNEL_URL")
    failed(scratch_target.run(env("latest", CHANNEL_URL=f"{channel_server}/channels")),
           f"{channel_server}/releases/{V2} holds version {V1}, not {V2} (channel latest)")
    failed(scratch_target.run(env("nope", CHANNEL_URL=f"{channel_server}/channels")),
           "channel nope led to 'nope', which is not a version")
    assert scratch_target.snapshot() == before

    proc = ok(scratch_target.run(env("stable", CHANNEL_URL=f"{channel_server}/channels/")))
    assert f"using {V1} as release" in proc.stdout
    assert (scratch_target.data_dir() / "bin" / "runc").read_bytes() == release.runtime_file("runc")
    # INSTALL_RKE2_VERSION wins over the channel (upstream's order): the server is not asked.
    proc = ok(scratch_target.run(env("latest", VERSION=V1)))
    assert "channel latest is not consulted" in proc.stdout and "nothing changed" in proc.stdout


# --- the prefix rule: /opt/NAME when /usr/local is read-only or a mount point --------------------

def prefix_for(directory: Path, shell: str = "dash") -> str:
    """install.sh's default_prefix applied to ``directory`` (the one that stands for /usr/local)."""
    proc = install_functions(f"NAME=rke2 UPPER=RKE2; default_prefix '{directory}'; echo \"$PREFIX\"", shell)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("shell", SHELLS)
def test_prefix_rule_on_real_mounts(tmp_path: Path, shell: str) -> None:
    plain = tmp_path / "plain" / "usr" / "local"
    plain.mkdir(parents=True)
    assert prefix_for(plain, shell) == str(plain)
    assert prefix_for(tmp_path / "missing" / "usr" / "local", shell) == str(tmp_path / "missing/usr/local")
    with tmpfs(tmp_path / "mounted", "1m"):
        # A writable mount point.
        assert prefix_for(tmp_path / "mounted", shell) == "/opt/rke2"
        # Through a symlink, as `mountpoint` resolves it.
        (tmp_path / "link").symlink_to(tmp_path / "mounted")
        assert prefix_for(tmp_path / "link", shell) == "/opt/rke2"
        # A directory on that file system, not a mount point itself.
        (tmp_path / "mounted" / "local").mkdir()
        assert prefix_for(tmp_path / "mounted" / "local", shell) == str(tmp_path / "mounted/local")
        # The same directory once the file system is read-only.
        subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "mounted")], check=True)
        assert prefix_for(tmp_path / "mounted" / "local", shell) == "/opt/rke2"
    with tmpfs(tmp_path / "with space", "1m"):
        assert prefix_for(tmp_path / "with space", shell) == "/opt/rke2"


def test_default_prefix_when_usr_local_is_a_mount_point(scratch_target: Target, releases,
                                                         fake_systemctl) -> None:
    """The whole installer with no TAR_PREFIX, in a private mount namespace where /usr/local and
    /opt are fresh tmpfs mounts (the host's stay untouched): the bundle lands in /opt/rke2."""
    path, log = fake_systemctl
    env = scratch_target.env(releases["v1"], raw={"PATH": path, "INSTALL_RKE2_TAR_PREFIX": None})
    setup = "mount -t tmpfs tmpfs /usr/local && mount -t tmpfs tmpfs /opt || exit 99\n"
    script = f'dash {INSTALL_SH} || exit $?; echo "== /opt"; find /opt | sort; echo "== /usr/local"; find /usr/local'
    proc = ok(in_systemd_namespace(["sh", "-c", script], env, setup=setup))
    assert "/usr/local is a mount point; installing into /opt/rke2" in proc.stderr
    opt, usr_local = proc.stdout.split("== /opt\n")[1].split("== /usr/local\n")
    assert usr_local.split() == ["/usr/local"]
    for rel in ("bin/rke2", "bin/rke2-uninstall.sh", "lib/systemd/system/rke2-server.service",
                "share/rke2/release.env", "share/rke2/installed-files"):
        assert f"/opt/rke2/{rel}\n" in opt, rel
    assert "2. systemctl enable --now /opt/rke2/lib/systemd/system/rke2-server.service" in proc.stdout


# --- uninstall after a bare tar xzf (no manifest) -----------------------------------------------

def _bare_install(scratch_target: Target, release) -> tuple[Path, Path]:
    """What upstream's air-gap docs do by hand: unpack the bundle into the prefix, copy the image
    archive into the images dir. Then what the supervisor writes at first start (it cannot run
    here; the layout is from pkg/bootstrap): the runtime in data/KEY with .extracted and an
    absolute DATA_DIR/bin symlink, and node state that an uninstall must keep."""
    prefix, data = scratch_target.prefix(), scratch_target.data_dir()
    subprocess.run(["tar", "xzf", str(release.path(release.bundle)), "-C", str(prefix)], check=True)
    images = scratch_target.images_dir()
    images.mkdir(parents=True)
    shutil.copy(release.path(f"{release.default_images}.tar.zst"), images)
    key_dir = data / "data" / release.data_key
    (key_dir / "bin").mkdir(parents=True)
    (key_dir / "charts").mkdir()
    (key_dir / "bin" / "runc").write_bytes(release.runtime_file("runc"))
    (key_dir / ".extracted").write_text(release.runtime_ref)
    (data / "bin").symlink_to(key_dir / "bin")
    return prefix, data


@pytest.mark.parametrize("shell", SHELLS)
def test_uninstall_after_bare_tar(scratch_target: Target, releases, shell: str) -> None:
    release = releases["v1"]
    state = scratch_target.data_dir() / "server" / "db" / "state.db"
    state.parent.mkdir(parents=True)
    state.write_text("etcd\n")
    before = scratch_target.snapshot(dir_mtimes=False)
    prefix, data = _bare_install(scratch_target, release)
    assert not (prefix / "share/rke2/installed-files").exists()

    proc = ok(scratch_target.uninstall(shell=shell, RKE2_DATA_DIR=str(data)))
    assert "no " in proc.stdout and "removing the bundle's layout" in proc.stdout
    assert f"kept the node's state in {data}" in proc.stdout
    # The node's state stays; everything the bundle, the operator and the supervisor put is gone,
    # and the directories they created with it.
    assert scratch_target.snapshot(dir_mtimes=False) == before


def test_uninstall_after_bare_tar_refuses_a_symlinked_layout(scratch_target: Target, releases,
                                                            tmp_path: Path) -> None:
    """lib/systemd/system turned into a symlink to another directory holding a file of the
    layout's name: nothing at all is removed, there or in the prefix."""
    release = releases["v1"]
    prefix, data = _bare_install(scratch_target, release)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(prefix / "lib/systemd/system", elsewhere)
    (prefix / "lib/systemd/system").symlink_to(elsewhere)
    before = scratch_target.snapshot()
    outside = {p.name for p in elsewhere.iterdir()}
    failed(scratch_target.uninstall(RKE2_DATA_DIR=str(data)),
           f"{prefix}/lib/systemd/system is a symlink", "refusing to remove anything")
    assert scratch_target.snapshot() == before
    assert {p.name for p in elsewhere.iterdir()} == outside == {
        "rke2-server.service", "rke2-server.env", "rke2-agent.service", "rke2-agent.env"}


def test_uninstall_after_bare_tar_keeps_a_foreign_bin_link(scratch_target: Target, releases,
                                                          tmp_path: Path) -> None:
    """A DATA_DIR/bin symlink that does not lead into DATA_DIR/data is not the supervisor's."""
    release = releases["v1"]
    prefix, data = _bare_install(scratch_target, release)
    (data / "bin").unlink()
    (data / "bin").symlink_to(tmp_path)
    proc = ok(scratch_target.uninstall(RKE2_DATA_DIR=str(data)))
    assert "points outside" in proc.stderr
    assert os.readlink(data / "bin") == str(tmp_path)
    assert not (prefix / "bin" / "rke2").exists() and not (data / "data").exists()


UPSTREAM_MIRROR = Path("/work/.mirror/rancher+rke2/repo")
UPSTREAM_TAG = "v1.32.13+rke2r1"


@pytest.fixture
def upstream_install_sh(tmp_path: Path) -> Path:
    """Upstream's own install.sh at the pinned tag, read from a local git mirror of rancher/rke2
    (the test is skipped where there is none: it is never part of this repository)."""
    proc = subprocess.run(["git", "-C", str(UPSTREAM_MIRROR), "show", f"{UPSTREAM_TAG}:install.sh"],
                          capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"no rancher/rke2 mirror at {UPSTREAM_MIRROR}")
    script = tmp_path / "upstream-install.sh"
    script.write_bytes(proc.stdout)
    return script


def test_uninstall_after_upstreams_installer(scratch_target: Target, releases, fake_systemctl,
                                             upstream_install_sh: Path) -> None:
    """Upstream's installer with a prefix other than /usr/local: it unpacks the bundle, copies
    every rke2-images* file into the images dir and moves the units, rewritten for the prefix, to
    /etc/systemd/system (a tmpfs of a private mount namespace here). Our uninstaller then removes
    all of it; a unit there that runs another prefix stays."""
    release = releases["v1"]
    path, log = fake_systemctl
    (scratch_target.root / "var" / "lib").mkdir(parents=True)  # as on every node
    before = scratch_target.snapshot(dir_mtimes=False)
    prefix, data = scratch_target.prefix(), scratch_target.data_dir()
    env = {"PATH": path, "TMPDIR": str(scratch_target.tmp), "INSTALL_RKE2_ARTIFACT_PATH": str(release.directory),
           "INSTALL_RKE2_TAR_PREFIX": str(prefix), "INSTALL_RKE2_AGENT_IMAGES_DIR": str(scratch_target.images_dir()),
           "INSTALL_RKE2_SKIP_FAPOLICY": "true", "RKE2_DATA_DIR": str(data), "UNINSTALL_SKIP_KILLALL": "true"}
    foreign = "[Service]\nExecStart=/opt/other/bin/rke2 agent\n"
    script = f"""
sh {upstream_install_sh} || exit $?
printf '{foreign}' > /etc/systemd/system/rke2-agent.service
echo "== installed"; ls /etc/systemd/system; ls {scratch_target.images_dir()}
sh {prefix}/bin/rke2-uninstall.sh || exit $?
echo "== uninstalled"; ls /etc/systemd/system
"""
    setup = "mount -t tmpfs tmpfs /etc/systemd/system || exit 99\n"
    proc = ok(in_systemd_namespace(["sh", "-c", script], env, setup=setup))
    installed, uninstalled = proc.stdout.split("== installed\n")[1].split("== uninstalled\n")
    assert "moving systemd units to /etc/systemd/system" in proc.stdout, "upstream did not move the units"
    assert "rke2-server.service" in installed and "rke2-images-core.linux-amd64.txt" in installed
    assert uninstalled.split() == ["rke2-agent.service"]
    assert "removing the bundle's layout" in proc.stdout
    assert scratch_target.snapshot(dir_mtimes=False) == before
    assert log.read_text().splitlines()[-1] == "daemon-reload"
