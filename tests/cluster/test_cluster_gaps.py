"""The cluster's routing gaps closed (issue 18), on the real PostgreSQL with relay and daemon
processes: a fleet run cancelled through a relay that does not coordinate it, live output of
a command on a host another relay holds, and a relay cut off from PostgreSQL letting its
daemons go once its lease lapsed.

Each test enrolls hosts of its own, so a cluster shared between tests would do as well.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from aegis_edge_core.wire import admin_pb2, common_pb2
from tests.agent import harness
from tests.agent.harness import DaemonProcess, cli, pid_gone
from tests.cluster.conftest import STALE
from tests.pg import fresh_database
from tests.relay.daemon_driver import RelayProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CONNECTED = common_pb2.DAEMON_STATUS_CONNECTED


def _enroll(relay: RelayProcess, state: Path, tenant: str) -> str:
    """A host enrolled at ``relay`` (its daemon attests there first); its node id."""

    async def token() -> str:
        async with relay.channel() as channel:
            resp = await relay.admin(channel).IssueEnrollmentToken(
                admin_pb2.IssueEnrollmentTokenRequest(tenant_id=tenant), metadata=relay.auth()
            )
        return str(resp.token)

    cli(
        "edge", "enroll", asyncio.run(token()), "--state-dir", str(state), "--allow-tool", "cmd.run"
    )
    return str(json.loads((state / "node.json").read_text())["node_id"])


async def _until_connected(relay: RelayProcess, channel: grpc.aio.Channel, ids: set[str]) -> None:
    async def seen() -> bool:
        listed = await relay.admin(channel).ListHosts(
            admin_pb2.ListHostsRequest(), metadata=relay.auth(), timeout=10
        )
        return ids <= {h.node_id for h in listed.hosts if h.status == CONNECTED}

    await wait_until(seen, timeout=30, what=f"{relay.address} shows {len(ids)} hosts Connected")


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        d.stop()


def _host(
    relay: RelayProcess, root: Path, tenant: str, daemons: list[DaemonProcess]
) -> tuple[str, Path]:
    """A host enrolled at ``relay`` and its daemon Connected there; its node id and the
    directory its commands run in."""
    state, cwd = root / "state", root / "cwd"
    cwd.mkdir(parents=True)
    node_id = _enroll(relay, state, tenant)
    daemons.append(DaemonProcess.start(state, cwd=cwd))
    assert daemons[-1].wait_event("connected", timeout=30)["relay"] == relay.address
    return node_id, cwd


def test_a_run_cancelled_through_a_relay_that_does_not_coordinate_it_is_cancelled(
    cluster: list[RelayProcess], daemons: list[DaemonProcess], tmp_path: Path
) -> None:
    """Run coordinated by A over hosts held by B and C, cancelled through C: the cancel
    goes to A through the store, A cancels the commands at B and C (their daemons kill
    them) and the run ends ``cancelled``; C answers with the run as A saw it on taking it."""
    a, b, c = cluster
    hosts = [
        _host(holder, tmp_path / f"h{i}", "cancel", daemons) for i, holder in enumerate((b, c))
    ]
    ids = {node_id for node_id, _ in hosts}
    pidfiles = [cwd / "pid" for _, cwd in hosts]

    async def scenario() -> tuple[admin_pb2.FleetRun, admin_pb2.FleetRun]:
        async with a.channel() as ch_a, c.channel() as ch_c:
            await _until_connected(a, ch_a, ids)
            call = a.admin(ch_a).StartFleetRun(
                admin_pb2.FleetRunSpec(
                    selector="all",
                    tool="cmd.run",
                    args_json=json.dumps({"cmd": "echo $$ > pid; sleep 60"}),
                    deadline_secs=120,
                    tenant_id="cancel",
                ),
                metadata=a.auth(),
                timeout=120,
            )
            events = aiter(call)
            fid = (await anext(events)).started.fleet_command_id
            await wait_until(
                lambda: all(p.exists() and p.read_text().strip() for p in pidfiles),
                timeout=30,
                what="both commands running",
            )
            asked = time.monotonic()
            answer = await c.admin(ch_c).CancelFleetRun(
                admin_pb2.GetFleetRunRequest(fleet_command_id=fid), metadata=c.auth(), timeout=20
            )
            answered = time.monotonic() - asked
            last = None
            async for event in events:
                last = event
            assert last is not None and last.HasField("finished"), last
            print(
                f"cancel through C: A's answer after {answered:.2f} s, "
                f"run cancelled after {time.monotonic() - asked:.2f} s"
            )
            return answer, last.finished

    answer, run = asyncio.run(scenario())
    assert answer.fleet_command_id == run.fleet_command_id
    assert answer.halt_reason.startswith("cancelled by"), answer
    assert "handed to" not in answer.halt_reason
    assert run.outcome == common_pb2.RUN_OUTCOME_CANCELLED, run
    assert {t.node_id for t in run.targets} == ids
    for pidfile in pidfiles:
        child = int(pidfile.read_text())
        harness.wait_until(lambda child=child: pid_gone(child), 10, what=f"command {child} killed")
    taken = [e for e in a.logs() if e.get("event") == "fleet.run_cancel_taken"]
    assert [e["fleet_command_id"] for e in taken] == [run.fleet_command_id]


def test_live_output_of_a_host_held_by_another_relay_reaches_the_coordinators_watcher(
    cluster: list[RelayProcess], daemons: list[DaemonProcess], tmp_path: Path
) -> None:
    """``fleet run --follow`` on A for a host whose stream B holds: the chunks come back
    through the store, in order and ahead of the target's end."""
    a, b, _ = cluster
    node_id, _ = _host(b, tmp_path / "h", "follow", daemons)

    async def scenario() -> list[admin_pb2.FleetRunEvent]:
        async with a.channel() as channel:
            await _until_connected(a, channel, {node_id})
            call = a.admin(channel).StartFleetRun(
                admin_pb2.FleetRunSpec(
                    selector="all",
                    tool="cmd.run",
                    args_json=json.dumps(
                        {"cmd": "for i in 1 2 3 4; do echo line$i; echo err$i >&2; sleep 0.4; done"}
                    ),
                    deadline_secs=60,
                    tenant_id="follow",
                    follow_output=True,
                ),
                metadata=a.auth(),
                timeout=60,
            )
            return [event async for event in call]

    events = asyncio.run(scenario())
    kinds = [e.WhichOneof("body") for e in events]
    assert (
        kinds[-1] == "finished" and events[-1].finished.outcome == common_pb2.RUN_OUTCOME_COMPLETED
    )
    outputs = [e.output for e in events if e.HasField("output")]
    assert b"".join(o.stdout for o in outputs) == b"".join(b"line%d\n" % i for i in range(1, 5))
    assert b"".join(o.stderr for o in outputs) == b"".join(b"err%d\n" % i for i in range(1, 5))
    assert all(o.node_id == node_id and o.dropped_bytes == 0 for o in outputs)
    assert len(outputs) >= 2  # live, chunk by chunk, not one tail at the end
    assert kinds.index("target_finished") > max(i for i, k in enumerate(kinds) if k == "output")


