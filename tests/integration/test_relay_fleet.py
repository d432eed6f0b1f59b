"""Fleet runs through the admin API on a real relay, the seven metrics, and a restart."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aegis_edge_core import metrics_catalogue as cat
from aegis_edge_core.session import ResultAcked, SessionAccepted
from aegis_edge_core.wire import admin_pb2, common_pb2, stream_pb2
from tests.relay.daemon_driver import DaemonDriver, RelayProcess, wait_until

pytestmark = pytest.mark.integration


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def test_fleet_run_halts_and_metrics(tmp_path: Path) -> None:
    data_dir = tmp_path / "relay"
    relay = RelayProcess.start(data_dir, "--heartbeat-interval", "0.5s", "--stale-threshold", "3s")
    other = relay.operator_token("someone-else")
    try:
        run_id = asyncio.run(_scenario(relay, other))
    finally:
        assert relay.stop() == 0

    # After a restart the store rebuilds the gauge: every daemon Disconnected now.
    relay = RelayProcess.start(data_dir)
    try:
        text = relay.scrape()
        assert value(text, "aegis_edge_daemons_total", status="Disconnected", tenant="fleet") == 5
        assert value(text, "aegis_edge_daemons_total", status="Connected", tenant="fleet") == 0

        async def after_restart() -> None:
            async with relay.channel() as channel:
                admin = relay.admin(channel)
                run = await admin.GetFleetRun(
                    admin_pb2.GetFleetRunRequest(fleet_command_id=run_id), metadata=relay.auth()
                )
                assert run.outcome == common_pb2.RUN_OUTCOME_HALTED
                assert {(s.reason) for s in run.skipped} >= {"halted", "disconnected"}
                runs = await admin.ListFleetRuns(
                    admin_pb2.ListFleetRunsRequest(), metadata=relay.auth()
                )
                assert [r.fleet_command_id for r in runs.runs][-1] == run_id  # newest first
            assert len(runs.runs) == 2 and not runs.runs[0].targets

        asyncio.run(after_restart())
    finally:
        assert relay.stop() == 0
    logs = [json.loads(line) for line in (data_dir / "stderr.log").read_text().splitlines()]
    assert all({"timestamp", "level", "event"} <= set(rec) for rec in logs)
    finished = [r for r in logs if r["event"] == "command.finished"]
    assert finished and all({"node_id", "tenant_id", "command_id"} <= set(r) for r in finished)
    text = (data_dir / "stderr.log").read_text()
    assert "eyJ" not in text  # no JWT ever reaches the logs


async def _scenario(relay: RelayProcess, other_token: str) -> str:
    async with relay.channel() as channel:
        admin = relay.admin(channel)
        daemons: list[DaemonDriver] = []
        for _ in range(5):
            token = (
                await admin.IssueEnrollmentToken(
                    admin_pb2.IssueEnrollmentTokenRequest(tenant_id="fleet"),
                    metadata=relay.auth(),
                )
            ).token
            d = DaemonDriver(channel, tools=["cmd.run", "edge.ping"])
            await d.enroll(token)
            daemons.append(d)
        offline, online = daemons[0], sorted(daemons[1:], key=lambda d: d.node_id)
        for d in online:
            assert isinstance(await d.connect(), SessionAccepted)
            d.start_heartbeats(0.2)
        failing = online[0]  # first in plan order (targets are sorted by node id)

        async def ok_later(_cmd: stream_pb2.CommandInvocation) -> tuple[str, int]:
            await asyncio.sleep(0.4)
            return ("ok", 0)

        for d in online[1:]:
            d.command_handler = ok_later
        failing.command_handler = lambda _cmd: ("error", 3)

        preview = await admin.PreviewFleetRun(
            admin_pb2.FleetRunSpec(selector="all", tool="cmd.run", tenant_id="fleet"),
            metadata=relay.auth(),
        )
        assert sorted(preview.targets) == sorted(d.node_id for d in online)
        assert [(s.node_id, s.reason) for s in preview.skipped] == [
            (offline.node_id, "disconnected")
        ]

        events = []
        async for event in admin.StartFleetRun(
            admin_pb2.FleetRunSpec(
                selector="all",
                tool="cmd.run",
                args_json=json.dumps({"cmd": "true"}),
                mode="rolling=2",
                on_error="stop-after=1",
                deadline_secs=30,
                tenant_id="fleet",
            ),
            metadata=relay.auth(),
            timeout=20,
        ):
            events.append(event)
        kinds = [e.WhichOneof("body") for e in events]
        assert kinds[0] == "started" and kinds[-1] == "finished"
        assert kinds.count("dispatched") == 2, kinds
        run = events[-1].finished
        assert run.outcome == common_pb2.RUN_OUTCOME_HALTED
        by_node = {t.node_id: t for t in run.targets}
        assert by_node[failing.node_id].outcome == common_pb2.TARGET_OUTCOME_ERROR
        assert by_node[failing.node_id].exit_code == 3
        assert by_node[online[1].node_id].outcome == common_pb2.TARGET_OUTCOME_OK
        halted = sorted(s.node_id for s in run.skipped if s.reason == "halted")
        assert halted == sorted(d.node_id for d in online[2:])
        assert (offline.node_id, "disconnected") in {(s.node_id, s.reason) for s in run.skipped}
        assert sum(len(d.commands) for d in online) == 2
        assert run.trace_id
        cmd = failing.commands[0]
        assert cmd.fleet_command_id == run.fleet_command_id
        assert cmd.trace.traceparent.startswith(f"00-{run.trace_id}-")
        assert json.loads(cmd.args_json) == {"cmd": "true"}

        # persisted: the run, and the command in the host's history
        got = await admin.GetFleetRun(
            admin_pb2.GetFleetRunRequest(fleet_command_id=run.fleet_command_id),
            metadata=relay.auth(),
        )
        assert got.outcome == common_pb2.RUN_OUTCOME_HALTED
        # plain arguments are stored and echoed (secret ones never: see test_fleet_live.py)
        assert json.loads(got.spec.args_json) == {"cmd": "true"} and not got.spec.secret_keys
        host = await admin.GetHost(
            admin_pb2.GetHostRequest(node_id=failing.node_id), metadata=relay.auth()
        )
        assert [(h.fleet_command_id, h.outcome, h.exit_code) for h in host.history] == [
            (run.fleet_command_id, common_pb2.TARGET_OUTCOME_ERROR, 3)
        ]
        # another tenant's operator does not see the run
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.GetFleetRun(
                admin_pb2.GetFleetRunRequest(fleet_command_id=run.fleet_command_id),
                metadata=relay.auth(other_token),
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await admin.ListFleetRuns(
            admin_pb2.ListFleetRunsRequest(), metadata=relay.auth(other_token)
        )
        assert list(listed.runs) == []

        # a command lost to a dropped stream ends edge_disconnected
        slow = online[1]

        async def never(_cmd: stream_pb2.CommandInvocation) -> tuple[str, int]:
            await asyncio.sleep(60)
            return ("ok", 0)

        slow.command_handler = never
        lost_events = []

        async def run_lost() -> None:
            async for event in admin.StartFleetRun(
                admin_pb2.FleetRunSpec(
                    selector=f"node={slow.node_id}",
                    tool="cmd.run",
                    args_json=json.dumps({"cmd": "true"}),
                    tenant_id="fleet",
                ),
                metadata=relay.auth(),
                timeout=20,
            ):
                lost_events.append(event)

        task = asyncio.create_task(run_lost())
        await wait_until(lambda: slow.commands[-1:] and len(slow.commands) == 2, what="dispatch")
        await slow.close()
        await asyncio.wait_for(task, 10)
        lost = lost_events[-1].finished
        assert lost.outcome == common_pb2.RUN_OUTCOME_COMPLETED_WITH_ERRORS
        assert lost.targets[0].outcome == common_pb2.TARGET_OUTCOME_EDGE_DISCONNECTED

        # the daemon comes back and delivers the result late: kept in command history
        assert isinstance(await slow.connect(), SessionAccepted)
        lost_id = lost.targets[0].command_id
        assert slow.session is not None
        slow.session.result(
            stream_pb2.CommandResult(
                command_id=lost_id,
                outcome=common_pb2.TARGET_OUTCOME_OK,
                exit_code=0,
                has_exit_code=True,
            )
        )
        await slow._flush()
        await wait_until(
            lambda: any(
                isinstance(e, ResultAcked) and e.command_id == lost_id for e in slow.events
            ),
            what="ResultAck of the late result",
        )
        host = await admin.GetHost(
            admin_pb2.GetHostRequest(node_id=slow.node_id), metadata=relay.auth()
        )
        late = {h.command_id: h for h in host.history}[lost_id]
        assert late.outcome == common_pb2.TARGET_OUTCOME_OK and late.has_exit_code

        await asyncio.sleep(1.1)  # one maintenance pass accounts stream seconds
        text = relay.scrape()
        for spec in cat.CATALOGUE:
            assert f"# TYPE {spec.name} {spec.kind.value}" in text, spec.name
        assert value(text, "aegis_edge_fleet_runs_total", outcome="halted") == 1
        assert value(text, "aegis_edge_fleet_runs_total", outcome="completed_with_errors") == 1
        assert value(text, "aegis_edge_fleet_targets_skipped_total", reason="halted") == 2
        assert value(text, "aegis_edge_fleet_targets_skipped_total", reason="disconnected") == 1
        assert (
            value(text, "aegis_edge_commands_dispatched_total", tool="cmd.run", outcome="error")
            == 1
        )
        assert (
            value(text, "aegis_edge_commands_dispatched_total", tool="cmd.run", outcome="ok") == 1
        )
        assert (
            value(
                text,
                "aegis_edge_commands_dispatched_total",
                tool="cmd.run",
                outcome="edge_disconnected",
            )
            == 1
        )
        assert value(text, "aegis_edge_command_duration_seconds_count", tool="cmd.run") == 3
        assert value(text, "aegis_edge_heartbeats_total", tenant="fleet") > 0
        assert value(text, "aegis_edge_stream_seconds_total") > 0
        assert value(text, "aegis_edge_daemons_total", status="Connected", tenant="fleet") == 4
        assert value(text, "aegis_edge_daemons_total", status="Disconnected", tenant="fleet") == 1
        assert value(text, "aegis_edge_daemons_total", status="Unhealthy", tenant="fleet") == 0
        assert value(text, "aegis_edge_daemons_total", status="Revoked", tenant="fleet") == 0

        for d in daemons:
            await d.close()
        return run.fleet_command_id


def test_fleet_key_rotation_and_cancel(tmp_path: Path) -> None:
    relay = RelayProcess.start(tmp_path / "relay")

    async def scenario() -> None:
        async with relay.channel() as channel:
            admin = relay.admin(channel)
            daemons = []
            for _ in range(2):
                token = (
                    await admin.IssueEnrollmentToken(
                        admin_pb2.IssueEnrollmentTokenRequest(tenant_id="rot"),
                        metadata=relay.auth(),
                    )
                ).token
                d = DaemonDriver(channel)
                await d.enroll(token)
                assert isinstance(await d.connect(), SessionAccepted)
                daemons.append(d)
            before = {d.node_id: d.key.thumbprint for d in daemons}

            # `fleet keys rotate` is a fleet run of the built-in keys.rotate tool
            events = [
                e
                async for e in admin.StartFleetRun(
                    admin_pb2.FleetRunSpec(
                        selector="all", tool="keys.rotate", mode="rolling=1", tenant_id="rot"
                    ),
                    metadata=relay.auth(),
                    timeout=20,
                )
            ]
            assert events[-1].finished.outcome == common_pb2.RUN_OUTCOME_COMPLETED
            hosts = await admin.ListHosts(
                admin_pb2.ListHostsRequest(tenant_id="rot"), metadata=relay.auth()
            )
            for h in hosts.hosts:
                assert h.key_thumbprint != before[h.node_id]
            for d in daemons:
                assert {h.node_id: h.key_thumbprint for h in hosts.hosts}[
                    d.node_id
                ] == d.key.thumbprint
                await d.close()
                assert isinstance(await d.connect(), SessionAccepted)  # the new key attests

            # cancel: the in-flight command is cancelled on the daemon, the rest not started
            async def never(_cmd: stream_pb2.CommandInvocation) -> tuple[str, int]:
                await asyncio.sleep(60)
                return ("ok", 0)

            for d in daemons:
                d.command_handler = never
            got: list[admin_pb2.FleetRunEvent] = []

            async def run() -> None:
                async for e in admin.StartFleetRun(
                    admin_pb2.FleetRunSpec(
                        selector="all", tool="edge.ping", mode="sequential", tenant_id="rot"
                    ),
                    metadata=relay.auth(),
                    timeout=20,
                ):
                    got.append(e)

            task = asyncio.create_task(run())
            await wait_until(lambda: got and got[0].started.fleet_command_id, what="started")
            await wait_until(lambda: any(e.WhichOneof("body") == "dispatched" for e in got))
            run_id = got[0].started.fleet_command_id
            await admin.CancelFleetRun(
                admin_pb2.GetFleetRunRequest(fleet_command_id=run_id), metadata=relay.auth()
            )
            await asyncio.wait_for(task, 10)
            final = got[-1].finished
            assert final.outcome == common_pb2.RUN_OUTCOME_CANCELLED
            outcomes = sorted(t.outcome for t in final.targets)
            assert outcomes == sorted(
                [common_pb2.TARGET_OUTCOME_CANCELLED, common_pb2.TARGET_OUTCOME_NOT_STARTED]
            )
            assert [s.reason for s in final.skipped] == ["cancelled"]
            for d in daemons:
                await d.close()

    try:
        asyncio.run(scenario())
        text = relay.scrape()
        assert value(text, "aegis_edge_fleet_runs_total", outcome="cancelled") == 1
        assert value(text, "aegis_edge_fleet_targets_skipped_total", reason="cancelled") == 1
    finally:
        assert relay.stop() == 0
