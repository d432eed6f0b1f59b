"""Load generator: thousands of daemon sessions in one process (one worker of scale.py).

Each simulated daemon is what ``aegis edge daemon`` is on the wire: its own grpc.aio
channel (a local subchannel pool, so one TCP connection and one TLS session each), the core's
:class:`DaemonSession` driving ``EdgeStream.Connect``, a real Ed25519 attestation on every
connect, heartbeats at the interval the relay hands out, the agent's reconnect policy
(``Drain`` -> the core's ``Backoff.after_drain`` with its drain window, otherwise
``Backoff.next_delay`` with jitter, each called as the agent calls them),
and real ``edge.ping`` results (the agent's tool output shape, through ``tools_spec``).
The agent's own :class:`Daemon` is not reused: it is one process per host by design (state
dir, lock file, status file written on every ack, spool) -- all per-host I/O that would
measure the disk, not the relay.

Floor mode opens the same kind of channel and stream against ``scale_floor.py`` and sends
messages the size of a heartbeat at the same interval; nothing else.

Control: JSON lines on stdin, one JSON reply per line on stdout. Every loop is bounded by
the process lifetime (the orchestrator kills the process group) and by per-call timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from aegis_edge_core import PROTOCOL_VERSION, tools_spec
from aegis_edge_core import session as s
from aegis_edge_core.backoff import Backoff
from aegis_edge_core.daemon_rules import KeepalivePlan, keepalive_plan
from aegis_edge_core.handshake import FEATURES
from aegis_edge_core.identity import NodeKey, sign_attestation
from aegis_edge_core.identity.endpoints import dial_order
from aegis_edge_core.identity.enrollment import sign_enrollment
from aegis_edge_core.identity.tokens import peek_enrollment_token
from aegis_edge_core.wire import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    enrollment_pb2,
    enrollment_pb2_grpc,
    stream_pb2,
)

EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009
CONNECT = "/aegis.edge.v1.EdgeStream/Connect"
HANDSHAKE_TIMEOUT = 15.0

CAPS = common_pb2.Capabilities(
    os="linux",
    arch="x86_64",
    tools=["edge.ping", "sys.info"],
    hostname="bench-host",
    agent_version="bench",
)

# The agent's channel options plus a local subchannel pool: without it grpc would share one
# TCP connection between all channels of this process with the same target and arguments.
# Each channel adds the agent's keepalive (`KeepalivePlan.channel_options`), for the plan
# its daemon last saw, as the agent does.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", s.MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),
    ("grpc.use_local_subchannel_pool", 1),
]


class Stats:
    def __init__(self) -> None:
        self.connected = 0
        self.attempts = 0
        self.accepted = 0
        self.errors: dict[str, int] = {}
        self.results = 0
        self.heartbeats = 0
        self.floor_open = 0

    def error(self, what: str) -> None:
        what = what[:80]
        self.errors[what] = self.errors.get(what, 0) + 1


class Daemon:
    def __init__(self, index: int, node_id: str, token: str, key: NodeKey) -> None:
        self.index = index
        self.node_id = node_id
        self.token = token
        self.key = key
        self.want = False
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        self.backoff = Backoff()
        self.call: Any = None
        self.is_connected = False
        self.last_good = ""
        self.failures = 0
        self.drained_to = ""
        self.keepalive = keepalive_plan(0.0, 0.0)


def channel_options(keepalive: KeepalivePlan) -> list[tuple[str, Any]]:
    return [*CHANNEL_OPTIONS, *keepalive.channel_options()]


class Worker:
    def __init__(self, address: str, ca: bytes, seed: int) -> None:
        self.address = address
        # as the agent's node.json: a daemon whose relay is gone dials the next one
        self.endpoints: tuple[str, ...] = (address,)
        self.creds = grpc.ssl_channel_credentials(root_certificates=ca)
        self.daemons: list[Daemon] = []
        self.stats = Stats()
        self.rng = random.Random(seed)
        self.floor_tasks: list[asyncio.Task[None]] = []
        self.floor_want = 0

    # ------------------------------------------------------------------ enrollment

    async def enroll(self, count: int, token_path: str, tenant: str, concurrency: int) -> None:
        admin_token = Path(token_path).read_text().strip()
        auth = (("authorization", f"Bearer {admin_token}"),)
        async with grpc.aio.secure_channel(self.address, self.creds) as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            enroll = enrollment_pb2_grpc.EnrollmentStub(channel)
            sem = asyncio.Semaphore(concurrency)
            out: list[Daemon | None] = [None] * count

            async def one(i: int) -> None:
                async with sem:
                    tok = (
                        await admin.IssueEnrollmentToken(
                            admin_pb2.IssueEnrollmentTokenRequest(tenant_id=tenant, ttl_secs=3600),
                            metadata=auth,
                            timeout=60,
                        )
                    ).token
                    key = NodeKey.from_seed(os.urandom(32))
                    claims = peek_enrollment_token(tok)
                    resp = await enroll.Enroll(
                        enrollment_pb2.EnrollRequest(
                            enrollment_token=tok,
                            public_key=key.public_key.raw,
                            proof=sign_enrollment(key, token_jti=claims.jti),
                            capabilities=CAPS,
                            host_time=time.time(),
                        ),
                        timeout=60,
                    )
                    out[i] = Daemon(len(self.daemons) + i, resp.node_id, resp.node_token, key)

            await asyncio.gather(*(one(i) for i in range(count)))
            self.daemons.extend(d for d in out if d is not None)

    # ------------------------------------------------------------------ daemons

    def set_target(self, n: int) -> None:
        for i, d in enumerate(self.daemons):
            want = i < n
            if want and not d.want:
                d.want = True
                if d.task is None or d.task.done():
                    d.task = asyncio.get_running_loop().create_task(self._daemon_loop(d))
            elif not want and d.want:
                d.want = False
                d.wake.set()
                if d.call is not None:
                    d.call.cancel()

    async def _daemon_loop(self, d: Daemon) -> None:
        while d.want:
            delay: float | None = None
            try:
                delay = await self._connect_once(d)
            except asyncio.CancelledError:
                if not d.want:
                    return
                raise
            except grpc.aio.AioRpcError as err:
                self.stats.error(f"{err.code().name}: {err.details()}")
            except Exception as err:
                self.stats.error(f"{type(err).__name__}: {err}")
            d.failures += 1
            if not d.want:
                return
            if delay is None:
                # as the agent: a failure within the drain window does not climb
                delay = d.backoff.next_delay(self.rng, time.time())
            d.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(d.wake.wait(), timeout=delay)

    async def _connect_once(self, d: Daemon) -> float | None:
        self.stats.attempts += 1
        address = dial_order(self.endpoints, d.last_good, d.failures)
        if d.drained_to in self.endpoints:
            address = d.drained_to  # as the agent: where the Drain said
        d.drained_to = ""
        keepalive = d.keepalive
        async with grpc.aio.secure_channel(
            address, self.creds, options=channel_options(keepalive)
        ) as channel:
            call = channel.stream_stream(
                CONNECT,
                request_serializer=stream_pb2.DaemonMessage.SerializeToString,
                response_deserializer=stream_pb2.RelayMessage.FromString,
            )()
            d.call = call
            session = s.DaemonSession()
            lock = asyncio.Lock()

            async def flush() -> None:
                async with lock:
                    for msg in session.messages_to_send():
                        await call.write(msg)

            accepted: s.SessionAccepted | None = None
            beat: asyncio.Task[None] | None = None
            try:
                session.hello(
                    node_id=d.node_id,
                    node_token=d.token,
                    capabilities=CAPS,
                    now=time.time(),
                    features=FEATURES,
                    keepalive_secs=keepalive.bound_secs,
                )
                await flush()
                deadline = time.monotonic() + HANDSHAKE_TIMEOUT
                while accepted is None:
                    msg = await asyncio.wait_for(call.read(), max(0.1, deadline - time.monotonic()))
                    if msg is EOF:
                        raise ConnectionError("relay closed the stream during the handshake")
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
                            raise ConnectionError(f"refused: {ev.reason}")
                        elif isinstance(ev, s.SessionAccepted):
                            accepted = ev
                    await flush()
                d.backoff.connected(time.time())
                d.keepalive = keepalive_plan(
                    accepted.heartbeat_interval_secs, accepted.stale_threshold_secs
                )
                d.last_good, d.failures = address, 0
                if accepted.node_token:
                    d.token = accepted.node_token
                self.stats.accepted += 1
                self.stats.connected += 1
                d.is_connected = True
                beat = asyncio.get_running_loop().create_task(
                    self._heartbeats(session, flush, accepted.heartbeat_interval_secs or 30.0)
                )
                delay: float | None = None
                while d.want:
                    msg = await call.read()
                    if msg is EOF:
                        break
                    for ev in session.receive(msg, time.time()):
                        if isinstance(ev, s.CommandReceived):
                            session.result(self._run_tool(ev.command))
                        elif isinstance(ev, s.Drained):
                            # exactly the agent's rule: jittered hint, ladder back to the
                            # bottom, drain window opened (aegis_edge_agent/daemon.py)
                            delay = d.backoff.after_drain(
                                ev.reconnect_after_secs, self.rng, time.time()
                            )
                            d.drained_to = ev.relay_endpoint
                        elif isinstance(ev, s.TokenRefreshed | s.KeyRotated):
                            d.token = ev.node_token
                        elif isinstance(ev, s.Revoked):
                            raise ConnectionError("revoked")
                    if session.state is s.DaemonState.DRAINING:
                        break
                    await flush()
                return delay
            finally:
                if d.is_connected:
                    d.is_connected = False
                    self.stats.connected -= 1
                    d.backoff.disconnected(time.time())
                if beat is not None:
                    beat.cancel()
                d.call = None
                call.cancel()

    async def _heartbeats(self, session: s.DaemonSession, flush: Any, interval: float) -> None:
        # First beat at a random phase, so a fleet that connected together does not beat
        # together (the agent's beats are phased by its own connect time).
        await asyncio.sleep(self.rng.uniform(0, interval))
        while True:
            with contextlib.suppress(Exception):
                session.heartbeat(time.time())
                await flush()
                self.stats.heartbeats += 1
            await asyncio.sleep(interval)

    def _run_tool(self, inv: stream_pb2.CommandInvocation) -> stream_pb2.CommandResult:
        """The agent's ``edge.ping`` (pong, echo, time), shaped by ``tools_spec``."""
        started = time.time()
        if inv.tool != tools_spec.EDGE_PING:
            return tools_spec.build_result(
                inv.command_id,
                stream_pb2.ERROR_KIND_UNKNOWN_TOOL,
                started_at=started,
                finished_at=started,
                message=f"bench daemon has no tool {inv.tool!r}",
            )
        args = tools_spec.parse_args_json(inv.tool, inv.args_json)
        self.stats.results += 1
        return tools_spec.build_result(
            inv.command_id,
            stream_pb2.ERROR_KIND_OK,
            started_at=started,
            finished_at=time.time(),
            result_json=json.dumps({"pong": True, "echo": args.get("echo", ""), "t": started}),
        )

    # ------------------------------------------------------------------ floor mode

    def set_floor(self, address: str, n: int, interval: float) -> None:
        self.floor_want = n
        while len(self.floor_tasks) < n:
            self.floor_tasks.append(
                asyncio.get_running_loop().create_task(
                    self._floor_stream(address, len(self.floor_tasks), interval)
                )
            )
        while len(self.floor_tasks) > n:
            self.floor_tasks.pop().cancel()

    async def _floor_stream(self, address: str, i: int, interval: float) -> None:
        msg = stream_pb2.DaemonMessage()
        msg.heartbeat.seq = 1_000_000
        msg.heartbeat.host_time = time.time()
        msg.heartbeat.inflight = 0
        for _attempt in range(5):
            try:
                # the same pings as a daemon at this interval: the floor answers them too
                options = channel_options(keepalive_plan(interval, 3 * interval))
                async with grpc.aio.secure_channel(address, self.creds, options=options) as channel:
                    call = channel.stream_stream(
                        CONNECT,
                        request_serializer=stream_pb2.DaemonMessage.SerializeToString,
                        response_deserializer=stream_pb2.RelayMessage.FromString,
                    )()
                    await call.write(msg)
                    self.stats.floor_open += 1
                    try:
                        await asyncio.sleep(self.rng.uniform(0, interval))
                        while True:
                            msg.heartbeat.seq += 1
                            msg.heartbeat.host_time = time.time()
                            await call.write(msg)
                            self.stats.heartbeats += 1
                            await asyncio.sleep(interval)
                    finally:
                        self.stats.floor_open -= 1
                        call.cancel()
            except asyncio.CancelledError:
                return
            except Exception as err:
                self.stats.error(f"floor {type(err).__name__}: {err}")
                await asyncio.sleep(1.0)

    # ------------------------------------------------------------------ control

    def snapshot(self) -> dict[str, Any]:
        st = self.stats
        return {
            "daemons": len(self.daemons),
            "connected": st.connected,
            "attempts": st.attempts,
            "accepted": st.accepted,
            "results": st.results,
            "heartbeats": st.heartbeats,
            "floor_open": st.floor_open,
            "errors": dict(sorted(st.errors.items(), key=lambda kv: -kv[1])[:8]),
        }


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker: Worker | None = None

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    while True:
        line = await reader.readline()
        if not line:
            return  # orchestrator went away
        req = json.loads(line)
        cmd = req["cmd"]
        try:
            if cmd == "init":
                worker = Worker(req["address"], Path(req["ca"]).read_bytes(), req["seed"])
                reply({"ok": True, "pid": os.getpid()})
            elif cmd == "enroll":
                assert worker is not None
                t0 = time.monotonic()
                await worker.enroll(req["count"], req["token_path"], req["tenant"], req["conc"])
                reply({"ok": True, "seconds": time.monotonic() - t0, **worker.snapshot()})
            elif cmd == "address":
                assert worker is not None
                worker.address = req["address"]
                worker.endpoints = tuple(req.get("endpoints") or (req["address"],))
                reply({"ok": True})
            elif cmd == "target":
                assert worker is not None
                worker.set_target(req["n"])
                reply({"ok": True})
            elif cmd == "floor":
                assert worker is not None
                worker.set_floor(req["address"], req["n"], req["interval"])
                reply({"ok": True})
            elif cmd == "stats":
                assert worker is not None
                reply({"ok": True, **worker.snapshot()})
            elif cmd == "quit":
                reply({"ok": True})
                return
            else:
                reply({"ok": False, "error": f"unknown command {cmd}"})
        except Exception as err:
            reply({"ok": False, "error": f"{type(err).__name__}: {err}"})


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    os._exit(0)  # do not wait for grpc's shutdown of thousands of channels
