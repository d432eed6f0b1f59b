"""Idle footprint of an enrolled, connected daemon: RSS and CPU over a window.

    .venv/bin/python benchmarks/daemon_idle.py [--seconds 60] [--heartbeat-interval 30s]

Starts a real relay and a real daemon (``python -m aegis_edge_cli edge daemon``) on
loopback, waits until the daemon is connected, then samples /proc/<pid> once a second.
Prints one JSON object: RSS (min/max/last, MiB) and CPU (% of one core over the window).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.agent.harness import DaemonProcess, RelayProcess, enroll_host

CLK_TCK = os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_secs(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--heartbeat-interval", default="30s")
    ap.add_argument("--malloc-arena-max", default="", help="e.g. 2 (glibc); as in the unit")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        relay = RelayProcess.start(
            root / "relay", heartbeat_interval=args.heartbeat_interval, stale_threshold="90s"
        )
        try:
            node = enroll_host(relay, root / "edge")
            env = {"MALLOC_ARENA_MAX": args.malloc_arena_max} if args.malloc_arena_max else {}
            daemon = DaemonProcess.start(node.state_dir, env=env)
            try:
                daemon.wait_event("connected")
                pid = daemon.proc.pid
                time.sleep(2)  # let start-up settle
                rss: list[float] = []
                c0, t0 = cpu_secs(pid), time.monotonic()
                while time.monotonic() - t0 < args.seconds:
                    rss.append(rss_mib(pid))
                    time.sleep(1)
                c1, t1 = cpu_secs(pid), time.monotonic()
                heartbeats = len(daemon.events("connected"))
                print(
                    json.dumps(
                        {
                            "window_secs": round(t1 - t0, 1),
                            "heartbeat_interval": args.heartbeat_interval,
                            "rss_mib": {
                                "min": round(min(rss), 1),
                                "max": round(max(rss), 1),
                                "last": round(rss[-1], 1),
                            },
                            "cpu_secs": round(c1 - c0, 3),
                            "cpu_percent_of_one_core": round(100 * (c1 - c0) / (t1 - t0), 3),
                            "connections": heartbeats,
                            "python": sys.version.split()[0],
                            "malloc_arena_max": args.malloc_arena_max or None,
                        },
                        indent=2,
                    )
                )
            finally:
                daemon.stop()
        finally:
            relay.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
