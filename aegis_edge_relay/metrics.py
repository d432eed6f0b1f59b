"""The relay's Prometheus metrics, built from the core's catalogue, on their own registry.

``/metrics`` is prometheus_client's own WSGI app (the exposition is exactly its output),
served by a threaded ``wsgiref`` server. With a bearer token configured, every request must
carry ``Authorization: Bearer <token>`` (compared in constant time) or gets ``401`` with a
``WWW-Authenticate`` challenge and no metrics: the metrics name every tenant.
"""

from __future__ import annotations

import hmac
import socket
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, generate_latest

from aegis_edge_core import metrics_catalogue as cat

__all__ = ["MetricsListener", "RelayMetrics", "bearer_guard"]

_WsgiApp = Callable[[dict[str, Any], Any], Iterable[bytes]]


def bearer_guard(app: _WsgiApp, token: bytes) -> _WsgiApp:
    """``app`` behind ``Authorization: Bearer <token>``; anything else is a 401."""
    body = (
        b"401 Unauthorized: send 'Authorization: Bearer <token>' with the token of the "
        b"relay's --metrics-token-file\n"
    )

    def guarded(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        scheme, _, given = str(environ.get("HTTP_AUTHORIZATION", "")).strip().partition(" ")
        # compare_digest: the time taken does not depend on how much of the token matched
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("latin-1", "replace"), token
        ):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [
                ("WWW-Authenticate", 'Bearer realm="aegis-relay-metrics"'),
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
            ],
        )
        return [body]

    return guarded


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not log lines."""


class MetricsListener:
    """A bound ``/metrics`` listener; it serves once :meth:`start` is called."""

    def __init__(self, httpd: WSGIServer) -> None:
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()


class RelayMetrics:
    """The seven seed metrics plus the relay's own stream-protocol-error counter."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.daemons = Gauge(
            cat.DAEMONS.declared_name, cat.DAEMONS.help, cat.DAEMONS.labels, registry=r
        )
        self.stream_seconds = Counter(
            cat.STREAM_SECONDS.declared_name, cat.STREAM_SECONDS.help, registry=r
        )
        self.heartbeats = Counter(
            cat.HEARTBEATS.declared_name, cat.HEARTBEATS.help, cat.HEARTBEATS.labels, registry=r
        )
        self.commands_dispatched = Counter(
            cat.COMMANDS_DISPATCHED.declared_name,
            cat.COMMANDS_DISPATCHED.help,
            cat.COMMANDS_DISPATCHED.labels,
            registry=r,
        )
        self.command_duration = Histogram(
            cat.COMMAND_DURATION.declared_name,
            cat.COMMAND_DURATION.help,
            cat.COMMAND_DURATION.labels,
            buckets=cat.DURATION_BUCKETS,
            registry=r,
        )
        self.fleet_runs = Counter(
            cat.FLEET_RUNS.declared_name, cat.FLEET_RUNS.help, cat.FLEET_RUNS.labels, registry=r
        )
        self.fleet_targets_skipped = Counter(
            cat.FLEET_TARGETS_SKIPPED.declared_name,
            cat.FLEET_TARGETS_SKIPPED.help,
            cat.FLEET_TARGETS_SKIPPED.labels,
            registry=r,
        )
        self.stream_protocol_errors = Counter(
            "aegis_edge_stream_protocol_errors",
            "Daemon streams closed because the peer broke the protocol, by reason.",
            ("reason",),
            registry=r,
        )
        self.refusals = Counter(
            "aegis_edge_attestation_refusals",
            "Daemon connections refused before or at attestation, by reason (a failed "
            "attestation, rate_limited, handshake_timeout, too_many_unattested).",
            ("reason",),
            registry=r,
        )
        self.token_refreshes = Counter(
            "aegis_edge_token_refreshes",
            "Node token refreshes daemons asked for, by result (issued, rate_limited).",
            ("result",),
            registry=r,
        )
        self.enrollment_refusals = Counter(
            "aegis_edge_enrollment_refusals",
            "Enrollment attempts refused, by reason.",
            ("reason",),
            registry=r,
        )
        self._lock = threading.Lock()
        self._daemon_counts: Tally[tuple[str, str]] = Tally()
        self._tenants: set[str] = set()

    # -- daemons_total{status,tenant}: kept as exact counts, every status exported per tenant

    def set_daemon_counts(self, counts: Iterable[tuple[str, str]]) -> None:
        """Reset the gauge from ``(tenant, status)`` pairs, one per daemon."""
        with self._lock:
            self._daemon_counts = Tally(counts)
            for tenant, _ in self._daemon_counts:
                self._tenants.add(tenant)
            self._publish()

    def daemon_moved(self, tenant: str, old: str | None, new: str | None) -> None:
        with self._lock:
            if old is not None:
                self._daemon_counts[(tenant, old)] -= 1
            if new is not None:
                self._daemon_counts[(tenant, new)] += 1
            self._tenants.add(tenant)
            self._publish_tenant(tenant)

    def _publish(self) -> None:
        for tenant in self._tenants:
            self._publish_tenant(tenant)

    def _publish_tenant(self, tenant: str) -> None:
        for status in cat.DAEMON_STATUSES:
            value = max(0, self._daemon_counts[(tenant, status)])
            self.daemons.labels(status=status, tenant=tenant).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def bind(self, host: str, port: int, *, token: bytes | None = None) -> MetricsListener:
        """Bind the ``/metrics`` listener (``OSError`` if the address is taken); with
        ``token``, only requests bearing it are answered."""
        app: _WsgiApp = make_wsgi_app(self.registry)
        if token is not None:
            app = bearer_guard(app, token)
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
            0
        ][0]

        class _Server(ThreadingWSGIServer):
            address_family = family

        return MetricsListener(make_server(host, port, app, _Server, handler_class=_QuietHandler))

    def serve(self, host: str, port: int, *, token: bytes | None = None) -> int:
        """Bind and start serving in a daemon thread; returns the bound port."""
        listener = self.bind(host, port, token=token)
        listener.start()
        return listener.port
