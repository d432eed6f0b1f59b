"""Assembling and running the relay process: TLS, gRPC server, HTTP server, relay.json, signals.

``D/relay.json`` is written (atomically) once the relay listens, so scripts and tests that
start it with port 0 learn the ports it got::

    {"version": 1, "pid": 1234, "listen": "127.0.0.1:41235", "host": "127.0.0.1",
     "port": 41235, "tls": true, "http": "https://127.0.0.1:9464",
     "metrics": "https://127.0.0.1:9464/metrics", "metrics_port": 9464, "ca_cert": "D/ca.pem",
     "operator_token": "D/operator.token", "relay_endpoint": "127.0.0.1:41235", "data_dir": "D"}
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import ipaddress
import json
import os
import resource
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import grpc
import prometheus_client
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer

from aegis_edge_core.handshake import DEFAULT_HANDSHAKE_DEADLINE, DEFAULT_MAX_UNATTESTED_PER_SOURCE
from aegis_edge_core.identity import OPERATOR_TOKEN_TTL, TokenError, new_jti
from aegis_edge_core.ratelimit import (
    ATTEST_PER_NODE,
    ATTEST_PER_SOURCE,
    ENROLL_PER_SOURCE,
    REFRESH_PER_NODE,
    Limit,
)
from aegis_edge_core.session import MAX_MESSAGE_BYTES
from aegis_edge_core.wire import admin_pb2_grpc, enrollment_pb2_grpc
from aegis_edge_relay import jsonlog, tracing
from aegis_edge_relay.durations import parse_hostport
from aegis_edge_relay.files import atomic_write, ensure_private_dir
from aegis_edge_relay.http import HttpListener, make_app, server_ssl_context
from aegis_edge_relay.relay import Relay, RelayConfig, load_or_create_signing_key
from aegis_edge_relay.services import AdminService, EnrollmentService, stream_handler
from aegis_edge_relay.store import StoreUnavailable
from aegis_edge_relay.tls import TlsMaterial, ensure_tls, load_tls

__all__ = [
    "ServeOptions",
    "StartupError",
    "issue_operator_token",
    "load_metrics_token",
    "raise_nofile_limit",
    "serve",
]

RELAY_JSON: Final = "relay.json"
OPERATOR_TOKEN: Final = "operator.token"  # noqa: S105 - a file name

SERVICES: Final = (
    "aegis.edge.v1.EdgeStream",
    "aegis.edge.v1.Enrollment",
    "aegis.edge.v1.Admin",
)


@attrs.frozen(kw_only=True)
class ServeOptions:
    data_dir: Path
    listen: str
    http_listen: str | None = "127.0.0.1:9464"
    """The HTTP server: /metrics, /healthz, /readyz, /api/v1 (``None``: off)."""
    heartbeat_interval: float = 30.0
    stale_threshold: float = 90.0
    insecure: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    advertise: str | None = None
    drain_grace: float = 5.0
    fleet_tick_interval: float = 0.1
    otlp_endpoint: str | None = None
    log_level: str = "info"
    fast_exit: bool = False
    """Leave with ``os._exit(0)`` once stopped cleanly (the CLI does; embedders do not)."""
    attest_limit_per_node: Limit | None = ATTEST_PER_NODE
    attest_limit_per_source: Limit | None = ATTEST_PER_SOURCE
    enroll_limit_per_source: Limit | None = ENROLL_PER_SOURCE
    refresh_limit_per_node: Limit | None = REFRESH_PER_NODE
    handshake_timeout: float = DEFAULT_HANDSHAKE_DEADLINE
    """Seconds a daemon stream may take to attest, and a TCP connection to finish TLS."""
    max_unattested_per_source: int | None = DEFAULT_MAX_UNATTESTED_PER_SOURCE
    metrics_token_file: Path | None = None
    """A file holding the bearer token ``/metrics`` requires (``None``: no auth)."""


class StartupError(Exception):
    """The relay cannot start; ``str()`` is one line for stderr naming what and the fix."""


def load_metrics_token(path: Path) -> bytes:
    """The bearer token in ``path`` (surrounding whitespace dropped)."""
    try:
        text = path.read_bytes().decode("ascii").strip()
    except OSError as err:
        raise StartupError(
            f"--metrics-token-file {path}: cannot read it ({err.strerror or err})"
        ) from None
    except UnicodeDecodeError:
        raise StartupError(
            f"--metrics-token-file {path}: the token must be printable ASCII "
            f"(e.g. the output of 'openssl rand -hex 32')"
        ) from None
    if not text or any(not c.isprintable() or c.isspace() for c in text):
        raise StartupError(
            f"--metrics-token-file {path}: "
            + ("the file is empty" if not text else "the token holds spaces or control characters")
            + "; put one token on one line (e.g. the output of 'openssl rand -hex 32')"
        )
    return text.encode("ascii")


_BIND_ERRORS: Final = {
    errno.EADDRINUSE: "address already in use",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
    errno.EADDRNOTAVAIL: "no such address on this host",
}


def _cannot_listen(shown: str, flag: str, err: OSError | None) -> StartupError:
    if isinstance(err, socket.gaierror):
        why = f"the host name does not resolve ({err.strerror})"
    elif err is None:
        why = "gRPC could not bind it"
    else:
        why = _BIND_ERRORS.get(err.errno or 0, err.strerror or str(err))
    hint = f"another relay running? pick another {flag}"
    if err is not None and err.errno != errno.EADDRINUSE:
        hint = f"pick another {flag}"
    return StartupError(f"cannot listen on {shown}: {why} ({hint})")


def _probe_bind(host: str, port: int) -> OSError | None:
    """Bind ``host:port`` the way gRPC will (SO_REUSEADDR), and let go: gRPC itself says
    only "failed to bind", and logs a line of its own."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        return err
    for family, kind, proto, _name, addr in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(addr)
        except OSError as err:
            return err
    return None


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


