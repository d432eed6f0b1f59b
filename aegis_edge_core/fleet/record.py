"""The run record: what a fleet run did, as a value the relay persists and the CLI prints.

:meth:`FleetRun.record() <aegis_edge_core.fleet.planner.FleetRun.record>` produces one at
any moment -- mid-run for ``fleet show`` and progress events, finished for the final
answer. It is plain data: nothing in it refers back to the planner.

Shape and invariants
--------------------

* ``targets`` has one :class:`TargetRecord` per resolved target, in plan order (by node
  id). A target that is ``done`` has an ``outcome``; one that never ran has outcome
  ``not_started`` and a ``skip_reason`` (``halted``, ``deadline`` or ``cancelled``); only
  those have a ``skip_reason``. ``dispatched_at`` is set exactly for targets that were
  dispatched, ``finished_at`` exactly for ``done`` ones.
* A dispatched target keeps the invocation's ``timeout_secs`` (what was left of the run's
  deadline, ``None`` without one) and its ``timeout_bound`` (``deadline`` or ``tool``: the
  bound its command is killed at). ``ended_by`` is ``deadline`` exactly for targets the
  run's deadline ended, and those have outcome ``timeout`` (the planner's deadline rule).
  Records written before these keys existed read them as ``None``.
* ``skipped`` lists the daemons that matched but were skipped at resolution
  (``disconnected``, ``unhealthy``, ``revoked``, ``tool_unavailable``, and ``not_found``
  for a group's pinned node that is not in the fleet). So every matched
  daemon appears exactly once in ``targets`` or ``skipped``, and ``matched`` is the sum.
  :meth:`RunRecord.skip_counts` adds the run-time skips for the
  ``aegis_edge_fleet_targets_skipped_total{reason}`` metric.
* ``outcome`` is ``None`` until ``phase`` is ``finished``; in JSON it is ``"running"``
  until then, as in ``aegis.edge.v1.RunOutcome``.
* ``to_dict()`` is the CLI contract's JSON (``fleet_command_id``, ``outcome``, ``targets``
  [{``node_id``, ``outcome``, ``exit_code``, ...}], ``skipped`` [{``node_id``,
  ``reason``}]) plus the spec summary, timings and counts; ``from_dict(to_dict(r)) == r``.
  Tool arguments are not part of the record: a store keeps the plain ones beside it and
  secret ones nowhere (:mod:`aegis_edge_core.fleet.rerun`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Final, TypeVar

import attrs

from aegis_edge_core.fleet.errors import FleetRecordError, RunFinished
from aegis_edge_core.fleet.outcomes import (
    RESOLUTION_SKIP_REASONS,
    RUN_SKIP_REASONS,
    EndedBy,
    RunOutcome,
    RunPhase,
    SkipReason,
    TargetOutcome,
    TargetState,
    TimeoutBound,
)
from aegis_edge_core.fleet.resolve import Skipped

__all__ = ["RunRecord", "TargetRecord"]

_RUNNING = "running"


_E = TypeVar("_E")


# Converters that pass members straight through: record() builds one TargetRecord per
# target, and an Enum call per field would dominate its cost on a 10k-target run.
_TARGET_OUTCOMES: Final = {member.value: member for member in TargetOutcome}
_RUN_OUTCOMES: Final = {member.value: member for member in RunOutcome}
_SKIP_REASONS: Final = {member.value: member for member in SkipReason}
_TARGET_STATES: Final = {member.value: member for member in TargetState}
_TIMEOUT_BOUNDS: Final = {member.value: member for member in TimeoutBound}
_ENDED_BY: Final = {member.value: member for member in EndedBy}


def _member(table: Mapping[str, _E], kind: str, value: str) -> _E:
    try:
        return table[value]
    except (KeyError, TypeError):
        raise ValueError(f"{value!r} is not a valid {kind}") from None


def _target_outcome(value: str | None) -> TargetOutcome | None:
    return None if value is None else _member(_TARGET_OUTCOMES, "TargetOutcome", value)


def _run_outcome(value: str | None) -> RunOutcome | None:
    return None if value is None else _member(_RUN_OUTCOMES, "RunOutcome", value)


def _skip_reason(value: str | None) -> SkipReason | None:
    return None if value is None else _member(_SKIP_REASONS, "SkipReason", value)


def _target_state(value: str) -> TargetState:
    return _member(_TARGET_STATES, "TargetState", value)


def _timeout_bound(value: str | None) -> TimeoutBound | None:
    return None if value is None else _member(_TIMEOUT_BOUNDS, "TimeoutBound", value)


def _ended_by(value: str | None) -> EndedBy | None:
    return None if value is None else _member(_ENDED_BY, "EndedBy", value)


def _skips(values: Iterable[Skipped]) -> tuple[Skipped, ...]:
    return tuple(values)


def _targets(values: Iterable[TargetRecord]) -> tuple[TargetRecord, ...]:
    return tuple(values)


@attrs.frozen(kw_only=True)
class TargetRecord:
    """One target of a run: where it is and, once done, how it ended."""

    node_id: str
    state: TargetState = attrs.field(converter=_target_state)
    outcome: TargetOutcome | None = attrs.field(default=None, converter=_target_outcome)
    exit_code: int | None = None
    error_message: str | None = None
    skip_reason: SkipReason | None = attrs.field(default=None, converter=_skip_reason)
    dispatched_at: float | None = None
    finished_at: float | None = None
    timeout_secs: float | None = None
    timeout_bound: TimeoutBound | None = attrs.field(default=None, converter=_timeout_bound)
    ended_by: EndedBy | None = attrs.field(default=None, converter=_ended_by)

    def __attrs_post_init__(self) -> None:
        done = self.state is TargetState.DONE
        if done != (self.outcome is not None):
            raise ValueError(f"{self.node_id}: an outcome is set exactly when state is done")
        if done != (self.finished_at is not None):
            raise ValueError(f"{self.node_id}: finished_at is set exactly when state is done")
        not_started = self.outcome is TargetOutcome.NOT_STARTED
        if not_started != (self.skip_reason is not None):
            raise ValueError(f"{self.node_id}: skip_reason is set exactly for not_started")
        if self.skip_reason is not None and self.skip_reason not in RUN_SKIP_REASONS:
            raise ValueError(f"{self.node_id}: {self.skip_reason} is not a run-time skip reason")
        dispatched = self.state is not TargetState.PENDING and not not_started
        if dispatched != (self.dispatched_at is not None):
            raise ValueError(f"{self.node_id}: dispatched_at is set exactly when dispatched")
        if not dispatched and (self.timeout_secs is not None or self.timeout_bound is not None):
            raise ValueError(f"{self.node_id}: only a dispatched target has a timeout")
        if self.ended_by is not None and self.outcome is not TargetOutcome.TIMEOUT:
            raise ValueError(f"{self.node_id}: a target the deadline ended has outcome timeout")

    def to_dict(self) -> dict[str, object]:
        """This target as JSON-ready data; ``outcome`` is ``None`` until it is done."""
        return {
            "node_id": self.node_id,
            "state": self.state.value,
            "outcome": None if self.outcome is None else self.outcome.value,
            "exit_code": self.exit_code,
            "error_message": self.error_message,
            "skip_reason": None if self.skip_reason is None else self.skip_reason.value,
            "dispatched_at": self.dispatched_at,
            "finished_at": self.finished_at,
            "timeout_secs": self.timeout_secs,
            "timeout_bound": None if self.timeout_bound is None else self.timeout_bound.value,
            "ended_by": None if self.ended_by is None else self.ended_by.value,
        }


def _check_targets(
    inst: RunRecord,
    _attr: attrs.Attribute[tuple[TargetRecord, ...]],
    targets: tuple[TargetRecord, ...],
) -> None:
    ids = {target.node_id for target in targets}
    if len(ids) != len(targets):
        raise ValueError("a node id appears twice among the targets")
    if not ids.isdisjoint(skip.node_id for skip in inst.skipped):
        raise ValueError("a node id is both a target and skipped")


def _check_skipped(
    _inst: object, _attr: attrs.Attribute[tuple[Skipped, ...]], skipped: tuple[Skipped, ...]
) -> None:
    for skip in skipped:
        if skip.reason not in RESOLUTION_SKIP_REASONS:
            raise ValueError(f"{skip.node_id}: {skip.reason} is not a resolution skip reason")


@attrs.frozen(kw_only=True)
class RunRecord:
    """A fleet run as data. See the module docstring for the invariants."""

    fleet_command_id: str
    selector: str
    tool: str
    mode: str
    on_error: str
    deadline_secs: float | None = None
    canary: int = 0
    phase: RunPhase = attrs.field(converter=RunPhase)
    outcome: RunOutcome | None = attrs.field(default=None, converter=_run_outcome)
    halt_reason: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    skipped: tuple[Skipped, ...] = attrs.field(
        default=(), converter=_skips, validator=_check_skipped
    )
    targets: tuple[TargetRecord, ...] = attrs.field(converter=_targets, validator=_check_targets)

    def __attrs_post_init__(self) -> None:
        if (self.phase is RunPhase.FINISHED) != (self.outcome is not None):
            raise ValueError("a run has an outcome exactly when its phase is finished")

    def check_cancellable(self) -> None:
        """Raise :class:`~aegis_edge_core.fleet.errors.RunFinished` if the run is over.

        A cancel of a finished run must not read as if it had stopped something.
        """
        if self.outcome is not None:
            raise RunFinished(self.fleet_command_id, self.outcome.value)

    @property
    def matched(self) -> int:
        """How many daemons the selector matched: targets plus resolution skips."""
        return len(self.targets) + len(self.skipped)

    @property
    def finished(self) -> bool:
        return self.phase is RunPhase.FINISHED

    def counts(self) -> dict[TargetOutcome, int]:
        """Targets per outcome, every outcome present (zero when none); undone targets aside."""
        counts = Counter(target.outcome for target in self.targets if target.outcome is not None)
        return {outcome: counts[outcome] for outcome in TargetOutcome}

    def skip_counts(self) -> dict[SkipReason, int]:
        """Skips per reason, resolution and run-time together; reasons with none left out."""
        counts = Counter(skip.reason for skip in self.skipped)
        counts.update(target.skip_reason for target in self.targets if target.skip_reason)
        return {reason: counts[reason] for reason in SkipReason if counts[reason]}

    def to_dict(self) -> dict[str, object]:
        """The JSON shape of ``fleet run|show --output json``; see the module docstring."""
        return {
            "fleet_command_id": self.fleet_command_id,
            "outcome": _RUNNING if self.outcome is None else self.outcome.value,
            "phase": self.phase.value,
            "halt_reason": self.halt_reason,
            "selector": self.selector,
            "tool": self.tool,
            "mode": self.mode,
            "on_error": self.on_error,
            "deadline_secs": self.deadline_secs,
            "canary": self.canary,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "matched": self.matched,
            "counts": {outcome.value: count for outcome, count in self.counts().items()},
            "targets": [target.to_dict() for target in self.targets],
            "skipped": [skip.to_dict() for skip in self.skipped],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> RunRecord:
        """Rebuild a record from :meth:`to_dict` output (e.g. read back from storage).

        Raises :class:`~aegis_edge_core.fleet.errors.FleetRecordError` naming the first bad
        key. Derived keys (``matched``, ``counts``) are ignored on the way in.
        """
        reader = _Reader(data, "")
        outcome = reader.string("outcome")
        skipped = [_skipped(item) for item in reader.items("skipped")]
        targets = [_target(item) for item in reader.items("targets")]
        try:
            return cls(
                fleet_command_id=reader.string("fleet_command_id"),
                selector=reader.string("selector"),
                tool=reader.string("tool"),
                mode=reader.string("mode"),
                on_error=reader.string("on_error"),
                deadline_secs=reader.opt_number("deadline_secs"),
                canary=reader.integer("canary"),
                phase=reader.enum("phase", RunPhase),
                outcome=None if outcome == _RUNNING else reader.enum("outcome", RunOutcome),
                halt_reason=reader.opt_string("halt_reason"),
                started_at=reader.opt_number("started_at"),
                finished_at=reader.opt_number("finished_at"),
                skipped=skipped,
                targets=targets,
            )
        except ValueError as exc:
            raise FleetRecordError(str(exc)) from exc


class _Reader:
    """Typed access to one JSON object, with errors that name the dotted path."""

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, Mapping):
            raise FleetRecordError("expected an object", path=path or ".")
        self.data: Mapping[object, object] = data
        self.path = path

    def _at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str) -> object:
        if key not in self.data:
            raise FleetRecordError("missing", path=self._at(key))
        return self.data[key]

    def _fail(self, key: str, expected: str) -> FleetRecordError:
        return FleetRecordError(f"expected {expected}", path=self._at(key))

    def opt_string(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, str):
            raise self._fail(key, "a string or null")
        return value

    def string(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._fail(key, "a string")
        return value

    def opt_integer(self, key: str) -> int | None:
        value = self.data.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise self._fail(key, "an integer or null")
        return value

    def integer(self, key: str) -> int:
        value = self._get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._fail(key, "an integer")
        return value

    def opt_number(self, key: str) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            raise self._fail(key, "a finite number or null")
        return float(value)

    def enum(self, key: str, kind: Callable[[str], _E]) -> _E:
        return self._member(key, self.string(key), kind)

    def opt_enum(self, key: str, kind: Callable[[str], _E]) -> _E | None:
        value = self.opt_string(key)
        return None if value is None else self._member(key, value, kind)

    def _member(self, key: str, value: str, kind: Callable[[str], _E]) -> _E:
        try:
            return kind(value)
        except ValueError:
            raise FleetRecordError(f"unknown value {value!r}", path=self._at(key)) from None

    def items(self, key: str) -> list[_Reader]:
        value = self._get(key)
        if not isinstance(value, list):
            raise self._fail(key, "a list")
        return [_Reader(item, f"{self._at(key)}[{i}]") for i, item in enumerate(value)]


def _skipped(item: _Reader) -> Skipped:
    return Skipped(node_id=item.string("node_id"), reason=item.enum("reason", SkipReason))


def _target(item: _Reader) -> TargetRecord:
    try:
        return TargetRecord(
            node_id=item.string("node_id"),
            state=item.enum("state", TargetState),
            outcome=item.opt_enum("outcome", TargetOutcome),
            exit_code=item.opt_integer("exit_code"),
            error_message=item.opt_string("error_message"),
            skip_reason=item.opt_enum("skip_reason", SkipReason),
            dispatched_at=item.opt_number("dispatched_at"),
            finished_at=item.opt_number("finished_at"),
            timeout_secs=item.opt_number("timeout_secs"),
            timeout_bound=item.opt_enum("timeout_bound", TimeoutBound),
            ended_by=item.opt_enum("ended_by", EndedBy),
        )
    except ValueError as exc:
        raise FleetRecordError(str(exc), path=item.path) from exc
