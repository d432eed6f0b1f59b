"""``/api/v1``: the Admin API as JSON over HTTP, through one adapter.

Every operation is one row of :data:`ROUTES`: its parameters (path, query, JSON body; they
drive both parsing and the OpenAPI document), the Admin RPC it calls, how the request
message is built and how the answer is rendered. The call goes to the same servicer object
the gRPC server calls, with an :class:`~.context.HttpContext` carrying the request's
operator token, so authentication and authorization are the servicer's (the core's
``authz``), exactly as over gRPC. A servicer ``abort`` becomes an
``application/problem+json`` answer with the relay's sentence.

Runs started here (``POST /fleet/runs``, ``.../rerun``) answer ``202`` with the run as it
started; it goes on at the relay, and ``GET /fleet/runs/{id}`` shows where it is.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

import attrs
import grpc
from aiohttp import web
from google.protobuf.message import Message

from aegis_edge_core.wire import admin_pb2
from aegis_edge_core.wire.admin_pb2_grpc import AdminServicer
from aegis_edge_relay import jsonlog
from aegis_edge_relay.http import representation as rep
from aegis_edge_relay.http.context import Aborted, HttpContext
from aegis_edge_relay.http.problems import problem
from aegis_edge_relay.store import StoreUnavailable

__all__ = [
    "API_PREFIX",
    "ROUTES",
    "BadRequest",
    "Param",
    "Route",
    "add_routes",
    "host_page",
    "list_hosts_request",
]

API_PREFIX: Final = "/api/v1"

Kind = Literal["string", "integer", "number", "boolean", "strings", "object"]
Where = Literal["path", "query", "body"]

DEFAULT_HOST_PAGE: Final = 100
MAX_HOST_PAGE: Final = 1000


class BadRequest(Exception):
    """A parameter the API cannot turn into a request: ``400`` with this sentence."""


@attrs.frozen(kw_only=True)
class Param:
    name: str
    kind: Kind
    where: Where
    description: str
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None


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


# -- host paging: hosts come sorted by (tenant, node id); the cursor is the last one shown


def _cursor(host: admin_pb2.Host) -> str:
    raw = json.dumps([host.tenant_id, host.node_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after(text: str) -> tuple[str, str]:
    try:
        value = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, binascii.Error):
        value = None
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(s, str) for s in value)):
        raise BadRequest(
            f"query parameter 'after' is not a cursor this API gave ({text!r}); "
            "pass the next_cursor of the previous page"
        )
    return value[0], value[1]


def list_hosts_request(v: dict[str, Any]) -> admin_pb2.ListHostsRequest:
    after_tenant, after_node = _after(v["after"]) if "after" in v else ("", "")
    return admin_pb2.ListHostsRequest(
        selector=v.get("selector", ""),
        connected_only=v.get("connected", False),
        tenant_id=v.get("tenant", ""),
        limit=v.get("limit", DEFAULT_HOST_PAGE),
        after_tenant_id=after_tenant,
        after_node_id=after_node,
    )


def host_page(msg: admin_pb2.ListHostsResponse, _v: dict[str, Any]) -> dict[str, Any]:
    return {
        "hosts": [rep.host(h) for h in msg.hosts],
        "next_cursor": _cursor(msg.hosts[-1]) if msg.more and msg.hosts else None,
        "matched": msg.matched,
        "status_counts": dict(sorted(msg.status_counts.items())),
    }


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


# -- parameters


_TRUE: Final = {"true": True, "1": True, "false": False, "0": False}


def _from_text(param: Param, text: str) -> Any:
    where = f"{param.where} parameter {param.name!r}"
    if param.kind == "string":
        return text
    if param.kind == "boolean":
        if text.lower() not in _TRUE:
            raise BadRequest(f"{where} must be true or false, not {text!r}")
        return _TRUE[text.lower()]
    if param.kind == "integer":
        try:
            value: Any = int(text)
        except ValueError:
            raise BadRequest(f"{where} must be a whole number, not {text!r}") from None
        return _bounded(param, value)
    raise AssertionError(f"{param.kind} in {param.where}")  # pragma: no cover


def _bounded(param: Param, value: float) -> float:
    low, high = param.minimum, param.maximum
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"at least {low:g}" if high is None else f"between {low:g} and {high:g}"
        raise BadRequest(f"{param.where} field {param.name!r} must be {span}, not {value!r}")
    return value


def _from_json(param: Param, value: Any) -> Any:
    where = f"body field {param.name!r}"
    kind = param.kind
    if kind == "string" and isinstance(value, str):
        return value
    if kind == "boolean" and isinstance(value, bool):
        return value
    if kind == "integer" and isinstance(value, int) and not isinstance(value, bool):
        return _bounded(param, value)
    if (
        kind == "number"
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    ):
        return _bounded(param, float(value))
    if kind == "strings" and isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    if kind == "object" and isinstance(value, dict):
        return value
    wanted = {
        "string": "a string",
        "boolean": "true or false",
        "integer": "a whole number",
        "number": "a number",
        "strings": "a list of strings",
        "object": "a JSON object",
    }[kind]
    raise BadRequest(f"{where} must be {wanted}")


async def _values(route: Route, request: web.Request) -> dict[str, Any]:
    out: dict[str, Any] = {}
    body_params = [p for p in route.params if p.where == "body"]
    body: Mapping[str, Any] = {}
    if body_params:
        raw = await request.read()
        if raw.strip():
            try:
                parsed = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as err:
                raise BadRequest(f"the request body is not JSON: {err}") from None
            if not isinstance(parsed, dict):
                raise BadRequest("the request body must be a JSON object")
            known = {p.name for p in body_params}
            unknown = sorted(set(parsed) - known)
            if unknown:
                raise BadRequest(
                    f"unknown body field {unknown[0]!r} (known: {', '.join(sorted(known))})"
                )
            body = parsed
    for param in route.params:
        if param.where == "path":
            out[param.name] = request.match_info[param.name]
        elif param.where == "query":
            values = request.query.getall(param.name, [])
            if len(values) > 1:
                raise BadRequest(f"query parameter {param.name!r} is given more than once")
            if values:
                out[param.name] = _from_text(param, values[0])
        elif param.name in body and body[param.name] is not None:
            out[param.name] = _from_json(param, body[param.name])
        if param.required and param.name not in out:
            raise BadRequest(f"{param.where} field {param.name!r} is required")
    return out


# -- the adapter


def _peer(request: web.Request) -> str:
    # the form gRPC gives servicers: ipv4:ADDR:PORT or ipv6:[ADDR]:PORT
    peername = request.transport.get_extra_info("peername") if request.transport else None
    if not peername:
        return "unknown"
    host, port = peername[0], peername[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


async def call(
    admin: AdminServicer, route: Route, values: dict[str, Any], context: HttpContext
) -> Any:
    """Call the servicer method of ``route``; a streamed run answers its first event."""
    method = getattr(admin, route.rpc)
    message = route.build(values)
    if not route.streaming:
        return await method(message, context)
    events = method(message, context)
    try:
        first: admin_pb2.FleetRunEvent = await anext(events)
    finally:
        # The run goes on at the relay without this watcher.
        await events.aclose()
    return first.started


def _handler(
    admin: AdminServicer, route: Route, credentials: Callable[[web.Request], str]
) -> Callable[[web.Request], Any]:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            values = await _values(route, request)
            context = HttpContext(token=credentials(request), peer=_peer(request))
            answer = await call(admin, route, values, context)
            body = route.render(answer, values)
        except BadRequest as err:
            return problem(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Aborted as err:
            return problem(err.code, err.details)
        except StoreUnavailable as err:
            # as the gRPC interceptor does: the store rolled back, nothing half-written
            jsonlog.log("error", "store.unavailable", error=err.message, hint=err.hint)
            return problem(grpc.StatusCode.UNAVAILABLE, str(err))
        headers = {}
        if route.streaming:
            headers["Location"] = f"{API_PREFIX}/fleet/runs/{answer.fleet_command_id}"
        return web.json_response(body, status=route.status, headers=headers)

    return handle


@web.middleware
async def _api_problems(request: web.Request, handler: Any) -> web.StreamResponse:
    """Unknown paths and methods, and anything unexpected, as problems under /api/v1."""
    if not request.path.startswith(API_PREFIX + "/"):
        return await handler(request)  # type: ignore[no-any-return]
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except web.HTTPNotFound:
        return problem(grpc.StatusCode.NOT_FOUND, f"no API operation at {request.path}")
    except web.HTTPMethodNotAllowed as err:
        resp = problem(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{request.method} is not an operation of {request.path} "
            f"(allowed: {', '.join(sorted(err.allowed_methods))})",
            status=405,
        )
        resp.headers["Allow"] = ", ".join(sorted(err.allowed_methods))
        return resp
    except web.HTTPException:
        raise
    except Exception as err:  # one log line and one problem, never a traceback out
        jsonlog.log("error", "http.error", path=request.path, error=repr(err))
        return problem(
            grpc.StatusCode.INTERNAL, "the relay failed to answer; its log says why (http.error)"
        )


def add_routes(
    app: web.Application, admin: AdminServicer, credentials: Callable[[web.Request], str]
) -> None:
    app.middlewares.append(_api_problems)
    for route in ROUTES:
        app.router.add_route(
            route.method, API_PREFIX + route.path, _handler(admin, route, credentials)
        )
