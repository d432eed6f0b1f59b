"""Repeating a fleet run, and the tool arguments that are never kept: secrets.

A run's tool arguments are stored with it, so ``fleet show`` can say what ran and ``fleet
rerun`` can run it again. Some arguments must not be kept anywhere -- a password, an API
token -- so an operator marks them secret (``--secret-arg k=v``): their *values* go to the
daemons with the command and nowhere else (not the store, not a log line, not an answer);
only their *names* are kept, and every display shows :data:`SECRET_PLACEHOLDER` for them.
A rerun therefore needs each secret value again.

Rules
-----

* :func:`merge_secret_args` -- plain and secret arguments together make the command's
  arguments; a name given as both is refused (which one was meant?).
* :func:`check_rerun_secrets` -- a rerun must supply exactly the old run's secret names:
  a missing one is refused naming every missing name, an extra one naming it (it would
  silently change what runs).
* :func:`rerun_targets` -- which of the old run's targets run again (``--only``):

  ================  ==========================================================
  ``all``           every target of the old run (its skipped daemons are not
                    targets: they were never part of it)
  ``failed``        every target whose outcome is not ``ok`` (a failure, as for
                    ``--on-error``: error, timeout, cancelled, denied,
                    edge_disconnected, not_started)
  ``not_started``   the targets that never ran (halted, deadline, cancelled)
  ================  ==========================================================

  A run still running cannot be rerun (its outcomes are not final), and an empty choice
  is refused rather than started: "nothing ran" is never silent.
* :func:`rerun_selector` -- the new run targets exactly those node ids (``node=a,b``),
  not the old selector again: daemons that joined since were not part of the old run.

Nothing here does I/O; records and arguments come in as values.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Final

from aegis_edge_core.fleet.errors import FleetSpecError
from aegis_edge_core.fleet.outcomes import TargetOutcome
from aegis_edge_core.fleet.record import RunRecord
from aegis_edge_core.fleet.selector import NodeTerm, Selector

__all__ = [
    "SECRET_PLACEHOLDER",
    "RerunRefused",
    "RerunScope",
    "check_rerun_secrets",
    "merge_secret_args",
    "parse_rerun_scope",
    "redact_args",
    "rerun_selector",
    "rerun_targets",
]

SECRET_PLACEHOLDER: Final = "<secret>"  # noqa: S105 -- the placeholder, not a secret
"""What every display of a run shows in place of a secret argument's value."""


class RerunScope(enum.Enum):
    """``--only``: which targets of the old run run again."""

    ALL = "all"
    FAILED = "failed"
    NOT_STARTED = "not_started"


class RerunRefused(FleetSpecError):
    """The run cannot be rerun as asked (still running, nothing to rerun, arguments not
    stored). Not a malformed request: the run is in the wrong state for it, so a server
    answers FAILED_PRECONDITION."""


def parse_rerun_scope(text: str) -> RerunScope:
    """``all`` (also the empty string), ``failed`` or ``not_started`` (``not-started``)."""
    value = text.strip().replace("-", "_") or "all"
    try:
        return RerunScope(value)
    except ValueError:
        raise FleetSpecError(
            f"unknown rerun choice {text!r}",
            field="only",
            hint="use all, failed or not_started",
        ) from None


def merge_secret_args(
    args: Mapping[str, object], secrets: Mapping[str, object]
) -> dict[str, object]:
    """The arguments the daemons get: plain ``args`` plus ``secrets``."""
    both = sorted(set(args) & set(secrets))
    if both:
        raise FleetSpecError(
            f"argument {both[0]!r} is given both as a plain and as a secret argument",
            field="secret_args",
            hint="pass it once: --secret-arg if its value must not be stored",
        )
    return {**args, **secrets}


def check_rerun_secrets(
    fleet_command_id: str, expected: Iterable[str], given: Mapping[str, object]
) -> None:
    """Refuse a rerun that does not supply exactly the old run's secret argument names."""
    wanted = set(expected)
    missing = sorted(wanted - set(given))
    if missing:
        flags = " ".join(f"--secret-arg {name}=..." for name in missing)
        raise FleetSpecError(
            f"fleet run {fleet_command_id} had secret arguments that were not stored; "
            f"missing: {', '.join(missing)}",
            field="secret_args",
            hint=f"pass them again: {flags}",
        )
    extra = sorted(set(given) - wanted)
    if extra:
        raise FleetSpecError(
            f"not a secret argument of fleet run {fleet_command_id}: {', '.join(extra)}",
            field="secret_args",
            hint="a rerun takes the old run's arguments; only its secret ones are given again",
        )


def redact_args(args: Mapping[str, object], secret_keys: Iterable[str]) -> dict[str, object]:
    """``args`` for display, each secret name shown as :data:`SECRET_PLACEHOLDER`."""
    out = dict(args)
    for name in secret_keys:
        out[name] = SECRET_PLACEHOLDER
    return dict(sorted(out.items()))


def rerun_targets(record: RunRecord, scope: RerunScope) -> tuple[str, ...]:
    """The node ids of ``record``'s targets that ``scope`` picks, in plan order."""
    run_id = record.fleet_command_id
    if record.outcome is None:
        raise RerunRefused(
            f"fleet run {run_id} is still running; its outcomes are not final",
            field="fleet_command_id",
            hint=f"wait for it (aegis edge fleet watch {run_id}) or cancel it, then rerun",
        )
    if scope is RerunScope.ALL:
        picked = [t.node_id for t in record.targets]
    elif scope is RerunScope.FAILED:
        picked = [t.node_id for t in record.targets if t.outcome is not TargetOutcome.OK]
    else:
        picked = [t.node_id for t in record.targets if t.outcome is TargetOutcome.NOT_STARTED]
    if not picked:
        what = "targets" if scope is RerunScope.ALL else f"{scope.value} targets"
        raise RerunRefused(
            f"fleet run {run_id} has no {what}; nothing to rerun",
            field="only",
            hint="--only all reruns every target" if scope is not RerunScope.ALL else "",
        )
    return tuple(picked)


def rerun_selector(node_ids: Iterable[str]) -> Selector:
    """``node=<ids>`` as a selector (built directly: a long list is no typed selector and
    need not fit the parser's length bound)."""
    return Selector(terms=(NodeTerm(node_ids=tuple(node_ids)),))
