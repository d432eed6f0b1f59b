"""``aegis edge keys revoke-remote``: revoke a daemon from the relay side.

(``aegis edge keys rotate`` is the host's own command; ``aegis edge fleet keys rotate`` is a
fleet run, in :mod:`.fleet`.)
"""

from __future__ import annotations

import argparse

from aegis_edge_cli import CommandTree, add_output_flag, print_json
from aegis_edge_relay.operator.common import add_connection_flags, admin_client
from aegis_edge_relay.operator.jsonrepr import host_to_dict, status_name

__all__ = ["cmd_revoke_remote", "register"]


def cmd_revoke_remote(args: argparse.Namespace) -> int:
    with admin_client(args) as client:
        host = client.revoke_node(args.node_id, reason=args.reason or "")
    if args.output == "json":
        print_json(host_to_dict(host))
    else:
        reason = f" ({host.revoked_reason})" if host.revoked_reason else ""
        print(f"revoked {host.node_id}: status {status_name(host.status)}{reason}")
    return 0


def register(tree: CommandTree) -> None:
    p = tree.command(
        "edge keys revoke-remote",
        cmd_revoke_remote,
        help="revoke a daemon from the relay side: status Revoked, token blacklisted, "
        "stream dropped",
    )
    p.add_argument("node_id", metavar="NODE_ID")
    p.add_argument("--reason", help="why, kept with the daemon's record")
    add_output_flag(p)
    add_connection_flags(p)
