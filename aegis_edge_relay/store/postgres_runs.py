"""The PostgreSQL store's history: commands, fleet runs and saved groups."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import psycopg
import psycopg.errors

from aegis_edge_relay.store.base import CommandRow, FleetRunRow, GroupExists, GroupRow
from aegis_edge_relay.store.postgres_base import Cursor, PostgresBase
from aegis_edge_relay.store.rows import (
    command_from,
    dispatch_values,
    end_values,
    group_from,
    group_values,
    run_from,
    run_values,
)


class PostgresRuns(PostgresBase):
    """Command and fleet-run history, saved groups."""

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
