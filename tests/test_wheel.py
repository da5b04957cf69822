"""The installed package works: the wheel built from this checkout carries what `build` needs (the
bundle templates), ships no test rig, declares exactly the runtime dependencies `builder` imports,
and, installed into a fresh venv with the hash-locked runtime deps (requirements/runtime.txt),
builds the `built` fixture's release with its `airgap-builder` entry point, byte for byte.
"""

from __future__ import annotations

import ast
import hashlib
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from tests.checkout import REPO, copy_checkout
from tests.plugins.built import EPOCH, Built

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of the checkout (an in-tree build would write build/ and egg-info into
    the work tree), offline: setuptools comes from the dev lock."""
    base = tmp_path_factory.mktemp("wheel")
    src = copy_checkout(base / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(base / "dist"), str(src)], check=True)
    (whl,) = (base / "dist").glob("airgap_builder-*.whl")
    return whl


def _metadata(whl: Path) -> list[str]:
    with zipfile.ZipFile(whl) as z:
        (name,) = (n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(name).decode()).get_all("Requires-Dist") or []


def _imported_distributions() -> set[str]:
    """Distributions that `builder` imports (top-level names of every import in its modules)."""
    modules: set[str] = set()
    for path in (REPO / "builder").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules.add(node.module.split(".")[0])
    owners = packages_distributions()
    return {_norm(d) for m in modules - set(sys.stdlib_module_names) - {"builder"}
            for d in owners.get(m, [m])}


def test_wheel_carries_templates_and_no_rig(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = REPO / "builder" / "assemble" / "templates"
    wanted = {p.relative_to(REPO).as_posix() for p in templates.rglob("*") if p.is_file()}
    assert wanted and wanted <= names, sorted(wanted - names)
    assert not {n for n in names if n.split("/")[0] in ("rig", "tests", "bundle")}, sorted(names)


def test_wheel_requires_exactly_what_builder_imports(wheel: Path) -> None:
    runtime = {_norm(re.split(r"[ ;=<>!~\[]", r, maxsplit=1)[0]) for r in _metadata(wheel)
               if "extra ==" not in r}
    assert runtime == _imported_distributions()
    assert "oras" not in runtime  # only test_release uses it: a dev extra


def test_installed_wheel_builds_the_release(wheel: Path, built: Built, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--require-hashes", "-r", str(REPO / "requirements/runtime.txt")], check=True)
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True)
    # Run outside the checkout with a clean environment: only the installed package can answer.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SOURCE_DATE_EPOCH": EPOCH}
    probe = subprocess.run([str(venv / "bin/python"), "-c", "import builder; print(builder.__file__)\n"
                            "import importlib.util as u; print(u.find_spec('rig'))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    module, rig = probe.stdout.splitlines()
    assert module.startswith(f"{venv}/") and rig == "None", probe.stdout

    out = tmp_path / "artifacts"
    res = subprocess.run([str(venv / "bin/airgap-builder"), "--lock", str(built.lock), "--store",
                          str(built.store), "build", "--cross", "--artifacts", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr

    def files(d: Path) -> dict[str, str]:
        return {p.name: hashlib.file_digest(p.open("rb"), "sha256").hexdigest()
                for p in d.iterdir() if p.is_file() and not p.name.startswith(".")}
    mine, fixture = files(out), files(built.out)
    assert sorted(mine) == sorted(fixture)
    # The provenance statement names the builder's source revision, which only a checkout has
    # (so do the checksum files, which list it); every other artifact is the same bytes.
    differ = {n for n in fixture if mine[n] != fixture[n]}
    assert {n for n in differ if not n.startswith(("provenance.", "sha256sum-"))} == set()
    def sums_but_provenance(d: Path, name: str) -> set[str]:
        return {x for x in (d / name).read_text().splitlines() if " provenance." not in x}
    for sums in (n for n in fixture if n.startswith("sha256sum-")):
        assert sums_but_provenance(out, sums) == sums_but_provenance(built.out, sums), sums
