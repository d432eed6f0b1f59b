"""``aegis relay serve`` and ``aegis relay operator-token``; operator commands come from
:mod:`aegis_edge_relay.operator_cli`."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from aegis_edge_cli import CliError, CommandTree
from aegis_edge_core.authz import AuthzError, parse_role
from aegis_edge_core.errors import ConfigError
from aegis_edge_core.ratelimit import (
    DEFAULT_ATTEST_PER_NODE,
    DEFAULT_ATTEST_PER_SOURCE,
    DEFAULT_ENROLL_PER_SOURCE,
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


def _hostport(text: str) -> str:
    try:
        parse_hostport(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def cmd_serve(args: argparse.Namespace) -> int:
    from aegis_edge_relay.server import ServeOptions, serve

    if args.stale_threshold <= args.heartbeat_interval:
        raise CliError(
            f"--stale-threshold ({args.stale_threshold}s) must exceed --heartbeat-interval "
            f"({args.heartbeat_interval}s); the default is 3x the interval"
        )
    if bool(args.tls_cert) != bool(args.tls_key):
        raise CliError("--tls-cert and --tls-key go together")
    opts = ServeOptions(
        data_dir=Path(args.data_dir).expanduser(),
        listen=args.listen,
        metrics_listen=None if args.metrics_listen in ("", "off") else args.metrics_listen,
        heartbeat_interval=args.heartbeat_interval,
        stale_threshold=args.stale_threshold,
        insecure=args.insecure,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        advertise=args.advertise,
        drain_grace=args.drain_grace,
        fleet_tick_interval=args.fleet_tick_interval,
        otlp_endpoint=args.otlp_endpoint,
        log_level=args.log_level,
        fast_exit=True,
        attest_limit_per_node=args.attest_limit_per_node,
        attest_limit_per_source=args.attest_limit_per_source,
        enroll_limit_per_source=args.enroll_limit_per_source,
    )
    try:
        return asyncio.run(serve(opts))
    except OSError as err:
        raise CliError(f"relay could not start: {err}") from None


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
    token, _expires = issue_operator_token(
        data_dir,
        subject=args.subject or f"operator:{','.join(args.tenant)}",
        role=role.label,
        tenants=tenants,
        ttl=args.ttl,
    )
    print(token)
    return 0


def register(tree: CommandTree) -> None:
    p = tree.command("relay serve", cmd_serve, help="run the reference relay (TLS by default)")
    p.add_argument("--data-dir", required=True, help="state directory (keys, CA, store)")
    p.add_argument(
        "--listen", type=_hostport, default="0.0.0.0:7443", help="gRPC HOST:PORT (port 0: any)"
    )
    p.add_argument(
        "--metrics-listen",
        default="127.0.0.1:9464",
        help="HOST:PORT of the Prometheus /metrics endpoint ('off' to disable)",
    )
    p.add_argument("--heartbeat-interval", type=_duration, default=30.0, metavar="DURATION")
    p.add_argument("--stale-threshold", type=_duration, default=90.0, metavar="DURATION")
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC: local experiments only")
    p.add_argument("--tls-cert", help="your own server certificate chain (PEM)")
    p.add_argument("--tls-key", help="the key of --tls-cert (PEM)")
    p.add_argument("--advertise", help="HOST:PORT daemons should dial (put in enrollment tokens)")
    p.add_argument(
        "--drain-grace",
        type=_duration,
        default=5.0,
        metavar="DURATION",
        help="how long shutdown waits for drained daemons to leave",
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
    ):
        p.add_argument(
            flag,
            type=_limit,
            default=Limit.parse(default),
            metavar="N/PERIOD",
            help=f"rate limit on {what}, e.g. 30/1m, or off (default {default})",
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

    from aegis_edge_relay import demo, operator_cli

    operator_cli.register(tree)
    demo.register(tree)
