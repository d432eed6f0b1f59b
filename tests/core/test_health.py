"""Health state machine: the table, the tracker, and a model check against a naive tracker."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from aegis_edge_core.errors import ConfigError, LocalProtocolError
from aegis_edge_core.health import (
    HEALTH_TRANSITIONS,
    DaemonStatus,
    HealthEvent,
    HealthProtocolError,
    HealthSettings,
    HealthTracker,
    Transition,
    next_status,
)

C = DaemonStatus.CONNECTED
U = DaemonStatus.UNHEALTHY
D = DaemonStatus.DISCONNECTED
R = DaemonStatus.REVOKED
E = HealthEvent

# The table as the design states it, written out independently of the implementation.
# "error" marks pairs that must raise.
EXPECTED: dict[tuple[DaemonStatus | None, HealthEvent], DaemonStatus | str | None] = {
    (None, E.ATTESTED): C,
    (None, E.HEARTBEAT): "error",
    (None, E.STREAM_CLOSED): None,
    (None, E.REVOKED): R,
    (None, E.STALE): None,
    (C, E.ATTESTED): C,
    (C, E.HEARTBEAT): C,
    (C, E.STREAM_CLOSED): D,
    (C, E.REVOKED): R,
    (C, E.STALE): U,
    (U, E.ATTESTED): C,
    (U, E.HEARTBEAT): C,
    (U, E.STREAM_CLOSED): D,
    (U, E.REVOKED): R,
    (U, E.STALE): U,
    (D, E.ATTESTED): C,
    (D, E.HEARTBEAT): D,
    (D, E.STREAM_CLOSED): D,
    (D, E.REVOKED): R,
    (D, E.STALE): D,
    (R, E.ATTESTED): "error",
    (R, E.HEARTBEAT): R,
    (R, E.STREAM_CLOSED): R,
    (R, E.REVOKED): R,
    (R, E.STALE): R,
}

STATES = [None, *DaemonStatus]


def test_status_values_are_the_seed_spelling() -> None:
    assert [s.value for s in DaemonStatus] == ["Connected", "Unhealthy", "Disconnected", "Revoked"]
    assert str(DaemonStatus.UNHEALTHY) == "Unhealthy"  # usable directly as a metric label


def test_table_covers_every_pair_except_the_documented_errors() -> None:
    missing = {pair for pair in EXPECTED if pair not in HEALTH_TRANSITIONS}
    assert missing == {(None, E.HEARTBEAT), (R, E.ATTESTED)}
    assert set(HEALTH_TRANSITIONS) <= set(EXPECTED)


@given(st.sampled_from(STATES), st.sampled_from(list(HealthEvent)))
def test_every_pair_is_answered_deterministically(
    state: DaemonStatus | None, event: HealthEvent
) -> None:
    expected = EXPECTED[(state, event)]
    if expected == "error":
        for _ in range(2):
            with pytest.raises(HealthProtocolError) as info:
                next_status(state, event)
            assert isinstance(info.value, LocalProtocolError)
            assert info.value.hint
        return
    assert next_status(state, event) is expected
    assert next_status(state, event) is expected
    if state is R:
        assert expected is R  # Revoked is final
    if state in (C, U) and event is E.HEARTBEAT:
        assert expected is C


def _tracker_in(state: DaemonStatus | None, node: str = "n") -> HealthTracker:
    t = HealthTracker(stale_threshold_secs=90, heartbeat_interval_secs=30)
    if state is C:
        t.attested(node, 0.0)
    elif state is U:
        t.attested(node, 0.0)
        assert t.tick(91.0)
    elif state is D:
        t.load(node, D, 0.0)
    elif state is R:
        t.revoked(node, 0.0)
    assert t.status(node) is state
    return t


@given(st.sampled_from(STATES), st.sampled_from(list(HealthEvent)))
def test_tracker_agrees_with_the_table(state: DaemonStatus | None, event: HealthEvent) -> None:
    t = _tracker_in(state)
    expected = EXPECTED[(state, event)]
    now = 100.0
    calls = {
        E.ATTESTED: lambda: t.attested("n", now),
        E.HEARTBEAT: lambda: t.heartbeat("n", now),
        E.STREAM_CLOSED: lambda: t.stream_closed("n", now),
        E.REVOKED: lambda: t.revoked("n", now),
        E.STALE: lambda: t.tick(10_000.0),
    }
    if expected == "error":
        with pytest.raises(HealthProtocolError):
            calls[event]()
        assert t.status("n") is state
        return
    transitions = calls[event]()
    assert t.status("n") is expected
    if expected is state:
        assert transitions == []
    else:
        assert [(x.node_id, x.old, x.new, x.cause) for x in transitions] == [
            ("n", state, expected, event)
        ]


def test_unhealthy_only_strictly_after_the_threshold() -> None:
    t = HealthTracker()
    t.attested("n", 1000.0)
    t.heartbeat("n", 1030.0)
    assert t.tick(1120.0) == []  # exactly 90 s: the heartbeat was "within" the threshold
    assert t.status("n") is C
    [tr] = t.tick(1120.5)
    assert tr == Transition(node_id="n", old=C, new=U, at=1120.5, cause=E.STALE)
    assert t.tick(2000.0) == []  # already Unhealthy: reported once
    [back] = t.heartbeat("n", 2001.0)
    assert (back.old, back.new, back.cause) == (U, C, E.HEARTBEAT)
    assert t.tick(2001.0 + 90) == []


def test_tick_does_not_heal_and_disconnected_daemons_do_not_go_stale() -> None:
    t = HealthTracker()
    t.attested("a", 0.0)
    t.attested("b", 0.0)
    t.stream_closed("b", 1.0)
    assert [x.node_id for x in t.tick(500.0)] == ["a"]
    assert t.status("b") is D
    assert t.tick(0.0) == []  # a clock step back does not make "a" Connected again
    assert t.status("a") is U


def test_superseded_stream_close_is_ignored() -> None:
    t = HealthTracker()
    t.attested("n", 0.0, stream_id="s1")
    t.attested("n", 5.0, stream_id="s2")  # daemon reconnected before s1 was noticed dead
    assert t.stream_closed("n", 6.0, stream_id="s1") == []
    assert t.status("n") is C
    [tr] = t.stream_closed("n", 7.0, stream_id="s2")
    assert tr.new is D
    # Without stream ids every close counts.
    t.attested("n", 8.0)
    assert t.stream_closed("n", 9.0)[0].new is D


def test_stream_closed_for_unknown_or_failed_attestation_is_a_no_op() -> None:
    t = HealthTracker()
    assert t.stream_closed("never-attested", 1.0) == []
    assert "never-attested" not in t


def test_revoked_is_final_and_attestation_of_revoked_raises() -> None:
    t = HealthTracker()
    t.attested("n", 0.0)
    [tr] = t.revoked("n", 1.0)
    assert (tr.old, tr.new) == (C, R)
    assert t.heartbeat("n", 2.0) == []
    assert t.stream_closed("n", 3.0) == []
    assert t.revoked("n", 4.0) == []
    assert t.tick(1e9) == []
    with pytest.raises(HealthProtocolError, match="Revoked"):
        t.attested("n", 5.0)
    assert t.status("n") is R
    # Revoking a node the tracker never saw still records it.
    [tr] = t.revoked("ghost", 6.0)
    assert (tr.old, tr.new) == (None, R)


def test_load_after_restart_makes_everything_but_revoked_disconnected() -> None:
    t = HealthTracker()
    assert t.load("a", "Connected", 10.0) is D
    assert t.load("b", U, None) is D
    assert t.load("c", "Revoked", 5.0) is R
    assert t.load("d", "Disconnected") is D
    assert t.counts() == {C: 0, U: 0, D: 3, R: 1}
    h = t.get("a")
    assert h is not None
    assert h.last_heartbeat_at == 10.0
    assert t.tick(1e9) == []  # nothing open, nothing stale
    with pytest.raises(HealthProtocolError, match="already tracked"):
        t.load("a", "Connected", 1.0)
    with pytest.raises(HealthProtocolError, match="unknown stored status"):
        t.load("e", "Online", 1.0)
    with pytest.raises(HealthProtocolError):
        t.attested("c", 20.0)


def test_forget_and_counts() -> None:
    t = HealthTracker()
    t.attested("a", 0.0)
    t.attested("b", 0.0)
    assert t.forget("a") is C
    assert t.forget("a") is None
    assert t.counts() == {C: 1, U: 0, D: 0, R: 0}
    assert t.tick(1000.0)[0].node_id == "b"
    assert len(t) == 1
    assert list(t) == ["b"]
    with pytest.raises(HealthProtocolError):
        t.heartbeat("a", 1.0)


def test_next_deadline_tells_when_to_tick() -> None:
    t = HealthTracker(stale_threshold_secs=90)
    assert t.next_deadline() is None
    t.attested("a", 100.0)
    t.attested("b", 110.0)
    assert t.next_deadline() == 190.0
    t.stream_closed("a", 120.0)
    assert t.next_deadline() == 200.0


def test_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="stale_threshold_secs"):
        HealthTracker(stale_threshold_secs=30, heartbeat_interval_secs=30)
    with pytest.raises(ConfigError, match="heartbeat_interval_secs"):
        HealthSettings(heartbeat_interval_secs=0)
    with pytest.raises(ConfigError, match="positive"):
        HealthSettings(stale_threshold_secs=float("nan"))
    with pytest.raises(HealthProtocolError, match="finite"):
        HealthTracker().attested("n", float("nan"))
    assert HealthTracker().stale_threshold_secs == 90.0
    assert HealthTracker().heartbeat_interval_secs == 30.0


def test_heartbeats_are_cheap_at_fleet_scale() -> None:
    t = HealthTracker()
    n = 10_000
    nodes = [f"node-{i}" for i in range(n)]
    for node in nodes:
        t.attested(node, 0.0)
    now = 0.0
    for _ in range(6):
        for i, node in enumerate(nodes):
            t.heartbeat(node, now + 30.0 * i / n)
        now += 30.0
        assert t.tick(now) == []
    # One index entry per connected daemon, however many heartbeats arrived (private, but it
    # is the property that keeps memory flat).
    assert len(t._heap) <= n + 1
    stale = t.tick(now + 200.0)
    assert len(stale) == n
    assert t.counts()[U] == n


def test_flapping_does_not_grow_the_index_without_bound() -> None:
    t = HealthTracker()
    for i in range(5000):
        t.attested("n", float(i))
        t.stream_closed("n", i + 0.5)
    assert len(t._heap) <= 2 * 1 + 1024


NODES = ["n0", "n1", "n2", "n3"]
THRESHOLD = 90.0
STEPS = [0.0, 0.5, 1.0, 10.0, 29.999, 30.0, 45.0, 60.0, 89.999, 90.0, 90.001, 180.0]


class HealthModel(RuleBasedStateMachine):
    """Drive HealthTracker and a naive model that recomputes staleness from last_seen."""

    def __init__(self) -> None:
        super().__init__()
        self.t = HealthTracker(stale_threshold_secs=THRESHOLD, heartbeat_interval_secs=30)
        self.now = 1_000_000.0
        self.status: dict[str, DaemonStatus] = {}
        self.last_seen: dict[str, float | None] = {}
        self.stream: dict[str, int | None] = {}
        self.monotone = True

    @initialize(
        rows=st.dictionaries(
            st.sampled_from(NODES),
            st.tuples(st.sampled_from(list(DaemonStatus)), st.none() | st.floats(0, 1e6)),
        )
    )
    def load_rows(self, rows: dict[str, tuple[DaemonStatus, float | None]]) -> None:
        for node, (stored, last) in rows.items():
            got = self.t.load(node, stored, last)
            self.status[node] = R if stored is R else D
            self.last_seen[node] = last
            self.stream[node] = None
            assert got is self.status[node]

    def _check(self, node: str, transitions: list[Transition], old: DaemonStatus | None) -> None:
        new = self.status.get(node)
        if new is old:
            assert transitions == []
        else:
            assert new is not None
            assert transitions == [
                Transition(node_id=node, old=old, new=new, at=self.now, cause=transitions[0].cause)
            ]

    @rule(dt=st.sampled_from(STEPS))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(dt=st.sampled_from([0.001, 1.0, 95.0]))
    def clock_steps_back(self, dt: float) -> None:
        self.now -= dt
        self.monotone = False

    @rule(node=st.sampled_from(NODES), stream=st.none() | st.integers(0, 2))
    def attested(self, node: str, stream: int | None) -> None:
        old = self.status.get(node)
        if old is R:
            with pytest.raises(HealthProtocolError):
                self.t.attested(node, self.now, stream_id=stream)
            return
        out = self.t.attested(node, self.now, stream_id=stream)
        self.status[node] = C
        self.last_seen[node] = self.now
        self.stream[node] = stream
        self._check(node, out, old)

    @rule(node=st.sampled_from(NODES))
    def heartbeat(self, node: str) -> None:
        old = self.status.get(node)
        if old is None:
            with pytest.raises(HealthProtocolError):
                self.t.heartbeat(node, self.now)
            return
        out = self.t.heartbeat(node, self.now)
        if old in (C, U):
            self.status[node] = C
            self.last_seen[node] = self.now
            assert self.t.status(node) is C  # a heartbeat always returns an open stream
        self._check(node, out, old)

    @rule(node=st.sampled_from(NODES), stream=st.none() | st.integers(0, 2))
    def stream_closed(self, node: str, stream: int | None) -> None:
        old = self.status.get(node)
        out = self.t.stream_closed(node, self.now, stream_id=stream)
        superseded = stream is not None and self.stream.get(node) not in (None, stream)
        if old in (C, U) and not superseded:
            self.status[node] = D
            self.stream[node] = None
        self._check(node, out, old)

    @rule(node=st.sampled_from(NODES))
    def revoked(self, node: str) -> None:
        old = self.status.get(node)
        out = self.t.revoked(node, self.now)
        self.status[node] = R
        self.stream[node] = None
        self.last_seen.setdefault(node, None)
        self._check(node, out, old)

    @precondition(lambda self: bool(self.status))
    @rule(data=st.data())
    def forget(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from(sorted(self.status)))
        assert self.t.forget(node) is self.status.pop(node)
        del self.last_seen[node]
        del self.stream[node]

    @rule()
    def tick(self) -> None:
        expected = set()
        for node, status in self.status.items():
            seen = self.last_seen[node]
            if status is C and seen is not None and self.now - seen > THRESHOLD:
                expected.add(node)
        out = self.t.tick(self.now)
        assert {x.node_id for x in out} == expected
        assert len(out) == len(expected)
        for x in out:
            assert (x.old, x.new, x.at, x.cause) == (C, U, self.now, E.STALE)
            self.status[x.node_id] = U
        if self.monotone:
            # Unhealthy exactly when the threshold is passed, for every open stream.
            for node, status in self.status.items():
                if status in (C, U):
                    seen = self.last_seen[node]
                    assert seen is not None
                    assert (status is U) == (self.now - seen > THRESHOLD)

    @invariant()
    def statuses_match(self) -> None:
        for node in NODES:
            assert self.t.status(node) is self.status.get(node)

    @invariant()
    def counts_match(self) -> None:
        expected = dict.fromkeys(DaemonStatus, 0)
        for status in self.status.values():
            expected[status] += 1
        assert self.t.counts() == expected
        assert len(self.t) == len(self.status)

    @invariant()
    def deadline_is_never_late(self) -> None:
        deadline = self.t.next_deadline()
        open_seen = [
            seen
            for n, s in self.status.items()
            if s is C and (seen := self.last_seen[n]) is not None
        ]
        if not open_seen:
            return
        assert deadline is not None
        assert deadline <= min(open_seen) + THRESHOLD


HealthModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestHealthModel = HealthModel.TestCase
