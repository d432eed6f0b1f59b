"""Development sessions: `nox -s ci` runs every gate CI runs, in one environment.

Each gate is also a session of its own (`nox -s tests`, `nox -s lint`, ...). `bench` is
never part of `ci`: speed is measured, not asserted.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["ci"]
nox.options.reuse_venv = "yes"

PYTHON = "3.11"


def _install(session: nox.Session) -> None:
    session.install("-e", ".[dev]")


def _tests(session: nox.Session) -> None:
    # Two workers, a test module to a worker at a time (tests/schedule.py): most of the
    # suite's time is relays and daemons waiting on each other, so two workers fit two
    # cores. `nox -s tests -- -n 0` runs it in one process.
    session.run(
        "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadscope", *session.posargs
    )


def _lint(session: nox.Session) -> None:
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


def _typecheck(session: nox.Session) -> None:
    session.run("mypy")


def _proto(session: nox.Session) -> None:
    if "--write" in session.posargs:
        session.run("python", "scripts/gen_proto.py")
        session.run("python", "scripts/gen_vectors.py")
        session.run("python", "scripts/gen_protocol_doc.py")
        session.run("python", "scripts/gen_openapi.py")
        session.run("python", "scripts/gen_tool_docs.py")
    else:
        session.run("python", "scripts/gen_proto.py", "--check")
        session.run("python", "scripts/gen_vectors.py", "--check")
        session.run("python", "scripts/gen_protocol_doc.py", "--check")
        session.run("python", "scripts/gen_openapi.py", "--check")
        session.run("python", "scripts/gen_tool_docs.py", "--check")


def _arch(session: nox.Session) -> None:
    session.run("lint-imports")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Unit, property and integration tests (real processes on loopback)."""
    _install(session)
    _tests(session)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    _install(session)
    _lint(session)


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the four packages."""
    _install(session)
    _typecheck(session)


@nox.session(python=PYTHON)
def proto(session: nox.Session) -> None:
    """Fail if aegis_edge_core/wire, the test vectors, docs/protocol.md, the OpenAPI
    document or docs/tools.md is stale.

    `nox -s proto -- --write` regenerates them all.
    """
    _install(session)
    _proto(session)


@nox.session(python=PYTHON)
def arch(session: nox.Session) -> None:
    """import-linter: the core stays sans-I/O; relay and agent never import each other."""
    _install(session)
    _arch(session)


@nox.session(python=PYTHON)
def faults(session: nox.Session) -> None:
    """The fault, bad-input and tenant-isolation suite alone."""
    _install(session)
    session.run("pytest", "-q", "-p", "no:cacheprovider", "-m", "faults", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks under benchmarks/, each printing ratios against a baseline run beside it.

    The fleet micro-benchmark, then the scale harness (10k daemons over TLS beside the bare
    gRPC floor, ~10 min). Arguments go to the harness: `nox -s bench -- --daemons 1000
    --quick` is the ~2 minute version.
    """
    _install(session)
    session.run("python", "benchmarks/bench_fleet.py")
    session.run("python", "benchmarks/scale.py", *session.posargs)


@nox.session(python=PYTHON)
def ci(session: nox.Session) -> None:
    """Every gate, in one environment: proto, arch, lint, typecheck, tests."""
    _install(session)
    _proto(session)
    _arch(session)
    _lint(session)
    _typecheck(session)
    _tests(session)
