"""``aegis relay serve --take-over``: a restart during a rolling run, without a storm.

Real processes: a relay, three `aegis edge daemon`s, and a second relay started on the same
data dir and port with ``--take-over`` while a rolling ``cmd.run`` is half done. The run
must end as it would have without the restart (every target ok, each command run once),
and no daemon's way back may meet a refusal: the new relay listens on the port before the
old one lets go, so every daemon reconnects on its first attempt.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

from aegis_edge_core.wire import admin_pb2, common_pb2
from tests.agent.harness import (
    CLI,
    DaemonProcess,
    RelayProcess,
    _Lines,
    enroll_host,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

FLAGS = ("--drain-grace", "2s")


def take_over(old: RelayProcess) -> RelayProcess:
    """Start a successor on ``old``'s data dir and port (relay.json is left in place: it
    names the relay to take over)."""
    proc = subprocess.Popen(
        [
            *CLI,
            "relay",
            "serve",
            "--data-dir",
            str(old.data_dir),
            "--listen",
            old.endpoint,
            "--metrics-listen",
            "127.0.0.1:0",
            "--heartbeat-interval",
            "1s",
            "--stale-threshold",
            "3s",
            *FLAGS,
            "--take-over",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = _Lines(proc.stdout)

    def ready() -> dict[str, Any] | None:
        if proc.poll() is not None:
            raise RuntimeError("successor exited:\n" + "\n".join(out.lines))
        try:
            info: dict[str, Any] = json.loads((old.data_dir / "relay.json").read_text())
        except (OSError, ValueError):
            return None
        return info if info.get("pid") == proc.pid else None

    info = wait_until(ready, 30, what="the successor's relay.json")
    return RelayProcess(data_dir=old.data_dir, proc=proc, info=info, output=out, extra=FLAGS)


def test_take_over_mid_rolling_run_ends_the_run_as_without_it(tmp_path: Path) -> None:
    relay = RelayProcess.start(tmp_path / "relay", extra=FLAGS)
    daemons: list[DaemonProcess] = []
    successor: RelayProcess | None = None
    try:
        nodes = [
            enroll_host(relay, tmp_path / f"edge{i}", allow_tools=["cmd.run"]) for i in range(3)
        ]
        daemons = [DaemonProcess.start(node.state_dir) for node in nodes]
        for d in daemons:
            d.wait_event("connected")

        stub, md = relay.admin()
        events = stub.StartFleetRun(
            admin_pb2.FleetRunSpec(
                selector="all",
                tool="cmd.run",
                args_json=json.dumps({"cmd": "sleep 1; echo ran"}),
                mode="rolling=1",
                on_error="continue",
                tenant_id="acme",
            ),
            metadata=md,
            timeout=60,
        )
        run_id = ""
        first_done = threading.Event()
        seen: list[str] = []

        def follow() -> None:
            nonlocal run_id
            try:
                for ev in events:
                    kind = ev.WhichOneof("body")
                    seen.append(kind)
                    if kind == "started":
                        run_id = ev.started.fleet_command_id
                    elif kind == "target_finished":
                        first_done.set()
            except grpc.RpcError:
                pass  # the old relay handed the run over: its watchers end

        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        assert first_done.wait(20), f"no target finished: {seen}"

        successor = take_over(relay)
        assert successor.info["port"] == relay.info["port"]
        assert relay.proc.wait(20) == 0
        watcher.join(10)

        def finished() -> admin_pb2.FleetRun | None:
            s_stub, s_md = successor.admin()
            run = s_stub.GetFleetRun(
                admin_pb2.GetFleetRunRequest(fleet_command_id=run_id), metadata=s_md, timeout=10
            )
            return run if run.outcome != common_pb2.RUN_OUTCOME_RUNNING else None

        run = wait_until(finished, 40, interval=0.2, what="the run to finish on the successor")
        assert run.outcome == common_pb2.RUN_OUTCOME_COMPLETED, run
        assert sorted(t.node_id for t in run.targets) == sorted(n.node_id for n in nodes)
        for target in run.targets:
            assert target.outcome == common_pb2.TARGET_OUTCOME_OK, target
            assert target.stdout_tail == b"ran\n"  # ran once, to its end
        old_events = [e.get("event") for e in relay.output.events()]
        assert "fleet.run_handed_over" in old_events
        new_events = [
            e for e in successor.output.events() if e.get("event") == "fleet.run_taken_over"
        ]
        assert [e["fleet_command_id"] for e in new_events] == [run_id]

        for d in daemons:
            d.wait_event("connected", count=2)
            drains = d.events("drain")
            assert len(drains) == 1
            # the port never refused: back on the first attempt, no backoff ladder
            assert d.events("connect_failed") == [], d.output.lines[-20:]
        refused = [e for e in successor.output.events() if e.get("event") == "stream.refused"]
        assert refused == []
    finally:
        for d in daemons:
            d.stop()
        if successor is not None:
            successor.stop()
        relay.stop()


def test_take_over_on_another_port_is_refused_and_leaves_the_relay_alone(tmp_path: Path) -> None:
    relay = RelayProcess.start(tmp_path / "relay", extra=FLAGS)
    try:
        proc = subprocess.run(
            [
                *CLI,
                "relay",
                "serve",
                "--data-dir",
                str(relay.data_dir),
                "--listen",
                "127.0.0.1:1",  # not the port the daemons dial
                "--metrics-listen",
                "127.0.0.1:0",
                "--take-over",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode != 0
        assert f"listens on port {relay.info['port']}, not 1" in proc.stderr, proc.stderr
        assert relay.proc.poll() is None  # not signalled
        assert json.loads((relay.data_dir / "relay.json").read_text())["pid"] == relay.proc.pid
    finally:
        relay.stop()