GC_THRESHOLDS: tuple[int, int, int] = (50_000, 20, 10)
"""The relay process's cyclic-GC thresholds (Python's default is 700, 10, 10). Per-command
and per-stream objects mostly die young; a larger first generation lets them, instead of
promoting them towards the full collections that walk every object of 10k streams."""


MALLOC_TRIM_THRESHOLD = 256 * 1024 * 1024
"""glibc returns a heap's free top to the system (madvise) once it exceeds this (default
128 KB). With 10k streams every burst of frees (a fleet run's messages, streams closing at a
drain) made it madvise over and over on the event loop's thread: ~40% of the main thread's
samples while a 10k relay drained. Freed memory is reused by the next burst instead."""


def _keep_freed_memory() -> None:
    import ctypes
    import ctypes.util

    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold = -1  # <malloc.h>
        libc.mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (one fd per daemon stream)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def issue_operator_token(
    data_dir: Path, *, subject: str, role: str, tenants: list[str] | None, ttl: float
) -> tuple[str, float]:
    """Sign an operator token with the relay's key in ``data_dir``."""
    from aegis_edge_core.identity import TokenIssuer

    key = load_or_create_signing_key(data_dir)
    issued = TokenIssuer(signing_key=key).issue_operator_token(
        subject=subject,
        role=role,  # type: ignore[arg-type]
        tenants="*" if tenants is None else tenants,
        now=_now(),
        jti=new_jti(os.urandom(16)),
        ttl=ttl,
    )
    return issued.token, issued.claims.expires_at


def _now() -> float:
    import time

    return time.time()


def _ensure_admin_token(relay: Relay, data_dir: Path) -> Path:
    """``D/operator.token``: an admin token for every tenant, (re)made when missing or
    within a day of expiry."""
    path = data_dir / OPERATOR_TOKEN
    if path.exists():
        try:
            claims = relay.verifier.verify_operator_token(
                path.read_text().strip(), now=relay.now() + 86400
            )
            if claims.all_tenants and claims.role == "admin":
                return path
        except TokenError:
            pass
    token, _ = issue_operator_token(
        data_dir, subject="admin", role="admin", tenants=None, ttl=OPERATOR_TOKEN_TTL
    )
    atomic_write(path, (token + "\n").encode(), mode=0o600)
    return path


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class StoreErrorInterceptor(_Interceptor):
    """A store that cannot be written (locked, disk full) answers UNAVAILABLE with the
    store's sentence, instead of gRPC's generic UNKNOWN. The store rolled back: nothing
    half-written."""

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                try:
                    return await inner_uu(request, context)
                except StoreUnavailable as err:
                    await _store_abort(context, err)

            return handler._replace(unary_unary=unary_unary)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: Any) -> Any:
                try:
                    async for item in inner_us(request, context):
                        yield item
                except StoreUnavailable as err:
                    await _store_abort(context, err)

            return handler._replace(unary_stream=unary_stream)
        return handler


async def _store_abort(context: Any, err: StoreUnavailable) -> None:
    jsonlog.log("error", "store.unavailable", error=err.message, hint=err.hint)
    await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))


