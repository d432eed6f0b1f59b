"""The daemon's decisions, without a daemon: arrivals, bounds, deadlines, stops, heartbeats."""

from __future__ import annotations

import pytest

from aegis_edge_core import daemon_rules as rules
from aegis_edge_core.wire import stream_pb2


def test_a_command_id_runs_at_most_once():
    assert rules.arrival(running=False, finished=False) is rules.Arrival.START
    assert rules.arrival(running=True, finished=False) is rules.Arrival.RUNNING
    assert rules.arrival(running=False, finished=True) is rules.Arrival.RESEND
    # running wins: a result cannot be spooled while its call still runs, but if it were,
    # starting nothing and sending nothing twice is the safe answer
    assert rules.arrival(running=True, finished=True) is rules.Arrival.RUNNING


@pytest.mark.parametrize(("local", "relay", "bound"), [(4, 0, 4), (4, 2, 2), (2, 8, 2), (1, 1, 1)])
def test_concurrency_bound_is_the_tighter_of_host_and_relay(local, relay, bound):
    assert rules.concurrency_bound(local, relay) == bound


def test_command_timeout():
    def timeout(tool, inv, arg, default=600.0):
        return rules.command_timeout(
            tool, invocation_secs=inv, argument_secs=arg, default_cmd_run_secs=default
        )

    assert timeout("cmd.run", 0.0, None) == 600.0  # neither side bounds it: the host default
    assert timeout("cmd.run", 30.0, None) == 30.0
    assert timeout("cmd.run", 30.0, 5.0) == 5.0
    assert timeout("cmd.run", 0.0, 900.0) == 900.0  # the call's own bound beats the default
    assert timeout("sys.info", 0.0, None) is None  # only cmd.run gets the default
    assert timeout("sys.info", 12.0, None) == 12.0


@pytest.mark.parametrize(
    ("reason", "started", "kind", "message"),
    [
        ("timeout", True, stream_pb2.ERROR_KIND_TIMEOUT, "deadline passed; killed"),
        ("cancel", True, stream_pb2.ERROR_KIND_CANCELLED, "cancelled by the relay; killed"),
        ("shutdown", True, stream_pb2.ERROR_KIND_CANCELLED, "the daemon stopped; killed"),
        ("", True, stream_pb2.ERROR_KIND_CANCELLED, "the daemon stopped; killed"),
        ("timeout", False, stream_pb2.ERROR_KIND_TIMEOUT, "deadline passed before it started"),
        ("cancel", False, stream_pb2.ERROR_KIND_CANCELLED, "cancelled before it started"),
        ("shutdown", False, stream_pb2.ERROR_KIND_CANCELLED, "cancelled before it started"),
    ],
)
def test_stopped_outcome(reason, started, kind, message):
    assert rules.stopped_outcome(reason, started=started) == (kind, message)
    assert rules.StopReason.CANCEL == "cancel"  # the reason travels as a plain string


def test_heartbeat_plan():
    # the relay's 30 s / 90 s: stalled after three unanswered heartbeats
    assert rules.heartbeat_plan(30.0, 90.0) == rules.HeartbeatPlan(30.0, 3)
    assert rules.heartbeat_plan(0.2, 0.5) == rules.HeartbeatPlan(0.2, 3)  # rounds up
    assert rules.heartbeat_plan(10.0, 10.0).stall_after == rules.MIN_STALL_HEARTBEATS
    # a relay that named nothing: 30 s, and three times that for stale
    assert rules.heartbeat_plan(0.0, 0.0) == rules.HeartbeatPlan(30.0, 3)
    assert rules.heartbeat_plan(5.0, 0.0) == rules.HeartbeatPlan(5.0, 3)
    assert rules.heartbeat_plan(30.0, 90.0, stall_after=7).stall_after == 7


def test_token_refresh_due():
    day = 24 * 3600.0
    # a day-long token: the last hour
    assert not rules.token_refresh_due(issued_at=0, expires_at=day, now=day - 3601)
    assert rules.token_refresh_due(issued_at=0, expires_at=day, now=day - 3600)
    # a short token: its last third
    assert not rules.token_refresh_due(issued_at=0, expires_at=3.0, now=1.9)
    assert rules.token_refresh_due(issued_at=0, expires_at=3.0, now=2.0)
    assert rules.token_refresh_due(issued_at=0, expires_at=3.0, now=10.0)  # already expired
