"""Assembling and running the relay process: the parts, TLS, gRPC, HTTP, relay.json.

This is the one module that constructs the relay's parts and wires them together
(:class:`Relay`); each part receives what it uses and none of them imports this module.
In construction order, each built from the ones before it::

    store/ (StoreWorker) -> FleetView, IdentityService -> Dispatcher -> FleetRuns
        -> StreamHandler, EnrollmentService -> AdminService (admin/), Loops

plus one hook: the identity service tells the stream handler of each revocation, so the
node's live streams end (``identity.on_revoked(streams.cut_revoked)``). The HTTP server
(:mod:`.http`: /metrics, /healthz, /readyz, /api/v1, the console) is handed the same
``AdminService`` object the gRPC server calls, the metrics registry and a readiness probe.

``D/relay.json`` is written (atomically) once the relay listens, so scripts and tests that
start it with port 0 learn the ports it got::

    {"version": 1, "pid": 1234, "listen": "127.0.0.1:41235", "host": "127.0.0.1",
     "port": 41235, "tls": true, "http": "https://127.0.0.1:9464",
     "metrics": "https://127.0.0.1:9464/metrics", "metrics_port": 9464, "ca_cert": "D/ca.pem",
     "operator_token": "D/operator.token", "relay_endpoint": "127.0.0.1:41235", "data_dir": "D",
     "relay_id": "<kid of the signing key>", "cluster": ""}
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

from aegis_edge_core.drain import DEFAULT_ATTEST_RATE
from aegis_edge_core.handshake import (
    DEFAULT_HANDSHAKE_DEADLINE,
    DEFAULT_MAX_UNATTESTED_PER_SOURCE,
    FEATURES,
    HandshakeGuard,
    HandshakeLimits,
)
from aegis_edge_core.health import HealthTracker
from aegis_edge_core.identity import NODE_TOKEN_TTL, TokenError
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
from aegis_edge_relay.drainer import write_bound
from aegis_edge_relay.durations import parse_hostport
from aegis_edge_relay.enrollment import EnrollmentService
from aegis_edge_relay.files import atomic_write, ensure_private_dir
from aegis_edge_relay.fleetview import FleetView
from aegis_edge_relay.http import HttpListener, make_app, server_ssl_context
from aegis_edge_relay.identity import IdentityService, load_or_create_signing_key
from aegis_edge_relay.loops import Loops
from aegis_edge_relay.membership import check_cluster_store, join_cluster, write_cluster_json
from aegis_edge_relay.metrics import RelayMetrics
from aegis_edge_relay.routing import Router
from aegis_edge_relay.runs import FleetRuns
from aegis_edge_relay.startup import (
    GC_THRESHOLDS,
    HAND_OVER_SIGNAL,
    TAKE_OVER_SLACK,
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
    running_relay,
    take_over,
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
    http_listen: str | None = "127.0.0.1:9464"
    """The HTTP server: /metrics, /healthz, /readyz, /api/v1, the console (``None``: off)."""
    heartbeat_interval: float = 30.0
    stale_threshold: float = 90.0
    insecure: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    advertise: str | None = None
    drain_grace: float = 5.0
    drain_rate: float = DEFAULT_ATTEST_RATE
    """``--drain-rate``: attestations per second the relay that takes the fleet back
    manages; a drain spreads the daemons' returns over it."""
    take_over: bool = False
    """``--take-over``: listen beside the relay running on this data dir, stop it, and
    serve once it has closed its store (see docs/operator-guide.md)."""
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
    cluster: str = ""
    """``--cluster NAME``: serve in that cluster (PostgreSQL store, shared CA)."""
    protocol_features: frozenset[str] = FEATURES
    """The optional stream features this relay uses when a daemon offers them."""


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
    drain_rate: float = DEFAULT_ATTEST_RATE
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
    cluster: str = ""
    """The cluster this relay joins at start (``membership``); empty for a single relay."""
    protocol_features: frozenset[str] = FEATURES


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
        self._cluster = config.cluster
        self._ca_der = ca_der
        self.metrics = metrics = RelayMetrics()
        self.db = db = StoreWorker(open_store(config.store_url, config.data_dir))
        shared = db.store.shared
        self.cluster = cluster = ClusterView(
            relay_id=signing_key.kid,
            db=db,
            clock=clock,
            stale_threshold=config.stale_threshold,
            shared=shared,
            metrics=metrics,
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
        self.router = router = Router(dispatcher)
        self.runs = runs = FleetRuns(
            dispatcher=dispatcher,
            router=router,
            fleet=fleet,
            db=db,
            metrics=metrics,
            clock=clock,
            drain_rate=config.drain_rate,
        )
        self.streams = streams = StreamHandler(
            settings=StreamSettings(
                heartbeat_interval=config.heartbeat_interval,
                stale_threshold=config.stale_threshold,
                max_concurrent_commands=config.max_concurrent_commands,
                max_message_bytes=config.max_message_bytes,
                drain_grace=config.drain_grace,
                drain_rate=config.drain_rate,
                features=config.protocol_features,
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
            router=router,
            stale_threshold=config.stale_threshold,
            # Shared: heartbeats stay in memory (the holder answers for its nodes) and reach
            # the store coarsely, so an idle daemon costs one row write per few minutes.
            # Alone: the store lags memory by at most one heartbeat interval (its value is
            # read only after a crash, as "last seen"), one transaction per interval rather
            # than one per 2 s: at 30 s, ~10% of a steady relay's samples went to the commits.
            heartbeat_flush_interval=max(config.heartbeat_flush_interval, COARSE_HEARTBEAT_FLUSH)
            if shared
            else max(config.heartbeat_flush_interval, config.heartbeat_interval),
            fleet_tick_interval=config.fleet_tick_interval,
        )

    async def start(self) -> None:
        db = self.db
        records = await db.call(db.store.load_nodes)
        if self._cluster:
            if self._ca_der is None:
                raise StartupError(f"--cluster {self._cluster}: a cluster needs TLS (its CA)")
            await join_cluster(db, self._cluster, self._ca_der, time.time())
            self.identity.cluster = self._cluster
        await self.identity.load()
        await self.identity.publish_endpoint()
        self.fleet.load(records)
        # what other relays changed between the load and the cluster's first (full) read
        for node, reason in self.fleet.merge(await self.cluster.start()):
            self.identity.revoked_elsewhere(node, reason)
        await self.dispatcher.recover()
        await self.runs.recover()
        self.loops.start()
        jsonlog.log("info", "relay.started", daemons=len(self.fleet.nodes))

    @property
    def relay_id(self) -> str:
        """This relay's id in a cluster: its signing key's ``kid``."""
        return self.identity.relay_id

    async def drain(self, *, hand_over: bool = False) -> None:
        """Drain every daemon stream. On a shared store, or with ``hand_over`` (a successor
        takes over this data dir), the fleet runs are left to the next relay first instead
        of being cancelled at :meth:`stop`."""
        if hand_over:
            self.dispatcher.handing_over = True  # what runs now ends at the successor
        if self.cluster.shared or hand_over:
            await self.runs.hand_over()  # before the streams go: another relay resumes them
        if self.cluster.shared:
            # The live relays as of now: each Drain names one of them to go to.
            with contextlib.suppress(Exception):
                await self.cluster.sync()
        await self.streams.drain()

    async def stop(self) -> None:
        self.db.stopping()  # a store down now costs seconds, not minutes per write
        await self.runs.cancel_all("relay shutting down")
        await self.loops.stop()
        await self.dispatcher.stop()
        await self.cluster.stop()
        await self.fleet.flush_heartbeats()
        self.fleet.account_stream_seconds(self.fleet.now())
        self.db.close()
        jsonlog.log("info", "relay.store_closed")


def _console_token_expiry(identity: IdentityService, token: str) -> float:
    """When an operator token pasted into the console's login expires; ValueError if it is
    refused (the same verification every Admin call makes)."""
    try:
        claims = identity.verifier.verify_operator_token(
            token, now=identity.now(), revocations=identity.revocations
        )
    except TokenError as err:
        raise ValueError(f"operator token refused: {err.message}; {err.hint}") from None
    return claims.expires_at


async def serve(opts: ServeOptions) -> int:
    """Run the relay until SIGTERM/SIGINT; returns the exit code."""
    jsonlog.configure(level=opts.log_level)
    data_dir = opts.data_dir
    loose = ensure_private_dir(data_dir)
    if loose is not None:
        jsonlog.log("warning", "file.mode_tightened", path=str(data_dir), old_mode=f"{loose:04o}")
    if opts.cluster:
        check_cluster_store(opts.cluster, opts.store_url)
        if opts.insecure:
            raise StartupError(f"--cluster {opts.cluster}: a cluster needs TLS, not --insecure")
    host, port = parse_hostport(opts.listen)
    old = running_relay(data_dir) if opts.take_over else None
    if old is not None and port == 0:
        port = old.port  # taking over: the port the daemons know
    if old is not None and port != old.port:
        raise StartupError(
            f"--take-over: the running relay (pid {old.pid}) listens on port {old.port}, not "
            f"{port}; its daemons dial that port: pass the same --listen"
        )
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    listen_shown = listen
    # Taking over, the running relay holds the port: bind beside it (SO_REUSEPORT, which
    # every relay sets), not instead of it. Otherwise a busy port is an error.
    busy = _probe_bind(host, port, share=old is not None)
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

    server = grpc.aio.server(
        options=_grpc_options(opts.handshake_timeout),
        maximum_concurrent_rpcs=None,
        interceptors=[StoreErrorInterceptor()],
    )
    # Bound (listening) before the store opens: when taking over, connections that arrive
    # from here on wait in this socket's backlog, not on a refused port, while the running
    # relay drains and closes the store; they are served as soon as this relay starts.
    try:
        if tls is not None:
            creds = grpc.ssl_server_credentials([(tls.private_key, tls.cert_chain)])
            bound = server.add_secure_port(listen, creds)
        else:
            bound = server.add_insecure_port(listen)
    except RuntimeError:
        bound = 0
    if not bound:
        raise _cannot_listen(listen_shown, "--listen", _probe_bind(host, port, share=bool(old)))
    if old is not None:
        waited = await take_over(old, data_dir, timeout=opts.drain_grace + TAKE_OVER_SLACK)
        jsonlog.log("info", "relay.took_over", pid=old.pid, port=bound, seconds=round(waited, 3))

    config = RelayConfig(
        data_dir=data_dir,
        store_url=opts.store_url,
        heartbeat_interval=opts.heartbeat_interval,
        stale_threshold=opts.stale_threshold,
        drain_grace=opts.drain_grace,
        drain_rate=opts.drain_rate,
        fleet_tick_interval=opts.fleet_tick_interval,
        attest_limit_per_node=opts.attest_limit_per_node,
        attest_limit_per_source=opts.attest_limit_per_source,
        enroll_limit_per_source=opts.enroll_limit_per_source,
        refresh_limit_per_node=opts.refresh_limit_per_node,
        handshake_timeout=opts.handshake_timeout,
        max_unattested_per_source=opts.max_unattested_per_source,
        cluster=opts.cluster,
        protocol_features=opts.protocol_features,
    )
    relay = Relay(config, ca_der=tls.ca_der if tls else None)
    token_path = ensure_admin_token(relay.identity.verifier, data_dir, time.time())

    server.add_generic_rpc_handlers((stream_handler(relay.streams),))
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(relay.enrollment, server)
    admin_pb2_grpc.add_AdminServicer_to_server(relay.admin, server)
    health_servicer = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    grpc_serving = False

    async def ready() -> str | None:
        if not grpc_serving:
            return "the gRPC server is not serving (starting or draining)"
        try:
            await relay.db.call(relay.db.store.is_tenant_deleted, "")
        except Exception as err:  # any failure means not ready; say which
            return f"the store does not answer: {err}"
        return None

    http_listener: HttpListener | None = None
    try:
        if opts.http_listen:
            h_host, h_port = parse_hostport(opts.http_listen)
            h_shown = f"[{h_host}]:{h_port}" if ":" in h_host else f"{h_host}:{h_port}"
            app = make_app(
                registry=relay.metrics.registry,
                ready=ready,
                admin=relay.admin,
                check_token=lambda token: _console_token_expiry(relay.identity, token),
                db=relay.db,
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
    relay.identity.relay_endpoint = _advertised(host, bound, opts.advertise)
    relay.cluster.endpoint = relay.identity.relay_endpoint

    try:
        await relay.start()
    except StartupError:
        relay.db.close()
        raise
    if opts.cluster and opts.store_url:
        write_cluster_json(data_dir, opts.cluster, opts.store_url)
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
        "relay_endpoint": relay.identity.relay_endpoint,
        "data_dir": str(data_dir),
        "relay_id": relay.relay_id,
        "cluster": opts.cluster,
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
    successor = False

    def hand_over() -> None:
        nonlocal successor
        successor = True
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(HAND_OVER_SIGNAL, hand_over)
    await stop.wait()

    jsonlog.log("info", "relay.draining", hand_over=successor)
    if opts.fast_exit:
        # The process ends in seconds: no cyclic-GC passes over a 1 GB heap of 10k streams
        # while it drains (a full collection there costs ~1 s, and draining allocates).
        gc.disable()
    await health_servicer.enter_graceful_shutdown()
    grpc_serving = False
    # Stop listening first: open streams keep the grace to be drained, while the daemons
    # that reconnect early are refused by the kernel instead of costing a TLS handshake and
    # an aborted call each (with 10k daemons that made shutdown take tens of seconds).
    # The CLI leaves as soon as the Drains are written (below), so gRPC may not cut them
    # first; an embedder keeps gRPC's bound on its other calls (admin streams) short.
    grace = write_bound(opts.drain_grace) if opts.fast_exit else opts.drain_grace
    stopping = asyncio.ensure_future(server.stop(grace=grace + 2.0))
    await relay.drain(hand_over=successor)
    # No stream touches the store any more (the rest only write their queued Drain): close
    # it and hand the data dir over now, so a successor opens it while the Drains go out
    # (at 10k streams writing them is seconds the daemons would otherwise wait).
    try:
        if http_listener is not None:
            await http_listener.close()
        await relay.stop()
        with contextlib.suppress(FileNotFoundError):
            (data_dir / RELAY_JSON).unlink()
    finally:
        await relay.streams.drained()  # the Drains held for the close go out either way
    if opts.fast_exit:
        # Every stream has had its Drain and been ended by the relay (or cut at the end of
        # the grace). What server.stop() still waits for is grpc tearing down 10k finished
        # calls (measured: 10-20 s at 10k daemons) -- the process exit does that for free,
        # and every second here is a second the daemons wait for the next relay.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(stopping), timeout=1.0)
    else:
        await stopping
    jsonlog.log("info", "relay.stopped")
    if opts.fast_exit:
        # Everything is stored and every stream is closed. What is left is tearing down
        # the objects of 10k finished calls one by one (measured: ~20 s at 10k daemons),
        # which only delays a restart.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
