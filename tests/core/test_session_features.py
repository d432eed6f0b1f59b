"""Optional stream features: negotiation both ways, coalesced heartbeat acks, batched acks."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis_edge_core import daemon_rules
from aegis_edge_core.errors import LocalProtocolError, ProtocolError
from aegis_edge_core.handshake import (
    FEATURES,
    HEARTBEAT_ACK_COALESCE,
    HEARTBEAT_KEEPALIVE,
    KEEPALIVE_ACK_SPREAD,
    RESULT_ACK_BATCH,
    RESULT_ACK_DEFERRED,
    grant,
    heartbeat_ack_every,
    keepalive_fits,
    negotiate,
)
from aegis_edge_core.session import (
    AttestationReceived,
    DaemonSession,
    HeartbeatAcked,
    HelloReceived,
    RelaySession,
    ResultAcked,
    SessionAccepted,
)
from aegis_edge_core.wire import stream_pb2

from .session_rig import NOW, Identity, caps, to_daemon, to_relay

KEEPALIVE_30S = daemon_rules.keepalive_plan(30, 90).bound_secs


def _connect(
    *,
    offer: tuple[str, ...],
    use: tuple[str, ...] | None = None,
    ack_every: int = 2,
    keepalive_secs: float = KEEPALIVE_30S,
) -> tuple[DaemonSession, RelaySession, SessionAccepted]:
    """A handshake where the daemon offers ``offer`` (with a keepalive for 30 s / 90 s)
    and the relay uses ``use`` (default: everything offered that it knows)."""
    ident = Identity.make()
    daemon, relay = DaemonSession(), RelaySession()
    daemon.hello(
        node_id=ident.node_id,
        node_token=ident.token,
        capabilities=caps(),
        now=NOW,
        features=offer,
        keepalive_secs=keepalive_secs,
    )
    (hello,) = to_relay(daemon, relay)
    assert isinstance(hello, HelloReceived)
    relay.challenge(ident.rng.randbytes(32), NOW)
    (challenge,) = to_daemon(relay, daemon)
    daemon.attest(ident.sign(challenge.nonce))  # type: ignore[attr-defined]
    (att,) = to_relay(daemon, relay)
    assert isinstance(att, AttestationReceived)
    relay.accept(
        ident.verify(hello, att),
        heartbeat_interval_secs=30,
        stale_threshold_secs=90,
        now=NOW,
        features=hello.features if use is None else use,
        heartbeat_ack_every=ack_every,
    )
    (accepted,) = to_daemon(relay, daemon)
    assert isinstance(accepted, SessionAccepted)
    return daemon, relay, accepted


def test_negotiate_keeps_known_names_and_ignores_a_newer_peers() -> None:
    assert negotiate(["result-ack-batch", "from-the-future", HEARTBEAT_ACK_COALESCE]) == (
        HEARTBEAT_ACK_COALESCE,
        RESULT_ACK_BATCH,
    )
    assert negotiate([]) == ()
    assert negotiate(FEATURES, supported=()) == ()


def test_both_new_ends_agree_on_every_feature() -> None:
    _daemon, relay, accepted = _connect(offer=tuple(FEATURES))
    assert set(accepted.features) == FEATURES == relay.features
    assert accepted.heartbeat_ack_every == 2


def test_new_daemon_with_a_relay_that_uses_no_features_gets_todays_behaviour() -> None:
    daemon, relay, accepted = _connect(offer=tuple(FEATURES), use=(), ack_every=5)
    assert accepted.features == () and accepted.heartbeat_ack_every == 1
    for _ in range(3):
        daemon.heartbeat(NOW)
        to_relay(daemon, relay)
        assert [type(e) for e in to_daemon(relay, daemon)] == [HeartbeatAcked]
    relay.ack_results(["a", "b"])
    msgs = relay.messages_to_send()
    assert [m.result_ack.command_id for m in msgs] == ["a", "b"]
    assert all(not m.result_ack.command_ids for m in msgs)


def test_old_style_hello_with_a_new_relay() -> None:
    """A hello without features (an older daemon): the relay cannot use any, acks every
    heartbeat and answers each result on its own."""
    ident = Identity.make()
    daemon, relay = DaemonSession(), RelaySession()
    daemon.hello(node_id=ident.node_id, node_token=ident.token, capabilities=caps(), now=NOW)
    (hello,) = to_relay(daemon, relay)
    assert isinstance(hello, HelloReceived) and hello.features == ()
    relay.challenge(ident.rng.randbytes(32), NOW)
    (challenge,) = to_daemon(relay, daemon)
    daemon.attest(ident.sign(challenge.nonce))  # type: ignore[attr-defined]
    (att,) = to_relay(daemon, relay)
    assert isinstance(att, AttestationReceived)
    verified = ident.verify(hello, att)
    with pytest.raises(LocalProtocolError, match="did not offer"):
        relay.accept(
            verified,
            heartbeat_interval_secs=30,
            stale_threshold_secs=90,
            now=NOW,
            features=[HEARTBEAT_ACK_COALESCE],
        )
    relay.accept(
        verified, heartbeat_interval_secs=30, stale_threshold_secs=90, now=NOW, features=()
    )
    (msg,) = relay.messages_to_send()
    assert not msg.accepted.features and msg.accepted.heartbeat_ack_every == 0
    daemon.receive_bytes(msg.SerializeToString(), NOW)
    for seq in (1, 2, 3):
        daemon.heartbeat(NOW)
        to_relay(daemon, relay)
        (ack,) = to_daemon(relay, daemon)
        assert isinstance(ack, HeartbeatAcked) and ack.seq == seq


def test_a_feature_the_daemon_never_offered_is_ignored_by_it() -> None:
    daemon = DaemonSession()
    daemon.hello(node_id="node-1", node_token="t", capabilities=caps(), now=NOW)
    daemon.receive(
        stream_pb2.RelayMessage(
            challenge=stream_pb2.Challenge(protocol_version=1, nonce=b"n" * 32)
        ),
        NOW,
    )
    daemon.attest(b"s" * 64)
    msg = stream_pb2.RelayMessage()
    msg.accepted.node_id = "node-1"
    msg.accepted.features.append(HEARTBEAT_ACK_COALESCE)
    msg.accepted.heartbeat_ack_every = 9
    (accepted,) = daemon.receive(msg, NOW)
    assert isinstance(accepted, SessionAccepted)
    assert accepted.features == () and accepted.heartbeat_ack_every == 1


def test_coalesced_acks_keep_a_live_relay_below_the_stall_count() -> None:
    every = heartbeat_ack_every(30, 90)
    assert every == 2
    daemon, relay, accepted = _connect(offer=tuple(FEATURES), ack_every=every)
    plan = daemon_rules.heartbeat_plan(30, 90, ack_every=accepted.heartbeat_ack_every)
    acks = 0
    for _beat in range(12):
        # the daemon's check before each beat (aegis_edge_agent.connection._heartbeats)
        assert daemon.heartbeats_unacked < plan.stall_after
        daemon.heartbeat(NOW)
        to_relay(daemon, relay)
        acks += sum(isinstance(e, HeartbeatAcked) for e in to_daemon(relay, daemon))
    assert acks == 12 // every
    # A relay that stops after its last ack is called stalled after as many beats as
    # before: the stall count did not grow.
    assert plan.stall_after == daemon_rules.heartbeat_plan(30, 90).stall_after
    for _ in range(plan.stall_after):
        daemon.heartbeat(NOW)
    assert daemon.heartbeats_unacked >= plan.stall_after


def test_the_stall_count_always_exceeds_the_ack_interval() -> None:
    # a daemon whose own count is lower than the relay's ack interval would redial a live
    # relay: the interval the relay names wins, one more than it
    assert daemon_rules.heartbeat_plan(1, 10, stall_after=2, ack_every=4).stall_after == 5
    assert daemon_rules.heartbeat_plan(1, 10, stall_after=6, ack_every=4).stall_after == 6
    assert heartbeat_ack_every(0.5, 2) == 3
    assert heartbeat_ack_every(1, 1.5) == 1  # the minimum stall count of 2 leaves 1


def test_batched_result_ack_names_every_result_and_the_daemon_sees_each() -> None:
    daemon, relay, _ = _connect(offer=(HEARTBEAT_ACK_COALESCE, RESULT_ACK_BATCH))
    relay.ack_results(["c1", "c2", "c3"])
    (msg,) = relay.messages_to_send()
    assert list(msg.result_ack.command_ids) == ["c1", "c2", "c3"]
    assert msg.result_ack.command_id == ""
    events = daemon.receive_bytes(msg.SerializeToString(), NOW)
    assert [e.command_id for e in events if isinstance(e, ResultAcked)] == ["c1", "c2", "c3"]
    relay.ack_result("c4")  # one alone goes as an older relay sends it
    (single,) = relay.messages_to_send()
    assert single.result_ack.command_id == "c4" and not single.result_ack.command_ids


def test_heartbeat_keepalive_is_granted_only_within_the_stall_bound() -> None:
    fits = daemon_rules.keepalive_plan(30, 90).bound_secs
    assert fits == daemon_rules.stall_bound(30, 90) == 120
    offered = tuple(FEATURES)
    granted = grant(
        offered, FEATURES, keepalive_secs=fits, interval_secs=30, stale_threshold_secs=90
    )
    assert set(granted) == FEATURES
    for late in (fits + 1, 0.0, -1.0, math.inf, math.nan):
        assert HEARTBEAT_KEEPALIVE not in grant(
            offered, FEATURES, keepalive_secs=late, interval_secs=30, stale_threshold_secs=90
        )
    # a daemon set up for the default plan, at a relay with a 0.5 s / 2 s one
    assert HEARTBEAT_KEEPALIVE not in grant(
        offered, FEATURES, keepalive_secs=fits, interval_secs=0.5, stale_threshold_secs=2
    )
    # the relay session refuses to name it for a keepalive that does not fit
    with pytest.raises(LocalProtocolError, match="keepalive"):
        _connect(offer=offered, keepalive_secs=fits + 1)
    # an offer without the feature sends no keepalive
    daemon = DaemonSession()
    daemon.hello(node_id="n", node_token="t", capabilities=caps(), now=NOW, keepalive_secs=9)
    (hello,) = daemon.messages_to_send()
    assert hello.hello.keepalive_secs == 0


def test_keepalive_acks_are_sparse_and_a_live_relay_is_never_stalled() -> None:
    every = heartbeat_ack_every(30, 90, keepalive=True)
    assert every == 2 * KEEPALIVE_ACK_SPREAD == 10
    daemon, relay, accepted = _connect(
        offer=(HEARTBEAT_KEEPALIVE,), ack_every=every, keepalive_secs=KEEPALIVE_30S
    )
    assert accepted.features == (HEARTBEAT_KEEPALIVE,)
    assert accepted.heartbeat_ack_every == every
    plan = daemon_rules.heartbeat_plan(30, 90, ack_every=accepted.heartbeat_ack_every)
    assert plan.stall_after == every + 1  # a wedged relay: 11 beats
    acked = []
    for _beat in range(40):
        assert daemon.heartbeats_unacked < plan.stall_after
        daemon.heartbeat(NOW)
        to_relay(daemon, relay)
        acked += [e.seq for e in to_daemon(relay, daemon) if isinstance(e, HeartbeatAcked)]
    assert acked == [10, 20, 30, 40]


@settings(max_examples=300, deadline=None)
@given(
    interval=st.floats(min_value=0.05, max_value=3600),
    stale_factor=st.floats(min_value=0.5, max_value=20),
    keepalive=st.booleans(),
)
def test_any_plan_keeps_its_keepalive_in_the_bound_and_a_live_relay_connected(
    interval: float, stale_factor: float, keepalive: bool
) -> None:
    stale = interval * stale_factor
    ka = daemon_rules.keepalive_plan(interval, stale)
    # the daemon's own keepalive for the plan always fits it, pings and waits a while
    assert keepalive_fits(ka.bound_secs, interval, stale)
    assert ka.time_secs >= interval * (1 - 1e-9) and ka.timeout_secs == 2 * interval
    options = dict(ka.channel_options())
    assert options["grpc.http2.max_pings_without_data"] == 0
    assert options["grpc.http2.ping_timeout_ms"] == options["grpc.keepalive_timeout_ms"] >= 1
    # whatever the relay names, the daemon's stall count stays above it: a live relay that
    # acks one beat in `every` is never called stalled
    every = heartbeat_ack_every(interval, stale, keepalive=keepalive)
    plan = daemon_rules.heartbeat_plan(interval, stale, ack_every=every)
    assert plan.stall_after > every
    if not keepalive:  # coalescing alone keeps the bound of every beat acked
        assert plan.stall_after == daemon_rules.heartbeat_plan(interval, stale).stall_after


def _beat(daemon: DaemonSession, relay: RelaySession) -> list[stream_pb2.RelayMessage]:
    daemon.heartbeat(NOW)
    to_relay(daemon, relay)
    return relay.messages_to_send()


def test_deferred_result_acks_go_out_as_the_next_heartbeats_ack() -> None:
    daemon, relay, accepted = _connect(offer=tuple(FEATURES), ack_every=2)
    assert RESULT_ACK_DEFERRED in accepted.features and daemon.features == FEATURES
    assert _beat(daemon, relay) == []  # beat 1: not due an ack
    (first,) = _beat(daemon, relay)  # beat 2: acked (one in two)
    assert first.WhichOneof("body") == "heartbeat_ack"
    daemon.receive_bytes(first.SerializeToString(), NOW)
    relay.ack_results(["c1"])
    relay.ack_results(["c2", "c3"])
    assert relay.messages_to_send() == []  # held: no message of their own
    (msg,) = _beat(daemon, relay)  # beat 3, not due a plain ack: the held acks are its ack
    assert msg.WhichOneof("body") == "result_ack"
    assert list(msg.result_ack.command_ids) == ["c1", "c2", "c3"]
    assert msg.result_ack.heartbeat_seq == 3 and msg.result_ack.relay_time == NOW
    events = daemon.receive_bytes(msg.SerializeToString(), NOW)
    assert [e.command_id for e in events if isinstance(e, ResultAcked)] == ["c1", "c2", "c3"]
    assert [e.seq for e in events if isinstance(e, HeartbeatAcked)] == [3]
    assert daemon.heartbeats_unacked == 0
    # the coalesced acks count from it: no write was added
    assert _beat(daemon, relay) == []
    (plain,) = _beat(daemon, relay)  # nothing held: a plain heartbeat ack
    assert plain.WhichOneof("body") == "heartbeat_ack" and plain.heartbeat_ack.seq == 5


def test_deferred_acks_still_held_go_out_before_a_drain_and_not_after() -> None:
    _daemon, relay, _ = _connect(offer=tuple(FEATURES))
    relay.ack_results(["c1", "c2"])
    relay.drain("restart", reconnect_after_secs=2.0)
    ack, drain = relay.messages_to_send()
    assert list(ack.result_ack.command_ids) == ["c1", "c2"]
    assert ack.result_ack.heartbeat_seq == 0
    assert drain.WhichOneof("body") == "drain"
    relay.ack_results(["c3"])  # draining: the stream is about to end, nothing is held
    (now,) = relay.messages_to_send()
    assert now.result_ack.command_id == "c3"


def test_without_result_ack_deferred_a_result_is_acked_at_once() -> None:
    for use in ((), (HEARTBEAT_ACK_COALESCE, RESULT_ACK_BATCH)):
        _daemon, relay, _ = _connect(offer=tuple(FEATURES), use=use)
        relay.ack_results(["c1"])
        (msg,) = relay.messages_to_send()
        assert msg.result_ack.command_id == "c1" and msg.result_ack.heartbeat_seq == 0


def test_a_daemon_that_did_not_negotiate_it_ignores_heartbeat_seq() -> None:
    daemon, _relay, _ = _connect(offer=(HEARTBEAT_ACK_COALESCE, RESULT_ACK_BATCH))
    daemon.heartbeat(NOW)
    msg = stream_pb2.RelayMessage()
    msg.result_ack.command_ids.append("c1")
    msg.result_ack.heartbeat_seq = 1
    events = daemon.receive(msg, NOW)
    assert [type(e) for e in events] == [ResultAcked]
    assert daemon.heartbeats_unacked == 1


def test_a_deferred_ack_naming_a_heartbeat_never_sent_is_a_protocol_error() -> None:
    daemon, _relay, _ = _connect(offer=tuple(FEATURES))
    daemon.heartbeat(NOW)
    msg = stream_pb2.RelayMessage()
    msg.result_ack.command_ids.append("c1")
    msg.result_ack.heartbeat_seq = 5
    with pytest.raises(ProtocolError, match="never sent"):
        daemon.receive(msg, NOW)
