"""What an operator asked for: ``--mode``, ``--on-error``, ``--deadline``, ``--canary``.

The CLI flags and the admin API's ``FleetRunSpec`` carry these as strings; this module
parses them once into values the planner reads, and prints them back canonically.

Exact grammar (surrounding whitespace is ignored; everything else is case-sensitive):

``--mode``
    ``all`` -- every target at once. ``sequential`` -- one at a time (``rolling=1`` in
    effect). ``rolling=N`` -- a sliding window of at most N in flight, N >= 1.
    ``rolling=N%`` -- a window of N percent of the targets, 1 <= N <= 100, rounded up,
    never less than 1: 10% of 25 targets is 3.

``--on-error``
    ``continue`` -- never stop for failures. ``stop-after=N`` (N >= 1) -- halt once N
    targets have failed. ``fail-fast`` is ``stop-after=1``, and prints as that.

``--deadline``
    A positive duration bounding the whole run, from ``start``: plain seconds (``90``,
    ``1.5``) or one or more ``<number><unit>`` groups with units ``h``, ``m``, ``s``
    (``120s``, ``2m``, ``1h30m``, ``2.5m``).

``--canary``
    A count K >= 0: the first K targets (by node id) run alone, and the rest only if all
    K end ``ok``. 0 means no canary.

Malformed values raise :class:`~aegis_edge_core.fleet.errors.FleetSpecError` naming the
field and, where one is close, the value the operator probably meant.
"""

from __future__ import annotations

import difflib
import enum
import math
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

import attrs

from aegis_edge_core.fleet.errors import FleetSpecError
from aegis_edge_core.fleet.selector import NAME_CHARACTERS, Selector, parse_selector

__all__ = [
    "ErrorPolicy",
    "FleetSpec",
    "ModeKind",
    "RolloutMode",
    "parse_duration",
    "parse_mode",
    "parse_on_error",
]

# Bounds a typo like rolling=10000000000000 to something an int comparison handles without
# surprises; no fleet is anywhere near a billion hosts.
_MAX_COUNT: Final = 1_000_000_000


class ModeKind(enum.Enum):
    """The four spellings of ``--mode``."""

    ALL = "all"
    SEQUENTIAL = "sequential"
    ROLLING = "rolling"
    ROLLING_PERCENT = "rolling%"


