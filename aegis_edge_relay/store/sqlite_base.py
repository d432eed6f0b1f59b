"""The SQLite store's plumbing: opening the file owner-only, the migrations runner,
``BEGIN IMMEDIATE`` transactions and how driver errors become :class:`StoreUnavailable`.
The queries are in ``sqlite_nodes``, ``sqlite_runs`` and ``sqlite_cluster``;
``sqlite.SQLiteStore`` joins them.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from aegis_edge_relay.files import tighten_mode
from aegis_edge_relay.store.base import StoreError, StoreUnavailable
from aegis_edge_relay.store.sqlite_schema import _MIGRATIONS, SCHEMA_VERSION


class SQLiteBase:
    """One SQLite connection and the transaction discipline under every query."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self.shared = False
        self.tightened = _private_files(self.path)
        """``(path, old mode)`` of each store file found looser than 0600 and tightened."""
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # The relay is the only writer (one store thread), so a lock is someone else's
        # (a backup, the sqlite3 shell): wait briefly, then fail the call with UNAVAILABLE
        # rather than let every queued call wait behind it.
        self._db.execute("PRAGMA busy_timeout=1000")
        self.schema_migrated = self.migrate()

    # -- plumbing

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)

    def migrate(self) -> tuple[int, int]:
        """Apply the migrations this version knows and the file has not seen; return the
        schema version before and after. A file from a newer relay is refused rather than
        half-understood."""
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT MAX(version) AS v FROM schema_version").fetchone()
            current = int(row["v"] or 0)
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {current} is newer than this relay's "
                f"({SCHEMA_VERSION})",
                hint="run the newer relay, or restore a backup made by this version",
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            with self._tx() as db:
                for statement in _statements(_MIGRATIONS[version]):
                    db.execute(statement)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        return current, SCHEMA_VERSION

    def schema_version(self) -> int:
        row = self._db.execute("SELECT MAX(version) AS v FROM schema_version").fetchone()
        return int(row["v"] or 0)

    def close(self) -> None:
        self._db.close()

    def unavailable(self, err: BaseException) -> StoreUnavailable | None:
        """A driver error as :class:`StoreUnavailable`; ``None`` for anything else (an
        integrity error is a bug or a race the caller handles, not an outage)."""
        if isinstance(err, sqlite3.DatabaseError) and not isinstance(err, sqlite3.IntegrityError):
            return _unavailable(err, self.path)
        return None

    def listen(self, channels: Sequence[str]) -> None:
        return None  # one relay: nobody else changes the file


def _statements(script: str) -> list[str]:
    """A migration's statements, one by one (a trigger's body holds semicolons of its own:
    a piece ends a statement only once SQLite calls the text so far complete)."""
    out: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                out.append(pending)
            pending = ""
    if pending.strip(" \n;"):
        out.append(pending)
    return out


_SIDECARS: Final = ("", "-wal", "-shm", "-journal")


def _private_files(path: str) -> list[tuple[str, int]]:
    """Make the database file and its sidecars owner-only before SQLite opens them.

    The file holds every node's key thumbprint, token ids and command output tails. SQLite
    creates ``-wal``/``-shm`` with the database file's own mode, so creating the main file
    0600 first (instead of letting ``connect`` create it 0644 under the usual umask) keeps
    every sibling private; files an older version left looser are tightened."""
    if path == ":memory:" or path.startswith("file:"):
        return []
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    changed = []
    for suffix in _SIDECARS:
        old = tighten_mode(Path(path + suffix), 0o600)
        if old is not None:
            changed.append((path + suffix, old))
    return changed


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK`` on any exception)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error:
                # A failed COMMIT (disk full, I/O error) can leave the transaction open;
                # end it so the next BEGIN does not fail forever.
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
        elif self._db.in_transaction:
            self._db.execute("ROLLBACK")


def _unavailable(err: sqlite3.DatabaseError, path: str) -> StoreUnavailable:
    text = str(err)
    if "locked" in text or "busy" in text:
        hint = "another process holds a lock on the database; stop it, then retry"
    elif "full" in text or "too large" in text:
        hint = "the disk (or the file size limit) is full; free space, then retry"
    else:
        hint = "check the disk and the file; restore from a backup if it is damaged"
    return StoreUnavailable(f"relay store {path} unavailable: {text}", hint=hint)
