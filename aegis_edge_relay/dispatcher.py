"""The dispatcher: commands out to live streams, results back, fleet runs on top.

Single commands and fleet runs take the same path: :meth:`Dispatcher.send` records the
dispatch in command history, hands the invocation to the node's :class:`RelaySession` and
remembers who is waiting. Results (:meth:`Dispatcher.on_result`, called by the stream
reader *before* it acks), lost streams (:meth:`Dispatcher.connection_lost`, with the ids
:meth:`RelaySession.connection_lost` returned) and late results all end up in
:meth:`_finish`, which persists, counts and tells the waiter.

A fleet run is the core's :class:`~aegis_edge_core.fleet.FleetRun` planner driven by this
module: ``start``/``on_result``/``on_tick``/``cancel`` go in, ``Dispatch``/``Cancel``/``Finish``
actions come out and are carried out here. The planner decides; the dispatcher does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

import attrs

from aegis_edge_core.fleet import (
    Cancel,
    Dispatch,
    Finish,
    FleetRun,
    FleetSpec,
    Resolution,
    RunRecord,
    TargetOutcome,
)
from aegis_edge_core.fleet.output import Delivery, OutputGate, WatcherBuffer, host_label
from aegis_edge_core.fleet.recovery import StoredCommand, recover_run
from aegis_edge_core.session import OutputReceived
from aegis_edge_core.wire import admin_pb2, common_pb2, stream_pb2
from aegis_edge_relay import jsonlog, tracing
from aegis_edge_relay.store import CommandRow, FleetRunRow

if TYPE_CHECKING:
    from aegis_edge_relay.relay import Relay

__all__ = ["ActiveRun", "CommandEnd", "Dispatcher", "NotConnected", "Watcher", "run_to_proto"]

_TAIL: Final = 64 * 1024

RESULT_CAP: Final = 64 * 1024
"""The largest tool result (``result_json``) kept in history and run records; a larger one
is replaced by a note saying how large it was (a cut JSON document is no document)."""

DETAIL_LIMIT: Final = 256
"""Runs with more targets than this are *large*: their admin event stream carries no
per-target ``dispatched`` events (only ``started``, one ``target_finished`` per target and
``finished``), and their per-command log lines are at debug level (the run's
``fleet.run_started``/``fleet.run_finished`` lines stay at info). At 10k targets each event
and each log line is a measurable share of the relay's one event loop."""

_OUTCOME_BY_PROTO: Final = {
    common_pb2.TARGET_OUTCOME_OK: TargetOutcome.OK,
    common_pb2.TARGET_OUTCOME_ERROR: TargetOutcome.ERROR,
    common_pb2.TARGET_OUTCOME_TIMEOUT: TargetOutcome.TIMEOUT,
    common_pb2.TARGET_OUTCOME_CANCELLED: TargetOutcome.CANCELLED,
    common_pb2.TARGET_OUTCOME_DENIED: TargetOutcome.DENIED,
    common_pb2.TARGET_OUTCOME_EDGE_DISCONNECTED: TargetOutcome.EDGE_DISCONNECTED,
}
_OUTCOME_BY_KIND: Final = {
    stream_pb2.ERROR_KIND_OK: TargetOutcome.OK,
    stream_pb2.ERROR_KIND_TIMEOUT: TargetOutcome.TIMEOUT,
    stream_pb2.ERROR_KIND_CANCELLED: TargetOutcome.CANCELLED,
    stream_pb2.ERROR_KIND_DENIED: TargetOutcome.DENIED,
}
PROTO_OUTCOME: Final = {
    TargetOutcome.OK: common_pb2.TARGET_OUTCOME_OK,
    TargetOutcome.ERROR: common_pb2.TARGET_OUTCOME_ERROR,
    TargetOutcome.TIMEOUT: common_pb2.TARGET_OUTCOME_TIMEOUT,
    TargetOutcome.CANCELLED: common_pb2.TARGET_OUTCOME_CANCELLED,
    TargetOutcome.DENIED: common_pb2.TARGET_OUTCOME_DENIED,
    TargetOutcome.EDGE_DISCONNECTED: common_pb2.TARGET_OUTCOME_EDGE_DISCONNECTED,
    TargetOutcome.NOT_STARTED: common_pb2.TARGET_OUTCOME_NOT_STARTED,
}
PROTO_RUN_OUTCOME: Final = {
    "running": common_pb2.RUN_OUTCOME_RUNNING,
    "completed": common_pb2.RUN_OUTCOME_COMPLETED,
    "completed_with_errors": common_pb2.RUN_OUTCOME_COMPLETED_WITH_ERRORS,
    "halted": common_pb2.RUN_OUTCOME_HALTED,
    "deadline_exceeded": common_pb2.RUN_OUTCOME_DEADLINE_EXCEEDED,
    "cancelled": common_pb2.RUN_OUTCOME_CANCELLED,
}


