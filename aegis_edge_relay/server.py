"""Assembling and running the relay process: the parts, TLS, gRPC, /metrics, relay.json.

This is the one module that constructs the relay's parts and wires them together
(:class:`Relay`); each part receives what it uses and none of them imports this module.
In construction order, each built from the ones before it::

    store/ (StoreWorker) -> FleetView, IdentityService -> Dispatcher -> FleetRuns
        -> StreamHandler, EnrollmentService -> AdminService (admin/), Loops

plus one hook: the identity service tells the stream handler of each revocation, so the
node's live streams end (``identity.on_revoked(streams.cut_revoked)``).

``D/relay.json`` is written (atomically) once the relay listens, so scripts and tests that
start it with port 0 learn the ports it got::

    {"version": 1, "pid": 1234, "listen": "127.0.0.1:41235", "host": "127.0.0.1",
     "port": 41235, "tls": true, "metrics": "http://127.0.0.1:9464/metrics",
     "metrics_port": 9464, "ca_cert": "D/ca.pem", "operator_token": "D/operator.token",
     "relay_endpoint": "127.0.0.1:41235", "data_dir": "D"}
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Final

import attrs
import grpc
import prometheus_client
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer

from aegis_edge_core.handshake import (
    DEFAULT_HANDSHAKE_DEADLINE,
    DEFAULT_MAX_UNATTESTED_PER_SOURCE,
    HandshakeGuard,
    HandshakeLimits,
)
from aegis_edge_core.health import HealthTracker
from aegis_edge_core.identity import NODE_TOKEN_TTL
from aegis_edge_core.ratelimit import (
    ATTEST_PER_NODE,
    ATTEST_PER_SOURCE,
    ENROLL_PER_SOURCE,
    REFRESH_PER_NODE,
    AttemptLimits,
    KeyedLimiter,
    Limit,
)
from aegis_edge_core.session import MAX_MESSAGE_BYTES
from aegis_edge_core.wire import admin_pb2_grpc, enrollment_pb2_grpc, stream_pb2
from aegis_edge_relay import jsonlog, tracing
from aegis_edge_relay.admin import AdminService
from aegis_edge_relay.cluster import ClusterView
from aegis_edge_relay.dispatcher import Dispatcher
from aegis_edge_relay.durations import parse_hostport
from aegis_edge_relay.enrollment import EnrollmentService
from aegis_edge_relay.files import atomic_write, ensure_private_dir
from aegis_edge_relay.fleetview import FleetView
from aegis_edge_relay.identity import IdentityService, load_or_create_signing_key
from aegis_edge_relay.loops import Loops
from aegis_edge_relay.metrics import RelayMetrics
from aegis_edge_relay.runs import FleetRuns
from aegis_edge_relay.startup import (
    GC_THRESHOLDS,
    StartupError,
    StoreErrorInterceptor,
    _advertised,
    _cannot_listen,
    _grpc_options,
    _is_loopback,
    _keep_freed_memory,
    _probe_bind,
    ensure_admin_token,
    issue_operator_token,
    load_metrics_token,
    raise_nofile_limit,
)
from aegis_edge_relay.store import StoreWorker, open_store
from aegis_edge_relay.streams import StreamHandler, StreamSettings
from aegis_edge_relay.tls import TlsMaterial, ensure_tls, load_tls

__all__ = [
    "Relay",
    "RelayConfig",
    "ServeOptions",
    "StartupError",
    "_grpc_options",
    "_is_loopback",
    "issue_operator_token",
    "load_metrics_token",
    "raise_nofile_limit",
    "serve",
]

RELAY_JSON: Final = "relay.json"
COARSE_HEARTBEAT_FLUSH: Final = 300.0
"""On a shared store, how often heartbeats noted in memory are written: one row write per
idle daemon per five minutes, DESIGN.md's budget (measured: no other per-daemon write while
a daemon is idle; the leases cost each relay one write per renewal, whatever its fleet)."""

SERVICES: Final = (
    "aegis.edge.v1.EdgeStream",
    "aegis.edge.v1.Enrollment",
    "aegis.edge.v1.Admin",
)


@attrs.frozen(kw_only=True)
class ServeOptions:
    data_dir: Path
    listen: str
    store_url: str | None = None
    """``--store``/``AEGIS_STORE_URL``: None is SQLite in the data dir."""
    metrics_listen: str | None = "127.0.0.1:9464"
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


@attrs.define(kw_only=True)
class RelayConfig:
    data_dir: Path
    store_url: str | None = None
    """``--store``: None is SQLite in the data dir (see ``store.open_store``)."""
    heartbeat_interval: float = 30.0
    stale_threshold: float = 90.0
    node_token_ttl: float = NODE_TOKEN_TTL
    max_concurrent_commands: int = 16
    heartbeat_flush_interval: float = 2.0
    drain_grace: float = 5.0
    fleet_tick_interval: float = 0.1
    """How often fleet runs' deadlines and cancel graces are checked. Tests stretch it to
    make a daemon's kill at the deadline land before the relay's own tick."""
    max_message_bytes: int = MAX_MESSAGE_BYTES
    attest_limit_per_node: Limit | None = ATTEST_PER_NODE
    attest_limit_per_source: Limit | None = ATTEST_PER_SOURCE
    enroll_limit_per_source: Limit | None = ENROLL_PER_SOURCE
    refresh_limit_per_node: Limit | None = REFRESH_PER_NODE
    """Attempt rate limits (``None``: off); see :mod:`aegis_edge_core.ratelimit`."""
    handshake_timeout: float = DEFAULT_HANDSHAKE_DEADLINE
    max_unattested_per_source: int | None = DEFAULT_MAX_UNATTESTED_PER_SOURCE
    """Bounds on streams that have not attested yet; see :mod:`aegis_edge_core.handshake`."""


def stream_handler(streams: StreamHandler) -> grpc.GenericRpcHandler[Any, Any]:
    """``aegis.edge.v1.EdgeStream/Connect`` with raw request bytes: every frame reaches the
    core session, so garbage becomes a counted protocol error closing that one stream
    instead of a deserialization failure inside gRPC."""
    handler = grpc.stream_stream_rpc_method_handler(
        streams.connect,
        request_deserializer=None,
        response_serializer=stream_pb2.RelayMessage.SerializeToString,
    )
    return grpc.method_handlers_generic_handler("aegis.edge.v1.EdgeStream", {"Connect": handler})


def _limiter(limit: Limit | None) -> KeyedLimiter | None:
    return KeyedLimiter(limit) if limit is not None else None


class Relay:
    """The relay's parts, wired; one per process (or per test)."""

    def __init__(self, config: RelayConfig, *, ca_der: bytes | None = None) -> None:
        clock = time.time
        signing_key = load_or_create_signing_key(config.data_dir)
        self.metrics = metrics = RelayMetrics()
        self.db = db = StoreWorker(open_store(config.store_url, config.data_dir))
        shared = db.store.shared
        self.cluster = cluster = ClusterView(
            relay_id=signing_key.kid,
            db=db,
            clock=clock,
            stale_threshold=config.stale_threshold,
            shared=shared,
        )

        health = HealthTracker(
            stale_threshold_secs=config.stale_threshold,
            heartbeat_interval_secs=config.heartbeat_interval,
        )
        self.fleet = fleet = FleetView(
            health=health, metrics=metrics, db=db, clock=clock, cluster=cluster
        )
        self.identity = identity = IdentityService(
            signing_key=signing_key,
            ca_der=ca_der,
            nodes=fleet.nodes,
            db=db,
            clock=clock,
            node_token_ttl=config.node_token_ttl,
            refresh_limit=config.refresh_limit_per_node,
        )
        self.dispatcher = dispatcher = Dispatcher(fleet=fleet, db=db, metrics=metrics, clock=clock)
        self.runs = runs = FleetRuns(
            dispatcher=dispatcher, fleet=fleet, db=db, metrics=metrics, clock=clock
        )
        self.streams = streams = StreamHandler(
            settings=StreamSettings(
                heartbeat_interval=config.heartbeat_interval,
                stale_threshold=config.stale_threshold,
                max_concurrent_commands=config.max_concurrent_commands,
                max_message_bytes=config.max_message_bytes,
                drain_grace=config.drain_grace,
            ),
            fleet=fleet,
            identity=identity,
            dispatcher=dispatcher,
            db=db,
            metrics=metrics,
            attest_limits=AttemptLimits(
                per_source=_limiter(config.attest_limit_per_source),
                per_node=_limiter(config.attest_limit_per_node),
            ),
            handshakes=HandshakeGuard(
                HandshakeLimits(
                    deadline_secs=config.handshake_timeout,
                    max_unattested_per_source=config.max_unattested_per_source,
                )
            ),
        )
        identity.on_revoked(streams.cut_revoked)
        self.enrollment = EnrollmentService(
            identity=identity,
            fleet=fleet,
            db=db,
            metrics=metrics,
            limits=AttemptLimits(per_source=_limiter(config.enroll_limit_per_source)),
            heartbeat_interval=config.heartbeat_interval,
        )
        self.admin = AdminService(fleet=fleet, identity=identity, runs=runs, db=db)
        self.loops = Loops(
            fleet=fleet,
            identity=identity,
            streams=streams,
            runs=runs,
            dispatcher=dispatcher,
            stale_threshold=config.stale_threshold,
            # Shared: heartbeats stay in memory (the holder answers for its nodes) and reach
            # the store coarsely, so an idle daemon costs one row write per few minutes.
            heartbeat_flush_interval=max(config.heartbeat_flush_interval, COARSE_HEARTBEAT_FLUSH)
            if shared
            else config.heartbeat_flush_interval,
            fleet_tick_interval=config.fleet_tick_interval,
        )

    async def start(self) -> None:
        db = self.db
        records = await db.call(db.store.load_nodes)
        await self.identity.load()
        self.fleet.load(records)
        await self.cluster.start()
        await self.dispatcher.recover()
        await self.runs.recover()
        self.loops.start()
        jsonlog.log("info", "relay.started", daemons=len(self.fleet.nodes))

    async def drain(self) -> None:
        if self.cluster.shared:
            await self.runs.hand_over()  # before the streams go: another relay resumes them
        await self.streams.drain()

    async def stop(self) -> None:
        await self.runs.cancel_all("relay shutting down")
        await self.loops.stop()
        await self.dispatcher.stop()
        await self.cluster.stop()
        await self.fleet.flush_heartbeats()
        self.fleet.account_stream_seconds(self.fleet.now())
        self.db.close()
        jsonlog.log("info", "relay.stopped")


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
        store_url=opts.store_url,
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
    token_path = ensure_admin_token(relay.identity.verifier, data_dir, time.time())

    server = grpc.aio.server(
        options=_grpc_options(opts.handshake_timeout),
        maximum_concurrent_rpcs=None,
        interceptors=[StoreErrorInterceptor()],
    )
    server.add_generic_rpc_handlers((stream_handler(relay.streams),))
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(relay.enrollment, server)
    admin_pb2_grpc.add_AdminServicer_to_server(relay.admin, server)
    health_servicer = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    metrics_listener = None
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
        if opts.metrics_listen:
            m_host, m_port = parse_hostport(opts.metrics_listen)
            m_shown = f"[{m_host}]:{m_port}" if ":" in m_host else f"{m_host}:{m_port}"
            try:
                metrics_listener = relay.metrics.bind(m_host, m_port, token=metrics_token)
            except OSError as err:
                raise _cannot_listen(m_shown, "--metrics-listen", err) from None
    except StartupError:
        relay.db.close()
        raise
    relay.identity.relay_endpoint = _advertised(host, bound, opts.advertise)
    relay.cluster.endpoint = relay.identity.relay_endpoint

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

    metrics_url = ""
    metrics_port = 0
    if metrics_listener is not None and opts.metrics_listen:
        m_host, _ = parse_hostport(opts.metrics_listen)
        metrics_listener.start()
        metrics_port = metrics_listener.port
        shown = f"[{m_host}]" if ":" in m_host else m_host
        metrics_url = f"http://{shown}:{metrics_port}/metrics"
        if metrics_token is None and not _is_loopback(m_host):
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
        "metrics": metrics_url,
        "metrics_port": metrics_port,
        "ca_cert": str(tls.ca_path) if tls and tls.ca_path else "",
        "operator_token": str(token_path),
        "relay_endpoint": relay.identity.relay_endpoint,
        "data_dir": str(data_dir),
    }
    atomic_write(data_dir / RELAY_JSON, json.dumps(info, indent=2).encode() + b"\n", mode=0o644)
    print(f"aegis relay listening on {listen_shown} ({'TLS' if tls else 'PLAINTEXT'})")
    auth = " (bearer token)" if metrics_url and metrics_token else ""
    print(f"  metrics:        {metrics_url or 'off'}{auth}")
    print(f"  CA certificate: {info['ca_cert'] or '-'}")
    print(f"  admin token:    {token_path}")
    print(f"  relay.json:     {data_dir / RELAY_JSON}", flush=True)
    jsonlog.log(
        "info",
        "relay.listening",
        listen=listen_shown,
        metrics=metrics_url,
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
