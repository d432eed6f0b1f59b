"""Decisions the reference daemon takes, kept apart from the I/O that acts on them.

The daemon (``aegis_edge_agent``) asks these when a call arrives, when a call is stopped,
on every heartbeat and when a token nears its end. Each answer depends only on its
arguments: the daemon passes the clock reading and what it knows.
"""

from __future__ import annotations

import enum
import math
from typing import Final

import attrs

from aegis_edge_core import DEFAULT_HEARTBEAT_INTERVAL_SECS, tools_spec
from aegis_edge_core.identity.rotation import DEFAULT_REFRESH_MARGIN, needs_refresh
from aegis_edge_core.wire import stream_pb2

__all__ = [
    "MIN_STALL_HEARTBEATS",
    "Arrival",
    "HeartbeatPlan",
    "KeepalivePlan",
    "StopReason",
    "arrival",
    "command_timeout",
    "concurrency_bound",
    "heartbeat_plan",
    "keepalive_plan",
    "stall_bound",
    "stopped_outcome",
    "token_refresh_due",
]

MIN_STALL_HEARTBEATS: Final = 2
"""Never call a relay stalled over a single unanswered heartbeat: one can cross a hiccup."""


# --------------------------------------------------------------------------- arrivals


class Arrival(enum.Enum):
    """What a ``CommandInvocation`` the daemon receives leads to."""

    RUNNING = "running"
    """Already running from an earlier stream: its result will follow, start nothing."""
    RESEND = "resend"
    """Finished and waiting for an ack (in the spool): send that result again, run nothing."""
    START = "start"


def arrival(*, running: bool, finished: bool) -> Arrival:
    """A relay resends an invocation it has no result for (the stream dropped); a
    ``command_id`` runs at most once on a daemon, so a repeat is answered, never rerun."""
    if running:
        return Arrival.RUNNING
    if finished:
        return Arrival.RESEND
    return Arrival.START


def concurrency_bound(local: int, relay: int) -> int:
    """How many calls may run at once: the host's ``tools.max_concurrent``, tightened by
    the relay's ``max_concurrent_commands`` when it names one (0 means it does not)."""
    return min(local, relay) if relay else local


def command_timeout(
    tool: str,
    *,
    invocation_secs: float,
    argument_secs: float | None,
    default_cmd_run_secs: float | None,
) -> float | None:
    """The deadline a call runs under: the tighter of the relay's and the call's own; a
    ``cmd.run`` given neither gets the host's default, other tools run unbounded."""
    timeout = tools_spec.effective_timeout(invocation_secs or None, argument_secs)
    if timeout is None and tool == tools_spec.CMD_RUN:
        return default_cmd_run_secs
    return timeout


# --------------------------------------------------------------------------- stopping


class StopReason(enum.StrEnum):
    """Why the daemon stopped a call it had accepted."""

    TIMEOUT = "timeout"
    CANCEL = "cancel"
    """The relay cancelled it."""
    SHUTDOWN = "shutdown"
    """The daemon itself is stopping."""


def stopped_outcome(reason: str, *, started: bool) -> tuple[stream_pb2.ErrorKind.ValueType, str]:
    """The error kind and message of a call the daemon stopped; a call stopped before its
    tool ever ran says so, since nothing on the host was touched. An unknown or empty
    reason is a shutdown: the daemon stopping is the one stop nobody asked for."""
    if reason == StopReason.TIMEOUT:
        if started:
            return stream_pb2.ERROR_KIND_TIMEOUT, "deadline passed; killed"
        return stream_pb2.ERROR_KIND_TIMEOUT, "deadline passed before it started"
    if not started:
        return stream_pb2.ERROR_KIND_CANCELLED, "cancelled before it started"
    if reason == StopReason.CANCEL:
        return stream_pb2.ERROR_KIND_CANCELLED, "cancelled by the relay; killed"
    return stream_pb2.ERROR_KIND_CANCELLED, "the daemon stopped; killed"


# --------------------------------------------------------------------------- the stream


