"""--mode, --on-error, --deadline, --canary and the spec value."""

from __future__ import annotations

import pytest

from aegis_edge_core.fleet import (
    DaemonSnapshot,
    ErrorPolicy,
    FleetSpec,
    FleetSpecError,
    RolloutMode,
    SelectorError,
    parse_duration,
    parse_mode,
    parse_on_error,
)
from aegis_edge_core.fleet.spec import ModeKind


@pytest.mark.parametrize(
    ("text", "targets", "window", "canonical"),
    [
        ("all", 37, 37, "all"),
        ("sequential", 37, 1, "sequential"),
        ("rolling=5", 37, 5, "rolling=5"),
        ("rolling=500", 37, 500, "rolling=500"),
        ("rolling=10%", 25, 3, "rolling=10%"),  # 2.5 rounds up
        ("rolling=10%", 30, 3, "rolling=10%"),
        ("rolling=10%", 31, 4, "rolling=10%"),
        ("rolling=1%", 5, 1, "rolling=1%"),  # never below one
        ("rolling=100%", 7, 7, "rolling=100%"),
        (" rolling=2 ", 7, 2, "rolling=2"),
    ],
)
def test_modes(text: str, targets: int, window: int, canonical: str) -> None:
    mode = parse_mode(text)
    assert mode.window(targets) == window
    assert str(mode) == canonical
    assert parse_mode(str(mode)) == mode


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("rolling", "needs a window"),
        ("rolling=0", "within 1.."),
        ("rolling=-1", "positive whole number"),
        ("rolling=1.5", "positive whole number"),
        ("rolling=0%", "within 1..100"),
        ("rolling=101%", "within 1..100"),
        ("rolling=%", "positive whole number"),
        ("rolling=\u0665", "positive whole number"),  # a non-ASCII digit
        ("roling=5", "did you mean 'rolling'?"),
        ("All", "did you mean 'all'?"),
        ("parallel", "use all, sequential, rolling=N or rolling=N%"),
    ],
)
def test_bad_modes(text: str, needle: str) -> None:
    with pytest.raises(FleetSpecError) as caught:
        parse_mode(text)
    assert needle in str(caught.value)
    assert caught.value.field == "mode"


@pytest.mark.parametrize(
    ("text", "stop_after", "canonical"),
    [
        ("continue", None, "continue"),
        ("fail-fast", 1, "stop-after=1"),
        ("stop-after=1", 1, "stop-after=1"),
        ("stop-after=3", 3, "stop-after=3"),
    ],
)
def test_on_error(text: str, stop_after: int | None, canonical: str) -> None:
    policy = parse_on_error(text)
    assert policy == ErrorPolicy(stop_after=stop_after)
    assert str(policy) == canonical
    assert parse_on_error(canonical) == policy


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("stop-after", "needs a count"),
        ("stop-after=0", "within 1.."),
        ("stop-after=x", "positive whole number"),
        ("failfast", "did you mean 'fail-fast'?"),
        ("contnue", "did you mean 'continue'?"),
        ("stop_after=1", "did you mean 'stop-after'?"),
    ],
)
def test_bad_on_error(text: str, needle: str) -> None:
    with pytest.raises(FleetSpecError) as caught:
        parse_on_error(text)
    assert needle in str(caught.value)
    assert caught.value.field == "on_error"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("120s", 120.0),
        ("2m", 120.0),
        ("90", 90.0),
        ("1.5", 1.5),
        ("1h30m", 5400.0),
        ("2.5m", 150.0),
        ("1m30s", 90.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "-5s", "5x", "s", "1e3", "inf", "nan", "2 m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(FleetSpecError) as caught:
        parse_duration(text)
    assert caught.value.field == "deadline"


def test_spec_parses_its_strings() -> None:
    spec = FleetSpec(
        selector="tags=managed-fleet",
        tool="cmd.run",
        args={"cmd": "/opt/aegis/upgrade.sh"},
        mode="rolling=5",
        on_error="stop-after=1",
        deadline_secs="120s",
    )
    assert spec.mode == RolloutMode(kind=ModeKind.ROLLING, value=5)
    assert spec.on_error.stop_after == 1
    assert spec.deadline_secs == 120.0
    assert spec.summary() == {
        "selector": "tags=managed-fleet",
        "tool": "cmd.run",
        "mode": "rolling=5",
        "on_error": "stop-after=1",
        "deadline_secs": 120.0,
        "canary": 0,
    }
    with pytest.raises(TypeError):
        spec.args["cmd"] = "rm -rf /"  # type: ignore[index]


def test_spec_defaults_and_refusals() -> None:
    spec = FleetSpec(selector="all", tool="edge.ping")
    assert (str(spec.mode), str(spec.on_error), spec.deadline_secs, spec.canary) == (
        "all",
        "continue",
        None,
        0,
    )
    with pytest.raises(SelectorError):
        FleetSpec(selector="", tool="edge.ping")
    with pytest.raises(FleetSpecError, match="tool"):
        FleetSpec(selector="all", tool="")
    with pytest.raises(FleetSpecError, match="canary"):
        FleetSpec(selector="all", tool="edge.ping", canary=-1)
    with pytest.raises(FleetSpecError, match="deadline"):
        FleetSpec(selector="all", tool="edge.ping", deadline_secs=0)
    with pytest.raises(FleetSpecError, match="mode"):
        FleetSpec(selector="all", tool="edge.ping", mode="rolling=0")


def test_snapshot_value() -> None:
    s = DaemonSnapshot(
        node_id="n", tenant_id="t", status="Connected", tools=["a"], labels={"k": "v"}
    )
    assert s.tools == frozenset({"a"})
    with pytest.raises(TypeError):
        s.labels["k"] = "w"  # type: ignore[index]
    with pytest.raises(ValueError):
        DaemonSnapshot(node_id="n", tenant_id="t", status="Sleepy")
    with pytest.raises(TypeError):
        DaemonSnapshot(node_id="n", tenant_id="t", status="Connected", tags="prod")
    with pytest.raises(ValueError):
        DaemonSnapshot(node_id="", tenant_id="t", status="Connected")
