"""Taking a run over from the store (a cluster's coordinating relay died): the resumed
planner reaches the outcome and counts the run would have had, and nothing is sent twice."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from aegis_edge_core.fleet import FleetRun, FleetSpec, resolve_targets
from aegis_edge_core.fleet.planner import Action, Dispatch, Finish
from aegis_edge_core.fleet.recovery import StoredCommand, resume_run
from aegis_edge_core.fleet.snapshot import DaemonSnapshot

NOW = 1_800_000_000.0


def _run(n: int, mode: str, on_error: str) -> FleetRun:
    fleet = [
        DaemonSnapshot(node_id=f"h{i:02d}", tenant_id="t", status="Connected", os="linux",
                       arch="x86_64", tools=frozenset({"cmd.run"}))
        for i in range(n)
    ]  # fmt: skip
    spec = FleetSpec(selector="all", tool="cmd.run", mode=mode, on_error=on_error)
    return FleetRun(spec, resolve_targets(fleet, spec.selector, spec.tool), fleet_command_id="f")


class Fleet:
    """Daemons that answer each dispatch, oldest first, with a fixed outcome per node."""

    def __init__(self, run: FleetRun, outcomes: dict[str, str], clock: float) -> None:
        self.run = run
        self.outcomes = outcomes
        self.clock = clock
        self.in_flight: deque[str] = deque()
        self.sent: list[str] = []
        self.ended: dict[str, float] = {}
        self.finished = False

    def apply(self, actions: Iterable[Action]) -> None:
        for action in actions:
            if isinstance(action, Dispatch):
                self.sent.append(action.node_id)
                self.in_flight.append(action.node_id)
            elif isinstance(action, Finish):
                self.finished = True

    def answer(self, count: int | None = None) -> None:
        while self.in_flight and (count is None or count > 0):
            node = self.in_flight.popleft()
            self.clock += 1
            self.ended[node] = self.clock
            outcome = self.outcomes[node]
            self.apply(self.run.on_result(node, outcome, self.clock, exit_code=0))
            if count is not None:
                count -= 1


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 14),
    window=st.integers(1, 6),
    stop_after=st.sampled_from(["continue", "stop-after=1", "stop-after=3"]),
    failing=st.sets(st.integers(0, 13)),
    cut=st.integers(0, 14),
)
def test_a_resumed_run_ends_as_it_would_have(
    n: int, window: int, stop_after: str, failing: set[int], cut: int
) -> None:
    outcomes = {f"h{i:02d}": ("error" if i in failing else "ok") for i in range(n)}
    mode = f"rolling={window}"

    whole = Fleet(_run(n, mode, stop_after), outcomes, NOW)
    whole.apply(whole.run.start(NOW))
    whole.answer()
    assert whole.finished
    expected = whole.run.record()

    # The first coordinator gets `cut` results back, then dies.
    first = Fleet(_run(n, mode, stop_after), outcomes, NOW)
    first.apply(first.run.start(NOW))
    first.answer(cut)
    stored = [
        StoredCommand(
            node_id=node,
            command_id=f"c-{node}",
            dispatched_at=NOW + i * 0.001,
            outcome=outcomes[node] if node in first.ended else None,
            exit_code=0 if node in first.ended else None,
            finished_at=first.ended.get(node),
        )
        for i, node in enumerate(first.sent)
    ]
    record = _run(n, mode, stop_after).record()
    record_started = record.__class__.from_dict({**record.to_dict(), "started_at": NOW})

    fresh = _run(n, mode, stop_after)
    resumed = resume_run(fresh, record_started, stored, now=first.clock + 5)
    # nothing the dead coordinator sent is sent again
    new = [a.node_id for a in resumed.actions if isinstance(a, Dispatch)]
    assert not set(new) & set(first.sent)
    assert {c.node_id for c in resumed.awaiting} == set(first.in_flight)

    second = Fleet(fresh, outcomes, first.clock + 5)
    second.finished = fresh.finished
    second.in_flight.extend(c.node_id for c in resumed.awaiting)
    second.apply(resumed.actions)
    second.answer()
    assert fresh.finished
    got = fresh.record()
    assert got.outcome == expected.outcome
    assert got.counts() == expected.counts()
    assert sorted(first.sent + second.sent) == sorted(whole.sent)