@attrs.frozen
class HeartbeatPlan:
    interval_secs: float
    """Seconds between the daemon's heartbeats."""
    stall_after: int
    """Unacknowledged heartbeats after which the relay counts as stalled (redial)."""


def heartbeat_plan(
    interval_secs: float,
    stale_threshold_secs: float,
    *,
    stall_after: int | None = None,
    ack_every: int = 0,
) -> HeartbeatPlan:
    """The daemon's heartbeat schedule from what the relay's ``SessionAccepted`` said (0
    where it said nothing). The relay is stalled once the daemon has waited as long as the
    relay itself waits before calling the daemon stale; ``stall_after`` overrides the count.
    A relay that acks one heartbeat in ``ack_every`` (``heartbeat-ack-coalesce``) is never
    called stalled while its next ack is merely due: the count is at least one more."""
    interval = interval_secs or DEFAULT_HEARTBEAT_INTERVAL_SECS
    stale = stale_threshold_secs or 3 * interval
    limit = stall_after or max(MIN_STALL_HEARTBEATS, math.ceil(stale / interval))
    return HeartbeatPlan(interval_secs=interval, stall_after=max(limit, ack_every + 1))


def stall_bound(interval_secs: float, stale_threshold_secs: float) -> float:
    """The longest a stalled relay goes unnoticed by the heartbeat count alone: the stall
    count's beats plus one interval of phase (the relay may stop just after an ack)."""
    plan = heartbeat_plan(interval_secs, stale_threshold_secs)
    return (plan.stall_after + 1) * plan.interval_secs


@attrs.frozen
class KeepalivePlan:
    """The HTTP/2 keepalive of the daemon's channel (``heartbeat-keepalive``)."""

    time_secs: float
    """A ping after this long without anything read from the relay."""
    timeout_secs: float
    """The connection is dropped when the ping's ack is not in by then."""

    @property
    def bound_secs(self) -> float:
        """The longest a silent relay goes unnoticed: ``Hello.keepalive_secs``."""
        return self.time_secs + self.timeout_secs

    def channel_options(self) -> list[tuple[str, int]]:
        """The grpc channel arguments that run it."""
        time_ms = max(1, round(self.time_secs * 1000))
        timeout_ms = max(1, round(self.timeout_secs * 1000))
        return [
            ("grpc.keepalive_time_ms", time_ms),
            ("grpc.keepalive_timeout_ms", timeout_ms),
            # grpc core times a keepalive ping's ack by the ping timeout (default 60 s),
            # whatever the keepalive timeout says: without this the bound is not kept.
            ("grpc.http2.ping_timeout_ms", timeout_ms),
            # The daemon writes a heartbeat between pings, but grpc must never hold a ping
            # back for want of data frames: the bound depends on it.
            ("grpc.http2.max_pings_without_data", 0),
        ]


def keepalive_plan(interval_secs: float, stale_threshold_secs: float) -> KeepalivePlan:
    """Keepalive for a relay with this heartbeat plan (0s: the defaults), within its
    :func:`stall_bound`: the ack may take two intervals (answered in grpc's C core, so a
    live relay's is late only when its host is starved), the ping goes out after the rest
    of the bound. At 30 s / 90 s: a ping after 60 s without an ack, 60 s to answer, 120 s
    in all, as the heartbeat count (and the relay's own keepalive, 60 s, never fires while
    heartbeats come in)."""
    plan = heartbeat_plan(interval_secs, stale_threshold_secs)
    timeout = 2 * plan.interval_secs
    return KeepalivePlan(
        time_secs=stall_bound(interval_secs, stale_threshold_secs) - timeout,
        timeout_secs=timeout,
    )


def token_refresh_due(*, issued_at: float, expires_at: float, now: float) -> bool:
    """Whether to ask for a fresh node token now: within the last hour of its life, or the
    last third of a token issued for less than three hours."""
    margin = min(DEFAULT_REFRESH_MARGIN, (expires_at - issued_at) / 3)
    return needs_refresh(expires_at, now, margin)
