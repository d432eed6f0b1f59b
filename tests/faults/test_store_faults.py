"""The relay's SQLite store locked by another process, and the disk full (RLIMIT_FSIZE on
the relay process via ``prlimit``): calls that must write answer UNAVAILABLE with a clear
sentence, nothing is half-written, connected daemons keep heartbeating, and once the fault
is gone everything works and the file passes ``PRAGMA integrity_check``.

SQLite-only: both faults are the SQLite file's own (a lock on it, its size limit). The
PostgreSQL store's faults -- a server restart mid-run, unreachable at start, a statement
timeout, a serialization failure -- are in ``test_postgres_faults``."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import grpc
import pytest

from aegis_edge_core.session import HeartbeatAcked, SessionAccepted
from aegis_edge_core.wire import admin_pb2
from tests.faults.conftest import Tally
from tests.faults.helpers import enrolled, issue_token
from tests.relay.daemon_driver import DaemonDriver, RelayProcess, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(120)]


def _integrity(db: Path) -> str:
    conn = sqlite3.connect(db, timeout=10)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


async def _expect_unavailable(call: object, what: str, tally: Tally, *words: str) -> None:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        tally.refused(True, what)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (what, err.code(), err.details())
        details = err.details() or ""
        assert "relay store" in details and any(w in details for w in words), details
        assert "Traceback" not in details
        return
    tally.refused(False, f"{what} succeeded while the store could not be written")
    raise AssertionError(f"{what} succeeded while the store could not be written")


async def _beats(daemon: DaemonDriver, n: int) -> None:
    start = len(daemon.saw(HeartbeatAcked))
    for _ in range(n):
        await daemon.heartbeat()
    await wait_until(lambda: len(daemon.saw(HeartbeatAcked)) >= start + n, what="acks")


def test_store_locked(tmp_path: Path, tally: Tally) -> None:
    relay = RelayProcess.start(tmp_path / "relay")
    db = relay.data_dir / "relay.db"
    try:

        async def scenario() -> None:
            async with relay.channel() as channel:
                admin = relay.admin(channel)
                d = await enrolled(relay, channel, "locked")
                assert isinstance(await d.connect(), SessionAccepted)
                token = await issue_token(relay, channel, "locked")
                lock = sqlite3.connect(db, timeout=0, isolation_level=None)
                lock.execute("BEGIN EXCLUSIVE")
                tally.fault()
                try:
                    newcomer = DaemonDriver(channel)
                    # the store has one writer thread: calls queue behind the busy timeout,
                    # so these go one after the other
                    await asyncio.gather(
                        _expect_unavailable(
                            admin.AddTags(
                                admin_pb2.TagsRequest(node_id=d.node_id, tags=["during-lock"]),
                                metadata=relay.auth(),
                            ),
                            "tag while locked",
                            tally,
                            "locked",
                        ),
                        _beats(d, 3),
                    )
                    await _expect_unavailable(
                        newcomer.enroll(token), "enroll while locked", tally, "locked"
                    )
                finally:
                    lock.execute("ROLLBACK")
                    lock.close()
                host = await admin.AddTags(
                    admin_pb2.TagsRequest(node_id=d.node_id, tags=["after"]), metadata=relay.auth()
                )
                assert list(host.capabilities.tags) == ["after"]  # nothing half-applied
                # the token was not consumed by the failed attempt
                await newcomer.enroll(token)
                await d.close()

        asyncio.run(scenario())
    finally:
        assert relay.stop() == 0
    assert _integrity(db) == "ok"


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux prlimit")
def test_disk_full(tmp_path: Path, tally: Tally) -> None:
    data_dir = tmp_path / "relay"
    data_dir.mkdir()
    # logs to /dev/null: RLIMIT_FSIZE limits regular files only, so the store fails and the
    # relay's own logging does not
    for name in ("stdout.log", "stderr.log"):
        (data_dir / name).symlink_to(os.devnull)
    relay = RelayProcess.start(data_dir)
    db = data_dir / "relay.db"

    def fsize(limit: str) -> None:
        subprocess.run(
            ["prlimit", f"--pid={relay.proc.pid}", f"--fsize={limit}:unlimited"],
            check=True,
            timeout=10,
        )

    try:

        async def scenario() -> None:
            async with relay.channel() as channel:
                admin = relay.admin(channel)
                d = await enrolled(relay, channel, "full", tools=["edge.ping"])
                assert isinstance(await d.connect(), SessionAccepted)
                token = await issue_token(relay, channel, "full")
                before = await admin.ListHosts(
                    admin_pb2.ListHostsRequest(tenant_id="full"), metadata=relay.auth()
                )
                fsize("1")
                tally.fault()
                try:
                    await _expect_unavailable(
                        admin.AddTags(
                            admin_pb2.TagsRequest(node_id=d.node_id, tags=["during-full"]),
                            metadata=relay.auth(),
                        ),
                        "tag on a full disk",
                        tally,
                        "full",
                        "too large",
                        "I/O",
                    )
                    await _expect_unavailable(
                        DaemonDriver(channel).enroll(token),
                        "enroll on a full disk",
                        tally,
                        "full",
                        "too large",
                        "I/O",
                    )

                    async def run() -> None:
                        async for _ in admin.StartFleetRun(
                            admin_pb2.FleetRunSpec(
                                selector="all", tool="edge.ping", tenant_id="full"
                            ),
                            metadata=relay.auth(),
                        ):
                            pass

                    await _expect_unavailable(
                        run(), "fleet run on a full disk", tally, "full", "too large", "I/O"
                    )
                    await _beats(d, 3)  # the stream lives on
                finally:
                    fsize("unlimited")
                runs = await admin.ListFleetRuns(
                    admin_pb2.ListFleetRunsRequest(), metadata=relay.auth()
                )
                assert not runs.runs  # the refused run left nothing behind
                host = await admin.AddTags(
                    admin_pb2.TagsRequest(node_id=d.node_id, tags=["after"]), metadata=relay.auth()
                )
                assert list(host.capabilities.tags) == ["after"]
                after = await admin.ListHosts(
                    admin_pb2.ListHostsRequest(tenant_id="full"), metadata=relay.auth()
                )
                assert [h.node_id for h in after.hosts] == [h.node_id for h in before.hosts]
                await DaemonDriver(channel).enroll(token)  # not burnt by the failed attempt
                async for _ in admin.StartFleetRun(
                    admin_pb2.FleetRunSpec(selector="all", tool="edge.ping", tenant_id="full"),
                    metadata=relay.auth(),
                ):
                    pass
                await d.close()

        asyncio.run(scenario())
    finally:
        assert relay.stop() == 0
    assert _integrity(db) == "ok"
    # and the relay starts again on the same file, with everything that was committed
    relay = RelayProcess.start(data_dir)
    try:

        async def check() -> None:
            async with relay.channel() as channel:
                hosts = await relay.admin(channel).ListHosts(
                    admin_pb2.ListHostsRequest(tenant_id="full"), metadata=relay.auth()
                )
                assert len(hosts.hosts) == 2
                tagged = [h for h in hosts.hosts if list(h.capabilities.tags) == ["after"]]
                assert len(tagged) == 1

        asyncio.run(check())
    finally:
        assert relay.stop() == 0
