"""The relay on PostgreSQL when the database misbehaves: restarted in the middle of a
rolling fleet run, unreachable at start, a statement past its timeout, a concurrent change
that makes the relay's transaction fail to serialize.

The restart test runs a private server (``tests.pg.private_server``) so stopping it disturbs
no other test; the others use a fresh database on the shared one. (``test_store_faults``
faults the SQLite file itself -- a lock on it, its size limit -- and stays SQLite-only.)
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psycopg
import pytest

from aegis_edge_core.session import SessionAccepted
from aegis_edge_core.wire import admin_pb2, common_pb2, stream_pb2
from aegis_edge_relay.store import NodeRecord, PostgresStore
from tests.faults.conftest import Tally
from tests.faults.helpers import enrolled
from tests.pg import free_port, fresh_database, private_server
from tests.relay.daemon_driver import REPO, RelayProcess, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(180)]

OK = common_pb2.TARGET_OUTCOME_OK


async def _unavailable(call: object, *words: str) -> str:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        details = err.details() or ""
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), details)
        assert "relay store" in details and all(w in details for w in words), details
        assert "Traceback" not in details
        return details
    raise AssertionError("the call succeeded while the database could not answer")


def test_postgres_restart_mid_rolling_run(tmp_path: Path, tally: Tally) -> None:
    with private_server() as pg:
        relay = RelayProcess.start(
            tmp_path / "relay",
            "--heartbeat-interval",
            "0.5s",
            "--stale-threshold",
            "30s",
            store_url=pg.url,
        )
        try:
            down_at = asyncio.run(_restart_mid_run(relay, pg, tally))
        finally:
            assert relay.stop() == 0
        with psycopg.connect(pg.url) as db:
            # Heartbeats that came in while the database was down reach it too: on
            # PostgreSQL they are held in memory and written every five minutes (issue 18),
            # and at the latest when the relay stops.
            (beat,) = db.execute(
                "SELECT MIN(last_heartbeat_at) FROM nodes WHERE tenant_id = 'pgr'"
            ).fetchone() or (None,)
            assert beat is not None and beat > down_at
            rows = db.execute(
                "SELECT node_id, outcome FROM commands ORDER BY dispatched_at"
            ).fetchall()
            assert len(rows) == 4 and {outcome for _, outcome in rows} == {"ok"}, rows
            (running,) = db.execute(
                "SELECT COUNT(*) FROM fleet_runs WHERE outcome = 'running'"
            ).fetchone() or (None,)
            assert running == 0


async def _restart_mid_run(relay: RelayProcess, pg: object, tally: Tally) -> float:
    from tests.pg import PrivateServer

    assert isinstance(pg, PrivateServer)
    async with relay.channel() as channel:
        admin = relay.admin(channel)
        daemons = [await enrolled(relay, channel, "pgr", tools=["cmd.run"]) for _ in range(4)]
        daemons.sort(key=lambda d: d.node_id)
        gate = asyncio.Event()

        async def held(_cmd: stream_pb2.CommandInvocation) -> tuple[str, int]:
            await gate.wait()
            return ("ok", 0)

        for d in daemons:
            assert isinstance(await d.connect(), SessionAccepted)
            d.start_heartbeats(0.5)
            d.command_handler = held
        events = admin.StartFleetRun(
            admin_pb2.FleetRunSpec(
                selector="all",
                tool="cmd.run",
                args_json=json.dumps({"cmd": "true"}),
                mode="rolling=1",
                on_error="continue",
                tenant_id="pgr",
            ),
            metadata=relay.auth(),
        )
        run_id = ""
        finished: dict[str, int] = {}
        outcome = None
        down_at = 0.0
        async for ev in events:
            kind = ev.WhichOneof("body")
            if kind == "started":
                run_id = ev.started.fleet_command_id
            elif kind == "dispatched" and not down_at:
                # The first target holds its command: the database goes away under it.
                await wait_until(lambda: sum(len(d.commands) for d in daemons) == 1)
                pg.stop()
                down_at = time.time()
                tally.fault()
                await _unavailable(
                    admin.AddTags(
                        admin_pb2.TagsRequest(node_id=daemons[0].node_id, tags=["down"]),
                        metadata=relay.auth(),
                        timeout=30,
                    ),
                    "PostgreSQL",
                    "port",
                )
                gate.set()  # the result arrives while the database is down...
                await wait_until(
                    lambda: any(e.get("event") == "store.write_retrying" for e in relay.logs()),
                    timeout=60,
                    what="the relay holding the result and retrying its write",
                )
                pg.start()  # ...and is stored once it is back
            elif kind == "target_finished":
                finished[ev.target_finished.node_id] = ev.target_finished.outcome
            elif kind == "finished":
                outcome = ev.finished.outcome
        assert outcome == common_pb2.RUN_OUTCOME_COMPLETED, outcome
        lost = sum(o != OK for o in finished.values()) + (4 - len(finished))
        tally.lost(lost, "fleet results across a PostgreSQL restart")
        assert lost == 0
        run = await admin.GetFleetRun(
            admin_pb2.GetFleetRunRequest(fleet_command_id=run_id), metadata=relay.auth()
        )
        assert [t.outcome for t in run.targets] == [OK] * 4
        for d in daemons:
            history = await admin.GetHost(
                admin_pb2.GetHostRequest(node_id=d.node_id, history_limit=10), metadata=relay.auth()
            )
            assert [c.outcome for c in history.history] == [OK], history
        # the relay writes again
        host = await admin.AddTags(
            admin_pb2.TagsRequest(node_id=daemons[0].node_id, tags=["after"]),
            metadata=relay.auth(),
        )
        assert list(host.capabilities.tags) == ["after"]
        for d in daemons:
            await d.close()
    return down_at


def test_unreachable_at_start_is_one_line(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://aegis:hunter2@127.0.0.1:{port}/fleetdb"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "aegis_edge_cli",
            "relay",
            "serve",
            "--data-dir",
            str(tmp_path / "relay"),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
            "--store",
            url,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"host 127.0.0.1 port {port} database fleetdb" in lines[0], lines[0]
    assert "hunter2" not in out.stderr + out.stdout and "Traceback" not in out.stderr


def test_statement_timeout_answers_unavailable(tmp_path: Path) -> None:
    with fresh_database() as url:
        relay = RelayProcess.start(tmp_path / "relay", store_url=url)
        try:

            async def scenario() -> None:
                async with relay.channel() as channel:
                    admin = relay.admin(channel)
                    d = await enrolled(relay, channel, "slow")
                    with psycopg.connect(url) as lock:
                        # Someone (a migration by hand, a long report) holds the table.
                        lock.execute("LOCK TABLE nodes IN ACCESS EXCLUSIVE MODE")
                        await _unavailable(
                            admin.AddTags(
                                admin_pb2.TagsRequest(node_id=d.node_id, tags=["stuck"]),
                                metadata=relay.auth(),
                                timeout=30,
                            ),
                            "statement timeout",
                        )
                    host = await admin.AddTags(
                        admin_pb2.TagsRequest(node_id=d.node_id, tags=["after"]),
                        metadata=relay.auth(),
                    )
                    assert list(host.capabilities.tags) == ["after"]

            asyncio.run(scenario())
        finally:
            assert relay.stop() == 0


def test_serialization_failure_is_retried() -> None:
    with fresh_database() as url:
        store = PostgresStore(url)
        store.enroll(
            jti="j1",
            token_expires_at=1.0,
            node=NodeRecord(
                node_id="n1",
                tenant_id="t1",
                public_key=b"\x01" * 32,
                key_thumbprint="k1",
                enrolled_at=1.0,
                token_jti="tok1",
            ),
        )
        done = threading.Event()
        with psycopg.connect(url) as other:
            other.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            other.execute("UPDATE nodes SET tags = '[\"other\"]' WHERE node_id = 'n1'")

            def revoke() -> None:
                store.revoke_node("n1", reason="leak", now=5.0, token_prune_after=9.0)
                done.set()

            worker = threading.Thread(target=revoke)
            worker.start()
            # the relay's transaction has read the row and now waits on the other's lock
            deadline = time.monotonic() + 20
            while True:
                row = other.execute(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name ="
                    " 'aegis-relay' AND wait_event_type = 'Lock'"
                    # this test's database only: the server is shared with other tests'
                    # relays, whose waits on the change feed's lock would count too
                    " AND datname = current_database()"
                ).fetchone()
                if row is not None and row[0] >= 1:
                    break
                assert time.monotonic() < deadline, "the relay's update never waited"
                time.sleep(0.05)
            other.commit()
        worker.join(20)
        assert done.is_set()
        assert store.retries >= 1
        got = store.get_node("n1")
        assert got is not None and got.revoked and got.tags == ("other",)  # both changes kept
        store.close()


def test_a_database_down_as_the_relay_stops_costs_seconds_and_names_what_was_lost(
    tmp_path: Path, tally: Tally
) -> None:
    """A command in flight when the database goes and the relay is stopped: its daemon is
    drained, and the command's end (edge_disconnected) cannot be written. The relay gives up
    on it within its stop patience (not the 120 s it gives a write while it runs), exits by
    itself, and logs the command it could not store."""
    with private_server() as pg:
        relay = RelayProcess.start(tmp_path / "relay", store_url=pg.url)
        try:

            async def scenario() -> tuple[str, int]:
                async with relay.channel() as channel:
                    d = await enrolled(relay, channel, "stop", tools=["cmd.run"])
                    gate = asyncio.Event()

                    async def held(_cmd: stream_pb2.CommandInvocation) -> tuple[str, int]:
                        await gate.wait()
                        return ("ok", 0)

                    assert isinstance(await d.connect(), SessionAccepted)
                    d.command_handler = held
                    events = relay.admin(channel).StartFleetRun(
                        admin_pb2.FleetRunSpec(
                            selector="all",
                            tool="cmd.run",
                            args_json=json.dumps({"cmd": "true"}),
                            tenant_id="stop",
                        ),
                        metadata=relay.auth(),
                    )
                    await anext(aiter(events))
                    await wait_until(lambda: len(d.commands) == 1)
                    await asyncio.to_thread(pg.stop)
                    tally.fault()
                    stopping = time.monotonic()
                    # the daemon is drained with its command held
                    code = await asyncio.to_thread(relay.stop, 90)  # not PERSIST_PATIENCE
                    print(f"the relay stopped {time.monotonic() - stopping:.1f} s after SIGTERM")
                    return d.commands[0].command_id, code

            command_id, code = asyncio.run(scenario())
        finally:
            relay.stop()
            pg.start()  # for private_server's own stop
    assert code in (0, 1), code  # it ended by itself (1: heartbeats it could not flush)
    abandoned = [e for e in relay.logs() if e.get("event") == "store.write_abandoned"]
    assert [command_id] in [e.get("command_ids") for e in abandoned], abandoned
    assert all(e["relay_stopping"] for e in abandoned), abandoned
    assert "Traceback" not in (relay.data_dir / "stderr.log").read_text()
