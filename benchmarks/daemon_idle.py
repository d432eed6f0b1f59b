"""Idle footprint of an enrolled, connected daemon: RSS and CPU over a window, beside the floor.

    .venv/bin/python benchmarks/daemon_idle.py [--seconds 60] [--heartbeat-interval 30s]

Starts a real relay and a real daemon (``python -m aegis_edge_cli edge daemon``) on
loopback, waits until the daemon is connected, then samples /proc/<pid> once a second.
In the same window it samples the floor: ``daemon_floor.py`` (a bare grpc.aio TLS client
with ``cryptography`` loaded, idle on one stream to ``scale_floor.py`` with the relay's
certificate, writing a heartbeat-sized frame at the same interval).
Prints one JSON object: RSS (min/max/last, MiB), CPU (% of one core over the window), the
floor's RSS and the daemon's RSS as a ratio to it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aegis_edge_relay.durations import parse_duration
from tests.agent.harness import DaemonProcess, RelayProcess, enroll_host

HERE = Path(__file__).resolve().parent

CLK_TCK = os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_secs(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


@contextlib.contextmanager
def floor(relay: RelayProcess, root: Path, interval: float) -> Iterator[int]:
    """The floor client, connected to a bare floor server; yields the client's pid."""
    out = root / "floor.json"
    server = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "scale_floor.py"),
            "--cert",
            str(relay.data_dir / "server.pem"),
            "--key",
            str(relay.data_dir / "server.key"),
            "--out",
            str(out),
        ]
    )
    client: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 30
        while not out.exists():
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the floor server did not start")
            time.sleep(0.05)
        port = json.loads(out.read_text())["port"]
        client = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "daemon_floor.py"),
                "--address",
                f"127.0.0.1:{port}",
                "--ca",
                str(relay.info["ca_cert"]),
                "--interval",
                str(interval),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None
        if client.stdout.readline().strip() != "connected":
            raise RuntimeError("the floor client did not connect")
        yield client.pid
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)


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
            interval = parse_duration(args.heartbeat_interval)
            try:
                daemon.wait_event("connected")
                pid = daemon.proc.pid
                with floor(relay, root, interval) as floor_pid:
                    time.sleep(2)  # let start-up settle
                    rss: list[float] = []
                    floor_rss: list[float] = []
                    c0, t0 = cpu_secs(pid), time.monotonic()
                    while time.monotonic() - t0 < args.seconds:
                        rss.append(rss_mib(pid))
                        floor_rss.append(rss_mib(floor_pid))
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
                            "floor_rss_mib": {
                                "min": round(min(floor_rss), 1),
                                "max": round(max(floor_rss), 1),
                                "last": round(floor_rss[-1], 1),
                            },
                            "rss_ratio_to_floor": round(max(rss) / max(floor_rss), 2),
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
