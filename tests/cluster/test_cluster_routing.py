"""Three relay processes over one PostgreSQL database (issue 18, part B): every relay shows
the whole fleet with the right statuses, a killed relay's nodes go Disconnected at the
survivors, and revocations committed through one relay cut streams held by another.

Until relays accept each other's tokens (part A), a daemon attests at the relay that
enrolled it: the daemons are spread over the three relays by enrolling them there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import grpc
import pytest

from aegis_edge_core.session import Refused
from aegis_edge_core.wire import admin_pb2, common_pb2
from tests.agent import harness
from tests.cluster.conftest import STALE, relay_cluster
from tests.pg import fresh_database
from tests.relay.daemon_driver import DaemonDriver, RelayProcess, wait_until

pytestmark = pytest.mark.integration

CONNECTED = common_pb2.DAEMON_STATUS_CONNECTED
DISCONNECTED = common_pb2.DAEMON_STATUS_DISCONNECTED
REVOKED = common_pb2.DAEMON_STATUS_REVOKED
TAKEOVER_DAEMONS = 30


async def _daemons_at(
    relay: RelayProcess, channel: grpc.aio.Channel, tenant: str, count: int
) -> list[DaemonDriver]:
    admin = relay.admin(channel)
    out = []
    for _ in range(count):
        resp = await admin.IssueEnrollmentToken(
            admin_pb2.IssueEnrollmentTokenRequest(tenant_id=tenant), metadata=relay.auth()
        )
        daemon = DaemonDriver(channel)
        await daemon.enroll(resp.token)
        await daemon.connect()
        daemon.start_heartbeats(0.3)
        out.append(daemon)
    return out


async def _statuses(relay: RelayProcess, channel: grpc.aio.Channel) -> dict[str, int]:
    hosts = await relay.admin(channel).ListHosts(
        admin_pb2.ListHostsRequest(), metadata=relay.auth(), timeout=10
    )
    return {h.node_id: h.status for h in hosts.hosts}


def test_every_relay_shows_the_fleet_and_a_killed_relays_nodes_go_disconnected(
    cluster: list[RelayProcess],
) -> None:
    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            channels = [await stack.enter_async_context(r.channel()) for r in cluster]
            held: list[list[DaemonDriver]] = []
            for relay, channel in zip(cluster, channels, strict=True):
                held.append(await _daemons_at(relay, channel, "acme", 3))
            every = {d.node_id for group in held for d in group}
            assert len(every) == 9

            async def all_connected() -> bool:
                for relay, channel in zip(cluster, channels, strict=True):
                    seen = await _statuses(relay, channel)
                    if set(seen) != every or set(seen.values()) != {CONNECTED}:
                        return False
                return True

            await wait_until(all_connected, timeout=15, what="every relay shows 9 Connected")

            # GetHost on a relay that does not hold the node answers from the rows too.
            far = held[2][0]
            host = (
                await cluster[0]
                .admin(channels[0])
                .GetHost(admin_pb2.GetHostRequest(node_id=far.node_id), metadata=cluster[0].auth())
            )
            assert host.status == CONNECTED

            killed = cluster[1]
            gone = {d.node_id for d in held[1]}
            killed.proc.kill()  # kill -9: no drain, no lease dropped, rows left behind
            killed.proc.wait(10)
            started = time.monotonic()

            async def survivors_see_it() -> bool:
                for i in (0, 2):
                    seen = await _statuses(cluster[i], channels[i])
                    for node_id, status in seen.items():
                        want = DISCONNECTED if node_id in gone else CONNECTED
                        if status != want:
                            return False
                return True

            await wait_until(
                survivors_see_it, timeout=4 * STALE, what="survivors show B's nodes Disconnected"
            )
            took = time.monotonic() - started
            print(f"killed relay's nodes Disconnected at the survivors after {took:.2f} s")
            for group in (held[0], held[2]):
                for d in group:
                    await d.close()

    asyncio.run(scenario())


def test_a_fleet_run_on_one_relay_reaches_daemons_held_by_all_three(
    cluster: list[RelayProcess],
) -> None:
    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            channels = [await stack.enter_async_context(r.channel()) for r in cluster]
            held = [
                await _daemons_at(relay, channel, "fleet", 3)
                for relay, channel in zip(cluster, channels, strict=True)
            ]
            daemons = [d for group in held for d in group]
            a = cluster[0]
            admin = a.admin(channels[0])

            async def all_see_all() -> bool:
                for relay, channel in zip(cluster, channels, strict=True):
                    seen = await _statuses(relay, channel)
                    if not all(seen.get(d.node_id) == CONNECTED for d in daemons):
                        return False
                return True

            await wait_until(all_see_all, timeout=15, what="every relay shows every daemon")
            events = [
                event
                async for event in admin.StartFleetRun(
                    admin_pb2.FleetRunSpec(
                        selector="all",
                        tool="cmd.run",
                        args_json=json.dumps({"cmd": "true"}),
                        mode="rolling=4",
                        deadline_secs=60,
                        tenant_id="fleet",
                    ),
                    metadata=a.auth(),
                    timeout=60,
                )
            ]
            run = events[-1].finished
            assert run.outcome == common_pb2.RUN_OUTCOME_COMPLETED, run
            assert len(run.targets) == 9
            assert {t.outcome for t in run.targets} == {common_pb2.TARGET_OUTCOME_OK}
            # each daemon got its command once, wherever its stream is held
            assert [len(d.commands) for d in daemons] == [1] * 9
            # every result is in history, read through any relay
            for relay, channel in zip(cluster, channels, strict=True):
                got = await relay.admin(channel).GetFleetRun(
                    admin_pb2.GetFleetRunRequest(fleet_command_id=run.fleet_command_id),
                    metadata=relay.auth(),
                )
                assert {t.outcome for t in got.targets} == {common_pb2.TARGET_OUTCOME_OK}
            for d in daemons:
                host = (
                    await cluster[2]
                    .admin(channels[2])
                    .GetHost(
                        admin_pb2.GetHostRequest(node_id=d.node_id), metadata=cluster[2].auth()
                    )
                )
                assert [h.outcome for h in host.history] == [common_pb2.TARGET_OUTCOME_OK]
            for d in daemons:
                await d.close()

    asyncio.run(scenario())


SLOW_SYNC_STALE = 30.0
"""A stale threshold whose periodic sync (every 5 s) is far slower than a revocation must
travel: what cuts the stream in time is the store's NOTIFY wake-up."""


