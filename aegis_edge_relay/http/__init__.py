"""The relay's one HTTP server: ``/metrics``, ``/healthz``, ``/readyz`` and ``/api/v1``.

It runs on the asyncio loop the gRPC server runs on (aiohttp), with the relay's own TLS
certificate unless ``--insecure``. :func:`make_app` takes its dependencies explicitly (the
metrics registry, a readiness probe, the Admin servicer, how a request names its operator
token), never the relay; :class:`HttpListener` binds and serves it.
"""

from __future__ import annotations

from aegis_edge_relay.http.app import Readiness, bearer_token, make_app
from aegis_edge_relay.http.listener import HttpListener, server_ssl_context

__all__ = ["HttpListener", "Readiness", "bearer_token", "make_app", "server_ssl_context"]
