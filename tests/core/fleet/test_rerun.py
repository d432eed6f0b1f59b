"""Rerun target choice and the secret-argument rules."""

from __future__ import annotations

import pytest

from aegis_edge_core.fleet import FleetSpecError, RunRecord, Skipped, SkipReason, TargetRecord
from aegis_edge_core.fleet.rerun import (
    RerunRefused,
    RerunScope,
    check_rerun_secrets,
    merge_secret_args,
    parse_rerun_scope,
    redact_args,
    rerun_selector,
    rerun_targets,
)


def _record(
    outcomes: dict[str, str | None], run_outcome: str | None = "completed_with_errors"
) -> RunRecord:
    targets = []
    for node, outcome in outcomes.items():
        if outcome is None:
            targets.append(TargetRecord(node_id=node, state="in_flight", dispatched_at=1.0))
        elif outcome == "not_started":
            targets.append(
                TargetRecord(
                    node_id=node,
                    state="done",
                    outcome="not_started",
                    skip_reason="halted",
                    finished_at=2.0,
                )
            )
        else:
            targets.append(
                TargetRecord(
                    node_id=node, state="done", outcome=outcome, dispatched_at=1.0, finished_at=2.0
                )
            )
    return RunRecord(
        fleet_command_id="f-1",
        selector="all",
        tool="cmd.run",
        mode="all",
        on_error="continue",
        phase="finished" if run_outcome else "running",
        outcome=run_outcome,
        targets=targets,
        skipped=[Skipped(node_id="gone", reason=SkipReason.DISCONNECTED)],
    )


RUN = {"a": "ok", "b": "error", "c": "timeout", "d": "not_started", "e": "edge_disconnected"}


@pytest.mark.parametrize(
    ("only", "expected"),
    [
        ("all", ("a", "b", "c", "d", "e")),
        ("", ("a", "b", "c", "d", "e")),
        ("failed", ("b", "c", "d", "e")),
        ("not_started", ("d",)),
        ("not-started", ("d",)),
    ],
)
def test_rerun_targets(only: str, expected: tuple[str, ...]) -> None:
    assert rerun_targets(_record(RUN), parse_rerun_scope(only)) == expected


def test_nothing_to_rerun_is_refused() -> None:
    with pytest.raises(RerunRefused, match="no failed targets; nothing to rerun") as info:
        rerun_targets(_record({"a": "ok"}, "completed"), RerunScope.FAILED)
    assert "--only all" in str(info.value)


def test_a_running_run_is_refused() -> None:
    with pytest.raises(RerunRefused, match="still running"):
        rerun_targets(_record({"a": "ok", "b": None}, None), RerunScope.ALL)


def test_unknown_scope() -> None:
    with pytest.raises(FleetSpecError, match="unknown rerun choice 'broken'") as info:
        parse_rerun_scope("broken")
    assert info.value.field == "only"


def test_rerun_selector_is_the_node_ids() -> None:
    selector = rerun_selector(["b", "a"])
    assert str(selector) == "node=a,b"
    many = rerun_selector(f"n-{i:05d}" for i in range(2000))  # past the parser's 4096 chars
    assert len(str(many)) > 4096


def test_secret_args() -> None:
    assert merge_secret_args({"cmd": "x"}, {"token": "t"}) == {"cmd": "x", "token": "t"}
    with pytest.raises(FleetSpecError, match="'cmd' is given both"):
        merge_secret_args({"cmd": "x"}, {"cmd": "y"})
    assert redact_args({"cmd": "x"}, ["token"]) == {"cmd": "x", "token": "<secret>"}
    check_rerun_secrets("f-1", ["token"], {"token": "t"})
    with pytest.raises(FleetSpecError) as info:
        check_rerun_secrets("f-1", ["token", "password"], {})
    text = str(info.value)
    assert "missing: password, token" in text
    assert "--secret-arg password=... --secret-arg token=..." in text
    with pytest.raises(FleetSpecError, match="not a secret argument of fleet run f-1: extra"):
        check_rerun_secrets("f-1", [], {"extra": "v"})
