"""``aegis edge groups create|ls|show|rm``: saved groups, named in selectors as
``group=NAME``."""

from __future__ import annotations

import argparse

from aegis_edge_cli import CliError, CommandTree, add_output_flag, print_json, print_table
from aegis_edge_core.fleet.groups import GroupError, check_group_name, check_group_selector
from aegis_edge_relay.operator.common import add_connection_flags, admin_client, now
from aegis_edge_relay.operator.fleetargs import validate_selector
from aegis_edge_relay.operator.jsonrepr import group_to_dict, iso_time
from aegis_edge_relay.operator.render import print_fields, relative_time

__all__ = ["cmd_groups_create", "cmd_groups_ls", "cmd_groups_rm", "cmd_groups_show", "register"]


def _group_name(name: str) -> str:
    try:
        return check_group_name(name)
    except GroupError as err:
        raise CliError(str(err)) from None


def cmd_groups_create(args: argparse.Namespace) -> int:
    name = _group_name(args.name)
    validate_selector(args.target)
    try:
        check_group_selector(args.target)
    except GroupError as err:
        raise CliError(f"--target: {err}") from None
    with admin_client(args) as client:
        group = client.create_group(
            name, selector=args.target, tenant_id=args.tenant or "", pinned=args.pin
        )
    if args.output == "json":
        print_json(group_to_dict(group, with_members=True))
        return 0
    pinned = f" + {len(group.pinned)} pinned" if group.pinned else ""
    print(
        f"created group {group.name} in tenant {group.tenant_id}: {group.selector}{pinned}; "
        f"{len(group.members)} member(s) now"
    )
    return 0


def cmd_groups_ls(args: argparse.Namespace) -> int:
    with admin_client(args) as client:
        groups = client.list_groups(tenant_id=args.tenant or "")
    if args.output == "json":
        print_json([group_to_dict(g) for g in groups])
        return 0
    if not groups:
        print("no groups")
        return 0
    at = now()
    rows = [
        [
            g.name,
            g.tenant_id,
            g.selector,
            ",".join(g.pinned) or "-",
            g.created_by or "-",
            relative_time(g.created_at, at),
        ]
        for g in groups
    ]
    print_table(("NAME", "TENANT", "SELECTOR", "PINNED", "CREATED BY", "CREATED"), rows)
    return 0


def cmd_groups_show(args: argparse.Namespace) -> int:
    with admin_client(args) as client:
        group = client.get_group(_group_name(args.name), tenant_id=args.tenant or "")
    if args.output == "json":
        print_json(group_to_dict(group, with_members=True))
        return 0
    fields = [
        ("Group", group.name),
        ("Tenant", group.tenant_id),
        ("Selector", group.selector),
        ("Pinned", ", ".join(group.pinned) or "-"),
        ("Created", iso_time(group.created_at) or "-"),
        ("Created by", group.created_by or "-"),
        ("Members now", f"{len(group.members)}: {', '.join(group.members) or '-'}"),
    ]
    if group.missing:
        fields.append(("Pinned, not found", ", ".join(group.missing)))
    print_fields(fields)
    print(f"(statuses and skips: aegis edge fleet preview --target group={group.name} --tool TOOL)")
    return 0


def cmd_groups_rm(args: argparse.Namespace) -> int:
    with admin_client(args) as client:
        group = client.delete_group(_group_name(args.name), tenant_id=args.tenant or "")
    if args.output == "json":
        print_json(group_to_dict(group))
    else:
        print(f"removed group {group.name} from tenant {group.tenant_id}")
    return 0


def register(tree: CommandTree) -> None:
    p = tree.command(
        "edge groups create",
        cmd_groups_create,
        help="save a group: a selector plus pinned nodes, named in selectors as group=NAME",
    )
    p.add_argument("name", metavar="NAME", help="1-64 of a-z 0-9 - . _")
    p.add_argument(
        "--target",
        required=True,
        metavar="SELECTOR",
        help="which daemons of the tenant belong, e.g. tags=web (cannot name another group)",
    )
    p.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="NODE",
        help="a node that belongs whatever the selector says (repeatable)",
    )
    p.add_argument("--tenant", metavar="TENANT", help="the group's tenant (default: the token's)")
    add_output_flag(p)
    add_connection_flags(p)

    p = tree.command("edge groups ls", cmd_groups_ls, help="saved groups, by tenant then name")
    p.add_argument("--tenant", metavar="TENANT", help="only groups of this tenant")
    add_output_flag(p)
    add_connection_flags(p)

    for action, handler, help_ in (
        ("show", cmd_groups_show, "one group with its members now"),
        ("rm", cmd_groups_rm, "delete a group (runs already started are not affected)"),
    ):
        p = tree.command(f"edge groups {action}", handler, help=help_)
        p.add_argument("name", metavar="NAME")
        p.add_argument(
            "--tenant", metavar="TENANT", help="the group's tenant, if several have this name"
        )
        add_output_flag(p)
        add_connection_flags(p)
