"""kill -9 the relay in the middle of a rolling fleet run, restart it on the same data dir.

The run's persisted state must be consistent: targets that finished keep their results,
in-flight ones end ``edge_disconnected`` (and a late result still lands in command
history), nothing is dispatched twice, and the run reaches a terminal outcome.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from aegis_edge_core.identity import NodeKey
from aegis_edge_core.session import ResultAcked, SessionAccepted
from aegis_edge_core.wire import admin_pb2, common_pb2, stream_pb2
from tests.faults.conftest import Tally
from tests.faults.helpers import enrolled
from tests.relay.daemon_driver import DaemonDriver, RelayProcess, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(120)]

OK = common_pb2.TARGET_OUTCOME_OK
LOST = common_pb2.TARGET_OUTCOME_EDGE_DISCONNECTED
NOT_STARTED = common_pb2.TARGET_OUTCOME_NOT_STARTED


def test_kill9_relay_mid_rolling_run(tmp_path: Path, tally: Tally) -> None:
    data_dir = tmp_path / "relay"
    relay = RelayProcess.start(data_dir, "--heartbeat-interval", "0.5s", "--stale-threshold", "3s")
    saved: list[tuple[str, str, NodeKey]] = []
    run_id = ""
    finished_before: dict[str, int] = {}
    inflight: dict[str, str] = {}

    async def before_crash() -> None:
        nonlocal run_id
        async with relay.channel() as channel:
            admin = relay.admin(channel)
            daemons = [await enrolled(relay, channel, "crash", tools=["cmd.run"]) for _ in range(6)]
            daemons.sort(key=lambda d: d.node_id)
            never = asyncio.Event()

            async def hang(_cmd: stream_pb2.CommandInvocation) -> tuple[str, int]:
                await never.wait()
                return ("ok", 0)

            for i, d in enumerate(daemons):
                assert isinstance(await d.connect(), SessionAccepted)
                if i >= 2:
                    d.command_handler = hang
                saved.append((d.node_id, d.token, d.key))
            events = admin.StartFleetRun(
                admin_pb2.FleetRunSpec(
                    selector="all",
                    tool="cmd.run",
                    args_json=json.dumps({"cmd": "true"}),
                    mode="rolling=2",
                    on_error="continue",
                    tenant_id="crash",
                ),
                metadata=relay.auth(),
            )
            dispatched = 0
            async for ev in events:
                kind = ev.WhichOneof("body")
                if kind == "started":
                    run_id = ev.started.fleet_command_id
                elif kind == "dispatched":
                    dispatched += 1
                    inflight[ev.dispatched.node_id] = ev.dispatched.command_id
                elif kind == "target_finished":
                    finished_before[ev.target_finished.node_id] = ev.target_finished.outcome
                    inflight.pop(ev.target_finished.node_id, None)
                if dispatched == 4 and len(finished_before) == 2:
                    break
            # both hanging targets really reached their daemons
            await wait_until(lambda: sum(len(d.commands) for d in daemons) == 4, what="4 commands")
            relay.proc.kill()  # kill -9 mid-run
            relay.proc.wait(10)
            tally.fault()
            events.cancel()
            for d in daemons:
                await d.close()

    asyncio.run(before_crash())
    assert finished_before and all(o == OK for o in finished_before.values())
    assert len(inflight) == 2

    relay = RelayProcess.start(data_dir, "--heartbeat-interval", "0.5s", "--stale-threshold", "3s")
    try:

        async def after_restart() -> None:
            async with relay.channel() as channel:
                admin = relay.admin(channel)
                run = await admin.GetFleetRun(
                    admin_pb2.GetFleetRunRequest(fleet_command_id=run_id), metadata=relay.auth()
                )
                assert run.outcome not in (
                    common_pb2.RUN_OUTCOME_RUNNING,
                    common_pb2.RUN_OUTCOME_UNSPECIFIED,
                ), run
                by_node = {t.node_id: t for t in run.targets}
                assert len(by_node) == 6
                lost = sum(by_node[n].outcome != OK for n in finished_before)
                tally.lost(lost, "finished target results after kill -9")
                assert lost == 0
                assert {by_node[n].outcome for n in inflight} == {LOST}
                rest = set(by_node) - set(finished_before) - set(inflight)
                assert {by_node[n].outcome for n in rest} == {NOT_STARTED}
                assert run.outcome == common_pb2.RUN_OUTCOME_CANCELLED
                assert "restarted" in run.halt_reason

                # the daemons come back; nothing of the run is dispatched again
                back: list[DaemonDriver] = []
                for node_id, token, key in saved:
                    d = DaemonDriver(channel, key=key)
                    d.node_id, d.token = node_id, token
                    assert isinstance(await d.connect(), SessionAccepted)
                    back.append(d)
                # one in-flight command's result arrives late, on the new stream
                late_node, late_cmd = next(iter(inflight.items()))
                late = next(d for d in back if d.node_id == late_node)
                assert late.session is not None
                late.session.result(
                    stream_pb2.CommandResult(
                        command_id=late_cmd,
                        outcome=OK,
                        error_kind=stream_pb2.ERROR_KIND_OK,
                        exit_code=0,
                        has_exit_code=True,
                        delivered_late=True,
                        started_at=time.time(),
                        finished_at=time.time(),
                    )
                )
                await late._flush()
                await wait_until(lambda: late.saw(ResultAcked), what="late result acked")
                for d in back:
                    await d.heartbeat()
                for d in back:
                    host = await admin.GetHost(
                        admin_pb2.GetHostRequest(node_id=d.node_id), metadata=relay.auth()
                    )
                    mine = [h for h in host.history if h.fleet_command_id == run_id]
                    assert len(mine) <= 1, f"{d.node_id} got the run's command twice"
                    if d.node_id == late_node:
                        assert mine[0].outcome == OK  # the late result landed in history
                    assert not d.commands, "a command was dispatched again after the restart"
                for d in back:
                    await d.close()

        asyncio.run(after_restart())
    finally:
        assert relay.stop() == 0
