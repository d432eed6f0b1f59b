"""A fleet run as the relay holds it: the core planner plus watchers, ids and records.

:class:`ActiveRun` wraps the core's :class:`~aegis_edge_core.fleet.FleetRun` with what the
relay needs around it (who started it, the tenants it spans, the command id of each target,
live-output gates and the watchers of its event stream) and knows its two persisted forms:
the store row (:meth:`ActiveRun.to_row`) and the Admin message (:meth:`ActiveRun.to_proto`).
The functions below read those forms back (:func:`row_to_proto`, :func:`record_of`) and
finish a run a crashed relay left ``running`` (:func:`recovered_run`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any, Final

import attrs

from aegis_edge_core.fleet import FleetRun, RunRecord, TargetOutcome
from aegis_edge_core.fleet.output import Delivery, OutputGate, WatcherBuffer
from aegis_edge_core.fleet.recovery import StoredCommand, recover_run
from aegis_edge_core.fleet.wire_values import (
    PROTO_OUTCOME,
    PROTO_RUN_OUTCOME,
    stored_outcome_proto,
)
from aegis_edge_core.wire import admin_pb2
from aegis_edge_relay.dispatcher import CommandEnd
from aegis_edge_relay.store import CommandRow, FleetRunRow

__all__ = [
    "DETAIL_LIMIT",
    "ActiveRun",
    "Watcher",
    "command_record",
    "end_of",
    "record_of",
    "recovered_run",
    "row_to_proto",
    "run_to_proto",
    "spec_from_dict",
    "stored_command",
]

DETAIL_LIMIT: Final = 256
"""Runs with more targets than this are *large*: their admin event stream carries no
per-target ``dispatched`` events (only ``started``, one ``target_finished`` per target and
``finished``), and their per-command log lines are at debug level (the run's
``fleet.run_started``/``fleet.run_finished`` lines stay at info). At 10k targets each event
and each log line is a measurable share of the relay's one event loop."""


Event = admin_pb2.FleetRunEvent


@attrs.define(kw_only=True, eq=False)
class Watcher:
    """One open event stream of a run: the core's bounded buffer plus a wake-up.

    Control events always arrive; live output (only if ``output``) is dropped for this
    watcher alone once it falls :data:`~aegis_edge_core.fleet.output.DEFAULT_WATCHER_BYTES`
    behind, and the drop is reported in the next output event of that target.
    """

    run: ActiveRun
    output: bool = False
    per_target: bool = True
    """False for a summary-only stream: it counts ``target_finished`` events and reads
    nothing in them, so the run need not build them for it."""
    buffer: WatcherBuffer[Event | None] = attrs.field(factory=WatcherBuffer)
    wake: asyncio.Event = attrs.field(factory=asyncio.Event)

    async def next(self) -> Event | None:
        """The next event; ``None`` once the run's last event was taken."""
        while True:
            delivery = self.buffer.pop()
            if delivery is not None:
                return self.run.event_of(delivery)
            self.wake.clear()
            await self.wake.wait()

    def ready(self) -> list[Event | None]:
        """Every event already queued, without waiting (``None`` last if the run ended)."""
        out: list[Event | None] = []
        while (delivery := self.buffer.pop()) is not None:
            event = self.run.event_of(delivery)
            out.append(event)
            if event is None:
                break
        return out

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.run.watchers.remove(self)


