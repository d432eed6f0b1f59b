"""What every operator command shares: the connection flags, opening an
:class:`~.client.AdminClient` from them, and small argument types.

A failed call becomes :class:`~aegis_edge_cli.CliError` here, in one place: one line on
stderr, the relay's sentence, and a non-zero exit (the CLI root prints it).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime

from aegis_edge_cli import CliError
from aegis_edge_core.fleet.errors import FleetSpecError
from aegis_edge_core.fleet.spec import parse_duration
from aegis_edge_relay.operator.client import (
    ENV_CA_CERT,
    ENV_RELAY,
    ENV_RELAY_DATA_DIR,
    ENV_TLS_SERVER_NAME,
    ENV_TOKEN,
    AdminClient,
    AdminError,
    Connection,
)

__all__ = [
    "add_connection_flags",
    "admin_client",
    "nonneg_int",
    "now",
    "parse_duration_secs",
    "resolve_connection",
]


def now() -> float:
    """The operator's clock, for relative times in tables."""
    return datetime.now(tz=UTC).timestamp()


def nonneg_int(text: str) -> int:
    """An argparse type: a whole number, zero or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {value}")
    return value


def parse_duration_secs(text: str, *, flag: str) -> float:
    """``120s``, ``15m``, ``1h30m`` or bare seconds to a positive float (the core's grammar).

    Raises :class:`CliError` naming ``flag`` for anything else.
    """
    try:
        return parse_duration(text, field=flag.lstrip("-"))
    except FleetSpecError as err:
        raise CliError(f"{flag}: {err}") from None


def resolve_connection(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Connection:
    """The connection flags of ``args``, then the environment (:meth:`Connection.resolve`);
    a missing setting names both the flag and the variable."""
    try:
        return Connection.resolve(
            getattr(args, "relay", None),
            ca_cert=getattr(args, "ca_cert", None),
            token=getattr(args, "token", None),
            tls_server_name=getattr(args, "tls_server_name", None),
            data_dir=getattr(args, "relay_data_dir", None),
            insecure=bool(getattr(args, "insecure", False)),
            environ=environ,
        )
    except AdminError as err:
        raise CliError(str(err)) from None


@contextlib.contextmanager
def admin_client(args: argparse.Namespace) -> Iterator[AdminClient]:
    """A client from the command's connection flags; its failures as :class:`CliError`."""
    connection = resolve_connection(args)
    try:
        with AdminClient(connection) as client:
            yield client
    except AdminError as err:
        raise CliError(str(err)) from None


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("relay connection")
    group.add_argument(
        "--relay", metavar="HOST:PORT", help=f"the relay's admin address (env {ENV_RELAY})"
    )
    group.add_argument(
        "--ca-cert",
        metavar="PATH",
        help=f"the relay's CA certificate, <data-dir>/ca.pem (env {ENV_CA_CERT})",
    )
    group.add_argument(
        "--token",
        metavar="TOKEN|@FILE",
        help=f"operator token, or @path to a file holding it (env {ENV_TOKEN})",
    )
    group.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="the name in the relay's certificate, when it differs from HOST "
        f"(env {ENV_TLS_SERVER_NAME})",
    )
    group.add_argument(
        "--relay-data-dir",
        metavar="DIR",
        help="a local relay's --data-dir: address, CA and admin token from DIR/relay.json "
        f"(env {ENV_RELAY_DATA_DIR})",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC, for a relay started with --insecure (the token travels in clear)",
    )
