"""Fleet runs: the core's planner driven over the dispatcher.

A fleet run is the core's :class:`~aegis_edge_core.fleet.FleetRun` planner driven by this
module: ``start``/``on_result``/``on_tick``/``cancel`` go in, ``Dispatch``/``Cancel``/``Finish``
actions come out and are carried out here, through the :class:`~.dispatcher.Dispatcher`.
The planner decides; this module does. Each run's events go to its watchers
(:class:`~.runstate.Watcher`), and its record to the store at start and at the end.

On a shared store each unfinished run has a coordinator lease, renewed with the relay's
own. When a run's coordinator dies (or stops), another relay claims the lease and resumes
the run from the store through the core's :func:`~aegis_edge_core.fleet.recovery.resume_run`:
nothing already sent is sent again, the commands in flight are waited for, and the run ends
as it would have.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
from typing import Any

from aegis_edge_core.cluster import run_takeover_due
from aegis_edge_core.drain import DEFAULT_ATTEST_RATE, back_within
from aegis_edge_core.fleet import (
    Cancel,
    Dispatch,
    Finish,
    FleetRun,
    FleetSpec,
    Resolution,
    TargetOutcome,
    parse_selector,
)
from aegis_edge_core.fleet.output import host_label
from aegis_edge_core.fleet.recovery import resume_run
from aegis_edge_core.fleet.wire_values import PROTO_OUTCOME
from aegis_edge_core.session import OutputReceived
from aegis_edge_core.wire import admin_pb2
from aegis_edge_relay import jsonlog, tracing
from aegis_edge_relay.dispatcher import (
    CommandEnd,
    Dispatcher,
    Listener,
    NotConnected,
    Outgoing,
    OutputSink,
    PendingCommand,
)
from aegis_edge_relay.fleetview import FleetView
from aegis_edge_relay.metrics import RelayMetrics
from aegis_edge_relay.routing import Router
from aegis_edge_relay.runstate import (
    DETAIL_LIMIT,
    ActiveRun,
    Watcher,
    end_of,
    record_of,
    recovered_run,
    spec_from_dict,
    stored_command,
)
from aegis_edge_relay.state import Clock
from aegis_edge_relay.store import FleetRunRow, StoreWorker

__all__ = ["ActiveRun", "FleetRuns", "Watcher"]

_COUNTED = admin_pb2.FleetRunEvent(target_finished=admin_pb2.TargetResult())
"""A target ended, for watchers that only count such events (``Watcher.per_target``)."""


class FleetRuns:
    """The fleet runs of one relay: the ones in flight, and recovery of a crashed one's."""

    def __init__(
        self,
        *,
        dispatcher: Dispatcher,
        router: Router,
        fleet: FleetView,
        db: StoreWorker,
        metrics: RelayMetrics,
        clock: Clock,
        drain_rate: float = DEFAULT_ATTEST_RATE,
    ) -> None:
        self.dispatcher = dispatcher
        self.router = router
        self.drain_rate = drain_rate
        self.fleet = fleet
        self._db = db
        self.metrics = metrics
        self.now = clock
        self.runs: dict[str, ActiveRun] = {}
        self._leases_checked = False
        self._handed_over = False
        self._returning_until: dict[str, float] = {}
        """fleet_command_id -> until when the daemons its previous coordinator drained are
        still on their way back (a run it handed over): a target whose daemon has no stream
        yet waits for it until then instead of ending ``edge_disconnected``."""

    async def recover(self) -> None:
        """After a crash (kill -9, power loss): end what the previous process left open.

        Each run still ``running`` in the store is finished from its command rows (unless
        the previous process handed it over: then it is resumed, as on a shared store) --
        finished targets keep their results, in-flight ones end ``edge_disconnected``,
        undispatched ones ``not_started`` (``cancelled``). Nothing is dispatched again: a
        command may already have run on its daemon. On a shared store, runs are taken over
        instead (:meth:`take_over_due`), and only those whose coordinator is gone.
        """
        if self.fleet.cluster.shared:
            await self.take_over_due(self.now())
            return
        db = self._db
        now = self.now()
        # Runs the previous process handed over to its successor (`serve --take-over`:
        # their lease set to 0, :meth:`hand_over`) go on here; the rest it left by crashing.
        leases = await db.call(db.store.load_run_leases)
        handed = {fid: coord for fid, coord, expires_at in leases if expires_at <= 0}
        for row in await db.call(db.store.unfinished_fleet_runs):
            fid = row.fleet_command_id
            if fid not in handed:
                await self._finish_recovered(row, now)
                continue
            me, ttl = self.fleet.cluster.relay_id, self.fleet.cluster.ttl
            routed = await db.call(db.store.claim_run, fid, me, handed[fid], now + ttl)
            try:
                await self._resume(
                    row, routed or {}, previous=handed[fid], now=now, handed_over=True
                )
            except Exception as err:  # finish it from the store rather than leave it open
                jsonlog.log("error", "fleet.takeover_failed", fleet_command_id=fid, error=repr(err))
                await self._finish_recovered(row, now)

    async def _finish_recovered(self, row: FleetRunRow, now: float) -> None:
        db = self._db
        try:
            commands = await db.call(db.store.fleet_run_commands, row.fleet_command_id)
            finished = recovered_run(row, commands, now)
        except Exception as err:  # one unreadable record must not stop the relay
            jsonlog.log(
                "error",
                "fleet.recover_failed",
                fleet_command_id=row.fleet_command_id,
                error=repr(err),
            )
            return
        await db.call(db.store.save_fleet_run, finished)
        self.metrics.fleet_runs.labels(outcome=finished.outcome).inc()
        jsonlog.log(
            "warning",
            "fleet.run_recovered",
            fleet_command_id=row.fleet_command_id,
            outcome=finished.outcome,
        )

    # ------------------------------------------------------------------ the cluster

    async def renew_leases(self, expires_at: float) -> None:
        if self.runs:
            db, me = self._db, self.fleet.cluster.relay_id
            await db.call(db.store.lease_runs, me, list(self.runs), expires_at)

    async def take_over_due(self, now: float) -> None:
        """Claim and resume each unfinished run whose coordinator lease lapsed or whose
        coordinating relay is gone (the rule is the core's ``run_takeover_due``). None
        once this relay handed its runs over: the rule's "the lease names this very relay"
        would take them back from its successor while it drains."""
        db, cluster = self._db, self.fleet.cluster
        if self._handed_over:
            return
        leases = {fid: (coord, exp) for fid, coord, exp in await db.call(db.store.load_run_leases)}
        due = {
            fid: coord
            for fid, (coord, exp) in leases.items()
            if fid not in self.runs
            and run_takeover_due(coord, exp, cluster.live, now, this_relay=cluster.relay_id)
        }
        if not due and self._leases_checked:
            return
        first_look = not self._leases_checked
        self._leases_checked = True
        for row in await db.call(db.store.unfinished_fleet_runs):
            fid = row.fleet_command_id
            if fid in self.runs or self._handed_over:
                continue
            if fid in due:
                expected = due[fid]
            elif fid not in leases and first_look:
                expected = ""  # a run from before the cluster, or never leased
            else:
                continue
            routed = await db.call(
                db.store.claim_run, fid, cluster.relay_id, expected, now + cluster.ttl
            )
            if routed is None:
                continue  # another relay claimed it first
            if self._handed_over:  # claimed as this relay handed over: hand it over too
                with contextlib.suppress(Exception):
                    await db.call(db.store.lease_runs, cluster.relay_id, [fid], 0.0)
                continue
            try:
                handed_over = fid in leases and leases[fid][1] <= 0
                await self._resume(row, routed, previous=expected, now=now, handed_over=handed_over)
            except Exception as err:  # finish it from the store rather than leave it open
                jsonlog.log("error", "fleet.takeover_failed", fleet_command_id=fid, error=repr(err))
                await self._finish_recovered(row, now)
                await db.call(db.store.drop_run_lease, fid, cluster.relay_id)

    async def _resume(
        self,
        row: FleetRunRow,
        routed: dict[str, str],
        *,
        previous: str,
        now: float,
        handed_over: bool = False,
    ) -> None:
        db = self._db
        if row.args_json is None or row.secret_keys:
            # Secret arguments are never stored: what was not sent cannot be sent now.
            await self._finish_recovered(row, now)
            await db.call(
                db.store.drop_run_lease, row.fleet_command_id, self.fleet.cluster.relay_id
            )
            return
        record = record_of(row)
        extra = dict(row.record.get("relay", {}) or {})
        spec_proto = spec_from_dict(dict(row.spec))
        spec = FleetSpec(
            selector=parse_selector(record.selector),
            tool=record.tool,
            args=json.loads(row.args_json),
            mode=spec_proto.mode or "all",
            on_error=spec_proto.on_error or "continue",
            deadline_secs=spec_proto.deadline_secs or None,
            canary=spec_proto.canary,
        )
        resolution = Resolution(
            selector=spec.selector,
            tool=spec.tool,
            targets=tuple(t.node_id for t in record.targets),
            skipped=record.skipped,
        )
        run = FleetRun(spec, resolution, fleet_command_id=row.fleet_command_id)
        rows = await db.call(db.store.fleet_run_commands, row.fleet_command_id)
        resumed = resume_run(run, record, [stored_command(c) for c in rows], now=now)
        active = ActiveRun(
            run=run,
            spec=spec_proto,
            args_json=row.args_json,
            stored_args_json=row.args_json,
            rerun_of=row.rerun_of,
            created_by=row.created_by,
            created_at=row.created_at,
            scope=row.scope,
            tenants=dict(extra.get("tenants", {})),
            trace_id=row.trace_id,
            large=len(resolution.targets) > DETAIL_LIMIT,
            started_at=record.started_at or row.created_at,
        )
        by_id = {c.command_id: c for c in rows}
        for stored in (*resumed.replayed, *resumed.awaiting):
            active.command_ids[stored.node_id] = stored.command_id
            active.dispatched_at[stored.node_id] = stored.dispatched_at
        for stored in resumed.replayed:
            active.ends[stored.node_id] = end_of(by_id[stored.command_id])
        self.runs[row.fleet_command_id] = active
        if handed_over:
            # Handed over (lease 0): its coordinator drained every daemon just now.
            window = back_within(len(self.fleet.nodes), attest_rate=self.drain_rate)
            self._returning_until[row.fleet_command_id] = now + window
        for stored in resumed.awaiting:
            self.router.adopt(
                command_id=stored.command_id,
                node_id=stored.node_id,
                tenant_id=active.tenants.get(stored.node_id, ""),
                tool=spec.tool,
                fleet_command_id=row.fleet_command_id,
                dispatched_at=stored.dispatched_at,
                # sent on the previous coordinator's own stream unless it was routed
                holder=routed.get(stored.command_id, previous),
                listener=self._listener(active),
            )
        jsonlog.log(
            "warning",
            "fleet.run_taken_over",
            fleet_command_id=row.fleet_command_id,
            previous_coordinator=previous or None,
            replayed=len(resumed.replayed),
            awaiting=len(resumed.awaiting),
            to_dispatch=sum(isinstance(a, Dispatch) for a in resumed.actions),
        )
        await self._apply(active, list(resumed.actions))

    async def hand_over(self) -> None:
        """Stopping on a shared store: stop driving the runs and let their leases lapse
        now, so another relay resumes them at its next sync (results of what is in flight
        here still reach ``commands``, where the new coordinator finds them)."""
        db, me = self._db, self.fleet.cluster.relay_id
        self._handed_over = True
        for fid in self.let_go("info", "fleet.run_handed_over"):
            with contextlib.suppress(Exception):
                await db.call(db.store.lease_runs, me, [fid], 0.0)

    def let_go(self, level: str, event: str) -> list[str]:
        """Stop driving every run (this relay stops, or its lease lapsed and the others
        take its runs over): their watchers here are let go too. The runs' ids."""
        gone = list(self.runs)
        for fid in gone:
            active = self.runs.pop(fid)
            active.detached = True
            active.publish(None)
            jsonlog.log(level, event, fleet_command_id=fid)
        return gone

    async def take_cancels(self) -> None:
        """Cancels of the runs this relay coordinates, asked for through another relay
        (``CancelFleetRun`` there): each is applied as if asked here, and the run as it
        stands then is the answer that relay waits for."""
        db, me = self._db, self.fleet.cluster.relay_id
        for fid, reason in await db.call(db.store.take_run_cancels, me):
            active = self.runs.get(fid)
            if active is None:
                continue  # finished meanwhile, or handed over: the asker reads the store
            await self.cancel_run(active, reason)
            jsonlog.log("info", "fleet.run_cancel_taken", fleet_command_id=fid, reason=reason)
            await db.call(db.store.answer_run_cancel, fid, active.to_proto().SerializeToString())

    async def cancel_all(self, message: str) -> None:
        for active in list(self.runs.values()):
            with contextlib.suppress(Exception):
                await self.cancel_run(active, message)

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
        per_target: bool = True,
    ) -> tuple[ActiveRun, Watcher]:
        """Start a run (the resolution must have targets; the planner checks).

        ``spec.args`` go to the daemons; ``stored_args`` (the plain ones, default all of
        them) are what is kept and shown, and ``secret_keys`` name the rest. Returns the
        run and a watcher subscribed before the first dispatch, so the caller sees every
        event; ``None`` from it ends the stream.
        """
        fleet_command_id = "f-" + os.urandom(10).hex()
        run = FleetRun(spec, resolution, fleet_command_id=fleet_command_id)
        now = self.now()
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
        queue = active.subscribe(output=follow_output, per_target=per_target)
        active.started_at = now
        db, cluster = self._db, self.fleet.cluster
        # Stored first: a run the store refused (disk full) must not linger in memory. On a
        # shared store its lease comes before its row, so no relay ever sees it unleased.
        try:
            if cluster.shared:
                await db.call(
                    db.store.lease_runs, cluster.relay_id, [fleet_command_id], now + cluster.ttl
                )
            await db.call(db.store.save_fleet_run, active.to_row())
        except BaseException:
            tracing.end_span(span, "store_unavailable")
            raise
        self.runs[fleet_command_id] = active
        self.count_skips(resolution)
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

    def count_skips(self, resolution: Resolution) -> None:
        """Count the daemons a resolution skipped (a run that starts, or one refused for
        having no targets)."""
        for skip in resolution.skipped:
            self.metrics.fleet_targets_skipped.labels(reason=skip.reason.value).inc()

    async def cancel_run(self, active: ActiveRun, message: str | None = None) -> None:
        await self._apply(active, active.run.cancel(self.now(), message=message))

    async def tick(self, now: float) -> None:
        """Feed ``now`` to every run whose next deadline has passed."""
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
                queue.extend(await self._dispatch(active, batch))
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
                    self.dispatcher.cancel_command(command_id, action.reason.value)
            elif isinstance(action, Finish):
                await self._finish_run(active)

    def _output_of(self, active: ActiveRun) -> OutputSink:
        """The sink a run's commands report live output to: its watchers, while it runs."""

        def sink(pending: PendingCommand, event: OutputReceived, lost_before: int) -> None:
            if self.runs.get(active.fleet_command_id) is not active or not active.watchers:
                return
            node_id = pending.node_id
            host = active.hosts.get(node_id)
            if host is None:
                host = host_label(node_id, self.fleet.host_label_source(node_id))
            active.publish_output(
                node_id,
                command_id=pending.command_id,
                host=host,
                stdout=event.stdout,
                stderr=event.stderr,
                now=self.now(),
                lost_before=lost_before,
            )

        return sink

    async def _dispatch(self, active: ActiveRun, batch: list[Dispatch]) -> list[Any]:
        """Send a batch of the planner's dispatches (one store transaction, no task per
        target); returns the planner's next actions for the targets found gone."""
        run = active.run
        now = self.now()
        listener, output = self._listener(active), self._output_of(active)
        level = "debug" if active.large else "info"
        outgoing = []
        for dispatch in batch:
            active.dispatched_at[dispatch.node_id] = now
            outgoing.append(
                Outgoing(
                    node_id=dispatch.node_id,
                    tool=run.spec.tool,
                    args_json=active.args_json,
                    fleet_command_id=run.fleet_command_id,
                    deadline=dispatch.deadline_at or 0.0,
                    timeout_secs=dispatch.timeout_secs,
                    listener=listener,
                    output=output,
                    parent_span=active.span,
                    log_level=level,
                )
            )
        more: list[Any] = []
        for dispatch, sent in zip(batch, await self.dispatcher.send_many(outgoing), strict=True):
            node_id = dispatch.node_id
            if isinstance(sent, NotConnected):
                more.extend(self._not_connected(active, dispatch, sent))
                continue
            active.command_ids[node_id] = sent.command_id
            if not active.large:
                active.publish(admin_pb2.FleetRunEvent(dispatched=self._target(active, node_id)))
        return more

    def _not_connected(self, active: ActiveRun, dispatch: Dispatch, err: NotConnected) -> list[Any]:
        run, node_id = active.run, dispatch.node_id
        now = self.now()
        if now < self._returning_until.get(run.fleet_command_id, 0.0):
            self.dispatcher.spawn(self._dispatch_on_return(active, dispatch))
            return []
        # Resolved as Connected a moment ago, gone now: the planner hears it like a
        # command lost to a dropped stream.
        self.metrics.commands_dispatched.labels(
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

    async def _dispatch_on_return(self, active: ActiveRun, dispatch: Dispatch) -> None:
        """Dispatch once the target's daemon is back from its previous coordinator's drain
        (or its return window closed: then it ends ``edge_disconnected`` as usual)."""
        fid, node_id = active.fleet_command_id, dispatch.node_id
        until = self._returning_until.get(fid, 0.0)
        while self.now() < until and not self.dispatcher.reachable(node_id):
            if self.fleet.draining:
                return  # this relay hands the run over in turn: its successor dispatches
            # woken when a daemon attests here or the cluster's holders are read again
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.fleet.arrival().wait(), until - self.now())
        if self.runs.get(fid) is not active or active.run.target(node_id).outcome is not None:
            return  # ended, cancelled or handed over meanwhile
        if self.now() >= until:
            self._returning_until.pop(fid, None)
        await self._apply(active, await self._dispatch(active, [dispatch]))

    def _listener(self, active: ActiveRun) -> Listener:
        """What a run's commands report their ends to (one for all its targets)."""
        run = active.run

        async def listener(end: CommandEnd) -> None:
            if active.detached:
                return  # handed over: the new coordinator reads this end from the store
            node_id = end.node_id
            active.ends[node_id] = end
            actions = run.on_result(
                end.node_id,
                end.outcome,
                self.now(),
                exit_code=end.exit_code,
                error_message=end.error_message or None,
            )
            active.end_output(node_id)
            if active.wants_targets:
                event = admin_pb2.FleetRunEvent(target_finished=self._target(active, node_id))
            else:
                event = _COUNTED  # summary-only watchers count it; no proto built per target
            active.publish(event, node_id)
            await self._apply(active, actions)

        return listener

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
        self.metrics.fleet_runs.labels(outcome=outcome).inc()
        for target in record.targets:
            if target.skip_reason is not None:
                self.metrics.fleet_targets_skipped.labels(reason=target.skip_reason.value).inc()
        tracing.end_span(active.span, outcome)
        await self._db.persist(self._db.store.save_fleet_run, active.to_row())
        self.runs.pop(active.fleet_command_id, None)
        cluster = self.fleet.cluster
        if cluster.shared:
            with contextlib.suppress(Exception):  # a lease of a finished run is never due
                await self._db.call(
                    self._db.store.drop_run_lease, active.fleet_command_id, cluster.relay_id
                )
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
