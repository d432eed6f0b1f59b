"""The planner under random fleets, modes, policies, result orders and clocks.

A hypothesis state machine drives a FleetRun the way a dispatcher would -- results for
in-flight targets in any order, ticks at random times (sometimes backwards), operator
cancels, duplicate and bogus results -- and checks after every call:

* never more than the window in flight (the canary size while in the canary);
* nothing dispatched twice, after the run stopped, or at or after the deadline;
* the first stop cause, predicted independently from the rules, names the outcome;
  a run that hit its halt point ends ``halted``;
* with ``continue`` and no deadline or cancel, every target is dispatched;
* the deadline rule: each dispatch carries what is left of the deadline and the bound the
  command is killed at; a ``timeout`` from a deadline-bounded target near the deadline, or a
  ``cancelled`` answer to the deadline's cancel, is recorded ``timeout`` / ``ended_by:
  deadline`` and names the run ``deadline_exceeded`` (first cause), even as the last result;
  nothing else carries ``ended_by``;
* the run always reaches Finish, exactly once, with every target in exactly one
  terminal state and nothing pending (teardown drives it home).
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from aegis_edge_core.errors import LocalProtocolError
from aegis_edge_core.fleet import (
    Action,
    Cancel,
    Dispatch,
    EndedBy,
    Finish,
    FleetRun,
    FleetSpec,
    RunOutcome,
    RunPhase,
    RunRecord,
    SkipReason,
    TargetOutcome,
    TargetState,
    TimeoutBound,
    resolve_targets,
)
from aegis_edge_core.fleet.planner import DEFAULT_DEADLINE_TOLERANCE_SECS, STOP_RULES

from .helpers import snap

modes = st.one_of(
    st.just("all"),
    st.just("sequential"),
    st.integers(1, 8).map(lambda n: f"rolling={n}"),
    st.integers(1, 100).map(lambda p: f"rolling={p}%"),
)
policies = st.one_of(st.just("continue"), st.integers(1, 4).map(lambda n: f"stop-after={n}"))
reported = st.sampled_from(
    [TargetOutcome.OK] * 6
    + [
        TargetOutcome.ERROR,
        TargetOutcome.TIMEOUT,
        TargetOutcome.CANCELLED,
        TargetOutcome.DENIED,
        TargetOutcome.EDGE_DISCONNECTED,
    ]
)


class FleetRunMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.run: FleetRun
        self.now = 0.0  # the planner's clock, as the model sees it (never backwards)
        self.deadline_at: float | None = None
        self.dispatched: set[str] = set()
        self.finishes: list[Finish] = []
        self.expected_cause: SkipReason | None = None
        self.cancel_called = False
        self.grace = 0.0
        self.grace_at: float | None = None
        self.own_timeout: float | None = None
        self.bounds: dict[str, TimeoutBound | None] = {}
        self.cancel_cause: dict[str, SkipReason] = {}

    @initialize(
        size=st.integers(1, 24),
        mode=modes,
        on_error=policies,
        deadline=st.none() | st.floats(1, 200),
        canary=st.integers(0, 4) | st.just(0),
        grace=st.sampled_from([0.0, 5.0, 30.0]),
        start=st.floats(0, 1e9),
        own_timeout=st.none() | st.floats(0.5, 300),
    )
    def setup(
        self,
        size: int,
        mode: str,
        on_error: str,
        deadline: float | None,
        canary: int,
        grace: float,
        start: float,
        own_timeout: float | None,
    ) -> None:
        fleet = [snap(f"n{i:03d}") for i in range(size)]
        spec = FleetSpec(
            selector="all",
            tool="cmd.run",
            args={} if own_timeout is None else {"cmd": "sleep 1", "timeout": own_timeout},
            mode=mode,
            on_error=on_error,
            deadline_secs=deadline,
            canary=canary,
        )
        self.spec = spec
        self.run = FleetRun(
            spec,
            resolve_targets(fleet, spec.selector, spec.tool),
            fleet_command_id="fc",
            cancel_grace_secs=grace,
        )
        self.now = start
        self.grace = grace
        self.own_timeout = own_timeout
        self.deadline_at = None if deadline is None else start + deadline
        self.apply(self.run.start(start))

    # --- the model's checks on every batch of actions ------------------------------------------

    def apply(self, actions: list[Action]) -> None:
        assert not self.finishes, f"actions after Finish: {actions}"
        for i, action in enumerate(actions):
            if isinstance(action, Dispatch):
                assert action.node_id not in self.dispatched, "dispatched twice"
                assert self.expected_cause is None, "dispatched after the run stopped"
                assert self.deadline_at is None or self.now < self.deadline_at, (
                    "dispatched at or after the deadline"
                )
                self.dispatched.add(action.node_id)
                self.check_dispatch(action)
            elif isinstance(action, Cancel):
                assert action.node_id in self.dispatched
                assert action.reason in (SkipReason.DEADLINE, SkipReason.CANCELLED)
                assert action.node_id not in self.cancel_cause, "cancelled twice"
                self.cancel_cause[action.node_id] = action.reason
                if self.grace_at is None:
                    self.grace_at = self.now + self.grace
            else:
                assert isinstance(action, Finish)
                assert i == len(actions) - 1, "Finish is not last"
                self.finishes.append(action)
                self.check_finished(action)

    def check_dispatch(self, action: Dispatch) -> None:
        own = self.own_timeout
        if self.deadline_at is None:
            assert action.timeout_secs is None and action.deadline_at is None
            assert action.bound is (None if own is None else TimeoutBound.TOOL)
        else:
            assert action.deadline_at == self.deadline_at
            assert action.timeout_secs == self.deadline_at - self.now > 0
            tool_first = own is not None and own < action.timeout_secs
            assert action.bound is (TimeoutBound.TOOL if tool_first else TimeoutBound.DEADLINE)
        self.bounds[action.node_id] = action.bound

    def by_deadline(self, node: str, outcome: TargetOutcome, now: float) -> bool:
        """The deadline rule, restated from the docstring."""
        if outcome is TargetOutcome.CANCELLED:
            return self.cancel_cause.get(node) is SkipReason.DEADLINE
        return (
            outcome is TargetOutcome.TIMEOUT
            and self.bounds.get(node) is TimeoutBound.DEADLINE
            and self.deadline_at is not None
            and now >= self.deadline_at - DEFAULT_DEADLINE_TOLERANCE_SECS
        )

    def check_finished(self, finish: Finish) -> None:
        event(f"outcome {finish.outcome.value}")
        record = self.run.record()
        assert self.run.finished and record.outcome is finish.outcome
        assert all(t.state is TargetState.DONE and t.outcome for t in record.targets)
        ran = {t.node_id for t in record.targets if t.dispatched_at is not None}
        assert ran == self.dispatched
        not_started = [t for t in record.targets if t.outcome is TargetOutcome.NOT_STARTED]
        assert {t.node_id for t in not_started} == set(self.run.resolution.targets) - ran
        for t in record.targets:
            ended_by_deadline = t.ended_by is EndedBy.DEADLINE
            assert not ended_by_deadline or t.outcome is TargetOutcome.TIMEOUT
            if self.cancel_cause.get(t.node_id) is SkipReason.DEADLINE:
                # Killed by the deadline's cancel, or silent past the grace: never "cancelled".
                assert t.outcome is not TargetOutcome.CANCELLED
        if self.expected_cause is None:
            assert not not_started
            all_ok = all(t.outcome is TargetOutcome.OK for t in record.targets)
            assert finish.outcome is (
                RunOutcome.COMPLETED if all_ok else RunOutcome.COMPLETED_WITH_ERRORS
            )
        else:
            assert finish.outcome is STOP_RULES[self.expected_cause].outcome
            assert all(t.skip_reason is self.expected_cause for t in not_started)
        if (
            self.spec.on_error.stop_after is None
            and self.spec.canary == 0
            and self.deadline_at is None
            and not self.cancel_called
        ):
            assert self.expected_cause is None
            assert ran == set(self.run.resolution.targets), "continue must dispatch everyone"

    def clock(self, now: float) -> float:
        self.now = max(self.now, now)
        return self.now

    def deadline_due(self) -> bool:
        return self.deadline_at is not None and self.now >= self.deadline_at

    def undone(self) -> int:
        return sum(t.state is not TargetState.DONE for t in self.run.record().targets)

    @invariant()
    def cancel_grace_is_bounded(self) -> None:
        # Once the grace after the cancels has passed, no daemon can hold the run open.
        states = [t.state for t in self.run.record().targets]
        if self.grace_at is not None and self.now >= self.grace_at:
            assert TargetState.CANCELLING not in states
        if TargetState.CANCELLING in states:
            assert self.run.next_deadline() is not None

    @invariant()
    def window_holds(self) -> None:
        limit = self.run.window
        if self.run.phase is RunPhase.CANARY:
            limit = min(limit, self.spec.canary)
        assert len(self.run.in_flight) <= limit

    # --- rules ------------------------------------------------------------------------------

    @precondition(lambda self: bool(self.run.in_flight) and not self.finishes)
    @rule(
        data=st.data(),
        outcome=reported,
        dt=st.floats(0, 30),
        exit_code=st.none() | st.integers(0, 3),
    )
    def result(
        self, data: st.DataObject, outcome: TargetOutcome, dt: float, exit_code: int | None
    ) -> None:
        node = data.draw(st.sampled_from(sorted(self.run.in_flight)))
        phase = self.run.phase
        failures = self.run.failures
        last = self.undone() == 1
        now = self.clock(self.now + dt)
        by_deadline = self.by_deadline(node, outcome, now)
        # Predict the stop cause from the documented order: input, timers, policy.
        if self.expected_cause is None and phase in (RunPhase.CANARY, RunPhase.RUNNING):
            if by_deadline or (self.deadline_due() and not last):
                self.expected_cause = SkipReason.DEADLINE
            elif outcome is not TargetOutcome.OK and (
                phase is RunPhase.CANARY
                or (
                    self.spec.on_error.stop_after is not None
                    and failures + 1 >= self.spec.on_error.stop_after
                )
            ):
                self.expected_cause = SkipReason.HALTED
        self.apply(self.run.on_result(node, outcome, now, exit_code=exit_code))
        done = next(t for t in self.run.record().targets if t.node_id == node)
        if by_deadline:
            event("a result the deadline ended")
            assert done.outcome is TargetOutcome.TIMEOUT and done.ended_by is EndedBy.DEADLINE
        else:
            assert done.outcome is outcome and done.ended_by is None
        assert done.finished_at == now
        if self.expected_cause is SkipReason.HALTED:
            assert self.run.phase in (RunPhase.DRAINING, RunPhase.FINISHED)

    @precondition(lambda self: not self.finishes)
    @rule(dt=st.floats(-20, 120))
    def tick(self, dt: float) -> None:
        now = self.clock(self.now + dt)
        if self.expected_cause is None and self.deadline_due():
            self.expected_cause = SkipReason.DEADLINE
        self.apply(self.run.on_tick(now))

    @precondition(lambda self: self.run.next_deadline() is not None and not self.finishes)
    @rule()
    def tick_at_next_deadline(self) -> None:
        when = self.run.next_deadline()
        assert when is not None
        now = self.clock(when)
        if self.expected_cause is None and self.deadline_due():
            self.expected_cause = SkipReason.DEADLINE
        self.apply(self.run.on_tick(now))

    @precondition(lambda self: not self.finishes)
    @rule(dt=st.floats(0, 10), dice=st.integers(0, 5))
    def operator_cancel(self, dt: float, dice: int) -> None:
        if dice:  # rules are drawn uniformly; cancels should not end most runs
            return
        now = self.clock(self.now + dt)
        self.cancel_called = True
        if self.expected_cause is None:
            self.expected_cause = (
                SkipReason.DEADLINE if self.deadline_due() else SkipReason.CANCELLED
            )
        self.apply(self.run.cancel(now))

    @precondition(
        lambda self: any(
            t.outcome is not None and t.dispatched_at is not None for t in self.run.record().targets
        )
    )
    @rule(data=st.data(), outcome=reported)
    def late_result(self, data: st.DataObject, outcome: TargetOutcome) -> None:
        record = self.run.record()
        done = [t.node_id for t in record.targets if t.outcome and t.dispatched_at is not None]
        node = data.draw(st.sampled_from(done))
        assert self.run.on_result(node, outcome, self.now) == []
        assert self.run.record() == record

    @precondition(lambda self: any(t.dispatched_at is None for t in self.run.record().targets))
    @rule(data=st.data())
    def result_for_a_target_never_dispatched(self, data: st.DataObject) -> None:
        record = self.run.record()
        never = [t.node_id for t in record.targets if t.dispatched_at is None]
        node = data.draw(st.sampled_from(never))
        try:
            self.run.on_result(node, TargetOutcome.OK, self.now)
        except LocalProtocolError:
            pass
        else:
            raise AssertionError("a result for a never-dispatched node was accepted")
        assert self.run.record() == record

    @rule()
    def record_round_trips(self) -> None:
        record = self.run.record()
        assert RunRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
        counts = record.counts()
        assert sum(counts.values()) == sum(t.outcome is not None for t in record.targets)

    def teardown(self) -> None:
        # Liveness: whatever state the rules left, the run can be driven to Finish: report
        # what is in flight, or let the next timer fire. It must never be stuck.
        for _ in range(10_000):
            if self.finishes:
                break
            record = self.run.record()
            running = [t.node_id for t in record.targets if t.state is TargetState.IN_FLIGHT]
            if running:
                self.apply(self.run.on_result(running[0], TargetOutcome.OK, self.now))
                continue
            # Only cancelling targets (or none) are left: their daemons stay silent, and
            # the cancel grace must end the run.
            when = self.run.next_deadline()
            assert when is not None, "unfinished run with nothing in flight and no timer"
            now = self.clock(when)
            if self.expected_cause is None and self.deadline_due():
                self.expected_cause = SkipReason.DEADLINE
            self.apply(self.run.on_tick(now))
        assert len(self.finishes) == 1
        assert self.run.on_tick(self.now + 1e6) == []


FleetRunMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestFleetRunMachine = FleetRunMachine.TestCase