@attrs.define(kw_only=True, eq=False)
class ActiveRun:
    """A fleet run in progress: the planner plus what the relay needs around it."""

    run: FleetRun
    spec: admin_pb2.FleetRunSpec
    args_json: str
    """What the daemons get: plain and secret arguments. Memory only, never stored."""
    created_by: str
    created_at: float
    scope: tuple[str, ...] | None
    tenants: dict[str, str]
    stored_args_json: str = "{}"
    """The plain arguments: stored, shown, reused by a rerun."""
    secret_keys: tuple[str, ...] = ()
    rerun_of: str = ""
    command_ids: dict[str, str] = attrs.field(factory=dict)
    ends: dict[str, CommandEnd] = attrs.field(factory=dict)
    watchers: list[Watcher] = attrs.field(factory=list)
    gate: OutputGate | None = None
    hosts: dict[str, str] = attrs.field(factory=dict)
    done: asyncio.Event = attrs.field(factory=asyncio.Event)
    span: Any = None
    trace_id: str = ""
    started_at: float = 0.0
    dispatched_at: dict[str, float] = attrs.field(factory=dict)
    large: bool = False
    """More than :data:`DETAIL_LIMIT` targets: no ``dispatched`` events, debug command logs."""
    detached: bool = False
    """Handed over to another relay (this one stops): results here no longer drive it."""

    @property
    def fleet_command_id(self) -> str:
        return self.run.fleet_command_id

    def publish(self, event: Event | None, node_id: str | None = None) -> None:
        """Queue a control event (``None`` ends the stream) for every watcher; ``node_id``
        when it ends that target's output."""
        for watcher in self.watchers:
            watcher.buffer.push_control(event, node_id=node_id)
            watcher.wake.set()

    def subscribe(self, *, output: bool = False, per_target: bool = True) -> Watcher:
        watcher = Watcher(run=self, output=output, per_target=per_target)
        self.watchers.append(watcher)
        return watcher

    @property
    def wants_targets(self) -> bool:
        """Whether a watcher reads the target in a ``target_finished`` event."""
        return any(w.per_target for w in self.watchers)

    def publish_output(
        self,
        node_id: str,
        *,
        command_id: str,
        host: str,
        stdout: bytes,
        stderr: bytes,
        now: float,
        lost_before: int = 0,
    ) -> None:
        """A chunk of live output: through the run's gate, then to each output watcher.
        ``lost_before``: bytes of it lost on the way here (see ``OutputGate.admit``)."""
        watchers = [w for w in self.watchers if w.output]
        if not watchers:
            return  # nobody follows: nothing is kept, nothing is counted
        if self.gate is None:
            self.gate = OutputGate(now=now)
        admitted = self.gate.admit(
            node_id, now, stdout=stdout, stderr=stderr, lost_before=lost_before
        )
        if admitted is None:
            return
        self.hosts[node_id] = host
        event = Event(
            output=admin_pb2.TargetOutput(
                node_id=node_id,
                command_id=command_id,
                host=host,
                stdout=admitted.stdout,
                stderr=admitted.stderr,
            )
        )
        size = len(admitted.stdout) + len(admitted.stderr)
        for watcher in watchers:
            watcher.buffer.push_output(
                node_id, event, size=size, dropped_before=admitted.dropped_before
            )
            watcher.wake.set()

    def end_output(self, node_id: str) -> None:
        """The target ended: drops the gate has not reported yet go to the watchers, who
        show them as a marker before the target's ``target_finished``."""
        if self.gate is None:
            return
        dropped = self.gate.finish(node_id)
        for watcher in self.watchers:
            if watcher.output:
                watcher.buffer.note_dropped(node_id, dropped)

    def event_of(self, delivery: Delivery[Event | None]) -> Event | None:
        if not delivery.output:
            return delivery.item
        node_id = delivery.node_id or ""
        if delivery.item is None:  # a marker: only the count of what was lost
            return Event(
                output=admin_pb2.TargetOutput(
                    node_id=node_id,
                    command_id=self.command_ids.get(node_id, ""),
                    host=self.hosts.get(node_id, node_id),
                    dropped_bytes=delivery.dropped_before,
                )
            )
        if not delivery.dropped_before:
            return delivery.item
        event = Event()
        event.CopyFrom(delivery.item)  # shared by every watcher; the count is this one's
        event.output.dropped_bytes = delivery.dropped_before
        return event

    def progress(self) -> admin_pb2.FleetRunProgress:
        """Where the run stands, for a watcher that asked for no per-target events."""
        out = admin_pb2.FleetRunProgress(
            fleet_command_id=self.fleet_command_id,
            targets=len(self.run.resolution.targets),
            dispatched=len(self.dispatched_at),
            finished=len(self.ends),
        )
        for end in self.ends.values():
            out.counts[end.outcome.value] += 1
        return out

    def to_proto(self, *, with_targets: bool = True) -> admin_pb2.FleetRun:
        out = run_to_proto(
            self.run.record(),
            spec=self.spec,
            created_by=self.created_by,
            created_at=self.created_at,
            trace_id=self.trace_id,
            command_ids=self.command_ids,
            tenants=self.tenants,
            ends=self.ends,
            with_targets=with_targets,
        )
        out.spec.args_json = self.stored_args_json
        out.spec.secret_keys[:] = sorted(self.secret_keys)
        out.rerun_of = self.rerun_of
        return out

    def to_row(self) -> FleetRunRow:
        record = self.run.record()
        data = record.to_dict()
        data["relay"] = {
            "command_ids": self.command_ids,
            "tenants": self.tenants,
            "spec": _spec_dict(self.spec),
        }
        return FleetRunRow(
            fleet_command_id=self.fleet_command_id,
            tenant_id=self.spec.tenant_id,
            scope=self.scope,
            spec=_spec_dict(self.spec),
            outcome=record.outcome.value if record.outcome is not None else "running",
            created_at=self.created_at,
            finished_at=record.finished_at,
            created_by=self.created_by,
            record=data,
            trace_id=self.trace_id,
            args_json=self.stored_args_json,
            secret_keys=self.secret_keys,
            rerun_of=self.rerun_of,
        )


