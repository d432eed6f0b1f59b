"""The drain plan: a slot for every stream, spread over the takers' attestation rate."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis_edge_core.drain import (
    DEFAULT_FIRST_AFTER,
    DEFAULT_MAX_SPREAD,
    DrainSlot,
    back_within,
    drain_plan,
    hint_at,
)

FAST = settings(max_examples=200, deadline=None)

counts = st.integers(min_value=0, max_value=5000)
rates = st.floats(min_value=0.5, max_value=1e5, allow_nan=False, allow_infinity=False)
seconds = st.floats(min_value=0, max_value=600, allow_nan=False, allow_infinity=False)
endpoints = st.lists(
    st.from_regex(r"r[0-9]{1,3}\.example:[0-9]{2,5}", fullmatch=True), max_size=5, unique=True
)


def test_ten_thousand_streams_to_one_relay_come_back_at_its_rate() -> None:
    plan = drain_plan(10_000, attest_rate=400.0)
    assert len(plan) == 10_000
    assert plan[0] == DrainSlot(DEFAULT_FIRST_AFTER, "")
    # 10k at 400/s take 25 s: the last slot is 25 s after the first, less one arrival.
    assert plan[-1].reconnect_after_secs == pytest.approx(1.0 + 25.0 - 1 / 400)
    per_second = Counter(int(slot.reconnect_after_secs) for slot in plan)
    assert max(per_second.values()) == 400  # never more than the rate in any second


def test_in_a_cluster_the_streams_go_round_robin_to_the_other_relays() -> None:
    plan = drain_plan(9, attest_rate=3.0, targets=("b:1", "c:1", "d:1"), first_after=0.5)
    assert [s.relay_endpoint for s in plan] == ["b:1", "c:1", "d:1"] * 3
    # three takers at 3/s each: 9 streams over one second, not three
    assert [round(s.reconnect_after_secs, 3) for s in plan] == [
        round(0.5 + i / 9, 3) for i in range(9)
    ]


def test_a_fleet_too_large_for_the_rate_is_capped_at_max_spread() -> None:
    plan = drain_plan(1000, attest_rate=1.0, max_spread=10.0, first_after=2.0)
    assert plan[-1].reconnect_after_secs == pytest.approx(2.0 + 10.0 * 999 / 1000)


def test_nothing_to_drain_and_bad_arguments() -> None:
    assert drain_plan(0) == []
    for bad in ({"attest_rate": 0.0}, {"attest_rate": -1.0}, {"attest_rate": math.inf}):
        with pytest.raises(ValueError, match="attest_rate"):
            drain_plan(3, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count"):
        drain_plan(-1)
    with pytest.raises(ValueError, match="first_after"):
        drain_plan(3, first_after=math.nan)
    with pytest.raises(ValueError, match="max_spread"):
        drain_plan(3, max_spread=-1.0)
    with pytest.raises(TypeError, match="not a string"):
        drain_plan(3, targets="b:1")


@FAST
@given(count=counts, rate=rates, targets=endpoints, first=seconds, cap=seconds)
def test_every_stream_gets_one_bounded_slot_deterministically(
    count: int, rate: float, targets: list[str], first: float, cap: float
) -> None:
    plan = drain_plan(count, attest_rate=rate, targets=targets, first_after=first, max_spread=cap)
    assert len(plan) == count  # every stream gets a slot
    assert plan == drain_plan(
        count, attest_rate=rate, targets=targets, first_after=first, max_spread=cap
    )  # the same inputs, the same plan
    afters = [s.reconnect_after_secs for s in plan]
    assert all(first <= a <= first + cap for a in afters)  # the spread is bounded
    assert afters == sorted(afters)
    if count:
        # never wider than the takers need at their rate
        assert afters[-1] - afters[0] <= count / (rate * max(1, len(targets))) + 1e-9
    where = Counter(s.relay_endpoint for s in plan)
    if targets and count:
        assert set(where) <= set(targets)
        assert max(where.values()) - min(where.values()) <= 1 or len(where) < len(targets)
    elif count:
        assert set(where) == {""}


@FAST
@given(count=st.integers(1, 3000), rate=rates, targets=endpoints, first=seconds)
def test_no_taker_gets_more_than_its_rate_when_uncapped(
    count: int, rate: float, targets: list[str], first: float
) -> None:
    plan = drain_plan(count, attest_rate=rate, targets=targets, first_after=first, max_spread=1e9)
    for target in set(s.relay_endpoint for s in plan):
        mine = [s.reconnect_after_secs for s in plan if s.relay_endpoint == target]
        gaps = [b - a for a, b in itertools.pairwise(mine)]
        assert all(gap >= 1 / rate - 1e-9 for gap in gaps)  # float rounding, no more


def test_a_successor_waits_for_the_last_slot_plus_one_first_step() -> None:
    # 10k at 400/s: the last daemon is due 1 s + 25 s (less one arrival) after the drain,
    # and one more first step covers its jitter and handshake.
    assert back_within(10_000, attest_rate=400.0) == pytest.approx(1.0 + 25.0 - 1 / 400 + 1.0)
    # nothing drained still leaves one slot's wait: a daemon dropped at the very end
    assert back_within(0) == back_within(1) == pytest.approx(2 * DEFAULT_FIRST_AFTER)
    with pytest.raises(ValueError, match="attest_rate"):
        back_within(3, attest_rate=0.0)


@FAST
@given(count=counts, rate=rates, first=seconds)
def test_every_slot_is_due_before_the_successor_stops_waiting(
    count: int, rate: float, first: float
) -> None:
    plan = drain_plan(count, attest_rate=rate, first_after=first)
    window = back_within(count, attest_rate=rate, first_after=first)
    assert all(slot.reconnect_after_secs + first / 2 <= window for slot in plan)


def test_a_drain_written_late_keeps_its_slot() -> None:
    # the plan started at 100.0; slot 3.5 s in, its Drain written 2.25 s into the drain
    assert hint_at(103.5, 102.25, first_after=0.5) == pytest.approx(1.25)
    assert hint_at(103.5, 100.0) == pytest.approx(3.5)
    # written less than a first step before its slot, or after it: one first step
    assert hint_at(103.5, 103.0) == DEFAULT_FIRST_AFTER
    assert hint_at(103.5, 104.0, first_after=0.25) == 0.25
    with pytest.raises(ValueError):
        hint_at(math.nan, 1.0)
    with pytest.raises(ValueError):
        hint_at(1.0, math.inf)
    with pytest.raises(ValueError):
        hint_at(1.0, 0.0, first_after=-1.0)


@FAST
@given(
    count=st.integers(1, 3000),
    rate=rates,
    first=seconds,
    write_rate=st.floats(min_value=0.5, max_value=1e5, allow_nan=False),
)
def test_drains_written_faster_than_the_rate_return_at_their_slots(
    count: int, rate: float, first: float, write_rate: float
) -> None:
    """Stream i's Drain written i / write_rate s into the drain: it comes back at its slot
    when the writes outpace the rate, else one first step after its write; never earlier
    than either."""
    plan = drain_plan(count, attest_rate=rate, first_after=first)
    for i, slot in enumerate(plan):
        written = i / write_rate
        back = written + hint_at(slot.reconnect_after_secs, written, first_after=first)
        assert back == pytest.approx(max(slot.reconnect_after_secs, written + first))
        if write_rate >= max(rate, count / DEFAULT_MAX_SPREAD):  # the plan's own rate
            assert back == pytest.approx(slot.reconnect_after_secs)
