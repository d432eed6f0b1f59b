"""The SQLite implementation of :class:`~aegis_edge_relay.store.base.Store`: the relay's
embedded default, one file in its data dir.

WAL, a versioned schema (``schema_version``, migrated on open) and ``BEGIN IMMEDIATE`` for
each change the interface says is atomic. The file and its sidecars are created owner-only.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from aegis_edge_core.cluster import Holder, RelayLease
from aegis_edge_relay.files import tighten_mode
from aegis_edge_relay.store.base import (
    ROUTED_OUTPUT_ROWS,
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
)
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
from aegis_edge_relay.store.sqlite_schema import _MIGRATIONS, SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]


class SQLiteStore:
    """:class:`Store` on one SQLite file in WAL mode. Use from one thread at a time."""

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

    # -- nodes

    def load_nodes(self) -> list[NodeRecord]:
        return [node_from(r) for r in self._db.execute("SELECT * FROM nodes ORDER BY node_id")]

    def get_node(self, node_id: str) -> NodeRecord | None:
        row = self._db.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
        return node_from(row) if row is not None else None

    def is_tenant_deleted(self, tenant_id: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM deleted_tenants WHERE tenant_id = ?", (tenant_id,)
        ).fetchone()
        return row is not None

    def enroll(self, *, jti: str, token_expires_at: float, node: NodeRecord) -> None:
        """Redeem ``jti`` and insert ``node`` in one transaction; a second redemption of
        the same ``jti`` raises :class:`TokenAlreadyRedeemed` and inserts nothing."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM enrollment_tokens WHERE jti = ?", (jti,)).fetchone():
                raise TokenAlreadyRedeemed(
                    "this enrollment token was already redeemed",
                    hint="enrollment tokens are single use; issue a fresh one",
                )
            if db.execute(
                "SELECT 1 FROM deleted_tenants WHERE tenant_id = ?", (node.tenant_id,)
            ).fetchone():
                raise StoreError(
                    f"tenant {node.tenant_id!r} was deleted",
                    hint="a deleted tenant takes no new daemons",
                )
            db.execute(
                "INSERT INTO enrollment_tokens (jti, tenant_id, node_id, redeemed_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (jti, node.tenant_id, node.node_id, node.enrolled_at, token_expires_at),
            )
            db.execute(
                "INSERT INTO nodes (node_id, tenant_id, public_key, key_thumbprint, enrolled_at,"
                " capabilities, tags, token_jti, token_expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                node_values(node),
            )

    def set_capabilities(self, node_id: str, capabilities: Mapping[str, Any]) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE nodes SET capabilities = ? WHERE node_id = ?",
                (capabilities_json(capabilities), node_id),
            )

    def set_tags(self, node_id: str, tags: Sequence[str]) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE nodes SET tags = ? WHERE node_id = ?",
                (tags_json(tags), node_id),
            )

    def set_token(self, node_id: str, jti: str, expires_at: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE nodes SET token_jti = ?, token_expires_at = ? WHERE node_id = ?",
                (jti, expires_at, node_id),
            )

    def flush_heartbeats(self, beats: Mapping[str, float]) -> None:
        """Write many ``last_heartbeat_at`` values in one transaction."""
        if not beats:
            return
        with self._tx() as db:
            db.executemany(
                "UPDATE nodes SET last_heartbeat_at = MAX(COALESCE(last_heartbeat_at, 0), ?)"
                " WHERE node_id = ?",
                [(ts, node_id) for node_id, ts in beats.items()],
            )

    def _revoke_in(
        self, db: sqlite3.Connection, row: sqlite3.Row, reason: str, now: float, prune: float
    ) -> None:
        db.execute(
            "UPDATE nodes SET status = 'revoked', revoked_reason = ?, revoked_at = ?"
            " WHERE node_id = ?",
            (reason, now, row["node_id"]),
        )
        db.execute(
            "INSERT OR REPLACE INTO revocations (kind, id, prune_after, revoked_at)"
            " VALUES ('key', ?, NULL, ?)",
            (row["key_thumbprint"], now),
        )
        if row["token_jti"]:
            db.execute(
                "INSERT OR REPLACE INTO revocations (kind, id, prune_after, revoked_at)"
                " VALUES ('token', ?, ?, ?)",
                (row["token_jti"], max(prune, row["token_expires_at"] + 3600.0), now),
            )

    def revoke_node(
        self, node_id: str, *, reason: str, now: float, token_prune_after: float
    ) -> NodeRecord:
        """Mark the node Revoked and put its key and current token on the revocation list,
        in one transaction. Revoking twice keeps the first reason."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
            if row is None:
                raise StoreError(f"daemon {node_id} not found")
            if row["status"] != "revoked":
                self._revoke_in(db, row, reason, now, token_prune_after)
            updated = db.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
        return node_from(updated)

    def delete_tenant(
        self, tenant_id: str, *, reason: str, now: float, token_prune_after: float
    ) -> list[str]:
        """Record the tenant as deleted and revoke every daemon bound to it, in one
        transaction; returns the node ids that were revoked by this call."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO deleted_tenants (tenant_id, deleted_at) VALUES (?, ?)",
                (tenant_id, now),
            )
            rows = db.execute(
                "SELECT * FROM nodes WHERE tenant_id = ? AND status != 'revoked'", (tenant_id,)
            ).fetchall()
            for row in rows:
                self._revoke_in(db, row, reason, now, token_prune_after)
        return [r["node_id"] for r in rows]

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
        the new token and revoke the old token and the old key, in one transaction.

        The rotated-out key goes on the key list for good: a key its owner stopped using
        may be lying in a backup, and must neither enroll as a new node nor attest."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
            if row is None:
                raise StoreError(f"daemon {node_id} not found")
            if row["status"] == "revoked":
                raise StoreError(f"daemon {node_id} is revoked")
            if row["key_thumbprint"] != old_thumbprint:
                raise StoreError(
                    "the key changed while rotating", hint="another rotation won; reconnect"
                )
            if row["token_jti"]:
                db.execute(
                    "INSERT OR REPLACE INTO revocations (kind, id, prune_after, revoked_at)"
                    " VALUES ('token', ?, ?, ?)",
                    (row["token_jti"], old_jti_prune_after, now),
                )
            db.execute(
                "INSERT OR REPLACE INTO revocations (kind, id, prune_after, revoked_at)"
                " VALUES ('key', ?, NULL, ?)",
                (old_thumbprint, now),
            )
            db.execute(
                "UPDATE nodes SET public_key = ?, key_thumbprint = ?, token_jti = ?,"
                " token_expires_at = ? WHERE node_id = ?",
                (new_public_key, new_thumbprint, new_jti, new_expires_at, node_id),
            )
            updated = db.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
        return node_from(updated)

    # -- revocations

    def load_revocations(self) -> tuple[dict[str, float], set[str]]:
        tokens: dict[str, float] = {}
        keys: set[str] = set()
        for row in self._db.execute("SELECT kind, id, prune_after FROM revocations"):
            if row["kind"] == "key":
                keys.add(row["id"])
            else:
                tokens[row["id"]] = row["prune_after"]
        return tokens, keys

    def revoke_token(self, jti: str, *, prune_after: float, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO revocations (kind, id, prune_after, revoked_at)"
                " VALUES ('token', ?, ?, ?)",
                (jti, prune_after, now),
            )

    def prune_revocations(self, now: float) -> int:
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM revocations WHERE kind = 'token' AND prune_after < ?", (now,)
            )
            return cur.rowcount

    # -- cluster identity

    def publish_relay_key(self, kid: str, public_key: bytes, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO relay_keys (kid, public_key, created_at) VALUES (?, ?, ?)",
                (kid, public_key, now),
            )

    def load_relay_keys(self) -> dict[str, bytes]:
        rows = self._db.execute("SELECT kid, public_key FROM relay_keys")
        return {row["kid"]: bytes(row["public_key"]) for row in rows}

    def join_cluster(self, name: str, ca_cert: str, now: float) -> str:
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO clusters (name, ca_cert, created_at) VALUES (?, ?, ?)",
                (name, ca_cert, now),
            )
            row = db.execute("SELECT ca_cert FROM clusters WHERE name = ?", (name,)).fetchone()
            return str(row["ca_cert"])

    def publish_endpoint(self, relay_id: str, cluster: str, endpoint: str, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO relay_endpoints (relay_id, cluster, endpoint, updated_at)"
                " VALUES (?, ?, ?, ?)",
                (relay_id, cluster, endpoint, now),
            )

    def cluster_endpoints(self, cluster: str) -> list[str]:
        rows = self._db.execute(
            "SELECT DISTINCT endpoint FROM relay_endpoints WHERE cluster = ? ORDER BY endpoint",
            (cluster,),
        )
        return [row["endpoint"] for row in rows]

    # -- commands

    def record_dispatch(self, row: CommandRow) -> None:
        self.record_dispatches([row])

    def record_dispatches(self, rows: Sequence[CommandRow]) -> None:
        """Many dispatches in one transaction (the dispatcher's group commit)."""
        with self._tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO commands (command_id, node_id, tenant_id,"
                " fleet_command_id, tool, dispatched_at) VALUES (?, ?, ?, ?, ?, ?)",
                [dispatch_values(row) for row in rows],
            )

    def record_result(self, row: CommandRow) -> bool:
        """Store a command's end. A late result overwrites an ``edge_disconnected`` end;
        a second real result is ignored. Returns whether the row changed."""
        return self.record_results([row])[0]

    def record_results(self, rows: Sequence[CommandRow]) -> list[bool]:
        """:meth:`record_result` for many rows in one transaction (group commit)."""
        with self._tx() as db:
            return [self._result_in(db, row) for row in rows]

    def _result_in(self, db: sqlite3.Connection, row: CommandRow) -> bool:
        existing = db.execute(
            "SELECT outcome FROM commands WHERE command_id = ?", (row.command_id,)
        ).fetchone()
        if existing is None:
            db.execute(
                "INSERT INTO commands (command_id, node_id, tenant_id, fleet_command_id,"
                " tool, dispatched_at) VALUES (?, ?, ?, ?, ?, ?)",
                dispatch_values(row),
            )
        elif existing["outcome"] not in ("", "edge_disconnected"):
            return False
        db.execute(
            "UPDATE commands SET finished_at = ?, outcome = ?, exit_code = ?, error = ?,"
            " stdout_tail = ?, stderr_tail = ?, result_json = ? WHERE command_id = ?",
            (*end_values(row), row.command_id),
        )
        return True

    def command_history(self, node_id: str, limit: int) -> list[CommandRow]:
        rows = self._db.execute(
            "SELECT * FROM commands WHERE node_id = ? ORDER BY dispatched_at DESC LIMIT ?",
            (node_id, limit),
        )
        return [command_from(r) for r in rows]

    def get_command(self, command_id: str) -> CommandRow | None:
        row = self._db.execute(
            "SELECT * FROM commands WHERE command_id = ?", (command_id,)
        ).fetchone()
        return command_from(row) if row is not None else None

    def finish_orphaned_commands(self, *, now: float, error: str) -> int:
        """At start: every command still without an end was lost with the previous relay
        process; end it ``edge_disconnected`` (a late result still overwrites it). Not the
        commands of runs the previous process handed over (their lease set to 0): their
        results are still coming, to the successor that resumes the run."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE commands SET finished_at = ?, outcome = 'edge_disconnected', error = ?"
                " WHERE outcome = '' AND fleet_command_id NOT IN"
                " (SELECT fleet_command_id FROM run_leases WHERE expires_at <= 0)",
                (now, error),
            )
            return cur.rowcount

    def fleet_run_commands(self, fleet_command_id: str) -> list[CommandRow]:
        rows = self._db.execute(
            "SELECT * FROM commands WHERE fleet_command_id = ? ORDER BY dispatched_at",
            (fleet_command_id,),
        )
        return [command_from(r) for r in rows]

    # -- fleet runs

    def unfinished_fleet_runs(self) -> list[FleetRunRow]:
        rows = self._db.execute("SELECT * FROM fleet_runs WHERE outcome = 'running'")
        return [run_from(r) for r in rows]

    def save_fleet_run(self, row: FleetRunRow) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO fleet_runs (fleet_command_id, tenant_id, scope, spec,"
                " outcome, created_at, finished_at, created_by, record, trace_id, args_json,"
                " secret_keys, rerun_of) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                run_values(row),
            )

    def get_fleet_run(self, fleet_command_id: str) -> FleetRunRow | None:
        row = self._db.execute(
            "SELECT * FROM fleet_runs WHERE fleet_command_id = ?", (fleet_command_id,)
        ).fetchone()
        return run_from(row) if row is not None else None

    def list_fleet_runs(self, limit: int) -> list[FleetRunRow]:
        rows = self._db.execute(
            "SELECT * FROM fleet_runs ORDER BY created_at DESC LIMIT ?", (limit,)
        )
        return [run_from(r) for r in rows]

    # -- saved groups

    def create_group(self, row: GroupRow) -> None:
        """Insert a group; :class:`GroupExists` if the tenant has one of that name."""
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO groups (tenant_id, name, selector, pinned, created_at,"
                    " created_by) VALUES (?, ?, ?, ?, ?, ?)",
                    group_values(row),
                )
        except sqlite3.IntegrityError:
            raise GroupExists(
                f"group {row.name!r} already exists in tenant {row.tenant_id!r}",
                hint=f"remove it first (aegis edge groups rm {row.name}) or pick another name",
            ) from None

    def list_groups(self, tenants: Collection[str] | None) -> list[GroupRow]:
        """The groups of ``tenants`` (None: every tenant), by tenant then name."""
        if tenants is None:
            rows = self._db.execute("SELECT * FROM groups ORDER BY tenant_id, name")
            return [group_from(r) for r in rows]
        wanted = sorted(set(tenants))
        if not wanted:
            return []
        marks = ",".join("?" * len(wanted))
        rows = self._db.execute(
            f"SELECT * FROM groups WHERE tenant_id IN ({marks}) ORDER BY tenant_id, name",  # noqa: S608 -- placeholders only
            wanted,
        )
        return [group_from(r) for r in rows]

    def get_group(self, tenant_id: str, name: str) -> GroupRow | None:
        row = self._db.execute(
            "SELECT * FROM groups WHERE tenant_id = ? AND name = ?", (tenant_id, name)
        ).fetchone()
        return group_from(row) if row is not None else None

    def delete_group(self, tenant_id: str, name: str) -> bool:
        """Delete a group; returns whether there was one."""
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM groups WHERE tenant_id = ? AND name = ?", (tenant_id, name)
            )
            return cur.rowcount > 0

    # -- the cluster (of one relay, here)

    def renew_lease(self, lease: RelayLease) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO relay_leases (relay_id, endpoint, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (relay_id) DO UPDATE"
                " SET endpoint = excluded.endpoint, expires_at = excluded.expires_at",
                (lease.relay_id, lease.endpoint, lease.expires_at),
            )

    def load_leases(self) -> list[RelayLease]:
        return [lease_from(r) for r in self._db.execute("SELECT * FROM relay_leases")]

    def drop_lease(self, relay_id: str) -> int:
        with self._tx() as db:
            db.execute("DELETE FROM relay_leases WHERE relay_id = ?", (relay_id,))
            return db.execute(
                "UPDATE stream_holders SET relay_id = '', status = 'Disconnected'"
                " WHERE relay_id = ?",
                (relay_id,),
            ).rowcount

    def hold_stream(self, node_id: str, relay_id: str, status: str, now: float) -> int:
        with self._tx() as db:
            row = db.execute(
                "INSERT INTO stream_holders (node_id, relay_id, generation, status, since)"
                " VALUES (?, ?, 1, ?, ?) ON CONFLICT (node_id) DO UPDATE"
                " SET relay_id = excluded.relay_id, status = excluded.status,"
                " since = excluded.since, generation = stream_holders.generation + 1"
                " RETURNING generation",
                (node_id, relay_id, status, now),
            ).fetchone()
            return int(row["generation"])

    def release_stream(self, node_id: str, relay_id: str, generation: int) -> bool:
        with self._tx() as db:
            return bool(
                db.execute(
                    "UPDATE stream_holders SET relay_id = '', status = 'Disconnected'"
                    " WHERE node_id = ? AND relay_id = ? AND generation = ?",
                    (node_id, relay_id, generation),
                ).rowcount
            )

    def set_held_statuses(self, relay_id: str, statuses: Sequence[tuple[str, int, str]]) -> None:
        if not statuses:
            return
        with self._tx() as db:
            db.executemany(
                "UPDATE stream_holders SET status = ?"
                " WHERE node_id = ? AND generation = ? AND relay_id = ?",
                [(status, node_id, gen, relay_id) for node_id, gen, status in statuses],
            )

    def route_commands(self, rows: Sequence[RoutedCommand]) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO commands (command_id, node_id, tenant_id,"
                " fleet_command_id, tool, dispatched_at) VALUES (?, ?, ?, ?, ?, ?)",
                [dispatch_values(row.dispatch_row()) for row in rows],
            )
            db.executemany(
                "INSERT INTO routed_commands (command_id, node_id, tenant_id, holder, coordinator,"
                " tool, args_json, fleet_command_id, deadline, timeout_secs, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (command_id) DO NOTHING",
                [routed_values(row) for row in rows],
            )

    def take_routed(self, holder: str) -> list[RoutedCommand]:
        with self._tx() as db:
            rows = db.execute(
                "UPDATE routed_commands SET state = 'sent'"
                " WHERE holder = ? AND state = 'queued' RETURNING *",
                (holder,),
            ).fetchall()
        return sorted((routed_from(r) for r in rows), key=lambda r: r.created_at)

    def cancel_routed(self, command_id: str, reason: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE routed_commands SET cancel = ? WHERE command_id = ? AND cancel = ''"
                " AND state IN ('queued', 'sent')",
                (reason or "cancelled", command_id),
            )

    def take_cancels(self, holder: str) -> list[tuple[str, str]]:
        with self._tx() as db:
            rows = db.execute(
                "UPDATE routed_commands SET cancel_sent = 1 WHERE holder = ? AND state = 'sent'"
                " AND cancel <> '' AND cancel_sent = 0 RETURNING command_id, cancel",
                (holder,),
            ).fetchall()
        return [(r["command_id"], r["cancel"]) for r in rows]

    def finish_routed(self, command_id: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE routed_commands SET state = 'done' WHERE command_id = ?"
                " AND state IN ('queued', 'sent')",
                (command_id,),
            )

    def take_routed_results(self, coordinator: str) -> list[str]:
        with self._tx() as db:
            rows = db.execute(
                "UPDATE routed_commands SET state = 'collected'"
                " WHERE coordinator = ? AND state = 'done' RETURNING command_id",
                (coordinator,),
            ).fetchall()
        return [r["command_id"] for r in rows]

    def lease_runs(self, coordinator: str, ids: Sequence[str], expires_at: float) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT INTO run_leases (fleet_command_id, coordinator, expires_at)"
                " VALUES (?, ?, ?) ON CONFLICT (fleet_command_id) DO UPDATE"
                " SET expires_at = excluded.expires_at"
                " WHERE run_leases.coordinator = excluded.coordinator",
                [(i, coordinator, expires_at) for i in ids],
            )

    def load_run_leases(self) -> list[tuple[str, str, float]]:
        rows = self._db.execute("SELECT * FROM run_leases")
        return [(r["fleet_command_id"], r["coordinator"], r["expires_at"]) for r in rows]

    def claim_run(
        self, fleet_command_id: str, coordinator: str, expected: str, expires_at: float
    ) -> dict[str, str] | None:
        with self._tx() as db:
            won = db.execute(
                "INSERT INTO run_leases (fleet_command_id, coordinator, expires_at)"
                " VALUES (?, ?, ?) ON CONFLICT (fleet_command_id) DO UPDATE"
                " SET coordinator = excluded.coordinator, expires_at = excluded.expires_at"
                " WHERE run_leases.coordinator = ? RETURNING fleet_command_id",
                (fleet_command_id, coordinator, expires_at, expected),
            ).fetchone()
            if won is None:
                return None
            rows = db.execute(
                "UPDATE routed_commands SET coordinator = ? WHERE fleet_command_id = ?"
                " RETURNING command_id, holder",
                (coordinator, fleet_command_id),
            ).fetchall()
            return {r["command_id"]: r["holder"] for r in rows}

    def drop_run_lease(self, fleet_command_id: str, coordinator: str) -> None:
        with self._tx() as db:
            if db.execute(
                "DELETE FROM run_leases WHERE fleet_command_id = ? AND coordinator = ?",
                (fleet_command_id, coordinator),
            ).rowcount:
                db.execute(
                    "DELETE FROM run_cancels WHERE fleet_command_id = ?", (fleet_command_id,)
                )

    def route_output(self, rows: Sequence[RoutedOutput]) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO routed_output (command_id, seq, stdout, stderr)"
                " VALUES (?, ?, ?, ?)",
                [(r.command_id, r.seq, r.stdout, r.stderr) for r in rows],
            )
            for command_id in sorted({r.command_id for r in rows}):
                gone = db.execute(
                    "DELETE FROM routed_output WHERE command_id = ? AND seq IN"
                    " (SELECT seq FROM routed_output WHERE command_id = ?"
                    "  ORDER BY seq DESC LIMIT -1 OFFSET ?)"
                    " RETURNING length(stdout) + length(stderr) + dropped_before AS size",
                    (command_id, command_id, ROUTED_OUTPUT_ROWS),
                ).fetchall()
                if gone:
                    db.execute(
                        "UPDATE routed_output SET dropped_before = dropped_before + ?"
                        " WHERE command_id = ? AND seq ="
                        " (SELECT min(seq) FROM routed_output WHERE command_id = ?)",
                        (sum(int(g["size"]) for g in gone), command_id, command_id),
                    )

    def take_routed_output(self, coordinator: str) -> list[RoutedOutput]:
        with self._tx() as db:
            rows = db.execute(
                "DELETE FROM routed_output WHERE (SELECT coordinator FROM routed_commands AS r"
                " WHERE r.command_id = routed_output.command_id) = ? RETURNING *",
                (coordinator,),
            ).fetchall()
        return sorted((output_from(r) for r in rows), key=lambda o: (o.command_id, o.seq))

    def request_run_cancel(self, fleet_command_id: str, reason: str, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO run_cancels (fleet_command_id, reason, requested_at)"
                " VALUES (?, ?, ?) ON CONFLICT (fleet_command_id) DO UPDATE"
                " SET reason = excluded.reason, requested_at = excluded.requested_at,"
                " taken_by = '', answer = NULL",
                (fleet_command_id, reason, now),
            )

    def take_run_cancels(self, coordinator: str) -> list[tuple[str, str]]:
        with self._tx() as db:
            rows = db.execute(
                "UPDATE run_cancels SET taken_by = ? WHERE taken_by <> ? AND fleet_command_id IN"
                " (SELECT fleet_command_id FROM run_leases WHERE coordinator = ?)"
                " RETURNING fleet_command_id, reason",
                (coordinator, coordinator, coordinator),
            ).fetchall()
        return [(r["fleet_command_id"], r["reason"]) for r in rows]

    def answer_run_cancel(self, fleet_command_id: str, answer: bytes) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE run_cancels SET answer = ? WHERE fleet_command_id = ?",
                (answer, fleet_command_id),
            )

    def run_cancel_answer(self, fleet_command_id: str) -> bytes | None:
        row = self._db.execute(
            "SELECT answer FROM run_cancels WHERE fleet_command_id = ?", (fleet_command_id,)
        ).fetchone()
        return bytes(row["answer"]) if row is not None and row["answer"] is not None else None

    def listen(self, channels: Sequence[str]) -> None:
        return None  # one relay: nobody else changes the file

    def load_holders(self) -> list[Holder]:
        rows = self._db.execute("SELECT * FROM stream_holders WHERE relay_id <> ''")
        return [holder_from(r) for r in rows]

    # -- the change feed (``aegis_edge_core.cluster_feed``) and console sessions

    def node_feed(self, since: int | None) -> NodeFeed:
        """One read transaction for both tables (one relay writes this file: the feed is
        the PostgreSQL one's shape, for the same code above it)."""
        with self._tx() as db:
            if since is None:
                nodes = db.execute("SELECT * FROM nodes").fetchall()
                holders = db.execute("SELECT * FROM stream_holders WHERE relay_id <> ''").fetchall()
            else:
                nodes = db.execute("SELECT * FROM nodes WHERE change_seq > ?", (since,)).fetchall()
                holders = db.execute(
                    "SELECT * FROM stream_holders WHERE change_seq > ?", (since,)
                ).fetchall()
            head = int(db.execute("SELECT seq FROM change_feed").fetchone()["seq"])
        return feed_from(nodes, holders, head, full=since is None)

    def put_console_secret(self, secret_hash: str, secret: ConsoleSecret, now: float) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM console_sessions WHERE expires_at <= ?", (now,))
            db.execute(
                "INSERT INTO console_sessions (secret_hash, kind, sealed, expires_at, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (secret_hash, secret.kind, secret.sealed, secret.expires_at, now),
            )

    def get_console_secret(self, secret_hash: str, kind: str, now: float) -> ConsoleSecret | None:
        row = self._db.execute(
            "SELECT * FROM console_sessions WHERE secret_hash = ? AND kind = ? AND expires_at > ?",
            (secret_hash, kind, now),
        ).fetchone()
        return console_secret_from(row) if row is not None else None

    def take_console_secret(self, secret_hash: str, kind: str, now: float) -> ConsoleSecret | None:
        with self._tx() as db:
            row = db.execute(
                "DELETE FROM console_sessions WHERE secret_hash = ? AND kind = ? RETURNING *",
                (secret_hash, kind),
            ).fetchone()
        if row is None or row["expires_at"] <= now:
            return None
        return console_secret_from(row)


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
