"""Sans-I/O sessions for both ends of the daemon stream.

Theory of operation
===================

A daemon holds one bidirectional gRPC stream to its relay (``EdgeStream.Connect``). Each
end of that stream is driven by a session object that owns the protocol state and nothing
else: it never reads a socket, a clock or a random source. The server shell around it

1. feeds every received message (or the raw frame bytes) into ``receive``/``receive_bytes``
   together with ``now``, and acts on the returned :class:`Event` values;
2. calls the session's send methods (``challenge``, ``accept``, ``send_command``,
   ``heartbeat``, ...) when it decides to say something, and
3. writes out whatever :meth:`messages_to_send` returns, in order.

A message that is not allowed in the current state -- out of order, duplicated, unknown,
malformed or oversized -- raises :class:`~aegis_edge_core.errors.RemoteProtocolError` and
moves the session to ``CLOSED``; the shell closes that one stream with the error's
``grpc_status``. Calling a send method that the state does not allow raises
:class:`~aegis_edge_core.errors.LocalProtocolError` and leaves the state unchanged: it is
a bug in the caller, not in the peer.

The handshake::

    daemon: IDLE --hello()--> HELLO_SENT --Challenge--> CHALLENGED --attest()--> ATTESTING
            --Accepted--> ACCEPTED --Drain--> DRAINING --close()--> CLOSED
    relay:  AWAITING_HELLO --Hello--> HELLO_RECEIVED --challenge()--> CHALLENGED
            --AttestationResponse--> ATTESTED --accept(verified)--> ACCEPTED
            --drain()--> DRAINING --close()--> CLOSED

``accept`` takes a :class:`~aegis_edge_core.identity.attestation.VerifiedAttestation`,
which only :func:`~aegis_edge_core.identity.attestation.verify_attestation` produces, and
checks that it was made for *this* session's nonce and node: a relay session cannot reach
``ACCEPTED`` without a valid attestation step. ``refuse`` ends the handshake with a named
reason at any point before ``ACCEPTED``.

Once accepted, heartbeats are acknowledged by the relay session itself (the ack is part of
the protocol, not a decision), while results are acknowledged by the shell with
:meth:`RelaySession.ack_results` only after it has stored them: the daemon forgets a result
only once it is acked, so a result is never lost to a stream that drops in between.

Optional features (:mod:`aegis_edge_core.handshake`) are offered in the daemon's hello and
named back in ``accept``; the relay may only use what was offered. With
``heartbeat-ack-coalesce`` (or ``heartbeat-keepalive``, which needs the daemon's
``Hello.keepalive_secs`` within the stall bound) the relay session acks one heartbeat in
``heartbeat_ack_every`` (an ack of seq N covers every earlier one); with
``result-ack-batch`` one ``ResultAck`` names several results. Either way the daemon
session reports one :class:`ResultAcked` per result, so nothing past the session changes
with them.

A capability snapshot (in the hello or a CapabilityUpdate) over the bounds of
:mod:`aegis_edge_core.capability_limits` is a protocol error too (``RESOURCE_EXHAUSTED``,
the error naming the field and the limit): the relay session raises before the shell
sees an event, so nothing of it is stored, and the daemon session refuses to send one.

Both sides track the commands dispatched on this stream. A result or output for a command
that was not dispatched on this stream is legal -- it finished while the daemon was
disconnected and is delivered late -- and is reported with ``known=False``. A second result
for a command already answered on this stream is a protocol error.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, Generic, TypeVar

import attrs
from google.protobuf.message import DecodeError

from aegis_edge_core import PROTOCOL_VERSION
from aegis_edge_core.capability_limits import (
    DEFAULT_CAPABILITY_LIMITS,
    CapabilityError,
    CapabilityLimits,
    check_capabilities,
)
from aegis_edge_core.errors import LocalProtocolError, RemoteProtocolError
from aegis_edge_core.handshake import (
    HEARTBEAT_ACK_COALESCE,
    HEARTBEAT_KEEPALIVE,
    RESULT_ACK_BATCH,
    RESULT_ACK_DEFERRED,
    keepalive_fits,
    negotiate,
)
from aegis_edge_core.identity.attestation import VerifiedAttestation
from aegis_edge_core.refusals import reason_name, reason_value
from aegis_edge_core.wire import common_pb2, stream_pb2

__all__ = [
    "MAX_MESSAGE_BYTES",
    "AttestationReceived",
    "CancelRequested",
    "CapabilitiesChanged",
    "ChallengeReceived",
    "CommandReceived",
    "DaemonSession",
    "DaemonState",
    "Drained",
    "Event",
    "HeartbeatAcked",
    "HeartbeatReceived",
    "HelloReceived",
    "KeyRotated",
    "OutputReceived",
    "Refused",
    "RelaySession",
    "RelayState",
    "ResultAcked",
    "ResultReceived",
    "Revoked",
    "RotateKeyRequested",
    "SessionAccepted",
    "TokenRefreshRequested",
    "TokenRefreshed",
]

MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
"""Default cap on one frame; a larger one closes the stream with RESOURCE_EXHAUSTED."""

_ACKS_COALESCED: Final = frozenset({HEARTBEAT_ACK_COALESCE, HEARTBEAT_KEEPALIVE})
"""Either feature lets one heartbeat ack cover ``heartbeat_ack_every`` beats."""


class DaemonState(enum.Enum):
    IDLE = "idle"
    HELLO_SENT = "hello_sent"
    CHALLENGED = "challenged"
    ATTESTING = "attesting"
    ACCEPTED = "accepted"
    DRAINING = "draining"
    CLOSED = "closed"


class RelayState(enum.Enum):
    AWAITING_HELLO = "awaiting_hello"
    HELLO_RECEIVED = "hello_received"
    CHALLENGED = "challenged"
    ATTESTED = "attested"
    ACCEPTED = "accepted"
    DRAINING = "draining"
    CLOSED = "closed"


# --------------------------------------------------------------------------- events


@attrs.frozen(kw_only=True)
class Event:
    """Base of everything ``receive`` returns."""


# relay side


@attrs.frozen(kw_only=True)
class HelloReceived(Event):
    node_id: str
    node_token: str = attrs.field(repr=False)
    capabilities: common_pb2.Capabilities
    host_time: float
    control: bool
    """A CONTROL session (``aegis edge keys rotate``) never takes commands."""
    features: tuple[str, ...] = ()
    """The optional features the daemon offered that this code knows (sorted)."""
    keepalive_secs: float = 0.0
    """How soon the daemon's channel notices a silent relay (``heartbeat-keepalive``)."""