def test_revoke_and_tenant_delete_through_one_relay_cut_streams_held_by_another(
    tmp_path: Path,
) -> None:
    async def scenario(cluster: list[RelayProcess]) -> None:
        async with contextlib.AsyncExitStack() as stack:
            channels = [await stack.enter_async_context(r.channel()) for r in cluster]
            a, b = cluster[0], cluster[1]
            target, bystander = await _daemons_at(b, channels[1], "acme", 2)
            doomed = [
                *await _daemons_at(b, channels[1], "doomed", 1),
                *await _daemons_at(cluster[2], channels[2], "doomed", 1),
            ]

            async def a_sees_them() -> bool:
                seen = await _statuses(a, channels[0])
                ids = [target.node_id, bystander.node_id, *(d.node_id for d in doomed)]
                return all(seen.get(n) == CONNECTED for n in ids)

            await wait_until(a_sees_them, timeout=20, what="A shows B's and C's daemons")

            started = time.monotonic()
            await a.admin(channels[0]).RevokeNode(
                admin_pb2.RevokeNodeRequest(node_id=target.node_id, reason="stolen laptop"),
                metadata=a.auth(),
            )
            # bounded well under the 5 s sync, so only the wake-up can meet it
            await wait_until(target.stream_done.is_set, timeout=3, what="stream cut")
            print(f"revoke through A cut B's stream after {time.monotonic() - started:.2f} s")
            again = await target.connect()
            assert isinstance(again, Refused)
            assert not bystander.stream_done.is_set()
            host = await b.admin(channels[1]).GetHost(
                admin_pb2.GetHostRequest(node_id=target.node_id), metadata=b.auth()
            )
            assert host.status == REVOKED

            started = time.monotonic()
            await a.admin(channels[0]).DeleteTenant(
                admin_pb2.DeleteTenantRequest(tenant_id="doomed"), metadata=a.auth()
            )
            await wait_until(
                lambda: all(d.stream_done.is_set() for d in doomed),
                timeout=3,
                what="the tenant's streams cut at B and C",
            )
            print(
                f"tenant delete through A cut B's and C's streams after "
                f"{time.monotonic() - started:.2f} s"
            )
            for d in doomed:
                assert isinstance(await d.connect(), Refused)
            await bystander.close()

    with relay_cluster(tmp_path, stale=SLOW_SYNC_STALE) as relays:
        asyncio.run(scenario(relays))


