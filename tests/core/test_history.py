"""Command history: bounded, ordered, and the provisional edge_disconnected outcome."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis_edge_core.errors import LocalProtocolError
from aegis_edge_core.history import (
    RECORD_TRANSITIONS,
    CommandHistory,
    CommandOutcome,
    CommandRecord,
    HistoryProtocolError,
    InvalidRecordError,
    RecordState,
)


def test_dispatch_then_result() -> None:
    h = CommandHistory(limit=3)
    rec = h.dispatched("c1", "cmd.run", 10.0, fleet_command_id="f1")
    assert rec.in_flight
    assert rec.state is RecordState.DISPATCHED
    assert rec.duration is None
    done = h.finished("c1", 12.5, "ok", exit_code=0)
    assert done == CommandRecord(
        command_id="c1",
        fleet_command_id="f1",
        tool="cmd.run",
        dispatched_at=10.0,
        finished_at=12.5,
        outcome=CommandOutcome.OK,
        exit_code=0,
        error=None,
    )
    assert done is not None
    assert done.duration == 2.5
    assert done.state is RecordState.FINISHED
    assert h.get("c1") == done
    with pytest.raises(HistoryProtocolError, match="already finished") as info:
        h.finished("c1", 13.0, "error")
    assert isinstance(info.value, LocalProtocolError)


def test_a_tools_structured_result_is_kept() -> None:
    h = CommandHistory()
    h.dispatched("c1", "sys.info", 1.0)
    done = h.finished("c1", 2.0, "ok", result_json='{"os": "linux"}')
    assert done is not None and done.result_json == '{"os": "linux"}'
    h.dispatched("c2", "cmd.run", 3.0)
    plain = h.finished("c2", 4.0, "ok", result_json="")
    assert plain is not None and plain.result_json is None  # none is None, not ""


def test_bounded_oldest_evicted_and_order_kept_on_update() -> None:
    h = CommandHistory(limit=3)
    for i in range(5):
        h.dispatched(f"c{i}", "edge.ping", float(i))
    assert [r.command_id for r in h.records()] == ["c2", "c3", "c4"]
    assert h.finished("c0", 9.0, "ok") is None  # evicted: not an error
    h.finished("c3", 9.0, "ok")
    assert [r.command_id for r in h] == ["c2", "c3", "c4"]
    assert [r.command_id for r in h.recent(2)] == ["c4", "c3"]
    assert [r.command_id for r in h.in_flight()] == ["c2", "c4"]
    assert len(h) == 3
    assert "c2" in h
    assert "c0" not in h


def test_disconnect_marks_in_flight_provisionally_and_late_result_wins() -> None:
    h = CommandHistory()
    h.dispatched("a", "cmd.run", 1.0)
    h.dispatched("b", "sys.info", 1.0)
    h.finished("b", 2.0, "ok")
    lost = h.disconnected(3.0)
    assert [(r.command_id, r.outcome) for r in lost] == [("a", CommandOutcome.EDGE_DISCONNECTED)]
    assert h.get("b") is not None
    assert h.get("b").outcome is CommandOutcome.OK  # type: ignore[union-attr]
    assert h.disconnected(4.0) == []  # nothing in flight any more
    # The daemon finished it while disconnected and delivers it on reconnect.
    late = h.finished("a", 5.0, "ok", exit_code=0)
    assert late is not None
    assert (late.outcome, late.exit_code, late.error, late.finished_at) == (
        CommandOutcome.OK,
        0,
        None,
        5.0,
    )
    with pytest.raises(HistoryProtocolError):
        h.finished("a", 6.0, "ok")


def test_table_shape() -> None:
    assert (RecordState.FINISHED, "result") not in RECORD_TRANSITIONS
    assert RECORD_TRANSITIONS[(RecordState.PROVISIONAL, "result")] is RecordState.FINISHED


def test_duplicate_dispatch_and_add() -> None:
    h = CommandHistory()
    h.dispatched("a", "edge.ping", 1.0)
    with pytest.raises(HistoryProtocolError, match="already dispatched"):
        h.dispatched("a", "edge.ping", 2.0)
    with pytest.raises(HistoryProtocolError):
        h.add(CommandRecord(command_id="a", tool="x", dispatched_at=0.0))
    h.add(CommandRecord(command_id="b", tool="x", dispatched_at=0.0))
    assert [r.command_id for r in h] == ["a", "b"]


def test_clock_step_back_clamps_finished_at() -> None:
    h = CommandHistory()
    h.dispatched("a", "edge.ping", 100.0)
    done = h.finished("a", 99.0, "timeout", error="took too long")
    assert done is not None
    assert done.finished_at == 100.0
    assert done.duration == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"command_id": "", "tool": "x", "dispatched_at": 0.0},
        {"command_id": "a", "tool": "", "dispatched_at": 0.0},
        {"command_id": "a", "tool": "x", "dispatched_at": float("nan")},
        {"command_id": "a", "tool": "x", "dispatched_at": 0.0, "outcome": "ok"},
        {"command_id": "a", "tool": "x", "dispatched_at": 0.0, "finished_at": 1.0},
        {"command_id": "a", "tool": "x", "dispatched_at": 0.0, "exit_code": 1},
        {"command_id": "a", "tool": "x", "dispatched_at": 5.0, "finished_at": 1.0, "outcome": "ok"},
        {
            "command_id": "a",
            "tool": "x",
            "dispatched_at": 0.0,
            "finished_at": 1.0,
            "outcome": "meh",
        },
        {
            "command_id": "a",
            "tool": "x",
            "dispatched_at": 0.0,
            "finished_at": 1.0,
            "outcome": "ok",
            "exit_code": True,
        },
        {"command_id": "a", "tool": "x", "dispatched_at": 0.0, "fleet_command_id": ""},
        {"command_id": "a", "tool": "x", "dispatched_at": 0.0, "result_json": "{}"},
        {
            "command_id": "a",
            "tool": "x",
            "dispatched_at": 0.0,
            "finished_at": 1.0,
            "outcome": "ok",
            "result_json": {"os": "linux"},
        },
    ],
)
def test_records_validate(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidRecordError):
        CommandRecord(**kwargs)  # type: ignore[arg-type]


def test_limit_validated() -> None:
    with pytest.raises(InvalidRecordError):
        CommandHistory(limit=0)
    assert CommandHistory().limit == 50


@settings(max_examples=100, deadline=None)
@given(
    limit=st.integers(1, 8),
    ops=st.lists(st.tuples(st.sampled_from(["dispatch", "finish", "drop"]), st.integers(0, 30))),
)
def test_holds_exactly_the_last_n_dispatches(limit: int, ops: list[tuple[str, int]]) -> None:
    h = CommandHistory(limit=limit)
    dispatched: list[str] = []
    now = 0.0
    for op, n in ops:
        now += 1
        if op == "dispatch":
            cid = f"c{len(dispatched)}"
            h.dispatched(cid, "edge.ping", now)
            dispatched.append(cid)
        elif op == "finish" and dispatched:
            cid = dispatched[n % len(dispatched)]
            rec = h.get(cid)
            if rec is not None and rec.state is not RecordState.FINISHED:
                h.finished(cid, now, "ok")
        else:
            for rec in h.disconnected(now):
                assert rec.outcome is CommandOutcome.EDGE_DISCONNECTED
        assert [r.command_id for r in h.records()] == dispatched[-limit:]
        assert len(h) <= limit


def test_command_outcomes_are_the_target_outcomes_a_dispatched_call_can_have() -> None:
    # Two enums on purpose (a dispatched call is never not_started); one vocabulary.
    from aegis_edge_core.fleet.outcomes import TargetOutcome

    assert {o.value for o in CommandOutcome} == {o.value for o in TargetOutcome} - {"not_started"}
