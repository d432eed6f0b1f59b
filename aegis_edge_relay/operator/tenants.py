"""``aegis edge tenants delete``: delete a tenant and revoke every daemon bound to it."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from aegis_edge_cli import CliError, CommandTree, add_output_flag, print_json
from aegis_edge_relay.operator.common import add_connection_flags, admin_client
from aegis_edge_relay.operator.jsonrepr import tenant_deleted_to_dict

__all__ = ["cmd_tenants_delete", "register"]


def _confirm(prompt: str, expected: str, stdin: TextIO) -> bool:
    sys.stderr.write(prompt)
    sys.stderr.flush()
    answer = stdin.readline()
    return answer.strip() == expected


def cmd_tenants_delete(args: argparse.Namespace) -> int:
    tenant: str = args.tenant
    if not tenant.strip():
        raise CliError("tenants delete: the tenant id is empty")
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError(
                f"refusing to delete tenant {tenant!r} without confirmation: "
                "stdin is not a terminal; pass --yes"
            )
        prompt = (
            f"Deleting tenant {tenant!r} revokes every daemon bound to it; this cannot be "
            f"undone.\nType the tenant id to confirm: "
        )
        if not _confirm(prompt, tenant, sys.stdin):
            raise CliError(f"not deleting tenant {tenant!r}: confirmation did not match")
    with admin_client(args) as client:
        resp = client.delete_tenant(tenant)
    if args.output == "json":
        print_json(tenant_deleted_to_dict(tenant, resp))
    else:
        noun = "daemon" if resp.revoked_daemons == 1 else "daemons"
        print(f"deleted tenant {tenant}; revoked {resp.revoked_daemons} {noun}")
    return 0


def register(tree: CommandTree) -> None:
    p = tree.command(
        "edge tenants delete",
        cmd_tenants_delete,
        help="delete a tenant and revoke every daemon bound to it",
    )
    p.add_argument("tenant", metavar="TENANT")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    add_output_flag(p)
    add_connection_flags(p)
