"""The PostgreSQL store's plumbing: the connection pool, the migrations runner, the
read, write and retry paths every query goes through, and how driver errors become
:class:`StoreUnavailable`. The queries themselves are in ``postgres_nodes``,
``postgres_runs`` and ``postgres_cluster``; ``postgres.PostgresStore`` joins them.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, Final, LiteralString, TypeVar

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

from aegis_edge_relay.store.base import StoreError, StoreUnavailable
from aegis_edge_relay.store.postgres_schema import _MIGRATIONS, MIGRATION_LOCK
from aegis_edge_relay.store.sqlite_schema import SCHEMA_VERSION

T = TypeVar("T")
Cursor = psycopg.Cursor[DictRow]
Connection = psycopg.Connection[DictRow]

STATEMENT_TIMEOUT: Final = 5.0
CONNECT_TIMEOUT: Final = 5
POOL_WAIT: Final = 3.0
"""How long a call waits for a connection (the server down, the pool reconnecting) before
it is answered UNAVAILABLE; the relay retries what it must keep, callers retry the rest."""
TX_ATTEMPTS: Final = 5

# The pool reports each failed reconnect through `logging`, which the relay does not use:
# Python's last-resort handler would print them as raw lines among the relay's JSON log.
# The store's own errors say the same once, as StoreUnavailable.
logging.getLogger("psycopg").addHandler(logging.NullHandler())


def redact_url(url: str) -> str:
    """``url`` with its password (in the authority or a ``password=`` parameter) replaced
    by ``***``: the form every message and log line uses."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user}{':***' if sep else ''}@{hostport}"
    query = urllib.parse.urlencode(
        [
            (k, "***" if k == "password" else v)
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        ],
        safe="*",
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _target(url: str) -> tuple[str, str, str]:
    """(host, port, database) from the URL, libpq's defaults filled in."""
    info = conninfo_to_dict(url)
    host = str(info.get("host") or "localhost")
    port = str(info.get("port") or "5432")
    database = str(info.get("dbname") or info.get("user") or "postgres")
    return host, port, database


def _session_options(url: str, statement_timeout: float) -> str:
    """The connections' ``options``: the relay's statement timeout, then the URL's own
    ``options=``. A keyword argument replaces the URL's parameter of the same name, so the
    two are joined; the server applies them in order, so a timeout the URL sets stands."""
    ours = f"-c statement_timeout={int(statement_timeout * 1000)}"
    theirs = str(conninfo_to_dict(url).get("options") or "")
    return f"{ours} {theirs}" if theirs else ours


class PostgresBase:
    """The pool and the transaction discipline under every PostgreSQL query."""

    def __init__(
        self,
        url: str,
        *,
        statement_timeout: float = STATEMENT_TIMEOUT,
        pool_wait: float = POOL_WAIT,
    ) -> None:
        self.url = url
        self.shared = True
        self.name = redact_url(url)
        """The URL as every message shows it (no password)."""
        self._host, self._port, database = _target(url)
        self.where = f"host {self._host} port {self._port} database {database}"
        self.retries = 0
        """Transactions rerun after a serialization failure or deadlock (for tests and the
        curious: each one is also logged by the caller's error if it finally fails)."""
        self._statement_timeout = statement_timeout
        self._pool_wait = pool_wait
        self._kwargs: dict[str, Any] = {
            "connect_timeout": CONNECT_TIMEOUT,
            "application_name": "aegis-relay",
            "options": _session_options(url, statement_timeout),
            "row_factory": dict_row,
            "autocommit": True,
        }
        # Migrate on a connection of our own first: the server unreachable at start is one
        # clear error here, before a pool starts reconnecting in the background.
        self.schema_migrated = self.migrate()
        self._pool: ConnectionPool[Connection] = ConnectionPool(
            url,
            kwargs=self._kwargs,
            min_size=1,
            max_size=2,
            open=True,
            configure=_configure,
            check=ConnectionPool.check_connection,
            timeout=pool_wait,
            name="aegis-store",
        )

    # -- plumbing

    def _connect(self) -> Connection:
        try:
            conn: Connection = psycopg.connect(self.url, **self._kwargs)
        except psycopg.Error as err:
            raise self._unreachable() from err
        _configure(conn)
        return conn

    def migrate(self) -> tuple[int, int]:
        """Apply the migrations this version knows and the database has not seen, under an
        advisory lock (two relays starting at once take turns); return the schema version
        before and after. A database from a newer relay is refused."""
        with self._connect() as conn:
            try:
                conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
                with conn.transaction():
                    conn.execute(
                        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
                    )
                row = conn.execute("SELECT MAX(version) AS v FROM schema_version").fetchone()
                current = int(row["v"] or 0) if row is not None else 0
                if current > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.name}: schema version {current} is newer than this relay's "
                        f"({SCHEMA_VERSION})",
                        hint="run the newer relay, or restore a backup made by this version",
                    )
                for version in range(current + 1, SCHEMA_VERSION + 1):
                    with conn.transaction():
                        conn.execute(_MIGRATIONS[version].encode())
                        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
                conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
            except psycopg.Error as err:
                raise self._error(err) from err
        return current, SCHEMA_VERSION

    def schema_version(self) -> int:
        row = self._read(lambda cur: cur.execute("SELECT MAX(version) AS v FROM schema_version"))
        return int(row[0]["v"] or 0)

    def close(self) -> None:
        self._pool.close()

    def unavailable(self, err: BaseException) -> StoreUnavailable | None:
        if isinstance(err, psycopg.Error) and not isinstance(err, psycopg.IntegrityError):
            return self._error(err)
        return None

    def _unreachable(self) -> StoreUnavailable:
        return StoreUnavailable(
            f"relay store {self.name} unreachable: cannot connect to PostgreSQL at {self.where}",
            hint=f"check that the server runs and accepts connections there "
            f"(pg_isready -h {self._host} -p {self._port})",
        )

    def _error(self, err: psycopg.Error) -> StoreUnavailable:
        if isinstance(err, psycopg.errors.QueryCanceled):
            return StoreUnavailable(
                f"relay store {self.name} unavailable: a statement ran past the "
                f"{self._statement_timeout:g} s statement timeout and was cancelled",
                hint="the server is overloaded or something holds a lock on the relay's "
                "tables; look at pg_stat_activity",
            )
        if isinstance(err, psycopg.errors.SerializationFailure | psycopg.errors.DeadlockDetected):
            return StoreUnavailable(
                f"relay store {self.name} unavailable: concurrent changes kept conflicting "
                f"({TX_ATTEMPTS} attempts)",
                hint="retry; another writer is changing the same rows",
            )
        if isinstance(err, psycopg.OperationalError) and not isinstance(
            err, psycopg.errors.DiskFull | psycopg.errors.InsufficientResources
        ):
            # Refused, reset, the pool waiting in vain for a connection: the server is gone
            # or restarting. libpq's own text says which; the password never appears in it.
            return StoreUnavailable(
                f"relay store {self.name} unavailable: lost the connection to PostgreSQL at "
                f"{self.where}",
                hint="the relay reconnects by itself once the server is back",
            )
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return StoreUnavailable(
            f"relay store {self.name} unavailable: {text}",
            hint="check the database server's log",
        )

    def _read(self, fn: Callable[[Cursor], Cursor]) -> list[DictRow]:
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                return fn(cur).fetchall()
        except psycopg.Error as err:
            raise self._error(err) from err

    def _one(self, sql: LiteralString, params: Sequence[Any]) -> DictRow | None:
        rows = self._read(lambda cur: cur.execute(sql, params))
        return rows[0] if rows else None

    def _write(self, fn: Callable[[Cursor], T]) -> T:
        """Run ``fn`` in one SERIALIZABLE transaction; rerun it (bounded) when the server
        reports a serialization failure or a deadlock, which roll everything back."""
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                    return fn(cur)
            except (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected) as err:
                if attempt >= TX_ATTEMPTS:
                    raise self._error(err) from err
                self.retries += 1
                time.sleep(0.005 * attempt)
            except psycopg.IntegrityError:
                raise
            except psycopg.Error as err:
                raise self._error(err) from err

    def _update(self, sql: LiteralString, params: Sequence[Any]) -> int:
        return self._write(lambda cur: cur.execute(sql, params).rowcount)

    def listen(self, channels: Sequence[str]) -> PostgresListener:
        conn = self._connect()
        try:
            for channel in channels:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except psycopg.Error as err:
            conn.close()
            raise self._error(err) from err
        return PostgresListener(conn, self._error)


class PostgresListener:
    """``LISTEN`` on a dedicated connection (never the pool's: a pooled connection goes
    back to other work and would miss notifications)."""

    def __init__(self, conn: Connection, error: Callable[[psycopg.Error], StoreUnavailable]):
        self._conn = conn
        self._error = error

    def wait(self, timeout: float) -> list[str]:
        try:
            return [n.payload for n in self._conn.notifies(timeout=timeout, stop_after=1)]
        except psycopg.Error as err:
            raise self._error(err) from err

    def close(self) -> None:
        self._conn.close()


def _configure(conn: Connection) -> None:
    # Writes open with BEGIN ISOLATION LEVEL SERIALIZABLE; reads are autocommit statements.
    conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
