"""Reconnect backoff: bounds with jitter, the cap, the reset rule, determinism."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis_edge_core.backoff import (
    BACKOFF_TRANSITIONS,
    DEFAULT_DRAIN_WINDOW,
    DEFAULT_SCHEDULE,
    Backoff,
    BackoffPolicy,
    BackoffProtocolError,
    LinkState,
)
from aegis_edge_core.errors import ConfigError, LocalProtocolError

FAST = settings(max_examples=150, deadline=None)

schedules = st.lists(
    st.floats(min_value=0.001, max_value=3600, allow_nan=False), min_size=1, max_size=8
).map(sorted)
policies = st.builds(
    BackoffPolicy,
    schedule=schedules,
    jitter=st.floats(min_value=0, max_value=1),
    reset_after=st.none() | st.floats(min_value=0, max_value=1000),
)
# A connection loop's life: failed attempts, and connections that last some seconds.
ops = st.lists(
    st.one_of(
        st.just(("fail", 0.0)),
        st.tuples(st.just("session"), st.floats(min_value=0, max_value=500)),
    ),
    max_size=40,
)


def test_defaults_are_the_seed_schedule() -> None:
    policy = BackoffPolicy()
    assert policy.schedule == DEFAULT_SCHEDULE == (1.0, 2.0, 5.0, 15.0, 60.0)
    assert policy.cap == 60.0
    assert policy.jitter == 0.5
    assert policy.reset_after_secs == 120.0


def test_without_jitter_the_schedule_is_exact_and_capped() -> None:
    b = Backoff(BackoffPolicy(jitter=0))
    rng = random.Random(0)
    assert [b.next_delay(rng) for _ in range(8)] == [1, 2, 5, 15, 60, 60, 60, 60]
    assert b.attempt == 8


@FAST
@given(policy=policies, seed=st.integers(0, 2**32), life=ops)
def test_delays_stay_in_bounds_and_reset_as_documented(
    policy: BackoffPolicy, seed: int, life: list[tuple[str, float]]
) -> None:
    b = Backoff(policy)
    rng = random.Random(seed)
    now = 0.0
    expected_attempt = 0
    for kind, up_for in life:
        if kind == "session":
            b.connected(now)
            start, now = now, now + up_for
            reset = b.disconnected(now)
            assert reset == (now - start >= policy.reset_after_secs)
            if reset:
                expected_attempt = 0
        step = policy.schedule[min(expected_attempt, len(policy.schedule) - 1)]
        delay = b.next_delay(rng)
        assert step * (1 - policy.jitter) <= delay <= step
        assert delay <= policy.cap
        assert delay > 0 or policy.jitter == 1
        expected_attempt += 1
        assert b.attempt == expected_attempt
        now += delay


@FAST
@given(policy=policies, seed=st.integers(0, 2**32), life=ops)
def test_same_seed_same_delays(
    policy: BackoffPolicy, seed: int, life: list[tuple[str, float]]
) -> None:
    def run() -> list[float]:
        b = Backoff(policy)
        rng = random.Random(seed)
        out, now = [], 0.0
        for kind, up_for in life:
            if kind == "session":
                b.connected(now)
                now += up_for
                b.disconnected(now)
            out.append(b.next_delay(rng))
        return out

    assert run() == run()


def test_reset_rule_boundary() -> None:
    policy = BackoffPolicy(jitter=0)  # reset_after = 2 x cap = 120 s
    rng = random.Random(1)
    b = Backoff(policy)
    for _ in range(4):
        b.next_delay(rng)
    b.connected(1000.0)
    assert b.disconnected(1000.0 + 119.999) is False  # flapping: keeps climbing
    assert b.next_delay(rng) == 60.0
    b.connected(2000.0)
    assert b.disconnected(2000.0 + 120.0) is True  # stayed up long enough
    assert b.attempt == 0
    assert b.next_delay(rng) == 1.0


def test_explicit_reset_after_and_manual_reset() -> None:
    b = Backoff(BackoffPolicy(jitter=0, reset_after=10))
    rng = random.Random(2)
    b.next_delay(rng)
    b.next_delay(rng)
    b.connected(0.0)
    assert b.disconnected(10.0) is True
    b.next_delay(rng)
    b.reset()
    assert b.attempt == 0


def test_a_relay_restart_spreads_ten_thousand_daemons() -> None:
    # Every daemon was healthy for hours, the relay restarts: all reset and draw a first delay.
    first = []
    for i in range(10_000):
        b = Backoff()
        b.connected(0.0)
        b.disconnected(3600.0)
        first.append(b.next_delay(random.Random(i)))
    assert min(first) >= 0.5
    assert max(first) <= 1.0
    buckets = [0] * 10
    for d in first:
        buckets[min(int((d - 0.5) / 0.05), 9)] += 1
    assert max(buckets) < 1_300  # roughly uniform: no bucket holds the herd


def test_a_drain_hint_is_jittered_never_early_and_does_not_climb() -> None:
    # A relay restart drains every daemon with the same "come back after 1 s" at once.
    waits = []
    for i in range(10_000):
        b = Backoff()
        b.connected(0.0)
        b.disconnected(5.0)
        wait = b.after_drain(1.0, random.Random(i))
        assert wait is not None
        waits.append(wait)
        assert b.attempt == 0  # a polite disconnect, not a failure
    assert min(waits) >= 1.0  # never before the relay asked
    assert max(waits) <= 1.5  # [X, X * (1 + jitter)]
    buckets = [0] * 10
    for w in waits:
        buckets[min(int((w - 1.0) / 0.05), 9)] += 1
    assert max(buckets) < 1_300  # not one burst
    b = Backoff()
    assert b.after_drain(0.0, random.Random(0)) is None  # no hint: use the schedule
    assert b.after_drain(float("nan"), random.Random(0)) is None
    assert Backoff(BackoffPolicy(jitter=0)).after_drain(2.0, random.Random(0)) == 2.0


def test_calls_out_of_order_raise() -> None:
    b = Backoff()
    rng = random.Random(0)
    assert b.disconnected(1.0) is False  # documented no-op: a failed attempt
    b.connected(2.0)
    assert b.state is LinkState.CONNECTED
    assert b.connected_at == 2.0
    with pytest.raises(BackoffProtocolError, match="next_delay"):
        b.next_delay(rng)
    with pytest.raises(BackoffProtocolError) as info:
        b.connected(3.0)
    assert isinstance(info.value, LocalProtocolError)
    assert len(BACKOFF_TRANSITIONS) == 4
    with pytest.raises(BackoffProtocolError, match="finite"):
        b.disconnected(float("inf"))


@pytest.mark.parametrize(
    ("kwargs", "path"),
    [
        ({"schedule": []}, "backoff.schedule"),
        ({"schedule": [1, -2]}, "backoff.schedule[1]"),
        ({"schedule": [5, 2]}, "backoff.schedule[1]"),
        ({"schedule": [1, "2"]}, "backoff.schedule[1]"),
        ({"schedule": "1,2"}, "backoff.schedule"),
        ({"jitter": 1.5}, "backoff.jitter"),
        ({"jitter": True}, "backoff.jitter"),
        ({"reset_after": -1}, "backoff.reset_after"),
    ],
)
def test_policy_is_validated(kwargs: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        BackoffPolicy(**kwargs)  # type: ignore[arg-type]
    assert info.value.path == path


def test_drain_window_defaults_and_validation() -> None:
    assert BackoffPolicy().drain_window == DEFAULT_DRAIN_WINDOW == 10.0
    for bad in (-1, float("inf"), float("nan"), True, "5"):
        with pytest.raises(ConfigError) as info:
            BackoffPolicy(drain_window=bad)  # type: ignore[arg-type]
        assert info.value.path == "backoff.drain_window"


def test_failures_right_after_a_drain_stay_at_the_bottom() -> None:
    # A relay restart: drained at t=100, the new relay listens only at t=120.
    b = Backoff(BackoffPolicy(jitter=0, drain_window=30.0))
    rng = random.Random(0)
    for _ in range(3):  # an earlier outage had climbed the ladder
        b.next_delay(rng)
    b.connected(10.0)
    assert b.after_drain(1.0, rng, now=100.0) == 1.0
    assert b.attempt == 0 and b.drained_at == 100.0
    b.disconnected(100.0)
    waits = [b.next_delay(rng, now=101.0 + i) for i in range(20)]
    assert waits == [1.0] * 20  # refused by a closed port: no climbing
    assert b.attempt == 0
    b.connected(121.0)
    assert b.drained_at is None  # accepted: the window is over
    b.disconnected(122.0)
    assert [b.next_delay(rng, now=123.0 + i) for i in range(3)] == [1.0, 2.0, 5.0]


def test_after_the_drain_window_the_schedule_climbs_again() -> None:
    b = Backoff(BackoffPolicy(jitter=0, drain_window=10.0))
    rng = random.Random(0)
    b.after_drain(1.0, rng, now=0.0)
    assert b.next_delay(rng, now=10.0) == 1.0  # the window is closed: [0, 10]
    assert [b.next_delay(rng, now=10.5 + i) for i in range(3)] == [1.0, 2.0, 5.0]
    assert b.drained_at is None


def test_without_now_a_drain_changes_nothing_for_next_delay() -> None:
    b = Backoff(BackoffPolicy(jitter=0))
    rng = random.Random(0)
    b.next_delay(rng)
    b.after_drain(1.0, rng)  # the old call: no window, no reset
    assert b.attempt == 1 and b.drained_at is None
    assert b.next_delay(rng) == 2.0


@FAST
@given(
    policy=policies,
    seed=st.integers(0, 2**32),
    drained_at=st.floats(min_value=0, max_value=1e6),
    gaps=st.lists(st.floats(min_value=0, max_value=100), max_size=30),
)
def test_drain_window_property(
    policy: BackoffPolicy, seed: int, drained_at: float, gaps: list[float]
) -> None:
    """Within the window every wait is a jittered bottom step and nothing climbs; the first
    failure past the window climbs from the bottom; waits never exceed the cap."""
    b = Backoff(policy)
    rng = random.Random(seed)
    b.after_drain(1.0, rng, now=drained_at)
    low, high = policy.bounds(0)
    now = drained_at
    closed = False
    for gap in gaps:
        now += gap
        inside = not closed and now - drained_at <= policy.drain_window
        before = b.attempt
        wait = b.next_delay(rng, now=now)
        assert wait <= policy.cap
        if inside:
            assert low <= wait <= high
            assert b.attempt == before == 0
        else:
            closed = True
            lo, hi = policy.bounds(before)
            assert lo <= wait <= hi
            assert b.attempt == before + 1


def test_a_spread_drain_hint_keeps_the_relays_spacing() -> None:
    # A relay that gives each stream its own slot (aegis_edge_core.drain): the daemon's
    # jitter adds at most half a first step, not half the slot, so slot 20 s stays
    # within [20, 20.5] and does not smear into the next 10 s of slots.
    for i in range(1000):
        wait = Backoff().after_drain(20.0, random.Random(i))
        assert wait is not None and 20.0 <= wait <= 20.5
    small = Backoff().after_drain(0.2, random.Random(1))
    assert small is not None and 0.2 <= small <= 0.3  # below the first step: in proportion
