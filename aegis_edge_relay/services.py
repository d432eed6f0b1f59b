"""The relay's gRPC services: thin adapters from RPCs to :class:`~.relay.Relay` methods.

``EdgeStream.Connect`` is registered with a raw-bytes request deserializer so that every
frame reaches :meth:`RelaySession.receive_bytes`: garbage becomes a counted protocol error
closing that one stream, instead of a deserialization failure inside gRPC.

Every Admin call first verifies the operator token (``authorization: Bearer <token>``) with
the core's :class:`TokenVerifier` and then asks :mod:`aegis_edge_core.authz` whether the
role and tenants allow it: UNAUTHENTICATED for a bad token, PERMISSION_DENIED for a role
that may not, NOT_FOUND for another tenant's daemons, runs and groups (they do not exist
for it).

Saved groups (``group=web`` in a selector) are looked up in the tenants the request may
touch: ``tenant_id`` if the request names one, else every tenant of the token. A name that
more than one of those tenants defines is refused (INVALID_ARGUMENT, at its column) until
the request names the tenant -- an all-tenants token never picks one silently.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Final, NoReturn

import grpc

from aegis_edge_core.authz import (
    AuthzError,
    Principal,
    authorize,
    check_tenant,
    parse_role,
    scope_tenants,
)
from aegis_edge_core.errors import AegisError
from aegis_edge_core.fleet import (
    FleetSpec,
    Group,
    GroupIndex,
    NoTargets,
    RunFinished,
    RunRecord,
    Selector,
    index_groups,
    parse_selector,
    resolve_targets,
)
from aegis_edge_core.fleet.errors import FleetSpecError, SelectorError
from aegis_edge_core.fleet.groups import check_group_name
from aegis_edge_core.fleet.rerun import (
    RerunRefused,
    check_rerun_secrets,
    merge_secret_args,
    parse_rerun_scope,
    rerun_selector,
    rerun_targets,
)
from aegis_edge_core.fleet.resolve import Resolution
from aegis_edge_core.fleet.snapshot import DaemonSnapshot
from aegis_edge_core.health import DaemonStatus
from aegis_edge_core.identity import EnrollmentError, TokenError
from aegis_edge_core.wire import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    enrollment_pb2,
    enrollment_pb2_grpc,
    stream_pb2,
)
from aegis_edge_relay import jsonlog
from aegis_edge_relay.dispatcher import (
    PROTO_OUTCOME,
    Watcher,
    run_to_proto,
    spec_from_dict,
)
from aegis_edge_relay.relay import Relay
from aegis_edge_relay.state import NodeState, capabilities_to_proto
from aegis_edge_relay.store import CommandRow, FleetRunRow, GroupExists, GroupRow

__all__ = ["AdminService", "EnrollmentService", "stream_handler"]

Context = grpc.aio.ServicerContext[Any, Any]

_STATUS_PROTO: Final = {
    DaemonStatus.CONNECTED: common_pb2.DAEMON_STATUS_CONNECTED,
    DaemonStatus.UNHEALTHY: common_pb2.DAEMON_STATUS_UNHEALTHY,
    DaemonStatus.DISCONNECTED: common_pb2.DAEMON_STATUS_DISCONNECTED,
    DaemonStatus.REVOKED: common_pb2.DAEMON_STATUS_REVOKED,
}
_ENROLL_CODES: Final = {
    "replayed": grpc.StatusCode.ALREADY_EXISTS,
    "malformed": grpc.StatusCode.INVALID_ARGUMENT,
    "expired": grpc.StatusCode.UNAUTHENTICATED,
    "not_yet_valid": grpc.StatusCode.UNAUTHENTICATED,
    "bad_signature": grpc.StatusCode.UNAUTHENTICATED,
    "wrong_audience": grpc.StatusCode.UNAUTHENTICATED,
}
DEFAULT_HISTORY: Final = 20
MAX_TAG_LENGTH: Final = 64


def stream_handler(relay: Relay) -> grpc.GenericRpcHandler[Any, Any]:
    """``aegis.edge.v1.EdgeStream/Connect`` with raw request bytes."""
    handler = grpc.stream_stream_rpc_method_handler(
        relay.connect,
        request_deserializer=None,
        response_serializer=stream_pb2.RelayMessage.SerializeToString,
    )
    return grpc.method_handlers_generic_handler("aegis.edge.v1.EdgeStream", {"Connect": handler})


class EnrollmentService(enrollment_pb2_grpc.EnrollmentServicer):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    async def Enroll(
        self, request: enrollment_pb2.EnrollRequest, context: Context
    ) -> enrollment_pb2.EnrollResponse:
        decision = self.relay.check_enroll_rate(context.peer())
        if not decision.allowed:
            retry = round(max(decision.retry_after, 0.001), 3)
            self.relay.metrics.enrollment_refusals.labels(reason="rate_limited").inc()
            jsonlog.log("warning", "enrollment.refused", reason="rate_limited", peer=context.peer())
            context.set_trailing_metadata(
                (("aegis-refusal-reason", "rate_limited"), ("retry-after", f"{retry:g}"))
            )
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"enrollment refused (rate_limited): too many attempts from this address; "
                f"retry in {retry:g}s",
            )
        try:
            return await self.relay.enroll(request)
        except EnrollmentError as err:
            self.relay.metrics.enrollment_refusals.labels(reason=err.reason).inc()
            jsonlog.log("warning", "enrollment.refused", reason=err.reason, error=err.message)
            context.set_trailing_metadata((("aegis-refusal-reason", err.reason),))
            await context.abort(
                _ENROLL_CODES.get(err.reason, grpc.StatusCode.PERMISSION_DENIED),
                str(err),  # the reason travels in the trailing metadata above
            )
            raise  # unreachable: abort raises


def _valid_tag(tag: str) -> bool:
    return (
        0 < len(tag) <= MAX_TAG_LENGTH
        and tag.isprintable()
        and not any(c.isspace() or c in ",()=" for c in tag)
    )


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    # ------------------------------------------------------------------ helpers

    async def _auth(self, context: Context, rpc: str) -> Principal:
        value = ""
        for key, val in context.invocation_metadata() or ():
            if key.lower() == "authorization":
                value = val if isinstance(val, str) else val.decode("ascii", "replace")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            await _abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "no operator token: send metadata 'authorization: Bearer <token>' "
                "(aegis relay operator-token prints one)",
            )
        try:
            claims = self.relay.verifier.verify_operator_token(
                token.strip(), now=self.relay.now(), revocations=self.relay.revocations
            )
        except TokenError as err:
            await _abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                f"operator token refused: {err.message}; {err.hint}",
            )
        principal = Principal(
            subject=claims.subject,
            role=parse_role(claims.role),
            tenants=None if claims.all_tenants else claims.tenants,
        )
        try:
            authorize(principal, rpc)
        except AuthzError as err:
            await _abort(context, _code(err.grpc_status), str(err))
        return principal

    async def _node(self, context: Context, principal: Principal, node_id: str) -> NodeState:
        node = self.relay.nodes.get(node_id)
        if node is None or not principal.sees(node.tenant_id):
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"daemon {node_id!r} not found")
        return node

    def _host(self, node: NodeState) -> admin_pb2.Host:
        relay = self.relay
        status = relay.status_of(node.node_id)
        health = relay.health.get(node.node_id)
        return admin_pb2.Host(
            node_id=node.node_id,
            tenant_id=node.tenant_id,
            status=_STATUS_PROTO[status],
            last_heartbeat_at=(health.last_heartbeat_at or 0.0) if health else 0.0,
            enrolled_at=node.enrolled_at,
            connected_since=relay.connected_since.get(node.node_id, 0.0),
            capabilities=capabilities_to_proto(node.capabilities, node.tags),
            key_thumbprint=node.key_thumbprint,
            revoked_reason=node.revoked_reason,
        )

    def _snapshots(self, tenants: frozenset[str] | None) -> list[Any]:
        relay = self.relay
        return [
            node.snapshot(relay.status_of(node.node_id).value)
            for node in relay.nodes.values()
            if tenants is None or node.tenant_id in tenants
        ]

    # ------------------------------------------------------------------ hosts

    async def ListHosts(
        self, request: admin_pb2.ListHostsRequest, context: Context
    ) -> admin_pb2.ListHostsResponse:
        principal = await self._auth(context, "ListHosts")
        tenants = await _guard(context, lambda: scope_tenants(principal, request.tenant_id))
        matches = None
        if request.selector:
            selector = await _guard(context, lambda: parse_selector(request.selector))
            groups = await self._group_index(context, request.selector, selector, tenants)
            matches = await _guard(context, lambda: selector.matcher(groups))
        out = admin_pb2.ListHostsResponse()
        for node in sorted(self.relay.nodes.values(), key=lambda n: (n.tenant_id, n.node_id)):
            if tenants is not None and node.tenant_id not in tenants:
                continue
            status = self.relay.status_of(node.node_id)
            if request.connected_only and status is not DaemonStatus.CONNECTED:
                continue
            if matches is not None and not matches(node.snapshot(status.value)):
                continue
            out.hosts.append(self._host(node))
        return out

    async def GetHost(self, request: admin_pb2.GetHostRequest, context: Context) -> admin_pb2.Host:
        principal = await self._auth(context, "GetHost")
        node = await self._node(context, principal, request.node_id)
        host = self._host(node)
        limit = min(request.history_limit or DEFAULT_HISTORY, 1000)
        rows = await self.relay.db.call(self.relay.store.command_history, node.node_id, limit)
        for row in rows:
            host.history.append(_command_record(row))
        return host

    async def AddTags(self, request: admin_pb2.TagsRequest, context: Context) -> admin_pb2.Host:
        return await self._tags(request, context, "AddTags", add=True)

    async def RemoveTags(self, request: admin_pb2.TagsRequest, context: Context) -> admin_pb2.Host:
        return await self._tags(request, context, "RemoveTags", add=False)

    async def _tags(
        self, request: admin_pb2.TagsRequest, context: Context, rpc: str, *, add: bool
    ) -> admin_pb2.Host:
        principal = await self._auth(context, rpc)
        node = await self._node(context, principal, request.node_id)
        bad = [t for t in request.tags if not _valid_tag(t)]
        if bad or not request.tags:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"invalid tag {bad[0]!r}: 1-64 printable characters without spaces or ,()="
                if bad
                else "no tags given",
            )
        tags = set(node.tags)
        if add:
            tags |= set(request.tags)
        else:
            tags -= set(request.tags)
        await self.relay.db.call(self.relay.store.set_tags, node.node_id, sorted(tags))
        node.tags = tags
        jsonlog.log(
            "info",
            "node.tags_changed",
            node_id=node.node_id,
            tenant_id=node.tenant_id,
            tags=sorted(tags),
            by=principal.subject,
        )
        return self._host(node)

    async def RevokeNode(
        self, request: admin_pb2.RevokeNodeRequest, context: Context
    ) -> admin_pb2.Host:
        principal = await self._auth(context, "RevokeNode")
        node = await self._node(context, principal, request.node_id)
        reason = request.reason or f"revoked by {principal.subject}"
        if not node.revoked:
            await self.relay.revoke_node(node.node_id, reason)
        return self._host(node)

    # ------------------------------------------------------------------ tenants

    async def IssueEnrollmentToken(
        self, request: admin_pb2.IssueEnrollmentTokenRequest, context: Context
    ) -> admin_pb2.IssueEnrollmentTokenResponse:
        principal = await self._auth(context, "IssueEnrollmentToken")
        tenant = request.tenant_id
        if not tenant and principal.tenants is not None and len(principal.tenants) == 1:
            (tenant,) = principal.tenants
        if not tenant:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "tenant_id is required")
        await _guard(context, lambda: check_tenant(principal, tenant))
        if await self.relay.db.call(self.relay.store.is_tenant_deleted, tenant):
            await _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tenant {tenant!r} was deleted and takes no new daemons",
            )
        ttl = request.ttl_secs or 15 * 60.0
        if not 0 < ttl <= 30 * 86400:
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "ttl must be between 0 and 30 days"
            )
        try:
            token, expires = self.relay.issue_enrollment_token(tenant, ttl)
        except (ValueError, AegisError) as err:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return admin_pb2.IssueEnrollmentTokenResponse(token=token, expires_at=expires)

    async def DeleteTenant(
        self, request: admin_pb2.DeleteTenantRequest, context: Context
    ) -> admin_pb2.DeleteTenantResponse:
        principal = await self._auth(context, "DeleteTenant")
        if not request.tenant_id:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "tenant_id is required")
        await _guard(context, lambda: check_tenant(principal, request.tenant_id))
        count = await self.relay.delete_tenant(request.tenant_id)
        return admin_pb2.DeleteTenantResponse(revoked_daemons=count)

    # ------------------------------------------------------------------ fleet runs

    async def _spec(
        self, context: Context, request: admin_pb2.FleetRunSpec
    ) -> tuple[FleetSpec, dict[str, Any], tuple[str, ...]]:
        """The parsed spec (its ``args`` include the secret ones), the plain arguments to
        store and the secret arguments' names."""

        def parse() -> tuple[FleetSpec, dict[str, Any], tuple[str, ...]]:
            plain = _json_object(request.args_json, "args_json", "args")
            secrets = _json_object(request.secret_args_json, "secret_args_json", "secret_args")
            spec = FleetSpec(
                selector=request.selector or "all",
                tool=request.tool,
                args=merge_secret_args(plain, secrets),
                mode=request.mode or "all",
                on_error=request.on_error or "continue",
                deadline_secs=request.deadline_secs or None,
                canary=request.canary,
            )
            return spec, plain, tuple(sorted(secrets))

        parsed: tuple[FleetSpec, dict[str, Any], tuple[str, ...]] = await _guard(context, parse)
        return parsed

    async def PreviewFleetRun(
        self, request: admin_pb2.FleetRunSpec, context: Context
    ) -> admin_pb2.FleetPreview:
        principal = await self._auth(context, "PreviewFleetRun")
        tenants = await _guard(context, lambda: scope_tenants(principal, request.tenant_id))
        spec, _, _ = await self._spec(context, request)
        groups = await self._group_index(context, request.selector, spec.selector, tenants)
        res = resolve_targets(self._snapshots(tenants), spec.selector, spec.tool, groups=groups)
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
        tenants = await _guard(context, lambda: scope_tenants(principal, request.tenant_id))
        spec, plain, secret_keys = await self._spec(context, request)
        groups = await self._group_index(context, request.selector, spec.selector, tenants)
        snapshots = self._snapshots(tenants)
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
        ):
            yield event

    async def RerunFleetRun(
        self, request: admin_pb2.RerunFleetRunRequest, context: Context
    ) -> AsyncIterator[admin_pb2.FleetRunEvent]:
        principal = await self._auth(context, "RerunFleetRun")
        old_id = request.fleet_command_id
        active = self.relay.dispatcher.runs.get(old_id)
        if active is not None and _visible(principal, active.scope):
            await _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"fleet run {old_id} is still running; its outcomes are not final (wait for "
                f"it with `aegis edge fleet watch {old_id}` or cancel it, then rerun)",
            )
        row = await self._stored_row(context, principal, old_id)
        old_spec = spec_from_dict(dict(row.spec))
        if row.args_json is None:
            await _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"fleet run {old_id} was stored without its arguments (by an older relay); "
                "start a new run with `aegis edge fleet run` instead",
            )
        stored_args_json: str = row.args_json
        tenants = await _guard(context, lambda: scope_tenants(principal, old_spec.tenant_id))

        def plan() -> tuple[FleetSpec, dict[str, Any], tuple[str, ...]]:
            data = dict(row.record)
            data.pop("relay", None)
            scope = parse_rerun_scope(request.only)
            node_ids = rerun_targets(RunRecord.from_dict(data), scope)
            secrets = _json_object(request.secret_args_json, "secret_args_json", "secret_args")
            check_rerun_secrets(old_id, row.secret_keys, secrets)
            plain = _json_object(stored_args_json, "args_json", "args")
            spec = FleetSpec(
                selector=rerun_selector(node_ids),
                tool=old_spec.tool,
                args=merge_secret_args(plain, secrets),
                mode=old_spec.mode or "all",
                on_error=old_spec.on_error or "continue",
                deadline_secs=old_spec.deadline_secs or None,
                canary=old_spec.canary,
            )
            return spec, plain, tuple(sorted(secrets))

        spec, plain, secret_keys = await _guard(context, plan)
        snapshots = self._snapshots(tenants)
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
    ) -> AsyncIterator[admin_pb2.FleetRunEvent]:
        """Start a resolved run and stream its events (``StartFleetRun``, ``RerunFleetRun``)."""
        if not res.targets:
            try:
                res.require_targets()
            except NoTargets as err:
                for skip in res.skipped:
                    self.relay.metrics.fleet_targets_skipped.labels(reason=skip.reason.value).inc()
                await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(err))
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
        active, watcher = await self.relay.dispatcher.start_run(
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
        )
        try:
            yield admin_pb2.FleetRunEvent(started=active.to_proto())
        except BaseException:
            watcher.close()  # closed after `started` (an HTTP start): hold nothing
            raise
        async for event in _drain(watcher):
            yield event

    async def WatchFleetRun(
        self, request: admin_pb2.GetFleetRunRequest, context: Context
    ) -> AsyncIterator[admin_pb2.FleetRunEvent]:
        principal = await self._auth(context, "WatchFleetRun")
        active = self.relay.dispatcher.runs.get(request.fleet_command_id)
        if active is not None and _visible(principal, active.scope):
            watcher = active.subscribe(output=request.follow_output)
            yield admin_pb2.FleetRunEvent(started=active.to_proto())
            async for event in _drain(watcher):
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
            await _guard(context, lambda: check_tenant(principal, request.tenant_id))
        limit = min(request.limit or 20, 500)
        rows = await self.relay.db.call(self.relay.store.list_fleet_runs, limit * 5)
        out = admin_pb2.ListFleetRunsResponse()
        for row in rows:
            if not _visible(principal, row.scope):
                continue
            if request.tenant_id and request.tenant_id not in (row.scope or ()):
                continue
            active = self.relay.dispatcher.runs.get(row.fleet_command_id)
            run = active.to_proto() if active is not None else _row_to_proto(row)
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
        active = self.relay.dispatcher.runs.get(request.fleet_command_id)
        if active is not None and _visible(principal, active.scope):
            return active.to_proto()
        return await self._stored_run(context, principal, request.fleet_command_id)

    async def CancelFleetRun(
        self, request: admin_pb2.GetFleetRunRequest, context: Context
    ) -> admin_pb2.FleetRun:
        principal = await self._auth(context, "CancelFleetRun")
        active = self.relay.dispatcher.runs.get(request.fleet_command_id)
        if active is not None and _visible(principal, active.scope):
            await _guard(context, active.run.check_cancellable)
            await self.relay.dispatcher.cancel_run(active, f"cancelled by {principal.subject}")
            return active.to_proto()
        run = await self._stored_run(context, principal, request.fleet_command_id)
        row = await self.relay.db.call(self.relay.store.get_fleet_run, request.fleet_command_id)
        if row is not None:
            await _guard(context, _record_of(row).check_cancellable)
        # Stored but unfinished and not ours to drive (a crashed relay's, before recovery):
        # nothing here can stop it; say where it stands.
        return run

    # ------------------------------------------------------------------ saved groups

    async def _groups_of(self, tenants: frozenset[str] | None) -> list[tuple[GroupRow, Group]]:
        """The stored groups of ``tenants`` (None: all) as core values.

        A row the core refuses (written by a version with other rules) is logged and
        left out rather than failing every run that names some other group.
        """
        rows = await self.relay.db.call(self.relay.store.list_groups, tenants)
        out = []
        for row in rows:
            try:
                out.append((row, _group_of(row)))
            except AegisError as err:
                jsonlog.log(
                    "warning",
                    "group.invalid",
                    tenant_id=row.tenant_id,
                    name=row.name,
                    error=str(err),
                )
        return out

    async def _group_index(
        self,
        context: Context,
        text: str,
        selector: Selector,
        tenants: frozenset[str] | None,
    ) -> GroupIndex | None:
        """The groups a selector names may come from, or None if it names none.

        Parses ``text`` again against them, so an unknown or ambiguous group is refused
        with the column in what the operator typed.
        """
        if not selector.group_names:
            return None
        index = index_groups(group for _row, group in await self._groups_of(tenants))
        await _guard(context, lambda: parse_selector(text, groups=index))
        return index

    async def _group_tenant(self, context: Context, principal: Principal, requested: str) -> str:
        """The one tenant a new group belongs to: the request's, or the token's only one."""
        tenant = requested
        if not tenant and principal.tenants is not None and len(principal.tenants) == 1:
            (tenant,) = principal.tenants
        if not tenant:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "tenant_id is required: this token may touch several tenants and a group "
                "belongs to one (--tenant)",
            )
        await _guard(context, lambda: check_tenant(principal, tenant))
        return tenant

    async def _find_group(
        self, context: Context, principal: Principal, request: admin_pb2.GetGroupRequest
    ) -> tuple[GroupRow, Group]:
        name = request.name
        await _guard(context, lambda: check_group_name(name))
        if request.tenant_id:
            await _guard(context, lambda: check_tenant(principal, request.tenant_id))
            tenants: frozenset[str] | None = frozenset({request.tenant_id})
        else:
            tenants = principal.tenants
        found = [(row, g) for row, g in await self._groups_of(tenants) if row.name == name]
        if not found:
            where = f" in tenant {request.tenant_id!r}" if request.tenant_id else ""
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"group {name!r} not found{where}")
        if len(found) > 1:
            names = ", ".join(row.tenant_id for row, _ in found)
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"group {name!r} exists in tenants {names}: name one (--tenant)",
            )
        return found[0]

    def _group_proto(
        self, row: GroupRow, group: Group, *, with_members: bool = False
    ) -> admin_pb2.Group:
        out = admin_pb2.Group(
            name=group.name,
            tenant_id=group.tenant_id,
            selector=str(group.selector),
            pinned=list(group.pinned),
            created_at=row.created_at,
            created_by=row.created_by,
        )
        if with_members:
            snapshots = self._snapshots(frozenset({group.tenant_id}))
            out.members.extend(group.members(snapshots))
            out.missing.extend(group.missing(snapshots))
        return out

    async def CreateGroup(
        self, request: admin_pb2.CreateGroupRequest, context: Context
    ) -> admin_pb2.Group:
        principal = await self._auth(context, "CreateGroup")
        tenant = await self._group_tenant(context, principal, request.tenant_id)
        group: Group = await _guard(
            context,
            lambda: Group(
                name=request.name,
                tenant_id=tenant,
                selector=request.selector,
                pinned=list(request.pinned),
            ),
        )
        for node_id in group.pinned:
            node = self.relay.nodes.get(node_id)
            if node is None or node.tenant_id != tenant:
                # The same answer whether the node is unknown or another tenant's.
                await _abort(
                    context,
                    grpc.StatusCode.NOT_FOUND,
                    f"pinned daemon {node_id!r} not found in tenant {tenant!r}",
                )
        if await self.relay.db.call(self.relay.store.is_tenant_deleted, tenant):
            await _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tenant {tenant!r} was deleted and takes no new groups",
            )
        row = GroupRow(
            tenant_id=tenant,
            name=group.name,
            selector=str(group.selector),
            pinned=group.pinned,
            created_at=self.relay.now(),
            created_by=principal.subject,
        )
        try:
            await self.relay.db.call(self.relay.store.create_group, row)
        except GroupExists as err:
            await _abort(context, grpc.StatusCode.ALREADY_EXISTS, str(err))
        jsonlog.log(
            "info",
            "group.created",
            tenant_id=tenant,
            name=group.name,
            selector=str(group.selector),
            pinned=len(group.pinned),
            by=principal.subject,
        )
        return self._group_proto(row, group, with_members=True)

    async def ListGroups(
        self, request: admin_pb2.ListGroupsRequest, context: Context
    ) -> admin_pb2.ListGroupsResponse:
        principal = await self._auth(context, "ListGroups")
        tenants = await _guard(context, lambda: scope_tenants(principal, request.tenant_id))
        out = admin_pb2.ListGroupsResponse()
        for row, group in await self._groups_of(tenants):
            out.groups.append(self._group_proto(row, group))
        return out

    async def GetGroup(
        self, request: admin_pb2.GetGroupRequest, context: Context
    ) -> admin_pb2.Group:
        principal = await self._auth(context, "GetGroup")
        row, group = await self._find_group(context, principal, request)
        return self._group_proto(row, group, with_members=True)

    async def DeleteGroup(
        self, request: admin_pb2.GetGroupRequest, context: Context
    ) -> admin_pb2.Group:
        principal = await self._auth(context, "DeleteGroup")
        row, group = await self._find_group(context, principal, request)
        await self.relay.db.call(self.relay.store.delete_group, row.tenant_id, row.name)
        jsonlog.log(
            "info", "group.deleted", tenant_id=row.tenant_id, name=row.name, by=principal.subject
        )
        return self._group_proto(row, group)

    async def _stored_row(
        self, context: Context, principal: Principal, fleet_command_id: str
    ) -> FleetRunRow:
        row = await self.relay.db.call(self.relay.store.get_fleet_run, fleet_command_id)
        if row is None or not _visible(principal, row.scope):
            await _abort(
                context, grpc.StatusCode.NOT_FOUND, f"fleet run {fleet_command_id!r} not found"
            )
        return row

    async def _stored_run(
        self, context: Context, principal: Principal, fleet_command_id: str
    ) -> admin_pb2.FleetRun:
        run = _row_to_proto(await self._stored_row(context, principal, fleet_command_id))
        for target in run.targets:
            if target.command_id:
                cmd = await self.relay.db.call(self.relay.store.get_command, target.command_id)
                if cmd is not None:
                    target.stdout_tail = cmd.stdout_tail
                    target.stderr_tail = cmd.stderr_tail
                    target.result_json = cmd.result_json
        return run


