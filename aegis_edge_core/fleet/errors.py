"""The errors of fleet scheduling.

Every one derives from :class:`aegis_edge_core.errors.AegisError`, so a caller that prints
``str(err)`` and exits non-zero needs no special case. The families differ in what the
caller does next:

* :class:`SelectorError` -- the operator typed a selector the grammar refuses. It carries
  the 1-based ``column`` and the ``source`` so a CLI can draw a caret under the mistake
  (:meth:`SelectorError.render`).
* :class:`FleetSpecError` -- a ``--mode``, ``--on-error``, ``--deadline`` or ``--canary``
  value is malformed, or the spec as a whole is inconsistent.
* :class:`NoTargets` -- the selector parsed, but nothing is left to run on. It is a
  :class:`FleetSpecError` because the fix is the same (change the command line), and it
  carries the :class:`~aegis_edge_core.fleet.resolve.Resolution` so the caller can show
  what matched and why each match was skipped.
* :class:`FleetRecordError` -- a persisted run record (``RunRecord.from_dict``) is not
  the shape this version writes.

Misusing the planner (a result for a node that was never dispatched, starting twice) is a
bug in the driving code, not bad input, and raises
:class:`aegis_edge_core.errors.LocalProtocolError` like every other sans-I/O machine in
the core.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from aegis_edge_core.errors import AegisError

if TYPE_CHECKING:
    from aegis_edge_core.fleet.resolve import Resolution

__all__ = ["FleetRecordError", "FleetSpecError", "NoTargets", "RunFinished", "SelectorError"]


class SelectorError(AegisError):
    """A selector string does not follow the grammar.

    ``str(err)`` reads ``selector column 7: unknown key 'tagz' (did you mean 'tags'?)``.
    ``column`` is 1-based and counts characters (not bytes) of ``source``; it may be
    ``len(source) + 1`` when the mistake is that the input ended too early.
    """

    column: int
    source: str

    def __init__(self, message: str, *, column: int, source: str, hint: str = "") -> None:
        super().__init__(f"selector column {column}: {message}", hint=hint)
        self.column = column
        self.source = source
        self.reason = message

    def caret(self, indent: str = "  ") -> str:
        """The source and a caret under the offending column, as two lines.

        Tabs and other control characters are shown as spaces so the caret lines up in a
        terminal; the caret column is the character column either way.
        """
        shown = "".join(" " if (ch.isspace() or not ch.isprintable()) else ch for ch in self.source)
        return f"{indent}{shown}\n{indent}{' ' * (self.column - 1)}^"

    def render(self, indent: str = "  ") -> str:
        """The message followed by :meth:`caret`: what a CLI prints to stderr."""
        return f"{self}\n{self.caret(indent)}"


class FleetSpecError(AegisError):
    """A fleet run's mode, error policy, deadline or canary is invalid.

    ``field`` names the CLI flag's concept (``mode``, ``on_error``, ``deadline``,
    ``canary``, ``tool``, ``selector``) so an API server can map it to a request field.
    """

    field: str

    def __init__(self, message: str, *, field: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.field = field


class NoTargets(FleetSpecError):
    """The selector left nothing to run on: nothing matched, or every match was skipped.

    ``resolution`` is the empty :class:`~aegis_edge_core.fleet.resolve.Resolution`; its
    ``skipped`` lists each matched daemon with the reason it cannot be a target.
    """

    resolution: Resolution

    def __init__(self, resolution: Resolution) -> None:
        selector = str(resolution.selector)
        if resolution.matched == 0:
            message = (
                f"selector {selector!r} matched no daemon ({resolution.considered} considered)"
            )
            hint = "check the tags and labels with 'aegis edge ls', or target 'all'"
        elif resolution.tool not in resolution.offered_tools and all(
            skip.reason.value == "tool_unavailable" for skip in resolution.skipped
        ):
            # Nobody has it: most likely a typo, and the fix is the name, not the hosts.
            message = (
                f"no daemon that selector {selector!r} matches offers a tool named "
                f"{resolution.tool!r}"
            )
            offered = sorted(resolution.offered_tools)
            close = difflib.get_close_matches(resolution.tool, offered, n=1)
            hint = f"they offer {', '.join(offered) or 'no tools'}" + (
                f"; did you mean {close[0]}?" if close else ""
            )
        else:
            by_reason = ", ".join(
                f"{count} {reason}" for reason, count in resolution.skipped_by_reason().items()
            )
            message = (
                f"selector {selector!r} matched {resolution.matched} "
                f"daemon{'s' if resolution.matched != 1 else ''} "
                f"but every one was skipped ({by_reason})"
            )
            hint = "'aegis edge fleet preview' lists each skipped daemon and its reason"
        super().__init__(message, field="selector", hint=hint)
        self.resolution = resolution


class FleetRecordError(AegisError):
    """A run record read back from storage is malformed; ``path`` names the bad key."""

    path: str

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(f"run record {path}: {message}" if path else f"run record: {message}")
        self.path = path


class RunFinished(AegisError):
    """A cancel for a run that is already over: there is nothing left to stop.

    Servers answer it with ``grpc_status`` (``FAILED_PRECONDITION``); the message names
    the run and how it ended, e.g. ``fleet run f-1 already finished (completed)``.
    """

    grpc_status = "FAILED_PRECONDITION"

    def __init__(self, fleet_command_id: str, outcome: str) -> None:
        super().__init__(f"fleet run {fleet_command_id} already finished ({outcome})")
        self.fleet_command_id = fleet_command_id
        self.outcome = outcome
