"""The error types every part of the core raises.

Every error the core raises on bad input derives from :class:`AegisError` and carries a
human sentence (``str(err)``) plus a ``hint``: what the caller should do about it. Servers
print the sentence, log both, and never need to parse messages.

Protocol errors come in two flavours, after h11's ``_util.py``:

* :class:`LocalProtocolError` -- *you* (the code driving a session) did something the
  protocol does not allow: sending a command before the stream was accepted, accepting a
  daemon without a verified attestation. It is a bug in the caller; fix the caller.
* :class:`RemoteProtocolError` -- the *peer* sent something the protocol does not allow:
  garbage bytes, a message out of order, a duplicated hello. The right answer is to close
  that one stream with ``grpc_status`` and count it; the peer is at fault, not the server.

Identity, selector and configuration errors are separate families because callers answer
them differently (refuse with a reason, point at a column, name a YAML key).
"""

from __future__ import annotations

__all__ = [
    "AegisError",
    "ConfigError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
]


class AegisError(Exception):
    """Base of every error the core raises on bad input or misuse."""

    hint: str

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class ProtocolError(AegisError):
    """The stream protocol was violated; see the two subclasses for who is at fault.

    ``grpc_status`` names the gRPC status code (as its upper-case name, e.g.
    ``"INVALID_ARGUMENT"``) a server should close the stream with. It is a string so the
    core does not import grpc.
    """

    grpc_status: str

    def __init__(
        self, message: str, *, hint: str = "", grpc_status: str = "INVALID_ARGUMENT"
    ) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError, not ProtocolError")
        super().__init__(message, hint=hint)
        self.grpc_status = grpc_status


class LocalProtocolError(ProtocolError):
    """The caller misused a session: a bug on this side of the wire."""

    def __init__(
        self, message: str, *, hint: str = "", grpc_status: str = "FAILED_PRECONDITION"
    ) -> None:
        super().__init__(message, hint=hint, grpc_status=grpc_status)


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: close its stream with ``grpc_status`` and count it.

    ``reason`` is the refusal reason the close carries (``aegis_edge_core.refusals``):
    ``protocol_error``, or ``unsupported_version`` for a peer of another protocol version.
    """

    reason: str

    def __init__(
        self,
        message: str,
        *,
        hint: str = "",
        grpc_status: str = "INVALID_ARGUMENT",
        reason: str = "protocol_error",
    ) -> None:
        super().__init__(message, hint=hint, grpc_status=grpc_status)
        self.reason = reason


class ConfigError(AegisError):
    """A configuration value is invalid; ``path`` is the dotted key, e.g. ``tools.allow``."""

    def __init__(self, message: str, *, path: str = "", hint: str = "") -> None:
        super().__init__(f"{path}: {message}" if path else message, hint=hint)
        self.path = path
