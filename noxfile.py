"""nox sessions: thin over `python -m builder` and pytest. `nox -s build -- --cross` builds all arches."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


def _install(session: nox.Session) -> None:
    session.install("-e", ".[dev]")


@nox.session
def lint(session: nox.Session) -> None:
    _install(session)
    session.run("ruff", "check", "builder", "rig", "tests", "noxfile.py")
    session.run("shellcheck", "-s", "sh", "install.sh", external=True)


@nox.session
def tests(session: nox.Session) -> None:
    _install(session)
    session.install("--require-hashes", "-r", "requirements/trivy.txt")
    session.run("pytest", "-q", "-ra", *session.posargs)


@nox.session
def build(session: nox.Session) -> None:
    """fetch → build → scan for the host arch, or every arch with `-- --cross`."""
    _install(session)
    session.install("--require-hashes", "-r", "requirements/trivy.txt")
    args = list(session.posargs)
    session.run("python", "-m", "builder", "fetch", *args)
    session.run("python", "-m", "builder", "build", *args)
    session.run("python", "-m", "builder", "scan", *args)


@nox.session
def bench(session: nox.Session) -> None:
    _install(session)
    session.run("python", "-m", "rig.bench", *session.posargs)
