"""``/api/v1``: the Admin API as JSON over HTTP, through one adapter.

Every operation is one row of :data:`~.routes.ROUTES` (its parameters are parsed by
:mod:`.params`). The call goes to the same servicer object the gRPC server calls, with an
:class:`~.context.HttpContext` carrying the request's operator token, so authentication and
authorization are the servicer's (the core's ``authz``), exactly as over gRPC. A servicer
``abort`` becomes an ``application/problem+json`` answer with the relay's sentence.

Runs started here (``POST /fleet/runs``, ``.../rerun``) answer ``202`` with the run as it
started; it goes on at the relay, and ``GET /fleet/runs/{id}`` shows where it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from aiohttp import web

from aegis_edge_core.wire import admin_pb2
from aegis_edge_core.wire.admin_pb2_grpc import AdminServicer
from aegis_edge_relay import jsonlog
from aegis_edge_relay.http.context import Aborted, HttpContext
from aegis_edge_relay.http.params import BadRequest, request_values
from aegis_edge_relay.http.problems import problem
from aegis_edge_relay.http.routes import API_PREFIX, ROUTES, Route
from aegis_edge_relay.store import StoreUnavailable

__all__ = ["add_routes"]


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
            values = await request_values(route.params, request)
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
