"""Two relays over one PostgreSQL beside one relay holding the same fleet, in one run.

    .venv/bin/python benchmarks/cluster_scale.py --store postgresql://postgres@127.0.0.1:54329/postgres
    .venv/bin/python benchmarks/cluster_scale.py --per-relay 1000 --store URL   # ~5 minutes

Built from ``scale.py``'s pieces (its ``Relay``, ``Workers``, samplers and fleet run; the load
generators dial the next endpoint when their relay is gone, as the agent does). On 127.0.0.1,
each phase on a fresh database of that (local) server:

1. baseline: one relay holding 2 x ``--per-relay`` daemons at a 30 s heartbeat -- its RSS
   and CPU, the database server's CPU, the node and holder rows the database read per
   cluster sync (its table statistics), a fleet ``edge.ping`` over all of them, and the
   storm when the relay is killed (kill -9) and started again on its port: seconds from
   the kill until every daemon's stream is held again;
2. the cluster: relay A creates cluster ``bench``, relay B joins it with A's join bundle;
   half the load generators dial A first, half B. Each relay's RSS and CPU and the database
   server's CPU over the same window; a fleet ``edge.ping`` over all, started on A: its wall
   time and the share of targets whose stream B held (routed through the database); then
   B is killed (kill -9) and its daemons move to A: seconds from the kill until A holds
   every stream (``stream_holders``).

Each cluster figure is printed beside the baseline's, with the ratio. JSON goes to
``benchmarks/results/cluster.json`` and the table into ``docs/benchmarks.md`` between the
``cluster:begin``/``cluster:end`` markers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from aegis_edge_core.cluster import lease_ttl, renew_every

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import (  # the sibling benchmark, not an installed module
    PER_WORKER,
    REPO,
    Procs,
    Relay,
    Workers,
    commit,
    cpu_secs,
    enroll,
    fleet_run,
    fresh_database,
    log,
    machine,
    ratio,
    rss_mb,
    server_pids,
    wait_for,
    write_docs,
)

HEARTBEAT = 30.0


def holders(url: str) -> dict[str, int]:
    """Streams held per relay, as the store records them."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT relay_id, count(*) FROM stream_holders GROUP BY relay_id"
        ).fetchall()
    return {str(r): int(c) for r, c in rows}


