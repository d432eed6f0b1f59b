"""Finishing a run that a relay crash left ``running``: alone (:func:`recover_run`), or by
another relay of a cluster that takes its coordination over (:func:`resume_run`).

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

A relay of a cluster can do better: the daemons are still there, held by live relays, so
the run is *resumed* rather than ended. :func:`resume_run` rebuilds the planner by replaying
what the store says happened -- the start, then each stored result in the order it ended --
while dropping every ``Dispatch`` the replay emits for a node that already has a command
row (the dead coordinator sent it: it is never sent again). What the replay leaves to do
(dispatches of targets never sent, cancels, the finish) is carried out by the new
coordinator, and the commands still in flight are waited for: the planner then reaches the
outcome the run would have had without the takeover.
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
from aegis_edge_core.fleet.planner import Action, Dispatch, FleetRun
from aegis_edge_core.fleet.record import RunRecord, TargetRecord

__all__ = ["RECOVERED_HALT_REASON", "Resumed", "StoredCommand", "recover_run", "resume_run"]

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


@attrs.frozen(kw_only=True)
class Resumed:
    """A run's planner rebuilt from the store, and what is left to do."""

    actions: tuple[Action, ...]
    """To carry out now, in order: dispatches of targets never sent, cancels, the finish."""
    awaiting: tuple[StoredCommand, ...]
    """Commands sent before the takeover whose end is not stored yet: wait for them, and
    feed each to the planner as it comes."""
    replayed: tuple[StoredCommand, ...]
    """The stored ends the replay fed to the planner."""


def _first_commands(commands: Iterable[StoredCommand]) -> dict[str, StoredCommand]:
    first: dict[str, StoredCommand] = {}
    for cmd in sorted(commands, key=lambda c: c.dispatched_at):
        first.setdefault(cmd.node_id, cmd)
    return first


def resume_run(
    run: FleetRun, record: RunRecord, commands: Iterable[StoredCommand], *, now: float
) -> Resumed:
    """Replay a stored run into ``run`` (a fresh planner of the same spec and targets).

    ``record`` is the run's last stored record (for its start time); ``commands`` its
    command rows. Results are fed in the order they ended; one whose target the replay has
    not dispatched yet waits until it has (two results that ended close together may be
    stored out of arrival order). A stored command the replay never dispatches at all is
    left alone: its row keeps its result in history.
    """
    first = _first_commands(commands)
    sent: set[str] = set()
    actions: list[Action] = []

    def absorb(new: Iterable[Action]) -> None:
        for action in new:
            if isinstance(action, Dispatch) and action.node_id in first:
                sent.add(action.node_id)  # the dead coordinator sent it: never again
            else:
                actions.append(action)

    started = record.started_at if record.started_at is not None else now
    absorb(run.start(min(started, now)))
    ended = sorted(
        (c for c in first.values() if c.outcome is not None),
        key=lambda c: (c.finished_at if c.finished_at is not None else now, c.dispatched_at),
    )
    fed: list[StoredCommand] = []
    waiting = list(ended)
    while True:
        ready = next((c for c in waiting if c.node_id in sent), None)
        if ready is None:
            break
        waiting.remove(ready)
        fed.append(ready)
        absorb(
            run.on_result(
                ready.node_id,
                _outcome(ready.outcome),
                min(ready.finished_at if ready.finished_at is not None else now, now),
                exit_code=ready.exit_code,
                error_message=ready.error_message or None,
            )
        )
    done = {c.node_id for c in fed}
    if not run.finished:
        absorb(run.on_tick(now))
    awaiting = tuple(first[n] for n in sorted(sent - done, key=lambda n: first[n].dispatched_at))
    return Resumed(actions=tuple(actions), awaiting=awaiting, replayed=tuple(fed))