async def _drain(watcher: Watcher) -> AsyncIterator[admin_pb2.FleetRunEvent]:
    try:
        while True:
            event = await watcher.next()
            if event is None:
                return
            yield event
    finally:
        watcher.close()  # a watcher that went away holds nothing


def _json_object(text: str, name: str, field: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError as err:
        raise FleetSpecError(f"{name} is not JSON: {err}", field=field) from None
    if not isinstance(value, dict):
        raise FleetSpecError(f"{name} must be a JSON object", field=field)
    return value


def _visible(principal: Principal, scope: tuple[str, ...] | None) -> bool:
    if principal.tenants is None:
        return True
    if scope is None:
        return False
    return set(scope) <= principal.tenants


def _record_of(row: FleetRunRow) -> RunRecord:
    data = dict(row.record)
    data.pop("relay", None)
    return RunRecord.from_dict(data)


def _row_to_proto(row: FleetRunRow) -> admin_pb2.FleetRun:
    data = dict(row.record)
    extra = dict(data.pop("relay", {}) or {})
    record = RunRecord.from_dict(data)
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


def _group_of(row: GroupRow) -> Group:
    return Group(name=row.name, tenant_id=row.tenant_id, selector=row.selector, pinned=row.pinned)


def _command_record(row: CommandRow) -> admin_pb2.CommandRecord:
    from aegis_edge_core.fleet import TargetOutcome

    outcome = 0
    if row.outcome:
        try:
            outcome = PROTO_OUTCOME[TargetOutcome(row.outcome)]
        except ValueError:
            outcome = 0
    return admin_pb2.CommandRecord(
        command_id=row.command_id,
        fleet_command_id=row.fleet_command_id,
        tool=row.tool,
        outcome=outcome,  # type: ignore[arg-type]
        exit_code=row.exit_code or 0,
        has_exit_code=row.exit_code is not None,
        dispatched_at=row.dispatched_at,
        finished_at=row.finished_at or 0.0,
        error_message=row.error,
        result_json=row.result_json,
    )


def _code(name: str) -> grpc.StatusCode:
    code: grpc.StatusCode = getattr(grpc.StatusCode, name, grpc.StatusCode.PERMISSION_DENIED)
    return code


async def _abort(context: Context, code: grpc.StatusCode, details: str) -> NoReturn:
    await context.abort(code, details)
    raise AssertionError("unreachable")  # pragma: no cover


async def _guard(context: Context, fn: Any) -> Any:
    """Run ``fn``; turn the core's bad-input errors into the right status."""
    try:
        return fn()
    except AuthzError as err:
        await _abort(context, _code(err.grpc_status), str(err))
    except RerunRefused as err:
        await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(err))
    except RunFinished as err:
        await _abort(context, _code(err.grpc_status), str(err))
    except SelectorError as err:
        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, err.render())
    except AegisError as err:
        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
