"""The change feed and console sessions on both stores: which writes a relay's next sync
reads, that a number is never seen before a smaller one commits (PostgreSQL), and console
secrets kept by hash, used once, gone at expiry."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from aegis_edge_relay.store import (
    NODES_CHANGED,
    ConsoleSecret,
    PostgresStore,
    Store,
    open_store,
)
from aegis_edge_relay.store.postgres_schema import _MIGRATIONS as _PG_MIGRATIONS
from aegis_edge_relay.store.postgres_schema import FEED_LOCK
from tests.pg import fresh_database
from tests.relay.test_store import node


@pytest.fixture
def store(store_url: str, tmp_path: Path) -> Iterator[Store]:
    opened = open_store(store_url, tmp_path)
    yield opened
    opened.close()


def changed(store: Store, since: int) -> tuple[set[str], set[str], int]:
    feed = store.node_feed(since)
    assert not feed.full
    return (
        {n.node_id for n in feed.nodes},
        {f"{h.node_id}@{h.relay_id}" for h in feed.holders},
        max(feed.seqs, default=since),
    )


def test_the_feed_carries_what_another_relay_must_learn_and_nothing_else(store: Store) -> None:
    empty = store.node_feed(None)
    assert empty.full and empty.nodes == () and empty.seqs == () and empty.head == 0
    for n in ("n1", "n2", "n3"):
        store.enroll(jti=f"e-{n}", token_expires_at=1000.0, node=node(n))
    full = store.node_feed(None)
    assert {n.node_id for n in full.nodes} == {"n1", "n2", "n3"}
    seq = max(full.seqs)
    assert seq == full.head

    # heartbeats and token refreshes are the holder's own: an idle fleet's sync reads nothing
    store.flush_heartbeats({"n1": 200.0, "n2": 201.0})
    store.set_token("n1", "j2", 2000.0)
    assert changed(store, seq) == (set(), set(), seq)

    store.set_tags("n1", ["web"])
    store.set_capabilities("n2", {"os": "linux"})
    nodes, holders, seq = changed(store, seq)
    assert (nodes, holders) == ({"n1", "n2"}, set())

    gen = store.hold_stream("n3", "relay-a", "Connected", 300.0)
    store.hold_stream("n1", "relay-b", "Connected", 300.0)
    nodes, holders, seq = changed(store, seq)
    assert (nodes, holders) == (set(), {"n3@relay-a", "n1@relay-b"})

    store.set_held_statuses("relay-a", [("n3", gen, "Unhealthy")])
    store.release_stream("n1", "relay-b", 1)
    store.revoke_node("n2", reason="gone", now=400.0, token_prune_after=500.0)
    feed = store.node_feed(seq)
    assert [n.node_id for n in feed.nodes] == ["n2"] and feed.nodes[0].revoked
    by_node = {h.node_id: h for h in feed.holders}
    assert by_node["n3"].status.value == "Unhealthy" and by_node["n1"].relay_id == ""
    seq = max(feed.seqs)

    store.drop_lease("relay-a")  # a relay starting again releases what it held
    assert changed(store, seq)[1] == {"n3@"}
    # a full read leaves released holders out: they hold nothing
    assert store.node_feed(None).holders == ()


def test_a_number_is_never_read_before_a_smaller_one_commits() -> None:
    with fresh_database() as url:
        store = PostgresStore(url)
        try:
            for n in ("n1", "n2"):
                store.enroll(jti=f"e-{n}", token_expires_at=1000.0, node=node(n))
            seq = max(store.node_feed(None).seqs)
            with psycopg.connect(url) as slow:
                # a writer numbers its change and has not committed yet...
                slow.execute("UPDATE nodes SET tags = '[\"slow\"]' WHERE node_id = 'n1'")
                # ...so a second writer waits to number its own, behind the first
                done = threading.Event()
                fast = threading.Thread(
                    target=lambda: (store.set_tags("n2", ["fast"]), done.set()), daemon=True
                )
                fast.start()
                assert not done.wait(0.5)
                assert store.node_feed(seq).seqs == ()
                slow.commit()
            fast.join(10)
            assert done.is_set()
            feed = store.node_feed(seq)
            assert {n.node_id: n.tags for n in feed.nodes} == {"n1": ("slow",), "n2": ("fast",)}
            assert sorted(feed.seqs) == [seq + 1, seq + 2]
        finally:
            store.close()


def test_the_trigger_takes_the_lock_and_signals_the_channel_the_code_names() -> None:
    assert f"pg_advisory_xact_lock({FEED_LOCK})" in _PG_MIGRATIONS[8]
    assert f"pg_notify('{NODES_CHANGED}', 'changed')" in _PG_MIGRATIONS[8]


def test_a_feed_change_wakes_the_other_relays_once_per_transaction() -> None:
    with fresh_database() as url:
        store = PostgresStore(url)
        listener = store.listen([NODES_CHANGED])
        try:
            store.enroll(jti="e-n1", token_expires_at=1000.0, node=node("n1"))
            assert listener.wait(5.0) == ["changed"]
            store.flush_heartbeats({"n1": 5.0})  # no feed change: no wake-up
            assert listener.wait(0.3) == []
            store.hold_stream("n1", "relay-a", "Connected", 1.0)
            store.drop_lease("relay-a")
            got = listener.wait(5.0)
            if len(got) < 2:
                got += listener.wait(5.0)
            assert got == ["changed", "changed"]  # two transactions
            assert listener.wait(0.3) == []
        finally:
            listener.close()
            store.close()


def test_console_secrets_are_found_by_hash_and_kind_used_once_and_expire(store: Store) -> None:
    session = ConsoleSecret(kind="session", sealed=b"sealed-1", expires_at=200.0)
    link = ConsoleSecret(kind="link", sealed=b"sealed-2", expires_at=150.0)
    store.put_console_secret("h1", session, 100.0)
    store.put_console_secret("h2", link, 100.0)
    assert store.get_console_secret("h1", "session", 120.0) == session
    assert store.get_console_secret("h1", "link", 120.0) is None  # a session is no link
    assert store.get_console_secret("h1", "session", 200.0) is None  # expired
    assert store.take_console_secret("h2", "link", 149.0) == link
    assert store.take_console_secret("h2", "link", 149.0) is None  # used once
    store.put_console_secret("h3", link, 100.0)
    assert store.take_console_secret("h3", "link", 150.0) is None  # stale, and gone
    assert store.take_console_secret("h1", "session", 120.0) == session  # a logout
    assert store.get_console_secret("h1", "session", 120.0) is None
    # an expired secret is dropped when the next one is stored
    store.put_console_secret("h4", session, 100.0)
    store.put_console_secret("h5", session, 300.0)
    assert store.get_console_secret("h4", "session", 150.0) is None


def test_a_feed_read_touches_only_the_rows_changed() -> None:
    with fresh_database() as url:
        store = PostgresStore(url)
        try:
            for i in range(300):
                store.enroll(jti=f"e-{i}", token_expires_at=1000.0, node=node(f"n{i:03}"))
                store.hold_stream(f"n{i:03}", "relay-a", "Connected", 1.0)
            seq = max(store.node_feed(None).seqs)

            def touched() -> int:
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("SELECT pg_stat_force_next_flush()")
                    row = conn.execute(
                        "SELECT SUM(seq_tup_read + COALESCE(idx_tup_fetch, 0)) FROM"
                        " pg_stat_user_tables WHERE relname IN ('nodes', 'stream_holders')"
                    ).fetchone()
                assert row is not None
                return int(row[0])

            store.close()  # its connections report what they read when they end
            store = PostgresStore(url)
            before = touched()
            for _ in range(10):  # more than psycopg's prepare threshold: the generic plan too
                assert store.node_feed(seq).seqs == ()
            store.close()
            store = PostgresStore(url)
            assert touched() - before < 10
        finally:
            store.close()
