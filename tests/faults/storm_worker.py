"""One worker process of ``test_reconnect_storm.py``: a few hundred lightweight daemons.

Each daemon is the core's :class:`DaemonSession` over its own grpc.aio TLS channel (one
TCP connection per channel, as the agent opens one per attempt), enrolled through the
Enrollment RPC, attesting with its Ed25519 key on every connect, heartbeating at the
interval the relay hands out, and reconnecting exactly as ``aegis edge daemon`` does: a
relay's ``Drain`` answers with :meth:`Backoff.after_drain`, every other loss or failed
attempt with :meth:`Backoff.next_delay`, each daemon with its own seeded ``random.Random``.

It records, per daemon, when its stream was lost, when each attempt started (monotonic
clock: comparable across processes on one host) and every refusal with its reason.

Control: one JSON object per line on stdin, one JSON reply per line on stdout. Every loop
ends with the process (the test kills it on the way out) and every call has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import sys
import time
from typing import Any

import grpc
import grpc.aio

from aegis_edge_core import PROTOCOL_VERSION
from aegis_edge_core import session as s
from aegis_edge_core.backoff import Backoff
from aegis_edge_core.identity import NodeKey, sign_attestation
from aegis_edge_core.identity.enrollment import sign_enrollment
from aegis_edge_core.identity.tokens import peek_enrollment_token
from aegis_edge_core.wire import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    enrollment_pb2,
    enrollment_pb2_grpc,
    stream_pb2_grpc,
)

EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009 - the stubs do not declare it
HANDSHAKE_TIMEOUT = 15.0
CAPS = common_pb2.Capabilities(
    os="linux", arch="x86_64", tools=["edge.ping"], hostname="storm", agent_version="storm"
)
# The agent's channel options, plus a local subchannel pool: without it grpc would share
# one TCP connection between all channels of this process to the same target.
OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", s.MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),
    ("grpc.use_local_subchannel_pool", 1),
]


class Refused(Exception):
    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class Daemon:
    def __init__(self, seed: int, node_id: str, token: str, key: NodeKey) -> None:
        self.node_id = node_id
        self.token = token
        self.key = key
        self.rng = random.Random(seed)
        self.backoff = Backoff()
        self.connected = False
        self.accepts = 0
        self.lost: list[float] = []
        self.attempts: list[float] = []
        self.drain_delays: list[float] = []
        self.refusals: list[str] = []
        self.errors: list[str] = []


class Worker:
    def __init__(self, address: str, ca: bytes, seed: int) -> None:
        self.address = address
        self.creds = grpc.ssl_channel_credentials(root_certificates=ca)
        self.seed = seed
        self.daemons: list[Daemon] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def enroll(self, count: int, operator_token: str, tenant: str) -> None:
        auth = (("authorization", f"Bearer {operator_token}"),)
        async with grpc.aio.secure_channel(self.address, self.creds) as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            enroll = enrollment_pb2_grpc.EnrollmentStub(channel)
            sem = asyncio.Semaphore(32)

            async def one(i: int) -> Daemon:
                async with sem:
                    tok = (
                        await admin.IssueEnrollmentToken(
                            admin_pb2.IssueEnrollmentTokenRequest(tenant_id=tenant),
                            metadata=auth,
                            timeout=30,
                        )
                    ).token
                    key = NodeKey.from_seed(os.urandom(32))
                    resp = await enroll.Enroll(
                        enrollment_pb2.EnrollRequest(
                            enrollment_token=tok,
                            public_key=key.public_key.raw,
                            proof=sign_enrollment(key, token_jti=peek_enrollment_token(tok).jti),
                            capabilities=CAPS,
                            host_time=time.time(),
                        ),
                        timeout=30,
                    )
                    return Daemon(self.seed * 100_000 + i, resp.node_id, resp.node_token, key)

            self.daemons = list(await asyncio.gather(*(one(i) for i in range(count))))

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._loop(d)) for d in self.daemons]

    async def _loop(self, d: Daemon) -> None:
        """The agent's connection loop (aegis_edge_agent.daemon.Daemon._run), minus the I/O
        on the state dir."""
        while True:
            delay: float | None = None
            d.attempts.append(time.monotonic())
            try:
                delay = await self._connect_once(d)
            except Refused as err:
                d.refusals.append(err.reason)
                delay = err.retry_after or None
            except grpc.aio.AioRpcError as err:
                d.errors.append(err.code().name)
            except Exception as err:
                d.errors.append(type(err).__name__)
            if delay is None:
                delay = d.backoff.next_delay(d.rng, time.time())
            await asyncio.sleep(delay)

    async def _connect_once(self, d: Daemon) -> float | None:
        async with grpc.aio.secure_channel(self.address, self.creds, options=OPTIONS) as channel:
            stub: Any = stream_pb2_grpc.EdgeStreamStub(channel)
            call = stub.Connect()
            session = s.DaemonSession()
            lock = asyncio.Lock()

            async def flush() -> None:
                async with lock:
                    for msg in session.messages_to_send():
                        await call.write(msg)

            beat: asyncio.Task[None] | None = None
            try:
                session.hello(
                    node_id=d.node_id, node_token=d.token, capabilities=CAPS, now=time.time()
                )
                await flush()
                accepted: s.SessionAccepted | None = None
                deadline = time.monotonic() + HANDSHAKE_TIMEOUT
                while accepted is None:
                    msg = await asyncio.wait_for(call.read(), max(0.1, deadline - time.monotonic()))
                    if msg is EOF:
                        raise ConnectionError("the relay closed the stream during the handshake")
                    for ev in session.receive(msg, time.time()):
                        if isinstance(ev, s.ChallengeReceived):
                            session.attest(
                                sign_attestation(
                                    d.key,
                                    protocol_version=PROTOCOL_VERSION,
                                    node_id=d.node_id,
                                    nonce=ev.nonce,
                                )
                            )
                        elif isinstance(ev, s.Refused):
                            raise Refused(ev.reason, ev.retry_after_secs)
                        elif isinstance(ev, s.SessionAccepted):
                            accepted = ev
                    await flush()
                d.backoff.connected(time.time())
                d.connected = True
                d.accepts += 1
                if accepted.node_token:
                    d.token = accepted.node_token
                beat = asyncio.get_running_loop().create_task(
                    self._heartbeats(d, session, flush, accepted.heartbeat_interval_secs or 30.0)
                )
                delay: float | None = None
                while True:
                    msg = await call.read()
                    if msg is EOF:
                        break
                    for ev in session.receive(msg, time.time()):
                        if isinstance(ev, s.Drained):
                            delay = d.backoff.after_drain(
                                ev.reconnect_after_secs, d.rng, time.time()
                            )
                            d.drain_delays.append(delay or 0.0)
                        elif isinstance(ev, s.TokenRefreshed | s.KeyRotated):
                            d.token = ev.node_token
                    if session.state is s.DaemonState.DRAINING:
                        break
                    await flush()
                return delay
            finally:
                if d.connected:
                    d.connected = False
                    d.lost.append(time.monotonic())
                    d.backoff.disconnected(time.time())
                if beat is not None:
                    beat.cancel()
                call.cancel()

    async def _heartbeats(
        self, d: Daemon, session: s.DaemonSession, flush: Any, every: float
    ) -> None:
        # The agent's first beat comes one interval after its own connect: a fleet that
        # connected over a second beats over a second.
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):
                session.heartbeat(time.time())
                await flush()

    def report(self) -> dict[str, Any]:
        return {
            "daemons": len(self.daemons),
            "connected": sum(d.connected for d in self.daemons),
            "accepts": [d.accepts for d in self.daemons],
            "lost": [d.lost for d in self.daemons],
            "attempts": [d.attempts for d in self.daemons],
            "drain_delays": [d.drain_delays for d in self.daemons],
            "refusals": [r for d in self.daemons for r in d.refusals],
            "errors": [e for d in self.daemons for e in d.errors],
        }


async def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker: Worker | None = None

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    while True:
        line = await reader.readline()
        if not line:
            return
        req = json.loads(line)
        try:
            if req["cmd"] == "init":
                worker = Worker(req["address"], req["ca"].encode(), req["seed"])
                reply({"ok": True, "pid": os.getpid()})
            elif req["cmd"] == "enroll":
                assert worker is not None
                await worker.enroll(req["count"], req["token"], req["tenant"])
                reply({"ok": True})
            elif req["cmd"] == "start":
                assert worker is not None
                worker.start()
                reply({"ok": True})
            elif req["cmd"] == "report":
                assert worker is not None
                reply({"ok": True, **worker.report()})
            else:
                reply({"ok": False, "error": f"unknown command {req['cmd']!r}"})
        except Exception as err:
            reply({"ok": False, "error": f"{type(err).__name__}: {err}"})


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    os._exit(0)  # do not wait for grpc to shut hundreds of channels down one by one
