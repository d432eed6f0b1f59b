"""The PostgreSQL store's cluster queries: relay leases, stream holders, commands and
output routed between relays, run leases and cancels, and the change feed.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg
import psycopg.errors

from aegis_edge_core.cluster import Holder, RelayLease
from aegis_edge_relay.store.base import (
    ROUTED_OUTPUT_ROWS,
    RUN_CANCELS,
    NodeFeed,
    RoutedCommand,
    RoutedOutput,
    cancel_answered,
    relay_channel,
)
from aegis_edge_relay.store.postgres_base import Cursor, PostgresBase
from aegis_edge_relay.store.rows import (
    dispatch_values,
    feed_from,
    holder_from,
    lease_from,
    output_from,
    routed_from,
    routed_values,
)


class PostgresCluster(PostgresBase):
    """What several relays on one database share."""

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
        return self.hold_streams([(node_id, relay_id, status, now)])[0]

    def hold_streams(self, rows: Sequence[tuple[str, str, str, float]]) -> list[int]:
        def tx(cur: Cursor) -> list[int]:
            out = []
            # one statement per row, in order, so a node twice in the batch gets two
            # generations (the later stream's is the higher), as two calls would
            for node_id, relay_id, status, now in rows:
                row = cur.execute(
                    "INSERT INTO stream_holders (node_id, relay_id, generation, status, since)"
                    " VALUES (%s, %s, 1, %s, %s) ON CONFLICT (node_id) DO UPDATE"
                    " SET relay_id = EXCLUDED.relay_id, status = EXCLUDED.status,"
                    " since = EXCLUDED.since, generation = stream_holders.generation + 1"
                    " RETURNING generation",
                    (node_id, relay_id, status, now),
                ).fetchone()
                assert row is not None
                out.append(int(row["generation"]))
            return out

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
