"""The relay's stores, SQLite and PostgreSQL, through the same tests: migrations, atomic
enrollment, revocation, tenant cascade, history. Tests that build an old SQLite file or look
at SQLite's journal are SQLite-only; PostgreSQL's own (advisory-locked migrations, a v1
database, serialization retries) are at the end."""

from __future__ import annotations

import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import attrs
import psycopg
import pytest

from aegis_edge_relay.store import (
    SCHEMA_VERSION,
    CommandRow,
    FleetRunRow,
    GroupExists,
    GroupRow,
    NodeRecord,
    PostgresStore,
    SQLiteStore,
    Store,
    StoreError,
    StoreUnavailable,
    TokenAlreadyRedeemed,
    open_store,
    redact_url,
)
from aegis_edge_relay.store.postgres_schema import _MIGRATIONS as _PG_MIGRATIONS
from aegis_edge_relay.store.sqlite_schema import _MIGRATIONS
from tests.pg import free_port, fresh_database


def node(node_id: str, tenant: str = "t1", thumb: str = "k", jti: str = "j") -> NodeRecord:
    return NodeRecord(
        node_id=node_id,
        tenant_id=tenant,
        public_key=b"\x01" * 32,
        key_thumbprint=f"{thumb}-{node_id}",
        enrolled_at=100.0,
        capabilities={"os": "linux", "tools": ["cmd.run"]},
        token_jti=f"{jti}-{node_id}",
        token_expires_at=1000.0,
    )


@pytest.fixture
def store(store_url: str, tmp_path: Path) -> Iterator[Store]:
    opened = open_store(store_url, tmp_path)
    yield opened
    opened.close()


def test_wal_and_schema_version(tmp_path: Path) -> None:
    # SQLite-only: WAL is SQLite's journal mode, and the schema rows are read from its file.
    store = SQLiteStore(tmp_path / "relay.db")
    assert store.schema_version() == SCHEMA_VERSION
    mode = store._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    store.close()
    again = SQLiteStore(tmp_path / "relay.db")  # re-opening migrates nothing twice
    assert again.schema_version() == SCHEMA_VERSION
    rows = again._db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0]
    assert rows == SCHEMA_VERSION


def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    SQLiteStore(path).close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO schema_version (version) VALUES (99)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer"):
        SQLiteStore(path)


def test_enrollment_is_single_use_and_atomic(store: Store) -> None:
    store.enroll(jti="tok", token_expires_at=500.0, node=node("n1"))
    with pytest.raises(TokenAlreadyRedeemed):
        store.enroll(jti="tok", token_expires_at=500.0, node=node("n2"))
    assert [n.node_id for n in store.load_nodes()] == ["n1"]
    # a failing node insert leaves the token unredeemed (same transaction)
    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
        store.enroll(jti="tok2", token_expires_at=500.0, node=node("n1"))
    store.enroll(jti="tok2", token_expires_at=500.0, node=node("n3"))


