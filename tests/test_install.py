"""install.sh under dash and busybox sh, against real releases (tests/plugins/releases.py), tampered
with by tests/tamper.py where a case needs bad input.

Every failure case compares a snapshot of the scratch root before and after: checks that fail
before staging must leave it identical (directory mtimes included); failures during staging
(disk full, an archive that does not decompress) must leave the same entries, modes, owners,
file mtimes and contents, and may only have bumped the mtime of a directory that held a temp file.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from builder.trust import checksums, sign
from tests import tamper
from tests.plugins.install import (
    INSTALL_SH,
    REPO,
    SHELLS,
    Target,
    failed,
    in_systemd_namespace,
    needs_tools,
    ok,
    tmpfs,
    tools_without,
)
from tests.plugins.releases import RUNTIME_BIN, V1, V2, Release

pytestmark = needs_tools("shellcheck")

BUNDLE_FILES = [
    "bin/rke2", "bin/rke2-killall.sh", "bin/rke2-uninstall.sh",
    "lib/systemd/system/rke2-server.service", "lib/systemd/system/rke2-server.env",
    "lib/systemd/system/rke2-agent.service", "lib/systemd/system/rke2-agent.env",
    "share/rke2/LICENSE.txt", "share/rke2/rke2-cis-sysctl.conf", "share/rke2/release.env",
]


def test_shellcheck_clean() -> None:
    scripts = [INSTALL_SH, *sorted((REPO / "builder" / "assemble" / "templates" / "bin").glob("*.sh"))]
    proc = subprocess.run(["shellcheck", "-s", "sh", *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# --- installs that succeed ----------------------------------------------------------------------

@pytest.mark.parametrize("shell", SHELLS)
def test_install_is_idempotent_and_uninstall_restores(scratch_target: Target, releases, shell: str) -> None:
    release = releases["v1"]
    before = scratch_target.snapshot(dir_mtimes=False)
    proc = ok(scratch_target.install(release, shell))
    assert "systemd is not running" in proc.stdout

    prefix, data, images = scratch_target.prefix(), scratch_target.data_dir(), scratch_target.images_dir()
    for rel in BUNDLE_FILES:
        assert (prefix / rel).is_file(), rel
    assert os.access(prefix / "bin" / "rke2-uninstall.sh", os.X_OK)
    unit = (prefix / "lib/systemd/system/rke2-server.service").read_text()
    assert f"ExecStart={prefix}/bin/rke2 server" in unit
    assert f"EnvironmentFile=-{prefix}/lib/systemd/system/%N.env" in unit
    assert "=/usr/local" not in unit and "-/usr/local" not in unit
    assert f"DATA_DIR={data}\n" in (prefix / "bin/rke2-killall.sh").read_text()

    key_dir = data / "data" / release.data_key
    assert (key_dir / ".extracted").read_text() == f"{release.runtime_ref}\n"
    assert (key_dir / "bin" / "runc").read_bytes() == release.runtime_file("runc")
    assert (key_dir / "bin" / "kubectl").is_file() and (key_dir / "charts" / "rke2-coredns.yaml").is_file()
    assert os.readlink(data / "bin") == f"data/{release.data_key}/bin"
    assert (data / "bin" / "runc").is_file()
    # Nothing but the runtime's files lands in the key dir (no blobs, no temp dirs).
    assert sorted(p.name for p in key_dir.iterdir()) == [".extracted", "bin", "charts"]
    assert sorted(p.name for p in (data / "data").iterdir()) == [release.data_key]

    archive = "rke2-images.linux-amd64.tar.zst"
    # Only the archive: a .txt there would be a list of images for the agent to pull.
    assert sorted(p.name for p in images.iterdir()) == [archive]
    assert (images / archive).read_bytes() == release.path(archive).read_bytes()

    installed = scratch_target.snapshot()
    again = ok(scratch_target.install(release, shell))
    assert "nothing changed" in again.stdout
    assert scratch_target.snapshot() == installed, "second run changed the target"

    ok(scratch_target.uninstall(shell=shell))
    assert scratch_target.snapshot(dir_mtimes=False) == before


def test_upgrade_installs_beside_and_switches(scratch_target: Target, releases) -> None:
    v1, v2 = releases["v1"], releases["v2"]
    before = scratch_target.snapshot(dir_mtimes=False)
    ok(scratch_target.install(v1))
    ok(scratch_target.install(v2))
    data, prefix = scratch_target.data_dir(), scratch_target.prefix()
    assert v1.data_key != v2.data_key
    assert os.readlink(data / "bin") == f"data/{v2.data_key}/bin"
    assert (data / "data" / v1.data_key / ".extracted").is_file(), "old runtime must stay"
    assert (data / "data" / v2.data_key / "bin" / "runc").read_bytes() == v2.runtime_file("runc")
    assert f"RELEASE_VERSION='{V2}'" in (prefix / "share/rke2/release.env").read_text()
    manifest = (prefix / "share/rke2/installed-files").read_text()
    assert f"r {data}/data/{v1.data_key}\n" in manifest and f"r {data}/data/{v2.data_key}\n" in manifest

    upgraded = scratch_target.snapshot()
    assert "nothing changed" in ok(scratch_target.install(v2)).stdout
    assert scratch_target.snapshot() == upgraded
    ok(scratch_target.uninstall())
    assert scratch_target.snapshot(dir_mtimes=False) == before


@pytest.mark.parametrize("shell", SHELLS)
def test_image_groups(scratch_target: Target, releases, shell: str) -> None:
    release = releases["v1"]
    proc = ok(scratch_target.install(release, shell, IMAGES="core multus"))
    names = sorted(p.name for p in scratch_target.images_dir().iterdir())
    assert names == sorted(f"rke2-images-{g}.linux-amd64.tar.zst" for g in ("core", "multus"))
    assert "from rke2-images-core.linux-amd64.tar.zst" in proc.stdout
    assert (scratch_target.data_dir() / "data" / release.data_key / ".extracted").is_file()


def test_image_groups_without_core_warn_and_still_stage_runtime(scratch_target: Target, releases) -> None:
    release = releases["v1"]
    proc = ok(scratch_target.install(release, IMAGES="multus"))
    assert "core images from a registry" in proc.stderr
    assert [p.name for p in scratch_target.images_dir().glob("*.tar.zst")] == ["rke2-images-multus.linux-amd64.tar.zst"]
    assert (scratch_target.data_dir() / "bin" / "runc").read_bytes() == release.runtime_file("runc")


def test_unknown_group_is_refused(scratch_target: Target, releases) -> None:
    before = scratch_target.snapshot()
    failed(scratch_target.install(releases["v1"], IMAGES="core nope"), "no image group 'nope'")
    assert scratch_target.snapshot() == before


@pytest.mark.parametrize("shell", SHELLS)
def test_gzip_fallback_without_zstd(scratch_target: Target, releases, shell: str, tmp_path: Path) -> None:
    release = releases["v1"]
    path = tools_without({"zstd", "unzstd", "zstdcat", "zstdmt"}, tmp_path / "nozstd")
    proc = ok(scratch_target.install(release, shell, raw={"PATH": path}))
    assert "from rke2-images.linux-amd64.tar.gz" in proc.stdout
    assert sorted(p.name for p in scratch_target.images_dir().iterdir()) == [
        "rke2-images.linux-amd64.tar.gz"]
    assert (scratch_target.data_dir() / "bin" / "runc").read_bytes() == release.runtime_file("runc")


def test_signature_verified(scratch_target: Target, releases, fixture_signing_key) -> None:
    proc = ok(scratch_target.install(releases["v1"], PUBLIC_KEY=str(fixture_signing_key[1])))
    assert "signature of sha256sum-amd64.txt verified" in proc.stdout


def test_version_pin_accepted(scratch_target: Target, releases) -> None:
    ok(scratch_target.install(releases["v1"], VERSION=V1))


def test_release_name_from_variables(scratch_target: Target, named_release: Release) -> None:
    """A release named my-k8s is driven by INSTALL_MY_K8S_*; the name comes from the bundle."""
    release = named_release
    proc = ok(scratch_target.install(release, TYPE="agent"))
    assert "start the node with" in proc.stdout and "my-k8s agent" in proc.stdout
    data = scratch_target.data_dir("my-k8s")
    assert (scratch_target.prefix() / "bin" / "my-k8s").is_file()
    assert (scratch_target.prefix() / "share/my-k8s/installed-files").is_file()
    assert os.readlink(data / "bin") == f"data/{release.data_key}/bin"
    # INSTALL_RELEASE_NAME chooses when variables for two names are set.
    env = scratch_target.env(release, raw={"INSTALL_RKE2_ARTIFACT_PATH": "/nonexistent"})
    failed(scratch_target.run(env), "several INSTALL_<NAME>")
    env["INSTALL_RELEASE_NAME"] = "my-k8s"
    assert "nothing changed" in ok(scratch_target.run(env)).stdout


@pytest.fixture
def http_release(releases, fileserver) -> str:
    """The v1 release served by the rig's real nginx (tests/rig/fileserver.py)."""
    fileserver.root.rmdir()
    fileserver.root.symlink_to(releases["v1"].directory)
    return f"{fileserver.url}/"


