"""``aegis relay serve`` and ``aegis relay operator-token``; operator commands come from
:mod:`aegis_edge_relay.operator`."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import time
from pathlib import Path

from aegis_edge_cli import CliError, CommandTree
from aegis_edge_core.authz import AuthzError, parse_role
from aegis_edge_core.drain import DEFAULT_ATTEST_RATE
from aegis_edge_core.errors import AegisError, ConfigError
from aegis_edge_core.handshake import (
    DEFAULT_HANDSHAKE_DEADLINE,
    DEFAULT_MAX_UNATTESTED_PER_SOURCE,
    FEATURES,
)
from aegis_edge_core.identity.tokens import check_tenant_id
from aegis_edge_core.ratelimit import (
    DEFAULT_ATTEST_PER_NODE,
    DEFAULT_ATTEST_PER_SOURCE,
    DEFAULT_ENROLL_PER_SOURCE,
    DEFAULT_REFRESH_PER_NODE,
    Limit,
)
from aegis_edge_relay.durations import parse_duration, parse_hostport

__all__ = ["register"]


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _limit(text: str) -> Limit | None:
    try:
        return Limit.parse(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _cap(text: str) -> int | None:
    if text.strip().lower() == "off":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of at least 1, or off")
    return value


def _positive_duration(text: str) -> float:
    value = _duration(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be longer than 0s, e.g. 10s")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of attestations per second, e.g. 400")
    return value


def _hostport(text: str) -> str:
    try:
        parse_hostport(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _features(text: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in text.split(",") if n.strip() and n.strip() != "none")
    unknown = names - FEATURES
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown feature(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(FEATURES))}"
        )
    return names


def cmd_serve(args: argparse.Namespace) -> int:
    from aegis_edge_relay.server import ServeOptions, StartupError, serve

    if args.stale_threshold <= args.heartbeat_interval:
        raise CliError(
            f"--stale-threshold ({args.stale_threshold}s) must exceed --heartbeat-interval "
            f"({args.heartbeat_interval}s); the default is 3x the interval"
        )
    if bool(args.tls_cert) != bool(args.tls_key):
        raise CliError("--tls-cert and --tls-key go together")
    data_dir = Path(args.data_dir).expanduser()
    cluster, store_url = args.cluster, args.store or None
    try:
        if args.join_bundle:
            cluster, store_url = _joined(args, data_dir)
    except StartupError as err:
        raise CliError(str(err)) from None
    opts = ServeOptions(
        data_dir=data_dir,
        listen=args.listen,
        store_url=store_url,
        cluster=cluster,
        http_listen=None if args.http_listen in ("", "off") else args.http_listen,
        heartbeat_interval=args.heartbeat_interval,
        stale_threshold=args.stale_threshold,
        insecure=args.insecure,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        advertise=args.advertise,
        drain_grace=args.drain_grace,
        drain_rate=args.drain_rate,
        take_over=args.take_over,
        fleet_tick_interval=args.fleet_tick_interval,
        otlp_endpoint=args.otlp_endpoint,
        log_level=args.log_level,
        fast_exit=True,
        attest_limit_per_node=args.attest_limit_per_node,
        attest_limit_per_source=args.attest_limit_per_source,
        enroll_limit_per_source=args.enroll_limit_per_source,
        refresh_limit_per_node=args.refresh_limit_per_node,
        handshake_timeout=args.handshake_timeout,
        max_unattested_per_source=args.max_unattested_per_source,
        metrics_token_file=Path(args.metrics_token_file) if args.metrics_token_file else None,
        protocol_features=args.protocol_features,
    )
    try:
        return asyncio.run(serve(opts))
    except StartupError as err:
        raise CliError(str(err)) from None
    except OSError as err:
        raise CliError(f"relay could not start: {err}") from None


def _joined(args: argparse.Namespace, data_dir: Path) -> tuple[str, str]:
    """The cluster and store of ``--join-bundle``, its CA installed in ``data_dir``;
    ``--store`` (with the password the bundle leaves out) wins over the bundle's URL."""
    from aegis_edge_relay.files import ensure_private_dir
    from aegis_edge_relay.membership import install_bundle, read_join_bundle

    bundle = read_join_bundle(Path(args.join_bundle).expanduser())
    if args.cluster and args.cluster != bundle.cluster:
        raise CliError(
            f"--cluster {args.cluster} but the join bundle is for cluster {bundle.cluster!r}"
        )
    if args.tls_cert:
        raise CliError("--join-bundle and --tls-cert exclude each other: the cluster CA signs")
    ensure_private_dir(data_dir)
    install_bundle(bundle, data_dir)
    return bundle.cluster, args.store or bundle.store