@pytest.mark.parametrize("stop", ["kill -9", "SIGTERM"])
def test_the_coordinating_relay_goes_mid_run_and_another_relay_finishes_it(
    stop: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``rolling=5 --on-error stop-after=3`` run started on relay A over real daemon
    processes held by B and C; A is killed (or stopped gracefully) mid-run. The run
    finishes on B or C with the outcome it would have had, each command ran once (a marker
    line per run, written by the daemon), and every result is in history."""
    with fresh_database() as url:
        monkeypatch.setenv("AEGIS_STORE_URL", url)
        relays = [
            harness.RelayProcess.start(tmp_path / f"relay{i}", stale_threshold="10s")
            for i in range(3)
        ]
        daemons: list[harness.DaemonProcess] = []
        try:
            a, b, c = relays
            hosts = []
            for i in range(TAKEOVER_DAEMONS):
                holder = (b, c)[i % 2]
                host = harness.enroll_host(holder, tmp_path / f"h{i}", allow_tools=["cmd.run"])
                cwd = tmp_path / f"h{i}-cwd"
                cwd.mkdir()
                hosts.append((host, cwd))
            # The last three targets (sorted by node id) fail: the third failure halts the
            # run at its very end, so the outcome does not depend on timing.
            ordered = sorted(hosts, key=lambda hc: hc[0].node_id)
            for _, cwd in ordered[-3:]:
                (cwd / "fail-here").touch()
            for host, cwd in hosts:
                daemons.append(harness.DaemonProcess.start(host.state_dir, cwd=cwd))
            for d in daemons:
                d.wait_event("connected", timeout=60)
            ids = {h.node_id for h, _ in hosts}
            stub, md = a.admin()

            def a_sees_all() -> bool:
                listed = stub.ListHosts(admin_pb2.ListHostsRequest(), metadata=md, timeout=10)
                return {h.node_id for h in listed.hosts if h.status == CONNECTED} == ids

            harness.wait_until(a_sees_all, 30, what="A shows every daemon Connected")
            stream = stub.StartFleetRun(
                admin_pb2.FleetRunSpec(
                    selector="all",
                    tool="cmd.run",
                    args_json=json.dumps(
                        {"cmd": "echo ran >> marker; sleep 3; test ! -e fail-here"}
                    ),
                    mode="rolling=5",
                    on_error="stop-after=3",
                    deadline_secs=120,
                    tenant_id="acme",
                ),
                metadata=md,
                timeout=120,
            )
            started = next(iter(stream))
            fid = started.started.fleet_command_id

            def markers() -> int:
                return sum((cwd / "marker").exists() for _, cwd in hosts)

            # mid-run: the first window came back and A sent the next commands
            harness.wait_until(lambda: markers() >= 7, 60, what="the run's second wave")
            if stop == "kill -9":
                a.proc.kill()
                a.proc.wait(10)
            else:
                assert a.stop() == 0
                handed = [e for e in a.output.events() if e.get("event") == "fleet.run_handed_over"]
                assert [e["fleet_command_id"] for e in handed] == [fid]
            stub_b, md_b = b.admin()

            def finished() -> admin_pb2.FleetRun | None:
                run = stub_b.GetFleetRun(
                    admin_pb2.GetFleetRunRequest(fleet_command_id=fid), metadata=md_b, timeout=10
                )
                return run if run.outcome != common_pb2.RUN_OUTCOME_RUNNING else None

            run = harness.wait_until(finished, 90, what="the run finished on another relay")
            takeovers = [
                e
                for r in (b, c)
                for e in r.output.events()
                if e.get("event") == "fleet.run_taken_over" and e.get("fleet_command_id") == fid
            ]
            assert len(takeovers) == 1, takeovers
            print("takeover:", takeovers[0])
            assert run.outcome == common_pb2.RUN_OUTCOME_HALTED, run
            assert dict(run.counts) == {"ok": TAKEOVER_DAEMONS - 3, "error": 3}, run
            assert {t.node_id for t in run.targets} == ids
            # daemon-side evidence: every command ran exactly once
            for _, cwd in hosts:
                assert (cwd / "marker").read_text() == "ran\n"
            # every result in history, read through C
            stub_c, md_c = c.admin()
            for host, _ in hosts:
                got = stub_c.GetHost(
                    admin_pb2.GetHostRequest(node_id=host.node_id), metadata=md_c, timeout=10
                )
                assert len(got.history) == 1
                assert got.history[0].fleet_command_id == fid
                assert got.history[0].outcome in (
                    common_pb2.TARGET_OUTCOME_OK,
                    common_pb2.TARGET_OUTCOME_ERROR,
                )
        finally:
            for d in daemons:
                d.stop()
            for r in relays:
                r.stop()