@pytest.mark.parametrize("shell", SHELLS)
def test_online_mode_installs_like_offline(scratch_target: Target, releases, fixture_signing_key, http_release: str,
                                           fileserver, shell: str) -> None:
    release = releases["v1"]
    env = scratch_target.env(release, RELEASE_URL=http_release, PUBLIC_KEY=str(fixture_signing_key[1]),
                     raw={"INSTALL_RKE2_ARTIFACT_PATH": None})
    ok(scratch_target.run(env, shell))
    assert (scratch_target.data_dir() / "bin" / "runc").read_bytes() == release.runtime_file("runc")
    # Each file came from nginx once: nothing is downloaded (read from the media) twice.
    gets = [e.path for e in fileserver.access_log() if e.method == "GET" and e.status == 200]
    assert len(gets) == len(set(gets)), gets
    assert "/sha256sum-amd64.txt.sig" in gets
    # The same release offline finds everything in place.
    assert "nothing changed" in ok(scratch_target.install(release, shell)).stdout


# --- bad input: the target stays as it was -----------------------------------------------------

def _drop_lines(release: Release, *names: str) -> None:
    """A checksum file missing lines, unsigned (a builder's mistake, not a forgery: the
    signature check would stop a forgery first)."""
    lines = release.sums.read_text().splitlines(keepends=True)
    tamper.replace_bytes(release.sums, "".join(line for line in lines if line[66:].strip() not in names).encode())
    tamper.unsign(release)


