"""The rollout planner, by example: the seed's two fleet commands and every rule's edge."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis_edge_core.errors import LocalProtocolError
from aegis_edge_core.fleet import (
    Cancel,
    DaemonSnapshot,
    Dispatch,
    EndedBy,
    Finish,
    FleetRun,
    FleetSpec,
    NoTargets,
    RunFinished,
    RunOutcome,
    RunPhase,
    RunRecord,
    SkipReason,
    TargetOutcome,
    TargetState,
    TimeoutBound,
    resolve_targets,
)
from aegis_edge_core.fleet.planner import RUN_TRANSITIONS, STOP_RULES, TARGET_TRANSITIONS

from .helpers import snap


def hosts(count: int, prefix: str = "h", **kwargs: object) -> list[DaemonSnapshot]:
    return [snap(f"{prefix}{i:02d}", **kwargs) for i in range(count)]  # type: ignore[arg-type]


def plan(
    fleet: list[DaemonSnapshot],
    *,
    selector: str = "all",
    tool: str = "cmd.run",
    grace: float = 10.0,
    **spec: object,
) -> FleetRun:
    fleet_spec = FleetSpec(selector=selector, tool=tool, **spec)  # type: ignore[arg-type]
    resolution = resolve_targets(fleet, fleet_spec.selector, tool)
    return FleetRun(fleet_spec, resolution, fleet_command_id="fc-1", cancel_grace_secs=grace)


def dispatched(actions: Sequence[object]) -> list[str]:
    return [a.node_id for a in actions if isinstance(a, Dispatch)]


def outcomes(run: FleetRun) -> dict[str, tuple[str | None, str | None]]:
    return {
        t.node_id: (t.outcome and t.outcome.value, t.skip_reason and t.skip_reason.value)
        for t in run.record().targets
    }


# --- the seed's fleet-wide update ------------------------------------------------------------


def test_seed_fleet_update_halts_after_the_first_failure() -> None:
    # aegis edge fleet run --target tags=managed-fleet --tool cmd.run \
    #   --arg cmd="/opt/aegis/upgrade.sh && systemctl --user restart aegis-edge.service" \
    #   --mode rolling=5 --on-error stop-after=1 --deadline 120s
    fleet = [
        *hosts(12, tags={"managed-fleet"}),
        snap("lab-1", tags={"lab"}),
        snap("old-1", tags={"managed-fleet"}, status="Disconnected"),
        snap("ro-1", tags={"managed-fleet"}, tools={"sys.info"}),
    ]
    run = plan(
        fleet,
        selector="tags=managed-fleet",
        tool="cmd.run",
        args={"cmd": "/opt/aegis/upgrade.sh && systemctl --user restart aegis-edge.service"},
        mode="rolling=5",
        on_error="stop-after=1",
        deadline_secs="120s",
    )
    assert run.window == 5
    assert dispatched(run.start(1000.0)) == ["h00", "h01", "h02", "h03", "h04"]
    assert run.next_deadline() == 1120.0

    # A success frees a slot; the next host goes out in the same call.
    assert run.on_result("h00", "ok", 1010.0, exit_code=0) == [
        Dispatch(node_id="h05", timeout_secs=110.0, deadline_at=1120.0, bound=TimeoutBound.DEADLINE)
    ]
    # h02's upgrade fails: nothing new is dispatched from here on.
    assert run.on_result("h02", "error", 1012.0, exit_code=1, error_message="exit 1") == []
    assert run.phase is RunPhase.DRAINING
    # In-flight commands finish and their results are recorded.
    assert run.on_result("h01", "ok", 1015.0, exit_code=0) == []
    assert run.on_result("h03", "ok", 1016.0, exit_code=0) == []
    assert run.on_result("h04", "timeout", 1017.0) == []
    assert run.on_result("h05", "ok", 1018.0, exit_code=0) == [Finish(outcome=RunOutcome.HALTED)]

    assert outcomes(run) == {
        "h00": ("ok", None),
        "h01": ("ok", None),
        "h02": ("error", None),
        "h03": ("ok", None),
        "h04": ("timeout", None),
        "h05": ("ok", None),
        **{f"h{i:02d}": ("not_started", "halted") for i in range(6, 12)},
    }
    record = run.record()
    assert record.outcome is RunOutcome.HALTED
    assert record.halt_reason == "on-error stop-after=1: 1 target failed, the last h02 (error)"
    assert record.counts()[TargetOutcome.NOT_STARTED] == 6
    assert record.skip_counts() == {
        SkipReason.DISCONNECTED: 1,
        SkipReason.TOOL_UNAVAILABLE: 1,
        SkipReason.HALTED: 6,
    }
    # The CLI contract's JSON.
    data = json.loads(json.dumps(record.to_dict()))
    assert data["fleet_command_id"] == "fc-1"
    assert data["outcome"] == "halted"
    assert data["targets"][2] == {
        "node_id": "h02",
        "state": "done",
        "outcome": "error",
        "exit_code": 1,
        "error_message": "exit 1",
        "skip_reason": None,
        "dispatched_at": 1000.0,
        "finished_at": 1012.0,
        "timeout_secs": 120.0,
        "timeout_bound": "deadline",
        "ended_by": None,
    }
    # h04's timeout came long before the deadline: its own, not the deadline's.
    assert data["targets"][4]["outcome"] == "timeout" and data["targets"][4]["ended_by"] is None
    assert data["targets"][11]["outcome"] == "not_started"
    assert data["targets"][11]["skip_reason"] == "halted"
    assert data["skipped"] == [
        {"node_id": "old-1", "reason": "disconnected"},
        {"node_id": "ro-1", "reason": "tool_unavailable"},
    ]
    assert data["matched"] == 14
    assert "cmd" not in json.dumps(data["targets"])  # tool arguments stay out of records
    assert RunRecord.from_dict(data) == record


# --- the seed's blast-radius key rotation ----------------------------------------------------


def rotation_fleet() -> list[DaemonSnapshot]:
    return (
        hosts(20, prefix="prod-", tags={"prod"})
        + hosts(7, prefix="hit-", tags={"potentially-affected"})
        + hosts(5, prefix="dev-", tags={"dev"})
        + [snap("prod-nokeys", tags={"prod"}, tools={"cmd.run"})]
    )


def test_seed_key_rotation_continues_past_errors_ten_at_a_time() -> None:
    # aegis edge fleet keys rotate --target tags=AnyOf(potentially-affected,prod) \
    #   --mode rolling=10 --on-error continue
    run = plan(
        rotation_fleet(),
        selector="tags=AnyOf(potentially-affected,prod)",
        tool="keys.rotate",
        mode="rolling=10",
        on_error="continue",
    )
    assert run.resolution.matched == 28
    assert [s.reason for s in run.resolution.skipped] == [SkipReason.TOOL_UNAVAILABLE]
    first = dispatched(run.start(0.0))
    assert len(first) == 10
    queue = list(first)
    sent = set(first)
    now = 0.0
    finish: list[object] = []
    while queue:
        now += 1
        node = queue.pop(0)
        ended = "error" if node in ("hit-03", "prod-11") else "ok"
        actions = run.on_result(node, ended, now, exit_code=0 if ended == "ok" else 2)
        assert len(run.in_flight) <= 10
        new = dispatched(actions)
        assert not (set(new) & sent)
        sent.update(new)
        queue.extend(new)
        finish += [a for a in actions if isinstance(a, Finish)]
    assert finish == [Finish(outcome=RunOutcome.COMPLETED_WITH_ERRORS)]
    assert sent == set(run.resolution.targets)  # continue: everyone was dispatched
    counts = run.record().counts()
    assert (counts[TargetOutcome.OK], counts[TargetOutcome.ERROR]) == (25, 2)


def test_all_ok_is_completed() -> None:
    run = plan(hosts(3), mode="all")
    assert dispatched(run.start(0)) == ["h00", "h01", "h02"]
    assert run.on_result("h01", "ok", 1) == []
    assert run.on_result("h00", "ok", 2) == []
    assert run.on_result("h02", "ok", 3) == [Finish(outcome=RunOutcome.COMPLETED)]
    assert run.finished and run.outcome is RunOutcome.COMPLETED
    assert run.next_deadline() is None


# --- modes ------------------------------------------------------------------------------------


def test_sequential_is_one_at_a_time_in_node_order() -> None:
    run = plan(hosts(3), mode="sequential")
    assert dispatched(run.start(0)) == ["h00"]
    assert dispatched(run.on_result("h00", "error", 1)) == ["h01"]  # continue is the default
    assert dispatched(run.on_result("h01", "ok", 2)) == ["h02"]
    assert run.on_result("h02", "ok", 3) == [Finish(outcome=RunOutcome.COMPLETED_WITH_ERRORS)]


def test_rolling_percent_window_rounds_up() -> None:
    run = plan(hosts(25), mode="rolling=10%")
    assert run.window == 3
    assert len(dispatched(run.start(0))) == 3


def test_window_larger_than_fleet() -> None:
    run = plan(hosts(2), mode="rolling=50")
    assert dispatched(run.start(0)) == ["h00", "h01"]


# --- error policy -----------------------------------------------------------------------------


def test_stop_after_two_tolerates_one_failure() -> None:
    run = plan(hosts(5), mode="sequential", on_error="stop-after=2")
    run.start(0)
    assert dispatched(run.on_result("h00", "denied", 1)) == ["h01"]
    assert run.on_result("h01", "edge_disconnected", 2) == [Finish(outcome=RunOutcome.HALTED)]
    assert [o for o, _ in outcomes(run).values()] == [
        "denied",
        "edge_disconnected",
        "not_started",
        "not_started",
        "not_started",
    ]


def test_failing_last_target_still_halts() -> None:
    run = plan(hosts(2), mode="sequential", on_error="fail-fast")
    run.start(0)
    run.on_result("h00", "ok", 1)
    assert run.on_result("h01", "error", 2) == [Finish(outcome=RunOutcome.HALTED)]


# --- canary -----------------------------------------------------------------------------------


def test_canary_runs_alone_then_the_rest_follow() -> None:
    run = plan(hosts(6), mode="rolling=3", canary=2)
    assert dispatched(run.start(0)) == ["h00", "h01"]  # the canary, not the full window
    assert run.phase is RunPhase.CANARY
    assert run.on_result("h00", "ok", 1) == []  # still waiting for the other canary
    assert dispatched(run.on_result("h01", "ok", 2)) == ["h02", "h03", "h04"]
    assert run.record().phase is RunPhase.RUNNING


def test_canary_respects_the_window() -> None:
    run = plan(hosts(6), mode="sequential", canary=3)
    assert dispatched(run.start(0)) == ["h00"]
    assert dispatched(run.on_result("h00", "ok", 1)) == ["h01"]


def test_canary_failure_halts_even_with_continue() -> None:
    run = plan(hosts(6), mode="all", canary=2, on_error="continue")
    run.start(0)
    assert run.on_result("h01", "error", 1) == []
    assert run.on_result("h00", "ok", 2) == [Finish(outcome=RunOutcome.HALTED)]
    assert run.record().halt_reason == "canary target h01 ended error"
    assert outcomes(run)["h05"] == ("not_started", "halted")


def test_canary_covering_every_target() -> None:
    run = plan(hosts(2), canary=5)
    assert dispatched(run.start(0)) == ["h00", "h01"]
    run.on_result("h00", "ok", 1)
    assert run.on_result("h01", "ok", 2) == [Finish(outcome=RunOutcome.COMPLETED)]


# --- deadline ---------------------------------------------------------------------------------


def test_deadline_skips_pending_cancels_in_flight_and_gives_up_after_grace() -> None:
    run = plan(hosts(6), mode="rolling=3", deadline_secs=60, grace=10)
    run.start(100)
    run.on_result("h00", "ok", 110)  # h03 goes out
    assert run.next_deadline() == 160
    assert run.on_tick(159.9) == []
    actions = run.on_tick(160)
    assert actions == [
        Cancel(node_id="h01", reason=SkipReason.DEADLINE),
        Cancel(node_id="h02", reason=SkipReason.DEADLINE),
        Cancel(node_id="h03", reason=SkipReason.DEADLINE),
    ]
    assert outcomes(run)["h04"] == ("not_started", "deadline")
    assert run.next_deadline() == 170  # the cancel grace
    # A command that finished before the cancel reached it is recorded as answered; one
    # the cancel killed reads as the deadline ending it.
    assert run.on_result("h01", "cancelled", 161) == []
    assert run.on_result("h02", "ok", 162, exit_code=0) == []
    # h03 never answers: the grace runs out and the run still finishes.
    assert run.on_tick(170) == [Finish(outcome=RunOutcome.DEADLINE_EXCEEDED)]
    record = run.record()
    h01 = next(t for t in record.targets if t.node_id == "h01")
    assert (h01.outcome, h01.ended_by) == (TargetOutcome.TIMEOUT, EndedBy.DEADLINE)
    h03 = next(t for t in record.targets if t.node_id == "h03")
    assert (h03.outcome, h03.ended_by, h03.finished_at) == (
        TargetOutcome.TIMEOUT,
        EndedBy.DEADLINE,
        170,
    )
    assert h03.error_message is not None and "no answer within 10s" in h03.error_message
    assert h03.error_message.startswith("ended by the run's deadline of 60s")
    assert record.halt_reason == "deadline of 60s reached"
    assert outcomes(run)["h02"] == ("ok", None)
    # A late answer after the planner gave up is ignored.
    assert run.on_result("h03", "ok", 175) == []
    assert run.record() == record


def test_result_after_the_deadline_without_a_tick() -> None:
    run = plan(hosts(4), mode="rolling=2", deadline_secs=10)
    run.start(0)
    # The caller never ticked; this result arrives past the deadline. It is recorded,
    # then the deadline fires: nothing more is dispatched.
    actions = run.on_result("h00", "ok", 11)
    assert actions == [Cancel(node_id="h01", reason=SkipReason.DEADLINE)]
    assert outcomes(run)["h00"] == ("ok", None)
    assert outcomes(run)["h02"] == ("not_started", "deadline")


def test_last_result_after_the_deadline_completes_the_run() -> None:
    run = plan(hosts(1), deadline_secs=10)
    run.start(0)
    assert run.on_result("h00", "ok", 11) == [Finish(outcome=RunOutcome.COMPLETED)]


def test_failure_after_the_deadline_is_not_a_halt() -> None:
    run = plan(hosts(3), mode="rolling=2", deadline_secs=10, on_error="fail-fast")
    run.start(0)
    assert run.on_result("h00", "error", 12) == [Cancel(node_id="h01", reason=SkipReason.DEADLINE)]
    assert run.on_result("h01", "cancelled", 13) == [Finish(outcome=RunOutcome.DEADLINE_EXCEEDED)]


def test_halted_run_still_honours_its_deadline_but_stays_halted() -> None:
    run = plan(hosts(4), mode="rolling=2", deadline_secs=10, on_error="fail-fast")
    run.start(0)
    run.on_result("h00", "error", 1)  # halt; h01 keeps running
    assert run.next_deadline() == 10
    assert run.on_tick(10) == [Cancel(node_id="h01", reason=SkipReason.DEADLINE)]
    assert run.on_result("h01", "cancelled", 11) == [Finish(outcome=RunOutcome.HALTED)]
    assert outcomes(run)["h03"] == ("not_started", "halted")


def test_zero_grace_gives_up_at_once() -> None:
    run = plan(hosts(2), deadline_secs=5, grace=0)
    run.start(0)
    assert run.on_tick(5) == [
        Cancel(node_id="h00", reason=SkipReason.DEADLINE),
        Cancel(node_id="h01", reason=SkipReason.DEADLINE),
        Finish(outcome=RunOutcome.DEADLINE_EXCEEDED),
    ]


# --- operator cancel --------------------------------------------------------------------------


def test_operator_cancel_mid_run() -> None:
    run = plan(hosts(4), mode="rolling=2")
    run.start(0)
    run.on_result("h00", "ok", 1)
    actions = run.cancel(2, message="cancelled by alice")
    assert actions == [
        Cancel(node_id="h01", reason=SkipReason.CANCELLED),
        Cancel(node_id="h02", reason=SkipReason.CANCELLED),
    ]
    assert run.cancel(3) == []  # a second cancel adds nothing
    run.on_result("h01", "cancelled", 4)
    assert run.on_result("h02", "cancelled", 5) == [Finish(outcome=RunOutcome.CANCELLED)]
    assert run.record().halt_reason == "cancelled by alice"
    assert outcomes(run)["h03"] == ("not_started", "cancelled")
    assert run.cancel(6) == []
    assert run.on_tick(100) == []


def test_cancel_before_start() -> None:
    run = plan(hosts(2))
    assert run.cancel(0) == [Finish(outcome=RunOutcome.CANCELLED)]
    assert set(outcomes(run).values()) == {("not_started", "cancelled")}
    with pytest.raises(LocalProtocolError):
        run.start(1)


def test_cancel_past_an_unticked_deadline_is_a_deadline() -> None:
    run = plan(hosts(2), mode="sequential", deadline_secs=10)
    run.start(0)
    assert run.cancel(20) == [Cancel(node_id="h00", reason=SkipReason.DEADLINE)]
    run.on_result("h00", "cancelled", 21)
    assert run.outcome is RunOutcome.DEADLINE_EXCEEDED


# --- late input, misuse and the clock ---------------------------------------------------------


def test_duplicate_result_is_ignored() -> None:
    run = plan(hosts(2), mode="sequential")
    run.start(0)
    run.on_result("h00", "ok", 1, exit_code=0)
    before = run.record()
    assert run.on_result("h00", "error", 2, exit_code=9) == []
    assert run.record() == before


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda run: run.on_result("nope", "ok", 1), "not a target"),
        (lambda run: run.on_result("h02", "ok", 1), "never dispatched"),
        (lambda run: run.on_result("h00", "not_started", 1), "only the planner"),
        (lambda run: run.on_result("h00", "meh", 1), "unknown target outcome"),
        (lambda run: run.on_result("h00", "ok", 1, exit_code="0"), "exit_code"),
        (lambda run: run.on_result("h00", "ok", math.nan), "finite"),
        (lambda run: run.on_tick(math.inf), "finite"),
        (lambda run: run.start(1), "cannot start"),
    ],
)
def test_misuse_is_a_local_protocol_error_and_changes_nothing(call: object, needle: str) -> None:
    run = plan(hosts(3), mode="rolling=2")
    run.start(0)
    before = run.record()
    with pytest.raises(LocalProtocolError, match=needle):
        call(run)  # type: ignore[operator]
    assert run.record() == before
    # The refused call did not move the clock either.
    run.on_result("h00", "ok", 0.5)
    assert run.record().targets[0].finished_at == 0.5


def test_result_before_start() -> None:
    run = plan(hosts(1))
    with pytest.raises(LocalProtocolError, match="before the run was started"):
        run.on_result("h00", "ok", 0)
    assert run.on_tick(5) == []
    assert run.next_deadline() is None


def test_result_for_a_halted_target_that_never_ran() -> None:
    run = plan(hosts(3), mode="sequential", on_error="fail-fast")
    run.start(0)
    run.on_result("h00", "error", 1)
    with pytest.raises(LocalProtocolError, match="never dispatched"):
        run.on_result("h02", "ok", 2)


def test_clock_never_runs_backwards() -> None:
    run = plan(hosts(2), mode="sequential")
    run.start(100)
    run.on_result("h00", "ok", 50)  # a wall clock stepped back
    record = run.record()
    assert record.targets[0].finished_at == 100
    assert record.targets[1].dispatched_at == 100


def test_empty_resolution_is_refused() -> None:
    spec = FleetSpec(selector="tags=nope", tool="cmd.run")
    with pytest.raises(NoTargets):
        FleetRun(spec, resolve_targets(hosts(3), spec.selector, "cmd.run"), fleet_command_id="x")


def test_resolution_must_match_the_spec() -> None:
    spec = FleetSpec(selector="all", tool="cmd.run")
    with pytest.raises(LocalProtocolError):
        FleetRun(spec, resolve_targets(hosts(3), "all", "sys.info"), fleet_command_id="x")
    with pytest.raises(LocalProtocolError):
        FleetRun(
            spec,
            resolve_targets(hosts(3), "all", "cmd.run"),
            fleet_command_id="x",
            cancel_grace_secs=-1,
        )


def test_record_mid_run() -> None:
    run = plan(hosts(3), mode="rolling=2", deadline_secs=30)
    run.start(0)
    run.on_tick(30)
    record = run.record()
    assert record.phase is RunPhase.DRAINING and record.outcome is None
    assert [t.state for t in record.targets] == [
        TargetState.CANCELLING,
        TargetState.CANCELLING,
        TargetState.DONE,
    ]
    data = record.to_dict()
    assert data["outcome"] == "running"
    assert RunRecord.from_dict(data) == record


def test_tables_cover_every_state() -> None:
    assert {state for state, _ in TARGET_TRANSITIONS} == set(TargetState) - {TargetState.DONE}
    assert {phase for phase, _ in RUN_TRANSITIONS} == set(RunPhase) - {RunPhase.FINISHED}
    assert set(STOP_RULES) == {SkipReason.HALTED, SkipReason.DEADLINE, SkipReason.CANCELLED}


# --- the deadline rule: every ordering of the daemon's kill, the tick and a cancel -------------

_D = 10.0  # the deadline, from a start at 0


@settings(max_examples=400, deadline=None)
@given(
    data=st.data(),
    size=st.integers(1, 3),
    pending=st.booleans(),
    with_cancel=st.booleans(),
    grace=st.sampled_from([0.0, 5.0]),
)
def test_the_deadline_ends_a_target_the_same_way_in_every_order(
    data: st.DataObject, size: int, pending: bool, with_cancel: bool, grace: float
) -> None:
    """Whichever comes first around the deadline -- the daemon killing the command at the
    deadline-derived timeout, the relay's tick at the deadline, an operator's cancel --
    a command the deadline ended reads ``timeout`` / ``ended_by: deadline`` and the run
    ``deadline_exceeded``. Only an operator cancel that lands before the deadline (and
    before any kill) names the run ``cancelled`` instead."""
    fleet = hosts(size + (1 if pending else 0))
    run = plan(fleet, mode=f"rolling={size}", deadline_secs=_D, grace=grace)
    start = run.start(0.0)
    assert all(
        isinstance(a, Dispatch)
        and a.timeout_secs == _D
        and a.deadline_at == _D
        and a.bound is TimeoutBound.DEADLINE
        for a in start
    )
    nodes = [f"h{i:02d}" for i in range(size)]
    # Each daemon answers once: its kill at the deadline ("timeout"), an answer to a cancel
    # ("cancelled"; a kill if no cancel reached it yet), or nothing at all.
    answers = {n: data.draw(st.sampled_from(["timeout", "cancelled", "silent"])) for n in nodes}
    events = [("answer", n) for n in nodes if answers[n] != "silent"] + [("tick", "")]
    if with_cancel:
        events.append(("cancel", ""))
    order = data.draw(st.permutations(events))
    now = 0.0
    cause: SkipReason | None = None  # the first stop cause, predicted
    cancelled_for: dict[str, SkipReason] = {}
    killed: set[str] = set()  # whose "timeout" the planner took (not a late answer)
    finishes: list[Finish] = []

    def apply(actions: list[object]) -> None:
        for action in actions:
            assert not isinstance(action, Dispatch), "dispatched around the deadline"
            if isinstance(action, Cancel):
                cancelled_for.setdefault(action.node_id, action.reason)
            elif isinstance(action, Finish):
                finishes.append(action)

    for kind, node in order:
        if finishes:
            break
        if kind == "answer":
            # The daemon's clock may put its kill a hair before the relay's deadline.
            now = max(now, _D + data.draw(st.floats(-0.9, 1.0)))
            reported = answers[node] if node in cancelled_for else "timeout"
            if cause is None:
                cause = SkipReason.DEADLINE
            state = next(t.state for t in run.record().targets if t.node_id == node)
            if reported == "timeout" and state is not TargetState.DONE:
                killed.add(node)
            apply(run.on_result(node, reported, now))
        elif kind == "tick":
            now = max(now, _D + data.draw(st.floats(0.0, 1.0)))
            cause = cause or SkipReason.DEADLINE
            apply(run.on_tick(now))
        else:
            now = max(now, _D + data.draw(st.floats(-2.0, 1.0)))
            if cause is None:
                cause = SkipReason.DEADLINE if now >= _D else SkipReason.CANCELLED
            apply(run.cancel(now))
    # Silent daemons: the cancel grace ends the wait.
    while not finishes:
        when = run.next_deadline()
        assert when is not None, "stuck: nothing in flight answers and no timer is set"
        now = max(now, when)
        apply(run.on_tick(now))

    assert len(finishes) == 1
    record = run.record()
    assert cause is not None
    assert record.outcome is STOP_RULES[cause].outcome
    for t in record.targets:
        if t.node_id not in nodes:
            assert (t.outcome, t.skip_reason) == (TargetOutcome.NOT_STARTED, cause)
            continue
        cancelled_by_operator = (
            cancelled_for.get(t.node_id) is SkipReason.CANCELLED and t.node_id not in killed
        )
        if cancelled_by_operator:
            assert (t.outcome, t.ended_by) == (TargetOutcome.CANCELLED, None)
        else:
            assert (t.outcome, t.ended_by) == (TargetOutcome.TIMEOUT, EndedBy.DEADLINE)
            assert t.error_message and t.error_message.startswith(
                "ended by the run's deadline of 10s"
            )


def test_the_tools_own_shorter_timeout_stays_timeout() -> None:
    run = plan(hosts(1), args={"cmd": "sleep 60", "timeout": "3s"}, deadline_secs=_D)
    (dispatch,) = run.start(0.0)
    assert isinstance(dispatch, Dispatch)
    assert (dispatch.timeout_secs, dispatch.bound) == (_D, TimeoutBound.TOOL)
    assert run.on_result("h00", "timeout", 3.1) == [
        Finish(outcome=RunOutcome.COMPLETED_WITH_ERRORS)
    ]
    (t,) = run.record().targets
    assert (t.outcome, t.ended_by, t.timeout_bound) == (TargetOutcome.TIMEOUT, None, "tool")


def test_a_tool_timeout_still_in_flight_at_the_deadline_keeps_its_own_outcome() -> None:
    # The kill at its own timeout was still on the wire when the deadline passed: the run
    # was stopped by the deadline, the command by its own timeout.
    run = plan(hosts(1), args={"cmd": "sleep 60", "timeout": 9.5}, deadline_secs=_D)
    run.start(0.0)
    assert run.on_tick(_D) == [Cancel(node_id="h00", reason=SkipReason.DEADLINE)]
    assert run.on_result("h00", "timeout", 10.1) == [Finish(outcome=RunOutcome.DEADLINE_EXCEEDED)]
    (t,) = run.record().targets
    assert (t.outcome, t.ended_by) == (TargetOutcome.TIMEOUT, None)


def test_an_early_timeout_from_a_deadline_bounded_target_is_the_tools_own() -> None:
    # A plugin that times out on its own long before the deadline must not stop the run.
    run = plan(hosts(3), mode="rolling=2", deadline_secs=120)
    run.start(0.0)
    actions = run.on_result("h00", "timeout", 5.0)
    assert dispatched(actions) == ["h02"]
    assert run.phase is RunPhase.RUNNING
    assert outcomes(run)["h00"] == ("timeout", None)


def test_the_daemons_kill_as_the_last_result_is_still_the_deadline() -> None:
    # The race of issue 14: the kill at the deadline-derived timeout beats the tick.
    run = plan(hosts(1), deadline_secs=3)
    run.start(0.0)
    assert run.on_result("h00", "timeout", 2.999, error_message="deadline passed; killed") == [
        Finish(outcome=RunOutcome.DEADLINE_EXCEEDED)
    ]
    (t,) = run.record().targets
    assert (t.outcome, t.ended_by) == (TargetOutcome.TIMEOUT, EndedBy.DEADLINE)
    assert t.error_message == "ended by the run's deadline of 3s (deadline passed; killed)"
    assert run.record().halt_reason == "deadline of 3s reached"
    assert run.next_deadline() is None


def test_a_finished_run_refuses_a_cancel_with_its_outcome() -> None:
    run = plan(hosts(1))
    run.start(0.0)
    run.check_cancellable()  # running: fine
    run.on_result("h00", "ok", 1.0)
    with pytest.raises(RunFinished, match=r"^fleet run fc-1 already finished \(completed\)$"):
        run.check_cancellable()
    with pytest.raises(RunFinished) as info:
        run.record().check_cancellable()
    assert (info.value.grpc_status, info.value.outcome) == ("FAILED_PRECONDITION", "completed")
    assert run.cancel(2.0) == []  # the planner's own cancel stays a harmless no-op
    assert run.outcome is RunOutcome.COMPLETED
