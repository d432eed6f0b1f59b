"""Fleet scheduling: selectors, target resolution, the rollout planner and run records.

The pieces, in the order a fleet run uses them::

    from aegis_edge_core.fleet import (
        DaemonSnapshot, FleetRun, FleetSpec, resolve_targets,
    )

    spec = FleetSpec(selector="tags=managed-fleet", tool="cmd.run",
                     args={"cmd": "/opt/aegis/upgrade.sh"},
                     mode="rolling=5", on_error="stop-after=1", deadline_secs="120s")
    resolution = resolve_targets(snapshots, spec.selector, spec.tool)  # preview shows this
    run = FleetRun(spec, resolution, fleet_command_id=run_id)          # NoTargets if empty
    actions = run.start(now)          # [Dispatch(node_id=...), ...]
    ...
    actions = run.on_result(node_id, "ok", now, exit_code=0)
    actions = run.on_tick(now)        # whenever run.next_deadline() has passed
    record = run.record()             # RunRecord; record.to_dict() is the CLI's JSON

Everything here is sans-I/O: time comes in as ``now``, ids come from the caller, and the
answers are values and lists of actions. Each module's docstring states its exact rules:
:mod:`~aegis_edge_core.fleet.selector` (grammar), :mod:`~aegis_edge_core.fleet.groups`
(saved groups, ``group=web``), :mod:`~aegis_edge_core.fleet.resolve` (targets vs. skips),
:mod:`~aegis_edge_core.fleet.spec` (mode, on-error, deadline),
:mod:`~aegis_edge_core.fleet.planner` (the state machine) and
:mod:`~aegis_edge_core.fleet.record` (the persisted shape).
"""

from __future__ import annotations

from aegis_edge_core.fleet.errors import (
    FleetRecordError,
    FleetSpecError,
    NoTargets,
    RunFinished,
    SelectorError,
)
from aegis_edge_core.fleet.groups import Group, GroupError, GroupIndex, index_groups
from aegis_edge_core.fleet.outcomes import (
    DaemonStatus,
    EndedBy,
    RunOutcome,
    RunPhase,
    SkipReason,
    TargetOutcome,
    TargetState,
    TimeoutBound,
)
from aegis_edge_core.fleet.planner import (
    DEFAULT_CANCEL_GRACE_SECS,
    Action,
    Cancel,
    Dispatch,
    Finish,
    FleetRun,
)
from aegis_edge_core.fleet.record import RunRecord, TargetRecord
from aegis_edge_core.fleet.resolve import Resolution, Skipped, resolve_targets
from aegis_edge_core.fleet.selector import Selector, parse_selector
from aegis_edge_core.fleet.snapshot import DaemonSnapshot
from aegis_edge_core.fleet.spec import (
    ErrorPolicy,
    FleetSpec,
    RolloutMode,
    parse_duration,
    parse_mode,
    parse_on_error,
)

__all__ = [
    "DEFAULT_CANCEL_GRACE_SECS",
    "Action",
    "Cancel",
    "DaemonSnapshot",
    "DaemonStatus",
    "Dispatch",
    "EndedBy",
    "ErrorPolicy",
    "Finish",
    "FleetRecordError",
    "FleetRun",
    "FleetSpec",
    "FleetSpecError",
    "Group",
    "GroupError",
    "GroupIndex",
    "NoTargets",
    "Resolution",
    "RolloutMode",
    "RunFinished",
    "RunOutcome",
    "RunPhase",
    "RunRecord",
    "Selector",
    "SelectorError",
    "SkipReason",
    "Skipped",
    "TargetOutcome",
    "TargetRecord",
    "TargetState",
    "TimeoutBound",
    "index_groups",
    "parse_duration",
    "parse_mode",
    "parse_on_error",
    "parse_selector",
    "resolve_targets",
]
