"""nox sessions: thin over `python -m builder` and pytest. `nox -s build -- --cross` builds all arches.

Every session runs in the project's virtual environment (.venv/, made by scripts/setup from the
hash-locked requirements/), not in a venv of nox's own: one set of pinned dependencies everywhere.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
VENV_PYTHON = Path(__file__).resolve().parent / ".venv" / "bin" / "python"


def _python(session: nox.Session) -> str:
    if not VENV_PYTHON.exists():
        session.error(f"{VENV_PYTHON} not found: run scripts/setup (or make setup) first")
    return str(VENV_PYTHON)


def _run(session: nox.Session, *args: str) -> None:
    session.run(_python(session), *args, external=True)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    _run(session, "-m", "ruff", "check", "builder", "tools", "tests", "noxfile.py", "scripts/preflight.py")
    # import-linter has no `-m` entry point; its console script sits next to the venv's python.
    session.run(str(Path(_python(session)).with_name("lint-imports")), "--no-logo", external=True)
    _run(session, "-m", "mypy")
    session.run("shellcheck", "-s", "sh", "install.sh", external=True)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    _run(session, "-m", "pytest", "-q", "-ra", *session.posargs)


@nox.session(venv_backend="none")
def build(session: nox.Session) -> None:
    """fetch → build → scan for the host arch, or every arch with `-- --cross`."""
    args = list(session.posargs)
    for stage in ("fetch", "build", "scan"):
        _run(session, "-m", "builder", stage, *args)


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    _run(session, "-m", "tools.bench_real", *session.posargs)
