"""The cluster's rows on both stores: leases, and stream holders whose generation guards
every release (``aegis_edge_core.cluster``'s rules, as the stores apply them)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from aegis_edge_core.cluster import RelayLease
from aegis_edge_core.health import DaemonStatus
from aegis_edge_relay.cluster import Wakeups
from aegis_edge_relay.store import (
    ROUTED_OUTPUT_ROWS,
    RUN_CANCELS,
    PostgresStore,
    RoutedCommand,
    RoutedOutput,
    Store,
    answered_run,
    cancel_answered,
    open_store,
)
from tests.pg import fresh_database


@pytest.fixture
def store(store_url: str, tmp_path: Path) -> Iterator[Store]:
    opened = open_store(store_url, tmp_path)
    yield opened
    opened.close()


def test_leases_renew_and_drop(store: Store) -> None:
    store.renew_lease(RelayLease(relay_id="a", endpoint="h:1", expires_at=10.0))
    store.renew_lease(RelayLease(relay_id="a", endpoint="h:2", expires_at=20.0))
    store.renew_lease(RelayLease(relay_id="b", endpoint="h:3", expires_at=30.0))
    assert sorted(store.load_leases(), key=lambda lease: lease.relay_id) == [
        RelayLease(relay_id="a", endpoint="h:2", expires_at=20.0),
        RelayLease(relay_id="b", endpoint="h:3", expires_at=30.0),
    ]
    store.drop_lease("a")
    assert [lease.relay_id for lease in store.load_leases()] == ["b"]


def test_a_late_release_never_clears_a_newer_stream(store: Store) -> None:
    first = store.hold_stream("n1", "a", "Connected", 1.0)
    second = store.hold_stream("n1", "b", "Connected", 2.0)
    assert second == first + 1
    assert not store.release_stream("n1", "a", first)  # the old stream at A hangs up late
    (row,) = store.load_holders()
    assert (row.relay_id, row.generation, row.status) == ("b", second, DaemonStatus.CONNECTED)
    store.set_held_statuses("b", [("n1", second, "Unhealthy"), ("n1", first, "Connected")])
    assert store.load_holders()[0].status is DaemonStatus.UNHEALTHY
    assert store.release_stream("n1", "b", second)
    assert store.load_holders() == []
    # the row stays (released), so generations keep growing
    assert store.hold_stream("n1", "a", "Connected", 3.0) == second + 1


def test_holds_written_together_keep_each_streams_generation(store: Store) -> None:
    """A restarted relay's attestations share one transaction: each stream still gets its
    own generation, a node twice in the batch gets two (the later stream's higher), and a
    release of the earlier one never clears the later."""
    base = store.hold_stream("n1", "a", "Connected", 1.0)
    gens = store.hold_streams(
        [
            ("n1", "b", "Connected", 2.0),
            ("n2", "b", "Connected", 2.0),
            ("n1", "c", "Connected", 3.0),
        ]
    )
    assert gens == [base + 1, 1, base + 2]
    assert not store.release_stream("n1", "b", gens[0])
    assert sorted((h.node_id, h.relay_id, h.generation) for h in store.load_holders()) == [
        ("n1", "c", base + 2),
        ("n2", "b", 1),
    ]
    assert store.hold_streams([]) == []


def test_dropping_a_lease_releases_the_relays_streams(store: Store) -> None:
    store.hold_stream("n1", "a", "Connected", 1.0)
    store.hold_stream("n2", "a", "Connected", 1.0)
    store.hold_stream("n3", "b", "Connected", 1.0)
    store.renew_lease(RelayLease(relay_id="a", endpoint="", expires_at=5.0))
    assert store.drop_lease("a") == 2
    assert [h.node_id for h in store.load_holders()] == ["n3"]


def test_a_routed_command_is_delivered_once_and_its_end_collected_once(store: Store) -> None:
    row = RoutedCommand(
        command_id="c-1",
        node_id="n1",
        tenant_id="t1",
        holder="b",
        coordinator="a",
        tool="cmd.run",
        args_json="{}",
        created_at=1.0,
    )
    store.route_commands([row])
    store.route_commands([row])  # a retry of the same command id: still one row
    dispatched = store.get_command("c-1")  # the dispatch row came in the same transaction
    assert dispatched is not None and dispatched.node_id == "n1" and not dispatched.outcome
    assert [r.command_id for r in store.take_routed("b")] == ["c-1"]
    assert store.take_routed("b") == []  # never handed over twice
    store.cancel_routed("c-1", "operator")
    assert store.take_cancels("b") == [("c-1", "operator")]
    assert store.take_cancels("b") == []
    assert store.take_routed_results("a") == []
    store.finish_routed("c-1")
    store.finish_routed("c-1")
    assert store.take_routed_results("a") == ["c-1"]
    assert store.take_routed_results("a") == []


def test_a_run_is_claimed_by_one_relay_and_its_routed_commands_follow(store: Store) -> None:
    store.lease_runs("a", ["f-1"], 10.0)
    store.lease_runs("a", ["f-1"], 20.0)
    store.lease_runs("b", ["f-1"], 99.0)  # not b's: no change
    assert store.load_run_leases() == [("f-1", "a", 20.0)]
    store.route_commands(
        [
            RoutedCommand(
                command_id="c-1",
                node_id="n1",
                tenant_id="t1",
                holder="c",
                coordinator="a",
                tool="cmd.run",
                args_json="{}",
                fleet_command_id="f-1",
            )
        ]
    )
    assert store.claim_run("f-1", "b", "a", 30.0) == {"c-1": "c"}
    assert store.claim_run("f-1", "c", "a", 30.0) is None  # b was first
    assert store.load_run_leases() == [("f-1", "b", 30.0)]
    assert store.claim_run("f-2", "c", "", 30.0) == {}  # a run that had no lease
    store.drop_run_lease("f-1", "a")  # not a's any more
    store.drop_run_lease("f-1", "b")
    assert store.load_run_leases() == [("f-2", "c", 30.0)]


def _routed(store: Store, command_id: str, coordinator: str, fid: str = "f-1") -> None:
    store.route_commands(
        [
            RoutedCommand(
                command_id=command_id,
                node_id="n1",
                tenant_id="t1",
                holder="b",
                coordinator=coordinator,
                tool="cmd.run",
                args_json="{}",
                fleet_command_id=fid,
            )
        ]
    )


def test_routed_output_reaches_its_coordinator_once_in_order(store: Store) -> None:
    _routed(store, "c-1", "a")
    _routed(store, "c-2", "z", fid="f-2")
    store.route_output(
        [
            RoutedOutput(command_id="c-1", seq=2, stdout=b"two\n"),
            RoutedOutput(command_id="c-1", seq=1, stdout=b"one\n", stderr=b"e\n"),
            RoutedOutput(command_id="c-2", seq=1, stdout=b"other\n"),
        ]
    )
    got = store.take_routed_output("a")
    assert [(o.seq, o.stdout, o.stderr, o.dropped_before) for o in got] == [
        (1, b"one\n", b"e\n", 0),
        (2, b"two\n", b"", 0),
    ]
    assert store.take_routed_output("a") == []  # taken once
    # a run taken over: its commands' output follows the new coordinator
    store.claim_run("f-1", "y", "", 5.0)
    store.route_output([RoutedOutput(command_id="c-1", seq=3, stdout=b"three\n")])
    assert [o.seq for o in store.take_routed_output("y")] == [3]
    assert [o.command_id for o in store.take_routed_output("z")] == ["c-2"]


def test_routed_output_past_the_cap_loses_its_oldest_and_says_how_much(store: Store) -> None:
    _routed(store, "c-1", "a")
    extra = 5
    chunks = [
        RoutedOutput(command_id="c-1", seq=i, stdout=b"x" * i, stderr=b"!")
        for i in range(1, ROUTED_OUTPUT_ROWS + extra + 1)
    ]
    store.route_output(chunks[:10])
    store.route_output(chunks[10:])
    got = store.take_routed_output("a")
    assert [o.seq for o in got] == [c.seq for c in chunks[extra:]]
    lost = sum(len(c.stdout) + len(c.stderr) for c in chunks[:extra])
    assert [o.dropped_before for o in got] == [lost] + [0] * (ROUTED_OUTPUT_ROWS - 1)
    # dropped again later: what was reported dropped is counted once more, not lost
    store.route_output(chunks[:1])  # an old seq again: below the kept ones, trimmed
    assert store.take_routed_output("a") == [
        RoutedOutput(command_id="c-1", seq=1, stdout=b"x", stderr=b"!")
    ]


def test_a_run_cancel_reaches_its_coordinator_and_a_new_one_after_a_takeover(
    store: Store,
) -> None:
    store.lease_runs("a", ["f-1"], 10.0)
    assert store.run_cancel_answer("f-1") is None
    store.request_run_cancel("f-1", "cancelled by alice", 1.0)
    assert store.take_run_cancels("b") == []  # not b's run
    assert store.take_run_cancels("a") == [("f-1", "cancelled by alice")]
    assert store.take_run_cancels("a") == []  # taken once
    store.answer_run_cancel("f-1", b"run-as-a-saw-it")
    assert store.run_cancel_answer("f-1") == b"run-as-a-saw-it"
    # a takes no more; b takes the run over and cancels it again
    store.claim_run("f-1", "b", "a", 20.0)
    assert store.take_run_cancels("b") == [("f-1", "cancelled by alice")]
    # asked again: the answer is renewed
    store.request_run_cancel("f-1", "cancelled by bob", 2.0)
    assert store.run_cancel_answer("f-1") is None
    assert store.take_run_cancels("b") == [("f-1", "cancelled by bob")]
    store.answer_run_cancel("f-1", b"run-as-b-saw-it")
    store.drop_run_lease("f-1", "a")  # not a's lease: nothing goes
    assert store.run_cancel_answer("f-1") == b"run-as-b-saw-it"
    store.drop_run_lease("f-1", "b")  # the run finished: its cancel goes with its lease
    assert store.run_cancel_answer("f-1") is None
    assert store.take_run_cancels("b") == []


def test_a_run_cancels_answer_wakes_the_relay_that_asked() -> None:
    """The asking relay waits on the store's notification, not a poll: one when the
    coordinator answers, one when the run ends with the cancel pending, none otherwise."""
    with fresh_database() as url:
        store = PostgresStore(url)
        listener = store.listen([RUN_CANCELS])
        try:
            store.lease_runs("a", ["f-1", "f-2"], 10.0)
            store.request_run_cancel("f-1", "cancelled by alice", 1.0)
            assert listener.wait(0.3) == []  # asking wakes the coordinator, not the askers
            store.answer_run_cancel("f-1", b"run-as-a-saw-it")
            assert [answered_run(p) for p in listener.wait(5.0)] == ["f-1"]
            store.drop_run_lease("f-2", "a")  # ended, nobody asked: nobody to wake
            assert listener.wait(0.3) == []
            store.request_run_cancel("f-1", "cancelled by bob", 2.0)
            store.drop_run_lease("f-1", "a")  # ended before answering: the asker reads it
            assert listener.wait(5.0) == [cancel_answered("f-1")]
            assert listener.wait(0.3) == []
        finally:
            listener.close()
            store.close()


def test_wakeups_reach_the_watchers_of_their_key_only() -> None:
    async def main() -> None:
        wakeups = Wakeups()
        with wakeups.watch("f-1") as one, wakeups.watch("f-1") as again:
            with wakeups.watch("f-2") as other:
                wakeups.wake("f-1")
                wakeups.wake("f-3")  # nobody watches it
                assert (one.is_set(), again.is_set(), other.is_set()) == (True, True, False)
            assert len(wakeups) == 1
        assert len(wakeups) == 0  # a block leaves nothing behind
        assert answered_run("route") is None

    asyncio.run(main())
