"""Finishing a run that a relay crash left ``running``.

A relay that dies mid-run (``kill -9``, power loss) leaves behind the run's last persisted
record and the per-node command rows it had written. On the next start the run cannot be
resumed -- the planner's window, timers and the operator's stream are gone -- so it is
finished from what the store knows, by these rules:

* a target already ``done`` in the record keeps its result;
* a target with a dispatched command takes that command's stored outcome; a command with
  no stored outcome (it was in flight when the relay died) ends ``edge_disconnected``: the
  daemon may still deliver its result late, and it lands in command history;
* a target never dispatched ends ``not_started`` with skip reason ``cancelled``; nothing is
  ever dispatched by recovery, so nothing runs twice;
* the run ends ``cancelled`` (with a halt reason naming the restart) if any target never
  started or it had already been halted, else ``completed`` or ``completed_with_errors``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import attrs

from aegis_edge_core.fleet.outcomes import (
    RunOutcome,
    RunPhase,
    SkipReason,
    TargetOutcome,
    TargetState,
)
from aegis_edge_core.fleet.record import RunRecord, TargetRecord

__all__ = ["RECOVERED_HALT_REASON", "StoredCommand", "recover_run"]

RECOVERED_HALT_REASON: Final = (
    "the relay restarted during the run; undispatched targets did not start"
)


@attrs.frozen(kw_only=True)
class StoredCommand:
    """A command row the relay persisted for one target of the run."""

    node_id: str
    command_id: str
    dispatched_at: float
    outcome: str | None = None
    """The stored outcome string, ``None`` while it was in flight."""
    exit_code: int | None = None
    error_message: str | None = None
    finished_at: float | None = None


def _outcome(stored: str | None) -> TargetOutcome:
    if stored is None:
        return TargetOutcome.EDGE_DISCONNECTED
    try:
        outcome = TargetOutcome(stored)
    except ValueError:
        return TargetOutcome.EDGE_DISCONNECTED
    # A dispatched command did start: "not_started" stored for it means the relay lost it.
    return TargetOutcome.EDGE_DISCONNECTED if outcome is TargetOutcome.NOT_STARTED else outcome


def recover_run(
    record: RunRecord,
    commands: Iterable[StoredCommand],
    *,
    now: float,
    created_at: float | None = None,
) -> tuple[RunRecord, dict[str, str]]:
    """The finished record, and the command id of each target that had one.

    ``created_at`` stands in for ``started_at`` if the run died before it started.

    When a node has several command rows (a retried dispatch), the first one dispatched
    counts: it is the one the run was waiting for.
    """
    first: dict[str, StoredCommand] = {}
    for cmd in sorted(commands, key=lambda c: c.dispatched_at):
        first.setdefault(cmd.node_id, cmd)
    targets: list[TargetRecord] = []
    never_started = False
    for target in record.targets:
        if target.state is TargetState.DONE:
            targets.append(target)
            continue
        found = first.get(target.node_id)
        if found is None:
            never_started = True
            targets.append(
                TargetRecord(
                    node_id=target.node_id,
                    state=TargetState.DONE,
                    outcome=TargetOutcome.NOT_STARTED,
                    skip_reason=SkipReason.CANCELLED,
                    finished_at=now,
                )
            )
            continue
        targets.append(
            TargetRecord(
                node_id=target.node_id,
                state=TargetState.DONE,
                outcome=_outcome(found.outcome),
                exit_code=found.exit_code,
                error_message=found.error_message or None,
                dispatched_at=found.dispatched_at,
                finished_at=found.finished_at or now,
            )
        )
    if never_started or record.halt_reason:
        outcome = RunOutcome.CANCELLED
    elif all(t.outcome is TargetOutcome.OK for t in targets):
        outcome = RunOutcome.COMPLETED
    else:
        outcome = RunOutcome.COMPLETED_WITH_ERRORS
    done = attrs.evolve(
        record,
        phase=RunPhase.FINISHED,
        outcome=outcome,
        halt_reason=record.halt_reason or (RECOVERED_HALT_REASON if never_started else None),
        started_at=record.started_at
        if record.started_at is not None
        else (created_at if created_at is not None else now),
        finished_at=now,
        targets=targets,
    )
    return done, {node: cmd.command_id for node, cmd in first.items()}
