"""Issue 14 against a real relay, real daemons and the real CLI: the deadline rule with both
orders forced, tool results everywhere an operator looks, `fleet runs` counts, and a
cancel of a finished run.

Forcing the two orders of the deadline race, without leaving it to luck:

* **the daemon's kill first** -- the relay ticks its runs only every 600 s
  (``--fleet-tick-interval``), so the only news of the deadline it can get is the
  daemon's ``timeout`` at the deadline-derived invocation timeout; the relay log proves
  no cancel was ever sent;
* **the relay's tick first** -- the daemon is frozen (SIGSTOP) before the deadline and
  thawed only once the relay has logged the deadline's ``command.cancel_sent``; whatever
  it answers then (its own kill or the cancel) comes after the tick.

Both must end the same way: run ``deadline_exceeded``, target ``timeout`` with
``ended_by: deadline``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent.harness import (
    CLI,
    DaemonProcess,
    EnrolledHost,
    RelayProcess,
    cli,
    enroll_host,
    pid_gone,
    wait_until,
)
from tests.https import scrape

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REPEATS = 3


def op(relay: RelayProcess, *args: str) -> list[str]:
    """An operator command line against ``relay`` (its data dir holds address, CA, token)."""
    return [*args, "--relay-data-dir", str(relay.data_dir)]


def op_json(relay: RelayProcess, *args: str, check: bool = True) -> Any:
    proc = cli(*op(relay, *args, "--output", "json"), check=check)
    return json.loads(proc.stdout)


@pytest.fixture
def daemons() -> Iterator[Any]:
    started: list[DaemonProcess] = []

    def start(host: EnrolledHost) -> DaemonProcess:
        d = DaemonProcess.start(host.state_dir)
        started.append(d)
        d.wait_event("connected")
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            os.kill(d.proc.pid, signal.SIGCONT)  # never leave a frozen daemon behind
        d.stop()


def _assert_deadline_ended(run: dict[str, Any], node_id: str) -> None:
    assert run["outcome"] == "deadline_exceeded", run
    (target,) = run["targets"]
    assert target["node_id"] == node_id
    assert (target["outcome"], target["ended_by"]) == ("timeout", "deadline"), target
    assert target["error_message"].startswith("ended by the run's deadline of 2s")
    assert run["counts"] == {"timeout": 1}
    assert run["halt_reason"] == "deadline of 2s reached"


def _wait_killed(pidfile: Path) -> None:
    child = int(pidfile.read_text())
    wait_until(lambda: pid_gone(child), 10, what=f"child {child} killed")


def _cancels(relay: RelayProcess, fleet_command_id: str) -> list[dict[str, Any]]:
    return [
        e
        for e in relay.output.events()
        if e.get("event") == "command.cancel_sent" and e.get("fleet_command_id") == fleet_command_id
    ]


def test_deadline_when_the_daemons_kill_lands_first(tmp_path: Path, daemons: Any) -> None:
    relay = RelayProcess.start(tmp_path / "relay", extra=["--fleet-tick-interval", "600s"])
    try:
        host = enroll_host(relay, tmp_path / "h", allow_tools=["cmd.run"])
        daemon = daemons(host)
        for i in range(REPEATS):
            pidfile = tmp_path / f"child-{i}.pid"
            proc = cli(
                *op(
                    relay,
                    "edge",
                    "fleet",
                    "run",
                    "--target",
                    f"node={host.node_id}",
                    "--tool",
                    "cmd.run",
                    "--arg",
                    f"cmd=echo $$ > {pidfile}; sleep 30",
                    "--deadline",
                    "2s",
                    "--output",
                    "json",
                ),
                check=False,
            )
            assert proc.returncode != 0  # only `completed` exits 0
            run = json.loads(proc.stdout)
            _assert_deadline_ended(run, host.node_id)
            # The daemon killed it at the invocation's timeout; the relay never cancelled.
            assert _cancels(relay, run["fleet_command_id"]) == []
            killed = daemon.wait_event(
                "command_finished", count=i + 1, pred=lambda e: e.get("tool") == "cmd.run"
            )
            assert killed["outcome"] == "timeout"
            _wait_killed(pidfile)

        # The tool's own, shorter timeout: plain timeout, and not deadline_exceeded.
        run = op_json(
            relay,
            "edge",
            "fleet",
            "run",
            "--target",
            f"node={host.node_id}",
            "--tool",
            "cmd.run",
            "--arg",
            "cmd=sleep 30",
            "--arg-json",
            "timeout=0.5",
            "--deadline",
            "30s",
            check=False,
        )
        assert run["outcome"] == "completed_with_errors"
        (target,) = run["targets"]
        assert (target["outcome"], target["ended_by"]) == ("timeout", None)
    finally:
        relay.stop()


def test_deadline_when_the_relays_tick_lands_first(tmp_path: Path, daemons: Any) -> None:
    relay = RelayProcess.start(tmp_path / "relay")
    try:
        host = enroll_host(relay, tmp_path / "h", allow_tools=["cmd.run"])
        daemon = daemons(host)
        for i in range(REPEATS):
            pidfile = tmp_path / f"child-{i}.pid"
            runner = subprocess.Popen(
                [
                    *CLI,
                    *op(
                        relay,
                        "edge",
                        "fleet",
                        "run",
                        "--target",
                        f"node={host.node_id}",
                        "--tool",
                        "cmd.run",
                        "--arg",
                        f"cmd=echo $$ > {pidfile}; sleep 30",
                        "--deadline",
                        "2s",
                        "--output",
                        "json",
                    ),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                received = daemon.wait_event("command_received", count=i + 1)
                fid = received["fleet_command_id"]
                wait_until(pidfile.exists, 10, what="child started")
                os.kill(daemon.proc.pid, signal.SIGSTOP)  # before the deadline: it is 2s
                try:
                    cancel = wait_until(
                        lambda: _cancels(relay, fid),  # noqa: B023 -- used in this pass only
                        20,
                        what="the relay's cancel at the deadline",
                    )[0]
                finally:
                    os.kill(daemon.proc.pid, signal.SIGCONT)
                assert cancel["reason"] == "deadline"
                out, err = runner.communicate(timeout=60)
            finally:
                if runner.poll() is None:
                    runner.kill()
            assert runner.returncode != 0, err
            run = json.loads(out)
            assert run["fleet_command_id"] == fid
            _assert_deadline_ended(run, host.node_id)
            _wait_killed(pidfile)
    finally:
        relay.stop()


def test_results_counts_and_cancel_of_a_finished_run(tmp_path: Path, daemons: Any) -> None:
    relay = RelayProcess.start(tmp_path / "relay")
    try:
        host = enroll_host(relay, tmp_path / "h")
        daemons(host)
        target = ["--target", f"node={host.node_id}", "--tool", "sys.info"]

        # fleet run --output json: the structured result of sys.info, parsed.
        run = op_json(relay, "edge", "fleet", "run", *target)
        assert run["outcome"] == "completed"
        (res,) = run["targets"]
        info = res["result"]
        assert isinstance(info, dict) and info["os"] == "linux"
        assert {"hostname", "agent_version", "arch"} <= set(info)
        fid = run["fleet_command_id"]

        # fleet run as a table: a RESULT column with the start of the compact JSON.
        table = cli(*op(relay, "edge", "fleet", "run", *target)).stdout
        header = next(line for line in table.splitlines() if "OUTCOME" in line)
        assert "RESULT" in header
        assert '{"agent_version":' in table

        # fleet show: the whole result, as the table's cell and under Results.
        shown = cli(*op(relay, "edge", "fleet", "show", fid)).stdout
        compact = json.dumps(info, separators=(",", ":"))
        assert f"  {host.node_id}: {compact}" in shown
        assert op_json(relay, "edge", "fleet", "show", fid)["targets"][0]["result"] == info

        # edge show --history: the command's result in history, JSON and table.
        hist = op_json(relay, "edge", "show", host.node_id, "--history", "5")["history"]
        assert [h["tool"] for h in hist] == ["sys.info", "sys.info"]
        assert hist[-1]["result"] == info  # oldest last: the first run's
        shown = cli(*op(relay, "edge", "show", host.node_id)).stdout
        assert "RESULT" in shown and '{"agent_version":' in shown

        # fleet runs --output json: counts right, and no per-target list pretending empty.
        runs = op_json(relay, "edge", "fleet", "runs")
        listed = next(r for r in runs if r["fleet_command_id"] == fid)
        assert listed["counts"] == {"ok": 1}
        assert "targets" not in listed
        assert listed["outcome"] == "completed"

        # fleet cancel of a finished run: refused by the relay, one line, non-zero.
        before = relay_runs_total(relay)
        proc = cli(*op(relay, "edge", "fleet", "cancel", fid), check=False)
        assert proc.returncode != 0
        assert proc.stdout == ""
        assert proc.stderr.strip().endswith(f"fleet run {fid} already finished (completed)")
        assert proc.returncode == 1  # the relay answered FAILED_PRECONDITION; the CLI says why
        # ...and nothing about the run changed.
        after = op_json(relay, "edge", "fleet", "show", fid)
        assert after["outcome"] == "completed" and after["halt_reason"] is None
        assert relay_runs_total(relay) == before
    finally:
        relay.stop()


def relay_runs_total(relay: RelayProcess) -> dict[str, float]:
    """``aegis_edge_fleet_runs_total`` by outcome, from the relay's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = scrape(relay.info)
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "aegis_edge_fleet_runs_total":
                out[s.labels["outcome"]] = s.value
    return out