def test_concurrent_redemptions_one_wins(store_url: str, tmp_path: Path) -> None:
    open_store(store_url, tmp_path).close()
    wins: list[str] = []
    errors: list[Exception] = []

    def redeem(i: int) -> None:
        s = open_store(store_url, tmp_path)
        try:
            s.enroll(jti="same", token_expires_at=1.0, node=node(f"n{i}"))
            wins.append(f"n{i}")
        except TokenAlreadyRedeemed as err:
            errors.append(err)
        finally:
            s.close()

    threads = [threading.Thread(target=redeem, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(errors) == 5


def test_revoke_and_revocations(store: Store) -> None:
    store.enroll(jti="a", token_expires_at=1.0, node=node("n1"))
    rec = store.revoke_node("n1", reason="leak", now=200.0, token_prune_after=5000.0)
    assert rec.revoked and rec.revoked_reason == "leak"
    tokens, keys = store.load_revocations()
    assert keys == {"k-n1"}
    assert "j-n1" in tokens
    again = store.revoke_node("n1", reason="other", now=300.0, token_prune_after=5000.0)
    assert again.revoked_reason == "leak"
    with pytest.raises(StoreError):
        store.revoke_node("nope", reason="x", now=1.0, token_prune_after=1.0)


def test_tenant_deletion_cascade(store: Store) -> None:
    for i, tenant in enumerate(["doomed", "doomed", "kept"]):
        store.enroll(jti=f"t{i}", token_expires_at=1.0, node=node(f"n{i}", tenant))
    revoked = store.delete_tenant(
        "doomed", reason="tenant deleted", now=10.0, token_prune_after=99.0
    )
    assert sorted(revoked) == ["n0", "n1"]
    by_id = {n.node_id: n for n in store.load_nodes()}
    assert by_id["n0"].revoked and by_id["n1"].revoked and not by_id["n2"].revoked
    _tokens, keys = store.load_revocations()
    assert keys == {"k-n0", "k-n1"}
    assert store.is_tenant_deleted("doomed")
    with pytest.raises(StoreError, match="deleted"):
        store.enroll(jti="late", token_expires_at=1.0, node=node("n9", "doomed"))


def test_rotate_key_compare_and_swap(store: Store) -> None:
    store.enroll(jti="a", token_expires_at=1.0, node=node("n1"))
    rec = store.rotate_key(
        "n1",
        old_thumbprint="k-n1",
        new_public_key=b"\x02" * 32,
        new_thumbprint="new",
        new_jti="j2",
        new_expires_at=2000.0,
        old_jti_prune_after=3000.0,
        now=10.0,
    )
    assert rec.key_thumbprint == "new" and rec.token_jti == "j2"
    tokens, keys = store.load_revocations()
    assert tokens == {"j-n1": 3000.0}
    assert keys == {"k-n1"}  # the rotated-out key, in the same transaction
    with pytest.raises(StoreError, match="changed"):
        store.rotate_key(
            "n1",
            old_thumbprint="k-n1",
            new_public_key=b"\x03" * 32,
            new_thumbprint="x",
            new_jti="j3",
            new_expires_at=1.0,
            old_jti_prune_after=1.0,
            now=11.0,
        )


def test_heartbeats_flush_in_one_batch(store: Store) -> None:
    for i in range(3):
        store.enroll(jti=f"t{i}", token_expires_at=1.0, node=node(f"n{i}"))
    store.flush_heartbeats({"n0": 5.0, "n1": 6.0})
    store.flush_heartbeats({"n0": 4.0})  # never goes backwards
    by_id = {n.node_id: n for n in store.load_nodes()}
    assert by_id["n0"].last_heartbeat_at == 5.0
    assert by_id["n1"].last_heartbeat_at == 6.0
    assert by_id["n2"].last_heartbeat_at is None


def test_command_history_and_late_results(store: Store) -> None:
    row = CommandRow(
        command_id="c1", node_id="n1", tenant_id="t", tool="cmd.run", dispatched_at=1.0
    )
    store.record_dispatch(row)
    lost = CommandRow(
        command_id="c1",
        node_id="n1",
        tenant_id="t",
        tool="cmd.run",
        dispatched_at=1.0,
        finished_at=2.0,
        outcome="edge_disconnected",
    )
    assert store.record_result(lost)
    late = CommandRow(
        command_id="c1",
        node_id="n1",
        tenant_id="t",
        tool="cmd.run",
        dispatched_at=1.0,
        finished_at=3.0,
        outcome="ok",
        exit_code=0,
        stdout_tail=b"done",
    )
    assert store.record_result(late)  # a late real result replaces edge_disconnected
    assert not store.record_result(lost)  # but never the other way round
    (got,) = store.command_history("n1", 10)
    assert got.outcome == "ok" and got.exit_code == 0 and got.stdout_tail == b"done"


def test_tool_results_are_kept_with_the_command(store: Store) -> None:
    store.record_dispatch(
        CommandRow(command_id="c1", node_id="n1", tenant_id="t", tool="sys.info", dispatched_at=1)
    )
    (running,) = store.command_history("n1", 10)
    assert running.result_json == ""
    done = attrs.evolve(running, finished_at=2.0, outcome="ok", result_json='{"os":"linux"}')
    assert store.record_result(done)
    assert store.get_command("c1") == done


def test_migration_2_adds_results_to_an_existing_store(tmp_path: Path) -> None:
    # SQLite-only (an old SQLite file); PostgreSQL's: test_a_v1_postgres_database_migrates.
    # A store written by a relay at schema 1 (before tool results were kept).
    path = tmp_path / "relay.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.executescript(_MIGRATIONS[1])
    db.execute("INSERT INTO schema_version (version) VALUES (1)")
    db.execute(
        "INSERT INTO commands (command_id, node_id, tenant_id, tool, dispatched_at, outcome,"
        " finished_at) VALUES ('old', 'n1', 't', 'cmd.run', 1.0, 'ok', 2.0)"
    )
    db.commit()
    db.close()
    store = SQLiteStore(path)
    assert store.schema_version() == SCHEMA_VERSION >= 2
    old = store.get_command("old")
    assert old is not None and old.outcome == "ok" and old.result_json == ""


def test_fleet_runs_roundtrip(store: Store) -> None:
    for i in range(3):
        store.save_fleet_run(
            FleetRunRow(
                fleet_command_id=f"f{i}",
                tenant_id="",
                scope=("a",) if i else None,
                spec={"tool": "edge.ping"},
                outcome="completed",
                created_at=float(i),
                finished_at=float(i) + 1,
                created_by="admin",
                record={"x": i},
            )
        )
    assert [r.fleet_command_id for r in store.list_fleet_runs(2)] == ["f2", "f1"]
    got = store.get_fleet_run("f0")
    assert got is not None and got.scope is None and got.record == {"x": 0}
    assert store.get_fleet_run("nope") is None


def test_groups_are_keyed_by_tenant_and_name(store: Store) -> None:
    web_a = GroupRow(
        tenant_id="t1", name="web", selector="tags=web", pinned=("n2", "n1"), created_at=5.0,
        created_by="alice",
    )  # fmt: skip
    store.create_group(web_a)
    store.create_group(GroupRow(tenant_id="t2", name="web", selector="all", created_at=6.0))
    store.create_group(GroupRow(tenant_id="t1", name="db", selector="tags=db", created_at=7.0))
    with pytest.raises(GroupExists, match="already exists in tenant 't1'"):
        store.create_group(GroupRow(tenant_id="t1", name="web", selector="all"))
    got = store.get_group("t1", "web")
    assert got is not None
    assert got.pinned == ("n1", "n2") and got.selector == "tags=web" and got.created_by == "alice"
    assert store.get_group("t1", "nope") is None
    assert [(g.tenant_id, g.name) for g in store.list_groups(None)] == [
        ("t1", "db"),
        ("t1", "web"),
        ("t2", "web"),
    ]
    assert [(g.tenant_id, g.name) for g in store.list_groups({"t2"})] == [("t2", "web")]
    assert store.list_groups(set()) == []
    assert store.delete_group("t2", "web") is True
    assert store.delete_group("t2", "web") is False
    # t1's group of the same name was not touched by deleting t2's
    assert store.get_group("t1", "web") == got


def test_groups_survive_reopening(store_url: str, tmp_path: Path) -> None:
    first = open_store(store_url, tmp_path)
    first.create_group(GroupRow(tenant_id="t1", name="web", selector="all"))
    first.close()
    again = open_store(store_url, tmp_path)
    assert again.get_group("t1", "web") is not None
    again.close()


def test_groups_migrate_an_old_store(tmp_path: Path) -> None:
    # SQLite-only (an old SQLite file); PostgreSQL's: test_a_v1_postgres_database_migrates.
    # A store written before groups existed gains the table on open. (Found by content, so
    # the test holds whatever number the migration ends up with.)
    (version,) = [v for v, sql in _MIGRATIONS.items() if "CREATE TABLE groups" in sql]
    old = tmp_path / "old.db"
    db = sqlite3.connect(old)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for earlier in range(1, version):
        db.executescript(_MIGRATIONS[earlier])
        db.execute("INSERT INTO schema_version (version) VALUES (?)", (earlier,))
    db.commit()
    db.close()
    upgraded = SQLiteStore(old)
    assert upgraded.schema_version() == SCHEMA_VERSION
    assert upgraded.list_groups(None) == []


def test_fleet_runs_keep_plain_args_secret_names_and_rerun_of(store: Store) -> None:
    store.save_fleet_run(
        FleetRunRow(
            fleet_command_id="f9",
            tenant_id="",
            scope=None,
            spec={"tool": "cmd.run"},
            outcome="completed",
            created_at=1.0,
            finished_at=2.0,
            created_by="admin",
            record={},
            args_json='{"cwd": "/srv"}',
            secret_keys=("token", "cmd"),
            rerun_of="f8",
        )
    )
    got = store.get_fleet_run("f9")
    assert got is not None and got.args_json == '{"cwd": "/srv"}'
    assert got.secret_keys == ("cmd", "token") and got.rerun_of == "f8"


def test_a_v1_store_migrates_keeping_old_runs_marked_as_without_arguments(tmp_path: Path) -> None:
    # SQLite-only (an old SQLite file); PostgreSQL's: test_a_v1_postgres_database_migrates.
    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    db.executescript(_MIGRATIONS[1])
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version (version) VALUES (1)")
    db.execute(
        "INSERT INTO fleet_runs (fleet_command_id, spec, outcome, created_at, created_by,"
        " record) VALUES ('old', '{}', 'completed', 1.0, 'admin', '{}')"
    )
    db.commit()
    db.close()
    store = SQLiteStore(path)
    assert store.schema_version() == SCHEMA_VERSION >= 2
    got = store.get_fleet_run("old")
    assert got is not None
    assert (got.args_json, got.secret_keys, got.rerun_of) == (None, (), "")


# -- PostgreSQL's own


def test_both_schemas_have_the_same_versions() -> None:
    assert sorted(_PG_MIGRATIONS) == sorted(_MIGRATIONS) == list(range(1, SCHEMA_VERSION + 1))


def test_a_v1_postgres_database_migrates_and_newer_is_refused() -> None:
    with fresh_database() as url:
        with psycopg.connect(url, autocommit=True) as db:
            db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            db.execute(_PG_MIGRATIONS[1].encode())
            db.execute("INSERT INTO schema_version (version) VALUES (1)")
            db.execute(
                "INSERT INTO fleet_runs (fleet_command_id, spec, outcome, created_at,"
                " created_by, record) VALUES ('old', '{}', 'completed', 1.0, 'admin', '{}')"
            )
        store = PostgresStore(url)
        assert store.schema_migrated == (1, SCHEMA_VERSION)
        got = store.get_fleet_run("old")
        assert got is not None and (got.args_json, got.secret_keys) == (None, ())
        assert store.list_groups(None) == []
        store.close()
        again = PostgresStore(url)  # nothing left to do
        assert again.schema_migrated == (SCHEMA_VERSION, SCHEMA_VERSION)
        again.close()
        with psycopg.connect(url, autocommit=True) as db:
            db.execute("INSERT INTO schema_version (version) VALUES (99)")
        with pytest.raises(StoreError, match="newer"):
            PostgresStore(url)


def test_relays_migrating_at_once_take_turns() -> None:
    with fresh_database() as url:
        opened: list[tuple[int, int]] = []
        failed: list[BaseException] = []

        def start() -> None:
            try:
                store = PostgresStore(url)
                opened.append(store.schema_migrated)
                store.close()
            except BaseException as err:  # collected for the assertion below
                failed.append(err)

        threads = [threading.Thread(target=start) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failed
        # exactly one found an empty database; the others waited on the advisory lock
        assert sorted(opened) == [(0, SCHEMA_VERSION)] + [(SCHEMA_VERSION, SCHEMA_VERSION)] * 3
        with psycopg.connect(url) as db:
            row = db.execute("SELECT COUNT(*) FROM schema_version").fetchone()
            assert row is not None and row[0] == SCHEMA_VERSION


def test_many_heartbeats_and_dispatches_in_one_statement() -> None:
    with fresh_database() as url:
        store = PostgresStore(url)
        for i in range(50):
            store.enroll(jti=f"t{i}", token_expires_at=1.0, node=node(f"n{i:02}"))
        store.flush_heartbeats({f"n{i:02}": 100.0 + i for i in range(50)} | {"gone": 1.0})
        assert [n.last_heartbeat_at for n in store.load_nodes()] == [100.0 + i for i in range(50)]
        rows = [
            CommandRow(
                command_id=f"c{i}", node_id=f"n{i:02}", tenant_id="t1", tool="edge.ping",
                dispatched_at=float(i), fleet_command_id="f1",
            )
            for i in range(50)
        ]  # fmt: skip
        store.record_dispatches(rows)
        store.record_dispatches(rows[:5])  # a retried batch inserts nothing twice
        ends = [attrs.evolve(r, finished_at=99.0, outcome="ok", exit_code=0) for r in rows]
        # the same command twice in one batch: the first real end wins, as on SQLite
        assert store.record_results([*ends[:3], attrs.evolve(ends[0], outcome="error")]) == [
            True,
            True,
            True,
            False,
        ]
        got = store.fleet_run_commands("f1")
        assert len(got) == 50 and got[0].outcome == "ok" and got[3].outcome == ""
        store.close()


def test_store_urls_never_show_a_password(tmp_path: Path) -> None:
    assert redact_url("postgresql://relay:s3cret@db:5432/fleet") == (
        "postgresql://relay:***@db:5432/fleet"
    )
    assert redact_url("postgres://db/fleet?user=relay&password=s3cret") == (
        "postgres://db/fleet?user=relay&password=***"
    )
    assert redact_url("postgresql://relay@db/fleet") == "postgresql://relay@db/fleet"
    with pytest.raises(StoreError, match="unknown kind of store 'mysql'") as err:
        open_store("mysql://relay:s3cret@db/fleet", tmp_path)
    assert "s3cret" not in str(err.value) and "postgresql://" in str(err.value)
    port = free_port()
    with pytest.raises(StoreUnavailable) as down:
        open_store(f"postgresql://relay:s3cret@127.0.0.1:{port}/fleet", tmp_path)
    assert f"host 127.0.0.1 port {port} database fleet" in str(down.value)
    assert "s3cret" not in str(down.value)


def test_the_urls_own_options_are_kept_beside_the_relays() -> None:
    """libpq takes one ``options`` string: the relay's statement timeout joins the one the
    URL gives instead of replacing it, and a setting the URL names itself stands."""
    with fresh_database() as url:
        sep = "&" if "?" in url else "?"
        for options, lock, statement in (
            ("-c lock_timeout=1234", "1234ms", "5s"),
            ("-c lock_timeout=1234 -c statement_timeout=7000", "1234ms", "7s"),
        ):
            store = PostgresStore(f"{url}{sep}options={urllib.parse.quote(options)}")
            try:
                shown = store._read(  # a pooled connection, as every call gets
                    lambda cur: cur.execute(
                        "SELECT current_setting('lock_timeout') AS lock,"
                        " current_setting('statement_timeout') AS statement"
                    )
                )
                assert (shown[0]["lock"], shown[0]["statement"]) == (lock, statement)
            finally:
                store.close()
