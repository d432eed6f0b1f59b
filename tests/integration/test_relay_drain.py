"""SIGTERM drains daemon streams and stops cleanly."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from aegis_edge_core.session import Drained, SessionAccepted
from aegis_edge_core.wire import admin_pb2
from tests.relay.daemon_driver import DaemonDriver, RelayProcess, wait_until

pytestmark = pytest.mark.integration


def test_sigterm_drains_streams(tmp_path: Path) -> None:
    relay = RelayProcess.start(tmp_path / "relay")

    async def scenario() -> None:
        async with relay.channel() as channel:
            admin = relay.admin(channel)
            token = (
                await admin.IssueEnrollmentToken(
                    admin_pb2.IssueEnrollmentTokenRequest(tenant_id="t"), metadata=relay.auth()
                )
            ).token
            daemon = DaemonDriver(channel)
            await daemon.enroll(token)
            assert isinstance(await daemon.connect(), SessionAccepted)
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
