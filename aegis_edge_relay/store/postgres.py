"""The PostgreSQL implementation of :class:`~aegis_edge_relay.store.base.Store`: the relay's
state in a database server (``--store postgresql://...``), the ground several relays will
share.

psycopg 3 with a psycopg-pool pool: a connection the server dropped (a restart) is found by
the pool's check and replaced, so the store reconnects by itself. Every change runs as one
``SERIALIZABLE`` transaction -- the same all-or-nothing and one-at-a-time meaning as SQLite's
``BEGIN IMMEDIATE`` -- and a serialization failure or deadlock (another writer on the same
rows) reruns the transaction a bounded number of times. Reads are single autocommit
statements. Each connection carries a statement timeout, so a stuck lock or an overloaded
server turns into :class:`StoreUnavailable` instead of a store thread that never returns.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Final, LiteralString, TypeVar

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

from aegis_edge_core.cluster import Holder, RelayLease
from aegis_edge_relay.store.base import (
    NODES_CHANGED,
    ROUTED_OUTPUT_ROWS,
    RUN_CANCELS,
    CommandRow,
    ConsoleSecret,
    FleetRunRow,
    GroupExists,
    GroupRow,
    NodeFeed,
    NodeRecord,
    RoutedCommand,
    RoutedOutput,
    StoreError,
    StoreUnavailable,
    TokenAlreadyRedeemed,
    cancel_answered,
    relay_channel,
)
from aegis_edge_relay.store.postgres_schema import _MIGRATIONS, MIGRATION_LOCK
from aegis_edge_relay.store.rows import (
    capabilities_json,
    command_from,
    console_secret_from,
    dispatch_values,
    end_values,
    feed_from,
    group_from,
    group_values,
    holder_from,
    lease_from,
    node_from,
    node_values,
    output_from,
    routed_from,
    routed_values,
    run_from,
    run_values,
    tags_json,
)
from aegis_edge_relay.store.sqlite_schema import SCHEMA_VERSION

__all__ = ["PostgresListener", "PostgresStore", "redact_url"]

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


class PostgresStore:
    """:class:`Store` on a PostgreSQL database. Use from one thread at a time (the
    relay's store worker); the pool holds the connections."""

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

    # -- nodes

    def load_nodes(self) -> list[NodeRecord]:
        rows = self._read(lambda cur: cur.execute("SELECT * FROM nodes ORDER BY node_id"))
        return [node_from(r) for r in rows]

    def get_node(self, node_id: str) -> NodeRecord | None:
        row = self._one("SELECT * FROM nodes WHERE node_id = %s", (node_id,))
        return node_from(row) if row is not None else None

    def is_tenant_deleted(self, tenant_id: str) -> bool:
        return (
            self._one("SELECT 1 FROM deleted_tenants WHERE tenant_id = %s", (tenant_id,))
            is not None
        )

    def enroll(self, *, jti: str, token_expires_at: float, node: NodeRecord) -> None:
        """Redeem ``jti`` and insert ``node`` in one transaction; a second redemption of
        the same ``jti`` raises :class:`TokenAlreadyRedeemed` and inserts nothing."""

        def tx(cur: Cursor) -> None:
            if cur.execute("SELECT 1 FROM enrollment_tokens WHERE jti = %s", (jti,)).fetchone():
                raise TokenAlreadyRedeemed(
                    "this enrollment token was already redeemed",
                    hint="enrollment tokens are single use; issue a fresh one",
                )
            if cur.execute(
                "SELECT 1 FROM deleted_tenants WHERE tenant_id = %s", (node.tenant_id,)
            ).fetchone():
                raise StoreError(
                    f"tenant {node.tenant_id!r} was deleted",
                    hint="a deleted tenant takes no new daemons",
                )
            cur.execute(
                "INSERT INTO enrollment_tokens (jti, tenant_id, node_id, redeemed_at, expires_at)"
                " VALUES (%s, %s, %s, %s, %s)",
                (jti, node.tenant_id, node.node_id, node.enrolled_at, token_expires_at),
            )
            cur.execute(
                "INSERT INTO nodes (node_id, tenant_id, public_key, key_thumbprint, enrolled_at,"
                " capabilities, tags, token_jti, token_expires_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                node_values(node),
            )

        try:
            self._write(tx)
        except psycopg.errors.UniqueViolation as err:
            if err.diag.constraint_name != "enrollment_tokens_pkey":
                raise
            # Another relay redeemed it between our check and our insert.
            raise TokenAlreadyRedeemed(
                "this enrollment token was already redeemed",
                hint="enrollment tokens are single use; issue a fresh one",
            ) from None

    def _update(self, sql: LiteralString, params: Sequence[Any]) -> int:
        return self._write(lambda cur: cur.execute(sql, params).rowcount)

    def set_capabilities(self, node_id: str, capabilities: Mapping[str, Any]) -> None:
        self._update(
            "UPDATE nodes SET capabilities = %s WHERE node_id = %s",
            (capabilities_json(capabilities), node_id),
        )

    def set_tags(self, node_id: str, tags: Sequence[str]) -> None:
        self._update("UPDATE nodes SET tags = %s WHERE node_id = %s", (tags_json(tags), node_id))

    def set_token(self, node_id: str, jti: str, expires_at: float) -> None:
        self._update(
            "UPDATE nodes SET token_jti = %s, token_expires_at = %s WHERE node_id = %s",
            (jti, expires_at, node_id),
        )

    def flush_heartbeats(self, beats: Mapping[str, float]) -> None:
        """Write many ``last_heartbeat_at`` values in one statement (``UNNEST`` of two
        arrays), one transaction."""
        if not beats:
            return
        ids = list(beats)
        stamps = [beats[n] for n in ids]
        self._update(
            "UPDATE nodes AS n SET last_heartbeat_at ="
            " GREATEST(COALESCE(n.last_heartbeat_at, 0), b.ts)"
            " FROM UNNEST(%s::text[], %s::float8[]) AS b(node_id, ts)"
            " WHERE n.node_id = b.node_id",
            (ids, stamps),
        )

    @staticmethod
    def _revoke_in(cur: Cursor, row: DictRow, reason: str, now: float, prune: float) -> None:
        cur.execute(
            "UPDATE nodes SET status = 'revoked', revoked_reason = %s, revoked_at = %s"
            " WHERE node_id = %s",
            (reason, now, row["node_id"]),
        )
        _revoke_id(cur, "key", row["key_thumbprint"], None, now)
        # Delivered at commit, once per transaction however many nodes it revoked.
        cur.execute("SELECT pg_notify(%s, 'revoked')", (NODES_CHANGED,))
        if row["token_jti"]:
            _revoke_id(
                cur, "token", row["token_jti"], max(prune, row["token_expires_at"] + 3600.0), now
            )

    def revoke_node(
        self, node_id: str, *, reason: str, now: float, token_prune_after: float
    ) -> NodeRecord:
        """Mark the node Revoked and put its key and current token on the revocation list,
        in one transaction. Revoking twice keeps the first reason."""

        def tx(cur: Cursor) -> DictRow:
            row = _node_row(cur, node_id)
            if row["status"] != "revoked":
                self._revoke_in(cur, row, reason, now, token_prune_after)
            return _node_row(cur, node_id)

        return node_from(self._write(tx))

    def delete_tenant(
        self, tenant_id: str, *, reason: str, now: float, token_prune_after: float
    ) -> list[str]:
        """Record the tenant as deleted and revoke every daemon bound to it, in one
        transaction; returns the node ids that were revoked by this call."""

        def tx(cur: Cursor) -> list[str]:
            cur.execute(
                "INSERT INTO deleted_tenants (tenant_id, deleted_at) VALUES (%s, %s)"
                " ON CONFLICT DO NOTHING",
                (tenant_id, now),
            )
            rows = cur.execute(
                "SELECT * FROM nodes WHERE tenant_id = %s AND status != 'revoked' ORDER BY node_id",
                (tenant_id,),
            ).fetchall()
            for row in rows:
                self._revoke_in(cur, row, reason, now, token_prune_after)
            return [r["node_id"] for r in rows]

        return self._write(tx)

    def rotate_key(
        self,
        node_id: str,
        *,
        old_thumbprint: str,
        new_public_key: bytes,
        new_thumbprint: str,
        new_jti: str,
        new_expires_at: float,
        old_jti_prune_after: float,
        now: float,
    ) -> NodeRecord:
        """Swap the node's key if it is still ``old_thumbprint`` (compare and swap), record
        the new token and revoke the old token and the old key, in one transaction. The
        rotated-out key goes on the key list for good (see ``SQLiteStore.rotate_key``)."""

        def tx(cur: Cursor) -> DictRow:
            row = _node_row(cur, node_id)
            if row["status"] == "revoked":
                raise StoreError(f"daemon {node_id} is revoked")
            if row["key_thumbprint"] != old_thumbprint:
                raise StoreError(
                    "the key changed while rotating", hint="another rotation won; reconnect"
                )
            if row["token_jti"]:
                _revoke_id(cur, "token", row["token_jti"], old_jti_prune_after, now)
            _revoke_id(cur, "key", old_thumbprint, None, now)
            cur.execute(
                "UPDATE nodes SET public_key = %s, key_thumbprint = %s, token_jti = %s,"
                " token_expires_at = %s WHERE node_id = %s",
                (new_public_key, new_thumbprint, new_jti, new_expires_at, node_id),
            )
            return _node_row(cur, node_id)

        return node_from(self._write(tx))

    # -- revocations

    def load_revocations(self) -> tuple[dict[str, float], set[str]]:
        tokens: dict[str, float] = {}
        keys: set[str] = set()
        rows = self._read(lambda cur: cur.execute("SELECT kind, id, prune_after FROM revocations"))
        for row in rows:
            if row["kind"] == "key":
                keys.add(row["id"])
            else:
                tokens[row["id"]] = row["prune_after"]
        return tokens, keys

    def revoke_token(self, jti: str, *, prune_after: float, now: float) -> None:
        self._write(lambda cur: _revoke_id(cur, "token", jti, prune_after, now))

    def prune_revocations(self, now: float) -> int:
        return self._update(
            "DELETE FROM revocations WHERE kind = 'token' AND prune_after < %s", (now,)
        )

    # -- cluster identity

    def publish_relay_key(self, kid: str, public_key: bytes, now: float) -> None:
        self._update(
            "INSERT INTO relay_keys (kid, public_key, created_at) VALUES (%s, %s, %s)"
            " ON CONFLICT (kid) DO NOTHING",
            (kid, public_key, now),
        )

    def load_relay_keys(self) -> dict[str, bytes]:
        rows = self._read(lambda cur: cur.execute("SELECT kid, public_key FROM relay_keys"))
        return {row["kid"]: bytes(row["public_key"]) for row in rows}

    def join_cluster(self, name: str, ca_cert: str, now: float) -> str:
        def tx(cur: Cursor) -> str:
            cur.execute(
                "INSERT INTO clusters (name, ca_cert, created_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (name) DO NOTHING",
                (name, ca_cert, now),
            )
            row = cur.execute("SELECT ca_cert FROM clusters WHERE name = %s", (name,)).fetchone()
            assert row is not None
            return str(row["ca_cert"])

        return self._write(tx)

    def publish_endpoint(self, relay_id: str, cluster: str, endpoint: str, now: float) -> None:
        self._update(
            "INSERT INTO relay_endpoints (relay_id, cluster, endpoint, updated_at)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (relay_id) DO UPDATE SET"
            " cluster = EXCLUDED.cluster, endpoint = EXCLUDED.endpoint,"
            " updated_at = EXCLUDED.updated_at",
            (relay_id, cluster, endpoint, now),
        )

    def cluster_endpoints(self, cluster: str) -> list[str]:
        rows = self._read(
            lambda cur: cur.execute(
                "SELECT DISTINCT endpoint FROM relay_endpoints WHERE cluster = %s"
                " ORDER BY endpoint",
                (cluster,),
            )
        )
        return [row["endpoint"] for row in rows]

    # -- commands

    def record_dispatch(self, row: CommandRow) -> None:
        self.record_dispatches([row])

    def record_dispatches(self, rows: Sequence[CommandRow]) -> None:
        """Many dispatches in one statement (``UNNEST`` of column arrays), one transaction:
        the dispatcher's group commit."""
        if not rows:
            return
        columns = list(zip(*(dispatch_values(row) for row in rows), strict=True))
        self._update(
            "INSERT INTO commands (command_id, node_id, tenant_id, fleet_command_id, tool,"
            " dispatched_at) SELECT * FROM UNNEST(%s::text[], %s::text[], %s::text[],"
            " %s::text[], %s::text[], %s::float8[]) ON CONFLICT (command_id) DO NOTHING",
            [list(c) for c in columns],
        )

    def record_result(self, row: CommandRow) -> bool:
        """Store a command's end. A late result overwrites an ``edge_disconnected`` end;
        a second real result is ignored. Returns whether the row changed."""
        return self.record_results([row])[0]

    def record_results(self, rows: Sequence[CommandRow]) -> list[bool]:
        """:meth:`record_result` for many rows in one transaction (group commit): one
        upsert per row, pipelined, in order (a batch may end the same command twice)."""
        if not rows:
            return []

        def tx(cur: Cursor) -> list[bool]:
            cur.executemany(
                "INSERT INTO commands (command_id, node_id, tenant_id, fleet_command_id, tool,"
                " dispatched_at, finished_at, outcome, exit_code, error, stdout_tail,"
                " stderr_tail, result_json)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (command_id) DO UPDATE SET finished_at = EXCLUDED.finished_at,"
                " outcome = EXCLUDED.outcome, exit_code = EXCLUDED.exit_code,"
                " error = EXCLUDED.error, stdout_tail = EXCLUDED.stdout_tail,"
                " stderr_tail = EXCLUDED.stderr_tail, result_json = EXCLUDED.result_json"
                " WHERE commands.outcome IN ('', 'edge_disconnected')"
                " RETURNING command_id",
                [(*dispatch_values(row), *end_values(row)) for row in rows],
                returning=True,
            )
            changed = []
            while True:
                changed.append(cur.fetchone() is not None)
                if not cur.nextset():
                    return changed

        return self._write(tx)

    def command_history(self, node_id: str, limit: int) -> list[CommandRow]:
        rows = self._read(
            lambda cur: cur.execute(
                "SELECT * FROM commands WHERE node_id = %s ORDER BY dispatched_at DESC LIMIT %s",
                (node_id, limit),
            )
        )
        return [command_from(r) for r in rows]

    def get_command(self, command_id: str) -> CommandRow | None:
        row = self._one("SELECT * FROM commands WHERE command_id = %s", (command_id,))
        return command_from(row) if row is not None else None

    def finish_orphaned_commands(self, *, now: float, error: str) -> int:
        """At start: every command still without an end was lost with the previous relay
        process; end it ``edge_disconnected`` (a late result still overwrites it)."""
        return self._update(
            "UPDATE commands SET finished_at = %s, outcome = 'edge_disconnected', error = %s"
            " WHERE outcome = ''",
            (now, error),
        )

    def fleet_run_commands(self, fleet_command_id: str) -> list[CommandRow]:
        rows = self._read(
            lambda cur: cur.execute(
                "SELECT * FROM commands WHERE fleet_command_id = %s ORDER BY dispatched_at",
                (fleet_command_id,),
            )
        )
        return [command_from(r) for r in rows]

    # -- fleet runs

    def unfinished_fleet_runs(self) -> list[FleetRunRow]:
        rows = self._read(
            lambda cur: cur.execute("SELECT * FROM fleet_runs WHERE outcome = 'running'")
        )
        return [run_from(r) for r in rows]

    def save_fleet_run(self, row: FleetRunRow) -> None:
        self._update(
            "INSERT INTO fleet_runs (fleet_command_id, tenant_id, scope, spec, outcome,"
            " created_at, finished_at, created_by, record, trace_id, args_json, secret_keys,"
            " rerun_of) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (fleet_command_id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id,"
            " scope = EXCLUDED.scope, spec = EXCLUDED.spec, outcome = EXCLUDED.outcome,"
            " created_at = EXCLUDED.created_at, finished_at = EXCLUDED.finished_at,"
            " created_by = EXCLUDED.created_by, record = EXCLUDED.record,"
            " trace_id = EXCLUDED.trace_id, args_json = EXCLUDED.args_json,"
            " secret_keys = EXCLUDED.secret_keys, rerun_of = EXCLUDED.rerun_of",
            run_values(row),
        )

    def get_fleet_run(self, fleet_command_id: str) -> FleetRunRow | None:
        row = self._one("SELECT * FROM fleet_runs WHERE fleet_command_id = %s", (fleet_command_id,))
        return run_from(row) if row is not None else None

    def list_fleet_runs(self, limit: int) -> list[FleetRunRow]:
        rows = self._read(
            lambda cur: cur.execute(
                "SELECT * FROM fleet_runs ORDER BY created_at DESC LIMIT %s", (limit,)
            )
        )
        return [run_from(r) for r in rows]

    # -- saved groups

    def create_group(self, row: GroupRow) -> None:
        """Insert a group; :class:`GroupExists` if the tenant has one of that name."""
        try:
            self._update(
                "INSERT INTO groups (tenant_id, name, selector, pinned, created_at, created_by)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                group_values(row),
            )
        except psycopg.errors.UniqueViolation:
            raise GroupExists(
                f"group {row.name!r} already exists in tenant {row.tenant_id!r}",
                hint=f"remove it first (aegis edge groups rm {row.name}) or pick another name",
            ) from None

    def list_groups(self, tenants: Collection[str] | None) -> list[GroupRow]:
        """The groups of ``tenants`` (None: every tenant), by tenant then name."""
        if tenants is None:
            rows = self._read(
                lambda cur: cur.execute("SELECT * FROM groups ORDER BY tenant_id, name")
            )
        else:
            wanted = sorted(set(tenants))
            if not wanted:
                return []
            rows = self._read(
                lambda cur: cur.execute(
                    "SELECT * FROM groups WHERE tenant_id = ANY(%s) ORDER BY tenant_id, name",
                    (wanted,),
                )
            )
        return [group_from(r) for r in rows]

    def get_group(self, tenant_id: str, name: str) -> GroupRow | None:
        row = self._one(
            "SELECT * FROM groups WHERE tenant_id = %s AND name = %s", (tenant_id, name)
        )
        return group_from(row) if row is not None else None

    def delete_group(self, tenant_id: str, name: str) -> bool:
        """Delete a group; returns whether there was one."""
        deleted = self._update(
            "DELETE FROM groups WHERE tenant_id = %s AND name = %s", (tenant_id, name)
        )
        return deleted > 0

    # -- the cluster

    def renew_lease(self, lease: RelayLease) -> None:
        self._update(
            "INSERT INTO relay_leases (relay_id, endpoint, expires_at) VALUES (%s, %s, %s)"
            " ON CONFLICT (relay_id) DO UPDATE"
            " SET endpoint = EXCLUDED.endpoint, expires_at = EXCLUDED.expires_at",
            (lease.relay_id, lease.endpoint, lease.expires_at),
        )

    def load_leases(self) -> list[RelayLease]:
        rows = self._read(lambda cur: cur.execute("SELECT * FROM relay_leases"))
        return [lease_from(r) for r in rows]

    def drop_lease(self, relay_id: str) -> int:
        def tx(cur: Cursor) -> int:
            cur.execute("DELETE FROM relay_leases WHERE relay_id = %s", (relay_id,))
            return cur.execute(
                "UPDATE stream_holders SET relay_id = '', status = 'Disconnected'"
                " WHERE relay_id = %s",
                (relay_id,),
            ).rowcount

        return self._write(tx)

    def hold_stream(self, node_id: str, relay_id: str, status: str, now: float) -> int:
        def tx(cur: Cursor) -> int:
            row = cur.execute(
                "INSERT INTO stream_holders (node_id, relay_id, generation, status, since)"
                " VALUES (%s, %s, 1, %s, %s) ON CONFLICT (node_id) DO UPDATE"
                " SET relay_id = EXCLUDED.relay_id, status = EXCLUDED.status,"
                " since = EXCLUDED.since, generation = stream_holders.generation + 1"
                " RETURNING generation",
                (node_id, relay_id, status, now),
            ).fetchone()
            assert row is not None
            return int(row["generation"])

        return self._write(tx)

    def release_stream(self, node_id: str, relay_id: str, generation: int) -> bool:
        return bool(
            self._update(
                "UPDATE stream_holders SET relay_id = '', status = 'Disconnected'"
                " WHERE node_id = %s AND relay_id = %s AND generation = %s",
                (node_id, relay_id, generation),
            )
        )

    def set_held_statuses(self, relay_id: str, statuses: Sequence[tuple[str, int, str]]) -> None:
        if not statuses:
            return
        self._update(
            "UPDATE stream_holders AS h SET status = s.status"
            " FROM UNNEST(%s::text[], %s::bigint[], %s::text[]) AS s(node_id, gen, status)"
            " WHERE h.node_id = s.node_id AND h.generation = s.gen AND h.relay_id = %s",
            (
                [n for n, _, _ in statuses],
                [g for _, g, _ in statuses],
                [st for _, _, st in statuses],
                relay_id,
            ),
        )

    def route_commands(self, rows: Sequence[RoutedCommand]) -> None:
        if not rows:
            return

        def tx(cur: Cursor) -> None:
            cur.executemany(
                "INSERT INTO commands (command_id, node_id, tenant_id, fleet_command_id, tool,"
                " dispatched_at) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                [dispatch_values(row.dispatch_row()) for row in rows],
            )
            cur.executemany(
                "INSERT INTO routed_commands (command_id, node_id, tenant_id, holder, coordinator,"
                " tool, args_json, fleet_command_id, deadline, timeout_secs, created_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (command_id) DO NOTHING",
                [routed_values(row) for row in rows],
            )
            for holder in sorted({row.holder for row in rows}):
                cur.execute("SELECT pg_notify(%s, 'route')", (relay_channel(holder),))

        self._write(tx)

    def take_routed(self, holder: str) -> list[RoutedCommand]:
        rows = self._write(
            lambda cur: cur.execute(
                "UPDATE routed_commands SET state = 'sent'"
                " WHERE holder = %s AND state = 'queued' RETURNING *",
                (holder,),
            ).fetchall()
        )
        return sorted((routed_from(r) for r in rows), key=lambda r: r.created_at)

    def cancel_routed(self, command_id: str, reason: str) -> None:
        def tx(cur: Cursor) -> None:
            row = cur.execute(
                "UPDATE routed_commands SET cancel = %s WHERE command_id = %s AND cancel = ''"
                " AND state IN ('queued', 'sent') RETURNING holder",
                (reason or "cancelled", command_id),
            ).fetchone()
            if row is not None:
                cur.execute("SELECT pg_notify(%s, 'route')", (relay_channel(row["holder"]),))

        self._write(tx)

    def take_cancels(self, holder: str) -> list[tuple[str, str]]:
        rows = self._write(
            lambda cur: cur.execute(
                "UPDATE routed_commands SET cancel_sent = 1 WHERE holder = %s AND state = 'sent'"
                " AND cancel <> '' AND cancel_sent = 0 RETURNING command_id, cancel",
                (holder,),
            ).fetchall()
        )
        return [(r["command_id"], r["cancel"]) for r in rows]

    def finish_routed(self, command_id: str) -> None:
        def tx(cur: Cursor) -> None:
            row = cur.execute(
                "UPDATE routed_commands SET state = 'done' WHERE command_id = %s"
                " AND state IN ('queued', 'sent') RETURNING coordinator",
                (command_id,),
            ).fetchone()
            if row is not None:
                cur.execute("SELECT pg_notify(%s, 'result')", (relay_channel(row["coordinator"]),))

        self._write(tx)

    def take_routed_results(self, coordinator: str) -> list[str]:
        rows = self._write(
            lambda cur: cur.execute(
                "UPDATE routed_commands SET state = 'collected'"
                " WHERE coordinator = %s AND state = 'done' RETURNING command_id",
                (coordinator,),
            ).fetchall()
        )
        return [r["command_id"] for r in rows]

    def lease_runs(self, coordinator: str, ids: Sequence[str], expires_at: float) -> None:
        if not ids:
            return
        self._update(
            "INSERT INTO run_leases (fleet_command_id, coordinator, expires_at)"
            " SELECT id, %s, %s FROM UNNEST(%s::text[]) AS id"
            " ON CONFLICT (fleet_command_id) DO UPDATE SET expires_at = EXCLUDED.expires_at"
            " WHERE run_leases.coordinator = EXCLUDED.coordinator",
            (coordinator, expires_at, list(ids)),
        )

    def load_run_leases(self) -> list[tuple[str, str, float]]:
        rows = self._read(lambda cur: cur.execute("SELECT * FROM run_leases"))
        return [(r["fleet_command_id"], r["coordinator"], r["expires_at"]) for r in rows]

    def claim_run(
        self, fleet_command_id: str, coordinator: str, expected: str, expires_at: float
    ) -> dict[str, str] | None:
        def tx(cur: Cursor) -> dict[str, str] | None:
            won = cur.execute(
                "INSERT INTO run_leases (fleet_command_id, coordinator, expires_at)"
                " VALUES (%s, %s, %s) ON CONFLICT (fleet_command_id) DO UPDATE"
                " SET coordinator = EXCLUDED.coordinator, expires_at = EXCLUDED.expires_at"
                " WHERE run_leases.coordinator = %s RETURNING fleet_command_id",
                (fleet_command_id, coordinator, expires_at, expected),
            ).fetchone()
            if won is None:
                return None
            rows = cur.execute(
                "UPDATE routed_commands SET coordinator = %s WHERE fleet_command_id = %s"
                " RETURNING command_id, holder",
                (coordinator, fleet_command_id),
            ).fetchall()
            return {r["command_id"]: r["holder"] for r in rows}

        return self._write(tx)

    def drop_run_lease(self, fleet_command_id: str, coordinator: str) -> None:
        def tx(cur: Cursor) -> None:
            if (
                cur.execute(
                    "DELETE FROM run_leases WHERE fleet_command_id = %s AND coordinator = %s",
                    (fleet_command_id, coordinator),
                ).rowcount
                and cur.execute(
                    "DELETE FROM run_cancels WHERE fleet_command_id = %s", (fleet_command_id,)
                ).rowcount
            ):
                # an asker still waiting reads the finished run instead
                cur.execute(
                    "SELECT pg_notify(%s, %s)", (RUN_CANCELS, cancel_answered(fleet_command_id))
                )

        self._write(tx)

    def route_output(self, rows: Sequence[RoutedOutput]) -> None:
        if not rows:
            return

        def tx(cur: Cursor) -> None:
            cur.executemany(
                "INSERT INTO routed_output (command_id, seq, stdout, stderr)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                [(r.command_id, r.seq, r.stdout, r.stderr) for r in rows],
            )
            ids = sorted({r.command_id for r in rows})
            for command_id in ids:
                gone = cur.execute(
                    "DELETE FROM routed_output WHERE command_id = %s AND seq IN"
                    " (SELECT seq FROM routed_output WHERE command_id = %s"
                    "  ORDER BY seq DESC OFFSET %s)"
                    " RETURNING octet_length(stdout) + octet_length(stderr) + dropped_before"
                    " AS size",
                    (command_id, command_id, ROUTED_OUTPUT_ROWS),
                ).fetchall()
                if gone:
                    cur.execute(
                        "UPDATE routed_output SET dropped_before = dropped_before + %s"
                        " WHERE command_id = %s AND seq ="
                        " (SELECT min(seq) FROM routed_output WHERE command_id = %s)",
                        (sum(int(g["size"]) for g in gone), command_id, command_id),
                    )
            for row in cur.execute(
                "SELECT DISTINCT coordinator FROM routed_commands WHERE command_id = ANY(%s)",
                (ids,),
            ).fetchall():
                cur.execute("SELECT pg_notify(%s, 'output')", (relay_channel(row["coordinator"]),))

        self._write(tx)

    def take_routed_output(self, coordinator: str) -> list[RoutedOutput]:
        rows = self._write(
            lambda cur: cur.execute(
                "DELETE FROM routed_output AS o USING routed_commands AS r"
                " WHERE r.command_id = o.command_id AND r.coordinator = %s RETURNING o.*",
                (coordinator,),
            ).fetchall()
        )
        return sorted((output_from(r) for r in rows), key=lambda o: (o.command_id, o.seq))

    def request_run_cancel(self, fleet_command_id: str, reason: str, now: float) -> None:
        def tx(cur: Cursor) -> None:
            cur.execute(
                "INSERT INTO run_cancels (fleet_command_id, reason, requested_at)"
                " VALUES (%s, %s, %s) ON CONFLICT (fleet_command_id) DO UPDATE"
                " SET reason = EXCLUDED.reason, requested_at = EXCLUDED.requested_at,"
                " taken_by = '', answer = NULL",
                (fleet_command_id, reason, now),
            )
            row = cur.execute(
                "SELECT coordinator FROM run_leases WHERE fleet_command_id = %s",
                (fleet_command_id,),
            ).fetchone()
            if row is not None:
                cur.execute("SELECT pg_notify(%s, 'cancel')", (relay_channel(row["coordinator"]),))

        self._write(tx)

    def take_run_cancels(self, coordinator: str) -> list[tuple[str, str]]:
        rows = self._write(
            lambda cur: cur.execute(
                "UPDATE run_cancels AS c SET taken_by = l.coordinator FROM run_leases AS l"
                " WHERE l.fleet_command_id = c.fleet_command_id AND l.coordinator = %s"
                " AND c.taken_by <> l.coordinator RETURNING c.fleet_command_id, c.reason",
                (coordinator,),
            ).fetchall()
        )
        return [(r["fleet_command_id"], r["reason"]) for r in rows]

    def answer_run_cancel(self, fleet_command_id: str, answer: bytes) -> None:
        def tx(cur: Cursor) -> None:
            cur.execute(
                "UPDATE run_cancels SET answer = %s WHERE fleet_command_id = %s",
                (answer, fleet_command_id),
            )
            cur.execute(
                "SELECT pg_notify(%s, %s)", (RUN_CANCELS, cancel_answered(fleet_command_id))
            )

        self._write(tx)

    def run_cancel_answer(self, fleet_command_id: str) -> bytes | None:
        rows = self._read(
            lambda cur: cur.execute(
                "SELECT answer FROM run_cancels WHERE fleet_command_id = %s", (fleet_command_id,)
            )
        )
        return bytes(rows[0]["answer"]) if rows and rows[0]["answer"] is not None else None

    def listen(self, channels: Sequence[str]) -> PostgresListener:
        conn = self._connect()
        try:
            for channel in channels:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except psycopg.Error as err:
            conn.close()
            raise self._error(err) from err
        return PostgresListener(conn, self._error)

    def load_holders(self) -> list[Holder]:
        rows = self._read(
            lambda cur: cur.execute("SELECT * FROM stream_holders WHERE relay_id <> ''")
        )
        return [holder_from(r) for r in rows]

    # -- the change feed (``aegis_edge_core.cluster_feed``) and console sessions

    def node_feed(self, since: int | None) -> NodeFeed:
        """One REPEATABLE READ snapshot for both tables: with migration 8's trigger making
        feed writers commit in number order, every number up to the highest read is in it."""
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                if since is None:
                    nodes = cur.execute("SELECT * FROM nodes").fetchall()
                    holders = cur.execute(
                        "SELECT * FROM stream_holders WHERE relay_id <> ''"
                    ).fetchall()
                else:
                    # A generic plan for `change_seq > $1` guesses a third of the table and
                    # scans all of it; the feed's point is to touch only the rows changed.
                    cur.execute("SET LOCAL enable_seqscan = off")
                    nodes = cur.execute(
                        "SELECT * FROM nodes WHERE change_seq > %s", (since,)
                    ).fetchall()
                    holders = cur.execute(
                        "SELECT * FROM stream_holders WHERE change_seq > %s", (since,)
                    ).fetchall()
                seq = cur.execute("SELECT last_value, is_called FROM change_feed").fetchone()
        except psycopg.Error as err:
            raise self._error(err) from err
        head = int(seq["last_value"]) if seq is not None and seq["is_called"] else 0
        return feed_from(nodes, holders, head, full=since is None)

    def put_console_secret(self, secret_hash: str, secret: ConsoleSecret, now: float) -> None:
        def tx(cur: Cursor) -> None:
            cur.execute("DELETE FROM console_sessions WHERE expires_at <= %s", (now,))
            cur.execute(
                "INSERT INTO console_sessions (secret_hash, kind, sealed, expires_at, created_at)"
                " VALUES (%s, %s, %s, %s, %s)",
                (secret_hash, secret.kind, secret.sealed, secret.expires_at, now),
            )

        self._write(tx)

    def get_console_secret(self, secret_hash: str, kind: str, now: float) -> ConsoleSecret | None:
        row = self._one(
            "SELECT * FROM console_sessions WHERE secret_hash = %s AND kind = %s"
            " AND expires_at > %s",
            (secret_hash, kind, now),
        )
        return console_secret_from(row) if row is not None else None

    def take_console_secret(self, secret_hash: str, kind: str, now: float) -> ConsoleSecret | None:
        row = self._write(
            lambda cur: cur.execute(
                "DELETE FROM console_sessions WHERE secret_hash = %s AND kind = %s RETURNING *",
                (secret_hash, kind),
            ).fetchone()
        )
        if row is None or row["expires_at"] <= now:
            return None
        return console_secret_from(row)


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


def _node_row(cur: Cursor, node_id: str) -> DictRow:
    row = cur.execute("SELECT * FROM nodes WHERE node_id = %s", (node_id,)).fetchone()
    if row is None:
        raise StoreError(f"daemon {node_id} not found")
    return row


def _revoke_id(cur: Cursor, kind: str, ident: str, prune_after: float | None, now: float) -> None:
    cur.execute(
        "INSERT INTO revocations (kind, id, prune_after, revoked_at) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (kind, id) DO UPDATE SET prune_after = EXCLUDED.prune_after,"
        " revoked_at = EXCLUDED.revoked_at",
        (kind, ident, prune_after, now),
    )
