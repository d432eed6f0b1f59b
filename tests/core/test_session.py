"""The stream sessions: examples, every (state, message) pair, and a stateful property test."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from aegis_edge_core.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from aegis_edge_core.handshake import FEATURES
from aegis_edge_core.identity import AttestationError
from aegis_edge_core.identity.attestation import VerifiedAttestation
from aegis_edge_core.session import (
    AttestationReceived,
    CancelRequested,
    CommandReceived,
    DaemonSession,
    DaemonState,
    HeartbeatAcked,
    HeartbeatReceived,
    HelloReceived,
    Refused,
    RelaySession,
    RelayState,
    ResultAcked,
    ResultReceived,
    Revoked,
    SessionAccepted,
)
from aegis_edge_core.wire import common_pb2, stream_pb2

from .session_rig import NOW, Identity, caps, handshake, to_daemon, to_relay


def _result(command_id: str, ok: bool = True) -> stream_pb2.CommandResult:
    return stream_pb2.CommandResult(
        command_id=command_id,
        outcome=common_pb2.TARGET_OUTCOME_OK if ok else common_pb2.TARGET_OUTCOME_ERROR,
        exit_code=0 if ok else 1,
        has_exit_code=True,
    )


# ----------------------------------------------------------------------------- examples


def test_handshake_accepts_and_daemon_learns_interval() -> None:
    ident = Identity.make()
    daemon = DaemonSession()
    relay = RelaySession()
    daemon.hello(node_id="node-1", node_token=ident.token, capabilities=caps(), now=NOW)
    (hello,) = to_relay(daemon, relay)
    assert isinstance(hello, HelloReceived) and hello.node_id == "node-1"
    assert "token" not in repr(hello) or ident.token not in repr(hello)
    relay.challenge(b"n" * 32, NOW)
    (ch,) = to_daemon(relay, daemon)
    daemon.attest(ident.sign(ch.nonce))  # type: ignore[attr-defined]
    (att,) = to_relay(daemon, relay)
    assert isinstance(att, AttestationReceived)
    relay.accept(
        ident.verify(hello, att), heartbeat_interval_secs=30, stale_threshold_secs=90, now=NOW
    )
    (acc,) = to_daemon(relay, daemon)
    assert isinstance(acc, SessionAccepted)
    assert acc.heartbeat_interval_secs == 30 and acc.tenant_id == "tenant-a"
    assert relay.state is RelayState.ACCEPTED and daemon.state is DaemonState.ACCEPTED


def test_bad_signature_is_refused_with_reason() -> None:
    ident = Identity.make()
    daemon, relay = DaemonSession(), RelaySession()
    daemon.hello(node_id="node-1", node_token=ident.token, capabilities=caps(), now=NOW)
    (hello,) = to_relay(daemon, relay)
    relay.challenge(b"n" * 32, NOW)
    to_daemon(relay, daemon)
    daemon.attest(ident.sign(b"some other nonce, replayed"))
    (att,) = to_relay(daemon, relay)
    with pytest.raises(AttestationError) as err:
        ident.verify(hello, att)  # type: ignore[arg-type]
    relay.refuse(err.value.reason, err.value.message, NOW)
    (refused,) = to_daemon(relay, daemon)
    assert isinstance(refused, Refused) and refused.reason == "bad_signature"
    assert relay.state is RelayState.CLOSED and daemon.state is DaemonState.CLOSED


def test_accept_with_another_sessions_proof_is_local_error() -> None:
    ident = Identity.make()
    _, _relay_a = handshake(ident)
    daemon_b, relay_b = DaemonSession(), RelaySession()
    daemon_b.hello(node_id="node-1", node_token=ident.token, capabilities=caps(), now=NOW)
    (hello,) = to_relay(daemon_b, relay_b)
    relay_b.challenge(b"m" * 32, NOW)
    to_daemon(relay_b, daemon_b)
    daemon_b.attest(ident.sign(b"m" * 32))
    (att,) = to_relay(daemon_b, relay_b)
    assert isinstance(hello, HelloReceived)
    stale = ident.verify(
        hello, AttestationReceived(signature=ident.sign(b"x" * 32), nonce=b"x" * 32)
    )
    with pytest.raises(LocalProtocolError):
        relay_b.accept(stale, heartbeat_interval_secs=30, stale_threshold_secs=90, now=NOW)
    assert relay_b.state is RelayState.ATTESTED
    assert isinstance(att, AttestationReceived)


def test_heartbeat_is_acked_by_the_session() -> None:
    daemon, relay = handshake(Identity.make())
    seq = daemon.heartbeat(NOW + 30, inflight=2)
    (hb,) = to_relay(daemon, relay)
    assert hb == HeartbeatReceived(seq=seq, host_time=NOW + 30, inflight=2)
    assert daemon.heartbeats_unacked == 1
    (ack,) = to_daemon(relay, daemon)
    assert isinstance(ack, HeartbeatAcked) and ack.seq == seq
    assert daemon.heartbeats_unacked == 0


def test_command_result_ack_roundtrip_and_duplicate_result_is_remote_error() -> None:
    daemon, relay = handshake(Identity.make())
    relay.send_command(
        command_id="c1", tool="edge.ping", traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    )
    (cmd,) = to_daemon(relay, daemon)
    assert isinstance(cmd, CommandReceived) and cmd.command.tool == "edge.ping"
    assert relay.in_flight == {"c1"}
    daemon.result(_result("c1"))
    (res,) = to_relay(daemon, relay)
    assert isinstance(res, ResultReceived) and res.known and not res.result.delivered_late
    assert relay.in_flight == frozenset()
    relay.ack_result("c1")
    assert to_daemon(relay, daemon) == [ResultAcked(command_id="c1")]
    dup = stream_pb2.DaemonMessage(result=_result("c1"))
    with pytest.raises(RemoteProtocolError):
        relay.receive(dup, NOW)
    assert relay.state is RelayState.CLOSED


def test_late_result_from_an_earlier_stream_is_reported_unknown() -> None:
    daemon, relay = handshake(Identity.make())
    daemon.result(_result("from-before"))
    (res,) = to_relay(daemon, relay)
    assert isinstance(res, ResultReceived)
    assert not res.known and res.result.delivered_late


def test_connection_lost_returns_in_flight_commands() -> None:
    _, relay = handshake(Identity.make())
    relay.send_command(command_id="c1", tool="cmd.run")
    relay.send_command(command_id="c2", tool="cmd.run")
    assert relay.connection_lost() == ["c1", "c2"]
    assert relay.state is RelayState.CLOSED


def test_revoke_closes_both_ends() -> None:
    daemon, relay = handshake(Identity.make())
    relay.send_command(command_id="c1", tool="cmd.run")
    assert relay.revoke("operator revoked") == ["c1"]
    events = to_daemon(relay, daemon)
    assert isinstance(events[-1], Revoked)
    assert daemon.state is DaemonState.CLOSED
    with pytest.raises(RemoteProtocolError):
        relay.receive_bytes(
            stream_pb2.DaemonMessage(heartbeat=stream_pb2.Heartbeat()).SerializeToString(), NOW
        )


def test_cancel_of_finished_command_is_not_known() -> None:
    daemon, relay = handshake(Identity.make())
    relay.send_command(command_id="c1", tool="cmd.run")
    to_daemon(relay, daemon)
    daemon.result(_result("c1"))
    relay.cancel("c1", "deadline")
    (c,) = to_daemon(relay, daemon)
    assert c == CancelRequested(command_id="c1", reason="deadline", known=False)


def test_drain_stops_new_commands_but_results_still_flow() -> None:
    daemon, relay = handshake(Identity.make())
    relay.send_command(command_id="c1", tool="cmd.run")
    relay.drain("relay shutting down", 2.0)
    to_daemon(relay, daemon)
    assert daemon.state is DaemonState.DRAINING
    with pytest.raises(LocalProtocolError):
        relay.send_command(command_id="c2", tool="cmd.run")
    daemon.result(_result("c1"))
    (res,) = to_relay(daemon, relay)
    assert isinstance(res, ResultReceived) and res.known


def test_control_session_takes_no_commands() -> None:
    ident = Identity.make()
    daemon, relay = DaemonSession(), RelaySession()
    daemon.hello(
        node_id="node-1", node_token=ident.token, capabilities=caps(), now=NOW, control=True
    )
    (hello,) = to_relay(daemon, relay)
    assert isinstance(hello, HelloReceived) and hello.control
    relay.challenge(b"k" * 32, NOW)
    to_daemon(relay, daemon)
    daemon.attest(ident.sign(b"k" * 32))
    (att,) = to_relay(daemon, relay)
    assert isinstance(att, AttestationReceived)
    relay.accept(
        ident.verify(hello, att),
        heartbeat_interval_secs=30,
        stale_threshold_secs=90,
        now=NOW,
    )
    with pytest.raises(LocalProtocolError):
        relay.send_command(command_id="c1", tool="cmd.run")


def test_oversized_frame_is_resource_exhausted() -> None:
    relay = RelaySession(max_message_bytes=1024)
    with pytest.raises(RemoteProtocolError) as err:
        relay.receive_bytes(b"\x00" * 2048, NOW)
    assert err.value.grpc_status == "RESOURCE_EXHAUSTED"


def test_garbage_frame_is_invalid_argument_and_closes() -> None:
    relay = RelaySession()
    with pytest.raises(RemoteProtocolError) as err:
        relay.receive_bytes(b"\xff\xff\xff\xff", NOW)
    assert err.value.grpc_status == "INVALID_ARGUMENT"
    assert relay.state is RelayState.CLOSED


def test_wrong_protocol_version_is_refused() -> None:
    relay = RelaySession()
    msg = stream_pb2.DaemonMessage()
    msg.hello.protocol_version = 99
    msg.hello.node_id = "n"
    msg.hello.node_token = "t"
    with pytest.raises(RemoteProtocolError, match="protocol v99"):
        relay.receive(msg, NOW)


def test_send_before_accept_is_local_error_and_keeps_state() -> None:
    daemon = DaemonSession()
    with pytest.raises(LocalProtocolError):
        daemon.heartbeat(NOW)
    assert daemon.state is DaemonState.IDLE
    relay = RelaySession()
    with pytest.raises(LocalProtocolError):
        relay.send_command(command_id="c", tool="edge.ping")
    assert relay.state is RelayState.AWAITING_HELLO


# ------------------------------------------------------ every (state, message) pair (h2)

_DAEMON_KINDS = [f.name for f in stream_pb2.DaemonMessage.DESCRIPTOR.oneofs_by_name["body"].fields]
_RELAY_KINDS = [f.name for f in stream_pb2.RelayMessage.DESCRIPTOR.oneofs_by_name["body"].fields]


def _relay_in(state: RelayState) -> RelaySession:
    ident = Identity.make()
    if state in (RelayState.ACCEPTED, RelayState.DRAINING):
        _, relay = handshake(ident)
        if state is RelayState.DRAINING:
            relay.drain("test")
        relay.messages_to_send()
        return relay
    relay = RelaySession()
    if state is RelayState.AWAITING_HELLO:
        return relay
    relay.receive(
        stream_pb2.DaemonMessage(
            hello=stream_pb2.Hello(protocol_version=1, node_id="node-1", node_token=ident.token)
        ),
        NOW,
    )
    if state is RelayState.HELLO_RECEIVED:
        return relay
    relay.challenge(b"c" * 32, NOW)
    if state is RelayState.CHALLENGED:
        return relay
    relay.receive(
        stream_pb2.DaemonMessage(attestation=stream_pb2.AttestationResponse(signature=b"s" * 64)),
        NOW,
    )
    if state is RelayState.ATTESTED:
        return relay
    relay.refuse("malformed", "closing", NOW)
    assert state is RelayState.CLOSED
    return relay


def _valid_daemon_message(kind: str) -> stream_pb2.DaemonMessage:
    msg = stream_pb2.DaemonMessage()
    body = getattr(msg, kind)
    body.SetInParent()
    if kind == "hello":
        body.protocol_version, body.node_id, body.node_token = 1, "node-1", "tok"
    elif kind == "attestation":
        body.signature = b"s" * 64
    elif kind in ("output", "result"):
        body.command_id = "c-new"
    elif kind == "rotate_key":
        body.new_public_key = b"k" * 32
    return msg


@pytest.mark.parametrize("state", list(RelayState))
@pytest.mark.parametrize("kind", _DAEMON_KINDS)
def test_relay_every_state_and_message(state: RelayState, kind: str) -> None:
    relay = _relay_in(state)
    allowed = {
        RelayState.AWAITING_HELLO: {"hello"},
        RelayState.CHALLENGED: {"attestation"},
        RelayState.ACCEPTED: set(_DAEMON_KINDS) - {"hello", "attestation"},
        RelayState.DRAINING: set(_DAEMON_KINDS) - {"hello", "attestation"},
    }.get(state, set())
    if kind in allowed:
        events = relay.receive(_valid_daemon_message(kind), NOW)
        assert events and relay.state is not RelayState.CLOSED
    else:
        with pytest.raises(RemoteProtocolError):
            relay.receive(_valid_daemon_message(kind), NOW)
        assert relay.state is RelayState.CLOSED


def _daemon_in(state: DaemonState) -> DaemonSession:
    ident = Identity.make()
    if state in (DaemonState.ACCEPTED, DaemonState.DRAINING):
        daemon, relay = handshake(ident)
        if state is DaemonState.DRAINING:
            relay.drain("test")
            to_daemon(relay, daemon)
        return daemon
    daemon = DaemonSession()
    if state is DaemonState.IDLE:
        return daemon
    daemon.hello(node_id="node-1", node_token=ident.token, capabilities=caps(), now=NOW)
    if state is DaemonState.HELLO_SENT:
        return daemon
    daemon.receive(
        stream_pb2.RelayMessage(
            challenge=stream_pb2.Challenge(protocol_version=1, nonce=b"n" * 32)
        ),
        NOW,
    )
    if state is DaemonState.CHALLENGED:
        return daemon
    daemon.attest(b"s" * 64)
    if state is DaemonState.ATTESTING:
        return daemon
    daemon.close()
    return daemon


def _valid_relay_message(kind: str) -> stream_pb2.RelayMessage:
    msg = stream_pb2.RelayMessage()
    body = getattr(msg, kind)
    body.SetInParent()
    if kind == "challenge":
        body.protocol_version, body.nonce = 1, b"n" * 32
    elif kind == "accepted":
        body.node_id = "node-1"
    elif kind == "command":
        body.command_id, body.tool = "c-new", "edge.ping"
    elif kind in ("token_refresh", "key_rotated"):
        body.node_token = "tok"
    return msg


@pytest.mark.parametrize("state", list(DaemonState))
@pytest.mark.parametrize("kind", _RELAY_KINDS)
def test_daemon_every_state_and_message(state: DaemonState, kind: str) -> None:
    daemon = _daemon_in(state)
    open_kinds = {
        "heartbeat_ack",
        "cancel",
        "result_ack",
        "token_refresh",
        "key_rotated",
        "revoked",
    }
    allowed = {
        DaemonState.HELLO_SENT: {"challenge", "refused"},
        DaemonState.CHALLENGED: {"refused"},
        DaemonState.ATTESTING: {"accepted", "refused"},
        DaemonState.ACCEPTED: open_kinds | {"command", "drain"},
        DaemonState.DRAINING: open_kinds,
    }.get(state, set())
    if kind in allowed:
        assert daemon.receive(_valid_relay_message(kind), NOW)
    else:
        with pytest.raises(RemoteProtocolError):
            daemon.receive(_valid_relay_message(kind), NOW)
        assert daemon.state is DaemonState.CLOSED


# ------------------------------------------------------ random interleavings and garbage


class StreamMachine(RuleBasedStateMachine):
    """Both ends driven at random; frames may be dropped, duplicated or replaced by garbage.

    Invariants: only ProtocolError ever escapes; the relay reaches ACCEPTED only through a
    verify_attestation that succeeded for its own nonce; a closed session refuses everything.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ident = Identity.make(seed=7)
        self.daemon = DaemonSession()
        self.relay = RelaySession()
        self.verified_nonce: bytes | None = None
        self.hello: HelloReceived | None = None
        self.attestation: AttestationReceived | None = None
        self.to_relay: list[bytes] = []
        self.to_daemon: list[bytes] = []
        self.counter = 0

    def _daemon_call(self, fn: object, *args: object, **kwargs: object) -> None:
        try:
            fn(*args, **kwargs)  # type: ignore[operator]
        except LocalProtocolError:
            return
        self.to_relay += [m.SerializeToString() for m in self.daemon.messages_to_send()]

    def _relay_call(self, fn: object, *args: object, **kwargs: object) -> object:
        try:
            out = fn(*args, **kwargs)  # type: ignore[operator]
        except LocalProtocolError:
            return None
        self.to_daemon += [m.SerializeToString() for m in self.relay.messages_to_send()]
        return out

    @rule(features=st.sets(st.sampled_from([*sorted(FEATURES), "from-the-future"])))
    def daemon_hello(self, features: set[str]) -> None:
        self._daemon_call(
            self.daemon.hello,
            node_id="node-1",
            node_token=self.ident.token,
            capabilities=caps(),
            now=NOW,
            features=features,
        )

    @rule(good=st.booleans())
    def daemon_attest(self, good: bool) -> None:
        nonce = self.daemon.nonce or b"z" * 32
        sig = self.ident.sign(nonce) if good else self.ident.sign(b"wrong" * 8)
        self._daemon_call(self.daemon.attest, sig)

    @rule()
    def daemon_heartbeat(self) -> None:
        self._daemon_call(self.daemon.heartbeat, NOW)

    @rule(cid=st.sampled_from(["c0", "c1", "c2", "late"]))
    def daemon_result(self, cid: str) -> None:
        self._daemon_call(self.daemon.result, _result(cid))

    @rule()
    def relay_challenge(self) -> None:
        self._relay_call(self.relay.challenge, self.ident.rng.randbytes(32), NOW)

    @rule(ack_every=st.integers(min_value=1, max_value=3))
    def relay_verify_and_accept(self, ack_every: int) -> None:
        if self.relay.state is not RelayState.ATTESTED:
            self.relay_accept_forged()
            return
        assert self.hello is not None and self.attestation is not None
        try:
            verified = self.ident.verify(self.hello, self.attestation)
        except AttestationError as err:
            self._relay_call(self.relay.refuse, err.reason, err.message, NOW)
            return
        self.verified_nonce = verified.nonce
        self._relay_call(
            self.relay.accept,
            verified,
            heartbeat_interval_secs=30,
            stale_threshold_secs=90,
            now=NOW,
            features=self.hello.features,
            heartbeat_ack_every=ack_every,
        )

    @rule()
    def relay_accept_forged(self) -> None:
        # A proof made for no session of ours: accept must refuse it in every state.
        forged = VerifiedAttestation(
            node_id="node-1",
            tenant_id="tenant-a",
            nonce=b"f" * 32,
            key_thumbprint="k",
            token_jti="j",
            token_expired=False,
            token_expires_at=0.0,
        )
        state = self.relay.state
        with pytest.raises(LocalProtocolError):
            self.relay.accept(forged, heartbeat_interval_secs=30, stale_threshold_secs=90, now=NOW)
        assert self.relay.state is state

    @rule(cid=st.sampled_from(["c0", "c1", "c2"]))
    def relay_command(self, cid: str) -> None:
        self._relay_call(self.relay.send_command, command_id=cid, tool="edge.ping")

    @rule(cids=st.lists(st.sampled_from(["c0", "c1", "late"]), max_size=3))
    def relay_ack_results(self, cids: list[str]) -> None:
        self._relay_call(self.relay.ack_results, cids)

    @rule()
    def relay_drain(self) -> None:
        self._relay_call(self.relay.drain, "test")

    @rule()
    def relay_revoke(self) -> None:
        self._relay_call(self.relay.revoke, "test")

    @rule(data=st.binary(max_size=64), to_relay=st.booleans())
    def inject_garbage(self, data: bytes, to_relay: bool) -> None:
        (self.to_relay if to_relay else self.to_daemon).append(data)

    @rule(to_relay=st.booleans())
    def duplicate_last(self, to_relay: bool) -> None:
        queue = self.to_relay if to_relay else self.to_daemon
        if queue:
            queue.append(queue[-1])

    @precondition(lambda self: bool(self.to_relay))
    @rule()
    def deliver_to_relay(self) -> None:
        frame = self.to_relay.pop(0)
        closed_before = self.relay.state is RelayState.CLOSED
        try:
            events = self.relay.receive_bytes(frame, NOW)
        except ProtocolError as err:
            assert isinstance(err, RemoteProtocolError)
            assert self.relay.state is RelayState.CLOSED
            return
        assert not closed_before, "a closed relay session accepted a frame"
        for ev in events:
            if isinstance(ev, HelloReceived):
                self.hello = ev
            elif isinstance(ev, AttestationReceived):
                self.attestation = ev
        self.to_daemon += [m.SerializeToString() for m in self.relay.messages_to_send()]

    @precondition(lambda self: bool(self.to_daemon))
    @rule()
    def deliver_to_daemon(self) -> None:
        frame = self.to_daemon.pop(0)
        closed_before = self.daemon.state is DaemonState.CLOSED
        try:
            self.daemon.receive_bytes(frame, NOW)
        except ProtocolError as err:
            assert isinstance(err, RemoteProtocolError)
            assert self.daemon.state is DaemonState.CLOSED
            return
        assert not closed_before, "a closed daemon session accepted a frame"

    @invariant()
    def accepted_only_after_valid_attestation(self) -> None:
        if self.relay.state in (RelayState.ACCEPTED, RelayState.DRAINING):
            assert self.verified_nonce is not None
            assert self.verified_nonce == self.relay.nonce


StreamMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStreamMachine = StreamMachine.TestCase


@given(st.binary(max_size=256))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_escape_as_anything_but_protocol_error(data: bytes) -> None:
    for session in (RelaySession(), DaemonSession()):
        with contextlib.suppress(RemoteProtocolError):
            session.receive_bytes(data, NOW)
