"""kill -9 a real daemon: mid-command, and with a finished result still unacknowledged.

1. Mid-command: the relay reports the target ``edge_disconnected`` as soon as the stream is
   gone; the tool's process group (its own session, so SIGKILL of the daemon does not reach
   it) outlives the daemon; the next daemon on the same state dir finds it in
   ``children.pids``, kills it (``orphan_killed``) and connects.
2. A ``cmd.run`` that finishes while the relay is down is spooled (``results.spool``); the
   daemon is then killed with ``kill -9``; after the relay and the daemon come back the
   result is delivered from the spool and kept in the relay's command history.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from aegis_edge_core import hoststate as hs
from aegis_edge_core.wire import admin_pb2, common_pb2
from tests.agent.harness import (
    DaemonProcess,
    RelayProcess,
    enroll_host,
    pid_gone,
    wait_until,
)
from tests.faults.conftest import Tally

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(90)]

OK = common_pb2.TARGET_OUTCOME_OK
LOST = common_pb2.TARGET_OUTCOME_EDGE_DISCONNECTED
CONNECTED = common_pb2.DAEMON_STATUS_CONNECTED


def _children(state_dir: Path) -> list[hs.ChildProcess]:
    path = state_dir / hs.CHILD_PIDS
    try:
        return hs.decode_child_pids(path.read_text(), source=str(path))
    except FileNotFoundError:
        return []


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry))
    return out


def _finish_in_thread(events: object) -> tuple[threading.Thread, dict[str, admin_pb2.FleetRun]]:
    result: dict[str, admin_pb2.FleetRun] = {}

    def pump() -> None:
        with contextlib.suppress(Exception):
            for ev in events:  # type: ignore[attr-defined]
                if ev.WhichOneof("body") == "started":
                    result["started"] = ev.started
                elif ev.WhichOneof("body") == "finished":
                    result["run"] = ev.finished
                    return

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t, result


def test_kill9_daemon_mid_command_orphan_killed_on_restart(tmp_path: Path, tally: Tally) -> None:
    relay = RelayProcess.start(tmp_path / "relay", heartbeat_interval="0.5s", stale_threshold="2s")
    daemon: DaemonProcess | None = None
    pgid = 0
    try:
        host = enroll_host(relay, tmp_path / "edge", allow_tools=("cmd.run",))
        daemon = DaemonProcess.start(host.state_dir)
        daemon.wait_event("connected")

        events = relay.start_run(host.node_id, "cmd.run", {"cmd": "sleep 300"})
        pump, result = _finish_in_thread(events)
        received = daemon.wait_event("command_received")
        (child,) = wait_until(lambda: _children(host.state_dir), what="children.pids entry")
        assert child.command_id == received["command_id"]
        assert child.daemon_pid == daemon.proc.pid
        pgid = child.pgid
        assert wait_until(lambda: _group_members(pgid), what="sleep 300 running")

        killed_at = time.monotonic()
        daemon.proc.kill()  # kill -9 mid-command
        daemon.proc.wait(10)
        tally.fault()

        # the dispatcher learns it from the dropped stream: the run ends, target lost
        pump.join(20)
        assert "run" in result, "the fleet run did not finish after the daemon died"
        reported_after = time.monotonic() - killed_at
        run = result["run"]
        (target,) = run.targets
        assert target.outcome == LOST, target
        assert run.outcome == common_pb2.RUN_OUTCOME_COMPLETED_WITH_ERRORS
        print(f"edge_disconnected reported {reported_after:.2f}s after kill -9")

        # the orphan outlived its daemon (own session, never signalled) ...
        assert _group_members(pgid), "the child died with the daemon (nothing to clean up)"
        assert not pid_gone(pgid)

        # ... until the next daemon on this state dir starts
        restarted_at = time.monotonic()
        daemon = DaemonProcess.start(host.state_dir)
        killed = daemon.wait_event("orphan_killed")
        assert killed["pgid"] == pgid and killed["command_id"] == received["command_id"]
        wait_until(lambda: pid_gone(pgid) and not _group_members(pgid), 5, what="orphan gone")
        print(f"orphan gone {time.monotonic() - restarted_at:.2f}s after the restart")
        assert _children(host.state_dir) == []
        daemon.wait_event("connected")
        wait_until(lambda: relay.host(host.node_id).status == CONNECTED, what="Connected again")
        run = relay.run(host.node_id, "cmd.run", {"cmd": "echo back"})
        assert run.targets[0].outcome == OK
        history = relay.host(host.node_id).history
        lost = [h for h in history if h.command_id == received["command_id"]]
        assert [h.outcome for h in lost] == [LOST]
    finally:
        if pgid and not pid_gone(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        if daemon is not None:
            daemon.stop()
        relay.stop()


def test_result_finished_offline_survives_kill9_and_lands_in_history(
    tmp_path: Path, tally: Tally
) -> None:
    relay = RelayProcess.start(tmp_path / "relay", heartbeat_interval="0.5s", stale_threshold="2s")
    daemon: DaemonProcess | None = None
    try:
        host = enroll_host(relay, tmp_path / "edge", allow_tools=("cmd.run",))
        daemon = DaemonProcess.start(host.state_dir)
        daemon.wait_event("connected")
        started, release = tmp_path / "started", tmp_path / "release"
        cmd = f"touch {started}; while [ ! -e {release} ]; do sleep 0.05; done; echo done-offline"
        events = relay.start_run(host.node_id, "cmd.run", {"cmd": cmd})
        pump, _ = _finish_in_thread(events)
        received = daemon.wait_event("command_received")
        wait_until(started.exists, what="command started")

        relay.stop()  # the relay goes away while the command runs
        tally.fault()
        daemon.wait_event("disconnected")
        release.touch()
        finished = daemon.wait_event("command_finished")
        assert finished["outcome"] == "ok"
        spool = host.state_dir / hs.RESULT_SPOOL
        assert spool.exists()

        daemon.proc.kill()  # and the daemon dies before it could deliver
        daemon.proc.wait(10)
        tally.fault()
        pump.join(10)

        relay = relay.restart()
        daemon = DaemonProcess.start(host.state_dir)
        daemon.wait_event("spool_loaded")
        back = daemon.wait_event("connected")
        assert back["pending_results"] == 1
        wait_until(lambda: not spool.exists(), what="spooled result acknowledged")
        cid = received["command_id"]

        def recorded() -> admin_pb2.CommandRecord | None:
            rows = [h for h in relay.host(host.node_id).history if h.command_id == cid]
            return rows[0] if rows and rows[0].outcome == OK else None

        row = wait_until(recorded, what="late result in command history")
        tally.lost(0 if row.has_exit_code and row.exit_code == 0 else 1, "offline result")
        assert row.has_exit_code and row.exit_code == 0
        assert row.fleet_command_id == received["fleet_command_id"]
    finally:
        if daemon is not None:
            daemon.stop()
        relay.stop()
