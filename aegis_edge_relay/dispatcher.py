"""The dispatcher: commands out to live streams, results and output back.

Single commands and fleet runs' commands take the same path: :meth:`Dispatcher.send_many`
records the dispatches in command history, hands the invocation to the node's
:class:`RelaySession` and remembers who is waiting. A node whose stream another relay of the
cluster holds gets the command through the store instead (a ``routed_commands`` row that
relay delivers once); the rest of that trip -- delivery at the holder, the end coming
back -- is :mod:`.routing`'s. Results (:meth:`Dispatcher.on_results`, called by the stream
reader *before* it acks), lost streams (:meth:`Dispatcher.connection_lost`, with the ids
:meth:`RelaySession.connection_lost` returned), late results and routed ends all end up in
:meth:`Dispatcher.finish`, which persists, counts and tells the waiter. Fleet runs
(:mod:`.runs`) are such waiters; the dispatcher knows no run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final

import attrs

from aegis_edge_core.fleet import TargetOutcome
from aegis_edge_core.fleet.wire_values import capped_result, outcome_of
from aegis_edge_core.session import OutputReceived
from aegis_edge_core.wire import stream_pb2
from aegis_edge_relay import jsonlog, tracing
from aegis_edge_relay.fleetview import FleetView
from aegis_edge_relay.groupcommit import GroupCommit
from aegis_edge_relay.metrics import RelayMetrics
from aegis_edge_relay.state import Clock, StreamHandle
from aegis_edge_relay.store import CommandRow, RoutedCommand, StoreWorker

__all__ = [
    "CommandEnd",
    "Dispatcher",
    "NotConnected",
    "Outgoing",
    "OutputSink",
    "PendingCommand",
]

_TAIL: Final = 64 * 1024


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
OutputSink = Callable[["PendingCommand", OutputReceived, int], None]
"""Told of each chunk of live output of a command, after the dispatcher kept its tail, with
the bytes of it lost just before the chunk on its way from another relay."""


@attrs.frozen(kw_only=True)
class Outgoing:
    """One command for :meth:`Dispatcher.send_many`.

    ``timeout_secs`` is sent as the invocation's timeout when given (a fleet run sends the
    planner's, so the planner knows the bound the daemon kills at); else it is what is
    left until ``deadline``."""

    node_id: str
    tool: str
    args_json: str = "{}"
    fleet_command_id: str = ""
    deadline: float = 0.0
    timeout_secs: float | None = None
    listener: Listener | None = None
    output: OutputSink | None = None
    parent_span: Any = None
    log_level: str = "info"


@attrs.define(kw_only=True)
class PendingCommand:
    command_id: str
    node_id: str
    tenant_id: str
    tool: str
    fleet_command_id: str
    dispatched_at: float
    listener: Listener | None = None
    output: OutputSink | None = None
    span: Any = None
    log_level: str = "info"
    stdout: bytearray = attrs.field(factory=bytearray)
    stderr: bytearray = attrs.field(factory=bytearray)
    routed_to: str = ""
    """The relay holding the node's stream when the command went through the store."""
    adopted: bool = False
    """Sent by a run's previous coordinator: its end is looked for in ``commands`` too."""


