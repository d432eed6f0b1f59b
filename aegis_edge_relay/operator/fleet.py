"""``aegis edge fleet ...``: preview, run, keys rotate, runs, watch, rerun, show, cancel.

``run``, ``keys rotate``, ``watch`` and ``rerun`` follow a run's event stream to its end
with one loop (:func:`_run_and_report`) and exit alike: 0 only when the outcome is
``completed``, otherwise one line on stderr with the verdict.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from aegis_edge_cli import CliError, CommandTree, add_output_flag, print_json, print_table
from aegis_edge_core.fleet.errors import FleetSpecError
from aegis_edge_core.fleet.rerun import parse_rerun_scope
from aegis_edge_core.wire import admin_pb2, common_pb2
from aegis_edge_relay.operator.client import AdminClient, Events
from aegis_edge_relay.operator.common import add_connection_flags, admin_client, nonneg_int, now
from aegis_edge_relay.operator.fleetargs import (
    FOLLOW_AUTO_LIMIT,
    add_fleet_policy_flags,
    add_follow_flags,
    add_secret_arg_flag,
    add_target_flag,
    add_tool_args,
    build_fleet_spec,
    parse_secret_args,
)
from aegis_edge_relay.operator.jsonrepr import (
    fleet_preview_to_dict,
    fleet_run_to_dict,
    run_outcome_name,
)
from aegis_edge_relay.operator.render import (
    LiveOutput,
    Progress,
    fleet_run_summary,
    print_run_detail,
    print_run_tables,
    relative_time,
)

__all__ = [
    "cmd_fleet_cancel",
    "cmd_fleet_keys_rotate",
    "cmd_fleet_preview",
    "cmd_fleet_rerun",
    "cmd_fleet_run",
    "cmd_fleet_runs",
    "cmd_fleet_show",
    "cmd_fleet_watch",
    "register",
]

_OpenEvents = Callable[[AdminClient, bool, bool], Events]
"""Opens a run's event stream, batched, asking for live output or not (first flag) and for
progress counts in place of per-target events or not (second flag)."""


def cmd_fleet_preview(args: argparse.Namespace) -> int:
    spec = build_fleet_spec(args)
    with admin_client(args) as client:
        preview = client.preview_fleet_run(spec)
    if args.output == "json":
        print_json(fleet_preview_to_dict(preview))
        return 0
    print(
        f"selector {preview.selector or spec.selector!r} matched {preview.matched}: "
        f"{len(preview.targets)} target(s), {len(preview.skipped)} skipped"
    )
    rows: list[list[str]] = [[node, "target", ""] for node in preview.targets]
    rows += [[s.node_id, "skip", s.reason] for s in preview.skipped]
    if rows:
        print_table(("NODE", "ACTION", "REASON"), rows)
    return 0


def _run_and_report(args: argparse.Namespace, open_events: _OpenEvents) -> int:
    """Follow a run's event stream to its end, print the record, exit by its outcome."""
    as_json = args.output == "json"
    live = not as_json and sys.stdout.isatty()
    follow: bool | None = getattr(args, "follow", None)
    follow_output = live if follow is None else follow
    # Nothing shows targets one by one without a terminal or live output: counts do.
    summary_only = not live and not follow_output
    printer = LiveOutput(json_mode=as_json)
    final: admin_pb2.FleetRun | None = None
    started: admin_pb2.FleetRun | None = None
    with admin_client(args) as client:
        try:
            with Progress(live) as progress:
                for event in open_events(client, follow_output, summary_only):
                    kind = event.WhichOneof("body")
                    if kind == "started":
                        started = event.started
                        progress.started(event.started)
                        printer.enabled = bool(follow) or (
                            follow_output and len(started.targets) <= FOLLOW_AUTO_LIMIT
                        )
                    elif kind == "output":
                        printer.output(event.output)
                    elif kind == "dispatched":
                        progress.dispatched(event.dispatched)
                    elif kind == "targets_dispatched":
                        for target in event.targets_dispatched.targets:
                            progress.dispatched(target)
                    elif kind == "target_finished":
                        printer.target_done(event.target_finished.node_id)
                        progress.finished(event.target_finished)
                    elif kind == "targets_finished":
                        for target in event.targets_finished.targets:
                            printer.target_done(target.node_id)
                            progress.finished(target)
                    elif kind == "progress":
                        progress.counts(event.progress)
                    elif kind == "finished":
                        final = event.finished
                        break
                printer.close()
        except KeyboardInterrupt:
            run_id = started.fleet_command_id if started is not None else ""
            if run_id:
                raise CliError(
                    f"interrupted; fleet run {run_id} goes on at the relay "
                    f"(`aegis edge fleet watch {run_id}` follows it again, "
                    f"`aegis edge fleet cancel {run_id}` stops it)",
                    exit_code=130,
                ) from None
            raise
    if final is None:
        run_id = started.fleet_command_id if started is not None else "?"
        raise CliError(
            f"the relay closed the event stream before fleet run {run_id} finished "
            f"(`aegis edge fleet show {run_id}` shows where it is)"
        )
    if as_json:
        print_json(fleet_run_to_dict(final))
    else:
        print_run_tables(final)
        print(f"fleet run {final.fleet_command_id}: {fleet_run_summary(final)}")
    if final.outcome != common_pb2.RUN_OUTCOME_COMPLETED:
        reason = f" ({final.halt_reason})" if final.halt_reason else ""
        raise CliError(f"fleet run {final.fleet_command_id} {fleet_run_summary(final)}{reason}")
    return 0


def _start(spec: admin_pb2.FleetRunSpec) -> _OpenEvents:
    def open_events(client: AdminClient, follow_output: bool, summary_only: bool) -> Events:
        spec.follow_output = follow_output
        spec.batch_events, spec.summary_only = True, summary_only
        return client.start_fleet_run(spec)

    return open_events