@attrs.frozen(kw_only=True)
class AttestationReceived(Event):
    signature: bytes = attrs.field(repr=False)
    nonce: bytes
    """The nonce this session challenged with; pass it to ``verify_attestation``."""


@attrs.frozen(kw_only=True)
class HeartbeatReceived(Event):
    seq: int
    host_time: float
    inflight: int
    token_jti: str = ""
    """Set when the daemon acknowledges having stored the node token with this ``jti``."""


@attrs.frozen(kw_only=True)
class CapabilitiesChanged(Event):
    capabilities: common_pb2.Capabilities


@attrs.frozen(kw_only=True)
class OutputReceived(Event):
    command_id: str
    seq: int
    stdout: bytes
    stderr: bytes
    known: bool


@attrs.frozen(kw_only=True)
class ResultReceived(Event):
    result: stream_pb2.CommandResult
    known: bool
    """False for a result of a command dispatched on an earlier stream (delivered late)."""


@attrs.frozen(kw_only=True)
class RotateKeyRequested(Event):
    new_public_key: bytes
    old_key_signature: bytes = attrs.field(repr=False)
    new_key_signature: bytes = attrs.field(repr=False)
    nonce: bytes


@attrs.frozen(kw_only=True)
class TokenRefreshRequested(Event):
    pass


# daemon side


@attrs.frozen(kw_only=True)
class ChallengeReceived(Event):
    nonce: bytes
    relay_time: float


@attrs.frozen(kw_only=True)
class SessionAccepted(Event):
    node_id: str
    tenant_id: str
    heartbeat_interval_secs: float
    stale_threshold_secs: float
    node_token: str = attrs.field(repr=False)
    """Empty unless the relay handed out a fresh token."""
    token_expires_at: float
    max_concurrent_commands: int
    relay_time: float
    relay_endpoints: tuple[str, ...] = ()
    """The cluster's relay endpoints; empty from a single relay (keep what you have)."""
    features: tuple[str, ...] = ()
    """The optional features the relay uses on this stream (of those the daemon offered)."""
    heartbeat_ack_every: int = 1
    """The relay acks one heartbeat in this many (1 without ``heartbeat-ack-coalesce``)."""


@attrs.frozen(kw_only=True)
class Refused(Event):
    reason: str
    """Lower-case refusal reason, e.g. ``"revoked"``, ``"clock_skew"``."""
    message: str
    relay_time: float
    retry_after_secs: float


@attrs.frozen(kw_only=True)
class HeartbeatAcked(Event):
    seq: int
    relay_time: float


@attrs.frozen(kw_only=True)
class CommandReceived(Event):
    command: stream_pb2.CommandInvocation


@attrs.frozen(kw_only=True)
class CancelRequested(Event):
    command_id: str
    reason: str
    known: bool


@attrs.frozen(kw_only=True)
class ResultAcked(Event):
    command_id: str


@attrs.frozen(kw_only=True)
class TokenRefreshed(Event):
    node_token: str = attrs.field(repr=False)
    expires_at: float


@attrs.frozen(kw_only=True)
class KeyRotated(Event):
    node_token: str = attrs.field(repr=False)
    expires_at: float
    key_thumbprint: str


@attrs.frozen(kw_only=True)
class Drained(Event):
    reason: str
    reconnect_after_secs: float
    relay_endpoint: str = ""
    """Where the relay asks this daemon to come back (empty: where it knows)."""


@attrs.frozen(kw_only=True)
class Revoked(Event):
    reason: str


# --------------------------------------------------------------------------- helpers


_State = TypeVar("_State", RelayState, DaemonState)
_In = TypeVar("_In", stream_pb2.DaemonMessage, stream_pb2.RelayMessage)
_Out = TypeVar("_Out", stream_pb2.DaemonMessage, stream_pb2.RelayMessage)


