"""The SQLite store's cluster queries (a cluster of one relay: the same shape as the
PostgreSQL store's, for the same code above it): leases, stream holders, routed commands
and output, run leases and cancels, and the change feed.
"""

from __future__ import annotations

from collections.abc import Sequence

from aegis_edge_core.cluster import Holder, RelayLease
from aegis_edge_relay.store.base import ROUTED_OUTPUT_ROWS, NodeFeed, RoutedCommand, RoutedOutput
from aegis_edge_relay.store.rows import (
    dispatch_values,
    feed_from,
    holder_from,
    lease_from,
    output_from,
    routed_from,
    routed_values,
)
from aegis_edge_relay.store.sqlite_base import SQLiteBase


class SQLiteCluster(SQLiteBase):
    """Leases, holders, routing and the change feed, for one relay."""

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
        return self.hold_streams([(node_id, relay_id, status, now)])[0]

    def hold_streams(self, rows: Sequence[tuple[str, str, str, float]]) -> list[int]:
        with self._tx() as db:
            return [
                int(
                    db.execute(
                        "INSERT INTO stream_holders (node_id, relay_id, generation, status, since)"
                        " VALUES (?, ?, 1, ?, ?) ON CONFLICT (node_id) DO UPDATE"
                        " SET relay_id = excluded.relay_id, status = excluded.status,"
                        " since = excluded.since, generation = stream_holders.generation + 1"
                        " RETURNING generation",
                        row,
                    ).fetchone()["generation"]
                )
                for row in rows
            ]

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
