"""Command history: the last N tool calls dispatched to one daemon, with their results.

Theory of operation
-------------------
Operators read "Command history (last N tool calls dispatched to the host)" when they audit a
host, e.g. after a suspected key leak. Both servers keep one :class:`CommandHistory` per daemon:
the relay (in memory, beside its store) and the agent (for ``aegis edge status``). Memory is
bounded: once ``limit`` records are held, recording a new dispatch evicts the oldest record,
finished or not. Lookup, dispatch and result are O(1) (an ``OrderedDict`` keyed by
``command_id``).

Each :class:`CommandRecord` is an immutable value; an update replaces it in place (same
position, so order stays "by dispatch"). A record moves through a small table
(:data:`RECORD_TRANSITIONS`) of :class:`RecordState` values:

* ``dispatched`` -- sent to the daemon, no result yet (``outcome is None``);
* ``provisional`` -- the stream dropped while it was in flight, so the dispatcher was told
  ``edge_disconnected`` (:meth:`CommandHistory.disconnected`). The daemon may still finish it
  and deliver the real result on reconnect, and that result *replaces* the provisional one;
* ``finished`` -- a real result was recorded. Final.

A second result for a ``finished`` record, or a second dispatch of a known ``command_id``,
raises :class:`HistoryProtocolError`: it means the caller lost track of its commands. A result
for an *unknown* ``command_id`` is not an error -- the record may have been evicted by newer
dispatches -- and :meth:`CommandHistory.finished` returns ``None``.

Times are seconds since the epoch, passed in. If a caller's clock steps backwards between
dispatch and result, ``finished_at`` is clamped to ``dispatched_at`` so durations are never
negative.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from aegis_edge_core.errors import AegisError, LocalProtocolError

__all__ = [
    "DEFAULT_HISTORY_LIMIT",
    "RECORD_TRANSITIONS",
    "CommandHistory",
    "CommandOutcome",
    "CommandRecord",
    "HistoryProtocolError",
    "InvalidRecordError",
    "RecordState",
]

DEFAULT_HISTORY_LIMIT = 50
"""Records kept per daemon unless the embedder chooses otherwise."""


class CommandOutcome(enum.StrEnum):
    """How a dispatched tool call ended; the ``outcome`` label of the dispatch metric."""

    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    DENIED = "denied"
    EDGE_DISCONNECTED = "edge_disconnected"


class InvalidRecordError(AegisError, ValueError):
    """A :class:`CommandRecord` was built with a value that cannot be right."""


class HistoryProtocolError(LocalProtocolError):
    """A dispatch or result arrived that the record's state does not allow."""


class RecordState(enum.Enum):
    """Where a record stands; derived from its ``outcome``."""

    DISPATCHED = "dispatched"
    PROVISIONAL = "provisional"
    FINISHED = "finished"


RECORD_TRANSITIONS: Mapping[tuple[RecordState, str], RecordState] = MappingProxyType(
    {
        (RecordState.DISPATCHED, "result"): RecordState.FINISHED,
        (RecordState.DISPATCHED, "disconnect"): RecordState.PROVISIONAL,
        # The real result, delivered on reconnect, supersedes "edge_disconnected".
        (RecordState.PROVISIONAL, "result"): RecordState.FINISHED,
        (RecordState.PROVISIONAL, "disconnect"): RecordState.PROVISIONAL,  # no-op
        (RecordState.FINISHED, "disconnect"): RecordState.FINISHED,  # no-op: nothing in flight
        # (FINISHED, "result") is missing on purpose: a finished command has one result.
    }
)
"""Legal ``(state, call) -> state`` moves of a record; calls are ``"result"``/``"disconnect"``."""


