"""Driving fleet runs from Python: offline with the core planner, or live against a relay.

``plan`` needs nothing running. It builds a small simulated fleet, resolves a selector
into targets and skips (what ``aegis edge fleet preview`` shows), and feeds the core's
sans-I/O planner (:class:`aegis_edge_core.fleet.FleetRun`) simulated results on a simulated
clock, printing every action it answers with -- the exact loop a relay's dispatcher runs.
The defaults are the seed's fleet-wide update (``rolling=5``, ``stop-after=1``,
``120s``); one host fails, so the run halts::

    .venv/bin/python examples/drive_fleet_run.py plan
    .venv/bin/python examples/drive_fleet_run.py plan --mode sequential --on-error continue
    .venv/bin/python examples/drive_fleet_run.py plan --deadline 20s --fail ''

``run`` talks to a running relay with ``AdminClient``, the Admin API's Python client: it
previews the run, starts it, prints each progress event and the final record, and exits 0
only when the outcome is ``completed`` (like ``aegis edge fleet run``). Point it at a local
relay's data directory (address, CA and admin token come from ``D/relay.json``), pass them,
or leave them to ``AEGIS_RELAY``, ``AEGIS_CA_CERT`` and ``AEGIS_OPERATOR_TOKEN``::

    aegis relay serve --data-dir /tmp/relay --listen 127.0.0.1:7443 &
    .venv/bin/python examples/drive_fleet_run.py run --relay-data-dir /tmp/relay \\
        --target all --tool edge.ping --mode rolling=2
    .venv/bin/python examples/drive_fleet_run.py run --relay relay.example.com:443 \\
        --ca-cert ca.pem --token @operator.token --target tags=prod --tool sys.info
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys

from aegis_edge_core.errors import AegisError
from aegis_edge_core.fleet import (
    Cancel,
    DaemonSnapshot,
    Dispatch,
    Finish,
    FleetRun,
    FleetSpec,
    SelectorError,
    resolve_targets,
)
from aegis_edge_core.wire import admin_pb2
from aegis_edge_relay.operator.client import AdminClient, AdminError, Connection
from aegis_edge_relay.operator.jsonrepr import run_outcome_name, target_outcome_name

# --------------------------------------------------------------------------- offline


def simulated_fleet() -> list[DaemonSnapshot]:
    """Twelve managed hosts in various states, and two hosts outside the selection."""
    fleet = []
    for i in range(1, 13):
        status = {4: "Disconnected", 9: "Unhealthy"}.get(i, "Connected")
        tools = {"sys.info", "edge.ping"} | ({"cmd.run"} if i != 11 else set())
        fleet.append(
            DaemonSnapshot(
                node_id=f"web-{i:02d}",
                tenant_id="acme",
                status=status,
                os="linux",
                arch="x86_64",
                tools=tools,
                tags={"managed-fleet", "prod"},
            )
        )
    fleet.append(DaemonSnapshot(node_id="laptop-01", tenant_id="acme", status="Connected"))
    fleet.append(DaemonSnapshot(node_id="db-01", tenant_id="acme", status="Revoked"))
    return fleet


def plan(args: argparse.Namespace) -> int:
    # One parser for selector, mode, on-error and deadline: the CLI and relay use it too.
    spec = FleetSpec(
        selector=args.target,
        tool=args.tool,
        args={"cmd": args.cmd},
        mode=args.mode,
        on_error=args.on_error,
        deadline_secs=args.deadline or None,
    )
    resolution = resolve_targets(simulated_fleet(), spec.selector, spec.tool)
    print(f"preview: selector {spec.selector} matched {resolution.matched} daemons")
    print(f"  targets: {', '.join(resolution.targets)}")
    for skip in resolution.skipped:
        print(f"  skipped: {skip.node_id} ({skip.reason})")

    run = FleetRun(spec, resolution, fleet_command_id="fc-offline-1")
    print(f"plan: mode {spec.mode} (window {run.window}), on-error {spec.on_error}")
    rng = random.Random(7)  # noqa: S311 - the core draws no randomness; simulations bring theirs
    failing = set(args.fail.split(",")) - {""}
    finishing: list[tuple[float, str]] = []  # (finish time, node id) of in-flight targets
    cancelling: set[str] = set()
    now = 0.0

    def act(actions: list[Dispatch | Cancel | Finish]) -> None:
        for action in actions:
            if isinstance(action, Dispatch):
                print(f"t={now:5.1f}s dispatch {action.node_id}")
                heapq.heappush(finishing, (now + rng.uniform(5.0, 15.0), action.node_id))
            elif isinstance(action, Cancel):
                print(f"t={now:5.1f}s cancel   {action.node_id} ({action.reason})")
                cancelling.add(action.node_id)  # the daemon kills it and answers soon
                heapq.heappush(finishing, (now + 1.0, action.node_id))
            else:
                print(f"t={now:5.1f}s finish   {action.outcome}")

    act(run.start(now))
    while not run.finished:
        deadline = run.next_deadline()
        if finishing and (deadline is None or finishing[0][0] < deadline):
            now, node_id = heapq.heappop(finishing)
            if node_id not in run.in_flight:
                continue
            if node_id in cancelling:
                outcome, code = "cancelled", None
            else:
                outcome, code = ("error", 1) if node_id in failing else ("ok", 0)
            print(f"t={now:5.1f}s result   {node_id}: {outcome}")
            act(run.on_result(node_id, outcome, now, exit_code=code))
        elif deadline is not None:
            now = deadline
            act(run.on_tick(now))
        else:  # nothing in flight and nothing timed: cannot happen for a started run
            raise RuntimeError("the planner is waiting for nothing")

    record = run.record()
    print(f"record: outcome {record.outcome}; {record.halt_reason or 'no halt'}")
    for target in record.targets:
        why = f" ({target.skip_reason})" if target.skip_reason else ""
        print(f"  {target.node_id}: {target.outcome}{why}")
    if args.json:
        print(json.dumps(record.to_dict(), indent=2))
    return 0


# --------------------------------------------------------------------------- live


def run_live(args: argparse.Namespace) -> int:
    # Validate locally with the core's parsers first, so mistakes point at the column.
    parsed = FleetSpec(
        selector=args.target,
        tool=args.tool,
        mode=args.mode,
        on_error=args.on_error,
        deadline_secs=args.deadline or None,
    )
    spec = admin_pb2.FleetRunSpec(
        selector=str(parsed.selector),
        tool=parsed.tool,
        args_json=args.args_json,
        mode=str(parsed.mode),
        on_error=str(parsed.on_error),
        deadline_secs=parsed.deadline_secs or 0.0,
    )
    connection = Connection.resolve(  # flags first, then AEGIS_* variables
        args.relay,
        ca_cert=args.ca_cert,
        token=args.token,
        data_dir=args.relay_data_dir,
        insecure=args.insecure,
    )
    with AdminClient(connection) as admin:
        preview = admin.preview_fleet_run(spec)
        print(f"preview: {preview.matched} matched; targets {', '.join(preview.targets) or '-'}")
        for skip in preview.skipped:
            print(f"  skipped: {skip.node_id} ({skip.reason})")
        if not preview.targets:
            print("nothing to run on")
            return 1
        final: admin_pb2.FleetRun | None = None
        for event in admin.start_fleet_run(spec):
            kind = event.WhichOneof("body")
            if kind == "started":
                print(f"started {event.started.fleet_command_id}")
            elif kind == "dispatched":
                print(f"  dispatched {event.dispatched.node_id}")
            elif kind == "target_finished":
                t = event.target_finished
                code = f" exit {t.exit_code}" if t.has_exit_code else ""
                print(f"  finished   {t.node_id}: {target_outcome_name(t.outcome)}{code}")
            elif kind == "finished":
                final = event.finished
    if final is None:
        print("the event stream ended without a final record")
        return 1
    outcome = run_outcome_name(final.outcome)
    print(f"run {final.fleet_command_id}: {outcome} {final.halt_reason}".rstrip())
    for target in final.targets:
        name = target_outcome_name(target.outcome)
        print(f"  {target.node_id}: {name} {target.skip_reason}".rstrip())
    return 0 if outcome == "completed" else 1


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("plan", "run"):
        p = sub.add_parser(name)
        p.add_argument("--mode", default="rolling=5")
        p.add_argument("--on-error", default="stop-after=1")
        p.add_argument("--deadline", default="120s", help="'' for none")
    p_plan = sub.choices["plan"]
    p_plan.add_argument("--target", default="tags=managed-fleet")
    p_plan.add_argument("--tool", default="cmd.run")
    p_plan.add_argument("--cmd", default="/opt/aegis/upgrade.sh")
    p_plan.add_argument("--fail", default="web-05", help="comma-separated hosts that fail")
    p_plan.add_argument("--json", action="store_true", help="also print the record as JSON")
    p_run = sub.choices["run"]
    p_run.add_argument("--target", required=True)
    p_run.add_argument("--tool", required=True)
    p_run.add_argument("--args-json", default="{}")
    p_run.add_argument("--relay-data-dir")
    p_run.add_argument("--relay")
    p_run.add_argument("--ca-cert")
    p_run.add_argument("--token", help="the token, or @FILE")
    p_run.add_argument("--insecure", action="store_true")
    args = parser.parse_args(argv)
    try:
        return plan(args) if args.command == "plan" else run_live(args)
    except SelectorError as err:  # points at the column: "tags=AnyOf(a" -> ^ at the end
        print(f"error: {err.render()}", file=sys.stderr)
        return 2
    except AegisError as err:  # mode, on-error or deadline typos
        print(f"error: {err}", file=sys.stderr)
        return 2
    except AdminError as err:  # the relay's sentence, or what is missing to reach it
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
