"""Finishing a run a relay crash left running: every target ends exactly once."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aegis_edge_core.fleet import FleetRun, FleetSpec, resolve_targets
from aegis_edge_core.fleet.outcomes import RunOutcome, SkipReason, TargetOutcome, TargetState
from aegis_edge_core.fleet.recovery import RECOVERED_HALT_REASON, StoredCommand, recover_run
from aegis_edge_core.fleet.snapshot import DaemonSnapshot

NOW = 1_800_000_000.0


def _run(n: int, mode: str = "rolling=2") -> FleetRun:
    fleet = [
        DaemonSnapshot(node_id=f"h{i}", tenant_id="t", status="Connected", os="linux",
                       arch="x86_64", tools=frozenset({"cmd.run"}))
        for i in range(n)
    ]  # fmt: skip
    spec = FleetSpec(selector="all", tool="cmd.run", mode=mode)
    return FleetRun(spec, resolve_targets(fleet, spec.selector, spec.tool), fleet_command_id="f")


def test_crash_mid_rolling_run() -> None:
    run = _run(4)
    run.start(NOW)  # h0, h1 dispatched
    run.on_result("h0", "ok", NOW + 1, exit_code=0)  # h2 dispatched
    record = run.record()
    stored = [
        StoredCommand(node_id="h0", command_id="c0", dispatched_at=NOW, outcome="ok",
                      exit_code=0, finished_at=NOW + 1),
        StoredCommand(node_id="h1", command_id="c1", dispatched_at=NOW),  # in flight
        StoredCommand(node_id="h2", command_id="c2", dispatched_at=NOW + 1, outcome="error",
                      exit_code=2, finished_at=NOW + 2),  # result stored, record not
    ]  # fmt: skip
    done, ids = recover_run(record, stored, now=NOW + 10)
    by_node = {t.node_id: t for t in done.targets}
    assert by_node["h0"].outcome is TargetOutcome.OK
    assert by_node["h1"].outcome is TargetOutcome.EDGE_DISCONNECTED
    assert by_node["h2"].outcome is TargetOutcome.ERROR and by_node["h2"].exit_code == 2
    assert by_node["h3"].outcome is TargetOutcome.NOT_STARTED
    assert by_node["h3"].skip_reason is SkipReason.CANCELLED
    assert done.outcome is RunOutcome.CANCELLED and done.halt_reason == RECOVERED_HALT_REASON
    assert ids == {"h0": "c0", "h1": "c1", "h2": "c2"}
    assert type(done).from_dict(done.to_dict()) == done


def test_all_dispatched_and_ok_is_completed() -> None:
    run = _run(2, mode="all")
    run.start(NOW)
    stored = [
        StoredCommand(
            node_id=f"h{i}",
            command_id=f"c{i}",
            dispatched_at=NOW,
            outcome="ok",
            exit_code=0,
            finished_at=NOW + 1,
        )
        for i in range(2)
    ]
    done, _ = recover_run(run.record(), stored, now=NOW + 5)
    assert done.outcome is RunOutcome.COMPLETED and done.halt_reason is None


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 8),
    stored=st.dictionaries(
        st.integers(0, 7),
        st.sampled_from([None, "ok", "error", "timeout", "not_started", "bogus"]),
    ),
)
def test_every_target_ends_exactly_once(n: int, stored: dict[int, str | None]) -> None:
    run = _run(n, mode="all")
    run.start(NOW)
    cmds = [StoredCommand(node_id=f"h{i}", command_id=f"c{i}", dispatched_at=NOW, outcome=o)
            for i, o in stored.items() if i < n]  # fmt: skip
    done, _ = recover_run(run.record(), cmds, now=NOW + 1)
    assert [t.node_id for t in done.targets] == [f"h{i}" for i in range(n)]
    assert all(t.state is TargetState.DONE for t in done.targets)
    assert all(t.outcome is not TargetOutcome.NOT_STARTED or t.skip_reason is not None
               for t in done.targets)  # fmt: skip
    assert done.outcome is not None and done.finished_at == NOW + 1
