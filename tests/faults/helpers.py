"""Helpers for the fault suite: relays, enrolled drivers, a good daemon that keeps beating."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from aegis_edge_core.session import HeartbeatAcked, SessionAccepted
from aegis_edge_core.wire import admin_pb2, common_pb2
from tests.relay.daemon_driver import DaemonDriver, RelayProcess

STREAM_METHOD = "/aegis.edge.v1.EdgeStream/Connect"


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` (a counter's ``_total``) whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def issue_token(relay: RelayProcess, channel: grpc.aio.Channel, tenant: str) -> str:
    resp = await relay.admin(channel).IssueEnrollmentToken(
        admin_pb2.IssueEnrollmentTokenRequest(tenant_id=tenant), metadata=relay.auth()
    )
    return str(resp.token)


async def enrolled(
    relay: RelayProcess, channel: grpc.aio.Channel, tenant: str, **kw: Any
) -> DaemonDriver:
    daemon = DaemonDriver(channel, **kw)
    await daemon.enroll(await issue_token(relay, channel, tenant))
    return daemon


def sync_channel(relay: RelayProcess) -> grpc.Channel:
    return grpc.secure_channel(
        relay.address, grpc.ssl_channel_credentials(root_certificates=relay.ca_pem)
    )


class GoodDaemon:
    """An honest daemon on its own thread and event loop, heartbeating every ``interval``
    while the test attacks the relay; records when each ack came back."""

    def __init__(self, relay: RelayProcess, tenant: str, interval: float = 0.1) -> None:
        self.relay = relay
        self.tenant = tenant
        self.interval = interval
        self.node_id = ""
        self.ack_times: list[float] = []
        self.stream_dropped = False
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GoodDaemon:
        self._thread.start()
        if not self._ready.wait(30) or self.error is not None:
            raise RuntimeError(f"good daemon did not connect: {self.error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as err:  # surfaced by __enter__ / check()
            self.error = err
            self._ready.set()

    async def _main(self) -> None:
        async with self.relay.channel() as channel:
            daemon = await enrolled(self.relay, channel, self.tenant)
            self.node_id = daemon.node_id
            accepted = await daemon.connect()
            assert isinstance(accepted, SessionAccepted), accepted
            self._ready.set()
            seen = 0
            while not self._stop.is_set():
                await daemon.heartbeat()
                await asyncio.sleep(self.interval)
                acks = len(daemon.saw(HeartbeatAcked))
                if acks > seen:
                    seen = acks
                    self.ack_times.append(time.monotonic())
                if daemon.stream_done.is_set():
                    self.stream_dropped = True
                    return
            await daemon.close()

    def check(self, *, max_gap: float = 2.0) -> None:
        """The daemon kept its stream and heard an ack at least every ``max_gap`` s."""
        assert self.error is None, self.error
        assert not self.stream_dropped, "the good daemon's stream was dropped"
        stamps = [*self.ack_times, time.monotonic()]
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        assert len(self.ack_times) >= 2
        assert max(gaps) < max_gap, f"heartbeat ack gap {max(gaps):.2f}s"

    async def status(self, channel: grpc.aio.Channel) -> int:
        host = await self.relay.admin(channel).GetHost(
            admin_pb2.GetHostRequest(node_id=self.node_id), metadata=self.relay.auth()
        )
        return int(host.status)


CONNECTED = common_pb2.DAEMON_STATUS_CONNECTED
