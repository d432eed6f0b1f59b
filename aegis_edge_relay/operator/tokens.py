"""``aegis edge tokens issue``: a single-use enrollment token for a tenant."""

from __future__ import annotations

import argparse
import sys

from aegis_edge_cli import CliError, CommandTree, print_json
from aegis_edge_core.errors import AegisError
from aegis_edge_core.identity.tokens import check_tenant_id
from aegis_edge_relay.operator.common import (
    add_connection_flags,
    admin_client,
    parse_duration_secs,
)
from aegis_edge_relay.operator.jsonrepr import message_to_dict

__all__ = ["cmd_tokens_issue", "register"]


def cmd_tokens_issue(args: argparse.Namespace) -> int:
    tenant: str = args.tenant
    if not tenant.strip():
        raise CliError("--tenant: the tenant id is empty")
    try:
        check_tenant_id(tenant)
    except AegisError as err:
        raise CliError(f"--tenant: {err.message}", hint=err.hint) from None
    ttl = parse_duration_secs(args.ttl, flag="--ttl") if args.ttl else 0.0
    with admin_client(args) as client:
        resp = client.issue_enrollment_token(tenant, ttl_secs=ttl)
    if args.output == "json":
        print_json(message_to_dict(resp))
    else:
        # The token alone, so `TOKEN=$(aegis edge tokens issue --tenant t)` just works.
        sys.stdout.write(resp.token + "\n")
    return 0


def register(tree: CommandTree) -> None:
    p = tree.command(
        "edge tokens issue",
        cmd_tokens_issue,
        help="issue a single-use enrollment token for a tenant (printed alone on stdout)",
    )
    p.add_argument("--tenant", required=True, metavar="TENANT")
    p.add_argument("--ttl", metavar="DURATION", help="lifetime, e.g. 15m (relay default 15m)")
    p.add_argument(
        "--output", "-o", choices=("text", "json"), default="text", help="text (default) or json"
    )
    add_connection_flags(p)