class _Session(Generic[_State, _In, _Out]):
    """What both ends share: parsing, the receive table lookup, the outbox, closing."""

    _incoming: type[_In]
    _receive_table: Mapping[tuple[_State, str], _State]
    _closed: _State
    _peer: str
    _newer_peer_hint: str
    _order_hint: str

    def __init__(self, initial: _State, max_message_bytes: int) -> None:
        self.state: _State = initial
        self._limit = max_message_bytes
        self._outbox: list[_Out] = []

    def receive_bytes(self, data: bytes, now: float) -> list[Event]:
        """Parse one raw frame and :meth:`receive` it."""
        self._require_open()
        if len(data) > self._limit:
            raise self._violation(
                f"frame of {len(data)} bytes exceeds the {self._limit}-byte limit",
                hint="split output into smaller chunks",
                status="RESOURCE_EXHAUSTED",
            )
        msg = self._incoming()
        try:
            msg.ParseFromString(data)
        except DecodeError as err:
            raise self._violation(
                f"frame is not a valid {self._incoming.DESCRIPTOR.name}: {err}",
                hint="the peer speaks another protocol or its frame was corrupted",
            ) from None
        return self.receive(msg, now)

    def receive(self, msg: _In, now: float) -> list[Event]:
        """Take one message from the peer; return what it means, in order."""
        self._require_open()
        kind = msg.WhichOneof("body")
        if kind is None:
            raise self._violation(
                f"empty or unknown {self._peer} message", hint=self._newer_peer_hint
            )
        after = self._receive_table.get((self.state, kind))
        if after is None:
            raise self._violation(
                f"{self._peer} sent {kind!r} while the stream is {self.state.value}",
                hint=self._order_hint,
                status="FAILED_PRECONDITION",
            )
        events = self._handle(kind, msg, now)
        if self.state is not self._closed:
            self.state = after
        return events

    def _handle(self, kind: str, msg: _In, now: float) -> list[Event]:
        raise NotImplementedError

    def messages_to_send(self) -> list[_Out]:
        """Everything queued for the peer since the last call, in order."""
        out, self._outbox = self._outbox, []
        return out

    def _violation(
        self,
        message: str,
        *,
        hint: str = "",
        status: str = "INVALID_ARGUMENT",
        reason: str = "protocol_error",
    ) -> RemoteProtocolError:
        self.state = self._closed
        return RemoteProtocolError(message, hint=hint, grpc_status=status, reason=reason)

    def _require_open(self) -> None:
        if self.state is self._closed:
            raise RemoteProtocolError(
                "message on a closed stream", grpc_status="FAILED_PRECONDITION"
            )


# --------------------------------------------------------------------------- relay side

# (state, received message kind) -> state after it. A pair missing here is a protocol error.
_RELAY_RECEIVE: Final[Mapping[tuple[RelayState, str], RelayState]] = {
    (RelayState.AWAITING_HELLO, "hello"): RelayState.HELLO_RECEIVED,
    (RelayState.CHALLENGED, "attestation"): RelayState.ATTESTED,
    **{
        (s, kind): s
        for s in (RelayState.ACCEPTED, RelayState.DRAINING)
        for kind in ("heartbeat", "capabilities", "output", "result", "rotate_key", "token_refresh")
    },
}

# send method -> states it is allowed in, and the state after it (None: unchanged).
_RELAY_SEND: Final[Mapping[str, tuple[frozenset[RelayState], RelayState | None]]] = {
    "challenge": (frozenset({RelayState.HELLO_RECEIVED}), RelayState.CHALLENGED),
    "accept": (frozenset({RelayState.ATTESTED}), RelayState.ACCEPTED),
    "refuse": (
        frozenset(
            {
                RelayState.AWAITING_HELLO,
                RelayState.HELLO_RECEIVED,
                RelayState.CHALLENGED,
                RelayState.ATTESTED,
            }
        ),
        RelayState.CLOSED,
    ),
    "send_command": (frozenset({RelayState.ACCEPTED}), None),
    "cancel": (frozenset({RelayState.ACCEPTED, RelayState.DRAINING}), None),
    "ack_results": (frozenset({RelayState.ACCEPTED, RelayState.DRAINING}), None),
    "refresh_token": (frozenset({RelayState.ACCEPTED, RelayState.DRAINING}), None),
    "key_rotated": (frozenset({RelayState.ACCEPTED, RelayState.DRAINING}), None),
    "drain": (frozenset({RelayState.ACCEPTED}), RelayState.DRAINING),
    "revoke": (frozenset({RelayState.ACCEPTED, RelayState.DRAINING}), RelayState.CLOSED),
}


