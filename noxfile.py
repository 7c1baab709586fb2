"""Developer tasks: ``nox`` runs lint, typecheck and tests; ``bench`` and ``docs`` on request.

Sessions use the interpreter nox itself runs on (Python 3.11 or newer), each in
its own virtualenv under ``.nox/`` with the project installed as
``pip install -e ".[dev]"``. The virtualenvs are reused from one run to the next;
``nox --no-reuse-existing-virtualenvs`` builds them afresh.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True


def _install(session: nox.Session) -> None:
    session.install("-e", ".[dev]")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    _install(session)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the files listed in pyproject.toml."""
    _install(session)
    session.run("mypy", "--strict")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite; arguments after ``--`` go to pytest."""
    _install(session)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def quick(session: nox.Session) -> None:
    """The quick loop while working: every test not marked slow."""
    _install(session)
    session.run("python", "-m", "pytest", "-m", "not slow", "-q", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmark with its default settings (a few minutes on two cores)."""
    _install(session)
    session.run("python", "-m", "benchmarks.core")
    session.run("python", "-m", "benchmarks.cache")
    session.run("python", "-m", "benchmarks.hashing")
    session.run("python", "-m", "benchmarks.load")
    session.run("python", "-m", "benchmarks.stream")
    session.run("python", "-m", "benchmarks.soak")


@nox.session
def docs(session: nox.Session) -> None:
    """Runs every Python example in README.md and docs/."""
    _install(session)
    session.run("python", "-m", "pytest", "tests/test_docs.py", *session.posargs)