def cmd_join_bundle(args: argparse.Namespace) -> int:
    """Write what a second relay needs to join this relay's cluster (holds the CA key)."""
    from aegis_edge_relay.membership import write_join_bundle
    from aegis_edge_relay.startup import StartupError

    data_dir = Path(args.data_dir).expanduser()
    out = Path(args.out).expanduser() if args.out else data_dir / "join-bundle.json"
    try:
        bundle = write_join_bundle(data_dir, out)
    except StartupError as err:
        raise CliError(str(err)) from None
    print(f"wrote {out} (0600) for cluster {bundle.cluster!r}: it holds the cluster CA key;")
    print(f"  copy it to the new relay, then: aegis relay serve --join-bundle {out.name} ...")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Bring the store's schema to this version's (the relay also does at start)."""
    from aegis_edge_relay.store import open_store, redact_url

    if not args.store:
        raise CliError(
            "relay migrate needs --store (or AEGIS_STORE_URL)",
            hint="e.g. --store postgresql://aegis@db.example:5432/aegis; the SQLite store "
            "migrates itself when the relay starts",
        )
    store = open_store(args.store, Path("."))
    try:
        before, after = store.schema_migrated
    finally:
        store.close()
    where = redact_url(args.store)
    if before == after:
        print(f"{where}: schema already at version {after}, nothing to do")
    else:
        print(f"{where}: schema migrated from version {before} to {after}")
    return 0


def _store_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        metavar="URL",
        default=os.environ.get("AEGIS_STORE_URL", ""),
        help="postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE to keep the relay's state in "
        "PostgreSQL (default: $AEGIS_STORE_URL, else SQLite in the data dir)",
    )


def cmd_operator_token(args: argparse.Namespace) -> int:
    from aegis_edge_relay.server import issue_operator_token

    data_dir = Path(args.data_dir).expanduser()
    if not (data_dir / "relay-signing.key").exists():
        raise CliError(
            f"{data_dir}: no relay signing key; start the relay once with this --data-dir"
        )
    try:
        role = parse_role(args.role)
    except AuthzError as err:
        raise CliError(str(err)) from None
    tenants = None if args.tenant == ["*"] else args.tenant
    for tenant in tenants or ():
        try:
            check_tenant_id(tenant)
        except AegisError as err:
            raise CliError(f"--tenant: {err.message}", hint=err.hint) from None
    token, _expires = issue_operator_token(
        data_dir,
        subject=args.subject or f"operator:{','.join(args.tenant)}",
        role=role.label,
        tenants=tenants,
        ttl=args.ttl,
    )
    print(token)
    return 0


def _ready_problem(data_dir: Path) -> tuple[str | None, str]:
    """``(None, address)`` once the relay of ``data_dir`` answers health checks; else
    ``(what is missing, address or "")``."""
    import json

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        info = json.loads((data_dir / "relay.json").read_text())
    except FileNotFoundError:
        return f"{data_dir / 'relay.json'} is not written yet", ""
    except (OSError, ValueError) as err:
        return f"{data_dir / 'relay.json'} is unreadable ({err})", ""
    pid = info.get("pid")
    if isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"relay.json names pid {pid}, which is not running (a stale file)", ""
        except PermissionError:
            pass
    host, port = str(info.get("host", "")), info.get("port")
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 -- a bind-all address, not a bind
        host = "127.0.0.1"
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if info.get("tls") is False:
        channel = grpc.insecure_channel(address)
    else:
        try:
            ca = Path(info["ca_cert"]).read_bytes()
        except (KeyError, OSError) as err:
            return f"the relay's CA certificate is unreadable ({err})", address
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca))
    with channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2.0
            )
        except grpc.RpcError as err:
            return f"{address} does not answer health checks yet ({err.code().name})", address
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{address} is not serving yet", address
    return None, address


def cmd_wait(args: argparse.Namespace) -> int:
    """Return once ``aegis relay serve --data-dir D`` (started in the background) serves."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    data_dir = Path(args.data_dir).expanduser()
    deadline = time.monotonic() + args.timeout
    while True:
        problem, address = _ready_problem(data_dir)
        if problem is None:
            print(f"relay ready at {address}")
            return 0
        if time.monotonic() >= deadline:
            raise CliError(
                f"the relay in {data_dir} is not ready after {args.timeout:g}s: {problem}",
                hint="is `aegis relay serve` running with this --data-dir? Its output says why not",
            )
        time.sleep(0.2)


