"""Ending an RPC with a refusal: the status code from the core's table, the reason in
``grpc-status-details-bin`` (the gRPC rich error model; see :mod:`aegis_edge_core.refusals`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Final, NoReturn

import attrs
import grpc
from grpc_status import rpc_status

from aegis_edge_core.refusals import rich_status

__all__ = [
    "OPEN_REFUSAL_READ_SECS",
    "Metadata",
    "RefusalStatus",
    "abort_refused",
    "refusal_status",
    "refuse_at_open",
]

Metadata = tuple[tuple[str, str | bytes], ...]

OPEN_REFUSAL_READ_SECS: Final = 1.0
"""How long a stream refused as it opens may keep the relay waiting for its first message."""


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


async def refuse_at_open(
    context: grpc.aio.ServicerContext[Any, Any],
    reason: str,
    message: str,
    now: Callable[[], float],
) -> NoReturn:
    """Refuse a stream as it opens, once its first message (the hello) is read, or after
    :data:`OPEN_REFUSAL_READ_SECS` without one.

    grpc's asyncio client loses the status when its write fails because the call already
    ended: the failed write overwrites it with its own ``INTERNAL`` "Internal error from
    Core", without the details (grpc/grpc#36066). A daemon writes its hello as it opens
    the call and nothing more until the relay answers, so a status sent after the hello
    was read can no longer meet a pending write. The wait is bounded because a stranger
    need send nothing, and such a stream is not counted against the handshake cap.
    """
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(context.read(), OPEN_REFUSAL_READ_SECS)
    await abort_refused(context, reason, message, now())
