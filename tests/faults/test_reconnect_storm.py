"""1,000 daemons reconnecting at once after a relay restart.

Lightweight daemons (``storm_worker.py``: the core's ``DaemonSession`` over grpc.aio TLS,
the agent's reconnect rules, a seeded ``random.Random`` each) in 4 worker processes enroll,
connect and heartbeat; the relay is restarted on the same port (SIGTERM: it drains every
stream with its own "come back after" slot from 1 s on, spread over the drain rate, exits,
and a new process starts on the data dir). All
1,000 must end Connected again, none refused (no ``rate_limited``, nothing else either),
and the first reconnect attempts must be spread in time rather than land together.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from aegis_edge_core.drain import DEFAULT_ATTEST_RATE
from tests import https
from tests.agent.harness import RelayProcess, wait_until
from tests.faults.conftest import Tally
from tests.faults.helpers import metric_sum

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(150)]

N = 1000
WORKERS = 4
HEARTBEAT = "2s"
STALE = "6s"
REPO = Path(__file__).resolve().parents[2]
FDS_NEEDED = N + 1024  # the relay holds one socket per daemon, plus its own files
WINDOW = 0.1


class WorkerProc:
    def __init__(self, index: int, relay: RelayProcess) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.storm_worker"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ask(
            {"cmd": "init", "address": relay.endpoint, "ca": relay.ca_pem.decode(), "seed": index}
        )

    def send(self, req: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"storm worker exited ({self.proc.poll()})")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"storm worker: {reply.get('error')}")
        return reply

    def ask(self, req: dict[str, Any]) -> dict[str, Any]:
        self.send(req)
        return self.recv()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def scrape(relay: RelayProcess) -> str:
    return https.scrape(relay.info)


def connected(relay: RelayProcess) -> int:
    with contextlib.suppress(OSError):
        return int(metric_sum(scrape(relay), "aegis_edge_daemons_total", status="Connected"))
    return 0


def peak_share(times: list[float], window: float) -> float:
    """The largest share of ``times`` that falls in any one ``window``-second interval."""
    ts = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(ts):
        while t - ts[lo] > window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best / len(ts)


def test_reconnect_storm_1000_daemons(tmp_path: Path, tally: Tally) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < FDS_NEEDED:
        pytest.skip(f"needs a file-descriptor limit of {FDS_NEEDED} for {N} streams (hard {hard})")
    if soft < FDS_NEEDED:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the relay
    t_begin = time.monotonic()
    relay = RelayProcess.start(
        tmp_path / "relay", heartbeat_interval=HEARTBEAT, stale_threshold=STALE
    )
    workers: list[WorkerProc] = []
    try:
        workers = [WorkerProc(i, relay) for i in range(WORKERS)]
        per = N // WORKERS
        for w in workers:
            w.send(
                {"cmd": "enroll", "count": per, "token": relay.operator_token, "tenant": "storm"}
            )
        for w in workers:
            w.recv()
        t_enrolled = time.monotonic()
        for w in workers:
            w.ask({"cmd": "start"})
        wait_until(lambda: connected(relay) == N, 30, 0.25, what=f"{N} daemons Connected")
        t_connected = time.monotonic()
        # every daemon heartbeats at least once on its first stream
        wait_until(
            lambda: metric_sum(scrape(relay), "aegis_edge_heartbeats_total") >= N,
            20,
            0.25,
            what=f"{N} heartbeats",
        )

        t_restart = time.monotonic()
        relay = relay.restart(heartbeat_interval=HEARTBEAT, stale_threshold=STALE)
        tally.fault()
        t_listening = time.monotonic()
        wait_until(lambda: connected(relay) == N, 40, 0.25, what=f"{N} daemons Connected again")
        t_back = time.monotonic()

        reports = [w.ask({"cmd": "report"}) for w in workers]
        metrics = scrape(relay)
    finally:
        for w in workers:
            w.kill()
        relay.stop()

    accepts = list(itertools.chain.from_iterable(r["accepts"] for r in reports))
    lost = list(itertools.chain.from_iterable(r["lost"] for r in reports))
    attempts = list(itertools.chain.from_iterable(r["attempts"] for r in reports))
    refusals = [x for r in reports for x in r["refusals"]]
    errors = [x for r in reports for x in r["errors"]]
    drain_waits = list(itertools.chain.from_iterable(r["drain_delays"] for r in reports))
    drained = [ws[0] if ws else None for ws in drain_waits]
    asked = [w for w in drained if w is not None]
    assert sum(r["connected"] for r in reports) == N
    assert len(accepts) == N and min(accepts) >= 2, "a daemon never came back"
    assert refusals == [], f"refused during the storm: {sorted(set(refusals))}"
    assert metric_sum(metrics, "aegis_edge_attestation_refusals_total") == 0

    # When each daemon tried again after losing its first stream.
    first_retry = []
    for lost_at, tried in zip(lost, attempts, strict=True):
        assert lost_at, "a daemon never lost its stream in the restart"
        first_retry.append(next(t for t in tried if t >= lost_at[0]))
    drop = [la[0] for la in lost]
    waits = [t - d for t, d in zip(first_retry, drop, strict=True)]
    wq = statistics.quantiles(waits, n=10)
    peak = peak_share(first_retry, WINDOW)
    q = statistics.quantiles(first_retry, n=10)
    spread_p10_p90 = q[-1] - q[0]
    print(
        f"storm: enrolled {N} in {t_enrolled - t_begin:.1f}s, Connected in "
        f"{t_connected - t_enrolled:.1f}s; restart took {t_listening - t_restart:.1f}s; "
        f"all {N} Connected again {t_back - t_restart:.1f}s after the restart began "
        f"({t_back - t_listening:.1f}s after the new relay listened); streams dropped within "
        f"{max(drop) - min(drop):.2f}s; first retries: p10-p90 {spread_p10_p90:.2f}s, "
        f"stdev {statistics.stdev(first_retry):.2f}s, peak {peak:.0%} in one {WINDOW:.1f}s "
        f"window; {len(asked)} drained, waits drawn {min(asked, default=0):.2f}-"
        f"{max(asked, default=0):.2f}s; "
        f"wait after the drop: min {min(waits):.2f}s p10 {wq[0]:.2f}s p90 {wq[-1]:.2f}s "
        f"max {max(waits):.2f}s; attempts {sum(map(len, attempts))}, refusals {len(refusals)}, "
        f"transport errors {len(errors)} ({sorted(set(errors))})"
    )
    # The drain reached (nearly) every daemon at nearly the same moment (a stream the relay
    # cut at the end of its drain grace instead backs off on the schedule) ...
    assert len(asked) >= N // 2, f"only {len(asked)} daemons heard the relay's Drain"
    assert max(drop) - min(drop) < 10.0
    # ... each drained one waited at least what the relay asked (its slot: 1 s, up to
    # 1 s + N / rate for the last), its own jittered time ...
    latest = 1.0 + N / DEFAULT_ATTEST_RATE + 0.5
    assert all(1.0 <= w <= latest for w in asked), (min(asked), max(asked))
    aq = statistics.quantiles(asked, n=10)
    assert aq[-1] - aq[0] >= 0.3, f"drawn waits spread over only {aq[-1] - aq[0]:.2f}s"
    assert min(w for w, a in zip(waits, drained, strict=True) if a is not None) >= 1.0 - 0.01
    assert wq[-1] - wq[0] >= 0.25, f"waits after the drain spread over {wq[-1] - wq[0]:.2f}s"
    # ... so they did not all come back at the same moment (uniform jitter alone puts ~20%
    # in a 100 ms window; a herd that waited exactly 1 s puts 30-55% there on this machine).
    assert peak <= 0.5, f"{peak:.0%} of first retries fell in one {WINDOW}s window"
    assert spread_p10_p90 >= 0.25, f"first retries spread over only {spread_p10_p90:.2f}s"