def register(tree: CommandTree) -> None:
    p = tree.command("relay serve", cmd_serve, help="run the reference relay (TLS by default)")
    p.add_argument("--data-dir", required=True, help="state directory (keys, CA, store)")
    _store_flag(p)
    p.add_argument(
        "--listen", type=_hostport, default="0.0.0.0:7443", help="gRPC HOST:PORT (port 0: any)"
    )
    p.add_argument(
        "--http-listen",
        "--metrics-listen",  # its name before the HTTP server served more than /metrics
        dest="http_listen",
        default="127.0.0.1:9464",
        help="HOST:PORT of the HTTP server: /metrics, /healthz, /readyz, /api/v1 "
        "(HTTPS with the relay's certificate unless --insecure; 'off' to disable)",
    )
    p.add_argument(
        "--metrics-token-file",
        metavar="PATH",
        help="require 'Authorization: Bearer <token>' on /metrics, the token read from PATH",
    )
    p.add_argument("--heartbeat-interval", type=_duration, default=30.0, metavar="DURATION")
    p.add_argument("--stale-threshold", type=_duration, default=90.0, metavar="DURATION")
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC: local experiments only")
    p.add_argument("--tls-cert", help="your own server certificate chain (PEM)")
    p.add_argument("--tls-key", help="the key of --tls-cert (PEM)")
    p.add_argument("--advertise", help="HOST:PORT daemons should dial (put in enrollment tokens)")
    p.add_argument(
        "--cluster",
        default="",
        metavar="NAME",
        help="serve in cluster NAME with the other relays of the PostgreSQL --store; "
        "the first relay creates it",
    )
    p.add_argument(
        "--join-bundle",
        metavar="FILE",
        help="join the cluster of FILE (written by `aegis relay join-bundle`): its CA, name "
        "and store",
    )
    p.add_argument(
        "--drain-grace",
        type=_duration,
        default=5.0,
        metavar="DURATION",
        help="how long shutdown waits for drained daemons to leave",
    )
    p.add_argument(
        "--drain-rate",
        type=_rate,
        default=DEFAULT_ATTEST_RATE,
        metavar="N",
        help="attestations per second the relay that takes the daemons back manages; a drain "
        f"spreads their returns over it (default {DEFAULT_ATTEST_RATE:g})",
    )
    p.add_argument(
        "--take-over",
        action="store_true",
        help="restart without a storm: listen beside the relay running on --data-dir (same "
        "port), stop it, and serve once it has closed its store",
    )
    p.add_argument(
        "--handshake-timeout",
        type=_positive_duration,
        default=DEFAULT_HANDSHAKE_DEADLINE,
        metavar="DURATION",
        help="close daemon streams not attested, and connections without TLS, after this "
        f"(default {DEFAULT_HANDSHAKE_DEADLINE:g}s)",
    )
    p.add_argument(
        "--max-unattested-per-source",
        type=_cap,
        default=DEFAULT_MAX_UNATTESTED_PER_SOURCE,
        metavar="N",
        help="streams one address may have mid-handshake at once, or off "
        f"(default {DEFAULT_MAX_UNATTESTED_PER_SOURCE})",
    )
    p.add_argument(
        "--protocol-features",
        type=_features,
        default=FEATURES,
        metavar="LIST",
        help="optional stream features to use with daemons that offer them, comma-separated, "
        f"or none (default: all, {','.join(sorted(FEATURES))})",
    )
    # For tests that must order a daemon's kill at the deadline before the relay's tick.
    p.add_argument("--fleet-tick-interval", type=_duration, default=0.1, help=argparse.SUPPRESS)
    p.add_argument("--otlp-endpoint", help="export traces over OTLP/gRPC to this endpoint")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    for flag, default, what in (
        ("--attest-limit-per-node", DEFAULT_ATTEST_PER_NODE, "connection attempts per node id"),
        (
            "--attest-limit-per-source",
            DEFAULT_ATTEST_PER_SOURCE,
            "connection attempts per peer address (many daemons may share one)",
        ),
        ("--enroll-limit-per-source", DEFAULT_ENROLL_PER_SOURCE, "enrollments per peer address"),
        (
            "--refresh-limit-per-node",
            DEFAULT_REFRESH_PER_NODE,
            "token refreshes a daemon asks for, per node",
        ),
    ):
        p.add_argument(
            flag,
            type=_limit,
            default=Limit.parse(default),
            metavar="N/PERIOD",
            help=f"rate limit on {what}, e.g. 30/1m, or off (default {default})",
        )

    p = tree.command(
        "relay migrate",
        cmd_migrate,
        help="migrate the store of --store URL to this version's schema and say from/to",
    )
    _store_flag(p)

    p = tree.command(
        "relay wait",
        cmd_wait,
        help="wait until the relay of --data-dir serves (for `aegis relay serve ... &`)",
    )
    p.add_argument("--data-dir", required=True, help="the --data-dir the relay was started with")
    p.add_argument(
        "--timeout",
        type=_duration,
        default=30.0,
        metavar="DURATION",
        help="give up after this long (default 30s)",
    )

    p = tree.command(
        "relay operator-token",
        cmd_operator_token,
        help="print an operator token scoped to tenants",
    )
    p.add_argument("--data-dir", required=True)
    p.add_argument(
        "--tenant",
        action="append",
        required=True,
        help="tenant the token may touch (repeat for more; '*' for all)",
    )
    p.add_argument("--role", default="operator", help="viewer, operator or admin")
    p.add_argument("--ttl", type=_duration, default=30 * 86400.0, metavar="DURATION")
    p.add_argument("--subject", help="who the token is for (shown in run records)")

    p = tree.command(
        "relay join-bundle",
        cmd_join_bundle,
        help="write the file another relay joins this relay's cluster with (0600, CA key)",
    )
    p.add_argument("--data-dir", required=True, help="the --data-dir of a relay of the cluster")
    p.add_argument("--out", metavar="FILE", help="where to write it (default D/join-bundle.json)")

    from aegis_edge_relay import demo, operator

    operator.register(tree)
    demo.register(tree)
