"""The handshake guard: deadline and per-source cap, exact cases and a model-based law."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis_edge_core.errors import ConfigError, LocalProtocolError
from aegis_edge_core.handshake import (
    HANDSHAKE_TIMEOUT,
    TOO_MANY_UNATTESTED,
    HandshakeGuard,
    HandshakeLimits,
)


def test_limits_validate() -> None:
    assert HandshakeLimits().deadline_secs == 10.0
    assert HandshakeLimits().max_unattested_per_source == 1024
    assert HandshakeLimits(max_unattested_per_source=None).max_unattested_per_source is None
    for bad in (0, -1, math.inf, math.nan):
        with pytest.raises(ConfigError, match="handshake_timeout"):
            HandshakeLimits(deadline_secs=bad)
    for cap in (0, -3, 1.5, True):
        with pytest.raises(ConfigError, match="max_unattested_per_source"):
            HandshakeLimits(max_unattested_per_source=cap)  # type: ignore[arg-type]


def test_deadline_expires_in_order_and_names_the_reason() -> None:
    g = HandshakeGuard(HandshakeLimits(deadline_secs=2.0, max_unattested_per_source=None))
    assert g.next_deadline() is None and g.expire(0.0) == []
    assert g.admit(1, source="a", now=10.0) is None
    assert g.admit(2, source="b", now=10.5) is None
    assert g.admit(3, source="a", now=11.0) is None
    assert g.next_deadline() == 12.0
    assert g.expire(11.999) == []
    (first,) = g.expire(12.0)  # exactly at the deadline: due
    assert (first.stream_id, first.source, first.reason) == (1, "a", HANDSHAKE_TIMEOUT)
    assert first.grpc_status == "DEADLINE_EXCEEDED"
    assert "no hello/attestation within 2s" in first.message
    g.settle(2)  # attested in time
    assert g.next_deadline() == 13.0
    assert [r.stream_id for r in g.expire(50.0)] == [3]
    assert len(g) == 0 and g.pending("a") == 0


def test_cap_counts_only_unattested_streams_of_that_source() -> None:
    g = HandshakeGuard(HandshakeLimits(deadline_secs=10.0, max_unattested_per_source=2))
    assert g.admit(1, source="a", now=0.0) is None
    assert g.admit(2, source="a", now=0.0) is None
    refused = g.admit(3, source="a", now=0.0)
    assert refused is not None
    assert (refused.reason, refused.grpc_status) == (TOO_MANY_UNATTESTED, "RESOURCE_EXHAUSTED")
    assert "from a (2 open, cap 2)" in refused.message
    assert g.admit(4, source="b", now=0.0) is None  # another address is not affected
    g.settle(1)  # attested: it no longer counts
    assert g.admit(3, source="a", now=1.0) is None
    assert g.pending("a") == 2
    # a refused stream left nothing behind
    assert [r.stream_id for r in g.expire(10.0)] == [2, 4]
    assert [r.stream_id for r in g.expire(11.0)] == [3]


def test_settle_is_idempotent_and_double_admit_is_a_bug() -> None:
    g = HandshakeGuard(HandshakeLimits())
    g.settle(7)
    assert g.admit(7, source="a", now=0.0) is None
    with pytest.raises(LocalProtocolError):
        g.admit(7, source="a", now=0.0)
    g.settle(7)
    g.settle(7)
    assert len(g) == 0


def test_clock_stepping_back_never_postpones_an_expiry() -> None:
    g = HandshakeGuard(HandshakeLimits(deadline_secs=5.0))
    assert g.admit(1, source="a", now=100.0) is None
    assert g.admit(2, source="a", now=90.0) is None  # taken as 100.0
    assert g.next_deadline() == 105.0
    assert [r.stream_id for r in g.expire(105.0)] == [1, 2]
    with pytest.raises(ValueError):
        g.expire(math.nan)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.integers(0, 30), st.sampled_from("abc")),
        st.tuples(st.just("settle"), st.integers(0, 30), st.just("")),
        st.tuples(st.just("tick"), st.integers(0, 0), st.just("")),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(
    ops=ops,
    steps=st.lists(st.floats(0, 3, allow_nan=False), min_size=120, max_size=120),
    cap=st.one_of(st.none(), st.integers(1, 4)),
    deadline=st.floats(0.1, 5, allow_nan=False),
)
def test_matches_a_naive_model(
    ops: list[tuple[str, int, str]], steps: list[float], cap: int | None, deadline: float
) -> None:
    """Against a model that scans everything: same admissions, same expiries, and never
    more than ``cap`` pending from one source."""
    g = HandshakeGuard(HandshakeLimits(deadline_secs=deadline, max_unattested_per_source=cap))
    model: dict[int, tuple[str, float]] = {}
    now = 0.0
    for (op, sid, source), step in zip(ops, steps, strict=False):
        now += step
        if op == "admit":
            if sid in model:
                with pytest.raises(LocalProtocolError):
                    g.admit(sid, source=source, now=now)
                continue
            held = sum(1 for s, _ in model.values() if s == source)
            want_ok = cap is None or held < cap
            got = g.admit(sid, source=source, now=now)
            assert (got is None) == want_ok
            if want_ok:
                model[sid] = (source, now + deadline)
        elif op == "settle":
            g.settle(sid)
            model.pop(sid, None)
        else:
            due = sorted((d, i) for i, (_, d) in model.items() if d <= now)
            got_ids = [r.stream_id for r in g.expire(now)]
            assert sorted(got_ids) == sorted(i for _, i in due)
            for i in got_ids:
                del model[i]
        for src in "abc":
            n = sum(1 for s, _ in model.values() if s == src)
            assert g.pending(src) == n
            assert cap is None or n <= cap
        want_next = min((d for _, d in model.values()), default=None)
        assert g.next_deadline() == want_next
