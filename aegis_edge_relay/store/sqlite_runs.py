"""The SQLite store's history: commands, fleet runs and saved groups."""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Sequence

from aegis_edge_relay.store.base import CommandRow, FleetRunRow, GroupExists, GroupRow
from aegis_edge_relay.store.rows import (
    command_from,
    dispatch_values,
    end_values,
    group_from,
    group_values,
    run_from,
    run_values,
)
from aegis_edge_relay.store.sqlite_base import SQLiteBase


class SQLiteRuns(SQLiteBase):
    """Command and fleet-run history, saved groups."""

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
