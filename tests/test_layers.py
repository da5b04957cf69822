"""The import contracts in pyproject.toml ([tool.importlinter]) hold, and they have teeth; and
builder/ type-checks ([tool.mypy]).

`make lint` runs `lint-imports` and mypy; this runs them too, so a test run (CI) catches an upward
import, a cycle, a network module reaching for the lock or a type error without anyone running lint. The second half plants
one violation of each kind in a copy of builder/ and checks that `lint-imports` names it: a
contract that is misspelt, or loses a layer, would otherwise pass quietly forever.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkout import REPO

# The console script of the venv running the tests (import-linter has no `-m` entry point).
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the builder/ package under root, with root's pyproject.toml."""
    # PYTHONPATH puts root's builder/ ahead of the venv's editable install of the real one;
    # --no-cache: a cache keyed on the real tree must not answer for a planted copy.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-logo", "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_every_import_contract() -> None:
    result = _lint_imports(REPO)
    assert result.returncode == 0, (
        "lint-imports found a broken contract (see [tool.importlinter] in pyproject.toml):\n"
        + result.stdout + result.stderr)
    assert "0 broken" in result.stdout


def test_builder_type_checks(tmp_path: Path) -> None:
    # A cache of its own: the shared .mypy_cache may be mid-write by a concurrent `make lint`.
    result = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, "mypy (see [tool.mypy] in pyproject.toml):\n" + result.stdout


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A copy of builder/ and pyproject.toml to plant violations in (never the shared tree)."""
    shutil.copytree(REPO / "builder", tmp_path / "builder",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


@pytest.mark.parametrize(("module", "line", "expected"), [
    # errors is the floor: importing the CLI from it is the most upward import there is.
    ("errors.py", "from builder import cli", "builder.errors is not allowed to import builder.cli"),
    # a stage importing a later stage: the lock knows nothing of assembling a release.
    ("lock/lockfile.py", "import builder.assemble.build",
     "builder.lock is not allowed to import builder.assemble"),
    # the network layer must not depend on the lock's format.
    ("fetch/http.py", "import builder.lock.lockfile",
     "builder.fetch.http is not allowed to import builder.lock"),
    ("trust/verify.py", "import builder.lock",
     "builder.trust.verify is not allowed to import builder.lock"),
])
def test_a_planted_violation_is_named(planted: Path, module: str, line: str, expected: str) -> None:
    _append(planted / "builder" / module, line)
    result = _lint_imports(planted)
    assert result.returncode != 0
    assert expected in result.stdout, result.stdout


def test_a_planted_cycle_is_named(planted: Path) -> None:
    pkg = planted / "builder" / "cycle"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "one.py").write_text("from builder.cycle import two\n")
    (pkg / "two.py").write_text("from builder.cycle import one\n")
    result = _lint_imports(planted)
    assert result.returncode != 0
    assert "No cycles are allowed in builder.cycle." in result.stdout, result.stdout


def test_a_module_without_a_layer_is_named(planted: Path) -> None:
    # The layers contract is exhaustive: a new module under builder/ must be given its place.
    (planted / "builder" / "newcomer.py").write_text("")
    result = _lint_imports(planted)
    assert result.returncode != 0
    assert "not listed as layers:\n\n- builder.newcomer" in result.stdout, result.stdout
