"""Fleet runs: preview, start, rerun, watch, list, show and cancel.

The run itself is :class:`~aegis_edge_relay.runs.FleetRuns`'s; this area parses and
authorizes the request, resolves the targets against the fleet view and streams the run's
events back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, Final

import attrs
import grpc

from aegis_edge_core.authz import Principal, check_tenant, scope_tenants
from aegis_edge_core.fleet import FleetSpec, GroupIndex, NoTargets, Selector, resolve_targets
from aegis_edge_core.fleet.errors import FleetSpecError
from aegis_edge_core.fleet.rerun import (
    check_rerun_secrets,
    merge_secret_args,
    parse_rerun_scope,
    rerun_selector,
    rerun_targets,
)
from aegis_edge_core.fleet.resolve import Resolution
from aegis_edge_core.fleet.snapshot import DaemonSnapshot
from aegis_edge_core.tools_spec import validate_args
from aegis_edge_core.wire import admin_pb2
from aegis_edge_relay.admin.auth import Context, abort, guard
from aegis_edge_relay.admin.groups import GroupsAdmin
from aegis_edge_relay.runstate import (
    ActiveRun,
    Watcher,
    record_of,
    row_to_proto,
    spec_from_dict,
)
from aegis_edge_relay.store import FleetRunRow

__all__ = ["FleetAdmin"]

CANCEL_ANSWER_WAIT: Final = 5.0
"""How long a cancel through a relay that does not coordinate the run waits for the
coordinator's answer: the coordinator's wake-up takes a round trip, and its sweep (every 5 s
at the default stale threshold) covers a lost one. The store's notification of the answer
ends the wait; the store is read again at the end in case that notification was lost."""


class FleetAdmin(GroupsAdmin):
    async def _spec(
        self, context: Context, request: admin_pb2.FleetRunSpec, *, preview: bool = False
    ) -> tuple[FleetSpec, dict[str, Any], tuple[str, ...]]:
        """The parsed spec (its ``args`` include the secret ones), the plain arguments to
        store and the secret arguments' names."""

        def parse() -> tuple[FleetSpec, dict[str, Any], tuple[str, ...]]:
            plain = _json_object(request.args_json, "args_json", "args")
            secrets = _json_object(request.secret_args_json, "secret_args_json", "secret_args")
            parsed = _fleet_spec(request.selector or "all", request, plain, secrets)
            # A built-in tool's arguments against its contract, before anything is
            # dispatched: bad ones are the operator's to fix (INVALID_ARGUMENT naming the
            # argument), not a fleet of BAD_ARGUMENTS results. A preview without arguments
            # asks only which hosts would run the tool. Plug-in tools' arguments pass.
            if not preview or plain or secrets:
                validate_args(parsed[0].tool, parsed[0].args)
            return parsed

        parsed: tuple[FleetSpec, dict[str, Any], tuple[str, ...]] = await guard(context, parse)
        return parsed

    async def PreviewFleetRun(
        self, request: admin_pb2.FleetRunSpec, context: Context
    ) -> admin_pb2.FleetPreview:
        principal = await self._auth(context, "PreviewFleetRun")
        tenants = await guard(context, lambda: scope_tenants(principal, request.tenant_id))
        spec, _, _ = await self._spec(context, request, preview=True)
        groups = await self._group_index(context, request.selector, spec.selector, tenants)
        res = resolve_targets(
            self.fleet.snapshots(tenants), spec.selector, spec.tool, groups=groups
        )
        out = admin_pb2.FleetPreview(
            targets=list(res.targets), matched=res.matched, selector=str(spec.selector)
        )
        for skip in res.skipped:
            out.skipped.add(node_id=skip.node_id, reason=skip.reason.value)
        return out

    async def StartFleetRun(
        self, request: admin_pb2.FleetRunSpec, context: Context
    ) -> AsyncIterator[admin_pb2.FleetRunEvent]:
        principal = await self._auth(context, "StartFleetRun")
        tenants = await guard(context, lambda: scope_tenants(principal, request.tenant_id))
        spec, plain, secret_keys = await self._spec(context, request)
        groups = await self._group_index(context, request.selector, spec.selector, tenants)
        snapshots = self.fleet.snapshots(tenants)
        res = resolve_targets(snapshots, spec.selector, spec.tool, groups=groups)
        async for event in self._launch(
            context,
            principal,
            spec=spec,
            request=request,
            res=res,
            snapshots=snapshots,
            stored_args=plain,
            secret_keys=secret_keys,
            rerun_of="",
            follow_output=request.follow_output,
            groups=groups,
            mode=EventMode.of(request),
        ):
            yield event

    async def RerunFleetRun(
        self, request: admin_pb2.RerunFleetRunRequest, context: Context
    ) -> AsyncIterator[admin_pb2.FleetRunEvent]:
        principal = await self._auth(context, "RerunFleetRun")
        old_id = request.fleet_command_id
        active = self.runs.runs.get(old_id)
        if active is not None and principal.sees_all(active.scope):
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"fleet run {old_id} is still running; its outcomes are not final (wait for "
                f"it with `aegis edge fleet watch {old_id}` or cancel it, then rerun)",
            )
        row = await self._stored_row(context, principal, old_id)
        old_spec = spec_from_dict(dict(row.spec))
        if row.args_json is None:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"fleet run {old_id} was stored without its arguments (by an older relay); "
                "start a new run with `aegis edge fleet run` instead",
            )
        stored_args_json: str = row.args_json
        tenants = await guard(context, lambda: scope_tenants(principal, old_spec.tenant_id))

        def plan() -> tuple[FleetSpec, dict[str, Any], tuple[str, ...]]:
            scope = parse_rerun_scope(request.only)
            node_ids = rerun_targets(record_of(row), scope)
            secrets = _json_object(request.secret_args_json, "secret_args_json", "secret_args")
            check_rerun_secrets(old_id, row.secret_keys, secrets)
            plain = _json_object(stored_args_json, "args_json", "args")
            return _fleet_spec(rerun_selector(node_ids), old_spec, plain, secrets)

        spec, plain, secret_keys = await guard(context, plan)
        snapshots = self.fleet.snapshots(tenants)
        res = resolve_targets(snapshots, spec.selector, spec.tool)
        async for event in self._launch(
            context,
            principal,
            spec=spec,
            request=old_spec,
            res=res,
            snapshots=snapshots,
            stored_args=plain,
            secret_keys=secret_keys,
            rerun_of=old_id,
            follow_output=request.follow_output,
            groups=None,
            mode=EventMode.of(request),
        ):
            yield event

    async def _launch(
        self,
        context: Context,
        principal: Principal,
        *,
        spec: FleetSpec,
        request: admin_pb2.FleetRunSpec,
        res: Resolution,
        snapshots: list[DaemonSnapshot],
        stored_args: dict[str, Any],
        secret_keys: tuple[str, ...],
        rerun_of: str,
        follow_output: bool,
        groups: GroupIndex | None,
        mode: EventMode,
    ) -> AsyncIterator[admin_pb2.FleetRunEvent]:
        """Start a resolved run and stream its events (``StartFleetRun``, ``RerunFleetRun``)."""
        if not res.targets:
            try:
                res.require_targets()
            except NoTargets as err:
                self.runs.count_skips(res)
                await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(err))
        involved_nodes = set(res.targets) | {k.node_id for k in res.skipped}
        node_tenants = {s.node_id: s.tenant_id for s in snapshots if s.node_id in involved_nodes}
        involved = set(node_tenants.values()) | ({request.tenant_id} - {""})
        if groups is not None:
            involved |= {groups[name].tenant_id for name in spec.selector.group_names}
        proto_spec = admin_pb2.FleetRunSpec(
            selector=str(spec.selector),
            tool=spec.tool,
            mode=request.mode,
            on_error=request.on_error,
            deadline_secs=request.deadline_secs,
            canary=request.canary,
            tenant_id=request.tenant_id,
        )
        active, watcher = await self.runs.start_run(
            spec,
            proto_spec,
            res,
            created_by=principal.subject,
            scope=tuple(sorted(involved)),
            tenants=node_tenants,
            stored_args=stored_args,
            secret_keys=secret_keys,
            rerun_of=rerun_of,
            follow_output=follow_output,
            per_target=not mode.summary,
        )
        try:
            yield _started(active, mode)
        except BaseException:
            watcher.close()  # closed after `started` (an HTTP start): hold nothing
            raise
        async for event in _drain(watcher, mode):
            yield event

    async def WatchFleetRun(
        self, request: admin_pb2.GetFleetRunRequest, context: Context
    ) -> AsyncIterator[admin_pb2.FleetRunEvent]:
        principal = await self._auth(context, "WatchFleetRun")
        active = self.runs.runs.get(request.fleet_command_id)
        if active is not None and principal.sees_all(active.scope):
            mode = EventMode.of(request)
            watcher = active.subscribe(output=request.follow_output, per_target=not mode.summary)
            yield _started(active, mode)
            async for event in _drain(watcher, mode):
                yield event
            return
        run = await self._stored_run(context, principal, request.fleet_command_id)
        yield admin_pb2.FleetRunEvent(started=run)
        yield admin_pb2.FleetRunEvent(finished=run)

    async def ListFleetRuns(
        self, request: admin_pb2.ListFleetRunsRequest, context: Context
    ) -> admin_pb2.ListFleetRunsResponse:
        principal = await self._auth(context, "ListFleetRuns")
        if request.tenant_id:
            await guard(context, lambda: check_tenant(principal, request.tenant_id))
        limit = min(request.limit or 20, 500)
        rows = await self.db.call(self.store.list_fleet_runs, limit * 5)
        out = admin_pb2.ListFleetRunsResponse()
        for row in rows:
            if not principal.sees_all(row.scope):
                continue
            if request.tenant_id and request.tenant_id not in (row.scope or ()):
                continue
            active = self.runs.runs.get(row.fleet_command_id)
            run = active.to_proto() if active is not None else row_to_proto(row)
            # Per-target rows stay out of the list, for size; counts stay in, and
            # targets_omitted says the empty list is not an empty run.
            del run.targets[:]
            run.targets_omitted = True
            out.runs.append(run)
            if len(out.runs) >= limit:
                break
        return out

    async def GetFleetRun(
        self, request: admin_pb2.GetFleetRunRequest, context: Context
    ) -> admin_pb2.FleetRun:
        principal = await self._auth(context, "GetFleetRun")
        active = self.runs.runs.get(request.fleet_command_id)
        if active is not None and principal.sees_all(active.scope):
            return active.to_proto()
        return await self._stored_run(context, principal, request.fleet_command_id)

    async def CancelFleetRun(
        self, request: admin_pb2.GetFleetRunRequest, context: Context
    ) -> admin_pb2.FleetRun:
        principal = await self._auth(context, "CancelFleetRun")
        active = self.runs.runs.get(request.fleet_command_id)
        if active is not None and principal.sees_all(active.scope):
            await guard(context, active.run.check_cancellable)
            await self.runs.cancel_run(active, f"cancelled by {principal.subject}")
            return active.to_proto()
        fid = request.fleet_command_id
        run = await self._stored_run(context, principal, fid)
        row = await self.db.call(self.store.get_fleet_run, fid)
        if row is not None:
            await guard(context, record_of(row).check_cancellable)
        if not self.fleet.cluster.shared:
            # Stored but unfinished and not ours to drive (a crashed relay's, before its
            # recovery): nothing here can stop it; say where it stands.
            return run
        # Another relay coordinates it (or will, once it takes it over): the cancel goes
        # through the store, and its coordinator answers with the run as it stands then.
        reason = f"cancelled by {principal.subject}"
        loop = asyncio.get_running_loop()
        give_up = loop.time() + CANCEL_ANSWER_WAIT
        # Watched before asking, so an answer faster than this coroutine is not missed.
        with self.fleet.cluster.cancel_answers.watch(fid) as answered:
            await self.db.call(self.store.request_run_cancel, fid, reason, self.now())
            while True:
                answer = await self.db.call(self.store.run_cancel_answer, fid)
                if answer is not None:
                    return admin_pb2.FleetRun.FromString(answer)
                row = await self.db.call(self.store.get_fleet_run, fid)
                if row is not None and row.outcome != "running":
                    # ended already (the cancel's answer went with its lease)
                    return await self._stored_run(context, principal, fid)
                left = give_up - loop.time()
                if left <= 0:
                    break
                answered.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(answered.wait(), left)
        run.halt_reason = (
            f"{reason}: handed to the run's coordinator, which has not taken it yet; "
            f"`aegis edge fleet show {fid}` tells when it has"
        )
        return run

    async def _stored_row(
        self, context: Context, principal: Principal, fleet_command_id: str
    ) -> FleetRunRow:
        row = await self.db.call(self.store.get_fleet_run, fleet_command_id)
        if row is None or not principal.sees_all(row.scope):
            await abort(
                context, grpc.StatusCode.NOT_FOUND, f"fleet run {fleet_command_id!r} not found"
            )
        return row

    async def _stored_run(
        self, context: Context, principal: Principal, fleet_command_id: str
    ) -> admin_pb2.FleetRun:
        run = row_to_proto(await self._stored_row(context, principal, fleet_command_id))
        for target in run.targets:
            if target.command_id:
                cmd = await self.db.call(self.store.get_command, target.command_id)
                if cmd is not None:
                    target.stdout_tail = cmd.stdout_tail
                    target.stderr_tail = cmd.stderr_tail
                    target.result_json = cmd.result_json
        return run


