"""The fleet vocabularies on the wire, and what of a daemon's result is kept.

The relay answers in ``aegis.edge.v1`` enums and reads daemons' ``CommandResult`` messages;
these tables are the one mapping between them and :mod:`~aegis_edge_core.fleet.outcomes`,
so every server (and every embedder) names an outcome or a status the same way::

    outcome = outcome_of(result)               # TargetOutcome, from a CommandResult
    PROTO_OUTCOME[outcome]                     # -> common_pb2.TARGET_OUTCOME_*
    stored_outcome_proto("ok")                 # a history row's string -> enum (0 if unknown)
    capped_result(result.result_json)          # the result kept in history and records
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from aegis_edge_core.fleet.outcomes import DaemonStatus, TargetOutcome
from aegis_edge_core.wire import common_pb2, stream_pb2

__all__ = [
    "PROTO_OUTCOME",
    "PROTO_RUN_OUTCOME",
    "PROTO_STATUS",
    "RESULT_CAP",
    "capped_result",
    "outcome_of",
    "stored_outcome_proto",
]

RESULT_CAP: Final = 64 * 1024
"""The largest tool result (``result_json``) kept in history and run records; a larger one
is replaced by a note saying how large it was (a cut JSON document is no document)."""

_OUTCOME_BY_PROTO: Final = MappingProxyType(
    {
        common_pb2.TARGET_OUTCOME_OK: TargetOutcome.OK,
        common_pb2.TARGET_OUTCOME_ERROR: TargetOutcome.ERROR,
        common_pb2.TARGET_OUTCOME_TIMEOUT: TargetOutcome.TIMEOUT,
        common_pb2.TARGET_OUTCOME_CANCELLED: TargetOutcome.CANCELLED,
        common_pb2.TARGET_OUTCOME_DENIED: TargetOutcome.DENIED,
        common_pb2.TARGET_OUTCOME_EDGE_DISCONNECTED: TargetOutcome.EDGE_DISCONNECTED,
    }
)
# Daemons that predate the outcome field say only how the call ended.
_OUTCOME_BY_KIND: Final = MappingProxyType(
    {
        stream_pb2.ERROR_KIND_OK: TargetOutcome.OK,
        stream_pb2.ERROR_KIND_TIMEOUT: TargetOutcome.TIMEOUT,
        stream_pb2.ERROR_KIND_CANCELLED: TargetOutcome.CANCELLED,
        stream_pb2.ERROR_KIND_DENIED: TargetOutcome.DENIED,
    }
)

PROTO_OUTCOME: Final[Mapping[TargetOutcome, common_pb2.TargetOutcome.ValueType]] = MappingProxyType(
    {
        TargetOutcome.OK: common_pb2.TARGET_OUTCOME_OK,
        TargetOutcome.ERROR: common_pb2.TARGET_OUTCOME_ERROR,
        TargetOutcome.TIMEOUT: common_pb2.TARGET_OUTCOME_TIMEOUT,
        TargetOutcome.CANCELLED: common_pb2.TARGET_OUTCOME_CANCELLED,
        TargetOutcome.DENIED: common_pb2.TARGET_OUTCOME_DENIED,
        TargetOutcome.EDGE_DISCONNECTED: common_pb2.TARGET_OUTCOME_EDGE_DISCONNECTED,
        TargetOutcome.NOT_STARTED: common_pb2.TARGET_OUTCOME_NOT_STARTED,
    }
)
PROTO_RUN_OUTCOME: Final[Mapping[str, common_pb2.RunOutcome.ValueType]] = MappingProxyType(
    {
        "running": common_pb2.RUN_OUTCOME_RUNNING,
        "completed": common_pb2.RUN_OUTCOME_COMPLETED,
        "completed_with_errors": common_pb2.RUN_OUTCOME_COMPLETED_WITH_ERRORS,
        "halted": common_pb2.RUN_OUTCOME_HALTED,
        "deadline_exceeded": common_pb2.RUN_OUTCOME_DEADLINE_EXCEEDED,
        "cancelled": common_pb2.RUN_OUTCOME_CANCELLED,
    }
)
"""Run outcomes by value, with ``running`` for a run that has none yet."""
PROTO_STATUS: Final[Mapping[DaemonStatus, common_pb2.DaemonStatus.ValueType]] = MappingProxyType(
    {
        DaemonStatus.CONNECTED: common_pb2.DAEMON_STATUS_CONNECTED,
        DaemonStatus.UNHEALTHY: common_pb2.DAEMON_STATUS_UNHEALTHY,
        DaemonStatus.DISCONNECTED: common_pb2.DAEMON_STATUS_DISCONNECTED,
        DaemonStatus.REVOKED: common_pb2.DAEMON_STATUS_REVOKED,
    }
)


def outcome_of(result: stream_pb2.CommandResult) -> TargetOutcome:
    """The target outcome a daemon's result stands for (its ``error_kind`` if unset)."""
    outcome = _OUTCOME_BY_PROTO.get(result.outcome)
    if outcome is not None:
        return outcome
    return _OUTCOME_BY_KIND.get(result.error_kind, TargetOutcome.ERROR)


def stored_outcome_proto(value: str | None) -> common_pb2.TargetOutcome.ValueType:
    """A stored outcome string as the wire enum; unset (0) for none or one this version
    does not know (a row written by a newer relay)."""
    if not value:
        return common_pb2.TARGET_OUTCOME_UNSPECIFIED
    try:
        return PROTO_OUTCOME[TargetOutcome(value)]
    except ValueError:
        return common_pb2.TARGET_OUTCOME_UNSPECIFIED


def capped_result(result_json: str) -> str:
    """The tool's result as kept: as reported, or a note when over :data:`RESULT_CAP`."""
    size = len(result_json.encode("utf-8", "replace"))
    if size <= RESULT_CAP:
        return result_json
    return json.dumps({"result_too_large": {"bytes": size, "limit": RESULT_CAP}})
