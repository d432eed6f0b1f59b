"""Running the relay process: TLS, the gRPC server (``grpcserver``), the relay's wired
parts (``wiring.Relay``), HTTP, relay.json, the signals and the drain at the end.

No part of the relay imports this module or ``wiring``. The HTTP server
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
from typing import Final

import attrs
import prometheus_client

from aegis_edge_core.drain import DEFAULT_ATTEST_RATE
from aegis_edge_core.handshake import (
    DEFAULT_HANDSHAKE_DEADLINE,
    DEFAULT_MAX_UNATTESTED_PER_SOURCE,
    FEATURES,
)
from aegis_edge_core.identity import TokenError
from aegis_edge_core.ratelimit import (
    ATTEST_PER_NODE,
    ATTEST_PER_SOURCE,
    ENROLL_PER_SOURCE,
    REFRESH_PER_NODE,
    Limit,
)
from aegis_edge_relay import jsonlog, tracing
from aegis_edge_relay.drainer import write_bound
from aegis_edge_relay.durations import parse_hostport
from aegis_edge_relay.files import atomic_write, ensure_private_dir
from aegis_edge_relay.grpcserver import add_services, bind, grpc_server, serving
from aegis_edge_relay.http import HttpListener, make_app, server_ssl_context
from aegis_edge_relay.identity import IdentityService
from aegis_edge_relay.membership import check_cluster_store, write_cluster_json
from aegis_edge_relay.startup import (
    GC_THRESHOLDS,
    HAND_OVER_SIGNAL,
    TAKE_OVER_SLACK,
    StartupError,
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
from aegis_edge_relay.tls import TlsMaterial, ensure_tls, load_tls
from aegis_edge_relay.wiring import Relay, RelayConfig

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


async def _until_signalled() -> bool:
    """Wait for SIGTERM/SIGINT or the hand-over signal; returns whether it was the hand-over
    (a successor is taking over this data dir)."""
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
    return successor


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

    server = grpc_server(opts.handshake_timeout)
    # Bound (listening) before the store opens: when taking over, connections that arrive
    # from here on wait in this socket's backlog, not on a refused port, while the running
    # relay drains and closes the store; they are served as soon as this relay starts.
    bound = bind(server, listen, tls)
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

    health_servicer = add_services(
        server, streams=relay.streams, enrollment=relay.enrollment, admin=relay.admin
    )
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
    await serving(health_servicer)
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

    successor = await _until_signalled()
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