class Dispatcher:
    """Commands over the fleet's live streams."""

    def __init__(
        self, *, fleet: FleetView, db: StoreWorker, metrics: RelayMetrics, clock: Clock
    ) -> None:
        self.fleet = fleet
        self.db = db
        self.metrics = metrics
        self.now = clock
        self.pending: dict[str, PendingCommand] = {}
        self.handing_over = False
        """Set while the relay hands its runs to a successor (``serve --take-over``)."""
        self._background: set[asyncio.Task[None]] = set()
        self._dispatch_log: GroupCommit[CommandRow, None] = GroupCommit(
            db, db.store.record_dispatches
        )
        self._result_log: GroupCommit[CommandRow, bool] = GroupCommit(db, db.store.record_results)
        self._route_log: GroupCommit[RoutedCommand, None] = GroupCommit(db, db.store.route_commands)
        self._counters: dict[tuple[str, TargetOutcome], tuple[Any, Any]] = {}

    async def recover(self) -> None:
        """After a crash: commands the previous process left without an end are
        ``edge_disconnected`` (a late result still lands in history). Not on a shared
        store: the other relays' commands are in flight there, and a run's commands are
        its next coordinator's to settle."""
        if self.fleet.cluster.shared:
            return
        lost = await self.db.call(
            self.db.store.finish_orphaned_commands,
            now=self.now(),
            error="the relay restarted while the command ran",
        )
        if lost:
            jsonlog.log("warning", "commands.recovered", edge_disconnected=lost)

    async def stop(self) -> None:
        for task in list(self._background):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task

    def spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        """Run ``coro`` in the background (its failure logged); :meth:`stop` waits for it."""

        async def run() -> None:
            try:
                await coro
            except Exception as err:
                jsonlog.log("error", "dispatcher.task_failed", error=repr(err))

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------------ commands out

    def reachable(self, node_id: str) -> bool:
        """Whether :meth:`send` can reach the node now: its live stream is here, or another
        relay of the cluster holds it."""
        handle = self.fleet.streams.get(node_id)
        live = handle is not None and not handle.closing
        return live or self.fleet.cluster.holder_of(node_id) is not None

    async def send_many(self, batch: Sequence[Outgoing]) -> list[PendingCommand | NotConnected]:
        """Dispatch commands, each on its node's live stream (or through the store to the
        relay of the cluster holding it). Every dispatch row of the batch goes into one
        store transaction before any command goes out, and no task is made per command.
        Returns, in order, each command as sent or why its node was not reachable.
        """
        fleet = self.fleet
        now = self.now()
        out: list[PendingCommand | NotConnected] = []
        here: list[tuple[int, StreamHandle, PendingCommand, Outgoing, float, str, str]] = []
        routed: list[tuple[PendingCommand, RoutedCommand]] = []
        for req in batch:
            node_id = req.node_id
            handle = fleet.streams.get(node_id)
            holder = None
            if handle is None or handle.closing:
                holder = fleet.cluster.holder_of(node_id)
                if holder is None:
                    out.append(NotConnected(f"daemon {node_id} has no live stream"))
                    continue
            node = fleet.nodes[node_id]
            command_id = "c-" + os.urandom(10).hex()
            span, traceparent, tracestate = tracing.start_node_span(
                req.parent_span,
                node_id=node_id,
                tool=req.tool,
                fleet_command_id=req.fleet_command_id,
                command_id=command_id,
            )
            pending = PendingCommand(
                command_id=command_id,
                node_id=node_id,
                tenant_id=node.tenant_id,
                tool=req.tool,
                fleet_command_id=req.fleet_command_id,
                dispatched_at=now,
                listener=req.listener,
                output=req.output,
                span=span,
                log_level=req.log_level,
            )
            timeout = (
                req.timeout_secs
                if req.timeout_secs is not None
                else (max(0.0, req.deadline - now) if req.deadline else 0.0)
            )
            out.append(pending)
            if holder is None:
                assert handle is not None
                here.append((len(out) - 1, handle, pending, req, timeout, traceparent, tracestate))
                continue
            pending.routed_to = holder
            routed.append(
                (
                    pending,
                    RoutedCommand(
                        command_id=command_id,
                        node_id=node_id,
                        tenant_id=node.tenant_id,
                        holder=holder,
                        coordinator=fleet.cluster.relay_id,
                        tool=req.tool,
                        args_json=req.args_json or "{}",
                        fleet_command_id=req.fleet_command_id,
                        deadline=req.deadline,
                        timeout_secs=timeout,
                        created_at=now,
                    ),
                )
            )
        if here:
            rows = [
                CommandRow(
                    command_id=p.command_id,
                    node_id=p.node_id,
                    tenant_id=p.tenant_id,
                    tool=p.tool,
                    dispatched_at=now,
                    fleet_command_id=p.fleet_command_id,
                )
                for _, _, p, _, _, _, _ in here
            ]
            try:
                await self._dispatch_log.submit_many(rows)
            except Exception:
                for pending, _ in routed:
                    tracing.end_span(pending.span, "edge_disconnected")
                for _, _, pending, _, _, _, _ in here:
                    tracing.end_span(pending.span, "edge_disconnected")
                raise
        if routed:
            for pending, _ in routed:
                self.pending[pending.command_id] = pending
            try:
                await self._route_log.submit_many([row for _, row in routed])  # + dispatch rows
            except Exception:
                for pending, _ in routed:
                    self.pending.pop(pending.command_id, None)
                    tracing.end_span(pending.span, "edge_disconnected")
                raise
            for pending, _ in routed:
                self._dispatched(pending)
        for i, handle, pending, req, timeout, traceparent, tracestate in here:
            node_id = pending.node_id
            if handle.closing or fleet.streams.get(node_id) is not handle:
                tracing.end_span(pending.span, "edge_disconnected")
                out[i] = NotConnected(f"daemon {node_id} disconnected")
                continue
            self.pending[pending.command_id] = pending
            handle.session.send_command(
                command_id=pending.command_id,
                tool=req.tool,
                args_json=req.args_json or "{}",
                fleet_command_id=req.fleet_command_id,
                deadline=req.deadline,
                timeout_secs=timeout,
                traceparent=traceparent,
                tracestate=tracestate,
            )
            handle.flush()
            self._dispatched(pending)
        return out

    def _dispatched(self, pending: PendingCommand) -> None:
        jsonlog.log(
            pending.log_level,
            "command.dispatched",
            node_id=pending.node_id,
            tenant_id=pending.tenant_id,
            command_id=pending.command_id,
            fleet_command_id=pending.fleet_command_id or None,
            tool=pending.tool,
            routed_to=pending.routed_to or None,
        )

    def cancel_command(self, command_id: str, reason: str) -> None:
        pending = self.pending.get(command_id)
        if pending is None:
            return
        if pending.routed_to:
            db = self.db
            self.spawn(db.call(db.store.cancel_routed, command_id, reason))
            return
        handle = self.fleet.streams.get(pending.node_id)
        if handle is not None and not handle.closing:
            with contextlib.suppress(Exception):
                handle.session.cancel(command_id, reason)
                handle.flush()

    async def disconnected(self, pending: PendingCommand, message: str) -> None:
        await self.finish(
            pending,
            TargetOutcome.EDGE_DISCONNECTED,
            self.now(),
            exit_code=None,
            error_message=message,
            stdout=bytes(pending.stdout),
            stderr=bytes(pending.stderr),
        )

    # ------------------------------------------------------------------ what comes back

    def on_output(self, node_id: str, event: OutputReceived, *, lost_before: int = 0) -> None:
        pending = self.pending.get(event.command_id)
        if pending is None or pending.node_id != node_id:
            return
        if event.stdout:
            pending.stdout += event.stdout
            del pending.stdout[:-_TAIL]
        if event.stderr:
            pending.stderr += event.stderr
            del pending.stderr[:-_TAIL]
        if pending.output is not None:
            pending.output(pending, event, lost_before)

    async def store_results(
        self, results: Sequence[tuple[str, stream_pb2.CommandResult]]
    ) -> list[tuple[PendingCommand, CommandEnd]]:
        """Daemons reported results (``(node_id, result)``): persist them all, the known
        ones in one group commit. The caller acks them only after this, then hands the ends
        returned to :meth:`tell`."""
        now = self.now()
        ends: list[tuple[PendingCommand, CommandEnd]] = []
        late = []
        for node_id, result in results:
            pending = self.pending.get(result.command_id)
            if pending is not None and pending.node_id != node_id:
                pending = None  # another node's command id: never trust it
            outcome = outcome_of(result)
            exit_code = result.exit_code if result.has_exit_code else None
            if pending is None:
                late.append(self._late_result(node_id, result, outcome, exit_code, now))
                continue
            stdout = bytes(result.stdout_tail) or bytes(pending.stdout)
            stderr = bytes(result.stderr_tail) or bytes(pending.stderr)
            end = self._ended(
                pending,
                outcome,
                now,
                exit_code=exit_code,
                error_message=result.error_message,
                stdout=stdout[-_TAIL:],
                stderr=stderr[-_TAIL:],
                result_json=capped_result(result.result_json),
            )
            if end is not None:
                ends.append((pending, end))
        if late:
            await asyncio.gather(*late)
        await self._store_ends(ends)
        return ends

    async def _late_result(
        self,
        node_id: str,
        result: stream_pb2.CommandResult,
        outcome: TargetOutcome,
        exit_code: int | None,
        now: float,
    ) -> None:
        """Dispatched on an earlier stream (maybe before a relay restart): keep it in
        history; its run (if any) already counted it edge_disconnected."""
        existing = await self.db.call(self.db.store.get_command, result.command_id)
        if existing is None or existing.node_id != node_id:
            jsonlog.log(
                "warning",
                "command.unknown_result",
                node_id=node_id,
                command_id=result.command_id,
            )
            return
        await self.db.call(
            self.db.store.record_result,
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

    def connection_lost(self, node_id: str, lost: Iterable[str]) -> None:
        """The node's stream is gone: its in-flight commands end ``edge_disconnected``.

        Not while handing over to a successor (:attr:`handing_over`): the successor adopts
        them from the store, and the daemon sends their results again from its spool once
        it is back, so the run ends as it would have without the restart."""
        if self.handing_over:
            return
        for command_id in lost:
            pending = self.pending.get(command_id)
            if pending is None or pending.node_id != node_id:
                continue
            self.spawn(
                self.disconnected(pending, "the daemon's stream dropped while the command ran")
            )

    async def finish(
        self, pending: PendingCommand, outcome: TargetOutcome, now: float, **end: Any
    ) -> None:
        """End a command (``end``: the rest of :meth:`_ended`'s arguments): count it,
        persist it, then tell its waiter."""
        ended = self._ended(pending, outcome, now, **end)
        if ended is not None:
            await self._store_ends([(pending, ended)])
            await self.tell(pending, ended)

    def _ended(
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
    ) -> CommandEnd | None:
        """The command's end, counted and off the pending table; None if it had ended."""
        if self.pending.pop(pending.command_id, None) is None:
            return None  # already finished (e.g. lost, then the late result raced in)
        counted = self._counters.get((pending.tool, outcome))
        if counted is None:
            # labels() takes a lock and builds a key per call: once per tool and outcome
            metrics = self.metrics
            counted = (
                metrics.commands_dispatched.labels(tool=pending.tool, outcome=outcome.value),
                metrics.command_duration.labels(tool=pending.tool),
            )
            self._counters[(pending.tool, outcome)] = counted
        counted[0].inc()
        counted[1].observe(max(0.0, now - pending.dispatched_at))
        tracing.end_span(pending.span, outcome.value)
        return CommandEnd(
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

    async def _store_ends(self, ends: list[tuple[PendingCommand, CommandEnd]]) -> None:
        """Persist the ends (one transaction, with whatever else is queued then)."""
        if not ends:
            return
        await self._result_log.submit_many(
            [
                CommandRow(
                    command_id=end.command_id,
                    node_id=end.node_id,
                    tenant_id=end.tenant_id,
                    tool=end.tool,
                    dispatched_at=end.dispatched_at,
                    fleet_command_id=end.fleet_command_id,
                    finished_at=end.finished_at,
                    outcome=end.outcome.value,
                    exit_code=end.exit_code,
                    error=end.error_message,
                    stdout_tail=end.stdout_tail,
                    stderr_tail=end.stderr_tail,
                    result_json=end.result_json,
                )
                for _, end in ends
            ]
        )
        for pending, end in ends:
            jsonlog.log(
                pending.log_level,
                "command.finished",
                node_id=end.node_id,
                tenant_id=end.tenant_id,
                command_id=end.command_id,
                fleet_command_id=end.fleet_command_id or None,
                tool=end.tool,
                outcome=end.outcome.value,
                exit_code=end.exit_code,
            )

    async def tell(self, pending: PendingCommand, end: CommandEnd) -> None:
        """Tell a stored end to whoever waits for the command (a fleet run)."""
        if pending.listener is not None:
            await pending.listener(end)
