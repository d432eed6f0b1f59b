"""The scripts under examples/ run, on loopback, and say what their docstrings promise.

Each example runs as a subprocess with a timeout, exactly as a reader would run it; the
live half of ``drive_fleet_run.py`` runs against a real relay with scripted daemons.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from aegis_edge_core.wire import admin_pb2
from tests.relay.daemon_driver import DaemonDriver, RelayProcess

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
PLUGIN_DIR = EXAMPLES / "custom_tool_plugin"


def run_example(*argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_every_example_says_how_to_run_it() -> None:
    scripts = sorted(EXAMPLES.glob("*.py"))
    assert {p.name for p in scripts} >= {"embed_minimal_relay.py", "drive_fleet_run.py"}
    for script in scripts:
        text = script.read_text()
        assert text.startswith('"""'), script
        assert f"examples/{script.name}" in text.split('"""')[1], f"{script}: no run line"


# --------------------------------------------------------------------------- embedding


def test_embed_minimal_relay() -> None:
    proc = run_example("examples/embed_minimal_relay.py")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    node_id = out.split("relay: enrolled ", 1)[1].split()[0]
    for line in (
        f"relay: {node_id} untracked -> Connected (attested)",
        f"daemon: accepted as {node_id}",
        "daemon: heartbeat 1 acked",
        f"relay: {node_id} Connected -> Unhealthy (stale)",
        "daemon: running edge.ping",
        f"relay: {node_id} Unhealthy -> Connected (heartbeat)",
        'ended ok with {"pong": true}',
        f"relay: {node_id} Connected -> Disconnected (stream_closed)",
        "relay: second enrollment refused: replayed",
        f"relay: final status of {node_id}: Disconnected",
    ):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "eyJ" not in out  # no token is ever printed


# --------------------------------------------------------------------------- fleet: offline


def test_plan_halts_like_the_seed_update() -> None:
    proc = run_example("examples/drive_fleet_run.py", "plan", "--json")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "plan: mode rolling=5 (window 5), on-error stop-after=1" in out
    for skip in ("web-04 (disconnected)", "web-09 (unhealthy)", "web-11 (tool_unavailable)"):
        assert f"skipped: {skip}" in out
    assert "laptop-01" not in out and "db-01" not in out  # not matched by the selector
    dispatched = [line.split()[-1] for line in out.splitlines() if " dispatch " in line]
    assert dispatched == ["web-01", "web-02", "web-03", "web-05", "web-06"]  # one window
    assert "result   web-05: error" in out
    assert "finish   halted" in out
    record = json.loads(out[out.index("{") :])
    assert record["outcome"] == "halted"
    assert record["deadline_secs"] == 120.0
    halted = [t["node_id"] for t in record["targets"] if t["skip_reason"] == "halted"]
    assert halted == ["web-07", "web-08", "web-10", "web-12"]


def test_plan_deadline_cancels_in_flight() -> None:
    proc = run_example(
        "examples/drive_fleet_run.py",
        "plan",
        "--deadline",
        "20s",
        "--fail",
        "",
        "--mode",
        "rolling=3",
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "t= 20.0s cancel" in out and "(deadline)" in out
    assert "finish   deadline_exceeded" in out
    assert "record: outcome deadline_exceeded; deadline of 20s reached" in out
    # Never more than three in flight: count dispatches minus results over time.
    in_flight = peak = 0
    for line in out.splitlines():
        if " dispatch " in line:
            in_flight += 1
        elif " result " in line:
            in_flight -= 1
        peak = max(peak, in_flight)
    assert peak == 3


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--target", "tags=AnyOf(a"), "unclosed '('"),
        (("--mode", "rolin=3"), "did you mean 'rolling'"),
        (("--on-error", "stop-after=0"), "on-error count must be within 1.."),
    ],
)
def test_plan_refuses_bad_flags(flags: tuple[str, ...], message: str) -> None:
    proc = run_example("examples/drive_fleet_run.py", "plan", *flags)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- fleet: live


@pytest.mark.integration
def test_drive_fleet_run_against_a_relay(tmp_path: Path) -> None:
    relay = RelayProcess.start(tmp_path / "relay")
    try:
        proc = asyncio.run(_live_run(relay))
    finally:
        assert relay.stop() == 0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "preview: 3 matched" in out
    assert out.count("  dispatched ") == 3
    assert out.count(": ok exit 0") == 3
    assert ": completed" in out.splitlines()[-4]  # the final record, then one line per target


async def _live_run(relay: RelayProcess) -> subprocess.CompletedProcess[str]:
    async with relay.channel() as channel:
        admin = relay.admin(channel)
        daemons = []
        for _ in range(3):
            issued = await admin.IssueEnrollmentToken(
                admin_pb2.IssueEnrollmentTokenRequest(tenant_id="acme"), metadata=relay.auth()
            )
            daemon = DaemonDriver(channel, tools=["edge.ping"])
            await daemon.enroll(issued.token)
            await daemon.connect()
            daemon.start_heartbeats(0.5)
            daemons.append(daemon)
        try:
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "examples/drive_fleet_run.py",
                "run",
                "--relay-data-dir",
                str(relay.data_dir),
                "--target",
                "all",
                "--tool",
                "edge.ping",
                "--mode",
                "rolling=2",
                "--deadline",
                "30s",
                cwd=REPO,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            stdout, stderr = await asyncio.wait_for(child.communicate(), timeout=30)
        finally:
            for daemon in daemons:
                await daemon.close()
    assert child.returncode is not None
    return subprocess.CompletedProcess(
        ["drive_fleet_run.py", "run"], child.returncode, stdout.decode(), stderr.decode()
    )
