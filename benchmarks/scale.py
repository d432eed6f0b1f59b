"""Scale harness: N daemons over TLS on one relay, beside the bare gRPC floor, in one run.

    .venv/bin/python benchmarks/scale.py                      # N=10000, ~10 minutes
    .venv/bin/python benchmarks/scale.py --daemons 1000 --quick   # ~2 minutes

What it does (all on 127.0.0.1; every process it starts is in its own process group and is
killed on exit, Ctrl-C or failure):

1. starts a real relay (``python -m aegis_edge_cli relay serve``, port 0, read from
   ``D/relay.json``) and enrolls N daemons through the Enrollment RPC, with tokens from
   Admin ``IssueEnrollmentToken`` and ``D/operator.token`` (timed on its own);
2. load generators (``scale_loadgen.py``, ~2500 daemons each, so each stays far below the
   per-process file limit) connect 1k, 5k, N daemons; at each step the relay's RSS and CPU
   (utime+stime per second, ``/proc/<pid>/stat``) are sampled over a window at a 30 s
   heartbeat, later again at a 1 s heartbeat (stress);
3. fleet runs of ``edge.ping`` over all connected daemons, mode ``all`` and ``rolling=1000``:
   wall time, and per-node dispatch-to-result latency from the run's targets;
4. reconnect storm: the relay is restarted (SIGTERM: drain; same port) with N attached --
   seconds until ``aegis_edge_daemons_total{status="Connected"}`` is N again;
5. the floor: ``scale_floor.py`` (a grpc.aio server that only holds the streams and reads
   heartbeat-sized messages, same TLS, same server options) under the same N streams;
6. one real ``aegis edge daemon`` idle (``benchmarks/daemon_idle.py``).

``--store postgresql://USER@127.0.0.1:PORT/DB`` instead runs the store comparison: the same
N daemons on a relay with SQLite, then on a relay with a fresh database on that (local)
server, each figure printed as PostgreSQL/SQLite -- steady relay CPU at a 30 s heartbeat,
the database server's own CPU (its postmaster and children, from /proc), the relay's RSS,
the time one heartbeat flush of all N takes, a fleet ``edge.ping`` over all N, and a
graceful restart (``serve --take-over``, from the old relay's signal to all N Connected)::

    .venv/bin/python benchmarks/scale.py --daemons 1000 --quick \
        --store postgresql://postgres@127.0.0.1:54329/postgres

Results: a table on stdout with each relay figure as a ratio to the floor, JSON in
``benchmarks/results/latest.json`` (``--quick``: ``quick.json``) and, for full runs, the
table in ``docs/benchmarks.md`` between the ``scale:begin``/``scale:end`` markers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Final

import grpc

from aegis_edge_core.wire import admin_pb2, admin_pb2_grpc, common_pb2
from aegis_edge_relay.server import _grpc_options

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PER_WORKER = 2500
TARGET = {
    "relay_rss_mb": 1250.0,
    "rss_ratio": 1.5,
    "relay_cpu_cores_30s": 0.1,
    "storm_seconds": 30.0,
    "fleet_all_seconds": 5.0,
    "daemon_idle_rss_mb": 30.0,
    "daemon_idle_cpu_pct": 0.1,
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


# ---------------------------------------------------------------------- processes


class Procs:
    """Every process the harness starts, each in its own session/process group."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        kw.setdefault("cwd", REPO)
        proc = subprocess.Popen(argv, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> float:
        """SIGTERM the group, wait (bounded), SIGKILL; returns seconds it took."""
        t0 = time.monotonic()
        self.kill(proc, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            proc.wait(10)
        self.kill(proc)  # stragglers of the group
        return time.monotonic() - t0

    def kill_all(self) -> None:
        for proc in self.procs:
            self.kill(proc)
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.wait(5)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_secs(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def sample(pid: int, window: float) -> dict[str, float]:
    c0, t0 = cpu_secs(pid), time.monotonic()
    peak = rss_mb(pid)
    while time.monotonic() - t0 < window:
        time.sleep(min(1.0, window))
        peak = max(peak, rss_mb(pid))
    c1, t1 = cpu_secs(pid), time.monotonic()
    return {
        "rss_mb": round(rss_mb(pid), 1),
        "rss_peak_mb": round(peak, 1),
        "cpu_cores": round((c1 - c0) / (t1 - t0), 4),
        "window_s": round(t1 - t0, 1),
        "fds": fd_count(pid),
    }


class Relay:
    def __init__(
        self, procs: Procs, data_dir: Path, store_url: str = "", extra: tuple[str, ...] = ()
    ) -> None:
        self.procs = procs
        self.data_dir = data_dir
        self.store_url = store_url
        self.extra = extra
        self.code = ""
        """A source tree whose ``aegis_*`` packages the relay runs instead of this one's
        (``--baseline``): ahead of the editable install on its ``sys.path``."""
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self.port = 0
        self.profile_dir: Path | None = None
        """``--profile`` with ``--only storm``: py-spy on the old relay and the successor of
        each take-over."""

    def start(self, heartbeat: float, timeout: float = 120.0) -> float:
        """Start (same port after the first start); returns seconds until relay.json."""
        info = self.data_dir / "relay.json"
        with contextlib.suppress(FileNotFoundError):
            info.unlink()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        self._spawn(heartbeat)
        assert self.proc is not None
        while True:
            if info.exists():
                with contextlib.suppress(ValueError):
                    data = json.loads(info.read_text())
                    if data.get("pid") == self.proc.pid:
                        self.info = data
                        self.port = int(data["port"])
                        return time.monotonic() - t0
            if self.proc.poll() is not None:
                tail = (self.data_dir / "stderr.log").read_text()[-2000:]
                raise RuntimeError(f"relay exited with {self.proc.returncode}: {tail}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError("relay did not write relay.json in time")
            time.sleep(0.02)

    def _spawn(self, heartbeat: float) -> None:
        self.proc = self.procs.spawn(
            [
                sys.executable,
                "-m",
                "aegis_edge_cli",
                "relay",
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--metrics-listen",
                "127.0.0.1:0",
                "--heartbeat-interval",
                f"{heartbeat}s",
                "--stale-threshold",
                f"{3 * heartbeat}s",
                *(["--store", self.store_url] if self.store_url else []),
                *self.extra,
            ],
            stdout=open(self.data_dir / "stdout.log", "ab"),  # noqa: SIM115
            stderr=open(self.data_dir / "stderr.log", "ab"),  # noqa: SIM115
            env={**os.environ, "PYTHONPATH": self.code} if self.code else None,
            cwd=self.code or REPO,  # `-m` puts the working directory first on sys.path
        )

    def stop(self) -> float:
        assert self.proc is not None
        return self.procs.stop(self.proc, timeout=60)

    def take_over(self, heartbeat: float, timeout: float = 120.0) -> tuple[float, float]:
        """``serve --take-over`` on the same data dir and port: the successor binds beside
        this relay, signals it, and serves once it has closed its store. Returns seconds
        until the successor's relay.json and until the old process exited."""
        assert self.proc is not None
        old, old_extra = self.proc, self.extra
        self.extra = (*old_extra, "--take-over")
        info = self.data_dir / "relay.json"
        t0 = time.monotonic()
        spies = []
        if self.profile_dir is not None:
            tag = f"{time.strftime('%H%M%S')}-{self.rate_label()}"
            spies.append(profile(old.pid, 30, self.profile_dir / f"stop-{tag}.txt"))
        try:
            self._spawn(heartbeat)
        finally:
            self.extra = old_extra
        if self.profile_dir is not None:
            spies.append(profile(self.proc.pid, 60, self.profile_dir / f"successor-{tag}.txt"))
        old_exit = 0.0
        while True:
            if not old_exit and old.poll() is not None:
                old_exit = time.monotonic() - t0
            if info.exists():
                with contextlib.suppress(ValueError):
                    data = json.loads(info.read_text())
                    if data.get("pid") == self.proc.pid:
                        self.info = data
                        break
            if self.proc.poll() is not None:
                tail = (self.data_dir / "stderr.log").read_text()[-2000:]
                raise RuntimeError(f"successor exited with {self.proc.returncode}: {tail}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError("the successor did not write relay.json in time")
            time.sleep(0.02)
        ready = time.monotonic() - t0
        old.wait(60)
        return ready, old_exit or time.monotonic() - t0

    def rate_label(self) -> str:
        """The ``--drain-rate`` this relay was started with (``default`` if none)."""
        rates = [v for k, v in itertools.pairwise(self.extra) if k == "--drain-rate"]
        return rates[-1] if rates else "default"

    def last_draining_at(self) -> float:
        """Wall time of the last ``relay.draining`` line: when the old relay got its signal."""
        at = 0.0
        for line in (self.data_dir / "stderr.log").read_text().splitlines():
            if '"relay.draining"' in line:
                with contextlib.suppress(ValueError, KeyError):
                    stamp = json.loads(line)["timestamp"]
                    at = datetime.datetime.fromisoformat(stamp).timestamp()
        return at

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def address(self) -> str:
        return str(self.info["listen"])

    def connected(self) -> int:
        context = ssl.create_default_context(cafile=str(self.info["ca_cert"]))
        with urllib.request.urlopen(self.info["metrics"], timeout=10, context=context) as resp:
            text = resp.read().decode()
        total = 0.0
        for m in re.finditer(
            r"^aegis_edge_daemons_total\{([^}]*)\} ([0-9.e+]+)$", text, re.MULTILINE
        ):
            if 'status="Connected"' in m.group(1):
                total += float(m.group(2))
        return int(total)

    def channel(self) -> grpc.Channel:
        ca = Path(self.info["ca_cert"]).read_bytes()
        return grpc.secure_channel(
            self.address,
            grpc.ssl_channel_credentials(root_certificates=ca),
            options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)],
        )

    def auth(self) -> tuple[tuple[str, str], ...]:
        token = Path(self.info["operator_token"]).read_text().strip()
        return (("authorization", f"Bearer {token}"),)


class Workers:
    """Load-generator processes, spoken to with JSON lines."""

    def __init__(self, procs: Procs, count: int, address: str, ca: Path, log_dir: Path) -> None:
        self.procs = procs
        self.workers = []
        for i in range(count):
            proc = procs.spawn(
                [sys.executable, str(HERE / "scale_loadgen.py")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=open(log_dir / f"loadgen-{i}.log", "ab"),  # noqa: SIM115
            )
            self.workers.append(proc)
        self.all({"cmd": "init", "address": address, "ca": str(ca)}, per=lambda i: {"seed": i})

    def all(
        self, req: dict[str, Any], *, per: Any = None, timeout: float = 60.0
    ) -> list[dict[str, Any]]:
        for i, proc in enumerate(self.workers):
            body = dict(req, **(per(i) if per else {}))
            assert proc.stdin is not None
            proc.stdin.write((json.dumps(body) + "\n").encode())
            proc.stdin.flush()
        out = []
        deadline = time.monotonic() + timeout
        for proc in self.workers:
            assert proc.stdout is not None
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"load generator {proc.pid} did not answer {req['cmd']}")
                ready, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
                if ready:
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"load generator {proc.pid} exited ({proc.returncode})")
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"load generator {proc.pid} closed its pipe")
            reply = json.loads(line)
            if not reply.get("ok"):
                raise RuntimeError(f"load generator {proc.pid}: {reply.get('error')}")
            out.append(reply)
        return out

    def split(self, n: int) -> list[int]:
        k = len(self.workers)
        return [n // k + (1 if i < n % k else 0) for i in range(k)]

    def target(self, n: int) -> None:
        shares = self.split(n)
        self.all({"cmd": "target"}, per=lambda i: {"n": shares[i]})

    def floor(self, address: str, n: int, interval: float) -> None:
        shares = self.split(n)
        self.all(
            {"cmd": "floor", "address": address, "interval": interval},
            per=lambda i: {"n": shares[i]},
        )

    def stats(self) -> dict[str, Any]:
        replies = self.all({"cmd": "stats"})
        total: dict[str, Any] = {"errors": {}}
        for r in replies:
            for k in ("daemons", "connected", "attempts", "accepted", "results", "floor_open"):
                total[k] = total.get(k, 0) + r[k]
            for k, v in r["errors"].items():
                total["errors"][k] = total["errors"].get(k, 0) + v
        total["pids"] = [p.pid for p in self.workers]
        return total


def enroll(relay: Relay, workers: Workers, n: int) -> float:
    """Enroll ``n`` daemons through the Enrollment RPC, spread over the load generators;
    returns the seconds it took."""
    t0 = time.monotonic()
    shares = workers.split(n)
    workers.all(
        {
            "cmd": "enroll",
            "token_path": relay.info["operator_token"],
            "tenant": "bench",
            "conc": 32,
        },
        per=lambda i: {"count": shares[i]},
        timeout=max(120.0, n / 20),
    )
    return time.monotonic() - t0


def wait_for(pred: Any, timeout: float, what: str, interval: float = 0.25) -> float:
    t0 = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------- phases


def hold(relay: Relay, workers: Workers, n: int, window: float, timeout: float) -> dict[str, Any]:
    t0 = time.monotonic()
    workers.target(n)
    last: dict[str, Any] = {}

    def ready() -> bool:
        nonlocal last
        last = workers.stats()
        return bool(last["connected"] >= n and relay.connected() >= n)

    saturated = False
    try:
        wait_for(ready, timeout, f"{n} daemons connected", interval=0.5)
    except RuntimeError:
        # A saturated relay (1 s heartbeat stress) may never hold them all: measure what it
        # holds and say so, rather than lose the run.
        saturated = True
        log(f"  not all connected after {timeout:.0f}s: {last}")
    connect_s = time.monotonic() - t0
    time.sleep(min(3.0, window / 3))
    res = sample(relay.pid, window)
    res["connect_s"] = round(connect_s, 1)
    if saturated:
        res["saturated"] = True
        res["connected"] = relay.connected()
    return res


def hold_floor(
    pid: int, workers: Workers, address: str, n: int, hb: float, window: float, timeout: float
) -> dict[str, Any]:
    workers.floor(address, n, hb)
    wait_for(lambda: workers.stats()["floor_open"] >= n, timeout, f"{n} floor streams", 0.5)
    time.sleep(min(3.0, window / 3))
    return sample(pid, window)


def fleet_run(
    relay: Relay, mode: str, timeout: float, *, summary_only: bool = False
) -> dict[str, Any]:
    """``summary_only``: ask for progress counts instead of per-target events, as the
    operator CLI does off a terminal (an older client's stream otherwise)."""
    spec = admin_pb2.FleetRunSpec(
        selector="all",
        tool="edge.ping",
        mode=mode,
        args_json='{"echo": "bench"}',
        summary_only=summary_only,
    )
    with relay.channel() as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        t0 = time.monotonic()
        c0 = cpu_secs(relay.pid)
        finished = None
        first_result = None
        for event in admin.StartFleetRun(spec, metadata=relay.auth(), timeout=timeout):
            kind = event.WhichOneof("body")
            if first_result is None and (
                kind == "target_finished" or (kind == "progress" and event.progress.finished)
            ):
                first_result = time.monotonic() - t0
            if kind == "finished":
                finished = event.finished
        wall = time.monotonic() - t0
        cpu = cpu_secs(relay.pid) - c0
    assert finished is not None, "no finished event"
    lat = sorted(
        t.finished_at - t.dispatched_at
        for t in finished.targets
        if t.finished_at and t.dispatched_at
    )
    ok = sum(1 for t in finished.targets if t.outcome == common_pb2.TARGET_OUTCOME_OK)

    def pct(p: float) -> float:
        if not lat:
            return float("nan")
        return round(1000 * lat[min(len(lat) - 1, math.ceil(p * len(lat)) - 1)], 1)

    return {
        "mode": mode,
        "wall_s": round(wall, 2),
        "targets": len(finished.targets),
        "ok": ok,
        "skipped": len(finished.skipped),
        "outcome": common_pb2.RunOutcome.Name(finished.outcome),
        "latency_ms_p50": pct(0.50),
        "latency_ms_p99": pct(0.99),
        "latency_ms_max": pct(1.0),
        "first_result_s": round(first_result or 0.0, 3),
        "relay_cpu_s": round(cpu, 2),
    }


UNIFORM_DRAIN: Final = ("--drain-rate", "1e9")
"""The relay's drain before per-stream slots: every daemon told "come back after 1 s" (a rate
this high makes the plan's spread ~0). The storm "before" runs with it."""


def storm(
    relay: Relay, workers: Workers, n: int, hb: float, timeout: float, *, take_over: bool = False
) -> dict[str, Any]:
    """Restart the relay holding ``n`` and time until all are Connected again. Plain: SIGTERM,
    wait for the exit, start again on the port. ``take_over``: ``serve --take-over`` (the
    successor binds beside the old relay and signals it); its clock starts at the spawn."""
    before = workers.stats()
    # The clock starts at the signal: the old relay's shutdown is part of the storm.
    t0 = time.monotonic()
    if take_over:
        listen_s, stop_s = relay.take_over(hb)
    else:
        stop_s = relay.stop()
        listen_s = relay.start(hb)
    t_listen = time.monotonic()
    c0 = cpu_secs(relay.pid)
    first = None

    def all_connected() -> bool:
        nonlocal first
        c = relay.connected()
        if c and first is None:
            first = time.monotonic()
        return c >= n

    wait_for(all_connected, timeout, f"{n} daemons reconnected", interval=0.1)
    t_all = time.monotonic()
    # From the old relay's signal (SIGTERM, or the successor's SIGUSR2 once it is bound):
    # a successor's own start-up happens while the old relay still serves every daemon.
    from_signal = time.time() - relay.last_draining_at()
    cpu = cpu_secs(relay.pid) - c0
    st = workers.stats()
    return {
        "relay_stop_s": round(stop_s, 2),
        "relay_start_s": round(listen_s, 2),
        "storm_s": round(t_all - t0, 2),
        "from_signal_s": round(from_signal, 2),
        "storm_from_listen_s": round(t_all - t_listen, 2),
        "first_connected_after_listen_s": round((first or t_all) - t_listen, 2),
        "attestations_per_s": round(n / max(1e-6, t_all - (first or t_listen)), 1),
        "relay_cpu_cores_during": round(cpu / max(1e-6, t_all - t_listen), 2),
        "relay_rss_mb_after": round(rss_mb(relay.pid), 1),
        "client_attempts_total": st["attempts"],
        "client_attempts_failed": st["attempts"] - before["attempts"] - n,
        "client_errors": {
            k: v - before["errors"].get(k, 0)
            for k, v in st["errors"].items()
            if v > before["errors"].get(k, 0)
        },
    }


def restart_storms(
    relay: Relay, workers: Workers, n: int, rates: list[str] | None = None
) -> dict[str, Any]:
    """The restart before and after, one after the other on the same fleet: a plain restart
    of a relay draining with the uniform 1 s hint, then ``--take-over`` of a relay draining
    with per-stream slots (the default ``--drain-rate``; with ``rates``, one take-over per
    rate, each drained by a relay started with that ``--drain-rate``)."""
    timeout = max(120.0, n / 40)
    assert relay.extra[-2:] == UNIFORM_DRAIN, "the relay must hold the fleet with the old drain"
    base = relay.extra[:-2]
    plan = rates or [""]

    def with_rate(rate: str) -> tuple[str, ...]:
        return (*base, "--drain-rate", rate) if rate else base

    relay.extra = with_rate(plan[0])
    log(f"reconnect storm: restarting the relay with {n} daemons attached (uniform drain)")
    before = storm(relay, workers, n, 30.0, timeout=timeout)
    log(f"  {before}")
    afters = []
    for i, rate in enumerate(plan):
        relay.extra = with_rate(plan[i + 1] if i + 1 < len(plan) else rate)
        log(f"graceful restart: --take-over of {n} daemons, drain rate {rate or 'default'}")
        after = storm(relay, workers, n, 30.0, timeout=timeout, take_over=True)
        after["drain_rate"] = rate or "default"
        after["ratio_to_plain"] = round(after["from_signal_s"] / before["from_signal_s"], 2)
        log(f"  {after}")
        afters.append(after)
    relay.extra = base
    return {"plain": before, "take_over": afters[0], "take_overs": afters}


def daemon_idle(seconds: float) -> dict[str, Any]:
    script = HERE / "daemon_idle.py"
    if not script.exists():
        return {"error": "benchmarks/daemon_idle.py missing"}
    out = subprocess.run(
        [sys.executable, str(script), "--seconds", str(seconds)],
        cwd=REPO,
        capture_output=True,
        timeout=seconds + 120,
        start_new_session=True,
        check=False,
    )
    text = out.stdout.decode()
    with contextlib.suppress(ValueError):
        data: dict[str, Any] = json.loads(text[text.find("{") :])
        return data
    return {"error": (out.stderr.decode() or text)[-500:]}


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    import resource

    import grpc as g

    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "mem_mb": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": g.__version__,
        "nofile_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }


def commit(tree: Path = REPO) -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, check=False
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "aegis_edge_relay", "aegis_edge_core"],
        cwd=tree,
        capture_output=True,
        check=False,
    )
    return out.stdout.decode().strip() + ("+dirty" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def verdict(value: float | None, limit: float) -> str:
    if value is None:
        return "-"
    return "met" if value <= limit else "MISSED"


def table(res: dict[str, Any]) -> str:
    n = res["daemons"]
    lab = label(n)
    rows = [
        "| figure | relay | floor | relay/floor | target | |",
        "|---|---|---|---|---|---|",
    ]
    for hb_key, hb_name in (("hb30", "30 s"), ("hb1", "1 s")):
        for step in res["steps"]:
            r = res["relay"].get(hb_key, {}).get(str(step))
            f = res["floor"].get(hb_key, {}).get(str(step))
            if r is None:
                continue
            tgt_rss = tgt_cpu = ""
            ok_rss = ok_cpu = ""
            if step == n and hb_key == "hb30":
                tgt_rss = f"<= {TARGET['relay_rss_mb']:.0f} MB, <= 1.5x floor"
                ok_rss = (
                    "met"
                    if r["rss_mb"] <= TARGET["relay_rss_mb"]
                    and f
                    and r["rss_mb"] / f["rss_mb"] <= TARGET["rss_ratio"]
                    else "MISSED"
                )
                tgt_cpu = "<= 0.1 core"
                ok_cpu = verdict(r["cpu_cores"], TARGET["relay_cpu_cores_30s"])
            rows.append(
                f"| RSS, {label(step)} daemons, {hb_name} heartbeat | {r['rss_mb']:.0f} MB "
                f"| {f['rss_mb']:.0f} MB | {ratio(r['rss_mb'], f['rss_mb'] if f else None)} "
                f"| {tgt_rss} | {ok_rss} |"
                if f
                else f"| RSS, {label(step)} daemons, {hb_name} heartbeat | {r['rss_mb']:.0f} MB"
                f" | - | - | {tgt_rss} | {ok_rss} |"
            )
            fc = f["cpu_cores"] if f else None
            sat = f" (saturated: held {r.get('connected')} of {step})" if r.get("saturated") else ""
            rows.append(
                f"| CPU (cores), {label(step)} daemons, {hb_name} heartbeat "
                f"| {r['cpu_cores']:.3f}{sat} "
                f"| {fc if fc is not None else '-'} | {ratio(r['cpu_cores'], fc)} | {tgt_cpu} "
                f"| {ok_cpu} |"
            )
    st = res.get("storm")
    if st:
        rows.append(
            f"| reconnect storm, {lab} (s to all Connected, from SIGTERM) | {st['storm_s']} | - "
            f"| - | <= 30 s | {verdict(st['storm_s'], TARGET['storm_seconds'])} |"
        )
        rows.append(f"| storm: attestations per second | {st['attestations_per_s']} | - | - | | |")
    tk = res.get("storm_take_over")
    if tk:
        rows.append(
            f"| graceful restart, {lab}, `--take-over` (s from the old relay's signal to all "
            f"Connected; ratio to the plain restart, same run, {st['from_signal_s']} s) "
            f"| {tk['from_signal_s']} ({tk['ratio_to_plain']}x) | - | - "
            f"| <= 15 s | {verdict(tk['from_signal_s'], 15.0)} |"
        )
    for fr in res.get("fleet", []):
        tgt = "<= 5 s" if fr["mode"] == "all" else ""
        ok = verdict(fr["wall_s"], TARGET["fleet_all_seconds"]) if fr["mode"] == "all" else ""
        rows.append(
            f"| fleet edge.ping, {fr['targets']} targets, mode {fr['mode']}: wall s "
            f"(p50 / p99 ms) | {fr['wall_s']} ({fr['latency_ms_p50']} / "
            f"{fr['latency_ms_p99']}) | - | - | {tgt} | {ok} |"
        )
    en = res.get("enrollment")
    if en:
        rows.append(
            f"| enrollment of {lab} via RPC (s; per s) | {en['seconds']} ({en['per_s']}/s) "
            "| - | - | | |"
        )
    idle = res.get("daemon_idle", {})
    if "rss_mib" in idle:
        rss = idle["rss_mib"]["max"]
        cpu = idle["cpu_percent_of_one_core"]
        rows.append(
            f"| idle daemon RSS (MB, max) | {rss} | - | - | <= 30 MB | {verdict(rss, 30.0)} |"
        )
        rows.append(
            f"| idle daemon CPU (% of a core) | {cpu} | - | - | <= 0.1 % | {verdict(cpu, 0.1)} |"
        )
    return "\n".join(rows)


def write_docs(res: dict[str, Any], text: str, section: str = "scale") -> None:
    """Put ``text`` into docs/benchmarks.md between ``<!-- {section}:begin/end -->``."""
    doc = REPO / "docs" / "benchmarks.md"
    if not doc.exists():
        return
    body = doc.read_text()
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    if begin not in body or end not in body:
        return
    head, rest = body.split(begin, 1)
    _, tail = rest.split(end, 1)
    m = res["machine"]
    stamp = (
        f"Measured {res['date']} at commit `{res['commit']}` on {m['cpus']} CPUs "
        f"({m['cpu_model']}), {m['mem_mb'] // 1024} GB, Python {m['python']}, grpcio "
        f"{m['grpcio']}, with `{res['command']}`.\n\n"
    )
    doc.write_text(head + begin + "\n" + stamp + text + "\n" + end + tail)


# ---------------------------------------------------------------------- main


def run_only(args: argparse.Namespace, procs: Procs, root: Path) -> dict[str, Any]:
    """``--only fleet,storm``: enroll, connect N at a 30 s heartbeat, then only those phases
    (no sampling windows, no floor, no idle daemon) -- for iterating on one figure."""
    n = args.daemons
    only = set(args.only)
    res: dict[str, Any] = {
        "daemons": n,
        "only": sorted(only),
        "machine": machine(),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
    }
    relay = Relay(procs, root / "relay")
    relay.start(30.0)
    nworkers = args.workers or max(1, math.ceil(n / PER_WORKER))
    workers = Workers(procs, nworkers, relay.address, Path(relay.info["ca_cert"]), root)
    log(f"enrolling {n} daemons ({nworkers} load generators)")
    enroll(relay, workers, n)
    relay.stop()
    if args.baseline:
        res["baseline"] = {"tree": args.baseline, "commit": commit(Path(args.baseline))}
        res["fleet_ab"] = fleet_against_baseline(args, relay, workers)
        workers.all({"cmd": "quit"})
        return res
    if "storm" in only:
        relay.extra = (*relay.extra, *UNIFORM_DRAIN)
    relay.start(30.0)
    workers.all({"cmd": "address", "address": relay.address})
    r = hold(relay, workers, n, 3.0, max(60.0, n / 50))
    log(f"  held {n}: {r}")
    res["fleet"] = []
    for mode in ("all", "rolling=1000"):
        if ("fleet" if mode == "all" else "rolling") not in only:
            continue
        log(f"fleet run edge.ping over {n}, mode {mode} (relay pid {relay.pid})")
        fr = fleet_run(relay, mode, timeout=max(120.0, n / 50))
        res["fleet"].append(fr)
        log(f"  {fr}")
    if "storm" in only:
        relay.profile_dir = Path(args.profile) if args.profile else None
        if relay.profile_dir is not None:
            relay.profile_dir.mkdir(parents=True, exist_ok=True)
        storms = restart_storms(relay, workers, n, args.storm_rates)
        res["storm"], res["storm_take_over"] = storms["plain"], storms["take_over"]
        res["storm_take_overs"] = storms["take_overs"]
    workers.target(0)
    relay.stop()
    return res


def fleet_against_baseline(
    args: argparse.Namespace, relay: Relay, workers: Workers
) -> list[dict[str, Any]]:
    """``--only fleet --baseline TREE``: fleet edge.ping mode all over the same N daemons on
    the relay of TREE (before), of this tree without ``result-ack-deferred`` and of this
    tree (after), in turn, ``--rounds`` times, with the stream features on and summary-only
    events each time. ``--profile DIR``: py-spy
    stacks of each relay's first run."""
    n = args.daemons
    connect = max(120.0, n / 25)
    prof_dir = Path(args.profile) if args.profile else None
    runs: list[dict[str, Any]] = []
    variants = (
        ("before", args.baseline, ()),
        # this tree without the one feature an older relay cannot have: what it buys
        ("after-no-defer", "", ("--protocol-features", "heartbeat-ack-coalesce,result-ack-batch")),
        ("after", "", ()),
    )
    for rnd in range(args.rounds):
        for variant, code, extra in variants:
            relay.code, relay.extra = code, extra
            relay.start(30.0)
            workers.all({"cmd": "address", "address": relay.address})
            workers.target(n)
            wait_for(lambda: relay.connected() >= n, connect, f"{n} connected", 0.5)
            time.sleep(3.0)
            spy = None
            if prof_dir is not None and rnd == 0:
                prof_dir.mkdir(parents=True, exist_ok=True)
                # a run of a few seconds: 50 Hz would give a few hundred samples
                spy = profile(relay.pid, 12, prof_dir / f"{variant}-fleet.txt", rate=250)
            load = os.getloadavg()[0]
            fr = fleet_run(relay, "all", timeout=max(120.0, n / 50), summary_only=True)
            if spy is not None:
                spy.wait()
            runs.append({"variant": variant, "round": rnd, "load1": round(load, 2), **fr})
            log(f"  [{variant}] round {rnd}: load {load:.1f}: {fr}")
            workers.target(0)
            wait_for(lambda: workers.stats()["connected"] == 0, 60, "all disconnected")
            relay.stop()
    relay.code, relay.extra = "", ()
    for variant, _, _ in variants:
        mine = [r for r in runs if r["variant"] == variant]
        wall = sum(r["wall_s"] for r in mine) / len(mine)
        cpu = sum(r["relay_cpu_s"] for r in mine) / len(mine)
        log(f"{variant}: mean wall {wall:.2f} s, relay CPU {cpu:.2f} s over {len(mine)} runs")
    return runs


FEATURE_VARIANTS: dict[str, tuple[str, ...]] = {
    "off": ("--protocol-features", "none"),
    "on": (),
}
"""``--ab``: the relay without the optional stream features (what an older daemon gets,
and today's Admin event stream) and with them (heartbeat-ack-coalesce, heartbeat-keepalive,
result-ack-batch, result-ack-deferred, summary-only fleet events); the load generators offer
them either way."""


def profile(pid: int, seconds: float, out: Path, rate: int = 50) -> subprocess.Popen[bytes] | None:
    """py-spy (if installed) on ``pid`` for ``seconds`` at ``rate`` Hz: collapsed stacks to
    ``out``."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return None
    return subprocess.Popen(
        [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(rate), "-f", "raw",
         "-o", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def run_ab(args: argparse.Namespace, procs: Procs, root: Path) -> dict[str, Any]:
    """``--ab``: the same N daemons on the relay with the stream features off, then on, then
    off and on again (``--rounds``), beside the bare-gRPC floor, in one run: steady CPU and
    RSS at a 30 s heartbeat, fleet edge.ping mode all, and the 1 s heartbeat at
    min(N, 5000). Ratios are what to read: the machine is shared."""
    n = args.daemons
    stress_n = min(n, 5000)
    window = args.window or 30.0
    connect = max(120.0, n / 25)  # the machine is shared: connecting may crawl
    res: dict[str, Any] = {
        "daemons": n,
        "machine": machine(),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
        "runs": [],
    }
    data_dir = root / "relay"
    relay = Relay(procs, data_dir)
    relay.start(30.0)
    nworkers = args.workers or max(1, math.ceil(n / PER_WORKER))
    workers = Workers(procs, nworkers, relay.address, Path(relay.info["ca_cert"]), root)
    log(f"enrolling {n} daemons ({nworkers} load generators)")
    enroll(relay, workers, n)
    relay.stop()
    prof_dir = Path(args.profile) if args.profile else None

    def floor_hold(hb: float, count: int, win: float) -> dict[str, Any]:
        floor, address = start_floor(procs, data_dir, root, f"hb{hb:g}")
        log(f"floor, {hb:g} s heartbeat: holding {count} streams")
        held = hold_floor(floor.pid, workers, address, count, hb, win, connect)
        log(f"  {held}")
        workers.floor(address, 0, hb)
        procs.stop(floor)
        return held

    for rnd in range(args.rounds):
        for variant, extra in FEATURE_VARIANTS.items():
            run: dict[str, Any] = {"variant": variant, "round": rnd}
            relay.extra = extra
            relay.start(30.0)
            workers.all({"cmd": "address", "address": relay.address})
            log(f"[{variant}] 30 s heartbeat: holding {n}")
            spy = None
            if prof_dir is not None and rnd == 0:
                prof_dir.mkdir(parents=True, exist_ok=True)
                workers.target(n)
                wait_for(lambda: relay.connected() >= n, connect, "connected", 0.5)
                spy = profile(relay.pid, window, prof_dir / f"{variant}-hb30.txt")
            run["hb30"] = hold(relay, workers, n, window, connect)
            if spy is not None:
                spy.wait()
            log(f"  {run['hb30']}")
            if prof_dir is not None and rnd == 0:
                spy = profile(relay.pid, 15, prof_dir / f"{variant}-fleet.txt")
            run["fleet"] = fleet_run(
                relay, "all", timeout=max(120.0, n / 50), summary_only=variant == "on"
            )
            if spy is not None:
                spy.wait()
            log(f"  fleet: {run['fleet']}")
            workers.target(0)
            wait_for(lambda: workers.stats()["connected"] == 0, 60, "all disconnected")
            relay.stop()
            if not args.skip_stress:
                relay.start(1.0)
                log(f"[{variant}] 1 s heartbeat: holding {stress_n}")
                run["hb1"] = hold(relay, workers, stress_n, 10.0, 90.0)
                run["hb1"].setdefault("connected", stress_n)  # set by hold when saturated
                log(f"  {run['hb1']}")
                workers.target(0)
                wait_for(lambda: workers.stats()["connected"] == 0, 60, "all disconnected")
                relay.stop()
            res["runs"].append(run)
        # The floor in every round, beside the variants: on a shared machine the load
        # moves within minutes, and a ratio to a floor taken at another time moves with it.
        res["runs"].append({"variant": "floor", "round": rnd, "hb30": floor_hold(30.0, n, window)})
    res["floor"] = {"hb30": {}}
    for key in ("cpu_cores", "rss_mb"):
        vals = [r["hb30"][key] for r in res["runs"] if r["variant"] == "floor"]
        res["floor"]["hb30"][key] = round(sum(vals) / len(vals), 4)
    if not args.skip_stress:
        res["floor"]["hb1"] = floor_hold(1.0, stress_n, 10.0)
    workers.all({"cmd": "quit"})
    return res


def ab_table(res: dict[str, Any]) -> str:
    """Features off and on beside the floor; the mean over rounds."""
    floor = res["floor"]

    def mean(variant: str, *path: str) -> float | None:
        vals = []
        for run in res["runs"]:
            if run["variant"] != variant:
                continue
            v: Any = run
            for key in path:
                v = v.get(key, {}) if isinstance(v, dict) else {}
            if isinstance(v, int | float):
                vals.append(float(v))
        return round(sum(vals) / len(vals), 4) if vals else None

    n, s = label(res["daemons"]), label(min(res["daemons"], 5000))
    f30, f1 = floor.get("hb30", {}), floor.get("hb1", {})
    rows = [
        (f"steady relay CPU, {n}, 30 s heartbeat (cores)", ("hb30", "cpu_cores"),
         f30.get("cpu_cores")),
        (f"relay RSS, {n}, 30 s heartbeat (MB)", ("hb30", "rss_mb"), f30.get("rss_mb")),
        (f"fleet edge.ping over {n}, mode all (s)", ("fleet", "wall_s"), None),
        ("  relay CPU during the run (s)", ("fleet", "relay_cpu_s"), None),
        ("  p99 latency (ms)", ("fleet", "latency_ms_p99"), None),
        (f"relay CPU, {s}, 1 s heartbeat (cores)", ("hb1", "cpu_cores"), f1.get("cpu_cores")),
        (f"  daemons held of {s}", ("hb1", "connected"), None),
    ]  # fmt: skip
    out = [
        "| figure | features off | features on | on/off | floor | on/floor |",
        "|---|---|---|---|---|---|",
    ]
    for name, path, fl in rows:
        off, on = mean("off", *path), mean("on", *path)
        if off is None and on is None:
            continue  # a phase that was skipped (--skip-stress)
        out.append(
            f"| {name} | {off} | {on} | {ratio(on, off)} | {fl if fl is not None else '-'} "
            f"| {ratio(on, fl)} |"
        )
    return "\n".join(out)


def server_pids(url: str) -> list[int]:
    """The PostgreSQL server behind ``url``: its postmaster (the parent of our backend) and
    every process it started. Only meaningful for a server on this machine."""
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        # read while the backend lives: it exits with the connection
        status = Path(f"/proc/{row[0]}/status").read_text()
    postmaster = int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    pids = [postmaster]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == postmaster:
                    pids.append(int(entry.name))
    return pids


def group_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_secs(pid)
    return total


def flush_seconds(store_url: str, data_dir: Path, repeats: int = 5) -> float:
    """Median time of one ``flush_heartbeats`` of every enrolled daemon, on the store the
    relay used (opened here once the relay stopped)."""
    from aegis_edge_relay.store import open_store

    store = open_store(store_url or None, data_dir)
    try:
        ids = [node.node_id for node in store.load_nodes()]
        times = []
        for i in range(repeats):
            beats = dict.fromkeys(ids, time.time() + i)
            t0 = time.perf_counter()
            store.flush_heartbeats(beats)
            times.append(time.perf_counter() - t0)
    finally:
        store.close()
    return sorted(times)[len(times) // 2]


@contextlib.contextmanager
def fresh_database(url: str) -> Any:
    import psycopg

    name = f"aegis_bench_{os.getpid()}_{int(time.time())}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urllib.parse.urlsplit(url)
    try:
        yield urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def one_store(
    args: argparse.Namespace, procs: Procs, root: Path, kind: str, url: str
) -> dict[str, Any]:
    n = args.daemons
    window = args.window or (10.0 if args.quick else 30.0)
    data_dir = root / f"relay-{kind}"
    relay = Relay(procs, data_dir, store_url=url)
    relay.start(30.0)
    nworkers = args.workers or max(1, math.ceil(n / PER_WORKER))
    workers = Workers(procs, nworkers, relay.address, Path(relay.info["ca_cert"]), root)
    log(f"{kind}: enrolling {n} daemons")
    out: dict[str, Any] = {"enroll_s": round(enroll(relay, workers, n), 1)}
    hold(relay, workers, n, 1.0, max(60.0, n / 50))
    server = server_pids(url) if url else []
    time.sleep(min(3.0, window / 3))
    c0, s0, t0 = cpu_secs(relay.pid), group_cpu(server), time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - t0
    out["relay_cpu_cores"] = round((cpu_secs(relay.pid) - c0) / elapsed, 4)
    out["db_cpu_cores"] = round((group_cpu(server) - s0) / elapsed, 4) if url else 0.0
    out["rss_mb"] = round(rss_mb(relay.pid), 1)
    log(f"{kind}: fleet run edge.ping over {n}")
    out["fleet"] = fleet_run(relay, "all", timeout=max(120.0, n / 50))
    log(f"{kind}: graceful restart (--take-over) of {n}")
    out["take_over"] = storm(relay, workers, n, 30.0, timeout=max(120.0, n / 40), take_over=True)
    workers.target(0)
    for proc in workers.workers:
        procs.stop(proc, timeout=10)
    relay.stop()
    out["flush_s"] = round(flush_seconds(url, data_dir), 4)
    log(f"{kind}: {out}")
    return out


def run_stores(args: argparse.Namespace, procs: Procs, root: Path) -> dict[str, Any]:
    res: dict[str, Any] = {
        "daemons": args.daemons,
        "machine": machine(),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/scale.py "
        + " ".join(sys.argv[1:]).replace(args.store, "URL"),
    }
    res["sqlite"] = one_store(args, procs, root, "sqlite", "")
    with fresh_database(args.store) as url:
        res["postgresql"] = one_store(args, procs, root, "postgresql", url)
    return res


def stores_table(res: dict[str, Any]) -> str:
    lite, pg = res["sqlite"], res["postgresql"]
    rows = [
        ("steady relay CPU, 30 s beats (cores)", lite["relay_cpu_cores"], pg["relay_cpu_cores"]),
        ("relay + database server CPU (cores)", lite["relay_cpu_cores"],
         pg["relay_cpu_cores"] + pg["db_cpu_cores"]),
        ("heartbeat flush of all daemons (s)", lite["flush_s"], pg["flush_s"]),
        ("relay RSS, 30 s beats (MB)", lite.get("rss_mb", 0.0), pg.get("rss_mb", 0.0)),
        ("fleet edge.ping, mode all (s)", lite["fleet"]["wall_s"], pg["fleet"]["wall_s"]),
        ("graceful restart, signal to all Connected (s)",
         lite.get("take_over", {}).get("from_signal_s", 0.0),
         pg.get("take_over", {}).get("from_signal_s", 0.0)),
        ("enrollment of all daemons (s)", lite["enroll_s"], pg["enroll_s"]),
    ]  # fmt: skip
    lines = [
        f"store comparison, {res['daemons']} daemons ({res['date']})",
        f"{'figure':44} {'SQLite':>10} {'PostgreSQL':>11} {'PG/SQLite':>10}",
    ]
    for name, a, b in rows:
        lines.append(f"{name:44} {a:>10} {round(b, 4):>11} {ratio(b, a):>10}")
    lines.append(f"{'database server CPU alone (cores)':44} {'-':>10} {pg['db_cpu_cores']:>11}")
    return "\n".join(lines)


def start_floor(
    procs: Procs, data_dir: Path, root: Path, name: str
) -> tuple[subprocess.Popen[bytes], str]:
    """The bare grpc.aio floor with the relay's certificate and server options: the process
    and the address it listens on."""
    out = root / f"floor-{name}.json"
    out.unlink(missing_ok=True)  # the floor of an earlier round wrote its port here
    floor = procs.spawn(
        [
            sys.executable,
            str(HERE / "scale_floor.py"),
            "--cert",
            str(data_dir / "server.pem"),
            "--key",
            str(data_dir / "server.key"),
            "--out",
            str(out),
            "--options",
            json.dumps(_grpc_options()),
        ],
        stdout=open(root / "floor.log", "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    wait_for(out.exists, 30, "floor server")
    return floor, f"127.0.0.1:{json.loads(out.read_text())['port']}"


def run(args: argparse.Namespace, procs: Procs, root: Path) -> dict[str, Any]:
    n = args.daemons
    steps = sorted({s for s in (args.steps or [1000, 5000, n]) if s <= n} | {n})
    if args.quick:
        steps = [n]
    win30 = args.window or (10.0 if args.quick else 30.0)
    win1 = 5.0 if args.quick else 10.0
    connect_timeout = max(60.0, n / 50)
    res: dict[str, Any] = {
        "daemons": n,
        "steps": steps,
        "quick": args.quick,
        "machine": machine(),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
        "relay": {},
        "floor": {},
    }
    data_dir = root / "relay"
    relay = Relay(procs, data_dir)
    log(f"relay: starting (30 s heartbeat) in {data_dir}")
    relay.start(30.0)
    res["relay_idle_rss_mb"] = round(rss_mb(relay.pid), 1)
    nworkers = args.workers or max(1, math.ceil(n / PER_WORKER))
    workers = Workers(procs, nworkers, relay.address, Path(relay.info["ca_cert"]), root)
    log(f"enrolling {n} daemons through the Enrollment RPC ({nworkers} load generators)")
    secs = enroll(relay, workers, n)
    res["enrollment"] = {"seconds": round(secs, 1), "per_s": round(n / secs, 1)}
    log(f"  enrolled in {secs:.1f}s ({n / secs:.0f}/s)")
    # The enrollment left its mark on the heap: restart so step figures start clean.
    relay.stop()
    relay.extra = (*relay.extra, *UNIFORM_DRAIN)  # for the storm's "before" (restart_storms)
    relay.start(30.0)
    workers.all({"cmd": "address", "address": relay.address})

    res["relay"]["hb30"] = {}
    for step in steps:
        log(f"relay, 30 s heartbeat: holding {step} daemons")
        r = hold(relay, workers, step, win30, connect_timeout)
        res["relay"]["hb30"][str(step)] = r
        log(f"  {r}")

    res["fleet"] = []
    for mode in ("all", "rolling=1000"):
        log(f"fleet run edge.ping over {n}, mode {mode}")
        fr = fleet_run(relay, mode, timeout=max(120.0, n / 50))
        res["fleet"].append(fr)
        log(f"  {fr}")

    storms = restart_storms(relay, workers, n)
    st = res["storm"] = storms["plain"]
    res["storm_take_over"] = storms["take_over"]

    if not args.skip_stress:
        workers.target(0)
        wait_for(lambda: workers.stats()["connected"] == 0, 60, "all daemons disconnected")
        relay.stop()
        relay.start(1.0)
        res["relay"]["hb1"] = {}
        for step in steps:
            log(f"relay, 1 s heartbeat (stress): holding {step} daemons")
            r = hold(relay, workers, step, win1, min(connect_timeout, 90.0))
            res["relay"]["hb1"][str(step)] = r
            log(f"  {r}")
            if r.get("saturated"):
                log("  saturated: larger steps at a 1 s heartbeat skipped")
                break
    workers.target(0)
    wait_for(lambda: workers.stats()["connected"] == 0, 60, "all daemons disconnected")
    relay.stop()

    # ---- the floor, same TLS certificate, same server options, same streams
    for hb_key, hb, win in (("hb30", 30.0, win30), ("hb1", 1.0, win1)):
        if hb_key == "hb1" and args.skip_stress:
            continue
        floor, address = start_floor(procs, data_dir, root, hb_key)
        res["floor"][hb_key] = {}
        for step in steps:
            log(f"floor, {hb:g} s heartbeat: holding {step} streams")
            f = hold_floor(floor.pid, workers, address, step, hb, win, connect_timeout)
            res["floor"][hb_key][str(step)] = f
            log(f"  {f}")
        workers.floor(address, 0, hb)
        procs.stop(floor)
    workers.all({"cmd": "quit"})

    if not args.skip_idle:
        secs = 20.0 if args.quick else 60.0
        log(f"idle daemon: benchmarks/daemon_idle.py --seconds {secs:g}")
        res["daemon_idle"] = daemon_idle(secs)
        log(f"  {res['daemon_idle']}")

    # ---- headline keys
    lab = label(n)
    r30 = res["relay"]["hb30"][str(n)]
    f30 = res["floor"].get("hb30", {}).get(str(n), {})
    all_run = next(fr for fr in res["fleet"] if fr["mode"] == "all")
    idle = res.get("daemon_idle", {})
    res.update(
        {
            f"relay_rss_mb_{lab}": r30["rss_mb"],
            f"floor_rss_mb_{lab}": f30.get("rss_mb"),
            f"relay_floor_rss_ratio_{lab}": round(r30["rss_mb"] / f30["rss_mb"], 2)
            if f30
            else None,
            f"relay_cpu_cores_{lab}_30s": r30["cpu_cores"],
            f"floor_cpu_cores_{lab}_30s": f30.get("cpu_cores"),
            f"relay_cpu_cores_{lab}_1s": res["relay"]
            .get("hb1", {})
            .get(str(n), {})
            .get("cpu_cores"),
            f"floor_cpu_cores_{lab}_1s": res["floor"]
            .get("hb1", {})
            .get(str(n), {})
            .get("cpu_cores"),
            f"storm_seconds_{lab}": st["storm_s"],
            f"storm_attestations_per_s_{lab}": st["attestations_per_s"],
            f"fleet_all_seconds_{lab}": all_run["wall_s"],
            f"fleet_rolling1000_seconds_{lab}": res["fleet"][1]["wall_s"],
            "daemon_idle_rss_mb": idle.get("rss_mib", {}).get("max"),
            "daemon_idle_cpu_pct": idle.get("cpu_percent_of_one_core"),
        }
    )
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--daemons", type=int, default=10_000, help="N (default 10000)")
    ap.add_argument("--quick", action="store_true", help="only N, short windows (~2 min at 1000)")
    ap.add_argument(
        "--steps", type=lambda t: [int(x) for x in t.split(",")], help="e.g. 1000,5000,10000"
    )
    ap.add_argument("--window", type=float, help="sampling window at 30 s heartbeat (s)")
    ap.add_argument("--workers", type=int, help=f"load generators (default N/{PER_WORKER})")
    ap.add_argument("--skip-stress", action="store_true", help="no 1 s heartbeat phase")
    ap.add_argument("--skip-idle", action="store_true", help="no idle-daemon measurement")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/latest.json|quick.json)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    ap.add_argument(
        "--only",
        type=lambda t: t.split(","),
        help="only these phases, e.g. fleet,rolling,storm (after enroll + connect N); "
        "JSON to benchmarks/results/only.json, no table, no docs",
    )
    ap.add_argument(
        "--ab",
        action="store_true",
        help="stream features off against on (and the floor) in one run: JSON to "
        "benchmarks/results/ab.json, its table into docs/benchmarks.md",
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="--ab, --baseline: pairs of runs (default 1)"
    )
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="--ab, --baseline: py-spy stacks of round 1 to DIR; --only storm: of each "
        "take-over's old relay (stop-*.txt) and successor (successor-*.txt)",
    )
    ap.add_argument(
        "--storm-rates",
        type=lambda t: t.split(","),
        help="--only storm: one take-over per --drain-rate, in one run, e.g. 400,800",
    )
    ap.add_argument(
        "--baseline",
        metavar="TREE",
        help="with --only fleet: the fleet run on TREE's relay (e.g. a `git worktree add` of "
        "the base commit) against this tree's, in turn, in one run",
    )
    ap.add_argument(
        "--store",
        metavar="URL",
        help="compare SQLite with this local PostgreSQL server (a fresh database on it): "
        "JSON to benchmarks/results/stores.json, no docs",
    )
    args = ap.parse_args()

    procs = Procs()
    root = Path(tempfile.mkdtemp(prefix="aegis-scale-"))

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        if args.store:
            res = run_stores(args, procs, root)
            print()
            print(stores_table(res))
            out = Path(args.out) if args.out else HERE / "results" / "stores.json"
            out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
            log(f"results: {out}")
            return 0
        if args.ab:
            res = run_ab(args, procs, root)
            print()
            print(ab_table(res))
            out = Path(args.out) if args.out else HERE / "results" / "ab.json"
            out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
            log(f"results: {out}")
            if not args.no_docs:
                write_docs(res, ab_table(res), section="ab")
            return 0
        if args.only:
            res = run_only(args, procs, root)
            out = Path(args.out) if args.out else HERE / "results" / "only.json"
            out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
            log(f"results: {out}")
            return 0
        res = run(args, procs, root)
    except KeyboardInterrupt:
        log("interrupted: killing everything this run started")
        return 130
    finally:
        procs.kill_all()
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    text = table(res)
    print()
    print(text)
    out = (
        Path(args.out)
        if args.out
        else HERE / "results" / ("quick.json" if args.quick else "latest.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    log(f"results: {out}")
    if not args.quick and not args.no_docs and args.daemons == 10_000:
        write_docs(res, text)
        log("docs/benchmarks.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