def cmd_fleet_run(args: argparse.Namespace) -> int:
    return _run_and_report(args, _start(build_fleet_spec(args)))


def cmd_fleet_keys_rotate(args: argparse.Namespace) -> int:
    return _run_and_report(args, _start(build_fleet_spec(args, tool="keys.rotate")))


def cmd_fleet_rerun(args: argparse.Namespace) -> int:
    try:
        only = parse_rerun_scope(args.only)
    except FleetSpecError as err:
        raise CliError(f"--only: {err}") from None
    secrets = parse_secret_args(args.secret_arg or ())
    return _run_and_report(
        args,
        lambda client, follow_output, summary_only: client.rerun_fleet_run(
            args.fleet_command_id,
            only=only.value,
            secret_args=secrets,
            follow_output=follow_output,
            batch_events=True,
            summary_only=summary_only,
        ),
    )


def cmd_fleet_watch(args: argparse.Namespace) -> int:
    return _run_and_report(
        args,
        lambda client, follow_output, summary_only: client.watch_fleet_run(
            args.fleet_command_id,
            follow_output=follow_output,
            batch_events=True,
            summary_only=summary_only,
        ),
    )


def cmd_fleet_runs(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise CliError("--limit: must be zero or more")
    with admin_client(args) as client:
        runs = client.list_fleet_runs(limit=args.limit, tenant_id=args.tenant or "")
    if args.output == "json":
        print_json([fleet_run_to_dict(run) for run in runs])
        return 0
    if not runs:
        print("no fleet runs")
        return 0
    at = now()
    rows = [
        [
            run.fleet_command_id,
            relative_time(run.created_at, at),
            run.created_by or "-",
            run.spec.tool,
            run.spec.selector,
            run.spec.mode or "all",
            run_outcome_name(run.outcome),
        ]
        for run in runs
    ]
    print_table(("ID", "CREATED", "BY", "TOOL", "TARGET", "MODE", "OUTCOME"), rows)
    return 0


def cmd_fleet_show(args: argparse.Namespace) -> int:
    with admin_client(args) as client:
        run = client.get_fleet_run(args.fleet_command_id)
    if args.output == "json":
        print_json(fleet_run_to_dict(run))
    else:
        print_run_detail(run)
    return 0


def cmd_fleet_cancel(args: argparse.Namespace) -> int:
    with admin_client(args) as client:
        run = client.cancel_fleet_run(args.fleet_command_id)
    if args.output == "json":
        print_json(fleet_run_to_dict(run))
    else:
        print(f"fleet run {run.fleet_command_id}: {run_outcome_name(run.outcome)}")
    return 0


def register(tree: CommandTree) -> None:
    p = tree.command(
        "edge fleet preview",
        cmd_fleet_preview,
        help="dry run: which daemons a fleet run would target and which it would skip",
    )
    add_target_flag(p)
    p.add_argument("--tool", required=True, help="tool name, e.g. cmd.run")
    add_tool_args(p)
    add_fleet_policy_flags(p)
    add_output_flag(p)
    add_connection_flags(p)

    p = tree.command("edge fleet run", cmd_fleet_run, help="run a tool across the fleet")
    add_target_flag(p)
    p.add_argument("--tool", required=True, help="tool name, e.g. cmd.run, sys.info, edge.ping")
    add_tool_args(p)
    add_fleet_policy_flags(p)
    add_follow_flags(p)
    add_output_flag(p)
    add_connection_flags(p)

    p = tree.command(
        "edge fleet keys rotate",
        cmd_fleet_keys_rotate,
        help="rotate daemon keys across the fleet (a fleet run of keys.rotate)",
    )
    add_target_flag(p)
    add_fleet_policy_flags(p)
    add_output_flag(p)
    add_connection_flags(p)

    p = tree.command("edge fleet runs", cmd_fleet_runs, help="recent fleet runs, newest first")
    p.add_argument("--limit", type=nonneg_int, default=20, help="how many (default 20)")
    p.add_argument("--tenant", metavar="TENANT", help="only runs of this tenant")
    add_output_flag(p)
    add_connection_flags(p)

    p = tree.command(
        "edge fleet watch",
        cmd_fleet_watch,
        help="follow a fleet run to its end (a finished one: its summary); exits like `fleet run`",
    )
    p.add_argument("fleet_command_id", metavar="FLEET_COMMAND_ID")
    add_follow_flags(p)
    add_output_flag(p)
    add_connection_flags(p)

    p = tree.command(
        "edge fleet rerun",
        cmd_fleet_rerun,
        help="run a finished fleet run again (same tool, arguments, mode, on-error, deadline) "
        "on all, the failed or the not-started targets; exits like `fleet run`",
    )
    p.add_argument("fleet_command_id", metavar="FLEET_COMMAND_ID")
    p.add_argument(
        "--only",
        choices=("all", "failed", "not_started"),
        default="all",
        help="which targets of the old run: all (default), failed (any outcome but ok) "
        "or not_started",
    )
    add_secret_arg_flag(p)
    add_follow_flags(p)
    add_output_flag(p)
    add_connection_flags(p)

    for action, handler, help_ in (
        ("show", cmd_fleet_show, "one fleet run with every target"),
        (
            "cancel",
            cmd_fleet_cancel,
            "cancel a running fleet run: nothing new is dispatched, in-flight calls cancelled",
        ),
    ):
        p = tree.command(f"edge fleet {action}", handler, help=help_)
        p.add_argument("fleet_command_id", metavar="FLEET_COMMAND_ID")
        add_output_flag(p)
        add_connection_flags(p)