@pytest.fixture
def pg_proxy() -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    """A TCP proxy process in front of the test PostgreSQL server, a fresh database's URL,
    and the same database's URL through the proxy."""
    with fresh_database() as url:
        parts = urllib.parse.urlsplit(url)
        proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("tcp_proxy.py")),
                parts.hostname or "",
                str(parts.port),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline())
            netloc = parts.netloc.rsplit(":", 1)[0] + f":{port}"
            yield proc, url, urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        finally:
            proc.kill()
            proc.wait(10)


def test_a_relay_cut_off_from_postgresql_lets_its_daemons_go_once_its_lease_lapsed(
    pg_proxy: tuple[subprocess.Popen[str], str, str],
    daemons: list[DaemonProcess],
    tmp_path: Path,
) -> None:
    """Relay A reaches PostgreSQL through a proxy process, relay B directly; A coordinates
    a run over its own daemons. The proxy is killed: A can no longer renew its lease, and
    once it lapsed A drops its streams and lets its run go, so its daemons dial the next
    relay and are Connected at B, and B takes the run over and finishes it."""
    proxy, url, proxied = pg_proxy
    flags = ("--stale-threshold", f"{STALE:g}s", "--heartbeat-interval", "0.5s")
    relays: list[RelayProcess] = []
    try:
        relays.append(
            RelayProcess.start(tmp_path / "a", "--cluster", "gaps", *flags, store_url=proxied)
        )
        bundle = tmp_path / "bundle.json"
        cli("relay", "join-bundle", "--data-dir", str(tmp_path / "a"), "--out", str(bundle))
        relays.append(
            RelayProcess.start(tmp_path / "b", "--join-bundle", str(bundle), *flags, store_url=url)
        )
        a, b = relays
        ids = {_host(a, tmp_path / f"h{i}", "split", daemons)[0] for i in range(2)}

        async def b_shows_them_connected() -> None:
            async with b.channel() as channel:
                await _until_connected(b, channel, ids)

        asyncio.run(b_shows_them_connected())  # held by A, and A live to the others

        async def start_run() -> str:
            async with a.channel() as channel:
                call = a.admin(channel).StartFleetRun(
                    admin_pb2.FleetRunSpec(
                        selector="all",
                        tool="cmd.run",
                        # still running when A is cut off: no result reaches A meanwhile,
                        # so only the lapsed lease ends A's streams
                        args_json=json.dumps({"cmd": "sleep 10"}),
                        deadline_secs=60,
                        tenant_id="split",
                    ),
                    metadata=a.auth(),
                    timeout=60,
                )
                started = await anext(aiter(call))  # its commands are out
                call.cancel()  # the watcher goes, the run goes on
                return str(started.started.fleet_command_id)

        fid = asyncio.run(start_run())
        cut = time.monotonic()
        proxy.kill()
        proxy.wait(10)
        for d in daemons:
            moved = d.wait_event("connected", count=2, timeout=30)
            assert moved["relay"] == b.address, moved
        asyncio.run(b_shows_them_connected())  # now held by B
        lapsed = [e for e in a.logs() if e.get("event") == "cluster.lease_lapsed"]
        assert sum(e["streams_dropped"] for e in lapsed) >= len(ids), lapsed
        print(
            f"A dropped its streams {lapsed[0]['lapsed_for']} s after its lease lapsed; "
            f"its daemons Connected at B {time.monotonic() - cut:.2f} s after the cut"
        )

        # A let its run go; B took it over and finished it, nothing lost
        async def finished_at_b() -> admin_pb2.FleetRun:
            async with b.channel() as channel:

                async def get() -> admin_pb2.FleetRun:
                    return await b.admin(channel).GetFleetRun(
                        admin_pb2.GetFleetRunRequest(fleet_command_id=fid),
                        metadata=b.auth(),
                        timeout=10,
                    )

                async def done() -> bool:
                    return (await get()).outcome != common_pb2.RUN_OUTCOME_RUNNING

                await wait_until(done, timeout=30, what="the run finished at B")
                return await get()

        run = asyncio.run(finished_at_b())
        assert {t.node_id for t in run.targets} == ids
        assert {t.outcome for t in run.targets} <= {
            common_pb2.TARGET_OUTCOME_OK,
            common_pb2.TARGET_OUTCOME_EDGE_DISCONNECTED,
        }, run
        assert [
            e["fleet_command_id"] for e in a.logs() if e.get("event") == "fleet.run_let_go"
        ] == [fid]
        assert any(
            e.get("event") == "fleet.run_taken_over" and e.get("fleet_command_id") == fid
            for e in b.logs()
        )
    finally:
        for relay in relays:
            relay.stop()
