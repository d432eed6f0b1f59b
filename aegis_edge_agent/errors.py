"""Why the daemon stops or redials, and the exit codes it stops with."""

from __future__ import annotations

import grpc

from aegis_edge_core.refusals import Refusal, refusal_from_status

__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_REVOKED",
    "ConnectFailed",
    "Fatal",
    "Revoked",
    "refusal_of",
    "refused",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_REVOKED = 3


class Revoked(Exception):
    """The relay says this node is revoked: stop, do not retry."""


class Fatal(Exception):
    """Retrying cannot help (credentials gone or unreadable): stop with this message."""

    def __init__(self, message: str, *, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ConnectFailed(Exception):
    """This attempt failed; the reconnect loop tries again (after ``retry_after`` if set)."""

    def __init__(self, message: str, *, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def refusal_of(err: grpc.RpcError) -> Refusal | None:
    """The refusal in an RPC's status details (``grpc-status-details-bin``), or None: a
    relay too old to send one, or an end that is not a refusal."""
    # Imported on first use: grpc_status brings grpc.experimental and google.rpc along,
    # which a connected daemon holds for nothing until a call is refused.
    from grpc_status import rpc_status

    try:
        return refusal_from_status(rpc_status.from_call(err))  # type: ignore[arg-type]
    except ValueError:  # details that contradict the status: not to be trusted
        return None


def refused(refusal: Refusal) -> Revoked | ConnectFailed:
    """What a refusal means to the reconnect loop: REVOKED stops it, the rest retry."""
    if refusal.reason == "revoked":
        return Revoked(refusal.message or "revoked")
    return ConnectFailed(
        f"refused ({refusal.reason}): {refusal.message}", retry_after=refusal.retry_after_secs
    )
