"""The operations of ``/api/v1``, one row of :data:`ROUTES` each: its parameters (they drive
both parsing and the OpenAPI document), the Admin RPC it calls, how the request message is
built and how the answer is rendered.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final

import attrs
from google.protobuf.message import Message

from aegis_edge_core.wire import admin_pb2
from aegis_edge_relay.http import representation as rep
from aegis_edge_relay.http.paging import (
    DEFAULT_HOST_PAGE,
    MAX_HOST_PAGE,
    host_page,
    list_hosts_request,
)
from aegis_edge_relay.http.params import Kind, Param, Where

__all__ = ["API_PREFIX", "ROUTES", "Route"]

API_PREFIX: Final = "/api/v1"


@attrs.frozen(kw_only=True)
class Route:
    method: str
    path: str
    """Below :data:`API_PREFIX`, with ``{name}`` for path parameters."""
    operation_id: str
    summary: str
    rpc: str
    """The Admin servicer method called."""
    build: Callable[[dict[str, Any]], Message]
    render: Callable[[Any, dict[str, Any]], Any]
    response: str
    """The name of the answer's schema in the OpenAPI document."""
    params: tuple[Param, ...] = ()
    status: int = 200
    streaming: bool = False
    """The RPC streams run events: the answer is the run as it started."""


def _p(name: str, kind: Kind, where: Where, description: str, **kw: Any) -> Param:
    return Param(name=name, kind=kind, where=where, description=description, **kw)


def _node(description: str = "the daemon's node id") -> Param:
    return _p("node_id", "string", "path", description, required=True)


def _run_id() -> Param:
    return _p("fleet_command_id", "string", "path", "the fleet run's id", required=True)


_TENANT_Q = _p("tenant", "string", "query", "only this tenant (default: every tenant in scope)")


def _spec_params() -> tuple[Param, ...]:
    return (
        _p("selector", "string", "body", "fleet selector, e.g. 'tags=prod'", required=True),
        _p("tool", "string", "body", "the tool to run, e.g. 'cmd.run'", required=True),
        _p("args", "object", "body", "the tool's arguments (stored and shown)"),
        _p("secret_args", "object", "body", "secret arguments: sent, never stored or shown"),
        _p("mode", "string", "body", "all, sequential, rolling=N or rolling=N%"),
        _p("on_error", "string", "body", "continue, fail-fast or stop-after=N"),
        _p("deadline_secs", "number", "body", "the run's deadline in seconds", minimum=0),
        _p(
            "canary", "integer", "body", "targets to run first, alone", minimum=0, maximum=2**32 - 1
        ),
        _p("tenant_id", "string", "body", "only this tenant's daemons"),
    )


def _json_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if value else ""


def _spec(v: dict[str, Any]) -> admin_pb2.FleetRunSpec:
    return admin_pb2.FleetRunSpec(
        selector=v["selector"],
        tool=v["tool"],
        args_json=_json_text(v.get("args")),
        secret_args_json=_json_text(v.get("secret_args")),
        mode=v.get("mode", ""),
        on_error=v.get("on_error", ""),
        deadline_secs=v.get("deadline_secs", 0.0),
        canary=v.get("canary", 0),
        tenant_id=v.get("tenant_id", ""),
    )