def _grpc_options(handshake_timeout: float = DEFAULT_HANDSHAKE_DEADLINE) -> list[tuple[str, Any]]:
    # Tuned for many long-lived streams and reconnect storms: no cap on concurrent
    # streams or pending requests that a few thousand reconnecting daemons would hit.
    return [
        # A TCP connection that has not finished TLS and the HTTP/2 preface by then is
        # closed by gRPC core (its default is 120 s: long enough to hold sockets open).
        ("grpc.server_handshake_timeout_ms", max(1, round(handshake_timeout * 1000))),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.max_receive_message_length", 2 * MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", 2 * MAX_MESSAGE_BYTES),
        ("grpc.max_concurrent_streams", 1_000_000),
        ("grpc.server.max_pending_requests", 1_000_000),
        ("grpc.server.max_pending_requests_hard_limit", 2_000_000),
        ("grpc.so_reuseport", 0),
        # BDP probing pings the peer as data arrives, to size flow-control windows for bulk
        # transfers; 10k streams of small heartbeats gain nothing from it and pay a ping
        # round trip per burst (measured: -35% CPU on the bare floor at 10k streams).
        ("grpc.http2.bdp_probe", 0),
    ]


def _console_token_expiry(relay: Relay, token: str) -> float:
    """When an operator token pasted into the console's login expires; ValueError if it is
    refused (the same verification every Admin call makes)."""
    try:
        claims = relay.verifier.verify_operator_token(
            token, now=relay.now(), revocations=relay.revocations
        )
    except TokenError as err:
        raise ValueError(f"operator token refused: {err.message}; {err.hint}") from None
    return claims.expires_at


