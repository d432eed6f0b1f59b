"""Seed: "Stream churn" -- the reconnect backoff is visible in the daemon's logs."""

from __future__ import annotations

from pathlib import Path

from tests.agent.harness import DaemonProcess, RelayProcess, enroll_host

SCHEDULE = (1, 2, 5, 15, 60)


def test_backoff_climbs_the_schedule_with_jitter_and_recovers(tmp_path: Path) -> None:
    relay = RelayProcess.start(tmp_path / "relay")
    host = enroll_host(relay, tmp_path / "host")
    daemon = DaemonProcess.start(host.state_dir)
    try:
        daemon.wait_event("connected")
        relay.stop()  # a sustained outage
        daemon.wait_event("reconnect_backoff", pred=lambda e: e["attempt"] == 3, timeout=30)
        # Attempt 0 is the wait the draining relay asked for; then each wait lies in
        # [step/2, step] of the documented schedule: jitter spreads a fleet, and the climb
        # shows a sustained connectivity issue.
        waits = [e for e in daemon.events("reconnect_backoff") if e["attempt"] >= 1]
        assert [e["attempt"] for e in waits[:3]] == [1, 2, 3]
        for event in waits[:3]:
            step = SCHEDULE[event["attempt"] - 1]
            assert step / 2 <= event["delay_secs"] <= step, waits
        relay = relay.restart()
        daemon.wait_event("connected", count=2, timeout=30)
    finally:
        daemon.stop()
        relay.stop()