def _spec_dict(spec: admin_pb2.FleetRunSpec) -> dict[str, Any]:
    # Arguments are a column of their own (plain ones only); secret values are never stored.
    return {
        "selector": spec.selector,
        "tool": spec.tool,
        "mode": spec.mode,
        "on_error": spec.on_error,
        "deadline_secs": spec.deadline_secs,
        "canary": spec.canary,
        "tenant_id": spec.tenant_id,
    }


def spec_from_dict(data: dict[str, Any]) -> admin_pb2.FleetRunSpec:
    return admin_pb2.FleetRunSpec(
        selector=str(data.get("selector", "")),
        tool=str(data.get("tool", "")),
        mode=str(data.get("mode", "")),
        on_error=str(data.get("on_error", "")),
        deadline_secs=float(data.get("deadline_secs") or 0.0),
        canary=int(data.get("canary") or 0),
        tenant_id=str(data.get("tenant_id", "")),
    )


def run_to_proto(
    record: RunRecord,
    *,
    spec: admin_pb2.FleetRunSpec,
    created_by: str,
    created_at: float,
    trace_id: str,
    command_ids: dict[str, str],
    tenants: dict[str, str],
    ends: dict[str, CommandEnd] | None = None,
    with_targets: bool = True,
) -> admin_pb2.FleetRun:
    out = admin_pb2.FleetRun(
        fleet_command_id=record.fleet_command_id,
        spec=spec,
        outcome=PROTO_RUN_OUTCOME[record.outcome.value if record.outcome else "running"],
        created_at=created_at,
        finished_at=record.finished_at or 0.0,
        created_by=created_by,
        trace_id=trace_id,
        halt_reason=record.halt_reason or "",
    )
    for skip in record.skipped:
        out.skipped.add(node_id=skip.node_id, reason=skip.reason.value)
    for target in record.targets:
        if target.skip_reason is not None:
            out.skipped.add(node_id=target.node_id, reason=target.skip_reason.value)
    for outcome, count in record.counts().items():
        if count:
            out.counts[outcome.value] = count
    out.targets_omitted = not with_targets
    if with_targets:
        for target in record.targets:
            tr = out.targets.add(
                node_id=target.node_id,
                command_id=command_ids.get(target.node_id, ""),
                outcome=PROTO_OUTCOME[target.outcome] if target.outcome else 0,
                exit_code=target.exit_code or 0,
                has_exit_code=target.exit_code is not None,
                error_message=target.error_message or "",
                dispatched_at=target.dispatched_at or 0.0,
                finished_at=target.finished_at or 0.0,
                skip_reason=target.skip_reason.value if target.skip_reason else "",
                tenant_id=tenants.get(target.node_id, ""),
                ended_by=target.ended_by.value if target.ended_by else "",
            )
            end = (ends or {}).get(target.node_id)
            if end is not None:
                tr.stdout_tail = end.stdout_tail
                tr.stderr_tail = end.stderr_tail
                tr.result_json = end.result_json
    return out