def _case_tampered_bundle(r, ctx):
    tamper.flip_byte(r.path(r.bundle))
    return {}, "rke2.linux-amd64.tar.gz: checksum mismatch"


def _case_tampered_group(r, ctx):
    tamper.flip_byte(r.path("rke2-images-canal.linux-amd64.tar.zst"))
    return {"IMAGES": "core canal"}, "rke2-images-canal.linux-amd64.tar.zst: checksum mismatch"


def _case_checksum_missing(r, ctx):
    r.sums.unlink()
    return {}, "sha256sum-amd64.txt not found"


def _case_bundle_line_missing(r, ctx):
    _drop_lines(r, r.bundle)
    return {}, "lists no bundle"


def _case_archive_lines_missing(r, ctx):
    _drop_lines(r, "rke2-images.linux-amd64.tar.zst", "rke2-images.linux-amd64.tar.gz")
    return {}, "lists no rke2-images.linux-amd64.tar.zst or rke2-images.linux-amd64.tar.gz"


def _case_list_line_missing(r, ctx):
    _drop_lines(r, "rke2-images.linux-amd64.txt")
    return {}, "rke2-images.linux-amd64.txt has no line"


def _case_malformed_checksum_line(r, ctx):
    lines = r.sums.read_text()
    tamper.replace_bytes(r.sums, (lines + "not-a-digest  extra.tar\n").encode())
    tamper.unsign(r)
    return {}, f"malformed line {lines.count(chr(10)) + 1}"


def _case_wrong_key(r, ctx):
    return {"PUBLIC_KEY": str(ctx["fixture_other_key"][1])}, "does not verify"


def _case_signature_of_other_file(r, ctx):
    shutil.copy(ctx["releases"]["arm64"].path("sha256sum-arm64.txt.sig"), r.path("sha256sum-amd64.txt.sig"))
    return {"PUBLIC_KEY": str(ctx["fixture_signing_key"][1])}, "does not verify"


def _case_signature_missing(r, ctx):
    r.path("sha256sum-amd64.txt.sig").unlink()
    return {"PUBLIC_KEY": str(ctx["fixture_signing_key"][1])}, "sha256sum-amd64.txt.sig not found"