@attrs.frozen
class EventMode:
    """How a client asked for targets in its event stream (``batch_events``,
    ``summary_only``); neither: one event per target, as for an older client."""

    batch: bool = False
    summary: bool = False

    @classmethod
    def of(
        cls,
        request: admin_pb2.FleetRunSpec
        | admin_pb2.GetFleetRunRequest
        | admin_pb2.RerunFleetRunRequest,
    ) -> EventMode:
        return cls(batch=request.batch_events, summary=request.summary_only)


PROGRESS_INTERVAL: Final = 0.5
"""Seconds between two ``progress`` events of a summary-only stream."""

_PER_TARGET: Final = {"dispatched": "targets_dispatched", "target_finished": "targets_finished"}


def _started(active: ActiveRun, mode: EventMode) -> admin_pb2.FleetRunEvent:
    """The run as it starts; a summary-only stream gets it without its target rows (the
    `finished` event has them all)."""
    return admin_pb2.FleetRunEvent(started=active.to_proto(with_targets=not mode.summary))


async def _drain(
    watcher: Watcher, mode: EventMode = EventMode()
) -> AsyncIterator[admin_pb2.FleetRunEvent]:
    try:
        while True:
            event = await watcher.next()
            if event is None:
                return
            if not (mode.batch or mode.summary):
                yield event
                continue
            # What queued up while the last message was written goes out together.
            events = [event, *watcher.ready()]
            for out in _shaped(watcher, events, mode):
                yield out
            if events[-1] is None:
                return
            if mode.summary:  # a few progress events a second; the end at once
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watcher.run.done.wait(), PROGRESS_INTERVAL)
    finally:
        watcher.close()  # a watcher that went away holds nothing