class RelaySession(_Session[RelayState, stream_pb2.DaemonMessage, stream_pb2.RelayMessage]):
    """The relay's end of one daemon stream."""

    _incoming = stream_pb2.DaemonMessage
    _receive_table = _RELAY_RECEIVE
    _closed = RelayState.CLOSED
    _peer = "daemon"
    _newer_peer_hint = "the daemon may be newer than this relay; upgrade the relay"
    _order_hint = "the daemon broke the handshake order; it should reconnect"

    def __init__(
        self,
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        capability_limits: CapabilityLimits = DEFAULT_CAPABILITY_LIMITS,
    ) -> None:
        super().__init__(RelayState.AWAITING_HELLO, max_message_bytes)
        self._capability_limits = capability_limits
        self.node_id: str | None = None
        self.tenant_id: str | None = None
        self.control = False
        self.nonce: bytes | None = None
        self._in_flight: set[str] = set()
        self._answered: set[str] = set()
        self.offered_features: tuple[str, ...] = ()
        self.keepalive_secs = 0.0
        """``Hello.keepalive_secs`` (0: the daemon runs no keepalive)."""
        self.features: frozenset[str] = frozenset()
        """What this stream uses, as named in ``accept``."""
        self._ack_every = 1
        self._acked_seq = 0
        self._acks_owed: list[str] = []
        """Stored results whose ack waits for the next heartbeat (result-ack-deferred)."""

    def _check_capabilities(self, caps: common_pb2.Capabilities) -> None:
        try:
            check_capabilities(caps, self._capability_limits)
        except CapabilityError as err:
            raise self._violation(
                f"capability snapshot refused: {err}",
                hint="the daemon must send a smaller description of the host",
                status="RESOURCE_EXHAUSTED",
            ) from None

    def _handle(self, kind: str, msg: stream_pb2.DaemonMessage, now: float) -> list[Event]:
        if kind == "hello":
            hello = msg.hello
            if hello.protocol_version != PROTOCOL_VERSION:
                raise self._violation(
                    f"daemon speaks protocol v{hello.protocol_version}, "
                    f"this relay v{PROTOCOL_VERSION}",
                    hint="upgrade the daemon or the relay to the same major version",
                    reason="unsupported_version",
                )
            if not hello.node_id or not hello.node_token:
                raise self._violation(
                    "hello without node id or token", hint="the daemon must enroll first"
                )
            self._check_capabilities(hello.capabilities)
            self.node_id = hello.node_id
            self.control = hello.kind == stream_pb2.SESSION_KIND_CONTROL
            self.offered_features = negotiate(hello.features)
            self.keepalive_secs = hello.keepalive_secs
            return [
                HelloReceived(
                    node_id=hello.node_id,
                    node_token=hello.node_token,
                    capabilities=hello.capabilities,
                    host_time=hello.host_time,
                    control=self.control,
                    features=self.offered_features,
                    keepalive_secs=hello.keepalive_secs,
                )
            ]
        if kind == "attestation":
            assert self.nonce is not None
            if not msg.attestation.signature:
                raise self._violation("attestation without a signature")
            return [AttestationReceived(signature=msg.attestation.signature, nonce=self.nonce)]
        if kind == "heartbeat":
            hb = msg.heartbeat
            # Coalesced: an ack covers every heartbeat up to its seq; the daemon counts
            # beats since the last ack, so acking one in `_ack_every` keeps it below its
            # stall count (see handshake.heartbeat_ack_every).
            # result-ack-deferred: held result acks go out at the next beat, as its ack; the
            # next plain ack then comes `_ack_every` beats later, so no write is added
            if self._acks_owed or hb.seq - self._acked_seq >= self._ack_every:
                ack = stream_pb2.RelayMessage()
                if self._acks_owed:
                    ack.result_ack.command_ids.extend(self._acks_owed)
                    ack.result_ack.heartbeat_seq = hb.seq
                    ack.result_ack.relay_time = now
                    self._acks_owed = []
                else:
                    ack.heartbeat_ack.seq = hb.seq
                    ack.heartbeat_ack.relay_time = now
                self._outbox.append(ack)
                self._acked_seq = hb.seq
            return [
                HeartbeatReceived(
                    seq=hb.seq, host_time=hb.host_time, inflight=hb.inflight, token_jti=hb.token_jti
                )
            ]
        if kind == "capabilities":
            self._check_capabilities(msg.capabilities.capabilities)
            return [CapabilitiesChanged(capabilities=msg.capabilities.capabilities)]
        if kind == "output":
            out = msg.output
            if not out.command_id:
                raise self._violation("output without a command id")
            return [
                OutputReceived(
                    command_id=out.command_id,
                    seq=out.seq,
                    stdout=out.stdout,
                    stderr=out.stderr,
                    known=out.command_id in self._in_flight,
                )
            ]
        if kind == "result":
            res = msg.result
            if not res.command_id:
                raise self._violation("result without a command id")
            if res.command_id in self._answered:
                raise self._violation(
                    f"second result for command {res.command_id}",
                    hint="a daemon answers each command once per stream",
                )
            known = res.command_id in self._in_flight
            self._in_flight.discard(res.command_id)
            self._answered.add(res.command_id)
            return [ResultReceived(result=res, known=known)]
        if kind == "rotate_key":
            rk = msg.rotate_key
            if len(rk.new_public_key) != 32:
                raise self._violation("rotate_key: the new public key must be 32 bytes")
            assert self.nonce is not None
            return [
                RotateKeyRequested(
                    new_public_key=rk.new_public_key,
                    old_key_signature=rk.old_key_signature,
                    new_key_signature=rk.new_key_signature,
                    nonce=self.nonce,
                )
            ]
        assert kind == "token_refresh"
        return [TokenRefreshRequested()]

    # -- sending

    def _transition(self, op: str) -> RelayState | None:
        allowed, after = _RELAY_SEND[op]
        if self.state not in allowed:
            raise LocalProtocolError(
                f"cannot {op} while the relay session is {self.state.value}",
                hint="follow the state table in aegis_edge_core.session",
            )
        return after

    def _emit(self, op: str, msg: stream_pb2.RelayMessage) -> None:
        after = self._transition(op)
        self._outbox.append(msg)
        if after is not None:
            self.state = after

    def challenge(self, nonce: bytes, now: float) -> None:
        """Answer the hello with a fresh nonce (caller draws 32 random bytes)."""
        if len(nonce) < 16:
            raise LocalProtocolError("an attestation nonce needs at least 16 random bytes")
        self._transition("challenge")
        self.nonce = nonce
        msg = stream_pb2.RelayMessage()
        msg.challenge.protocol_version = PROTOCOL_VERSION
        msg.challenge.nonce = nonce
        msg.challenge.relay_time = now
        self._emit("challenge", msg)

    def accept(
        self,
        verified: VerifiedAttestation,
        *,
        heartbeat_interval_secs: float,
        stale_threshold_secs: float,
        now: float,
        node_token: str = "",
        token_expires_at: float = 0.0,
        max_concurrent_commands: int = 0,
        relay_endpoints: Sequence[str] = (),
        features: Iterable[str] = (),
        heartbeat_ack_every: int = 1,
    ) -> None:
        """Accept the daemon after ``verify_attestation`` approved *this* session's proof.

        ``features``: the offered features to use on this stream; ``heartbeat_ack_every``
        counts only with ``heartbeat-ack-coalesce`` among them."""
        self._transition("accept")
        if verified.nonce != self.nonce or verified.node_id != self.node_id:
            raise LocalProtocolError(
                "the verified attestation belongs to another session",
                hint="verify the AttestationReceived event of this session",
            )
        unoffered = set(features) - set(self.offered_features)
        if unoffered:
            raise LocalProtocolError(
                f"cannot use features the daemon did not offer: {sorted(unoffered)}",
                hint="name a subset of HelloReceived.features",
            )
        if heartbeat_ack_every < 1:
            raise LocalProtocolError("heartbeat_ack_every must be at least 1")
        if HEARTBEAT_KEEPALIVE in features and not keepalive_fits(
            self.keepalive_secs, heartbeat_interval_secs, stale_threshold_secs
        ):
            raise LocalProtocolError(
                f"heartbeat-keepalive needs the daemon's keepalive within the stall bound "
                f"(it said {self.keepalive_secs:g}s)",
                hint="name the features handshake.grant returns",
            )
        self.features = frozenset(features)
        coalesce = bool(self.features & _ACKS_COALESCED)
        self._ack_every = heartbeat_ack_every if coalesce else 1
        self.tenant_id = verified.tenant_id
        msg = stream_pb2.RelayMessage()
        acc = msg.accepted
        acc.node_id = verified.node_id
        acc.tenant_id = verified.tenant_id
        acc.heartbeat_interval_secs = heartbeat_interval_secs
        acc.stale_threshold_secs = stale_threshold_secs
        acc.node_token = node_token
        acc.token_expires_at = token_expires_at
        acc.max_concurrent_commands = max_concurrent_commands
        acc.relay_time = now
        acc.relay_endpoints.extend(relay_endpoints)
        acc.features.extend(sorted(self.features))
        if coalesce:
            acc.heartbeat_ack_every = self._ack_every
        self._emit("accept", msg)

    def refuse(
        self, reason: str, message: str, now: float, *, retry_after_secs: float = 0.0
    ) -> None:
        msg = stream_pb2.RelayMessage()
        msg.refused.reason = reason_value(reason)
        msg.refused.message = message
        msg.refused.relay_time = now
        msg.refused.retry_after_secs = retry_after_secs
        self._emit("refuse", msg)

    def send_command(
        self,
        *,
        command_id: str,
        tool: str,
        args_json: str = "{}",
        fleet_command_id: str = "",
        deadline: float = 0.0,
        timeout_secs: float = 0.0,
        traceparent: str = "",
        tracestate: str = "",
    ) -> None:
        if self.control:
            raise LocalProtocolError("a control session takes no commands")
        if command_id in self._in_flight or command_id in self._answered:
            raise LocalProtocolError(f"command {command_id} was already sent on this stream")
        msg = stream_pb2.RelayMessage()
        cmd = msg.command
        cmd.command_id = command_id
        cmd.fleet_command_id = fleet_command_id
        cmd.tool = tool
        cmd.args_json = args_json
        cmd.deadline = deadline
        cmd.timeout_secs = timeout_secs
        cmd.trace.traceparent = traceparent
        cmd.trace.tracestate = tracestate
        self._emit("send_command", msg)
        self._in_flight.add(command_id)

    def cancel(self, command_id: str, reason: str) -> None:
        msg = stream_pb2.RelayMessage()
        msg.cancel.command_id = command_id
        msg.cancel.reason = reason
        self._emit("cancel", msg)

    def ack_results(self, command_ids: Sequence[str]) -> None:
        """Tell the daemon it may forget these results: call only after storing them all.
        One message with ``result-ack-batch``, else one per result; with
        ``result-ack-deferred`` (and not draining) none yet: they go out as the ack of the
        daemon's next heartbeat, or before a drain."""
        self._transition("ack_results")
        if RESULT_ACK_DEFERRED in self.features and self.state is RelayState.ACCEPTED:
            self._acks_owed.extend(command_ids)
            return
        if RESULT_ACK_BATCH in self.features and len(command_ids) > 1:
            msg = stream_pb2.RelayMessage()
            msg.result_ack.command_ids.extend(command_ids)
            self._outbox.append(msg)
            return
        for command_id in command_ids:
            msg = stream_pb2.RelayMessage()
            msg.result_ack.command_id = command_id
            self._outbox.append(msg)

    def ack_result(self, command_id: str) -> None:
        """Tell the daemon it may forget a result: call only after storing it."""
        self.ack_results((command_id,))

    def refresh_token(self, node_token: str, expires_at: float) -> None:
        msg = stream_pb2.RelayMessage()
        msg.token_refresh.node_token = node_token
        msg.token_refresh.expires_at = expires_at
        self._emit("refresh_token", msg)

    def key_rotated(self, node_token: str, expires_at: float, key_thumbprint: str) -> None:
        msg = stream_pb2.RelayMessage()
        msg.key_rotated.node_token = node_token
        msg.key_rotated.expires_at = expires_at
        msg.key_rotated.key_thumbprint = key_thumbprint
        self._emit("key_rotated", msg)

    def drain(
        self, reason: str, reconnect_after_secs: float = 0.0, relay_endpoint: str = ""
    ) -> None:
        self._transition("drain")
        if self._acks_owed:  # the daemon need not send them again to the next relay
            owed, self._acks_owed = self._acks_owed, []
            ack = stream_pb2.RelayMessage()
            ack.result_ack.command_ids.extend(owed)
            self._outbox.append(ack)
        msg = stream_pb2.RelayMessage()
        msg.drain.reason = reason
        msg.drain.reconnect_after_secs = reconnect_after_secs
        msg.drain.relay_endpoint = relay_endpoint
        self._emit("drain", msg)

    def revoke(self, reason: str) -> list[str]:
        """Tell the daemon it is revoked and close; returns the commands left in flight."""
        msg = stream_pb2.RelayMessage()
        msg.revoked.reason = reason
        self._emit("revoke", msg)
        return self.connection_lost()

    def connection_lost(self) -> list[str]:
        """The stream is gone: close, and return the commands that were in flight on it.

        The dispatcher ends each of them ``edge_disconnected`` (seed: "Tools that were in
        flight are reported back as EdgeDisconnected to the dispatcher").
        """
        lost = sorted(self._in_flight)
        self._in_flight.clear()
        self.state = RelayState.CLOSED
        return lost

    @property
    def in_flight(self) -> frozenset[str]:
        return frozenset(self._in_flight)


