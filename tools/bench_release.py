"""Benchmark: peak memory of releasing a >= 1 GiB artifact, and the time of a no-op re-release.

    python -m tools.bench_release [--size-mib 1100] [--keep]

Makes an artifacts-like directory (a bundle with release.env, one large generated payload file
``rke2-bench-payload.linux-amd64.bin`` (not an image archive), ``sha256sum-amd64.txt``,
a hand-written passing scan status), starts the CNCF registry and the local GitHub stand-in
(tests/rig/github_fake.py) on 127.0.0.1, and runs ``python -m builder release`` (and the pull-release
library function: the generated payload would not pass ``verify``, which pull-release runs after)
in child processes that report their own peak RSS (VmHWM from /proc/self/status) when they exit.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from builder.humanize import human
from builder.trust import checksums
from tests.rig.github_fake import FakeGitHub
from tests.rig.registry import Registry

REPO_ROOT = Path(__file__).resolve().parents[1]
# Runs the CLI in-process, then prints this process's peak RSS: what the command itself used.
HWM = ("hwm = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]\n"
       "print(f'VmHWM_KIB={hwm}', file=sys.stderr)\n")
WRAPPER = "import sys\nfrom builder.cli import main\nrc = main(sys.argv[1:])\n" + HWM + "sys.exit(rc)\n"
PULL = ("import sys\nfrom pathlib import Path\nfrom builder.oci.reference import parse\n"
        "from builder.publish.pull_release import pull_release\nfrom builder.publish.release import registry_client\n"
        "ref = parse(sys.argv[1])\n"
        "print(pull_release(registry_client([ref.host], True, 0), ref, Path(sys.argv[2])).summary())\n"
        + HWM)


def make_release(directory: Path, size: int) -> None:
    directory.mkdir(parents=True)
    name, arch, version = "rke2", "amd64", "v1.32.13+bench1"
    runtime = f"docker.io/rancher/rke2-runtime:{version.replace('+', '-')}"
    env = (f"RELEASE_NAME='{name}'\nRELEASE_VERSION='{version}'\nRELEASE_ARCH='{arch}'\n"
           f"RUNTIME_IMAGE='{runtime}'\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(f"share/{name}/release.env")
        info.size = len(env)
        tar.addfile(info, io.BytesIO(env.encode()))
    (directory / f"{name}.linux-{arch}.tar.gz").write_bytes(gzip.compress(buf.getvalue(), mtime=0))
    big = directory / f"{name}-bench-payload.linux-{arch}.bin"
    block = hashlib.sha256(b"bench").digest() * (1 << 15)  # 1 MiB, not all zeros
    with open(big, "wb") as fh:
        for i in range(size // len(block)):
            fh.write(i.to_bytes(8, "big") + block[8:])
    files = sorted(p for p in directory.iterdir() if p.is_file())
    checksums.write_for_arch(directory, arch, files)
    sums = directory / checksums.checksum_name(arch)
    status = {"schema": 1, "verdict": "pass",
              "covered": {sums.name: "sha256:" + hashlib.sha256(sums.read_bytes()).hexdigest()}}
    (directory / "scan").mkdir()
    (directory / "scan" / "status.json").write_text(json.dumps(status))


def run(label: str, *args: str, env: dict[str, str] | None = None,
        code: str = WRAPPER) -> tuple[float, int]:
    started = time.monotonic()
    argv = [*args] if code is not WRAPPER else ["-q", *args]
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO_ROOT, text=True,
                          capture_output=True, env={**os.environ, **(env or {})})
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    hwm = int(proc.stderr.rsplit("VmHWM_KIB=", 1)[1].split()[0])
    print(f"{label:44} {seconds:7.2f} s   peak RSS {human(hwm << 10):>10}")  # VmHWM is in KiB
    return seconds, hwm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1100)
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-release-"))
    reg = fake = None
    try:
        art = work / "artifacts"
        make_release(art, args.size_mib << 20)
        print(f"artifact: {human(args.size_mib << 20)} in {art}")
        reg = Registry(work=work / "registry").start()
        fake = FakeGitHub(work / "github", token="bench-token").start()
        target = f"{reg.host}/releases/rke2"
        gh_env = {"GITHUB_TOKEN": fake.token, "GITHUB_API_URL": fake.url}
        base = ("release", "--artifacts", str(art), "--registry", target, "--insecure")
        run("release --registry (upload, 16 MiB chunks)", *base)
        run("release --registry (no-op re-release)", *base)
        run("release --github (upload to the fake)", "release", "--artifacts", str(art), "--github",
            "bench/rke2", env=gh_env)
        run("release --github (no-op re-release)", "release", "--artifacts", str(art), "--github",
            "bench/rke2", env=gh_env)
        run("release --registry --github (both no-op)", *base, "--github", "bench/rke2", env=gh_env)
        run("pull-release (download, digest-checked)", f"{target}:v1.32.13-bench1",
            str(work / "pulled"), code=PULL)
    finally:
        if fake is not None:
            fake.stop()
        if reg is not None:
            reg.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