def server_cpu(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            out[pid] = cpu_secs(pid)
    return out


def rows_read(url: str) -> int:
    """Rows of ``nodes`` and ``stream_holders`` the database has read so far (sequential and
    index reads, from its statistics): what the relays' cluster syncs cost it."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT COALESCE(SUM(seq_tup_read + COALESCE(idx_tup_fetch, 0)), 0)"
            " FROM pg_stat_user_tables WHERE relname IN ('nodes', 'stream_holders')"
        ).fetchone()
    return int(row[0]) if row is not None else 0


def steady(relays: list[Relay], server: list[int], window: float, url: str) -> dict[str, Any]:
    """RSS and CPU of each relay and of the database server over one shared window, and the
    node and holder rows read per cluster sync (each relay syncs every ``renew_every``)."""
    c0 = [cpu_secs(r.pid) for r in relays]
    r0 = rows_read(url)
    s0, t0 = server_cpu(server), time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - t0
    s1 = server_cpu(server)
    time.sleep(1.5)  # the backends report their table statistics at most once a second
    rows = rows_read(url) - r0
    syncs = len(relays) * elapsed / renew_every(lease_ttl(3 * HEARTBEAT))
    # backends that came or went during the window (other clients') count for nothing
    db = sum(s1[pid] - s0[pid] for pid in s0.keys() & s1.keys())
    return {
        "rows_per_sync": round(rows / syncs, 1),
        "relays": [
            {
                "rss_mb": round(rss_mb(r.pid), 1),
                "cpu_cores": round((cpu_secs(r.pid) - c) / elapsed, 4),
            }
            for r, c in zip(relays, c0, strict=True)
        ],
        "db_cpu_cores": round(db / elapsed, 4),
    }


def connect_all(workers: Workers, n: int, url: str, timeout: float) -> float:
    workers.target(n)
    return wait_for(
        lambda: workers.stats()["connected"] >= n and sum(holders(url).values()) >= n,
        timeout,
        f"{n} daemons held",
        interval=0.5,
    )


def kill_storm(
    procs: Procs,
    killed: Relay,
    workers: Workers,
    survivor: Relay,
    moving: int,
    url: str,
    timeout: float,
    *,
    restart: bool,
) -> float:
    """kill -9 ``killed`` (and start it again on its port when ``restart``): seconds until
    ``moving`` daemons attested anew and ``survivor`` holds every stream."""
    n = workers.stats()["connected"]
    accepted = workers.stats()["accepted"]
    t0 = time.monotonic()
    assert killed.proc is not None
    procs.kill(killed.proc)
    killed.proc.wait(10)
    if restart:
        killed.start(HEARTBEAT)
    wait_for(
        lambda: (
            workers.stats()["accepted"] - accepted >= moving
            and holders(url).get(survivor.info["relay_id"], 0) >= n
        ),
        timeout,
        f"{survivor.address} holding all {n}",
        interval=0.1,
    )
    return round(time.monotonic() - t0, 2)


def finish(procs: Procs, workers: Workers, relay: Relay) -> None:
    workers.target(0)
    for proc in workers.workers:
        procs.stop(proc, timeout=10)
    relay.stop()


def single(args: argparse.Namespace, procs: Procs, root: Path, url: str) -> dict[str, Any]:
    n = 2 * args.per_relay
    relay = Relay(procs, root / "single", store_url=url)
    relay.start(HEARTBEAT)
    workers = Workers(
        procs, max(1, math.ceil(n / PER_WORKER)), relay.address, Path(relay.info["ca_cert"]), root
    )
    log(f"single: enrolling {n}")
    enroll(relay, workers, n)
    timeout = max(120.0, n / 40)
    connect_all(workers, n, url, timeout)
    time.sleep(3.0)
    out = steady([relay], server_pids(url), args.window, url)
    log(f"single: steady {out}; fleet edge.ping over {n}")
    out["fleet"] = fleet_run(relay, "all", timeout=timeout)
    out["storm_s"] = kill_storm(procs, relay, workers, relay, n, url, timeout, restart=True)
    log(f"single: {out}")
    finish(procs, workers, relay)
    return out


def cluster(args: argparse.Namespace, procs: Procs, root: Path, url: str) -> dict[str, Any]:
    per, n = args.per_relay, 2 * args.per_relay
    a = Relay(procs, root / "a", store_url=url, extra=("--cluster", "bench"))
    a.start(HEARTBEAT)
    bundle = root / "bundle.json"
    subprocess.run(
        [sys.executable, "-m", "aegis_edge_cli", "relay", "join-bundle",
         "--data-dir", str(a.data_dir), "--out", str(bundle)],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    b = Relay(procs, root / "b", store_url=url, extra=("--join-bundle", str(bundle)))
    b.start(HEARTBEAT)
    k = max(1, math.ceil(per / PER_WORKER))
    both = Workers(procs, 2 * k, a.address, Path(a.info["ca_cert"]), root)
    # the first k load generators dial A first, the others B; each enrolls at its first
    # (with A's operator token, which B honours)
    order = ([a.address, b.address], [b.address, a.address])
    both.all(
        {"cmd": "address"},
        per=lambda i: {"address": order[i >= k][0], "endpoints": order[i >= k]},
    )
    log(f"cluster: enrolling {n}, half at A and half at B")
    enroll(a, both, n)
    timeout = max(120.0, n / 40)
    connect_all(both, n, url, timeout)
    time.sleep(3.0)
    out = steady([a, b], server_pids(url), args.window, url)
    held = holders(url)
    log(f"cluster: steady {out}, held {held}; fleet edge.ping over {n} started on A")
    out["fleet"] = fleet_run(a, "all", timeout=timeout)
    out["crossed_share"] = round(held.get(b.info["relay_id"], 0) / n, 3)
    out["moved"] = held.get(b.info["relay_id"], 0)
    out["storm_s"] = kill_storm(procs, b, both, a, out["moved"], url, timeout, restart=False)
    log(f"cluster: {out}")
    finish(procs, both, a)
    return out


def table(res: dict[str, Any]) -> str:
    one, two = res["single"], res["cluster"]
    r1 = one["relays"][0]
    ra, rb = two["relays"]
    n = 2 * res["per_relay"]
    rows = [
        ("relay RSS (MB)", r1["rss_mb"], f"{ra['rss_mb']} / {rb['rss_mb']}",
         ratio(max(ra["rss_mb"], rb["rss_mb"]), r1["rss_mb"])),
        ("relay CPU, 30 s beats (cores; ratio: A+B)", r1["cpu_cores"],
         f"{ra['cpu_cores']} / {rb['cpu_cores']}",
         ratio(ra["cpu_cores"] + rb["cpu_cores"], r1["cpu_cores"])),
        ("PostgreSQL server CPU (cores)", one["db_cpu_cores"], two["db_cpu_cores"],
         ratio(two["db_cpu_cores"], one["db_cpu_cores"])),
        ("node + holder rows read per idle cluster sync", one["rows_per_sync"],
         two["rows_per_sync"], ""),
        (f"fleet edge.ping over {n}, wall (s)", one["fleet"]["wall_s"], two["fleet"]["wall_s"],
         ratio(two["fleet"]["wall_s"], one["fleet"]["wall_s"])),
        ("  targets ok", one["fleet"]["ok"], two["fleet"]["ok"], ""),
        ("  share held by the other relay", "-", two["crossed_share"], ""),
        ("kill -9 a relay: all held again (s)", one["storm_s"], two["storm_s"],
         ratio(two["storm_s"], one["storm_s"])),
    ]  # fmt: skip
    lines = [
        f"| figure | one relay, {n} | two relays (A / B), {n} over both | ratio |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--store", required=True, help="a PostgreSQL server URL (local)")
    ap.add_argument("--per-relay", type=int, default=5000, help="daemons per relay (5000)")
    ap.add_argument("--window", type=float, default=20.0, help="steady sampling window (s)")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = ap.parse_args()
    procs = Procs()
    res: dict[str, Any] = {
        "per_relay": args.per_relay,
        "machine": machine(),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/cluster_scale.py "
        + " ".join(sys.argv[1:]).replace(args.store, "URL"),
    }
    try:
        with tempfile.TemporaryDirectory(prefix="aegis-cluster-bench-") as tmp:
            root = Path(tmp)
            with fresh_database(args.store) as url:
                res["single"] = single(args, procs, root, url)
            with fresh_database(args.store) as url:
                res["cluster"] = cluster(args, procs, root, url)
    finally:
        procs.kill_all()
    text = table(res)
    print(text)
    out = REPO / "benchmarks" / "results" / "cluster.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    if not args.no_docs:
        write_docs(res, text, section="cluster")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