def capped_result(result_json: str) -> str:
    """The tool's result as kept: as reported, or a note when over :data:`RESULT_CAP`."""
    size = len(result_json.encode("utf-8", "replace"))
    if size <= RESULT_CAP:
        return result_json
    return json.dumps({"result_too_large": {"bytes": size, "limit": RESULT_CAP}})


def outcome_of(result: stream_pb2.CommandResult) -> TargetOutcome:
    """The target outcome a daemon's result stands for (its ``error_kind`` if unset)."""
    outcome = _OUTCOME_BY_PROTO.get(result.outcome)
    if outcome is not None:
        return outcome
    return _OUTCOME_BY_KIND.get(result.error_kind, TargetOutcome.ERROR)


class NotConnected(Exception):
    """The node has no live daemon stream to dispatch on."""


@attrs.frozen(kw_only=True)
class CommandEnd:
    command_id: str
    node_id: str
    tenant_id: str
    tool: str
    fleet_command_id: str
    outcome: TargetOutcome
    exit_code: int | None
    error_message: str
    dispatched_at: float
    finished_at: float
    stdout_tail: bytes = b""
    stderr_tail: bytes = b""
    result_json: str = ""


Listener = Callable[[CommandEnd], Awaitable[None]]


@attrs.define(kw_only=True)
class PendingCommand:
    command_id: str
    node_id: str
    tenant_id: str
    tool: str
    fleet_command_id: str
    dispatched_at: float
    listener: Listener | None = None
    span: Any = None
    log_level: str = "info"
    stdout: bytearray = attrs.field(factory=bytearray)
    stderr: bytearray = attrs.field(factory=bytearray)


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

    @property
    def fleet_command_id(self) -> str:
        return self.run.fleet_command_id

    def publish(self, event: Event | None, node_id: str | None = None) -> None:
        """Queue a control event (``None`` ends the stream) for every watcher; ``node_id``
        when it ends that target's output."""
        for watcher in self.watchers:
            watcher.buffer.push_control(event, node_id=node_id)
            watcher.wake.set()

    def subscribe(self, *, output: bool = False) -> Watcher:
        watcher = Watcher(run=self, output=output)
        self.watchers.append(watcher)
        return watcher

    def publish_output(
        self,
        node_id: str,
        *,
        command_id: str,
        host: str,
        stdout: bytes,
        stderr: bytes,
        now: float,
    ) -> None:
        """A chunk of live output: through the run's gate, then to each output watcher."""
        watchers = [w for w in self.watchers if w.output]
        if not watchers:
            return  # nobody follows: nothing is kept, nothing is counted
        if self.gate is None:
            self.gate = OutputGate(now=now)
        admitted = self.gate.admit(node_id, now, stdout=stdout, stderr=stderr)
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

    def to_proto(self) -> admin_pb2.FleetRun:
        out = run_to_proto(
            self.run.record(),
            spec=self.spec,
            created_by=self.created_by,
            created_at=self.created_at,
            trace_id=self.trace_id,
            command_ids=self.command_ids,
            tenants=self.tenants,
            ends=self.ends,
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


def recovered_run(row: FleetRunRow, commands: Iterable[CommandRow], now: float) -> FleetRunRow:
    """The finished form of a run a crashed relay left ``running`` (see
    :meth:`Dispatcher.recover` and :mod:`aegis_edge_core.fleet.recovery` for the rules)."""
    data = dict(row.record)
    extra = dict(data.pop("relay", {}) or {})
    done, first = recover_run(
        RunRecord.from_dict(data),
        (
            StoredCommand(
                node_id=c.node_id,
                command_id=c.command_id,
                dispatched_at=c.dispatched_at,
                outcome=c.outcome or None,
                exit_code=c.exit_code,
                error_message=c.error or None,
                finished_at=c.finished_at,
            )
            for c in commands
        ),
        now=now,
        created_at=row.created_at,
    )
    out = done.to_dict()
    command_ids = {**dict(extra.get("command_ids", {})), **first}
    out["relay"] = {**extra, "command_ids": command_ids}
    assert done.outcome is not None
    return attrs.evolve(row, outcome=done.outcome.value, finished_at=now, record=out)


R = TypeVar("R")
W = TypeVar("W")


class GroupCommit(Generic[R, W]):
    """Rows that arrive while a batch is being written go together into the next one: one
    store transaction (and one hop to the store thread) per batch, not per row. Each caller
    still awaits *its* row being committed, so "persist, then send/ack" holds."""

    def __init__(self, relay: Relay, write_many: Callable[[list[R]], list[W] | None]) -> None:
        self._relay = relay
        self._write_many = write_many
        self._queue: list[tuple[R, asyncio.Future[W | None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, row: R) -> W | None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[W | None] = loop.create_future()
        self._queue.append((row, fut))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                out = await self._relay.db.persist(self._write_many, [row for row, _ in batch])
            except Exception as err:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            for i, (_, fut) in enumerate(batch):
                if not fut.done():
                    fut.set_result(out[i] if out is not None else None)


class Dispatcher:
    """Commands and fleet runs over the relay's live streams."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.pending: dict[str, PendingCommand] = {}
        self.runs: dict[str, ActiveRun] = {}
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._dispatch_log: GroupCommit[CommandRow, None] = GroupCommit(
            relay, relay.store.record_dispatches
        )
        self._result_log: GroupCommit[CommandRow, bool] = GroupCommit(
            relay, relay.store.record_results
        )

    async def start(self) -> None:
        await self.recover()
        self._task = asyncio.get_running_loop().create_task(self._tick_loop())

    async def recover(self) -> None:
        """After a crash (kill -9, power loss): end what the previous process left open.

        Commands without an end are ``edge_disconnected`` (a late result still lands in
        history); each run still ``running`` in the store is finished from its command
        rows -- finished targets keep their results, in-flight ones end
        ``edge_disconnected``, undispatched ones ``not_started`` (``cancelled``). Nothing
        is dispatched again: a command may already have run on its daemon.
        """
        relay = self.relay
        now = relay.now()
        lost = await relay.db.call(
            relay.store.finish_orphaned_commands,
            now=now,
            error="the relay restarted while the command ran",
        )
        for row in await relay.db.call(relay.store.unfinished_fleet_runs):
            try:
                commands = await relay.db.call(relay.store.fleet_run_commands, row.fleet_command_id)
                finished = recovered_run(row, commands, now)
            except Exception as err:  # one unreadable record must not stop the relay
                jsonlog.log(
                    "error",
                    "fleet.recover_failed",
                    fleet_command_id=row.fleet_command_id,
                    error=repr(err),
                )
                continue
            await relay.db.call(relay.store.save_fleet_run, finished)
            relay.metrics.fleet_runs.labels(outcome=finished.outcome).inc()
            jsonlog.log(
                "warning",
                "fleet.run_recovered",
                fleet_command_id=row.fleet_command_id,
                outcome=finished.outcome,
            )
        if lost:
            jsonlog.log("warning", "commands.recovered", edge_disconnected=lost)

    async def stop(self) -> None:
        for active in list(self.runs.values()):
            with contextlib.suppress(Exception):
                await self.cancel_run(active, "relay shutting down")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._background):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception as err:
                jsonlog.log("error", "dispatcher.task_failed", error=repr(err))

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ single commands

    async def send(
        self,
        node_id: str,
        tool: str,
        args_json: str = "{}",
        *,
        fleet_command_id: str = "",
        deadline: float = 0.0,
        timeout_secs: float | None = None,
        listener: Listener | None = None,
        parent_span: Any = None,
        log_level: str = "info",
    ) -> PendingCommand:
        """Dispatch one command on the node's live stream; raises :class:`NotConnected`.

        ``timeout_secs`` is sent as the invocation's timeout when given (a fleet run sends
        the planner's, so the planner knows the bound the daemon kills at); else it is
        what is left until ``deadline``.
        """
        relay = self.relay
        handle = relay.streams.get(node_id)
        if handle is None or handle.closing:
            raise NotConnected(f"daemon {node_id} has no live stream")
        node = relay.nodes[node_id]
        now = relay.now()
        command_id = "c-" + os.urandom(10).hex()
        span, traceparent, tracestate = tracing.start_node_span(
            parent_span,
            node_id=node_id,
            tool=tool,
            fleet_command_id=fleet_command_id,
            command_id=command_id,
        )
        pending = PendingCommand(
            command_id=command_id,
            node_id=node_id,
            tenant_id=node.tenant_id,
            tool=tool,
            fleet_command_id=fleet_command_id,
            dispatched_at=now,
            listener=listener,
            span=span,
            log_level=log_level,
        )
        await self._dispatch_log.submit(
            CommandRow(
                command_id=command_id,
                node_id=node_id,
                tenant_id=node.tenant_id,
                tool=tool,
                dispatched_at=now,
                fleet_command_id=fleet_command_id,
            )
        )
        if handle.closing or relay.streams.get(node_id) is not handle:
            tracing.end_span(span, "edge_disconnected")
            raise NotConnected(f"daemon {node_id} disconnected")
        self.pending[command_id] = pending
        handle.session.send_command(
            command_id=command_id,
            tool=tool,
            args_json=args_json or "{}",
            fleet_command_id=fleet_command_id,
            deadline=deadline,
            timeout_secs=(
                timeout_secs
                if timeout_secs is not None
                else (max(0.0, deadline - now) if deadline else 0.0)
            ),
            traceparent=traceparent,
            tracestate=tracestate,
        )
        handle.flush()
        jsonlog.log(
            log_level,
            "command.dispatched",
            node_id=node_id,
            tenant_id=node.tenant_id,
            command_id=command_id,
            fleet_command_id=fleet_command_id or None,
            tool=tool,
        )
        return pending

    def cancel_command(self, command_id: str, reason: str) -> None:
        pending = self.pending.get(command_id)
        if pending is None:
            return
        handle = self.relay.streams.get(pending.node_id)
        if handle is not None and not handle.closing:
            with contextlib.suppress(Exception):
                handle.session.cancel(command_id, reason)
                handle.flush()

    def on_output(self, node_id: str, event: OutputReceived) -> None:
        pending = self.pending.get(event.command_id)
        if pending is None or pending.node_id != node_id:
            return
        if event.stdout:
            pending.stdout += event.stdout
            del pending.stdout[:-_TAIL]
        if event.stderr:
            pending.stderr += event.stderr
            del pending.stderr[:-_TAIL]
        active = self.runs.get(pending.fleet_command_id) if pending.fleet_command_id else None
        if active is not None and active.watchers:
            host = active.hosts.get(node_id)
            if host is None:
                node = self.relay.nodes.get(node_id)
                labels = dict(node.capabilities.get("labels", {})) if node is not None else {}
                host = host_label(node_id, {str(k): str(v) for k, v in labels.items()})
            active.publish_output(
                node_id,
                command_id=pending.command_id,
                host=host,
                stdout=event.stdout,
                stderr=event.stderr,
                now=self.relay.now(),
            )

    async def on_result(
        self, node_id: str, result: stream_pb2.CommandResult, *, known: bool
    ) -> None:
        """A daemon reported a result: persist it (the caller acks only after this)."""
        now = self.relay.now()
        pending = self.pending.get(result.command_id)
        if pending is not None and pending.node_id != node_id:
            pending = None  # another node's command id: never trust it
        outcome = outcome_of(result)
        exit_code = result.exit_code if result.has_exit_code else None
        if pending is None:
            # Late: dispatched on an earlier stream (maybe before a relay restart). Keep it
            # in history; its run (if any) already counted it edge_disconnected.
            existing = await self.relay.db.call(self.relay.store.get_command, result.command_id)
            if existing is None or existing.node_id != node_id:
                jsonlog.log(
                    "warning",
                    "command.unknown_result",
                    node_id=node_id,
                    command_id=result.command_id,
                )
                return
            await self.relay.db.call(
                self.relay.store.record_result,
                attrs.evolve(
                    existing,
                    finished_at=result.finished_at or now,
                    outcome=outcome.value,
                    exit_code=exit_code,
                    error=result.error_message,
                    stdout_tail=result.stdout_tail,
                    stderr_tail=result.stderr_tail,
                    result_json=capped_result(result.result_json),
                ),
            )
            jsonlog.log(
                "info",
                "command.late_result",
                node_id=node_id,
                command_id=result.command_id,
                outcome=outcome.value,
            )
            return
        stdout = bytes(result.stdout_tail) or bytes(pending.stdout)
        stderr = bytes(result.stderr_tail) or bytes(pending.stderr)
        await self._finish(
            pending,
            outcome,
            now,
            exit_code=exit_code,
            error_message=result.error_message,
            stdout=stdout[-_TAIL:],
            stderr=stderr[-_TAIL:],
            result_json=capped_result(result.result_json),
        )

    def connection_lost(self, node_id: str, lost: Iterable[str]) -> None:
        """The node's stream is gone: its in-flight commands end ``edge_disconnected``."""
        now = self.relay.now()
        for command_id in lost:
            pending = self.pending.get(command_id)
            if pending is None or pending.node_id != node_id:
                continue
            self._spawn(
                self._finish(
                    pending,
                    TargetOutcome.EDGE_DISCONNECTED,
                    now,
                    exit_code=None,
                    error_message="the daemon's stream dropped while the command ran",
                    stdout=bytes(pending.stdout),
                    stderr=bytes(pending.stderr),
                )
            )

    async def _finish(
        self,
        pending: PendingCommand,
        outcome: TargetOutcome,
        now: float,
        *,
        exit_code: int | None,
        error_message: str,
        stdout: bytes,
        stderr: bytes,
        result_json: str = "",
    ) -> None:
        if self.pending.pop(pending.command_id, None) is None:
            return  # already finished (e.g. lost, then the late result raced in)
        end = CommandEnd(
            command_id=pending.command_id,
            node_id=pending.node_id,
            tenant_id=pending.tenant_id,
            tool=pending.tool,
            fleet_command_id=pending.fleet_command_id,
            outcome=outcome,
            exit_code=exit_code,
            error_message=error_message,
            dispatched_at=pending.dispatched_at,
            finished_at=now,
            stdout_tail=stdout,
            stderr_tail=stderr,
            result_json=result_json,
        )
        metrics = self.relay.metrics
        metrics.commands_dispatched.labels(tool=pending.tool, outcome=outcome.value).inc()
        metrics.command_duration.labels(tool=pending.tool).observe(
            max(0.0, now - pending.dispatched_at)
        )
        tracing.end_span(pending.span, outcome.value)
        await self._result_log.submit(
            CommandRow(
                command_id=pending.command_id,
                node_id=pending.node_id,
                tenant_id=pending.tenant_id,
                tool=pending.tool,
                dispatched_at=pending.dispatched_at,
                fleet_command_id=pending.fleet_command_id,
                finished_at=now,
                outcome=outcome.value,
                exit_code=exit_code,
                error=error_message,
                stdout_tail=stdout,
                stderr_tail=stderr,
                result_json=result_json,
            )
        )
        jsonlog.log(
            pending.log_level,
            "command.finished",
            node_id=pending.node_id,
            tenant_id=pending.tenant_id,
            command_id=pending.command_id,
            fleet_command_id=pending.fleet_command_id or None,
            tool=pending.tool,
            outcome=outcome.value,
            exit_code=exit_code,
        )
        if pending.listener is not None:
            await pending.listener(end)

    # ------------------------------------------------------------------ fleet runs

    async def start_run(
        self,
        spec: FleetSpec,
        spec_proto: admin_pb2.FleetRunSpec,
        resolution: Resolution,
        *,
        created_by: str,
        scope: tuple[str, ...] | None,
        tenants: dict[str, str],
        stored_args: dict[str, Any] | None = None,
        secret_keys: tuple[str, ...] = (),
        rerun_of: str = "",
        follow_output: bool = False,
    ) -> tuple[ActiveRun, Watcher]:
        """Start a run (the resolution must have targets; the planner checks).

        ``spec.args`` go to the daemons; ``stored_args`` (the plain ones, default all of
        them) are what is kept and shown, and ``secret_keys`` name the rest. Returns the
        run and a watcher subscribed before the first dispatch, so the caller sees every
        event; ``None`` from it ends the stream.
        """
        fleet_command_id = "f-" + os.urandom(10).hex()
        run = FleetRun(spec, resolution, fleet_command_id=fleet_command_id)
        now = self.relay.now()
        span, trace_id = tracing.start_run_span(fleet_command_id, tool=spec.tool)
        active = ActiveRun(
            run=run,
            spec=spec_proto,
            args_json=json.dumps(dict(spec.args)),
            stored_args_json=json.dumps(
                dict(spec.args) if stored_args is None else stored_args, sort_keys=True
            ),
            secret_keys=tuple(sorted(secret_keys)),
            rerun_of=rerun_of,
            created_by=created_by,
            created_at=now,
            scope=scope,
            tenants=tenants,
            span=span,
            trace_id=trace_id,
            large=len(resolution.targets) > DETAIL_LIMIT,
        )
        queue = active.subscribe(output=follow_output)
        active.started_at = now
        # Stored first: a run the store refused (disk full) must not linger in memory.
        try:
            await self.relay.db.call(self.relay.store.save_fleet_run, active.to_row())
        except BaseException:
            tracing.end_span(span, "store_unavailable")
            raise
        self.runs[fleet_command_id] = active
        for skip in resolution.skipped:
            self.relay.metrics.fleet_targets_skipped.labels(reason=skip.reason.value).inc()
        jsonlog.log(
            "info",
            "fleet.run_started",
            fleet_command_id=fleet_command_id,
            tool=spec.tool,
            selector=str(spec.selector),
            targets=len(resolution.targets),
            skipped=len(resolution.skipped),
            created_by=created_by,
            rerun_of=rerun_of or None,
        )
        await self._apply(active, run.start(now))
        return active, queue

    async def cancel_run(self, active: ActiveRun, message: str | None = None) -> None:
        await self._apply(active, active.run.cancel(self.relay.now(), message=message))

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.relay.config.fleet_tick_interval)
            now = self.relay.now()
            for active in list(self.runs.values()):
                deadline = active.run.next_deadline()
                if deadline is not None and now >= deadline:
                    try:
                        await self._apply(active, active.run.on_tick(now))
                    except Exception as err:
                        jsonlog.log("error", "fleet.tick_failed", error=repr(err))

    async def _apply(self, active: ActiveRun, actions: list[Any]) -> None:
        queue = collections.deque(actions)
        while queue:
            if isinstance(queue[0], Dispatch):
                # Consecutive dispatches go out together, so their history rows share one
                # store transaction (mode all: 10k targets, one commit, not 10k).
                batch: list[Dispatch] = []
                while queue and isinstance(queue[0], Dispatch):
                    batch.append(queue.popleft())
                for more in await asyncio.gather(
                    *(self._dispatch_target(active, dispatch) for dispatch in batch)
                ):
                    queue.extend(more)
                continue
            action = queue.popleft()
            if isinstance(action, Cancel):
                command_id = active.command_ids.get(action.node_id)
                if command_id:
                    jsonlog.log(
                        "debug" if active.large else "info",
                        "command.cancel_sent",
                        node_id=action.node_id,
                        tenant_id=active.tenants.get(action.node_id),
                        command_id=command_id,
                        fleet_command_id=active.fleet_command_id,
                        reason=action.reason.value,
                    )
                    self.cancel_command(command_id, action.reason.value)
            elif isinstance(action, Finish):
                await self._finish_run(active)

    async def _dispatch_target(self, active: ActiveRun, dispatch: Dispatch) -> list[Any]:
        run = active.run
        node_id = dispatch.node_id
        active.dispatched_at[node_id] = self.relay.now()

        async def listener(end: CommandEnd) -> None:
            active.ends[end.node_id] = end
            actions = run.on_result(
                end.node_id,
                end.outcome,
                self.relay.now(),
                exit_code=end.exit_code,
                error_message=end.error_message or None,
            )
            active.end_output(node_id)
            active.publish(
                admin_pb2.FleetRunEvent(target_finished=self._target(active, node_id)), node_id
            )
            await self._apply(active, actions)

        try:
            pending = await self.send(
                node_id,
                run.spec.tool,
                active.args_json,
                fleet_command_id=run.fleet_command_id,
                deadline=dispatch.deadline_at or 0.0,
                timeout_secs=dispatch.timeout_secs,
                listener=listener,
                parent_span=active.span,
                log_level="debug" if active.large else "info",
            )
        except NotConnected as err:
            # Resolved as Connected a moment ago, gone now: the planner hears it like a
            # command lost to a dropped stream.
            now = self.relay.now()
            self.relay.metrics.commands_dispatched.labels(
                tool=run.spec.tool, outcome=TargetOutcome.EDGE_DISCONNECTED.value
            ).inc()
            actions = run.on_result(
                node_id, TargetOutcome.EDGE_DISCONNECTED, now, error_message=str(err)
            )
            active.ends[node_id] = CommandEnd(
                command_id="",
                node_id=node_id,
                tenant_id=active.tenants.get(node_id, ""),
                tool=run.spec.tool,
                fleet_command_id=run.fleet_command_id,
                outcome=TargetOutcome.EDGE_DISCONNECTED,
                exit_code=None,
                error_message=str(err),
                dispatched_at=now,
                finished_at=now,
            )
            active.publish(
                admin_pb2.FleetRunEvent(target_finished=self._target(active, node_id)), node_id
            )
            return list(actions)
        active.command_ids[node_id] = pending.command_id
        if not active.large:
            active.publish(admin_pb2.FleetRunEvent(dispatched=self._target(active, node_id)))
        return []

    def _target(self, active: ActiveRun, node_id: str) -> admin_pb2.TargetResult:
        """One target's progress for an event; O(1), so a 10k-target run stays linear."""
        out = admin_pb2.TargetResult(
            node_id=node_id,
            command_id=active.command_ids.get(node_id, ""),
            tenant_id=active.tenants.get(node_id, ""),
            dispatched_at=active.dispatched_at.get(node_id, 0.0),
        )
        # The planner's view, not the daemon's: the deadline rule may have renamed it.
        target = active.run.target(node_id)
        if target.outcome is not None:
            out.outcome = PROTO_OUTCOME[target.outcome]
            out.has_exit_code = target.exit_code is not None
            out.exit_code = target.exit_code or 0
            out.error_message = target.error_message or ""
            out.finished_at = target.finished_at or 0.0
            out.ended_by = target.ended_by.value if target.ended_by else ""
        end = active.ends.get(node_id)
        if end is not None:
            out.stdout_tail = end.stdout_tail
            out.stderr_tail = end.stderr_tail
            out.result_json = end.result_json
        return out

    async def _finish_run(self, active: ActiveRun) -> None:
        record = active.run.record()
        outcome = record.outcome.value if record.outcome else "running"
        self.relay.metrics.fleet_runs.labels(outcome=outcome).inc()
        for target in record.targets:
            if target.skip_reason is not None:
                self.relay.metrics.fleet_targets_skipped.labels(
                    reason=target.skip_reason.value
                ).inc()
        tracing.end_span(active.span, outcome)
        await self.relay.db.persist(self.relay.store.save_fleet_run, active.to_row())
        self.runs.pop(active.fleet_command_id, None)
        jsonlog.log(
            "info",
            "fleet.run_finished",
            fleet_command_id=active.fleet_command_id,
            outcome=outcome,
            halt_reason=record.halt_reason,
            targets=len(record.targets),
            outcomes=dict(
                collections.Counter(t.outcome.value for t in record.targets if t.outcome)
            ),
        )
        active.publish(admin_pb2.FleetRunEvent(finished=active.to_proto()))
        active.publish(None)
        active.done.set()
