"""Fleet scheduling benchmark: selector resolution over 100k daemons, a 10k-target run.

Run: ``python benchmarks/bench_fleet.py [--repeat N]``

Each row times the core against a baseline that does the least work that could be called
the same job, and prints the ratio (core / baseline):

* resolve -- ``resolve_targets`` over 100k snapshots (parse excluded; it is microseconds)
  vs. a list comprehension with the equivalent hand-written predicate that only collects
  targets (no skip reasons, no duplicate check).
* plan -- a full 10k-target run (``start``, every result fed back in dispatch order,
  ``Finish``) vs. a bare loop that appends one dispatch per target and pops results
  through a window of the same size.
* record -- ``record().to_dict()`` of the finished 10k-target run (no baseline).

Times are process CPU time (``time.process_time``), best of ``--repeat`` runs (default
5): the machine this runs on is shared, and wall-clock time would mostly measure the
neighbours.
"""

from __future__ import annotations

import argparse
import collections
import random
import time
from collections.abc import Callable

from aegis_edge_core.fleet import (
    DaemonSnapshot,
    Dispatch,
    Finish,
    FleetRun,
    FleetSpec,
    parse_selector,
    resolve_targets,
)

SELECTOR = "tags=AnyOf(potentially-affected,prod) os=linux"
TOOL = "cmd.run"


def make_fleet(size: int, seed: int = 5) -> list[DaemonSnapshot]:
    rnd = random.Random(seed)
    tag_pool = ["prod", "staging", "potentially-affected", "managed-fleet", "eu", "us", "gpu"]
    statuses = ["Connected"] * 17 + ["Unhealthy", "Disconnected", "Revoked"]
    fleet = []
    for i in range(size):
        tools = {"sys.info", "edge.ping", "keys.rotate"}
        if rnd.random() < 0.8:
            tools.add("cmd.run")
        fleet.append(
            DaemonSnapshot(
                node_id=f"node-{i:06d}",
                tenant_id=f"tenant-{i % 7}",
                status=rnd.choice(statuses),
                os=rnd.choice(["linux", "linux", "linux", "darwin", "windows"]),
                arch=rnd.choice(["x86_64", "aarch64"]),
                tools=tools,
                labels={"region": rnd.choice(["eu", "us", "ap"])},
                tags=set(rnd.sample(tag_pool, rnd.randint(0, 3))),
            )
        )
    return fleet


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return min(times)


def baseline_resolve(fleet: list[DaemonSnapshot]) -> list[str]:
    wanted = {"potentially-affected", "prod"}
    return [
        s.node_id
        for s in fleet
        if s.os.lower() == "linux"
        and not wanted.isdisjoint(s.tags)
        and s.status == "Connected"
        and TOOL in s.tools
    ]


def core_plan(fleet: list[DaemonSnapshot], mode: str) -> FleetRun:
    spec = FleetSpec(selector="all", tool=TOOL, mode=mode, on_error="continue")
    run = FleetRun(spec, resolve_targets(fleet, spec.selector, TOOL), fleet_command_id="bench")
    now = 0.0
    queue: collections.deque[str] = collections.deque()
    for action in run.start(now):
        if isinstance(action, Dispatch):
            queue.append(action.node_id)
    finished = False
    while queue:
        now += 0.001
        for action in run.on_result(queue.popleft(), "ok", now, exit_code=0):
            if isinstance(action, Dispatch):
                queue.append(action.node_id)
            elif isinstance(action, Finish):
                finished = True
    assert finished and run.finished
    return run


def baseline_plan(node_ids: list[str], window: int) -> list[tuple[str, str]]:
    log: list[tuple[str, str]] = []
    in_flight: collections.deque[str] = collections.deque()
    pending = iter(node_ids)
    for node_id in pending:
        log.append(("dispatch", node_id))
        in_flight.append(node_id)
        if len(in_flight) >= window:
            break
    while in_flight:
        log.append(("result", in_flight.popleft()))
        nxt = next(pending, None)
        if nxt is not None:
            log.append(("dispatch", nxt))
            in_flight.append(nxt)
    log.append(("finish", "completed"))
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--fleet", type=int, default=100_000)
    parser.add_argument("--targets", type=int, default=10_000)
    args = parser.parse_args()

    fleet = make_fleet(args.fleet)
    selector = parse_selector(SELECTOR)
    resolution = resolve_targets(fleet, selector, TOOL)
    assert list(resolution.targets) == sorted(baseline_resolve(fleet))

    rows: list[tuple[str, float, float | None, str]] = []
    core = best_of(args.repeat, lambda: resolve_targets(fleet, selector, TOOL))
    base = best_of(args.repeat, lambda: baseline_resolve(fleet))
    rows.append(
        (
            f"resolve {args.fleet // 1000}k snapshots",
            core,
            base,
            f"{resolution.matched} matched, {len(resolution.targets)} targets",
        )
    )

    def parse_many() -> None:
        for _ in range(1000):
            parse_selector(SELECTOR)

    parse = best_of(args.repeat, parse_many)
    rows.append(("parse_selector x1000", parse, None, SELECTOR))

    run_fleet = make_fleet(args.targets, seed=6)
    run_fleet = [
        DaemonSnapshot(
            node_id=s.node_id,
            tenant_id=s.tenant_id,
            status="Connected",
            os=s.os,
            arch=s.arch,
            tools=s.tools | {TOOL},
            labels=s.labels,
            tags=s.tags,
        )
        for s in run_fleet
    ]
    node_ids = sorted(s.node_id for s in run_fleet)
    finished_run: FleetRun | None = None
    for mode, window in (("all", args.targets), ("rolling=1000", 1000)):

        def go(mode: str = mode) -> None:
            nonlocal finished_run
            finished_run = core_plan(run_fleet, mode)

        def bare(window: int = window) -> None:
            baseline_plan(node_ids, window)

        core = best_of(args.repeat, go)
        base = best_of(args.repeat, bare)
        rows.append(
            (f"plan {args.targets // 1000}k targets, {mode}", core, base, "start+results+finish")
        )
    assert finished_run is not None
    done_run = finished_run
    record_time = best_of(args.repeat, lambda: done_run.record().to_dict())
    rows.append((f"record().to_dict() {args.targets // 1000}k", record_time, None, ""))

    title = f"case (CPU time, best of {args.repeat})"
    print(f"{title:<34} {'core ms':>10} {'baseline ms':>12} {'ratio':>7}  note")
    print("-" * 96)
    for name, core_s, base_s, note in rows:
        base_ms = f"{base_s * 1e3:12.2f}" if base_s is not None else f"{'-':>12}"
        ratio = f"{core_s / base_s:6.1f}x" if base_s else f"{'-':>7}"
        print(f"{name:<34} {core_s * 1e3:10.2f} {base_ms} {ratio}  {note}")


if __name__ == "__main__":
    main()