ROUTES: Final[tuple[Route, ...]] = (
    Route(
        method="GET",
        path="/hosts",
        operation_id="listHosts",
        summary="Hosts in scope, sorted by tenant and node id, a page at a time",
        rpc="ListHosts",
        params=(
            _p("selector", "string", "query", "fleet selector (the CLI's --target grammar)"),
            _p("connected", "boolean", "query", "only hosts connected now"),
            _TENANT_Q,
            _p(
                "limit",
                "integer",
                "query",
                f"hosts per page (default {DEFAULT_HOST_PAGE})",
                minimum=1,
                maximum=MAX_HOST_PAGE,
            ),
            _p("after", "string", "query", "the next_cursor of the previous page"),
        ),
        build=list_hosts_request,
        render=host_page,
        response="HostPage",
    ),
    Route(
        method="GET",
        path="/hosts/{node_id}",
        operation_id="getHost",
        summary="One host with its command history, newest first",
        rpc="GetHost",
        params=(
            _node(),
            _p(
                "history",
                "integer",
                "query",
                "commands of history (default 20)",
                minimum=1,
                maximum=1000,
            ),
        ),
        build=lambda v: admin_pb2.GetHostRequest(
            node_id=v["node_id"], history_limit=v.get("history", 0)
        ),
        render=lambda m, _v: rep.host_detail(m),
        response="HostDetail",
    ),
    Route(
        method="POST",
        path="/hosts/{node_id}/tags",
        operation_id="addTags",
        summary="Add tags to a host",
        rpc="AddTags",
        params=(_node(), _p("tags", "strings", "body", "the tags to add", required=True)),
        build=lambda v: admin_pb2.TagsRequest(node_id=v["node_id"], tags=v["tags"]),
        render=lambda m, _v: rep.host(m),
        response="Host",
    ),
    Route(
        method="DELETE",
        path="/hosts/{node_id}/tags/{tag}",
        operation_id="removeTag",
        summary="Remove one tag from a host",
        rpc="RemoveTags",
        params=(_node(), _p("tag", "string", "path", "the tag to remove", required=True)),
        build=lambda v: admin_pb2.TagsRequest(node_id=v["node_id"], tags=[v["tag"]]),
        render=lambda m, _v: rep.host(m),
        response="Host",
    ),
    Route(
        method="POST",
        path="/hosts/{node_id}/revoke",
        operation_id="revokeHost",
        summary="Revoke a host: its stream is cut and it may not reconnect",
        rpc="RevokeNode",
        params=(_node(), _p("reason", "string", "body", "why (kept with the host)")),
        build=lambda v: admin_pb2.RevokeNodeRequest(
            node_id=v["node_id"], reason=v.get("reason", "")
        ),
        render=lambda m, _v: rep.host(m),
        response="Host",
    ),
    Route(
        method="DELETE",
        path="/tenants/{tenant_id}",
        operation_id="deleteTenant",
        summary="Delete a tenant: every daemon bound to it is revoked",
        rpc="DeleteTenant",
        params=(_p("tenant_id", "string", "path", "the tenant", required=True),),
        build=lambda v: admin_pb2.DeleteTenantRequest(tenant_id=v["tenant_id"]),
        render=lambda m, v: rep.tenant_deleted(v["tenant_id"], m),
        response="TenantDeleted",
    ),
    Route(
        method="POST",
        path="/tenants/{tenant_id}/enrollment-tokens",
        operation_id="issueEnrollmentToken",
        summary="Issue an enrollment token for a tenant",
        rpc="IssueEnrollmentToken",
        params=(
            _p("tenant_id", "string", "path", "the tenant", required=True),
            _p("ttl_secs", "number", "body", "lifetime in seconds (default 15 minutes)", minimum=0),
        ),
        build=lambda v: admin_pb2.IssueEnrollmentTokenRequest(
            tenant_id=v["tenant_id"], ttl_secs=v.get("ttl_secs", 0.0)
        ),
        render=lambda m, _v: rep.enrollment_token(m),
        response="EnrollmentToken",
        status=201,
    ),
    Route(
        method="POST",
        path="/fleet/preview",
        operation_id="previewFleetRun",
        summary="Which daemons a run would target and which it would skip, and why",
        rpc="PreviewFleetRun",
        params=_spec_params(),
        build=_spec,
        render=lambda m, _v: rep.fleet_preview(m),
        response="FleetPreview",
    ),
    Route(
        method="POST",
        path="/fleet/runs",
        operation_id="startFleetRun",
        summary="Start a fleet run; answers the run as it started",
        rpc="StartFleetRun",
        params=_spec_params(),
        build=_spec,
        render=lambda m, _v: rep.fleet_run(m),
        response="FleetRun",
        status=202,
        streaming=True,
    ),
    Route(
        method="GET",
        path="/fleet/runs",
        operation_id="listFleetRuns",
        summary="Fleet runs, newest first, without per-target rows",
        rpc="ListFleetRuns",
        params=(
            _p("limit", "integer", "query", "runs (default 20)", minimum=1, maximum=500),
            _TENANT_Q,
        ),
        build=lambda v: admin_pb2.ListFleetRunsRequest(
            limit=v.get("limit", 0), tenant_id=v.get("tenant", "")
        ),
        render=lambda m, _v: {"runs": [rep.fleet_run(r) for r in m.runs]},
        response="FleetRunList",
    ),
    Route(
        method="GET",
        path="/fleet/runs/{fleet_command_id}",
        operation_id="getFleetRun",
        summary="One fleet run with every target",
        rpc="GetFleetRun",
        params=(_run_id(),),
        build=lambda v: admin_pb2.GetFleetRunRequest(fleet_command_id=v["fleet_command_id"]),
        render=lambda m, _v: rep.fleet_run(m),
        response="FleetRun",
    ),
    Route(
        method="POST",
        path="/fleet/runs/{fleet_command_id}/cancel",
        operation_id="cancelFleetRun",
        summary="Cancel a running fleet run",
        rpc="CancelFleetRun",
        params=(_run_id(),),
        build=lambda v: admin_pb2.GetFleetRunRequest(fleet_command_id=v["fleet_command_id"]),
        render=lambda m, _v: rep.fleet_run(m),
        response="FleetRun",
    ),
    Route(
        method="POST",
        path="/fleet/runs/{fleet_command_id}/rerun",
        operation_id="rerunFleetRun",
        summary="Start a new run with a finished run's spec on all, failed or not-started targets",
        rpc="RerunFleetRun",
        params=(
            _run_id(),
            _p("only", "string", "body", "all (default), failed or not_started"),
            _p("secret_args", "object", "body", "the old run's secret arguments, again"),
        ),
        build=lambda v: admin_pb2.RerunFleetRunRequest(
            fleet_command_id=v["fleet_command_id"],
            only=v.get("only", ""),
            secret_args_json=_json_text(v.get("secret_args")),
        ),
        render=lambda m, _v: rep.fleet_run(m),
        response="FleetRun",
        status=202,
        streaming=True,
    ),
    Route(
        method="GET",
        path="/groups",
        operation_id="listGroups",
        summary="Saved groups, by tenant then name",
        rpc="ListGroups",
        params=(_TENANT_Q,),
        build=lambda v: admin_pb2.ListGroupsRequest(tenant_id=v.get("tenant", "")),
        render=lambda m, _v: {"groups": [rep.group(g) for g in m.groups]},
        response="GroupList",
    ),
    Route(
        method="POST",
        path="/groups",
        operation_id="createGroup",
        summary="Save a group: a named selector plus pinned node ids, in one tenant",
        rpc="CreateGroup",
        params=(
            _p("name", "string", "body", "1-64 of a-z 0-9 - . _", required=True),
            _p("selector", "string", "body", "the group's selector", required=True),
            _p("pinned", "strings", "body", "node ids that are always members"),
            _p("tenant_id", "string", "body", "the group's tenant (default: the token's one)"),
        ),
        build=lambda v: admin_pb2.CreateGroupRequest(
            name=v["name"],
            selector=v["selector"],
            pinned=v.get("pinned", []),
            tenant_id=v.get("tenant_id", ""),
        ),
        render=lambda m, _v: rep.group_detail(m),
        response="GroupDetail",
        status=201,
    ),
    Route(
        method="GET",
        path="/groups/{name}",
        operation_id="getGroup",
        summary="One group with its members now",
        rpc="GetGroup",
        params=(_p("name", "string", "path", "the group's name", required=True), _TENANT_Q),
        build=lambda v: admin_pb2.GetGroupRequest(name=v["name"], tenant_id=v.get("tenant", "")),
        render=lambda m, _v: rep.group_detail(m),
        response="GroupDetail",
    ),
    Route(
        method="DELETE",
        path="/groups/{name}",
        operation_id="deleteGroup",
        summary="Delete a group; answers it as it was",
        rpc="DeleteGroup",
        params=(_p("name", "string", "path", "the group's name", required=True), _TENANT_Q),
        build=lambda v: admin_pb2.GetGroupRequest(name=v["name"], tenant_id=v.get("tenant", "")),
        render=lambda m, _v: rep.group(m),
        response="Group",
    ),
)