# --------------------------------------------------------------------------- daemon side

_DAEMON_RECEIVE: Final[Mapping[tuple[DaemonState, str], DaemonState]] = {
    (DaemonState.HELLO_SENT, "challenge"): DaemonState.CHALLENGED,
    (DaemonState.ATTESTING, "accepted"): DaemonState.ACCEPTED,
    **{
        (s, "refused"): DaemonState.CLOSED
        for s in (DaemonState.HELLO_SENT, DaemonState.CHALLENGED, DaemonState.ATTESTING)
    },
    **{
        (s, kind): s
        for s in (DaemonState.ACCEPTED, DaemonState.DRAINING)
        for kind in ("heartbeat_ack", "cancel", "result_ack", "token_refresh", "key_rotated")
    },
    (DaemonState.ACCEPTED, "command"): DaemonState.ACCEPTED,
    (DaemonState.ACCEPTED, "drain"): DaemonState.DRAINING,
    (DaemonState.ACCEPTED, "revoked"): DaemonState.CLOSED,
    (DaemonState.DRAINING, "revoked"): DaemonState.CLOSED,
}

_DAEMON_SEND: Final[Mapping[str, tuple[frozenset[DaemonState], DaemonState | None]]] = {
    "hello": (frozenset({DaemonState.IDLE}), DaemonState.HELLO_SENT),
    "attest": (frozenset({DaemonState.CHALLENGED}), DaemonState.ATTESTING),
    **{
        op: (frozenset({DaemonState.ACCEPTED, DaemonState.DRAINING}), None)
        for op in (
            "heartbeat",
            "capabilities",
            "output",
            "result",
            "rotate_key",
            "request_token_refresh",
        )
    },
}


