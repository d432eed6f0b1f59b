"""Ending an RPC with a refusal: the status code from the core's table, the reason in
``grpc-status-details-bin`` (the gRPC rich error model; see :mod:`aegis_edge_core.refusals`)."""

from __future__ import annotations

from typing import Any, NoReturn

import attrs
import grpc
from grpc_status import rpc_status

from aegis_edge_core.refusals import rich_status

__all__ = ["Metadata", "RefusalStatus", "abort_refused", "refusal_status"]

Metadata = tuple[tuple[str, str | bytes], ...]


@attrs.frozen
class RefusalStatus:
    """What ``context.abort`` takes: code, message and trailing metadata."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: Metadata


def refusal_status(
    reason: str,
    message: str,
    now: float,
    *,
    retry_after_secs: float = 0.0,
    code: str | None = None,
    extra_metadata: Metadata = (),
) -> RefusalStatus:
    """The status a refusal for ``reason`` ends its RPC with."""
    status = rpc_status.to_status(
        rich_status(reason, message, relay_time=now, retry_after_secs=retry_after_secs, code=code)
    )
    return RefusalStatus(
        status.code, status.details, tuple(status.trailing_metadata) + extra_metadata
    )


async def abort_refused(
    context: grpc.aio.ServicerContext[Any, Any],
    reason: str,
    message: str,
    now: float,
    *,
    retry_after_secs: float = 0.0,
    extra_metadata: Metadata = (),
) -> NoReturn:
    """End the call with the refusal (``context.abort`` raises)."""
    st = refusal_status(
        reason, message, now, retry_after_secs=retry_after_secs, extra_metadata=extra_metadata
    )
    await context.abort(st.code, st.details, st.trailing_metadata)
    raise AssertionError("unreachable: abort raises")
