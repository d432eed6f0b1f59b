"""The PostgreSQL server the tests use: ``AEGIS_TEST_POSTGRES_URL`` (``.ci/run`` starts one
with ``scripts/pg_test_server.py`` and exports it), one fresh database per test, and private
servers for the tests that restart theirs.

Without the variable the PostgreSQL cases skip, naming the command that starts a server;
with ``CI`` set they fail instead: CI must never skip them silently.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

REPO = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = REPO / "scripts" / "pg_test_server.py"
START_COMMAND = f"export AEGIS_TEST_POSTGRES_URL=$(python3 {SERVER_SCRIPT.relative_to(REPO)})"


def server_url() -> str:
    """The test server's URL, or skip (fail under CI) saying how to start one."""
    url = os.environ.get("AEGIS_TEST_POSTGRES_URL", "")
    if url:
        return url
    message = f"no PostgreSQL server for the tests; start one with: {START_COMMAND}"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the PostgreSQL cases: {message}", pytrace=False)
    pytest.skip(message)


def with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


@contextlib.contextmanager
def fresh_database(url: str | None = None) -> Iterator[str]:
    """A new, empty database on the server (dropped afterwards); yields its URL."""
    admin = url or server_url()
    name = f"aegis_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(admin, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def store_for(kind: str) -> Iterator[str]:
    """``""`` for ``sqlite`` (the data dir's file), a fresh database's URL for
    ``postgresql``."""
    if kind == "sqlite":
        yield ""
        return
    with fresh_database() as url:
        yield url


def dump(url: str) -> bytes:
    """Everything in the database, as ``pg_dump`` writes it (to look for what must not be
    stored)."""
    out = subprocess.run(["pg_dump", "--data-only", url], capture_output=True, check=True)
    return out.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateServer:
    """A PostgreSQL server of one test's own (``scripts/pg_test_server.py --dir --port``),
    so stopping and restarting it disturbs no other test. Its directory is a fresh one
    under the system temp dir (pytest's tmp_path is closed to the ``postgres`` user)."""

    def __init__(self) -> None:
        server_url()  # the same skip (or CI failure) when PostgreSQL is not set up here
        self.dir = Path(tempfile.mkdtemp(prefix="aegis-pg-"))
        self.port = free_port()
        self.url = ""

    def _script(self, *extra: str) -> str:
        out = subprocess.run(
            [sys.executable, str(SERVER_SCRIPT), "--dir", str(self.dir), *extra],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return out.stdout.strip()

    def start(self) -> str:
        self.url = self._script("--port", str(self.port))
        return self.url

    def stop(self) -> None:
        self._script("--stop")


@contextlib.contextmanager
def private_server() -> Iterator[PrivateServer]:
    server = PrivateServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)
