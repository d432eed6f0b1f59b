"""``aegis edge ls``, ``aegis edge show`` and ``aegis edge tag add|rm``: the hosts."""

from __future__ import annotations

import argparse
from typing import Final

from aegis_edge_cli import CliError, CommandTree, add_output_flag, print_json, print_table
from aegis_edge_relay.operator.common import add_connection_flags, admin_client, nonneg_int, now
from aegis_edge_relay.operator.fleetargs import validate_selector
from aegis_edge_relay.operator.jsonrepr import host_to_dict
from aegis_edge_relay.operator.render import HOST_COLUMNS, host_row, print_host_detail

__all__ = ["DEFAULT_HISTORY", "cmd_ls", "cmd_show", "cmd_tag", "register"]

DEFAULT_HISTORY: Final = 20
"""How many recent tool calls ``edge show`` asks for."""


def cmd_ls(args: argparse.Namespace) -> int:
    selector = args.target or ""
    if selector:
        validate_selector(selector)
    with admin_client(args) as client:
        found = client.list_hosts(
            connected_only=args.connected, tenant_id=args.tenant or "", selector=selector
        )
    hosts = sorted(found, key=lambda h: (h.tenant_id, h.node_id))
    if args.output == "json":
        print_json([host_to_dict(h) for h in hosts])
        return 0
    if not hosts:
        print("no hosts" + (" connected" if args.connected else ""))
        return 0
    at = now()
    print_table(HOST_COLUMNS, (host_row(h, at) for h in hosts))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with admin_client(args) as client:
        host = client.get_host(args.node_id, history_limit=args.history)
    if args.output == "json":
        print_json(host_to_dict(host, with_history=True))
    else:
        print_host_detail(host, now())
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    tags: list[str] = list(args.tags)
    for tag in tags:
        if not tag or any(ch.isspace() or ch in ",()=" for ch in tag):
            raise CliError(f"invalid tag {tag!r}: tags may not be empty or hold spaces , ( ) =")
    with admin_client(args) as client:
        if args.tag_action == "add":
            host = client.add_tags(args.node_id, tags)
        else:
            host = client.remove_tags(args.node_id, tags)
    if args.output == "json":
        print_json(host_to_dict(host))
    else:
        print(f"{host.node_id}: tags {', '.join(sorted(host.capabilities.tags)) or '(none)'}")
    return 0


def register(tree: CommandTree) -> None:
    p = tree.command("edge ls", cmd_ls, help="list edge hosts known to the relay")
    p.add_argument("--connected", action="store_true", help="only Connected hosts")
    p.add_argument("--tenant", metavar="TENANT", help="only hosts of this tenant")
    p.add_argument("--target", metavar="SELECTOR", help="only hosts this selector matches")
    add_output_flag(p)
    add_connection_flags(p)

    p = tree.command("edge show", cmd_show, help="one host in full, with its command history")
    p.add_argument("node_id", metavar="NODE_ID")
    p.add_argument(
        "--history",
        type=nonneg_int,
        default=DEFAULT_HISTORY,
        metavar="N",
        help=f"how many recent tool calls to show (default {DEFAULT_HISTORY})",
    )
    add_output_flag(p)
    add_connection_flags(p)

    for action, help_ in (("add", "add operator tags to a host"), ("rm", "remove tags")):
        p = tree.command(f"edge tag {action}", cmd_tag, help=help_)
        p.set_defaults(tag_action=action)
        p.add_argument("node_id", metavar="NODE_ID")
        p.add_argument("tags", nargs="+", metavar="TAG")
        add_output_flag(p)
        add_connection_flags(p)
