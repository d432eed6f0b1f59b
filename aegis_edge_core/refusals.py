"""Refusals as the wire carries them: the reason, its gRPC status code, the rich status.

Theory of operation
-------------------
A relay refuses a host in one of two ways. During the stream handshake it sends the
in-band ``Refused`` message; whenever it ends an RPC with a non-OK status because of a
refusal (every enrollment refusal, a stream refused at open, a handshake that timed out,
an attestation refused, a stream cut because its node was revoked or replaced...), the
status carries the reason machine-readably in the gRPC rich error model:

* trailing metadata ``grpc-status-details-bin`` holds a serialized ``google.rpc.Status``
  whose ``code`` and ``message`` are the RPC's own status code and message, and
* its ``details[0]`` is a ``google.protobuf.Any`` packing ``aegis.edge.v1.Refused``
  (reason, the same message, the relay's clock, and how long to wait before retrying).

So a client in any language reads the reason without parsing English. The status code of
each reason is :data:`REFUSAL_STATUS`, the one table both ends (and docs/protocol.md)
follow; a protocol violation (reason ``protocol_error``) keeps the finer code the session
chose: ``INVALID_ARGUMENT``, ``FAILED_PRECONDITION`` for a message out of order,
``RESOURCE_EXHAUSTED`` for an oversized one.

Reasons are the lower-case names of ``RefusalReason`` without the prefix (``revoked`` is
``REFUSAL_REASON_REVOKED``). A reason this build does not know (a newer relay) reads as
``unspecified``: treat it like any refusal that is not ``revoked`` and retry with backoff.

The relay and the daemon do the gRPC part (``grpc_status.rpc_status``); this module only
builds and reads the messages, and does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import attrs
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from aegis_edge_core.errors import LocalProtocolError
from aegis_edge_core.wire import common_pb2, stream_pb2

__all__ = [
    "DETAILS_METADATA_KEY",
    "REFUSAL_STATUS",
    "Refusal",
    "reason_name",
    "reason_value",
    "refusal_from_status",
    "rich_status",
    "status_code_for",
]

DETAILS_METADATA_KEY: Final = "grpc-status-details-bin"
"""The trailing metadata key of the gRPC rich error model."""

_PREFIX: Final = "REFUSAL_REASON_"

# gRPC status codes by name, with the numeric value google.rpc.Status carries (the core
# does not import grpc; these numbers are fixed by the gRPC specification).
_CODES: Final[Mapping[str, int]] = {
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "UNAVAILABLE": 14,
    "UNAUTHENTICATED": 16,
}

REFUSAL_STATUS: Final[Mapping[str, str]] = {
    # The credential itself does not hold: the host must fix its clock or re-enroll.
    "expired": "UNAUTHENTICATED",
    "not_yet_valid": "UNAUTHENTICATED",
    "bad_signature": "UNAUTHENTICATED",
    "wrong_audience": "UNAUTHENTICATED",
    "clock_skew": "UNAUTHENTICATED",
    # The credential holds but this host may not: retrying cannot help.
    "revoked": "PERMISSION_DENIED",
    "unknown_node": "PERMISSION_DENIED",
    "key_mismatch": "PERMISSION_DENIED",
    "wrong_tenant": "PERMISSION_DENIED",
    "replayed": "ALREADY_EXISTS",
    "malformed": "INVALID_ARGUMENT",
    "protocol_error": "INVALID_ARGUMENT",
    "unsupported_version": "INVALID_ARGUMENT",
    # Transient: retry, after retry_after_secs when it is set.
    "rate_limited": "RESOURCE_EXHAUSTED",
    "too_many_unattested": "RESOURCE_EXHAUSTED",
    "handshake_timeout": "DEADLINE_EXCEEDED",
    "unavailable": "UNAVAILABLE",
    "replaced": "ABORTED",
}
"""The gRPC status code (upper-case name) an RPC ends with when refused for each reason."""


@attrs.frozen(kw_only=True)
class Refusal:
    """A refusal read back from the wire."""

    reason: str
    """Lower-case ``RefusalReason`` name; ``unspecified`` for one this build does not know."""
    message: str
    relay_time: float = 0.0
    retry_after_secs: float = 0.0


def reason_value(reason: str) -> common_pb2.RefusalReason.ValueType:
    """The ``RefusalReason`` enum value of a lower-case reason name."""
    try:
        return common_pb2.RefusalReason.Value(_PREFIX + reason.upper())
    except ValueError:
        raise LocalProtocolError(
            f"unknown refusal reason {reason!r}",
            hint="use one of the RefusalReason names in common.proto, lower-case",
        ) from None


def reason_name(value: int) -> str:
    """The lower-case name of a ``RefusalReason`` value (``unspecified`` if unknown)."""
    try:
        return common_pb2.RefusalReason.Name(value)[len(_PREFIX) :].lower()  # type: ignore[arg-type]
    except ValueError:
        return "unspecified"


def status_code_for(reason: str) -> str:
    """The gRPC status code name of a refusal for ``reason``."""
    reason_value(reason)  # an unknown reason is a bug in the caller, named here
    return REFUSAL_STATUS.get(reason, "PERMISSION_DENIED")


def rich_status(
    reason: str,
    message: str,
    *,
    relay_time: float,
    retry_after_secs: float = 0.0,
    code: str | None = None,
) -> Any:
    """The ``google.rpc.Status`` for a refusal; ``code`` overrides the table's code (a
    protocol violation's finer code). Its ``code`` and ``message`` must be the RPC's own."""
    name = code or status_code_for(reason)
    if name not in _CODES:
        raise LocalProtocolError(
            f"status code {name!r} is not one refusals use", hint=f"one of {sorted(_CODES)}"
        )
    refused = stream_pb2.Refused(
        reason=reason_value(reason),
        message=message,
        relay_time=relay_time,
        retry_after_secs=retry_after_secs,
    )
    status = status_pb2.Status(code=_CODES[name], message=message)
    status.details.add().Pack(refused)
    return status


def refusal_from_status(status: Any) -> Refusal | None:
    """The refusal a ``google.rpc.Status`` (or its serialized bytes, the value of
    ``grpc-status-details-bin``) carries; None when it carries none: an older relay, or a
    status that is not a refusal."""
    if status is None:
        return None
    if isinstance(status, bytes):
        try:
            status = status_pb2.Status.FromString(status)
        except DecodeError:
            return None
    for detail in status.details:
        if detail.Is(stream_pb2.Refused.DESCRIPTOR):
            refused = stream_pb2.Refused()
            if not detail.Unpack(refused):
                return None
            return Refusal(
                reason=reason_name(refused.reason),
                message=refused.message or str(status.message),
                relay_time=refused.relay_time,
                retry_after_secs=refused.retry_after_secs,
            )
    return None