def _non_empty(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidRecordError(f"{attr.name} must be a non-empty string, got {value!r}")


def _optional_non_empty(
    _inst: object, attr: attrs.Attribute[str | None], value: str | None
) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise InvalidRecordError(f"{attr.name} must be a non-empty string or None, got {value!r}")


def _time(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRecordError(f"{attr.name} must be a finite number of seconds, got {value!r}")


def _to_outcome(value: CommandOutcome | str | None) -> CommandOutcome | None:
    if value is None:
        return None
    try:
        return CommandOutcome(value)
    except ValueError:
        raise InvalidRecordError(
            f"unknown outcome {value!r}",
            hint="expected one of " + ", ".join(o.value for o in CommandOutcome),
        ) from None


def _exit_code(_inst: object, _attr: object, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidRecordError(f"exit_code must be an integer or None, got {value!r}")


@attrs.frozen(kw_only=True)
class CommandRecord:
    """One tool call dispatched to a daemon and, once known, how it ended.

    ``fleet_command_id`` is set when the call is one target of a fleet run. ``exit_code`` is
    the process exit status for process-backed tools (``cmd.run``); ``error`` is a one-line
    human reason for non-``ok`` outcomes; ``result_json`` is the tool's structured result
    (``sys.info``'s, a plugin's), a JSON document as the daemon reported it.
    """

    command_id: str = attrs.field(validator=_non_empty)
    tool: str = attrs.field(validator=_non_empty)
    dispatched_at: float = attrs.field(validator=_time)
    fleet_command_id: str | None = attrs.field(default=None, validator=_optional_non_empty)
    finished_at: float | None = attrs.field(default=None, validator=_time)
    outcome: CommandOutcome | None = attrs.field(default=None, converter=_to_outcome)
    exit_code: int | None = attrs.field(default=None, validator=_exit_code)
    error: str | None = attrs.field(default=None)
    result_json: str | None = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        if (self.finished_at is None) != (self.outcome is None):
            raise InvalidRecordError(
                "finished_at and outcome must be set together",
                hint="a record without an outcome is still in flight",
            )
        if self.outcome is None and (
            self.exit_code is not None or self.error is not None or self.result_json is not None
        ):
            raise InvalidRecordError("exit_code, error and result_json need an outcome")
        if self.result_json is not None and not isinstance(self.result_json, str):
            raise InvalidRecordError(
                f"result_json must be a string or None, got {type(self.result_json).__name__}"
            )
        if self.finished_at is not None and self.finished_at < self.dispatched_at:
            raise InvalidRecordError(
                f"finished_at ({self.finished_at}) is before dispatched_at ({self.dispatched_at})"
            )
        if self.error is not None and not isinstance(self.error, str):
            raise InvalidRecordError(f"error must be a string or None, got {self.error!r}")

    @property
    def state(self) -> RecordState:
        """Dispatched, provisionally ``edge_disconnected``, or finished."""
        if self.outcome is None:
            return RecordState.DISPATCHED
        if self.outcome is CommandOutcome.EDGE_DISCONNECTED:
            return RecordState.PROVISIONAL
        return RecordState.FINISHED

    @property
    def in_flight(self) -> bool:
        """True until any outcome (even a provisional one) is known."""
        return self.outcome is None

    @property
    def duration(self) -> float | None:
        """Seconds from dispatch to result, or ``None`` while in flight."""
        if self.finished_at is None:
            return None
        return self.finished_at - self.dispatched_at


def _next(record: CommandRecord, call: str) -> RecordState:
    try:
        return RECORD_TRANSITIONS[(record.state, call)]
    except KeyError:
        raise HistoryProtocolError(
            f"command {record.command_id!r} already finished with outcome {record.outcome}",
            hint="deliver each command's result once",
        ) from None


class CommandHistory:
    """The last ``limit`` tool calls of one daemon, oldest first. Mutable; not thread-safe."""

    __slots__ = ("_limit", "_records")

    def __init__(self, limit: int = DEFAULT_HISTORY_LIMIT) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidRecordError(f"limit must be a positive integer, got {limit!r}")
        self._limit = limit
        self._records: OrderedDict[str, CommandRecord] = OrderedDict()

    @property
    def limit(self) -> int:
        """How many records are kept at most."""
        return self._limit

    def dispatched(
        self,
        command_id: str,
        tool: str,
        now: float,
        *,
        fleet_command_id: str | None = None,
    ) -> CommandRecord:
        """Record a new dispatch at ``now``; evicts the oldest record when full."""
        if command_id in self._records:
            raise HistoryProtocolError(
                f"command {command_id!r} was already dispatched",
                hint="command ids are unique per daemon",
            )
        record = CommandRecord(
            command_id=command_id,
            fleet_command_id=fleet_command_id,
            tool=tool,
            dispatched_at=now,
        )
        self._add(record)
        return record

    def add(self, record: CommandRecord) -> None:
        """Insert a record as-is, e.g. when loading history from a store (oldest first)."""
        if record.command_id in self._records:
            raise HistoryProtocolError(f"command {record.command_id!r} is already recorded")
        self._add(record)

    def finished(
        self,
        command_id: str,
        now: float,
        outcome: CommandOutcome | str,
        *,
        exit_code: int | None = None,
        error: str | None = None,
        result_json: str | None = None,
    ) -> CommandRecord | None:
        """Record the result of ``command_id``; ``None`` if it is not (or no longer) held."""
        record = self._records.get(command_id)
        if record is None:
            return None
        _next(record, "result")
        updated = attrs.evolve(
            record,
            finished_at=max(float(now), record.dispatched_at),
            outcome=outcome,
            exit_code=exit_code,
            error=error,
            result_json=result_json or None,
        )
        self._records[command_id] = updated
        return updated

    def disconnected(self, now: float) -> list[CommandRecord]:
        """The stream dropped: mark every in-flight call ``edge_disconnected`` and return them.

        These are the calls to report to the dispatcher as EdgeDisconnected. A real result
        delivered later replaces the provisional outcome.
        """
        out = []
        for command_id, record in list(self._records.items()):
            if _next(record, "disconnect") is RecordState.PROVISIONAL and record.in_flight:
                updated = attrs.evolve(
                    record,
                    finished_at=max(float(now), record.dispatched_at),
                    outcome=CommandOutcome.EDGE_DISCONNECTED,
                    error="the daemon's stream dropped while the command was in flight",
                )
                self._records[command_id] = updated
                out.append(updated)
        return out

    def get(self, command_id: str) -> CommandRecord | None:
        """The record of ``command_id``, or ``None``."""
        return self._records.get(command_id)

    def records(self) -> list[CommandRecord]:
        """All held records, oldest dispatch first."""
        return list(self._records.values())

    def recent(self, n: int | None = None) -> list[CommandRecord]:
        """The ``n`` most recent records (all if ``None``), newest first."""
        out = list(reversed(self._records.values()))
        return out if n is None else out[: max(n, 0)]

    def in_flight(self) -> list[CommandRecord]:
        """Records with no outcome yet, oldest first."""
        return [r for r in self._records.values() if r.in_flight]

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[CommandRecord]:
        return iter(list(self._records.values()))

    def __contains__(self, command_id: object) -> bool:
        return command_id in self._records

    def _add(self, record: CommandRecord) -> None:
        records = self._records
        if len(records) >= self._limit:
            # Updates keep position, so the first entry is the oldest dispatch.
            records.popitem(last=False)
        records[record.command_id] = record