def _local_capabilities_check(caps: common_pb2.Capabilities) -> None:
    try:
        check_capabilities(caps)
    except CapabilityError as err:
        raise LocalProtocolError(
            f"refusing to send this capability snapshot: {err}",
            hint="check it with aegis_edge_core.capability_limits before sending",
        ) from None


class DaemonSession(_Session[DaemonState, stream_pb2.RelayMessage, stream_pb2.DaemonMessage]):
    """The daemon's end of its stream to the relay."""

    _incoming = stream_pb2.RelayMessage
    _receive_table = _DAEMON_RECEIVE
    _closed = DaemonState.CLOSED
    _peer = "relay"
    _newer_peer_hint = "the relay may be newer than this daemon; upgrade it"
    _order_hint = "reconnect; if it repeats, the relay is broken or not an aegis relay"

    def __init__(self, *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        super().__init__(DaemonState.IDLE, max_message_bytes)
        self.node_id: str | None = None
        self.nonce: bytes | None = None
        self.control = False
        self._commands: set[str] = set()
        self._answered: set[str] = set()
        self._heartbeat_seq = 0
        self._last_acked_seq = 0
        self.offered_features: tuple[str, ...] = ()
        self.features: frozenset[str] = frozenset()
        """What the relay uses on this stream, as named in ``Accepted``."""

    def _handle(self, kind: str, msg: stream_pb2.RelayMessage, now: float) -> list[Event]:
        if kind == "challenge":
            ch = msg.challenge
            if ch.protocol_version != PROTOCOL_VERSION:
                raise self._violation(
                    f"relay speaks protocol v{ch.protocol_version}",
                    hint="upgrade the daemon or the relay",
                )
            if len(ch.nonce) < 16:
                raise self._violation("challenge nonce is too short to be safe")
            self.nonce = ch.nonce
            return [ChallengeReceived(nonce=ch.nonce, relay_time=ch.relay_time)]
        if kind == "accepted":
            acc = msg.accepted
            if acc.node_id != self.node_id:
                raise self._violation("relay accepted a different node id")
            # Only what was offered: a feature named but never offered is ignored, as an
            # older daemon would.
            features = negotiate(acc.features, self.offered_features)
            self.features = frozenset(features)
            return [
                SessionAccepted(
                    node_id=acc.node_id,
                    tenant_id=acc.tenant_id,
                    heartbeat_interval_secs=acc.heartbeat_interval_secs,
                    stale_threshold_secs=acc.stale_threshold_secs,
                    node_token=acc.node_token,
                    token_expires_at=acc.token_expires_at,
                    max_concurrent_commands=acc.max_concurrent_commands,
                    relay_time=acc.relay_time,
                    relay_endpoints=tuple(acc.relay_endpoints),
                    features=features,
                    heartbeat_ack_every=(
                        max(1, acc.heartbeat_ack_every)
                        if _ACKS_COALESCED.intersection(features)
                        else 1
                    ),
                )
            ]
        if kind == "refused":
            ref = msg.refused
            return [
                Refused(
                    reason=reason_name(ref.reason),
                    message=ref.message,
                    relay_time=ref.relay_time,
                    retry_after_secs=ref.retry_after_secs,
                )
            ]
        if kind == "heartbeat_ack":
            ack = msg.heartbeat_ack
            return [self._heartbeat_acked(ack.seq, ack.relay_time)]
        if kind == "command":
            cmd = msg.command
            if not cmd.command_id or not cmd.tool:
                raise self._violation("command without id or tool")
            if cmd.command_id in self._commands:
                raise self._violation(f"command {cmd.command_id} was sent twice")
            if self.control:
                raise self._violation("relay sent a command to a control session")
            self._commands.add(cmd.command_id)
            return [CommandReceived(command=cmd)]
        if kind == "cancel":
            c = msg.cancel
            known = c.command_id in self._commands and c.command_id not in self._answered
            return [CancelRequested(command_id=c.command_id, reason=c.reason, known=known)]
        if kind == "result_ack":
            ra = msg.result_ack
            # as an older relay sends it (command_id), or batched (command_ids)
            ids = [ra.command_id] if ra.command_id or not ra.command_ids else []
            ids += ra.command_ids
            events: list[Event] = [ResultAcked(command_id=cid) for cid in ids]
            if ra.heartbeat_seq and RESULT_ACK_DEFERRED in self.features:
                # result-ack-deferred: the acks came as the ack of this heartbeat
                events.append(self._heartbeat_acked(ra.heartbeat_seq, ra.relay_time))
            return events
        if kind == "token_refresh":
            tr = msg.token_refresh
            if not tr.node_token:
                raise self._violation("token refresh without a token")
            return [TokenRefreshed(node_token=tr.node_token, expires_at=tr.expires_at)]
        if kind == "key_rotated":
            kr = msg.key_rotated
            if not kr.node_token:
                raise self._violation("key_rotated without a token")
            return [
                KeyRotated(
                    node_token=kr.node_token,
                    expires_at=kr.expires_at,
                    key_thumbprint=kr.key_thumbprint,
                )
            ]
        if kind == "drain":
            return [
                Drained(
                    reason=msg.drain.reason,
                    reconnect_after_secs=msg.drain.reconnect_after_secs,
                    relay_endpoint=msg.drain.relay_endpoint,
                )
            ]
        assert kind == "revoked"
        return [Revoked(reason=msg.revoked.reason)]

    def _heartbeat_acked(self, seq: int, relay_time: float) -> HeartbeatAcked:
        if seq > self._heartbeat_seq:
            raise self._violation(f"ack for heartbeat {seq}, which was never sent")
        self._last_acked_seq = max(self._last_acked_seq, seq)
        return HeartbeatAcked(seq=seq, relay_time=relay_time)

    # -- sending

    def _emit(self, op: str, msg: stream_pb2.DaemonMessage) -> None:
        allowed, after = _DAEMON_SEND[op]
        if self.state not in allowed:
            raise LocalProtocolError(
                f"cannot {op} while the daemon session is {self.state.value}",
                hint="follow the state table in aegis_edge_core.session",
            )
        self._outbox.append(msg)
        if after is not None:
            self.state = after

    def hello(
        self,
        *,
        node_id: str,
        node_token: str,
        capabilities: common_pb2.Capabilities,
        now: float,
        control: bool = False,
        features: Iterable[str] = (),
        keepalive_secs: float = 0.0,
    ) -> None:
        """``features``: the optional features to offer (``handshake.FEATURES``);
        ``keepalive_secs``: with ``heartbeat-keepalive``, how soon this daemon's channel
        notices a silent relay (``daemon_rules.KeepalivePlan.bound_secs``)."""
        if not node_id or not node_token:
            raise LocalProtocolError("hello needs the node id and token from enrollment")
        _local_capabilities_check(capabilities)
        msg = stream_pb2.DaemonMessage()
        h = msg.hello
        h.protocol_version = PROTOCOL_VERSION
        h.node_id = node_id
        h.node_token = node_token
        h.capabilities.CopyFrom(capabilities)
        h.host_time = now
        h.kind = stream_pb2.SESSION_KIND_CONTROL if control else stream_pb2.SESSION_KIND_DAEMON
        h.features.extend(sorted(set(features)))
        if HEARTBEAT_KEEPALIVE in h.features:
            h.keepalive_secs = keepalive_secs
        self._emit("hello", msg)
        self.node_id = node_id
        self.control = control
        self.offered_features = tuple(h.features)

    def attest(self, signature: bytes) -> None:
        """Answer the challenge with ``sign_attestation(key, ..., nonce=self.nonce)``."""
        msg = stream_pb2.DaemonMessage()
        msg.attestation.signature = signature
        self._emit("attest", msg)

    def heartbeat(self, now: float, *, inflight: int = 0, token_jti: str = "") -> int:
        """Send a heartbeat. Pass ``token_jti`` once, right after durably storing a token
        from ``TokenRefreshed``/``SessionAccepted``: the relay then revokes the tokens it
        issued before that one."""
        msg = stream_pb2.DaemonMessage()
        self._emit("heartbeat", msg)
        self._heartbeat_seq += 1
        msg.heartbeat.seq = self._heartbeat_seq
        msg.heartbeat.host_time = now
        msg.heartbeat.inflight = inflight
        msg.heartbeat.token_jti = token_jti
        return self._heartbeat_seq

    @property
    def heartbeats_unacked(self) -> int:
        """Heartbeats sent since the last ack: a stalled relay shows up here first."""
        return self._heartbeat_seq - self._last_acked_seq

    def capabilities(self, capabilities: common_pb2.Capabilities) -> None:
        _local_capabilities_check(capabilities)
        msg = stream_pb2.DaemonMessage()
        msg.capabilities.capabilities.CopyFrom(capabilities)
        self._emit("capabilities", msg)

    def output(
        self, command_id: str, seq: int, *, stdout: bytes = b"", stderr: bytes = b""
    ) -> None:
        msg = stream_pb2.DaemonMessage()
        msg.output.command_id = command_id
        msg.output.seq = seq
        msg.output.stdout = stdout
        msg.output.stderr = stderr
        if msg.ByteSize() > self._limit:
            raise LocalProtocolError("output chunk exceeds the frame limit; send smaller chunks")
        self._emit("output", msg)

    def result(self, result: stream_pb2.CommandResult) -> None:
        """Report a result: of a command of this stream, or (late) of an earlier one."""
        if not result.command_id:
            raise LocalProtocolError("a result needs the command id")
        if result.command_id in self._answered:
            raise LocalProtocolError(f"command {result.command_id} was already answered")
        msg = stream_pb2.DaemonMessage()
        msg.result.CopyFrom(result)
        msg.result.delivered_late = result.command_id not in self._commands
        self._emit("result", msg)
        self._answered.add(result.command_id)

    def rotate_key(
        self, *, new_public_key: bytes, old_key_signature: bytes, new_key_signature: bytes
    ) -> None:
        msg = stream_pb2.DaemonMessage()
        msg.rotate_key.new_public_key = new_public_key
        msg.rotate_key.old_key_signature = old_key_signature
        msg.rotate_key.new_key_signature = new_key_signature
        self._emit("rotate_key", msg)

    def request_token_refresh(self) -> None:
        msg = stream_pb2.DaemonMessage()
        msg.token_refresh.SetInParent()
        self._emit("request_token_refresh", msg)

    def close(self) -> None:
        self.state = DaemonState.CLOSED
