"""Run records: invariants, JSON round trip, and refusing malformed stored data."""

from __future__ import annotations

import ast
import copy
import json
import pathlib
from typing import Any

import pytest

import aegis_edge_core.fleet as fleet_package
from aegis_edge_core.errors import AegisError
from aegis_edge_core.fleet import (
    FleetRecordError,
    FleetRun,
    FleetSpec,
    RunRecord,
    TargetRecord,
    resolve_targets,
)

from .helpers import snap


def finished_record() -> RunRecord:
    fleet = [snap(f"h{i}") for i in range(4)] + [snap("gone", status="Revoked")]
    spec = FleetSpec(selector="all", tool="cmd.run", mode="sequential", on_error="fail-fast")
    run = FleetRun(spec, resolve_targets(fleet, spec.selector, spec.tool), fleet_command_id="fc")
    run.start(10)
    run.on_result("h0", "ok", 11, exit_code=0)
    run.on_result("h1", "error", 12, exit_code=3, error_message="boom")
    return run.record()


def test_round_trip_through_json() -> None:
    record = finished_record()
    data = json.loads(json.dumps(record.to_dict()))
    assert RunRecord.from_dict(data) == record
    assert data["counts"] == {
        "ok": 1,
        "error": 1,
        "timeout": 0,
        "cancelled": 0,
        "denied": 0,
        "edge_disconnected": 0,
        "not_started": 2,
    }
    assert data["skipped"] == [{"node_id": "gone", "reason": "revoked"}]


def _broken(mutate: Any) -> dict[str, Any]:
    data = copy.deepcopy(finished_record().to_dict())
    mutate(data)
    return data


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.pop("fleet_command_id"), "run record fleet_command_id: missing"),
        (lambda d: d.update(outcome="exploded"), "run record outcome: unknown value"),
        (lambda d: d.update(canary=True), "run record canary: expected an integer"),
        (lambda d: d.update(started_at="noon"), "run record started_at: expected a finite"),
        (lambda d: d.update(targets={}), "run record targets: expected a list"),
        (lambda d: d["targets"].append(7), "run record targets[4]: expected an object"),
        (lambda d: d["targets"][0].update(state="zombie"), "targets[0].state: unknown value"),
        (lambda d: d["targets"][0].update(exit_code=1.5), "targets[0].exit_code: expected"),
        (lambda d: d["skipped"][0].update(reason="bored"), "skipped[0].reason: unknown value"),
        # Well-typed but inconsistent: an outcome without being done.
        (lambda d: d["targets"][0].update(state="in_flight"), "run record targets[0]"),
        # A running run cannot carry an outcome, nor a finished one lack it.
        (lambda d: d.update(outcome="running"), "outcome exactly when"),
        # Resolution-time reasons belong in skipped, run-time ones on targets.
        (lambda d: d["skipped"][0].update(reason="halted"), "not a resolution skip reason"),
        (lambda d: d["targets"][2].update(skip_reason="revoked"), "not a run-time skip reason"),
        (lambda d: d["skipped"].append({"node_id": "h0", "reason": "revoked"}), "both"),
    ],
)
def test_malformed_records_are_refused_with_a_path(mutate: Any, needle: str) -> None:
    with pytest.raises(FleetRecordError) as caught:
        RunRecord.from_dict(_broken(mutate))
    assert needle in str(caught.value)
    assert isinstance(caught.value, AegisError)


def test_from_dict_wants_an_object() -> None:
    with pytest.raises(FleetRecordError):
        RunRecord.from_dict([])  # type: ignore[arg-type]


def test_target_record_invariants() -> None:
    TargetRecord(node_id="a", state="pending")
    with pytest.raises(ValueError):
        TargetRecord(node_id="a", state="done")  # no outcome
    with pytest.raises(ValueError):
        TargetRecord(node_id="a", state="in_flight")  # never dispatched
    with pytest.raises(ValueError):
        TargetRecord(node_id="a", state="done", outcome="not_started", finished_at=1.0)  # no reason


# --- the sans-I/O rule, checked on the source ---------------------------------------------------

FORBIDDEN_MODULES = {
    "asyncio",
    "anyio",
    "trio",
    "threading",
    "socket",
    "select",
    "selectors",
    "sqlite3",
    "subprocess",
    "multiprocessing",
    "grpc",
    "prometheus_client",
    "opentelemetry",
    "time",
    "random",
    "os",
    "secrets",
    "uuid",
    "datetime",
}
FORBIDDEN_CALLS = {"open", "print", "input", "eval", "exec", "__import__"}


def test_fleet_package_is_sans_io() -> None:
    root = pathlib.Path(fleet_package.__file__).parent
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                names = []
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN_MODULES, f"{path.name} imports {name}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in FORBIDDEN_CALLS, f"{path.name} calls {node.func.id}"
