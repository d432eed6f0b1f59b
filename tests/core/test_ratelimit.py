"""The core's token-bucket rate limits: exact arithmetic, bounded memory, hypothesis laws."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis_edge_core.errors import ConfigError
from aegis_edge_core.ratelimit import (
    DEFAULT_ATTEST_PER_NODE,
    DEFAULT_ATTEST_PER_SOURCE,
    DEFAULT_ENROLL_PER_SOURCE,
    AttemptLimits,
    KeyedLimiter,
    Limit,
    TokenBucket,
    source_of,
)


def test_parse() -> None:
    assert Limit.parse("30/1m") == Limit(burst=30, rate=0.5)
    assert Limit.parse("5/s") == Limit(burst=5, rate=5)
    assert Limit.parse("100/500ms") == Limit(burst=100, rate=200)
    assert Limit.parse("2/h") == Limit(burst=2, rate=2 / 3600)
    assert Limit.parse("off") is None and Limit.parse("0") is None
    for bad in ("", "x/1m", "30", "30/1y", "0.5/s", "-1/s", "30/0s"):
        with pytest.raises(ConfigError):
            Limit.parse(bad)
    for text in (DEFAULT_ATTEST_PER_NODE, DEFAULT_ATTEST_PER_SOURCE, DEFAULT_ENROLL_PER_SOURCE):
        assert Limit.parse(text) is not None
    with pytest.raises(ValueError):
        Limit(burst=0.5, rate=1)
    with pytest.raises(ValueError):
        Limit(burst=1, rate=math.inf)


def test_bucket_burst_then_refill() -> None:
    bucket = TokenBucket.full(Limit(burst=3, rate=1), now=100.0)
    assert [bucket.take(100.0).allowed for _ in range(4)] == [True, True, True, False]
    refused = bucket.take(100.0)
    assert not refused.allowed and refused.retry_after == pytest.approx(1.0)
    assert not bucket.take(100.5).allowed
    assert bucket.take(101.0).allowed
    # the clock stepping back refills nothing and raises nothing
    assert not bucket.take(50.0).allowed
    with pytest.raises(ValueError):
        bucket.take(math.nan)


def test_defaults_admit_a_10k_storm_from_one_address() -> None:
    limit = Limit.parse(DEFAULT_ATTEST_PER_SOURCE)
    node_limit = Limit.parse(DEFAULT_ATTEST_PER_NODE)
    assert limit is not None and node_limit is not None
    limits = AttemptLimits(per_source=KeyedLimiter(limit), per_node=KeyedLimiter(node_limit))
    now = 1000.0
    refused = 0
    for i in range(10_000):
        now += 0.0001  # 10k attempts in one second
        refused += not limits.check(now, source="127.0.0.1", node=f"n-{i}").allowed
    assert refused == 0


def test_looping_daemon_is_limited_per_node() -> None:
    node_limit = Limit.parse(DEFAULT_ATTEST_PER_NODE)
    assert node_limit is not None
    limits = AttemptLimits(per_node=KeyedLimiter(node_limit))
    allowed = sum(limits.check(0.01 * i, source="a", node="n-1").allowed for i in range(1000))
    # 10 s of a tight loop: the burst of 30 plus 0.5/s
    assert 30 <= allowed <= 36
    # another node is unaffected
    assert limits.check(10.0, source="a", node="n-2").allowed


def test_all_or_nothing() -> None:
    limits = AttemptLimits(
        per_source=KeyedLimiter(Limit(burst=1, rate=0.001)),
        per_node=KeyedLimiter(Limit(burst=5, rate=0.001)),
    )
    assert limits.check(0, source="s", node="n").allowed
    d = limits.check(0, source="s", node="n")
    assert not d.allowed and d.retry_after == pytest.approx(1000)
    # the refused attempt took nothing from the node's bucket: 4 left for other sources
    assert sum(limits.check(0, source=f"s{i}", node="n").allowed for i in range(10)) == 4


def test_memory_bounded_full_buckets_forgotten_first() -> None:
    lim = KeyedLimiter(Limit(burst=1, rate=1), max_keys=3)
    lim.take("a", 0.0)
    lim.take("b", 0.0)
    lim.take("c", 10.0)  # a and b have refilled by now
    lim.take("d", 10.0)
    assert len(lim) <= 3
    # c (empty, recent) survives: it is still refused
    assert not lim.take("c", 10.0).allowed
    for i in range(100):
        lim.take(f"k{i}", 10.0)
    assert len(lim) == 3


def test_source_of() -> None:
    assert source_of("ipv4:127.0.0.1:5123") == "127.0.0.1"
    assert source_of("ipv6:[::1]:5123") == "::1"
    assert source_of("unix:/tmp/sock") == "/tmp/sock"
    assert source_of("weird") == "weird"


times = st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(
    burst=st.integers(min_value=1, max_value=50),
    rate=st.floats(min_value=0.01, max_value=100),
    steps=times,
)
def test_never_more_than_burst_plus_refill(burst: int, rate: float, steps: list[float]) -> None:
    """Over any window, allowed attempts <= burst + rate * elapsed (the bucket's law);
    retry_after of a refusal is exact: an attempt at now + retry_after is allowed."""
    steps = sorted(steps)
    bucket = TokenBucket.full(Limit(burst=burst, rate=rate), steps[0])
    allowed = 0
    for now in steps:
        d = bucket.take(now)
        if d.allowed:
            allowed += 1
        else:
            assert d.retry_after > 0
            probe = TokenBucket(bucket.limit, bucket.tokens, bucket.updated_at)
            assert probe.take(now + d.retry_after * (1 + 1e-9) + 1e-9).allowed
        assert 0 <= bucket.tokens <= burst + 1e-9
    assert allowed <= burst + rate * (steps[-1] - steps[0]) + 1e-6


@settings(max_examples=100, deadline=None)
@given(
    keys=st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=80),
    max_keys=st.integers(min_value=1, max_value=5),
)
def test_keyed_bounded_and_independent(keys: list[str], max_keys: int) -> None:
    lim = KeyedLimiter(Limit(burst=2, rate=0.5), max_keys=max_keys)
    for i, key in enumerate(keys):
        lim.take(key, i * 0.1)
        assert len(lim) <= max_keys


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False), max_size=60))
def test_clock_steps_back_never_refill(steps: list[float]) -> None:
    lim = KeyedLimiter(Limit(burst=3, rate=1))
    seen = -math.inf
    for now in steps:
        before = lim._bucket("k", max(now, seen) if seen > -math.inf else now).tokens
        lim.take("k", now)
        after = lim._bucket("k", now).tokens
        if now <= seen:
            assert after <= before
        seen = max(seen, now)
        assert 0 <= after <= 3
