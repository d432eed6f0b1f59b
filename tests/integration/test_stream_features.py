"""Optional stream features against a real relay: negotiated in the hello, coalesced
heartbeat acks, results acked in batches, and the Admin API's batched and summary-only
fleet-run events beside an older client's stream."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from aegis_edge_core.handshake import (
    FEATURES,
    HEARTBEAT_ACK_COALESCE,
    HEARTBEAT_KEEPALIVE,
    RESULT_ACK_BATCH,
)
from aegis_edge_core.session import HeartbeatAcked, ResultAcked, SessionAccepted
from aegis_edge_core.wire import admin_pb2, common_pb2, stream_pb2
from tests.relay.daemon_driver import DaemonDriver, RelayProcess, wait_until

pytestmark = pytest.mark.integration

OK = common_pb2.TARGET_OUTCOME_OK


def test_features_heartbeat_acks_result_acks_and_run_events(tmp_path: Path) -> None:
    relay = RelayProcess.start(
        tmp_path / "relay", "--heartbeat-interval", "1s", "--stale-threshold", "3s"
    )
    try:
        asyncio.run(_scenario(relay))
    finally:
        assert relay.stop() == 0


async def _enrolled(
    admin: object, relay: RelayProcess, channel: object, n: int
) -> list[DaemonDriver]:
    out = []
    for _ in range(n):
        token = (
            await admin.IssueEnrollmentToken(  # type: ignore[attr-defined]
                admin_pb2.IssueEnrollmentTokenRequest(tenant_id="feat"), metadata=relay.auth()
            )
        ).token
        d = DaemonDriver(channel)  # type: ignore[arg-type]
        await d.enroll(token)
        out.append(d)
    return out


async def _scenario(relay: RelayProcess) -> None:
    async with relay.channel() as channel:
        admin = relay.admin(channel)
        new, old, *fleet = await _enrolled(admin, relay, channel, 12)

        # An older daemon's hello (no features): every heartbeat is acked, nothing else used.
        accepted = await old.connect()
        assert isinstance(accepted, SessionAccepted)
        assert accepted.features == () and accepted.heartbeat_ack_every == 1
        for _ in range(4):
            await old.heartbeat()
        await wait_until(lambda: len(old.saw(HeartbeatAcked)) == 4, what="4 acks")

        # A new daemon: both features; one ack per two beats (stall count 3, less one).
        new.features = (HEARTBEAT_ACK_COALESCE, RESULT_ACK_BATCH)
        accepted = await new.connect()
        assert isinstance(accepted, SessionAccepted)
        assert set(accepted.features) == {HEARTBEAT_ACK_COALESCE, RESULT_ACK_BATCH}
        assert accepted.heartbeat_ack_every == 2
        for _ in range(6):
            await new.heartbeat()
        await wait_until(lambda: len(new.saw(HeartbeatAcked)) == 3, what="3 acks")
        await asyncio.sleep(0.3)
        assert [e.seq for e in new.saw(HeartbeatAcked)] == [2, 4, 6]  # type: ignore[attr-defined]

        # Results sent together (a spool after a reconnect) are stored, then acked together.
        run = await _run(admin, relay, f"node={new.node_id}", batch=False, summary=False)
        first = run.targets[0].command_id
        assert isinstance(await new.connect(), SessionAccepted)  # a new stream: sent late
        assert new.session is not None
        for i in range(5):
            new.session.result(
                stream_pb2.CommandResult(
                    command_id=first if i == 0 else f"unknown-{i}",
                    outcome=OK,
                    error_kind=stream_pb2.ERROR_KIND_OK,
                    delivered_late=True,
                    started_at=time.time(),
                    finished_at=time.time(),
                )
            )
        before = len(new.saw(ResultAcked))
        await new._flush()
        await wait_until(lambda: len(new.saw(ResultAcked)) >= before + 5, what="5 acks")
        assert len(new.saw(ResultAcked)) == before + 5

        # Fleet-run events: today's stream, batched, summary-only.
        for d in fleet:
            d.features = tuple(FEATURES)
            assert isinstance(await d.connect(), SessionAccepted)
        selector = "node=" + ",".join(d.node_id for d in fleet)
        plain = await _events(admin, relay, selector, batch=False, summary=False)
        kinds = [e.WhichOneof("body") for e in plain]
        assert kinds.count("target_finished") == 10 and kinds.count("dispatched") == 10
        batched = await _events(admin, relay, selector, batch=True, summary=False)
        kinds = [e.WhichOneof("body") for e in batched]
        assert not {"target_finished", "dispatched", "progress"} & set(kinds)
        done = [
            t.node_id
            for e in batched
            if e.HasField("targets_finished")
            for t in e.targets_finished.targets
        ]
        assert sorted(done) == sorted(d.node_id for d in fleet)
        assert kinds.count("targets_finished") <= 10
        summary = await _events(admin, relay, selector, batch=False, summary=True)
        kinds = [e.WhichOneof("body") for e in summary]
        assert kinds[0] == "started" and kinds[-1] == "finished"
        assert set(kinds[1:-1]) == {"progress"}
        assert summary[0].started.targets_omitted and not summary[0].started.targets
        last = summary[-2].progress
        assert (last.targets, last.finished, last.counts["ok"]) == (10, 10, 10)
        assert len(summary[-1].finished.targets) == 10

        # result-ack-deferred: a run's result is stored at once, and acked only as the
        # ack of the daemon's next heartbeat (one message for both).
        late = fleet[0]
        await late.close()
        # (without heartbeat-keepalive, which this test daemon's channel does not run, so
        # plain acks stay one in two)
        late.features = tuple(FEATURES - {HEARTBEAT_KEEPALIVE})
        accepted = await late.connect()
        assert isinstance(accepted, SessionAccepted)
        assert set(accepted.features) == FEATURES - {HEARTBEAT_KEEPALIVE}
        for _ in range(2):
            await late.heartbeat()
        await wait_until(lambda: len(late.saw(HeartbeatAcked)) == 1, what="the first ack")
        run = await _run(admin, relay, f"node={late.node_id}", batch=False, summary=True)
        assert run.targets[0].outcome == OK  # stored and counted before any ack
        await asyncio.sleep(0.3)
        assert late.saw(ResultAcked) == [] and late.session is not None
        assert late.session.heartbeats_unacked == 0
        await late.heartbeat()  # beat 3, not due a plain ack (one in two): the result's is
        await wait_until(lambda: len(late.saw(ResultAcked)) == 1, what="the deferred ack")
        assert [e.command_id for e in late.saw(ResultAcked)] == [run.targets[0].command_id]  # type: ignore[attr-defined]
        assert [e.seq for e in late.saw(HeartbeatAcked)] == [2, 3]  # type: ignore[attr-defined]
        assert late.session.heartbeats_unacked == 0
        for d in [new, old, *fleet]:
            await d.close()


async def _events(
    admin: object, relay: RelayProcess, selector: str, *, batch: bool, summary: bool
) -> list[admin_pb2.FleetRunEvent]:
    spec = admin_pb2.FleetRunSpec(
        selector=selector, tool="edge.ping", mode="all", batch_events=batch, summary_only=summary
    )
    return [e async for e in admin.StartFleetRun(spec, metadata=relay.auth())]  # type: ignore[attr-defined]


async def _run(
    admin: object, relay: RelayProcess, selector: str, *, batch: bool, summary: bool
) -> admin_pb2.FleetRun:
    events = await _events(admin, relay, selector, batch=batch, summary=summary)
    assert events[-1].HasField("finished")
    return events[-1].finished
