"""SIGTERM drains daemon streams and stops cleanly."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest

from aegis_edge_core.session import Drained, SessionAccepted
from aegis_edge_core.wire import admin_pb2
from tests.relay.daemon_driver import DaemonDriver, RelayProcess, wait_until

pytestmark = pytest.mark.integration


async def _attested_daemon(relay: RelayProcess, channel: grpc.aio.Channel) -> DaemonDriver:
    admin = relay.admin(channel)
    token = (
        await admin.IssueEnrollmentToken(
            admin_pb2.IssueEnrollmentTokenRequest(tenant_id="t"), metadata=relay.auth()
        )
    ).token
    daemon = DaemonDriver(channel)
    await daemon.enroll(token)
    assert isinstance(await daemon.connect(), SessionAccepted)
    return daemon


def test_sigterm_drains_streams(tmp_path: Path) -> None:
    relay = RelayProcess.start(tmp_path / "relay")

    async def scenario() -> None:
        async with relay.channel() as channel:
            daemon = await _attested_daemon(relay, channel)
            relay.proc.send_signal(signal.SIGTERM)
            drained = await wait_until(lambda: daemon.saw(Drained), timeout=10, what="Drain")
            assert drained[0].reason == "relay shutting down"
            await daemon.close()  # a drained daemon leaves; the relay can stop at once

    try:
        asyncio.run(scenario())
        assert relay.proc.wait(15) == 0
        assert not (relay.data_dir / "relay.json").exists()
        events = [rec["event"] for rec in relay.logs()]
        assert "relay.draining" in events and events[-1] == "relay.stopped"
    finally:
        relay.stop()


def test_store_is_closed_before_the_drains_are_done(tmp_path: Path) -> None:
    """Once no stream can touch the store (nothing in flight, no handshake, no control
    stream), the relay closes it and hands the data dir over while the Drains still go
    out; the stream of a daemon that does not hang up is ended by the relay, not cut."""
    relay = RelayProcess.start(tmp_path / "relay")

    async def scenario() -> None:
        async with relay.channel() as channel:
            daemon = await _attested_daemon(relay, channel)
            relay.proc.send_signal(signal.SIGTERM)
            await wait_until(lambda: daemon.saw(Drained), timeout=10, what="Drain")
            # the daemon stays on: the relay ends the call after the Drain

    try:
        asyncio.run(scenario())
        assert relay.proc.wait(15) == 0
        logs = relay.logs()
        steps = ("relay.draining", "relay.store_closed", "relay.drained", "relay.stopped")
        assert [rec["event"] for rec in logs if rec["event"] in steps] == list(steps)
        (drained,) = [rec for rec in logs if rec["event"] == "relay.drained"]
        assert (drained["streams"], drained["cut_at_grace"]) == (1, 0)
    finally:
        relay.stop()
