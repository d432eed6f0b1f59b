"""The rollout planner: a sans-I/O state machine that runs one fleet command.

Theory of operation
-------------------

A :class:`FleetRun` is built from a :class:`~aegis_edge_core.fleet.spec.FleetSpec` and the
:class:`~aegis_edge_core.fleet.resolve.Resolution` of its selector. It never talks to a
daemon, reads a clock or sleeps. The caller (the relay's dispatcher) feeds it four kinds
of input, each with the current time ``now`` in seconds:

* :meth:`FleetRun.start` -- once, to begin;
* :meth:`FleetRun.on_result` -- each time a dispatched target reports how it ended;
* :meth:`FleetRun.on_tick` -- whenever :meth:`FleetRun.next_deadline` has passed (calling
  it more often is harmless);
* :meth:`FleetRun.cancel` -- when an operator runs ``fleet cancel``;

and every call answers with a list of actions to carry out, in order:

* :class:`Dispatch` -- send the spec's tool call to that node, with the invocation's
  ``timeout_secs`` and absolute ``deadline_at`` (what is left of the run's deadline);
* :class:`Cancel` -- ask that node to cancel its in-flight call (``reason`` is
  ``deadline`` or ``cancelled``);
* :class:`Finish` -- the run is over with ``outcome``; emitted exactly once, always last.

:meth:`FleetRun.record` gives the full :class:`~aegis_edge_core.fleet.record.RunRecord` at
any time.

Targets
~~~~~~~

Targets are taken in the resolution's order (sorted by node id). Each moves through
:data:`TARGET_TRANSITIONS`::

    pending --dispatch--> in_flight --result--> done
    pending --skip------> done (not_started, with a skip reason)
    in_flight --cancel--> cancelling --result--> done
                          cancelling --give up--> done (cancelled)

so every target ends in exactly one terminal state, once.

The run
~~~~~~~

The run moves through :data:`RUN_TRANSITIONS`::

    new --start--> canary --canary passed--> running --drained--> finished
    new, canary, running --stop--> draining --drained--> finished

* **Window.** While in ``canary`` or ``running`` the planner keeps ``window`` targets in
  flight, where ``window`` is ``mode.window(len(targets))``: all of them for ``all``, 1 for
  ``sequential``, N for ``rolling=N``, ceil(N% of the targets) but at least 1 for
  ``rolling=N%``. A sliding window: each result frees a slot that the next pending target
  fills in the same call. In flight counts ``in_flight`` and ``cancelling`` targets.
* **Canary.** With ``canary=K`` only the first ``min(K, targets)`` are dispatched (still at
  most ``window`` at a time) until all of them end ``ok``; then the run goes on to
  ``running``. Any canary failure halts the run, whatever the error policy. ``K = 0``
  passes the canary phase at once.
* **Failures.** A failure is any target outcome other than ``ok``. With
  ``stop-after=N`` (``fail-fast`` is N=1), when the Nth failure is recorded while the run
  is in ``canary`` or ``running``, the run *halts* -- even if that was the last target.
* **Stop.** Three causes stop a run: ``halted`` (the error policy or the canary),
  ``deadline`` (``now >= start + deadline_secs``) and ``cancelled`` (:meth:`cancel`). What
  each does is :data:`STOP_RULES`: every pending target ends ``not_started`` with the
  cause as its skip reason; for ``deadline`` and ``cancelled`` each in-flight target is
  sent a :class:`Cancel` and becomes ``cancelling``; for ``halted`` in-flight targets
  finish on their own and their results are recorded. **The first cause names the run's
  outcome** (``halted``, ``deadline_exceeded``, ``cancelled``); a later cause still cancels
  what is in flight (a halted run still honours its deadline and an operator's cancel)
  but does not rename the outcome.
* **Cancel grace.** Whatever a ``cancelling`` target reports is recorded as reported (a
  command may finish ``ok`` just before the cancel reaches it). A daemon that never
  answers cannot hold the run open: ``cancel_grace_secs`` (default 10) after the
  :class:`Cancel` was emitted, every target still ``cancelling`` ends ``cancelled`` with
  an ``error_message`` saying no answer came. Without a deadline or a cancel there is no
  such bound: the caller must report every dispatched target eventually (the dispatcher
  reports ``edge_disconnected`` when a daemon's stream drops).
* **Finish.** When no target is pending, in flight or cancelling, the run finishes: with
  the stop cause's outcome if it was stopped, else ``completed`` if every target ended
  ``ok`` and ``completed_with_errors`` otherwise.

The deadline rule
~~~~~~~~~~~~~~~~~

A run with a deadline ends the commands still running at it in one of two ways, and
which comes first is a race the planner does not let show: the daemon kills the command
at the invocation's timeout (each :class:`Dispatch` carries ``timeout_secs``, what is
left of the deadline), or the caller's tick reaches the deadline first and the planner
sends a :class:`Cancel` (reason ``deadline``). Each dispatched target remembers which
bound its command is killed at (:class:`~aegis_edge_core.fleet.outcomes.TimeoutBound`):
``deadline`` unless the tool's own ``timeout`` argument (``cmd.run``'s) is shorter than
what is left of the deadline, then ``tool``. Then:

* a ``timeout`` result for a target bounded by the ``deadline``, arriving no earlier than
  ``deadline_tolerance_secs`` (default 1) before the deadline, *is* the deadline: it is
  recorded as outcome ``timeout`` with ``ended_by`` ``deadline``, and the deadline fires
  at once (``now`` may be a hair before ``deadline_at`` on the caller's clock): pending
  targets end ``not_started`` (``deadline``), others in flight are cancelled, and the run
  ends ``deadline_exceeded`` -- also when it was the last target. An earlier ``timeout``
  is the tool's own doing (a plugin's) and is recorded as reported;
* a target cancelled for the deadline that answers ``cancelled`` or ``timeout``, or does
  not answer within the cancel grace, ends ``timeout`` with ``ended_by`` ``deadline``
  (a ``timeout`` from a ``tool``-bounded target is its own and stays plain ``timeout``);
* a ``timeout`` result for a ``tool``-bounded target is the command's own timeout: plain
  ``timeout``, no ``ended_by``, and the deadline is not fired by it;
* whatever else a cancelled target reports (``ok``, ``error``, ...) is recorded as
  reported.

So whichever of the daemon's kill, the tick and the cancel's answer comes first, a
command the deadline ended reads ``timeout`` / ``ended_by: deadline`` and the run
``deadline_exceeded`` (unless an earlier cause already named the outcome).

Order within one call
~~~~~~~~~~~~~~~~~~~~~

Every call does, in this order: (1) apply its own input (record the result; for
:meth:`cancel`, after step 2); (2) fire every timer due at ``now`` -- the deadline, then
the cancel grace; (3) apply the error policy; (4) fill the window; (5) finish if nothing
is left. Consequences worth knowing: a result carrying ``now`` past the deadline is
recorded as reported, and if it was the last outstanding target the run *completes* (the
deadline finds nothing left to stop) -- except a ``timeout`` that the deadline rule
(below) attributes to the deadline, which fires the deadline in step (1); nothing is ever
dispatched at or after the deadline; a failure that arrives after the deadline does not
turn a ``deadline_exceeded`` run into a ``halted`` one.

Time
~~~~

``now`` is any finite float on one clock (the relay's). The planner's clock never runs
backwards: a ``now`` earlier than one already seen is taken as the latest seen, so records
stay ordered under a wall clock that steps back. The deadline is measured from the ``now``
given to :meth:`start`.

Misuse and late input
~~~~~~~~~~~~~~~~~~~~~

Bugs in the caller raise :class:`~aegis_edge_core.errors.LocalProtocolError` and change
nothing: starting twice, a result before :meth:`start`, a result for a node that is not a
target or was never dispatched, a result claiming ``not_started``, a non-finite ``now``.
A result for a target that is already done (a late answer after the cancel grace, a
duplicate delivery after a reconnect) is not a bug: it is ignored, returns no actions and
leaves the record as it was. :meth:`on_tick` before :meth:`start` and :meth:`on_tick` or
:meth:`cancel` after the finish return no actions.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Final, TypeAlias

import attrs

from aegis_edge_core.errors import LocalProtocolError
from aegis_edge_core.fleet.errors import RunFinished
from aegis_edge_core.fleet.outcomes import (
    EndedBy,
    RunOutcome,
    RunPhase,
    SkipReason,
    TargetOutcome,
    TargetState,
    TimeoutBound,
)
from aegis_edge_core.fleet.record import RunRecord, TargetRecord
from aegis_edge_core.fleet.resolve import Resolution
from aegis_edge_core.fleet.spec import FleetSpec
from aegis_edge_core.tools_spec import own_timeout

__all__ = [
    "DEFAULT_CANCEL_GRACE_SECS",
    "DEFAULT_DEADLINE_TOLERANCE_SECS",
    "RUN_TRANSITIONS",
    "STOP_RULES",
    "TARGET_TRANSITIONS",
    "Action",
    "Cancel",
    "Dispatch",
    "Finish",
    "FleetRun",
    "RunEvent",
    "StopRule",
    "TargetEvent",
]

DEFAULT_CANCEL_GRACE_SECS: Final = 10.0
"""How long a cancelled target may take to answer before the planner stops waiting."""

DEFAULT_DEADLINE_TOLERANCE_SECS: Final = 1.0
"""How long before the deadline, on the caller's clock, a ``timeout`` from a
deadline-bounded target may arrive and still be the deadline's kill. The daemon times the
invocation's timeout on its own clock, from when it received the call, so its kill lands
at or after the deadline unless the clocks drift apart; a ``timeout`` much earlier is a
tool's own (a plugin's), and must not stop the whole run."""


# --- actions -------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Dispatch:
    """Send the run's tool call to ``node_id``.

    With a run deadline, ``timeout_secs`` is what is left of it (send it as the
    invocation's timeout, and ``deadline_at`` as its absolute deadline); ``bound`` says
    which bound the daemon will kill the command at (see "The deadline rule"). Without a
    deadline both times are ``None``.
    """

    node_id: str
    timeout_secs: float | None = None
    deadline_at: float | None = None
    bound: TimeoutBound | None = None


@attrs.frozen(kw_only=True)
class Cancel:
    """Ask ``node_id`` to cancel its in-flight call; ``reason`` is ``deadline`` or ``cancelled``."""

    node_id: str
    reason: SkipReason


@attrs.frozen(kw_only=True)
class Finish:
    """The run is over. Emitted exactly once, as the last action of its call."""

    outcome: RunOutcome


Action: TypeAlias = Dispatch | Cancel | Finish
"""What the caller must do; see the module docstring."""


# --- transition tables -----------------------------------------------------------------------


# StrEnum, not Enum: the transition tables hash (state, event) pairs on every step, and
# str's C-level hash is several times cheaper than Enum's Python-level one.
class TargetEvent(enum.StrEnum):
    DISPATCH = "dispatch"
    SKIP = "skip"
    RESULT = "result"
    CANCEL = "cancel"
    GIVE_UP = "give_up"


class RunEvent(enum.StrEnum):
    START = "start"
    CANARY_PASSED = "canary_passed"
    STOP = "stop"
    DRAINED = "drained"


_P, _F, _C, _D = (
    TargetState.PENDING,
    TargetState.IN_FLIGHT,
    TargetState.CANCELLING,
    TargetState.DONE,
)

TARGET_TRANSITIONS: Final[Mapping[tuple[TargetState, TargetEvent], TargetState]] = {
    (_P, TargetEvent.DISPATCH): _F,
    (_P, TargetEvent.SKIP): _D,
    (_F, TargetEvent.RESULT): _D,
    (_F, TargetEvent.CANCEL): _C,
    (_C, TargetEvent.RESULT): _D,
    (_C, TargetEvent.GIVE_UP): _D,
}
"""(target state, event) -> next state. A pair not listed is a bug in the caller."""

RUN_TRANSITIONS: Final[Mapping[tuple[RunPhase, RunEvent], RunPhase]] = {
    (RunPhase.NEW, RunEvent.START): RunPhase.CANARY,
    (RunPhase.NEW, RunEvent.STOP): RunPhase.DRAINING,  # cancelled before it started
    (RunPhase.CANARY, RunEvent.CANARY_PASSED): RunPhase.RUNNING,
    (RunPhase.CANARY, RunEvent.STOP): RunPhase.DRAINING,
    (RunPhase.RUNNING, RunEvent.STOP): RunPhase.DRAINING,
    # A second cause (deadline after a halt, cancel after a deadline) may still cancel
    # in-flight work; the phase, like the outcome, stays as the first cause left it.
    (RunPhase.DRAINING, RunEvent.STOP): RunPhase.DRAINING,
    (RunPhase.RUNNING, RunEvent.DRAINED): RunPhase.FINISHED,
    (RunPhase.DRAINING, RunEvent.DRAINED): RunPhase.FINISHED,
}
"""(run phase, event) -> next phase. A pair not listed is a bug in the caller."""


@attrs.frozen(kw_only=True)
class StopRule:
    """What stopping for one cause does: see :data:`STOP_RULES`."""

    skip_reason: SkipReason
    cancel_in_flight: bool
    outcome: RunOutcome


STOP_RULES: Final[Mapping[SkipReason, StopRule]] = {
    # The error policy lets in-flight commands finish: they were sent before anything
    # failed, and killing them half-way could leave hosts worse off than finishing.
    SkipReason.HALTED: StopRule(
        skip_reason=SkipReason.HALTED, cancel_in_flight=False, outcome=RunOutcome.HALTED
    ),
    SkipReason.DEADLINE: StopRule(
        skip_reason=SkipReason.DEADLINE,
        cancel_in_flight=True,
        outcome=RunOutcome.DEADLINE_EXCEEDED,
    ),
    SkipReason.CANCELLED: StopRule(
        skip_reason=SkipReason.CANCELLED, cancel_in_flight=True, outcome=RunOutcome.CANCELLED
    ),
}
"""Stop cause -> what happens to pending and in-flight targets, and the run's outcome."""


# A member hashes and compares like its value, so one lookup serves "ok" and
# TargetOutcome.OK alike, without the cost of an Enum call on every result.
_OUTCOMES: Final[Mapping[str, TargetOutcome]] = {
    outcome.value: outcome for outcome in TargetOutcome
}


# --- the machine ---------------------------------------------------------------------------


class _Target:
    """The planner's mutable view of one target; exported only as a TargetRecord."""

    __slots__ = (
        "bound",
        "cancel_cause",
        "dispatched_at",
        "ended_by",
        "error_message",
        "exit_code",
        "finished_at",
        "node_id",
        "outcome",
        "skip_reason",
        "state",
        "timeout_secs",
    )

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.state = TargetState.PENDING
        self.outcome: TargetOutcome | None = None
        self.exit_code: int | None = None
        self.error_message: str | None = None
        self.skip_reason: SkipReason | None = None
        self.dispatched_at: float | None = None
        self.finished_at: float | None = None
        self.timeout_secs: float | None = None
        self.bound: TimeoutBound | None = None
        self.cancel_cause: SkipReason | None = None
        self.ended_by: EndedBy | None = None

    def step(self, event: TargetEvent) -> None:
        new = TARGET_TRANSITIONS.get((self.state, event))
        if new is None:
            raise LocalProtocolError(
                f"target {self.node_id!r} cannot {event.value} while {self.state.value}"
            )
        self.state = new

    def record(self) -> TargetRecord:
        return TargetRecord(
            node_id=self.node_id,
            state=self.state,
            outcome=self.outcome,
            exit_code=self.exit_code,
            error_message=self.error_message,
            skip_reason=self.skip_reason,
            dispatched_at=self.dispatched_at,
            finished_at=self.finished_at,
            timeout_secs=self.timeout_secs,
            timeout_bound=self.bound,
            ended_by=self.ended_by,
        )


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


class FleetRun:
    """One fleet run's planner. See the module docstring for the exact semantics.

    ``resolution`` must be the resolution of ``spec.selector`` for ``spec.tool`` and must
    have targets: an empty one raises :class:`~aegis_edge_core.fleet.errors.NoTargets`, so
    a run that would do nothing is refused rather than reported ``completed``.
    ``fleet_command_id`` is the caller's id for the run (the core makes no ids).
    """

    def __init__(
        self,
        spec: FleetSpec,
        resolution: Resolution,
        *,
        fleet_command_id: str,
        cancel_grace_secs: float = DEFAULT_CANCEL_GRACE_SECS,
        deadline_tolerance_secs: float = DEFAULT_DEADLINE_TOLERANCE_SECS,
    ) -> None:
        if resolution.tool != spec.tool or resolution.selector != spec.selector:
            raise LocalProtocolError(
                "the resolution is for a different selector or tool than the spec",
                hint="resolve spec.selector for spec.tool",
            )
        if not math.isfinite(cancel_grace_secs) or cancel_grace_secs < 0:
            raise LocalProtocolError(f"cancel_grace_secs must be >= 0, got {cancel_grace_secs!r}")
        if not math.isfinite(deadline_tolerance_secs) or deadline_tolerance_secs < 0:
            raise LocalProtocolError(
                f"deadline_tolerance_secs must be >= 0, got {deadline_tolerance_secs!r}"
            )
        resolution.require_targets()
        self.spec: Final = spec
        self.resolution: Final = resolution
        self.fleet_command_id: Final = fleet_command_id
        self.cancel_grace_secs: Final = float(cancel_grace_secs)
        self.deadline_tolerance_secs: Final = float(deadline_tolerance_secs)

        self._targets = [_Target(node_id) for node_id in resolution.targets]
        self._by_id = {target.node_id: target for target in self._targets}
        self._window = spec.mode.window(len(self._targets))
        self._canary = min(spec.canary, len(self._targets))
        self._stop_after = spec.on_error.stop_after
        self._own_timeout = own_timeout(spec.tool, spec.args)

        self._phase = RunPhase.NEW
        self._cause: SkipReason | None = None
        self._outcome: RunOutcome | None = None
        self._halt_reason: str | None = None
        self._now = -math.inf
        self._started_at: float | None = None
        self._finished_at: float | None = None
        self._deadline_at: float | None = None
        self._deadline_fired = False
        self._grace_at: float | None = None

        self._next = 0  # index of the next pending target; targets leave "pending" in order
        self._in_flight: dict[str, _Target] = {}  # in_flight and cancelling, dispatch order
        self._cancelling = 0
        self._done = 0
        self._failures = 0
        self._canary_ok = 0

    # --- public inputs ---------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Begin the run: dispatch the first window (or the canary). Call exactly once."""
        now = self._clock(now)
        self._run_step(RunEvent.START, "start")
        self._now = now
        self._started_at = now
        if self.spec.deadline_secs is not None:
            self._deadline_at = now + self.spec.deadline_secs
        actions: list[Action] = []
        self._advance(now, actions)
        return actions

    def on_result(
        self,
        node_id: str,
        outcome: TargetOutcome | str,
        now: float,
        *,
        exit_code: int | None = None,
        error_message: str | None = None,
    ) -> list[Action]:
        """Record how a dispatched target ended, then dispatch into the freed slot.

        ``outcome`` is a :class:`TargetOutcome` or its string. A result for a target that
        is already done is ignored (returns ``[]``); see the module docstring.
        """
        now = self._clock(now)
        if self._phase is RunPhase.NEW:
            raise LocalProtocolError("a result arrived before the run was started")
        target = self._by_id.get(node_id)
        if target is None:
            raise LocalProtocolError(f"node {node_id!r} is not a target of this run")
        if target.dispatched_at is None:
            raise LocalProtocolError(f"node {node_id!r} was never dispatched")
        ended = _OUTCOMES.get(outcome)
        if ended is None:
            raise LocalProtocolError(f"unknown target outcome {outcome!r}")
        if ended is TargetOutcome.NOT_STARTED:
            raise LocalProtocolError(
                f"node {node_id!r} was dispatched; only the planner marks targets not_started"
            )
        if exit_code is not None and (
            not isinstance(exit_code, int) or isinstance(exit_code, bool)
        ):
            raise LocalProtocolError(f"exit_code must be an int or None, got {exit_code!r}")
        self._now = now
        if target.state is TargetState.DONE:
            return []
        was_cancelling = target.state is TargetState.CANCELLING
        target.step(TargetEvent.RESULT)
        if was_cancelling:
            self._cancelling -= 1
        del self._in_flight[node_id]
        # The deadline rule (module docstring): the daemon's kill at the deadline-derived
        # timeout and its answer to the deadline's cancel mean the same thing.
        by_deadline = (
            ended is TargetOutcome.TIMEOUT
            and target.bound is TimeoutBound.DEADLINE
            and self._deadline_at is not None
            and now >= self._deadline_at - self.deadline_tolerance_secs
        ) or (ended is TargetOutcome.CANCELLED and target.cancel_cause is SkipReason.DEADLINE)
        actions: list[Action] = []
        if by_deadline:
            target.ended_by = EndedBy.DEADLINE
            self._end(
                target,
                TargetOutcome.TIMEOUT,
                now,
                exit_code=exit_code,
                error_message=self._deadline_message(error_message),
            )
            if not self._deadline_fired:
                # The daemon's kill at the deadline-derived timeout beat the tick: it is
                # the deadline, wherever the caller's clock says it is.
                self._fire_deadline(now, actions)
        else:
            self._end(target, ended, now, exit_code=exit_code, error_message=error_message)
        self._fire_timers(now, actions)
        self._apply_error_policy(now, target, actions)
        self._advance(now, actions)
        return actions

    def on_tick(self, now: float) -> list[Action]:
        """Let time pass: fire the deadline and the cancel grace if they are due."""
        now = self._clock(now)
        self._now = now
        if self._phase in (RunPhase.NEW, RunPhase.FINISHED):
            return []
        actions: list[Action] = []
        self._fire_timers(now, actions)
        self._advance(now, actions)
        return actions

    def check_cancellable(self) -> None:
        """Raise :class:`~aegis_edge_core.fleet.errors.RunFinished` once the run is over.

        :meth:`cancel` itself is a no-op then (a cancel racing the finish is harmless); an
        operator asking to cancel a finished run is told so instead.
        """
        if self._outcome is not None:
            raise RunFinished(self.fleet_command_id, self._outcome.value)

    def cancel(self, now: float, *, message: str | None = None) -> list[Action]:
        """An operator cancels the run: stop with cause ``cancelled``.

        Allowed before :meth:`start` (every target ends ``not_started``) and a no-op after
        the finish. ``message`` becomes the record's ``halt_reason`` if this is the first
        stop cause.
        """
        now = self._clock(now)
        self._now = now
        if self._phase is RunPhase.FINISHED:
            return []
        actions: list[Action] = []
        if self._phase is not RunPhase.NEW:
            self._fire_timers(now, actions)
        self._stop(SkipReason.CANCELLED, now, message or "cancelled by an operator", actions)
        self._fire_timers(now, actions)  # a zero grace gives up at once
        self._advance(now, actions)
        return actions

    # --- queries ---------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When the caller should call :meth:`on_tick` next, or ``None`` if nothing is timed."""
        if self._phase in (RunPhase.NEW, RunPhase.FINISHED):
            return None
        times = []
        if self._deadline_at is not None and not self._deadline_fired:
            times.append(self._deadline_at)
        if self._cancelling and self._grace_at is not None:
            times.append(self._grace_at)
        return min(times) if times else None

    @property
    def phase(self) -> RunPhase:
        return self._phase

    @property
    def finished(self) -> bool:
        return self._phase is RunPhase.FINISHED

    @property
    def outcome(self) -> RunOutcome | None:
        """The run's outcome once finished, else ``None``."""
        return self._outcome

    @property
    def window(self) -> int:
        """The most targets in flight at once."""
        return self._window

    @property
    def in_flight(self) -> tuple[str, ...]:
        """Node ids dispatched and not yet done (including cancelling), in dispatch order."""
        return tuple(self._in_flight)

    def target(self, node_id: str) -> TargetRecord:
        """One target's :class:`TargetRecord` now, in O(1) (progress events of big runs).

        Raises :class:`~aegis_edge_core.errors.LocalProtocolError` for a node that is not
        a target of this run.
        """
        target = self._by_id.get(node_id)
        if target is None:
            raise LocalProtocolError(f"node {node_id!r} is not a target of this run")
        return target.record()

    @property
    def failures(self) -> int:
        """Targets that ended with an outcome other than ``ok`` so far (``not_started`` too)."""
        return self._failures

    def record(self) -> RunRecord:
        """The run as a :class:`RunRecord`, at this moment."""
        spec = self.spec
        return RunRecord(
            fleet_command_id=self.fleet_command_id,
            selector=str(spec.selector),
            tool=spec.tool,
            mode=str(spec.mode),
            on_error=str(spec.on_error),
            deadline_secs=spec.deadline_secs,
            canary=spec.canary,
            phase=self._phase,
            outcome=self._outcome,
            halt_reason=self._halt_reason,
            started_at=self._started_at,
            finished_at=self._finished_at,
            skipped=self.resolution.skipped,
            targets=[target.record() for target in self._targets],
        )

    # --- internals -------------------------------------------------------------------------

    def _clock(self, now: float) -> float:
        # Only computes; each entry point stores it once its input is known to be valid,
        # so a refused call leaves even the clock untouched.
        if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
            raise LocalProtocolError(f"now must be a finite number of seconds, got {now!r}")
        return max(float(now), self._now)

    def _run_step(self, event: RunEvent, what: str) -> None:
        new = RUN_TRANSITIONS.get((self._phase, event))
        if new is None:
            raise LocalProtocolError(f"cannot {what}: the run is {self._phase.value}")
        self._phase = new

    def _end(
        self,
        target: _Target,
        outcome: TargetOutcome,
        now: float,
        *,
        exit_code: int | None = None,
        error_message: str | None = None,
        skip_reason: SkipReason | None = None,
    ) -> None:
        target.outcome = outcome
        target.exit_code = exit_code
        target.error_message = error_message
        target.skip_reason = skip_reason
        target.finished_at = now
        self._done += 1
        if outcome is not TargetOutcome.OK:
            self._failures += 1
        elif self._phase is RunPhase.CANARY:
            self._canary_ok += 1

    def _fire_timers(self, now: float, actions: list[Action]) -> None:
        if self._done == len(self._targets):
            return  # nothing left to stop; the run finishes in _advance
        if self._deadline_at is not None and not self._deadline_fired and now >= self._deadline_at:
            self._fire_deadline(now, actions)
        if self._cancelling and self._grace_at is not None and now >= self._grace_at:
            for target in list(self._in_flight.values()):
                if target.state is not TargetState.CANCELLING:
                    continue
                target.step(TargetEvent.GIVE_UP)
                self._cancelling -= 1
                del self._in_flight[target.node_id]
                silence = (
                    f"no answer within {self.cancel_grace_secs:g}s of the cancel; gave up waiting"
                )
                if target.cancel_cause is SkipReason.DEADLINE:
                    target.ended_by = EndedBy.DEADLINE
                    self._end(
                        target,
                        TargetOutcome.TIMEOUT,
                        now,
                        error_message=self._deadline_message(silence),
                    )
                else:
                    self._end(target, TargetOutcome.CANCELLED, now, error_message=silence)

    def _fire_deadline(self, now: float, actions: list[Action]) -> None:
        self._deadline_fired = True
        assert self.spec.deadline_secs is not None
        self._stop(
            SkipReason.DEADLINE,
            now,
            f"deadline of {self.spec.deadline_secs:g}s reached",
            actions,
        )

    def _deadline_message(self, reported: str | None) -> str:
        # One wording whichever way the deadline got there (kill, cancel, silence); the
        # daemon's own words follow, for whoever digs.
        assert self.spec.deadline_secs is not None
        head = f"ended by the run's deadline of {self.spec.deadline_secs:g}s"
        return f"{head} ({reported})" if reported else head

    def _apply_error_policy(self, now: float, target: _Target, actions: list[Action]) -> None:
        if self._phase not in (RunPhase.CANARY, RunPhase.RUNNING) or not self._failures:
            return
        if target.outcome is TargetOutcome.OK:
            return
        outcome = target.outcome.value if target.outcome else "?"
        if self._phase is RunPhase.CANARY:
            why = f"canary target {target.node_id} ended {outcome}"
        elif self._stop_after is not None and self._failures >= self._stop_after:
            why = (
                f"on-error {self.spec.on_error}: {_plural(self._failures, 'target')} failed, "
                f"the last {target.node_id} ({outcome})"
            )
        else:
            return
        self._stop(SkipReason.HALTED, now, why, actions)

    def _stop(self, cause: SkipReason, now: float, why: str, actions: list[Action]) -> None:
        self._run_step(RunEvent.STOP, f"stop ({cause.value})")
        if self._cause is None:
            self._cause = cause
            self._halt_reason = why
        rule = STOP_RULES[cause]
        targets = self._targets
        for index in range(self._next, len(targets)):
            target = targets[index]
            target.step(TargetEvent.SKIP)
            self._end(target, TargetOutcome.NOT_STARTED, now, skip_reason=rule.skip_reason)
        self._next = len(targets)
        if not rule.cancel_in_flight:
            return
        for target in self._in_flight.values():
            if target.state is TargetState.IN_FLIGHT:
                target.step(TargetEvent.CANCEL)
                target.cancel_cause = cause
                self._cancelling += 1
                actions.append(Cancel(node_id=target.node_id, reason=cause))
        if self._cancelling and self._grace_at is None:
            self._grace_at = now + self.cancel_grace_secs

    def _advance(self, now: float, actions: list[Action]) -> None:
        if self._phase is RunPhase.CANARY and self._canary_ok == self._canary:
            self._run_step(RunEvent.CANARY_PASSED, "pass the canary")
        if self._phase is RunPhase.CANARY or self._phase is RunPhase.RUNNING:
            limit = self._canary if self._phase is RunPhase.CANARY else len(self._targets)
            in_flight = self._in_flight
            targets = self._targets
            window = self._window
            deadline_at = self._deadline_at
            own = self._own_timeout
            while len(in_flight) < window and self._next < limit:
                target = targets[self._next]
                self._next += 1
                target.step(TargetEvent.DISPATCH)
                target.dispatched_at = now
                if deadline_at is not None:
                    # Nothing is dispatched at or after the deadline, so this is > 0.
                    target.timeout_secs = deadline_at - now
                    target.bound = (
                        TimeoutBound.TOOL
                        if own is not None and own < target.timeout_secs
                        else TimeoutBound.DEADLINE
                    )
                elif own is not None:
                    target.bound = TimeoutBound.TOOL
                in_flight[target.node_id] = target
                actions.append(
                    Dispatch(
                        node_id=target.node_id,
                        timeout_secs=target.timeout_secs,
                        deadline_at=deadline_at,
                        bound=target.bound,
                    )
                )
        if self._done == len(self._targets) and self._phase is not RunPhase.FINISHED:
            self._run_step(RunEvent.DRAINED, "finish")
            self._finished_at = now
            if self._cause is not None:
                self._outcome = STOP_RULES[self._cause].outcome
            elif self._failures:
                self._outcome = RunOutcome.COMPLETED_WITH_ERRORS
            else:
                self._outcome = RunOutcome.COMPLETED
            actions.append(Finish(outcome=self._outcome))