@attrs.frozen(kw_only=True)
class RolloutMode:
    """How many targets may be in flight at once; see :meth:`window`.

    ``value`` is N for ``rolling=N``, the percentage for ``rolling=N%``, and ``None`` for
    ``all`` and ``sequential``.
    """

    kind: ModeKind = attrs.field(validator=attrs.validators.instance_of(ModeKind))
    value: int | None = attrs.field(default=None)

    @value.validator
    def _check_value(self, _attr: attrs.Attribute[int | None], value: int | None) -> None:
        if self.kind in (ModeKind.ALL, ModeKind.SEQUENTIAL):
            if value is not None:
                raise ValueError(f"mode {self.kind.value} takes no value")
            return
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"mode {self.kind.value} needs an int value")
        upper = 100 if self.kind is ModeKind.ROLLING_PERCENT else _MAX_COUNT
        if not 1 <= value <= upper:
            raise ValueError(f"mode {self.kind.value} value must be within 1..{upper}")

    def window(self, targets: int) -> int:
        """The most targets in flight at once for a run of ``targets`` targets (>= 1)."""
        if self.kind is ModeKind.ALL:
            return max(targets, 1)
        if self.kind is ModeKind.SEQUENTIAL:
            return 1
        assert self.value is not None
        if self.kind is ModeKind.ROLLING:
            return self.value
        # Integer ceil: float math would make 10% of 30 come out as 4 on some inputs.
        return max(1, -(-targets * self.value // 100))

    def __str__(self) -> str:
        if self.kind is ModeKind.ROLLING:
            return f"rolling={self.value}"
        if self.kind is ModeKind.ROLLING_PERCENT:
            return f"rolling={self.value}%"
        return str(self.kind.value)


@attrs.frozen(kw_only=True)
class ErrorPolicy:
    """When failures halt a run: after ``stop_after`` of them, or never (``None``)."""

    stop_after: int | None = attrs.field(default=None)

    @stop_after.validator
    def _check(self, _attr: attrs.Attribute[int | None], value: int | None) -> None:
        if value is None:
            return
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= _MAX_COUNT:
            raise ValueError(f"stop_after must be an int within 1..{_MAX_COUNT}")

    def __str__(self) -> str:
        if self.stop_after is None:
            return "continue"
        return f"stop-after={self.stop_after}"


def _count(text: str, *, field: str, what: str, example: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 10:
        raise FleetSpecError(
            f"{field} {what} must be a positive whole number, got {text!r}",
            field=field.replace("-", "_"),
            hint=f"e.g. {example}",
        )
    return int(text)


def _did_you_mean(word: str, choices: tuple[str, ...], fallback: str) -> str:
    close = difflib.get_close_matches(word.partition("=")[0].lower(), choices, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else fallback


_MODE_HINT: Final = "use all, sequential, rolling=N or rolling=N%"


def parse_mode(text: str) -> RolloutMode:
    """Parse ``--mode``: ``all``, ``sequential``, ``rolling=N`` or ``rolling=N%``."""
    value = text.strip()
    if value == "all":
        return RolloutMode(kind=ModeKind.ALL)
    if value == "sequential":
        return RolloutMode(kind=ModeKind.SEQUENTIAL)
    if value == "rolling":
        raise FleetSpecError(
            "mode 'rolling' needs a window", field="mode", hint="e.g. rolling=5 or rolling=10%"
        )
    if value.startswith("rolling="):
        amount = value[len("rolling=") :]
        if amount.endswith("%"):
            percent = _count(amount[:-1], field="mode", what="percentage", example="rolling=10%")
            if not 1 <= percent <= 100:
                raise FleetSpecError(
                    f"mode percentage must be within 1..100, got {percent}%",
                    field="mode",
                    hint="e.g. rolling=10%",
                )
            return RolloutMode(kind=ModeKind.ROLLING_PERCENT, value=percent)
        size = _count(amount, field="mode", what="window", example="rolling=5")
        if not 1 <= size <= _MAX_COUNT:
            raise FleetSpecError(
                f"mode window must be within 1..{_MAX_COUNT}, got {size}",
                field="mode",
                hint="use rolling=1 or sequential for one at a time",
            )
        return RolloutMode(kind=ModeKind.ROLLING, value=size)
    raise FleetSpecError(
        f"unknown mode {text!r}",
        field="mode",
        hint=_did_you_mean(value, ("all", "sequential", "rolling"), _MODE_HINT),
    )


_ON_ERROR_HINT: Final = "use continue, fail-fast or stop-after=N"


def parse_on_error(text: str) -> ErrorPolicy:
    """Parse ``--on-error``: ``continue``, ``fail-fast`` or ``stop-after=N``."""
    value = text.strip()
    if value == "continue":
        return ErrorPolicy()
    if value == "fail-fast":
        return ErrorPolicy(stop_after=1)
    if value == "stop-after":
        raise FleetSpecError(
            "on-error 'stop-after' needs a count", field="on_error", hint="e.g. stop-after=1"
        )
    if value.startswith("stop-after="):
        count = _count(
            value[len("stop-after=") :], field="on-error", what="count", example="stop-after=1"
        )
        if not 1 <= count <= _MAX_COUNT:
            raise FleetSpecError(
                f"on-error count must be within 1..{_MAX_COUNT}, got {count}",
                field="on_error",
                hint="stop-after=1 halts on the first failure",
            )
        return ErrorPolicy(stop_after=count)
    raise FleetSpecError(
        f"unknown on-error policy {text!r}",
        field="on_error",
        hint=_did_you_mean(value, ("continue", "fail-fast", "stop-after"), _ON_ERROR_HINT),
    )


_PLAIN_SECONDS: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_DURATION: Final = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?[hms])+")
_DURATION_PART: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)([hms])")
_UNIT_SECONDS: Final = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str, *, field: str = "deadline") -> float:
    """Parse a positive duration (``90``, ``120s``, ``2m``, ``1h30m``) into seconds.

    ``field`` names the flag in the error, for callers that reuse the grammar.
    """
    value = text.strip()
    if len(value) <= 64 and _PLAIN_SECONDS.fullmatch(value):
        seconds = float(value)
    elif len(value) <= 64 and _DURATION.fullmatch(value):
        seconds = sum(
            float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART.findall(value)
        )
    else:
        raise FleetSpecError(
            f"invalid {field} {text!r}",
            field=field,
            hint="use a duration such as 120s, 2m, 1h30m, or plain seconds",
        )
    if not math.isfinite(seconds) or seconds <= 0:
        raise FleetSpecError(f"{field} must be longer than zero, got {text!r}", field=field)
    return seconds


def _selector(value: Selector | str) -> Selector:
    return parse_selector(value) if isinstance(value, str) else value


def _mode(value: RolloutMode | str) -> RolloutMode:
    return parse_mode(value) if isinstance(value, str) else value


def _on_error(value: ErrorPolicy | str) -> ErrorPolicy:
    return parse_on_error(value) if isinstance(value, str) else value


def _deadline(value: float | str | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"deadline_secs must be a number of seconds, not {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise FleetSpecError(f"deadline must be longer than zero, got {value!r}", field="deadline")
    return seconds


def _args(value: Mapping[str, object]) -> Mapping[str, object]:
    return MappingProxyType(dict(value))


def _check_tool(_inst: object, _attr: attrs.Attribute[str], tool: str) -> None:
    if not isinstance(tool, str) or not tool or not NAME_CHARACTERS.issuperset(tool):
        raise FleetSpecError(
            f"invalid tool name {tool!r}", field="tool", hint="e.g. cmd.run or keys.rotate"
        )


def _check_canary(_inst: object, _attr: attrs.Attribute[int], canary: int) -> None:
    if not isinstance(canary, int) or isinstance(canary, bool) or not 0 <= canary <= _MAX_COUNT:
        raise FleetSpecError(f"canary must be a whole number >= 0, got {canary!r}", field="canary")


@attrs.frozen(kw_only=True)
class FleetSpec:
    """Everything an operator said about a run, parsed.

    String arguments are parsed on construction, so ``FleetSpec(selector="tags=prod",
    tool="cmd.run", mode="rolling=5", on_error="stop-after=1", deadline_secs="120s")`` is
    the CLI's whole job. ``args`` are the tool's JSON arguments; the planner never reads
    them, and they are left out of run records (the relay stores the plain ones beside the
    record and secret ones nowhere: :mod:`aegis_edge_core.fleet.rerun`).
    """

    selector: Selector = attrs.field(converter=_selector)
    tool: str = attrs.field(validator=_check_tool)
    args: Mapping[str, object] = attrs.field(factory=dict, converter=_args, hash=False)
    mode: RolloutMode = attrs.field(default=RolloutMode(kind=ModeKind.ALL), converter=_mode)
    on_error: ErrorPolicy = attrs.field(default=ErrorPolicy(), converter=_on_error)
    deadline_secs: float | None = attrs.field(default=None, converter=_deadline)
    canary: int = attrs.field(default=0, validator=_check_canary)

    def summary(self) -> dict[str, object]:
        """The spec as canonical strings and numbers, without ``args``: what records keep."""
        return {
            "selector": str(self.selector),
            "tool": self.tool,
            "mode": str(self.mode),
            "on_error": str(self.on_error),
            "deadline_secs": self.deadline_secs,
            "canary": self.canary,
        }
