"""A relay that stalls (SIGSTOP): the daemon notices, drops the stream and reconnects.

A stopped relay keeps its TCP connections open, so the stream never errors out: only the
daemon's own count of unacknowledged heartbeats can tell. With a 0.5 s heartbeat and a 2 s
stale threshold the daemon gives up after ``ceil(2 / 0.5) = 4`` unanswered beats, logs
``relay_stalled``, and goes through its reconnect backoff; once the relay runs again
(SIGCONT) the daemon is Connected on a new stream and commands run.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from aegis_edge_agent.statedir import StateDir
from aegis_edge_core.wire import common_pb2
from tests.agent.harness import DaemonProcess, RelayProcess, enroll_host, wait_until
from tests.faults.conftest import Tally

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(90)]

OK = common_pb2.TARGET_OUTCOME_OK
CONNECTED = common_pb2.DAEMON_STATUS_CONNECTED


def test_relay_sigstop_daemon_detects_stall_and_reconnects(tmp_path: Path, tally: Tally) -> None:
    relay = RelayProcess.start(tmp_path / "relay", heartbeat_interval="0.5s", stale_threshold="2s")
    daemon: DaemonProcess | None = None
    stopped = False
    try:
        host = enroll_host(relay, tmp_path / "edge", allow_tools=("cmd.run",))
        daemon = DaemonProcess.start(host.state_dir)
        first = daemon.wait_event("connected")
        assert first["heartbeat_interval_secs"] == 0.5
        assert relay.run(host.node_id, "edge.ping").targets[0].outcome == OK
        # The run ends when the relay has the result; its ack reaches the daemon a moment
        # later. Freeze the relay only once the daemon's spool is empty, or the result is
        # (rightly) still pending when the daemon comes back.
        state = StateDir(host.state_dir)
        wait_until(lambda: not state.load_spool()[0], what="the ping result acknowledged")

        os.kill(relay.proc.pid, signal.SIGSTOP)
        stopped = True
        stalled_at = time.monotonic()
        tally.fault()

        stall = daemon.wait_event("relay_stalled", timeout=15)
        detected_after = time.monotonic() - stalled_at
        assert stall["heartbeats_unacked"] >= 4  # ceil(stale 2 s / heartbeat 0.5 s)
        # 4 beats of 0.5 s, plus one interval of phase, plus the log pump's latency
        assert detected_after < 6.0, f"stall detected only after {detected_after:.1f}s"
        print(f"stall detected after {detected_after:.2f}s")
        down = daemon.wait_event("disconnected")
        assert "stalled" in down["reason"]
        backoff = daemon.wait_event("reconnect_backoff")
        assert 0 < backoff["delay_secs"] <= 1.0  # first step of the schedule, jittered
        # it keeps trying while the relay is frozen; nothing is accepted meanwhile
        daemon.wait_event("connecting", count=2, timeout=10)
        assert len(daemon.events("connected")) == 1

        os.kill(relay.proc.pid, signal.SIGCONT)
        stopped = False
        resumed_at = time.monotonic()
        back = daemon.wait_event("connected", count=2, timeout=30)
        print(f"Connected again {time.monotonic() - resumed_at:.2f}s after SIGCONT")
        assert back["pending_results"] == 0
        wait_until(lambda: relay.host(host.node_id).status == CONNECTED, what="Connected again")
        run = relay.run(host.node_id, "cmd.run", {"cmd": "echo after-stall"})
        (target,) = run.targets
        assert target.outcome == OK, target
        assert b"after-stall" in target.stdout_tail
        assert daemon.proc.poll() is None
    finally:
        if stopped:
            os.kill(relay.proc.pid, signal.SIGCONT)
        if daemon is not None:
            daemon.stop()
        relay.stop()


@pytest.mark.parametrize("features", ["heartbeat-ack-coalesce", "none"])
def test_stall_bound_with_and_without_coalesced_heartbeat_acks(
    tmp_path: Path, tally: Tally, features: str
) -> None:
    """With coalesced acks the relay acks one beat in three (stall count 4 less one), and a
    stalled relay is still noticed after 4 unanswered beats, as with every beat acked (a
    relay that uses no features: what a new daemon meets at an older relay)."""
    relay = RelayProcess.start(
        tmp_path / "relay",
        heartbeat_interval="0.5s",
        stale_threshold="2s",
        extra=("--protocol-features", features),
    )
    daemon: DaemonProcess | None = None
    stopped = False
    try:
        host = enroll_host(relay, tmp_path / "edge")
        daemon = DaemonProcess.start(host.state_dir)
        first = daemon.wait_event("connected")
        coalesced = features != "none"
        assert first["features"] == (["heartbeat-ack-coalesce"] if coalesced else [])
        assert first["heartbeat_ack_every"] == (3 if coalesced else 1)
        time.sleep(3.0)  # six beats: a live relay acking one in three is never "stalled"
        assert not daemon.events("relay_stalled")
        wait_until(lambda: relay.host(host.node_id).status == CONNECTED, what="Connected")

        os.kill(relay.proc.pid, signal.SIGSTOP)
        stopped = True
        stalled_at = time.monotonic()
        tally.fault()
        stall = daemon.wait_event("relay_stalled", timeout=15)
        detected_after = time.monotonic() - stalled_at
        assert stall["heartbeats_unacked"] >= 4
        assert detected_after < 6.0, f"stall detected only after {detected_after:.1f}s"
        print(f"{features}: stall detected after {detected_after:.2f}s")
    finally:
        if stopped:
            os.kill(relay.proc.pid, signal.SIGCONT)
        if daemon is not None:
            daemon.stop()
        relay.stop()


def test_stall_bound_with_heartbeat_keepalive(tmp_path: Path, tally: Tally) -> None:
    """With heartbeat-keepalive the daemon's channel pings the relay (answered inside grpc's
    core) and the relay acks one beat in 15; a stopped relay is still noticed within the
    heartbeat count's bound (4 beats of 0.5 s plus one of phase: 2.5 s), by the ping.

    The daemon sets its channel's keepalive before the handshake, from the plan it last saw:
    its first stream (the default 30 s plan) does not fit this relay's 2 s bound and is
    granted nothing, and it finds the stall by its heartbeat count; the stream after it fits.
    """
    relay = RelayProcess.start(
        tmp_path / "relay",
        heartbeat_interval="0.5s",
        stale_threshold="2s",
        extra=("--protocol-features", "heartbeat-keepalive"),
    )
    daemon: DaemonProcess | None = None
    stopped = False
    try:
        host = enroll_host(relay, tmp_path / "edge")
        daemon = DaemonProcess.start(host.state_dir)
        first = daemon.wait_event("connected")
        assert first["features"] == [] and first["heartbeat_ack_every"] == 1
        os.kill(relay.proc.pid, signal.SIGSTOP)
        stopped = True
        tally.fault()
        assert daemon.wait_event("relay_stalled", timeout=15)["detected_by"] == "heartbeats"
        os.kill(relay.proc.pid, signal.SIGCONT)
        stopped = False

        second = daemon.wait_event("connected", count=2, timeout=30)
        assert second["features"] == ["heartbeat-keepalive"]
        assert second["heartbeat_ack_every"] == 15  # (4 - 1) x KEEPALIVE_ACK_SPREAD
        time.sleep(3.0)  # six beats, one ack at most: the pings keep the stream up
        assert len(daemon.events("relay_stalled")) == 1
        assert len(daemon.events("connected")) == 2
        wait_until(lambda: relay.host(host.node_id).status == CONNECTED, what="Connected")

        os.kill(relay.proc.pid, signal.SIGSTOP)
        stopped = True
        stalled_at = time.monotonic()
        tally.fault()
        stall = daemon.wait_event("relay_stalled", count=2, timeout=15)
        detected_after = time.monotonic() - stalled_at
        assert stall["detected_by"] == "keepalive"
        assert stall["heartbeats_unacked"] < 16  # before the heartbeat count would have
        # ping after 1.5 s without an ack, 1 s to answer it, plus the log pump's latency
        assert detected_after < 6.0, f"stall detected only after {detected_after:.1f}s"
        print(f"heartbeat-keepalive: stall detected after {detected_after:.2f}s")
        down = daemon.wait_event("disconnected", count=2)
        assert "stalled" in down["reason"]
    finally:
        if stopped:
            os.kill(relay.proc.pid, signal.SIGCONT)
        if daemon is not None:
            daemon.stop()
        relay.stop()
