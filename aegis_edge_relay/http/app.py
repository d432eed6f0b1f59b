"""The HTTP application: ``/metrics``, ``/healthz``, ``/readyz`` and the JSON API.

``/metrics`` is prometheus_client's exposition of the relay's registry, negotiated as its
own server does (text 0.0.4 unless the scraper asks for OpenMetrics; ``name[]`` filters;
gzip when accepted). With a metrics token, ``/metrics`` answers only ``Authorization:
Bearer <token>`` (compared in constant time) and everything else gets ``401`` with a
``WWW-Authenticate`` challenge and no metrics: the metrics name every tenant.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

from aegis_edge_core.wire.admin_pb2_grpc import AdminServicer
from aegis_edge_relay.http import api
from aegis_edge_relay.http.console import Sessions, TokenCheck, add_console
from aegis_edge_relay.http.openapi import OPENAPI_PATH, committed_document
from aegis_edge_relay.store import StoreWorker

__all__ = ["Credentials", "Readiness", "bearer_token", "make_app"]

Readiness = Callable[[], Awaitable[str | None]]
"""``None`` when the relay is ready to serve, else one sentence saying what is not."""

Credentials = Callable[[web.Request], str]
"""The operator token a request carries (``""``: none). The servicer checks it."""

_METRICS_401: Final = (
    "401 Unauthorized: send 'Authorization: Bearer <token>' with the token of the "
    "relay's --metrics-token-file\n"
)


def bearer_token(request: web.Request) -> str:
    """The token of ``Authorization: Bearer <token>`` (the scheme word in any case)."""
    scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
    return given.strip() if scheme.lower() == "bearer" else ""


def make_app(
    *,
    registry: CollectorRegistry,
    ready: Readiness,
    admin: AdminServicer,
    check_token: TokenCheck | None = None,
    db: StoreWorker | None = None,
    metrics_token: bytes | None = None,
) -> web.Application:
    """The relay's HTTP app; ``admin`` is the same servicer object the gRPC server calls.

    With ``check_token`` (how the console verifies a token at login) and ``db`` (where its
    sessions live) the console is served at ``/`` and its session cookie stands for the
    token; without them, only bearer tokens.
    """

    async def metrics(request: web.Request) -> web.Response:
        if metrics_token is not None and not hmac.compare_digest(
            bearer_token(request).encode("latin-1", "replace"), metrics_token
        ):
            return web.Response(
                status=401,
                text=_METRICS_401,
                headers={"WWW-Authenticate": 'Bearer realm="aegis-relay-metrics"'},
            )
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        names = request.query.getall("name[]", [])
        source = registry.restricted_registry(names) if names else registry
        response = web.Response(body=encoder(source))
        # set as a header, not content_type=: aiohttp would split off the parameters
        response.headers["Content-Type"] = content_type
        if gzip_accepted(request.headers.get("Accept-Encoding", "")):
            response.enable_compression(web.ContentCoding.gzip)
        return response

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        problem = await ready()
        if problem is None:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "detail": problem}, status=503)

    openapi = committed_document()

    async def openapi_json(_request: web.Request) -> web.Response:
        return web.Response(body=openapi, content_type="application/json")

    app = web.Application()
    app.router.add_get(OPENAPI_PATH, openapi_json)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    credentials: Credentials = bearer_token
    if check_token is not None and db is not None:
        credentials = add_console(app, admin, check_token, Sessions(db))
    api.add_routes(app, admin, credentials)
    return app