def _case_sums_changed_after_signing(r, ctx):
    tamper.flip_byte(r.path(r.bundle))
    tamper.resum(r)
    return {"PUBLIC_KEY": str(ctx["fixture_signing_key"][1])}, "does not verify"


def _case_version_mismatch(r, ctx):
    return {"VERSION": "v9.9.9+rke2r1"}, "not INSTALL_RKE2_VERSION=v9.9.9+rke2r1"


def _case_truncated_zst(r, ctx):
    tamper.truncate(r.path("rke2-images.linux-amd64.tar.zst"))
    return {}, "rke2-images.linux-amd64.tar.zst: checksum mismatch"


CASES: dict[str, Callable] = {
    name[len("_case_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("_case_")
}


@pytest.mark.parametrize("over", ["fresh", "installed"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_leaves_target_unchanged(case: str, over: str, scratch_target: Target, releases,
                                           scratch_release, fixture_signing_key, fixture_other_key) -> None:
    if over == "installed":
        ok(scratch_target.install(releases["v1"]))
    # v2 artifacts over an installed v1: a check that slipped would change files.
    r = scratch_release("v2" if over == "installed" else "v1")
    settings, message = CASES[case](r, {"releases": releases, "fixture_signing_key": fixture_signing_key,
                                        "fixture_other_key": fixture_other_key})
    before = scratch_target.snapshot()
    failed(scratch_target.install(r, **settings), message)
    assert scratch_target.snapshot() == before


def test_artifacts_of_another_arch(scratch_target: Target, releases) -> None:
    if platform.machine() not in ("x86_64", "amd64"):
        pytest.skip("host arch detection is checked on amd64 hosts")
    before = scratch_target.snapshot()
    # Host is amd64, the directory holds arm64 artifacts only.
    err = failed(scratch_target.install(releases["arm64"], raw={"ARCH": None}), "another architecture")
    assert "sha256sum-arm64.txt" in err
    assert scratch_target.snapshot() == before


def test_mislabelled_arch_in_release(scratch_target: Target, scratch_release) -> None:
    """amd64 file names, but the bundle says arm64 (the upstream 'amd64 images in arm64' bug),
    summed but unsigned: a builder's mistake."""
    release = scratch_release("v1")
    tamper.edit_release_env(release, lambda text: text.replace("RELEASE_ARCH='amd64'", "RELEASE_ARCH='arm64'"))
    tamper.unsign(release)
    tamper.resum(release)
    before = scratch_target.snapshot()
    failed(scratch_target.install(release), "holds arm64 artifacts", "another architecture")
    assert scratch_target.snapshot() == before


def test_truncated_archive_with_matching_checksum(scratch_target: Target, scratch_release) -> None:
    """A builder that wrote a truncated .tar.zst and summed it: caught before staging."""
    r = scratch_release("v1")
    tamper.truncate(r.path("rke2-images.linux-amd64.tar.zst"))
    tamper.unsign(r)
    tamper.resum(r)
    before = scratch_target.snapshot()
    failed(scratch_target.install(r), "rke2-images.linux-amd64.tar.zst does not decompress")
    # Caught while listing the archive's members, before anything is staged.
    assert scratch_target.snapshot() == before


def test_unwritable_prefix(scratch_target: Target, releases) -> None:
    ro = scratch_target.root / "ro"
    with tmpfs(ro, "1m", "ro"):
        before = scratch_target.snapshot()
        failed(scratch_target.install(releases["v1"], TAR_PREFIX=str(ro / "usr" / "local")), "is not writable")
        assert scratch_target.snapshot() == before


def _footprint(release: Release) -> int:
    """Bytes an install of ``release`` puts under /var: the default image archive and the
    runtime's files (real binaries: runc alone is 8.7 MiB), plus 1 MiB for file system blocks."""
    runtime = sum(len(release.runtime_file(name)) for name in RUNTIME_BIN)
    return release.path(f"{release.default_images}.tar.zst").stat().st_size + runtime + (1 << 20)


def test_disk_full_while_extracting(scratch_target: Target, releases) -> None:
    """The image archive fits on the data file system, the runtime's real binaries do not:
    everything staged (the bundle in the prefix included) is removed."""
    release = releases["v1"]
    archive = release.path(f"{release.default_images}.tar.zst").stat().st_size
    with tmpfs(scratch_target.root / "var", f"{(archive >> 10) + 1024}k"):
        before = scratch_target.snapshot(dir_mtimes=False)
        err = failed(scratch_target.install(release))
        assert "cannot extract runtime layer" in err and "disk full" in err
        assert scratch_target.snapshot(dir_mtimes=False) == before


def test_disk_full_during_upgrade_keeps_old_version(scratch_target: Target, releases) -> None:
    """Room for v1 and half of v2 (sizes from the real artifacts): the upgrade fails, v1 stays."""
    v1, v2 = releases["v1"], releases["v2"]
    room = _footprint(v1) + _footprint(v2) // 2
    with tmpfs(scratch_target.root / "var", f"{room >> 10}k"):
        ok(scratch_target.install(v1))
        before = scratch_target.snapshot(dir_mtimes=False)
        err = failed(scratch_target.install(v2))
        assert "disk full" in err
        assert scratch_target.snapshot(dir_mtimes=False) == before
        assert os.readlink(scratch_target.data_dir() / "bin") == f"data/{v1.data_key}/bin"


def test_openssl_missing_with_key(scratch_target: Target, releases, fixture_signing_key, tmp_path: Path) -> None:
    path = tools_without({"openssl"}, tmp_path / "noopenssl")
    before = scratch_target.snapshot()
    failed(scratch_target.install(releases["v1"], PUBLIC_KEY=str(fixture_signing_key[1]), raw={"PATH": path}),
           "openssl is not installed")
    assert scratch_target.snapshot() == before


def test_fixture_release_is_consistent(releases, fixture_signing_key) -> None:
    """The fixture passes sha256sum -c and carries a valid signature (else every test lies)."""
    release = releases["v1"]
    proc = subprocess.run(["sha256sum", "-c", release.sums.name], cwd=release.directory,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert checksums.check(release.directory, arch="amd64").passed
    sign.verify_signature(release.sums, release.path("sha256sum-amd64.txt.sig"), fixture_signing_key[1])


# --- with systemd "running" (tests/plugins/install.in_systemd_namespace) -----------------------

def test_systemd_opt_in_enable_start_and_uninstall_killall(scratch_target: Target, releases,
                                                          fake_systemctl) -> None:
    """Enabling and starting are opt-in (the default is tests/test_install_upstream.py's); the
    earlier SKIP_ENABLE/SKIP_START still work and ask for the default."""
    path, log = fake_systemctl
    release = releases["v1"]
    before = scratch_target.snapshot(dir_mtimes=False)
    env = scratch_target.env(release, ENABLE="true", START="true", raw={"PATH": path})
    proc = ok(in_systemd_namespace(["dash", str(INSTALL_SH)], env))
    unit = scratch_target.prefix() / "lib/systemd/system/rke2-server.service"
    assert log.read_text().splitlines() == [
        "daemon-reload", f"enable {unit}", "restart rke2-server.service"]
    assert "started rke2-server.service" in proc.stdout and "next steps" not in proc.stdout

    log.unlink()
    env = scratch_target.env(release, SKIP_ENABLE="true", SKIP_START="true", TYPE="agent", raw={"PATH": path})
    proc = ok(in_systemd_namespace(["dash", str(INSTALL_SH)], env))
    assert "INSTALL_RKE2_SKIP_START=true is the default now" in proc.stdout
    assert log.read_text().splitlines() == ["daemon-reload"]

    # A "runtime process" started from the staged runtime: killall (run by uninstall) ends it.
    log.unlink()
    shim = scratch_target.data_dir() / "bin" / "containerd-shim-fixture"
    script = f"""
cp "$(command -v sleep)" {shim}
{shim} 5 &
pid=$!
dash {scratch_target.prefix()}/bin/rke2-uninstall.sh || exit $?
wait $pid
echo "shim-status=$?"
"""
    proc = ok(in_systemd_namespace(["sh", "-c", script], {"PATH": path, "TMPDIR": str(scratch_target.tmp)}))
    assert "shim-status=137" in proc.stdout, proc.stdout + proc.stderr
    assert log.read_text().splitlines() == [
        "disable --now rke2-server.service rke2-agent.service",
        "stop rke2-server.service rke2-agent.service",  # from rke2-killall.sh
        "daemon-reload"]
    assert scratch_target.snapshot(dir_mtimes=False) == before
