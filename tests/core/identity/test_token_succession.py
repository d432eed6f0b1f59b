"""TokenSuccession: which earlier node tokens to revoke once the daemon confirms a new one,
and the heartbeat field that carries the confirmation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aegis_edge_core.identity.rotation import MAX_UNCONFIRMED_TOKENS, TokenSuccession
from aegis_edge_core.ratelimit import REFRESH_PER_NODE, KeyedLimiter
from aegis_edge_core.session import HeartbeatReceived, RelaySession, RelayState
from aegis_edge_core.wire import stream_pb2


def test_nothing_is_revoked_until_the_new_token_is_confirmed() -> None:
    chain = TokenSuccession.starting_with("A", expires_at=10.0)
    chain.issued("B", expires_at=20.0)
    chain.issued("C", expires_at=30.0)
    assert chain.pending == ("A", "B", "C")
    assert chain.confirmed("A") == []  # the daemon still holds the old one
    assert chain.confirmed("B") == [("A", 10.0)]
    assert chain.confirmed("C") == [("B", 20.0)]
    assert chain.confirmed("C") == []  # idempotent
    assert chain.pending == ("C",)


def test_an_unknown_jti_confirms_nothing() -> None:
    chain = TokenSuccession.starting_with("A", expires_at=10.0)
    chain.issued("B", expires_at=20.0)
    assert chain.confirmed("never-issued") == []
    assert chain.pending == ("A", "B")
    assert TokenSuccession.starting_with("", expires_at=0.0).pending == ()
    with pytest.raises(ValueError, match="jti"):
        chain.issued("", expires_at=1.0)
    with pytest.raises(ValueError, match="finite"):
        chain.issued("C", expires_at=float("inf"))


def test_the_chain_is_bounded() -> None:
    chain = TokenSuccession()
    for i in range(MAX_UNCONFIRMED_TOKENS + 5):
        chain.issued(f"t{i}", expires_at=float(i))
    assert len(chain.pending) == MAX_UNCONFIRMED_TOKENS
    assert chain.pending[-1] == f"t{MAX_UNCONFIRMED_TOKENS + 4}"


@given(st.integers(min_value=1, max_value=12), st.data())
def test_confirming_revokes_exactly_the_older_ones(n: int, data: st.DataObject) -> None:
    chain = TokenSuccession()
    for i in range(n):
        chain.issued(f"t{i}", expires_at=float(i))
    k = data.draw(st.integers(min_value=0, max_value=n - 1))
    revoked = chain.confirmed(f"t{k}")
    assert [jti for jti, _ in revoked] == [f"t{i}" for i in range(k)]
    assert chain.pending == tuple(f"t{i}" for i in range(k, n))


def test_heartbeat_carries_the_confirmation() -> None:
    relay = RelaySession()
    relay.state = RelayState.ACCEPTED
    msg = stream_pb2.DaemonMessage()
    msg.heartbeat.seq = 1
    msg.heartbeat.token_jti = "B"
    (event,) = relay.receive(msg, 0.0)
    assert isinstance(event, HeartbeatReceived) and event.token_jti == "B"
    msg.heartbeat.token_jti = ""
    msg.heartbeat.seq = 2
    (plain,) = relay.receive(msg, 0.0)
    assert isinstance(plain, HeartbeatReceived) and plain.token_jti == ""


def test_refresh_limit_default_is_six_an_hour_per_node() -> None:
    limiter = KeyedLimiter(REFRESH_PER_NODE)
    allowed = [limiter.take("n-1", 1000.0 + i * 0.01).allowed for i in range(50)]
    assert allowed.count(True) == 6 and all(allowed[:6])
    assert limiter.take("n-2", 1000.5).allowed  # per node
    assert limiter.take("n-1", 1000.0 + 601.0).allowed  # one refills every ten minutes
