"""The cluster rules: leases, holder generations, shown statuses, run takeover."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from aegis_edge_core.cluster import (
    MAX_LEASE_TTL,
    Holder,
    RelayLease,
    lease_live,
    lease_ttl,
    live_relays,
    must_drop_streams,
    release_applies,
    renew_every,
    run_takeover_due,
    shown_status,
    succeeding_generation,
)
from aegis_edge_core.health import DaemonStatus


def test_lease_lasts_half_the_stale_threshold_capped() -> None:
    assert lease_ttl(3.0) == 1.5
    assert lease_ttl(90.0) == MAX_LEASE_TTL
    assert renew_every(1.5) == 0.5
    with pytest.raises(ValueError):
        lease_ttl(0)


def test_lease_live_until_expiry() -> None:
    lease = RelayLease(relay_id="a", endpoint="h:1", expires_at=10.0)
    assert lease_live(lease, 9.99)
    assert not lease_live(lease, 10.0)
    assert not lease_live(None, 0.0)
    other = RelayLease(relay_id="b", endpoint="h:2", expires_at=20.0)
    assert live_relays([lease, other], 15.0) == {"b"}


def test_shown_status_follows_the_holders_lease() -> None:
    held = Holder(node_id="n", relay_id="b", generation=3, status=DaemonStatus.UNHEALTHY)
    assert shown_status(held, {"b"}) is DaemonStatus.UNHEALTHY
    assert shown_status(held, {"a"}) is DaemonStatus.DISCONNECTED
    assert shown_status(None, {"a", "b"}) is DaemonStatus.DISCONNECTED
    assert shown_status(held, {"b"}, revoked=True) is DaemonStatus.REVOKED


def test_run_takeover_when_coordinator_lease_lapses_or_relay_dies() -> None:
    assert not run_takeover_due("a", 10.0, {"a", "b"}, 5.0, this_relay="b")
    assert run_takeover_due("a", 10.0, {"a", "b"}, 10.0, this_relay="b")
    assert run_takeover_due("a", 10.0, {"b"}, 5.0, this_relay="b")
    # a lease naming this relay that it does not drive: left by its killed previous life
    assert run_takeover_due("b", 10.0, {"a", "b"}, 5.0, this_relay="b")


def test_a_relay_drops_its_streams_once_its_own_lease_lapsed() -> None:
    ttl = lease_ttl(3.0)
    renewed_at = 100.0
    expires = renewed_at + ttl
    others = {"b", "c"}
    # a store outage shorter than the lease costs nothing
    assert not must_drop_streams(expires, renewed_at, others)
    assert not must_drop_streams(expires, expires - 0.001, others)
    # from the moment the others may read its lease as lapsed, it holds nothing
    assert must_drop_streams(expires, expires, others)
    assert must_drop_streams(expires, expires + 60.0, others)
    # a renewal that got through pushes the moment back
    assert not must_drop_streams(expires + renew_every(ttl), expires, others)


def test_a_relay_that_was_alone_keeps_its_streams() -> None:
    # nowhere else to go: its daemons stay until the store is back
    assert not must_drop_streams(10.0, 60.0, set())


@pytest.mark.parametrize("now", [0.0, 9.0, 9.999, 10.0, 10.001, 50.0])
def test_dropping_streams_and_being_seen_dead_happen_together(now: float) -> None:
    own = RelayLease(relay_id="a", endpoint="h:1", expires_at=10.0)
    assert must_drop_streams(own.expires_at, now, {"b"}) == ("a" not in live_relays([own], now))


class HolderMachine(RuleBasedStateMachine):
    """Streams of one node open and close at several relays in any order; the holder row,
    changed only as the rules allow, always names the newest open stream or nobody."""

    def __init__(self) -> None:
        super().__init__()
        self.row: Holder | None = None
        self.open: list[tuple[str, int]] = []
        """Open streams (relay, generation), oldest first."""

    @rule(relay=st.sampled_from(["a", "b", "c"]))
    def attest(self, relay: str) -> None:
        generation = succeeding_generation(self.row)
        self.row = Holder(node_id="n", relay_id=relay, generation=generation)
        self.open.append((relay, generation))

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data())
    def hang_up(self, data: st.DataObject) -> None:
        relay, generation = self.open.pop(data.draw(st.integers(0, len(self.open) - 1)))
        if release_applies(self.row, relay, generation):
            assert self.row is not None
            self.row = Holder(node_id="n", relay_id="", generation=self.row.generation)

    @invariant()
    def row_names_the_newest_stream(self) -> None:
        newest = max(self.open, key=lambda s: s[1]) if self.open else None
        if self.row is None or self.row.relay_id == "":
            # nobody: every open stream is older than one that already hung up
            assert newest is None or (self.row is not None and newest[1] < self.row.generation)
        else:
            assert (self.row.relay_id, self.row.generation) == newest


TestHolderMachine = HolderMachine.TestCase