def stored_command(c: CommandRow) -> StoredCommand:
    """A command row as the core's recovery rules read it."""
    return StoredCommand(
        node_id=c.node_id,
        command_id=c.command_id,
        dispatched_at=c.dispatched_at,
        outcome=c.outcome or None,
        exit_code=c.exit_code,
        error_message=c.error or None,
        finished_at=c.finished_at,
    )


def end_of(c: CommandRow) -> CommandEnd:
    """A finished command row as the end a run's target reports (tails included)."""
    return CommandEnd(
        command_id=c.command_id,
        node_id=c.node_id,
        tenant_id=c.tenant_id,
        tool=c.tool,
        fleet_command_id=c.fleet_command_id,
        outcome=TargetOutcome(c.outcome),
        exit_code=c.exit_code,
        error_message=c.error,
        dispatched_at=c.dispatched_at,
        finished_at=c.finished_at or c.dispatched_at,
        stdout_tail=c.stdout_tail,
        stderr_tail=c.stderr_tail,
        result_json=c.result_json,
    )


def recovered_run(row: FleetRunRow, commands: Iterable[CommandRow], now: float) -> FleetRunRow:
    """The finished form of a run a crashed relay left ``running`` (see
    :meth:`.runs.FleetRuns.recover` and :mod:`aegis_edge_core.fleet.recovery` for the rules)."""
    record, extra = _split(row)
    done, first = recover_run(
        record, (stored_command(c) for c in commands), now=now, created_at=row.created_at
    )
    out = done.to_dict()
    command_ids = {**dict(extra.get("command_ids", {})), **first}
    out["relay"] = {**extra, "command_ids": command_ids}
    assert done.outcome is not None
    return attrs.evolve(row, outcome=done.outcome.value, finished_at=now, record=out)


def _split(row: FleetRunRow) -> tuple[RunRecord, dict[str, Any]]:
    """A stored record: the core's part, and the relay's own keys (ids, tenants, spec)."""
    data = dict(row.record)
    extra = dict(data.pop("relay", {}) or {})
    return RunRecord.from_dict(data), extra


def record_of(row: FleetRunRow) -> RunRecord:
    """The core's record of a stored run."""
    return _split(row)[0]


def row_to_proto(row: FleetRunRow) -> admin_pb2.FleetRun:
    record, extra = _split(row)
    out = run_to_proto(
        record,
        spec=spec_from_dict(dict(row.spec)),
        created_by=row.created_by,
        created_at=row.created_at,
        trace_id=row.trace_id,
        command_ids=dict(extra.get("command_ids", {})),
        tenants=dict(extra.get("tenants", {})),
    )
    out.spec.args_json = row.args_json or ""
    out.spec.secret_keys[:] = sorted(row.secret_keys)
    out.rerun_of = row.rerun_of
    return out


def command_record(row: CommandRow) -> admin_pb2.CommandRecord:
    """One command history row as the Admin API shows it."""
    return admin_pb2.CommandRecord(
        command_id=row.command_id,
        fleet_command_id=row.fleet_command_id,
        tool=row.tool,
        outcome=stored_outcome_proto(row.outcome),
        exit_code=row.exit_code or 0,
        has_exit_code=row.exit_code is not None,
        dispatched_at=row.dispatched_at,
        finished_at=row.finished_at or 0.0,
        error_message=row.error,
        result_json=row.result_json,
        stdout_tail=row.stdout_tail,
        stderr_tail=row.stderr_tail,
    )
