"""One JSON representation of the Admin API's messages.

``aegis edge ... --output json`` prints these values, and the relay's HTTP API is to serve
the same ones, so a script written against one reads the other. The base is protobuf's
JSON mapping as :func:`google.protobuf.json_format.MessageToDict` gives it with
``preserving_proto_field_name=True, always_print_fields_with_no_presence=True``: proto
field names, every field present, nested messages and maps as objects. On that base a few
rules make every message read the same way:

* **Times.** A ``double`` named ``*_at`` or ``connected_since`` (seconds since the epoch)
  is ISO 8601 UTC with milliseconds, ``2025-01-02T03:04:05.678Z``; 0 (never) is ``null``.
* **Enums** by name without their prefix: a daemon status as the seed writes it
  (``Connected``, ``Revoked``), target and run outcomes in lower case (``ok``,
  ``edge_disconnected``, ``completed_with_errors``). A target outcome not in yet reads
  ``running`` once the target was dispatched, ``pending`` before; a run with none reads
  ``unknown``, a status ``Unknown``. A value too new to know reads like none.
* **Exit codes.** ``exit_code`` is ``null`` unless the call had one (``has_exit_code`` is
  folded into it and not shown).
* **Embedded JSON.** A ``*_json`` string is its parsed value under the name without
  ``_json`` (``result_json`` -> ``result``): ``null`` when empty, the string itself when it
  is not valid JSON.
* **Bytes** (output tails) are UTF-8 text, invalid bytes replaced; empty is ``null``.
* **Unset optional fields** (an id, reason or bound that may be absent) are ``null``, not
  ``""`` or 0; which fields are optional is listed per message below.
* **Sets** (a host's tools and tags) are sorted lists; maps are sorted by key.
* **Nested messages** are objects even when unset (``spec``, ``capabilities``: their
  fields at their defaults); of a ``oneof`` only the member that is set is shown, as in
  protobuf's mapping. 64-bit integers are decimal strings, as there too.

A few messages add or leave out keys: a target has ``duration_secs``; a run repeats its
spec's ``tool`` and ``selector``, has ``counts`` per outcome, and has no ``targets`` key
when the relay left the rows out (``targets_omitted``); a run's spec shows secret arguments
by name only (``<secret>``) and never the request-only fields. A host's command history and
a group's current members are shown only when asked for (``with_history``,
``with_members``), since only ``GetHost`` and ``GetGroup`` fill them.

:func:`message_to_dict` takes any Admin message; the ``*_to_dict`` functions are the same
with their message's type and options spelt out. All of them are pure: no clock, no I/O.

The base is built here from the descriptors rather than by calling ``MessageToDict`` and
rewriting its answer: json_format walks every field in Python and made a 10k-target run
five times slower to show (475 ms against 92 ms), a cost the relay's HTTP API would pay
on its event loop. ``tests/relay/test_operator_jsonrepr.py`` holds the two together: for
every Admin message, the same keys and, for every field the rules leave alone, the same
values as ``MessageToDict``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, cast

from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from aegis_edge_core.fleet.rerun import redact_args
from aegis_edge_core.wire import admin_pb2, common_pb2

__all__ = [
    "command_record_to_dict",
    "fleet_preview_to_dict",
    "fleet_run_to_dict",
    "group_to_dict",
    "host_to_dict",
    "iso_time",
    "message_to_dict",
    "outcome_counts",
    "result_value",
    "run_outcome_name",
    "skipped_to_dict",
    "status_name",
    "target_outcome_name",
    "target_result_to_dict",
    "tenant_deleted_to_dict",
]

# --------------------------------------------------------------------------------------------
# Scalars
# --------------------------------------------------------------------------------------------


def iso_time(ts: float) -> str | None:
    """Seconds since the epoch as ISO 8601 UTC (``2025-01-02T03:04:05.678Z``); 0 is None."""
    if not ts or not math.isfinite(ts) or ts < 0:
        return None
    try:
        moment = datetime.fromtimestamp(ts, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _short_name(enum: EnumDescriptor, value: int) -> str | None:
    """``TARGET_OUTCOME_EDGE_DISCONNECTED`` -> ``edge_disconnected``; None for UNSPECIFIED
    and for a number this build does not know (the wire's rule: treat it like UNSPECIFIED)."""
    known = enum.values_by_number.get(value)
    if known is None or value == 0:
        return None
    prefix = enum.values_by_number[0].name.removesuffix("UNSPECIFIED")
    return known.name.removeprefix(prefix).lower()


def status_name(status: int) -> str:
    """``DaemonStatus`` as the seed's status pill; an unknown value reads ``Unknown``."""
    name = _short_name(common_pb2.DaemonStatus.DESCRIPTOR, status)
    return name.capitalize() if name else "Unknown"


def target_outcome_name(outcome: int, *, dispatched: bool = False) -> str:
    """``TargetOutcome`` as its wire string.

    UNSPECIFIED (or a value too new to know) means the target has not ended yet: it reads
    ``running`` once dispatched and ``pending`` before.
    """
    name = _short_name(common_pb2.TargetOutcome.DESCRIPTOR, outcome)
    if name is not None:
        return name
    return "running" if dispatched else "pending"


def run_outcome_name(outcome: int) -> str:
    """``RunOutcome`` as its wire string; UNSPECIFIED (or unknown) reads ``unknown``."""
    return _short_name(common_pb2.RunOutcome.DESCRIPTOR, outcome) or "unknown"


def result_value(result_json: str) -> Any:
    """A ``*_json`` field as a JSON value (``None`` when empty); a string that is not valid
    JSON is kept as the string."""
    if not result_json:
        return None
    try:
        return json.loads(result_json)
    except ValueError:
        return result_json


def outcome_counts(run: admin_pb2.FleetRun) -> dict[str, int]:
    """Targets per outcome name, sorted by name: counted from the rows, or the relay's
    ``counts`` when it left the rows out."""
    if run.targets_omitted:
        return dict(sorted(run.counts.items()))
    counts: dict[str, int] = {}
    for res in run.targets:
        name = target_outcome_name(res.outcome, dispatched=res.dispatched_at > 0)
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------------------------
# The rules, per message
# --------------------------------------------------------------------------------------------

_Finish = Callable[[Any, dict[str, Any]], None]


@dataclass(frozen=True)
class _Shape:
    optional: frozenset[str] = frozenset()
    """Fields shown as ``null`` when unset (empty string, 0)."""
    hidden: frozenset[str] = frozenset()
    """Fields never shown (request-only, or shown only on request)."""
    sets: frozenset[str] = frozenset()
    """Repeated fields whose order means nothing: shown sorted."""
    finish: _Finish | None = None
    """Derived keys, after the rules."""


def _finish_target(res: admin_pb2.TargetResult, out: dict[str, Any]) -> None:
    both = res.dispatched_at and res.finished_at
    out["duration_secs"] = round(res.finished_at - res.dispatched_at, 6) if both else None


def _finish_spec(spec: admin_pb2.FleetRunSpec, out: dict[str, Any]) -> None:
    args = out["args"]
    if args is None:
        args = {}
    if isinstance(args, dict):
        args = redact_args(args, spec.secret_keys)
    out["args"] = args
    out["secret_args"] = sorted(spec.secret_keys)
    out["mode"] = spec.mode or "all"
    out["on_error"] = spec.on_error or "continue"


def _finish_run(run: admin_pb2.FleetRun, out: dict[str, Any]) -> None:
    out["tool"] = out["spec"]["tool"]
    out["selector"] = out["spec"]["selector"]
    out["counts"] = outcome_counts(run)
    if run.targets_omitted:
        del out["targets"]  # left out by the relay, never an empty list


_SHAPES: Final[Mapping[str, _Shape]] = {
    "aegis.edge.v1.Capabilities": _Shape(sets=frozenset({"tools", "tags"})),
    "aegis.edge.v1.Host": _Shape(
        optional=frozenset({"key_thumbprint", "revoked_reason"}),
        hidden=frozenset({"history"}),
    ),
    "aegis.edge.v1.CommandRecord": _Shape(
        optional=frozenset({"fleet_command_id", "error_message"})
    ),
    "aegis.edge.v1.TargetResult": _Shape(
        optional=frozenset({"tenant_id", "command_id", "error_message", "skip_reason", "ended_by"}),
        finish=_finish_target,
    ),
    "aegis.edge.v1.FleetRunSpec": _Shape(
        optional=frozenset({"deadline_secs", "canary", "tenant_id"}),
        hidden=frozenset({"secret_args_json", "secret_keys", "follow_output"}),
        finish=_finish_spec,
    ),
    "aegis.edge.v1.FleetRun": _Shape(
        optional=frozenset({"created_by", "trace_id", "halt_reason", "rerun_of"}),
        hidden=frozenset({"targets_omitted"}),
        finish=_finish_run,
    ),
    "aegis.edge.v1.Group": _Shape(
        optional=frozenset({"created_by"}), hidden=frozenset({"members", "missing"})
    ),
}
_PLAIN: Final = _Shape()


_Getter = Callable[[Any], Any]


def _is_time(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_DOUBLE and (
        field.name.endswith("_at") or field.name == "connected_since"
    )


def _text(data: bytes) -> str | None:
    return data.decode("utf-8", errors="replace") if data else None


def _enum_getter(field: FieldDescriptor, name: str, siblings: Mapping[str, Any]) -> _Getter:
    enum = field.enum_type
    assert enum is not None  # an enum field always has its type
    if enum is common_pb2.DaemonStatus.DESCRIPTOR:
        return lambda m: status_name(getattr(m, name))
    if enum is common_pb2.TargetOutcome.DESCRIPTOR:
        if "dispatched_at" in siblings:
            return lambda m: target_outcome_name(getattr(m, name), dispatched=m.dispatched_at > 0)
        return lambda m: target_outcome_name(getattr(m, name))
    if enum is common_pb2.RunOutcome.DESCRIPTOR:
        return lambda m: run_outcome_name(getattr(m, name))
    return lambda m: _short_name(enum, getattr(m, name)) or "unspecified"


def _getter(field: FieldDescriptor, shape: _Shape, siblings: Mapping[str, Any]) -> _Getter:
    """How one field is shown, decided once per field from its descriptor, its message's
    other fields (``siblings``, by name) and the rules."""
    name = field.name
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        if field.message_type.fields_by_name["value"].message_type is not None:
            return lambda m: {k: _shaped(v) for k, v in sorted(getattr(m, name).items())}
        return lambda m: dict(sorted(getattr(m, name).items()))
    if field.message_type is not None and field.is_repeated:
        return lambda m: [_shaped(item) for item in getattr(m, name)]
    if field.message_type is not None:
        return lambda m: _shaped(getattr(m, name))  # unset: its fields at their defaults
    if field.is_repeated:
        if name in shape.sets:
            return lambda m: sorted(getattr(m, name))
        return lambda m: list(getattr(m, name))
    if name.endswith("_json") and field.type == FieldDescriptor.TYPE_STRING:
        return lambda m: result_value(getattr(m, name))
    if f"has_{name}" in siblings:
        has = f"has_{name}"
        return lambda m: getattr(m, name) if getattr(m, has) else None
    if field.type == FieldDescriptor.TYPE_ENUM:
        return _enum_getter(field, name, siblings)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return lambda m: _text(getattr(m, name))
    if _is_time(field):
        return lambda m: iso_time(getattr(m, name))
    if name in shape.optional:
        return lambda m: getattr(m, name) or None
    if field.cpp_type in (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64):
        return lambda m: str(getattr(m, name))  # proto3 JSON: past 2**53 a double cannot
    return lambda m: getattr(m, name)


@dataclass(frozen=True)
class _Plan:
    getters: tuple[tuple[str, _Getter], ...]
    """(key, getter) of every field shown, but oneof members."""
    oneofs: tuple[tuple[str, Mapping[str, _Getter]], ...]
    """Per oneof: its name, and the getter of each member shown (only the set one is)."""
    finish: _Finish | None


_PLANS: dict[str, _Plan] = {}
"""Per message type, built on first use."""


def _plan(message: Message) -> _Plan:
    descriptor = message.DESCRIPTOR
    plan = _PLANS.get(descriptor.full_name)
    if plan is None:
        shape = _SHAPES.get(descriptor.full_name, _PLAIN)
        fields = descriptor.fields_by_name
        shown = [
            field
            for field in cast("list[FieldDescriptor]", descriptor.fields)
            if field.name not in shape.hidden
            and not (field.name.startswith("has_") and field.name[4:] in fields)
        ]
        plan = _PLANS[descriptor.full_name] = _Plan(
            getters=tuple(
                (field.name.removesuffix("_json"), _getter(field, shape, fields))
                for field in shown
                if field.containing_oneof is None
            ),
            oneofs=tuple(
                (
                    oneof.name,
                    {f.name: _getter(f, shape, fields) for f in oneof.fields if f in shown},
                )
                for oneof in descriptor.oneofs
            ),
            finish=shape.finish,
        )
    return plan


def _shaped(message: Message) -> dict[str, Any]:
    plan = _plan(message)
    out = {key: get(message) for key, get in plan.getters}
    for oneof, members in plan.oneofs:
        which = message.WhichOneof(oneof)
        if which in members:
            out[which] = members[which](message)
    if plan.finish is not None:
        plan.finish(message, out)
    return out


def message_to_dict(message: Message) -> dict[str, Any]:
    """Any Admin API message as its JSON object, by the rules in the module docstring."""
    return _shaped(message)


# --------------------------------------------------------------------------------------------
# Per message, typed
# --------------------------------------------------------------------------------------------


def host_to_dict(host: admin_pb2.Host, *, with_history: bool = False) -> dict[str, Any]:
    """One host as ``ls --output json`` and ``show --output json`` print it; ``history``
    (newest first, only ``GetHost`` fills it) with ``with_history``."""
    out = message_to_dict(host)
    if with_history:
        out["history"] = [command_record_to_dict(rec) for rec in host.history]
    return out


def command_record_to_dict(rec: admin_pb2.CommandRecord) -> dict[str, Any]:
    """One entry of a host's command history."""
    return message_to_dict(rec)


def target_result_to_dict(res: admin_pb2.TargetResult) -> dict[str, Any]:
    """One target of a fleet run, with ``duration_secs`` once it has both ends."""
    return message_to_dict(res)


def skipped_to_dict(skip: admin_pb2.SkippedTarget) -> dict[str, Any]:
    """A matched daemon that was not targeted: ``node_id`` and ``reason``."""
    return message_to_dict(skip)


def fleet_run_to_dict(run: admin_pb2.FleetRun) -> dict[str, Any]:
    """A run as ``fleet run|show|runs --output json`` print it.

    ``fleet runs`` gets runs without per-target rows (``targets_omitted``): then the
    ``targets`` key is left out, never printed as an empty list, and ``counts`` comes
    from the relay.
    """
    return message_to_dict(run)


def fleet_preview_to_dict(preview: admin_pb2.FleetPreview) -> dict[str, Any]:
    """A dry run: the canonical ``selector``, how many daemons it ``matched``, the
    ``targets`` and the ``skipped`` with their reasons."""
    return message_to_dict(preview)


def tenant_deleted_to_dict(tenant_id: str, resp: admin_pb2.DeleteTenantResponse) -> dict[str, Any]:
    """``tenants delete``: the tenant (the request names it, the response does not) and
    ``revoked_daemons``."""
    return {"tenant_id": tenant_id, **message_to_dict(resp)}


def group_to_dict(group: admin_pb2.Group, *, with_members: bool = False) -> dict[str, Any]:
    """A group as ``groups ls|show --output json`` print it; ``members`` and ``missing``
    (only ``GetGroup`` fills them) with ``with_members``."""
    out = message_to_dict(group)
    if with_members:
        out["members"] = list(group.members)
        out["missing"] = list(group.missing)
    return out
