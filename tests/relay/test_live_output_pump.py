"""The relay's pump for live output: ActiveRun's gate and per-watcher buffers, in process."""

from __future__ import annotations

import asyncio

from aegis_edge_core.fleet import DaemonSnapshot, FleetRun, FleetSpec, resolve_targets
from aegis_edge_core.fleet.output import DEFAULT_WATCHER_BYTES
from aegis_edge_core.wire import admin_pb2
from aegis_edge_relay.runs import ActiveRun


def _active() -> ActiveRun:
    spec = FleetSpec(selector="all", tool="cmd.run")
    snap = DaemonSnapshot(node_id="n1", tenant_id="t", status="Connected", tools={"cmd.run"})
    run = FleetRun(spec, resolve_targets([snap], spec.selector, spec.tool), fleet_command_id="f")
    return ActiveRun(
        run=run,
        spec=admin_pb2.FleetRunSpec(tool="cmd.run"),
        args_json="{}",
        created_by="t",
        created_at=0.0,
        scope=None,
        tenants={"n1": "t"},
    )


def test_a_slow_watcher_loses_output_not_relay_memory() -> None:
    async def scenario() -> None:
        active = _active()
        active.command_ids["n1"] = "c1"  # as the dispatcher records it at dispatch
        slow = active.subscribe(output=True)
        quiet = active.subscribe(output=False)
        total, now = 0, 0.0
        for _ in range(2000):  # 2000 x 8 KiB of long lines, 100 s of refills
            now += 0.05
            chunk = (b"x" * 1023 + b"\n") * 8
            total += len(chunk)
            active.publish_output(
                "n1", command_id="c1", host="web-1", stdout=chunk, stderr=b"", now=now
            )
        assert slow.buffer.waiting_bytes <= DEFAULT_WATCHER_BYTES  # bounded, whatever came
        assert len(quiet.buffer) == 0  # a watcher that did not ask gets no output at all
        active.end_output("n1")
        active.publish(admin_pb2.FleetRunEvent(target_finished=admin_pb2.TargetResult()), "n1")
        active.publish(None)
        received = dropped = 0
        while (event := await slow.next()) is not None:
            if event.WhichOneof("body") == "output":
                assert event.output.host == "web-1" and event.output.command_id == "c1"
                received += len(event.output.stdout)
                dropped += event.output.dropped_bytes
        assert received + dropped == total
        assert 0 < received <= DEFAULT_WATCHER_BYTES
        assert active.gate is not None and active.gate.dropped_bytes > 0  # the gate cut too
        assert slow.buffer.dropped_bytes > 0  # and so did this watcher's buffer
        slow.close()
        assert active.watchers == [quiet]

    asyncio.run(scenario())
