"""`make demo`: the real pipeline with no internet, through a loopback mirror.

Starts nginx (files) and the distribution registry (images) on 127.0.0.1, seeds them with real
Debian binaries (and fixture images built from them) and small real Helm charts (tests/rig/charts.py),
writes a lock for that content, then runs
the same `python -m builder` commands a release engineer runs, and prints what they produced.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from builder.lock import lockfile as L
from tests.rig import loopback, mirror, update

REPO = Path(__file__).resolve().parents[1]


def step(title: str, argv: list[str], env: dict[str, str]) -> float:
    print(f"\n==> {title}\n    $ {shlex.join(argv)}", flush=True)
    started = time.monotonic()
    res = subprocess.run(argv, cwd=REPO, env=env)
    seconds = time.monotonic() - started
    if res.returncode != 0:
        raise SystemExit(f"demo: step '{title}' failed with exit code {res.returncode}")
    print(f"    ({seconds:.1f}s)", flush=True)
    return seconds


def builder_argv(lock: Path, store: Path) -> list[str]:
    """``python -m builder`` with the lock and store every step of the demo names."""
    return [sys.executable, "-m", "builder", "--lock", str(lock), "--store", str(store)]


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.demo")
    ap.add_argument("--work", default=str(REPO / ".demo"), help="scratch directory (default .demo/)")
    ap.add_argument("--out", default=str(REPO / "artifacts"), help="artifacts directory")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    print("==> seeding the loopback mirror with real Debian binaries (cached after the first run)")
    with loopback.running(work, resolved=False) as lb:
        lock_path = lb.lock_path
        print(f"    file mirror {lb.files.url}  registry {lb.registry.url}  lock {lock_path}")
        env = dict(os.environ, CROSS="1", BUILDER_MIRRORS=str(lb.mirrors_path))
        base = builder_argv(lock_path, work / "store")
        times = {}
        times["lock --check"] = step("validate the lock", base + ["lock", "--check"], env)
        times["lock"] = step("resolve image tags to digests through the mirror", base + ["lock"], env)
        times["fetch (1st)"] = step("fetch every input for every arch", base + ["fetch", "--cross"], env)
        times["fetch (2nd)"] = step("fetch again: nothing to transfer", base + ["fetch", "--cross"], env)
        env.setdefault("SOURCE_DATE_EPOCH", str(mirror.MTIME))
        out = args.out
        keys = work / "keys"
        env.setdefault("BUILDER_SIGNING_PASSPHRASE", "demo passphrase (use a secret store for real)")
        tag = lb.lock.release.version.replace("+", "-")
        release_repo = f"{lb.registry.host}/releases/{lb.lock.release.name}"
        carried = work / "carried"
        times["build"] = step("build all arches", base + ["build", "--cross", "--artifacts", out], env)
        times["build (no-op)"] = step("rebuild with nothing changed", base + ["build", "--cross", "--artifacts", out], env)
        times["scan"] = step("scan gate (Trivy, offline DB pulled by digest from the mirror)",
                             base + ["scan", "--cross", "--artifacts", out, "--db-ref", lb.trivy_db_ref], env)
        if not (keys / "signing-key.pem").exists():
            times["keygen"] = step("signing key (passphrase from the environment)",
                                   base + ["keygen", "--out", str(keys)], env)
        times["sign"] = step("sign the checksum files", base + ["sign", "--artifacts", out, "--key",
                                                                 str(keys / "signing-key.pem")], env)
        times["verify"] = step("verify the release directory offline",
                               base + ["verify", out, "--public-key", str(keys / "signing-key.pub"),
                                       "--require-signature"], env)
        times["release"] = step("release to the OCI registry (one artifact per arch)",
                                base + ["release", "--artifacts", out, "--registry", release_repo, "--insecure"], env)
        times["pull-release"] = step("carry it: pull the release into a fresh directory and verify",
                                     base + ["pull-release", f"{release_repo}:{tag}", str(carried), "--insecure",
                                             "--public-key", str(keys / "signing-key.pub"),
                                             "--require-signature"], env)
        times.update(patch_and_delta(work, env, lock_path, out, keys))
        print("\n==> summary")
        for name, seconds in times.items():
            print(f"    {name:<20} {seconds:6.1f}s")
        out = Path(args.out)
        print(f"    install on a node: INSTALL_RKE2_ARTIFACT_PATH={carried} "
              f"INSTALL_RKE2_PUBLIC_KEY={keys / 'signing-key.pub'} sh install.sh")
        print(f"    then update it to {update.PATCH} with the delta: INSTALL_RKE2_ARTIFACT_PATH={work / 'delta'} "
              f"INSTALL_RKE2_PUBLIC_KEY={keys / 'signing-key.pub'} sh install.sh")
        _carried(out, work / "patch", work / "delta")
        print("    /charts of the runtime image (HelmChart manifests made from the pinned charts): "
              + ", ".join(f"{c.name}.yaml" + (" (removed)" if c.removed else " (bootstrap)" if c.bootstrap else "")
                          for c in lb.lock.charts.values()))
        modes = {lb.lock.layer_mode(None), *(lb.lock.layer_mode(g) for g in lb.lock.groups)}
        print(f"    image layers: {', '.join(sorted(modes))} (release.layers, docs/images-lock.md: "
              "zstd recompresses every pulled layer, the runtime image stays gzip)")
        produced = sorted(p for p in out.glob("*") if p.is_file() and not p.name.startswith("."))
        if produced:
            print(f"    artifacts in {out}:")
            for p in produced:
                print(f"      {p.stat().st_size:>12,}  {p.name}")
        store = work / "store" / "blobs" / "sha256"
        blobs = list(store.iterdir())
        print(f"    content store: {len(blobs)} blobs, {sum(b.stat().st_size for b in blobs):,} bytes")
    return 0


def patch_and_delta(work: Path, env: dict[str, str], lock_path: Path, out: str,
                    keys: Path) -> dict[str, float]:
    """The next patch release (tests/rig/update.py: one image's top layer and bin/kubectl change,
    served on loopback) built with ``--since`` the release just made: its delta, signed and
    verified against that release."""
    times = {}
    patch_lock, patch, delta = work / "patch.lock", work / "patch", work / "delta"
    with update.serving(work / "patch-rig") as served:
        lock = update.patched_lock(L.load(lock_path), served)
        L.save(dataclasses.replace(lock, path=None), patch_lock)
        near = dict(env, BUILDER_MIRRORS=str(served.mirrors_path))
        pbase = builder_argv(patch_lock, work / "store")
        times["patch: lock"] = step(
            f"the patch {update.PATCH}: {update.OLD_REF} -> {update.NEW_TAG} (a new top layer) and "
            f"a new bin/{update.BINARY}: resolve what changed", pbase + ["lock"], near)
        times["patch: fetch"] = step("fetch the patch's inputs (only the new ones transfer)",
                                     pbase + ["fetch", "--cross"], near)
    times["patch: build --since"] = step(
        "build the patch, and its delta against the release built above",
        pbase + ["build", "--cross", "--artifacts", str(patch), "--since", out, "--delta-out", str(delta)], env)
    key = ["--key", str(keys / "signing-key.pem")]
    times["patch: sign"] = step("sign the patch", pbase + ["sign", "--artifacts", str(patch), *key], env)
    times["delta: sign"] = step("sign the delta (it carries the patch's checksum files)",
                                pbase + ["sign", "--artifacts", str(delta), *key], env)
    times["delta: verify"] = step(
        "verify the delta against the release it updates: every archive rebuilt and checked",
        pbase + ["verify", str(delta), "--base", out, "--public-key", str(keys / "signing-key.pub"),
                 "--require-signature"], env)
    return times


def _carried(release: Path, patch: Path, delta: Path) -> None:
    """What an operator carries for the patch: the full release vs its delta."""
    def size(directory: Path) -> int:
        return sum(p.stat().st_size for p in directory.glob("*") if p.is_file() and not p.name.startswith("."))

    full, part = size(patch), size(delta)
    print(f"    to carry for {update.PATCH}: full release {full:,} bytes, delta {part:,} bytes "
          f"({part / full:.1%}); the base it needs: {release}")


if __name__ == "__main__":
    raise SystemExit(main())
