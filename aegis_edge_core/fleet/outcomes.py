"""The vocabularies of a fleet run: daemon statuses, skip reasons, target and run outcomes.

They are :class:`enum.StrEnum` so each member *is* its wire string: ``TargetOutcome.OK ==
"ok"``, JSON encoders need no help, and metric labels (``outcome``, ``reason``) are the
values as written. The strings are the ones ``aegis.edge.v1`` and the seed use, in lower
case; :class:`DaemonStatus` keeps the seed's capitalised status pills.
"""

from __future__ import annotations

import enum

# One status vocabulary for the whole core: the health machine's (the seed's status pill).
from aegis_edge_core.health import DaemonStatus

__all__ = [
    "RESOLUTION_SKIP_REASONS",
    "RUN_SKIP_REASONS",
    "DaemonStatus",
    "EndedBy",
    "RunOutcome",
    "RunPhase",
    "SkipReason",
    "TargetOutcome",
    "TargetState",
    "TimeoutBound",
]


class SkipReason(enum.StrEnum):
    """Why a matched daemon was not (or not any more) going to run the tool.

    The first five are decided at resolution time, before anything is dispatched; the last
    three are decided by the planner while the run goes on, and always go with the target
    outcome ``not_started``. They are the ``reason`` label of
    ``aegis_edge_fleet_targets_skipped_total``. ``not_found`` is a node a saved group pins
    that is not in the fleet (see :mod:`aegis_edge_core.fleet.groups`).
    """

    DISCONNECTED = "disconnected"
    UNHEALTHY = "unhealthy"
    REVOKED = "revoked"
    TOOL_UNAVAILABLE = "tool_unavailable"
    NOT_FOUND = "not_found"
    HALTED = "halted"
    DEADLINE = "deadline"
    CANCELLED = "cancelled"


RESOLUTION_SKIP_REASONS = frozenset(
    {
        SkipReason.DISCONNECTED,
        SkipReason.UNHEALTHY,
        SkipReason.REVOKED,
        SkipReason.TOOL_UNAVAILABLE,
        SkipReason.NOT_FOUND,
    }
)
RUN_SKIP_REASONS = frozenset({SkipReason.HALTED, SkipReason.DEADLINE, SkipReason.CANCELLED})


class TargetOutcome(enum.StrEnum):
    """How one target of a run ended. Everything but ``ok`` counts as a failure."""

    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    DENIED = "denied"
    EDGE_DISCONNECTED = "edge_disconnected"
    NOT_STARTED = "not_started"


class EndedBy(enum.StrEnum):
    """What ended a dispatched target, when the outcome alone does not say it.

    ``deadline``: the run's deadline ended the command -- the daemon killed it at the
    timeout the planner derived from the deadline, or the relay cancelled it when the
    deadline passed, whichever came first. Such a target's outcome is always ``timeout``.
    A command killed at its own, shorter ``timeout`` argument has outcome ``timeout`` and
    no ``ended_by``.
    """

    DEADLINE = "deadline"


class TimeoutBound(enum.StrEnum):
    """Which bound a dispatched target's command is killed at: the tighter of the two.

    ``deadline``: what is left of the run's deadline, sent as the invocation's timeout.
    ``tool``: the tool's own ``timeout`` argument, shorter than what is left of the
    deadline (or there is no deadline).
    """

    DEADLINE = "deadline"
    TOOL = "tool"


class RunOutcome(enum.StrEnum):
    """How a whole run ended.

    ``completed`` means every target ended ``ok`` (the CLI exits 0 only for it);
    ``completed_with_errors`` that every target ran but some failed; the last three that
    the run was stopped early -- by its error policy, its deadline, or an operator.
    """

    COMPLETED = "completed"
    COMPLETED_WITH_ERRORS = "completed_with_errors"
    HALTED = "halted"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"


class TargetState(enum.StrEnum):
    """Where one target is in its life; only ``done`` targets have an outcome.

    ``cancelling`` is in flight with a cancel sent: the planner waits for the daemon's
    answer, up to the cancel grace period.
    """

    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    CANCELLING = "cancelling"
    DONE = "done"


class RunPhase(enum.StrEnum):
    """Where a whole run is; see :mod:`aegis_edge_core.fleet.planner` for the transitions."""

    NEW = "new"
    CANARY = "canary"
    RUNNING = "running"
    DRAINING = "draining"
    FINISHED = "finished"