def _shaped(
    watcher: Watcher, events: list[admin_pb2.FleetRunEvent | None], mode: EventMode
) -> list[admin_pb2.FleetRunEvent]:
    """Per-target events of ``events`` merged (batch) or counted (summary); the others kept
    in order. A summary stream gets one ``progress`` before the next other event."""
    out: list[admin_pb2.FleetRunEvent] = []
    progressed = False
    for event in events:
        if event is None:
            break
        kind = event.WhichOneof("body")
        batched = _PER_TARGET.get(kind or "")
        if batched is None:
            if progressed:
                out.append(admin_pb2.FleetRunEvent(progress=watcher.run.progress()))
                progressed = False
            out.append(event)
        elif mode.summary:
            progressed = True
        else:
            last = out[-1] if out else None
            if last is None or last.WhichOneof("body") != batched:
                last = admin_pb2.FleetRunEvent()
                getattr(last, batched).SetInParent()
                out.append(last)
            getattr(last, batched).targets.append(getattr(event, kind or ""))
    if progressed:
        out.append(admin_pb2.FleetRunEvent(progress=watcher.run.progress()))
    return out


def _fleet_spec(
    selector: str | Selector,
    source: admin_pb2.FleetRunSpec,
    plain: dict[str, Any],
    secrets: dict[str, Any],
) -> tuple[FleetSpec, dict[str, Any], tuple[str, ...]]:
    """The parsed spec (its ``args`` include the secret ones), the plain arguments to
    store and the secret arguments' names."""
    spec = FleetSpec(
        selector=selector,
        tool=source.tool,
        args=merge_secret_args(plain, secrets),
        mode=source.mode or "all",
        on_error=source.on_error or "continue",
        deadline_secs=source.deadline_secs or None,
        canary=source.canary,
    )
    return spec, plain, tuple(sorted(secrets))


def _json_object(text: str, name: str, field: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError as err:
        raise FleetSpecError(f"{name} is not JSON: {err}", field=field) from None
    if not isinstance(value, dict):
        raise FleetSpecError(f"{name} must be a JSON object", field=field)
    return value