def _advertised(host: str, port: int, advertise: str | None) -> str:
    if advertise:
        return advertise
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - comparing, not binding
        host = socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(opts: ServeOptions) -> int:
    """Run the relay until SIGTERM/SIGINT; returns the exit code."""
    jsonlog.configure(level=opts.log_level)
    data_dir = opts.data_dir
    loose = ensure_private_dir(data_dir)
    if loose is not None:
        jsonlog.log("warning", "file.mode_tightened", path=str(data_dir), old_mode=f"{loose:04o}")
    host, port = parse_hostport(opts.listen)
    listen_shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    busy = _probe_bind(host, port)
    if busy is not None:
        raise _cannot_listen(listen_shown, "--listen", busy)
    metrics_token = load_metrics_token(opts.metrics_token_file) if opts.metrics_token_file else None
    soft, _hard = raise_nofile_limit()
    tls: TlsMaterial | None = None
    if not opts.insecure:
        if opts.tls_cert and opts.tls_key:
            tls = load_tls(opts.tls_cert, opts.tls_key, data_dir)
        else:
            tls = ensure_tls(data_dir, host)
    else:
        print(
            "WARNING: --insecure: the relay speaks plaintext gRPC. Tokens and commands "
            "cross the network in the clear. Use this for local experiments only.",
            file=sys.stderr,
            flush=True,
        )
        jsonlog.log("warning", "relay.insecure", detail="plaintext gRPC; never in production")
    tracing_mode = tracing.setup(opts.otlp_endpoint)
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

    config = RelayConfig(
        data_dir=data_dir,
        heartbeat_interval=opts.heartbeat_interval,
        stale_threshold=opts.stale_threshold,
        drain_grace=opts.drain_grace,
        fleet_tick_interval=opts.fleet_tick_interval,
        attest_limit_per_node=opts.attest_limit_per_node,
        attest_limit_per_source=opts.attest_limit_per_source,
        enroll_limit_per_source=opts.enroll_limit_per_source,
        refresh_limit_per_node=opts.refresh_limit_per_node,
        handshake_timeout=opts.handshake_timeout,
        max_unattested_per_source=opts.max_unattested_per_source,
    )
    relay = Relay(config, ca_der=tls.ca_der if tls else None)
    token_path = _ensure_admin_token(relay, data_dir)

    server = grpc.aio.server(
        options=_grpc_options(opts.handshake_timeout),
        maximum_concurrent_rpcs=None,
        interceptors=[StoreErrorInterceptor()],
    )
    server.add_generic_rpc_handlers((stream_handler(relay),))
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(EnrollmentService(relay), server)
    admin = AdminService(relay)
    admin_pb2_grpc.add_AdminServicer_to_server(admin, server)
    health_servicer = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    grpc_serving = False

    async def ready() -> str | None:
        if not grpc_serving:
            return "the gRPC server is not serving (starting or draining)"
        try:
            await relay.db.call(relay.store.is_tenant_deleted, "")
        except Exception as err:  # any failure means not ready; say which
            return f"the store does not answer: {err}"
        return None

    http_listener: HttpListener | None = None
    try:
        try:
            if tls is not None:
                creds = grpc.ssl_server_credentials([(tls.private_key, tls.cert_chain)])
                bound = server.add_secure_port(opts.listen, creds)
            else:
                bound = server.add_insecure_port(opts.listen)
        except RuntimeError:
            bound = 0
        if not bound:
            raise _cannot_listen(listen_shown, "--listen", _probe_bind(host, port))
        if opts.http_listen:
            h_host, h_port = parse_hostport(opts.http_listen)
            h_shown = f"[{h_host}]:{h_port}" if ":" in h_host else f"{h_host}:{h_port}"
            app = make_app(
                registry=relay.metrics.registry,
                ready=ready,
                admin=admin,
                check_token=lambda token: _console_token_expiry(relay, token),
                metrics_token=metrics_token,
            )
            try:
                http_listener = await HttpListener.bind(
                    app, h_host, h_port, ssl_context=server_ssl_context(tls) if tls else None
                )
            except OSError as err:
                raise _cannot_listen(h_shown, "--http-listen", err) from None
    except StartupError:
        relay.db.close()
        raise
    config.relay_endpoint = _advertised(host, bound, opts.advertise)

    await relay.start()
    if opts.fast_exit:
        # The CLI's process: what it loaded to start (modules, the fleet) lives as long as
        # the process, so keep it out of every full GC pass; and collect the young
        # generations less often. Measured at 10k daemons: a full collection walks the
        # 1 GB heap in 0.3-2.6 s, and a 10k-target fleet run triggered three of them.
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        _keep_freed_memory()
    await server.start()
    for name in ("", *SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    grpc_serving = True

    http_url = ""
    metrics_port = 0
    if http_listener is not None and opts.http_listen:
        h_host, _ = parse_hostport(opts.http_listen)
        await http_listener.start()
        metrics_port = http_listener.port
        shown = f"[{h_host}]" if ":" in h_host else h_host
        http_url = f"{'https' if tls else 'http'}://{shown}:{metrics_port}"
        if metrics_token is None and not _is_loopback(h_host):
            jsonlog.log(
                "warning",
                "metrics.unauthenticated",
                listen=f"{shown}:{metrics_port}",
                detail="/metrics names every tenant and is served without auth beyond "
                "loopback; pass --metrics-token-file (see docs/operator-guide.md)",
            )

    listen_shown = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
    info = {
        "version": 1,
        "pid": os.getpid(),
        "listen": listen_shown,
        "host": host,
        "port": bound,
        "tls": tls is not None,
        "http": http_url,
        "metrics": f"{http_url}/metrics" if http_url else "",
        "metrics_port": metrics_port,
        "ca_cert": str(tls.ca_path) if tls and tls.ca_path else "",
        "operator_token": str(token_path),
        "relay_endpoint": config.relay_endpoint,
        "data_dir": str(data_dir),
    }
    atomic_write(data_dir / RELAY_JSON, json.dumps(info, indent=2).encode() + b"\n", mode=0o644)
    print(f"aegis relay listening on {listen_shown} ({'TLS' if tls else 'PLAINTEXT'})")
    auth = " (bearer token)" if http_url and metrics_token else ""
    print(f"  http:           {http_url or 'off'}")
    print(f"  metrics:        {info['metrics'] or 'off'}{auth}")
    print(f"  CA certificate: {info['ca_cert'] or '-'}")
    print(f"  admin token:    {token_path}")
    print(f"  relay.json:     {data_dir / RELAY_JSON}", flush=True)
    jsonlog.log(
        "info",
        "relay.listening",
        listen=listen_shown,
        metrics=info["metrics"],
        http=http_url,
        tls=tls is not None,
        nofile=soft,
        tracing=tracing_mode,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    jsonlog.log("info", "relay.draining")
    if opts.fast_exit:
        # The process ends in seconds: no cyclic-GC passes over a 1 GB heap of 10k streams
        # while it drains (a full collection there costs ~1 s, and draining allocates).
        gc.disable()
    await health_servicer.enter_graceful_shutdown()
    grpc_serving = False
    # Stop listening first: open streams keep the grace to be drained, while the daemons
    # that reconnect early are refused by the kernel instead of costing a TLS handshake and
    # an aborted call each (with 10k daemons that made shutdown take tens of seconds).
    stopping = asyncio.ensure_future(server.stop(grace=opts.drain_grace + 2.0))
    await relay.drain()
    if opts.fast_exit:
        # Every stream has had its Drain and been ended by the relay (or cut at the end of
        # the grace). What server.stop() still waits for is grpc tearing down 10k finished
        # calls (measured: 10-20 s at 10k daemons) -- the process exit does that for free,
        # and every second here is a second the daemons wait for the next relay.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(stopping), timeout=1.0)
    else:
        await stopping
    if http_listener is not None:
        await http_listener.close()
    await relay.stop()
    with contextlib.suppress(FileNotFoundError):
        (data_dir / RELAY_JSON).unlink()
    if opts.fast_exit:
        # Everything is stored and every stream is closed. What is left is tearing down
        # the objects of 10k finished calls one by one (measured: ~20 s at 10k daemons),
        # which only delays a restart.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
