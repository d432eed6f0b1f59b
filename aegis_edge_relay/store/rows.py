"""Rows as both stores read and write them: one mapping between a database row (any
``row[column]`` object: ``sqlite3.Row``, psycopg's dict rows) and the records in ``base``,
so the two stores cannot drift apart in how a column is encoded."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final, Protocol

from aegis_edge_core.cluster import Holder, RelayLease
from aegis_edge_core.health import DaemonStatus
from aegis_edge_relay.store.base import (
    CommandRow,
    ConsoleSecret,
    FleetRunRow,
    GroupRow,
    NodeFeed,
    NodeRecord,
    RoutedCommand,
    RoutedOutput,
)

TAIL_CAP: Final = 64 * 1024


class Row(Protocol):
    def __getitem__(self, key: str, /) -> Any: ...


def node_from(row: Row) -> NodeRecord:
    return NodeRecord(
        node_id=row["node_id"],
        tenant_id=row["tenant_id"],
        public_key=bytes(row["public_key"]),
        key_thumbprint=row["key_thumbprint"],
        enrolled_at=row["enrolled_at"],
        revoked=row["status"] == "revoked",
        revoked_reason=row["revoked_reason"],
        revoked_at=row["revoked_at"] or 0.0,
        last_heartbeat_at=row["last_heartbeat_at"],
        capabilities=json.loads(row["capabilities"]),
        tags=tuple(json.loads(row["tags"])),
        token_jti=row["token_jti"],
        token_expires_at=row["token_expires_at"],
    )


def command_from(row: Row) -> CommandRow:
    return CommandRow(
        command_id=row["command_id"],
        node_id=row["node_id"],
        tenant_id=row["tenant_id"],
        fleet_command_id=row["fleet_command_id"],
        tool=row["tool"],
        dispatched_at=row["dispatched_at"],
        finished_at=row["finished_at"],
        outcome=row["outcome"],
        exit_code=row["exit_code"],
        error=row["error"],
        stdout_tail=bytes(row["stdout_tail"]),
        stderr_tail=bytes(row["stderr_tail"]),
        result_json=row["result_json"],
    )


def group_from(row: Row) -> GroupRow:
    return GroupRow(
        tenant_id=row["tenant_id"],
        name=row["name"],
        selector=row["selector"],
        pinned=tuple(json.loads(row["pinned"])),
        created_at=row["created_at"],
        created_by=row["created_by"],
    )


def run_from(row: Row) -> FleetRunRow:
    scope = json.loads(row["scope"]) if row["scope"] is not None else None
    return FleetRunRow(
        fleet_command_id=row["fleet_command_id"],
        tenant_id=row["tenant_id"],
        scope=tuple(scope) if scope is not None else None,
        spec=json.loads(row["spec"]),
        outcome=row["outcome"],
        created_at=row["created_at"],
        finished_at=row["finished_at"],
        created_by=row["created_by"],
        record=json.loads(row["record"]),
        trace_id=row["trace_id"],
        args_json=row["args_json"],
        secret_keys=tuple(json.loads(row["secret_keys"])),
        rerun_of=row["rerun_of"],
    )


def holder_from(row: Row) -> Holder:
    return Holder(
        node_id=row["node_id"],
        relay_id=row["relay_id"],
        generation=int(row["generation"]),
        status=DaemonStatus(row["status"]),
        since=row["since"],
    )


def lease_from(row: Row) -> RelayLease:
    return RelayLease(
        relay_id=row["relay_id"], endpoint=row["endpoint"], expires_at=row["expires_at"]
    )


def routed_from(row: Row) -> RoutedCommand:
    return RoutedCommand(
        command_id=row["command_id"],
        node_id=row["node_id"],
        tenant_id=row["tenant_id"],
        holder=row["holder"],
        coordinator=row["coordinator"],
        tool=row["tool"],
        args_json=row["args_json"],
        fleet_command_id=row["fleet_command_id"],
        deadline=row["deadline"],
        timeout_secs=row["timeout_secs"],
        created_at=row["created_at"],
        cancel=row["cancel"],
    )


def output_from(row: Row) -> RoutedOutput:
    return RoutedOutput(
        command_id=row["command_id"],
        seq=row["seq"],
        stdout=bytes(row["stdout"]),
        stderr=bytes(row["stderr"]),
        dropped_before=row["dropped_before"],
    )


def routed_values(row: RoutedCommand) -> tuple[Any, ...]:
    """``routed_commands`` (command_id, node_id, tenant_id, holder, coordinator, tool,
    args_json, fleet_command_id, deadline, timeout_secs, created_at)."""
    return (
        row.command_id,
        row.node_id,
        row.tenant_id,
        row.holder,
        row.coordinator,
        row.tool,
        row.args_json,
        row.fleet_command_id,
        row.deadline,
        row.timeout_secs,
        row.created_at,
    )


def node_values(node: NodeRecord) -> tuple[Any, ...]:
    """``nodes`` (node_id, tenant_id, public_key, key_thumbprint, enrolled_at, capabilities,
    tags, token_jti, token_expires_at), as an enrollment inserts them."""
    return (
        node.node_id,
        node.tenant_id,
        node.public_key,
        node.key_thumbprint,
        node.enrolled_at,
        json.dumps(dict(node.capabilities), sort_keys=True),
        json.dumps(list(node.tags)),
        node.token_jti,
        node.token_expires_at,
    )


def dispatch_values(row: CommandRow) -> tuple[Any, ...]:
    """``commands`` (command_id, node_id, tenant_id, fleet_command_id, tool, dispatched_at)."""
    return (
        row.command_id,
        row.node_id,
        row.tenant_id,
        row.fleet_command_id,
        row.tool,
        row.dispatched_at,
    )


def end_values(row: CommandRow) -> tuple[Any, ...]:
    """``commands`` (finished_at, outcome, exit_code, error, stdout_tail, stderr_tail,
    result_json), the tails capped."""
    return (
        row.finished_at,
        row.outcome,
        row.exit_code,
        row.error,
        row.stdout_tail[-TAIL_CAP:],
        row.stderr_tail[-TAIL_CAP:],
        row.result_json,
    )


def run_values(row: FleetRunRow) -> tuple[Any, ...]:
    """``fleet_runs`` (fleet_command_id, tenant_id, scope, spec, outcome, created_at,
    finished_at, created_by, record, trace_id, args_json, secret_keys, rerun_of)."""
    return (
        row.fleet_command_id,
        row.tenant_id,
        json.dumps(sorted(row.scope)) if row.scope is not None else None,
        json.dumps(dict(row.spec), sort_keys=True),
        row.outcome,
        row.created_at,
        row.finished_at,
        row.created_by,
        json.dumps(dict(row.record), sort_keys=True),
        row.trace_id,
        row.args_json,
        json.dumps(sorted(row.secret_keys)),
        row.rerun_of,
    )


def group_values(row: GroupRow) -> tuple[Any, ...]:
    """``groups`` (tenant_id, name, selector, pinned, created_at, created_by)."""
    return (
        row.tenant_id,
        row.name,
        row.selector,
        json.dumps(sorted(set(row.pinned))),
        row.created_at,
        row.created_by,
    )


def capabilities_json(capabilities: Any) -> str:
    return json.dumps(dict(capabilities), sort_keys=True)


def tags_json(tags: Any) -> str:
    return json.dumps(sorted(set(tags)))


def feed_from(
    node_rows: Sequence[Row], holder_rows: Sequence[Row], head: int, *, full: bool
) -> NodeFeed:
    """A change-feed read from its ``nodes`` and ``stream_holders`` rows (with
    ``change_seq``)."""
    return NodeFeed(
        nodes=tuple(node_from(r) for r in node_rows),
        holders=tuple(holder_from(r) for r in holder_rows),
        seqs=tuple(int(r["change_seq"]) for r in (*node_rows, *holder_rows)),
        head=head,
        full=full,
    )


def console_secret_from(row: Row) -> ConsoleSecret:
    return ConsoleSecret(
        kind=row["kind"], sealed=bytes(row["sealed"]), expires_at=row["expires_at"]
    )
