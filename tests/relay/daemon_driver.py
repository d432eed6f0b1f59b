"""Test helpers: a real relay process, and scripted daemons over real TLS gRPC channels.

Reusable by any test that needs a relay (``RelayProcess``) or daemons that speak the
stream protocol exactly as the core's :class:`DaemonSession` drives it
(``DaemonDriver``)::

    relay = RelayProcess.start(tmp_path / "relay", "--stale-threshold", "1s")
    async with relay.channel() as channel:
        admin = relay.admin(channel)                       # AdminStub with the admin token
        token = (await admin.IssueEnrollmentToken(
            admin_pb2.IssueEnrollmentTokenRequest(tenant_id="acme"),
            metadata=relay.auth())).token
        daemon = DaemonDriver(channel, tools=["cmd.run"])
        await daemon.enroll(token)
        await daemon.connect()                              # SessionAccepted, or raises
        daemon.start_heartbeats(0.2)
        ...
        await daemon.close()
    relay.stop()

``DaemonDriver.command_handler`` decides how each command ends (default: ``ok``, exit 0);
``events`` keeps every session event; ``wait_for(pred)`` polls them with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from aegis_edge_core import PROTOCOL_VERSION
from aegis_edge_core.identity import NodeKey, sign_attestation
from aegis_edge_core.identity.enrollment import sign_enrollment
from aegis_edge_core.identity.rotation import sign_rotation
from aegis_edge_core.identity.tokens import peek_enrollment_token, peek_node_token
from aegis_edge_core.session import (
    CancelRequested,
    ChallengeReceived,
    CommandReceived,
    DaemonSession,
    Event,
    KeyRotated,
    Refused,
    Revoked,
    SessionAccepted,
    TokenRefreshed,
)
from aegis_edge_core.wire import (
    admin_pb2_grpc,
    common_pb2,
    enrollment_pb2,
    enrollment_pb2_grpc,
    stream_pb2,
    stream_pb2_grpc,
)
from tests import https

__all__ = ["CommandReply", "DaemonDriver", "RelayProcess", "wait_until"]

REPO = Path(__file__).resolve().parents[2]

STARTUP_TIMEOUT = 60.0
"""How long a relay may take to write relay.json. Idle, it takes a second or two; on two
busy xdist workers most of it is the interpreter's imports, and a bound that only says
"it never came up" costs nothing while it is generous."""


async def wait_until(
    pred: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll ``pred`` (sync or async) until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        await asyncio.sleep(interval)


class RelayProcess:
    """``python -m aegis_edge_cli relay serve`` on loopback, port 0, found via relay.json."""

    def __init__(self, proc: subprocess.Popen[bytes], data_dir: Path, info: dict[str, Any]):
        self.proc = proc
        self.data_dir = data_dir
        self.info = info

    @classmethod
    def start(
        cls,
        data_dir: Path,
        *extra: str,
        timeout: float = STARTUP_TIMEOUT,
        store_url: str | None = None,
    ) -> RelayProcess:
        """``store_url``: the relay's ``--store`` (None: ``AEGIS_STORE_URL`` if the test set
        it, else SQLite in ``data_dir``)."""
        data_dir.mkdir(parents=True, exist_ok=True)
        info_path = data_dir / "relay.json"
        with contextlib.suppress(FileNotFoundError):
            info_path.unlink()
        env = dict(os.environ)
        env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        if store_url is not None:
            env["AEGIS_STORE_URL"] = store_url
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aegis_edge_cli",
                "relay",
                "serve",
                "--data-dir",
                str(data_dir),
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--drain-grace",
                "1s",
                *extra,
            ],
            cwd=REPO,
            env=env,
            stdout=open(data_dir / "stdout.log", "ab"),  # noqa: SIM115
            stderr=open(data_dir / "stderr.log", "ab"),  # noqa: SIM115
        )
        deadline = time.monotonic() + timeout
        while True:
            if info_path.exists():
                try:
                    info = json.loads(info_path.read_text())
                    if info.get("pid") == proc.pid:
                        return cls(proc, data_dir, info)
                except ValueError:
                    pass
            if proc.poll() is not None:
                raise RuntimeError(
                    f"relay exited with {proc.returncode}: "
                    + (data_dir / "stderr.log").read_text()[-2000:]
                )
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("relay did not write relay.json in time")
            time.sleep(0.05)

    @property
    def address(self) -> str:
        return str(self.info["listen"])

    @property
    def ca_pem(self) -> bytes:
        return Path(self.info["ca_cert"]).read_bytes()

    @property
    def admin_token(self) -> str:
        return Path(self.info["operator_token"]).read_text().strip()

    def auth(self, token: str | None = None) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token or self.admin_token}"),)

    def operator_token(self, tenant: str, role: str = "operator") -> str:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "aegis_edge_cli",
                "relay",
                "operator-token",
                "--data-dir",
                str(self.data_dir),
                "--tenant",
                tenant,
                "--role",
                role,
            ],
            cwd=REPO,
            capture_output=True,
            check=True,
            timeout=30,
        )
        return out.stdout.decode().strip()

    @contextlib.asynccontextmanager
    async def channel(self) -> AsyncIterator[grpc.aio.Channel]:
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca_pem)
        channel = grpc.aio.secure_channel(self.address, creds)
        try:
            yield channel
        finally:
            await channel.close()

    @staticmethod
    def admin(channel: grpc.aio.Channel) -> admin_pb2_grpc.AdminStub:
        return admin_pb2_grpc.AdminStub(channel)

    def scrape(self) -> str:
        return https.scrape(self.info, timeout=5)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in (self.data_dir / "stderr.log").read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


CommandReply = tuple[str, int | None]
"""(outcome, exit_code): ``("ok", 0)``, ``("error", 1)``, ..."""

_OUTCOMES = {
    "ok": (common_pb2.TARGET_OUTCOME_OK, stream_pb2.ERROR_KIND_OK),
    "error": (common_pb2.TARGET_OUTCOME_ERROR, stream_pb2.ERROR_KIND_EXIT_NONZERO),
    "denied": (common_pb2.TARGET_OUTCOME_DENIED, stream_pb2.ERROR_KIND_DENIED),
    "timeout": (common_pb2.TARGET_OUTCOME_TIMEOUT, stream_pb2.ERROR_KIND_TIMEOUT),
    "cancelled": (common_pb2.TARGET_OUTCOME_CANCELLED, stream_pb2.ERROR_KIND_CANCELLED),
}


class DaemonDriver:
    """A scripted daemon: the core's DaemonSession over a real ``EdgeStream.Connect`` call."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        tools: list[str] | None = None,
        labels: dict[str, str] | None = None,
        os_name: str = "linux",
        arch: str = "x86_64",
        key: NodeKey | None = None,
    ) -> None:
        self.channel = channel
        self.key = key or NodeKey.from_seed(os.urandom(32))
        self.capabilities = common_pb2.Capabilities(
            os=os_name,
            arch=arch,
            tools=tools or ["edge.ping", "cmd.run", "keys.rotate"],
            labels=labels or {},
            hostname="test-host",
            agent_version="test",
        )
        self.node_id = ""
        self.tenant_id = ""
        self.token = ""
        self.events: list[Event] = []
        self.commands: list[stream_pb2.CommandInvocation] = []
        self.command_handler: Callable[
            [stream_pb2.CommandInvocation], Awaitable[CommandReply] | CommandReply
        ] = self.default_handler
        self.session: DaemonSession | None = None
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._beater: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: dict[str, asyncio.Task[None]] = {}
        self.clock_offset = 0.0
        """Seconds added to the host clock this daemon reports (to fake a skewed host)."""
        self.closed_status: grpc.StatusCode | None = None
        self.closed_details = ""
        self.stream_done = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self.ack_tokens = True
        """Acknowledge a new token (a heartbeat naming its jti) as the agent does; False
        plays a daemon too old to send the ack."""
        self.features: tuple[str, ...] = ()
        """Optional stream features offered in the hello (none: an older daemon's hello)."""

    # -- enrollment

    async def enroll(self, enrollment_token: str) -> enrollment_pb2.EnrollResponse:
        claims = peek_enrollment_token(enrollment_token)
        stub = enrollment_pb2_grpc.EnrollmentStub(self.channel)
        resp = await stub.Enroll(
            enrollment_pb2.EnrollRequest(
                enrollment_token=enrollment_token,
                public_key=self.key.public_key.raw,
                proof=sign_enrollment(self.key, token_jti=claims.jti),
                capabilities=self.capabilities,
                host_time=time.time(),
            ),
            timeout=10,
        )
        self.node_id, self.tenant_id, self.token = resp.node_id, resp.tenant_id, resp.node_token
        return resp

    # -- the stream

    async def connect(self, *, control: bool = False, timeout: float = 10.0) -> Event:
        """Open a stream and attest; returns SessionAccepted or Refused (never raises on a
        refusal; check the type)."""
        await self.close()
        self.stream_done = asyncio.Event()
        self.closed_status = None
        self.session = DaemonSession()
        self._call = stream_pb2_grpc.EdgeStreamStub(self.channel).Connect()
        self.session.hello(
            node_id=self.node_id,
            node_token=self.token,
            capabilities=self.capabilities,
            now=time.time() + self.clock_offset,
            control=control,
            features=self.features,
        )
        start = len(self.events)
        await self._flush()
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        result: Event = await wait_until(
            lambda: (
                next(
                    (e for e in self.events[start:] if isinstance(e, SessionAccepted | Refused)),
                    None,
                )
                or (self.stream_done.is_set() and self._stream_failed())
            ),
            timeout=timeout,
            what="accepted or refused",
        )
        return result

    def _stream_failed(self) -> Event:
        raise AssertionError(f"stream closed before an answer: {self.closed_status}")

    async def _flush(self) -> None:
        assert self.session is not None
        # one write at a time: the reader flushes acks while a test sends its own messages
        async with self._write_lock:
            for msg in self.session.messages_to_send():
                await self._call.write(msg)

    async def _read_loop(self) -> None:
        try:
            async for msg in self._call:
                assert self.session is not None
                events = self.session.receive(msg, time.time())
                for event in events:
                    self.events.append(event)
                    await self._on_event(event)
                await self._flush()
        except grpc.aio.AioRpcError as err:
            self.closed_status = err.code()
            self.closed_details = err.details() or ""
        except (asyncio.CancelledError, grpc.aio.UsageError):
            pass
        else:
            self.closed_status = grpc.StatusCode.OK
        finally:
            self.stream_done.set()

    async def _on_event(self, event: Event) -> None:
        assert self.session is not None
        if isinstance(event, ChallengeReceived):
            self.session.attest(
                sign_attestation(
                    self.key,
                    protocol_version=PROTOCOL_VERSION,
                    node_id=self.node_id,
                    nonce=event.nonce,
                )
            )
        elif isinstance(event, SessionAccepted):
            if event.node_token:
                self.token = event.node_token
                self._ack_token()
            self.tenant_id = event.tenant_id
        elif isinstance(event, TokenRefreshed | KeyRotated):
            self.token = event.node_token
            if isinstance(event, TokenRefreshed):
                self._ack_token()
        elif isinstance(event, CommandReceived):
            self.commands.append(event.command)
            task = asyncio.get_running_loop().create_task(self._run_command(event.command))
            self._tasks.add(task)
            self._running[event.command.command_id] = task
            task.add_done_callback(self._tasks.discard)
        elif isinstance(event, CancelRequested):
            running = self._running.pop(event.command_id, None)
            if running is not None and not running.done():
                running.cancel()
                await self._send_result(event.command_id, "cancelled", None)
        elif isinstance(event, Revoked | Refused):
            pass

    def _ack_token(self) -> None:
        if self.ack_tokens and self.session is not None:
            self.session.heartbeat(time.time(), token_jti=peek_node_token(self.token).jti)

    async def default_handler(self, cmd: stream_pb2.CommandInvocation) -> CommandReply:
        """``ok``/0 for every tool; ``keys.rotate`` really rotates over the stream."""
        if cmd.tool == "keys.rotate":
            await self.rotate_key()
        return ("ok", 0)

    async def _run_command(self, cmd: stream_pb2.CommandInvocation) -> None:
        reply = self.command_handler(cmd)
        if not isinstance(reply, tuple):
            reply = await reply
        outcome, exit_code = reply
        self._running.pop(cmd.command_id, None)
        await self._send_result(cmd.command_id, outcome, exit_code, tool=cmd.tool)

    async def _send_result(
        self, command_id: str, outcome: str, exit_code: int | None, *, tool: str = ""
    ) -> None:
        target, kind = _OUTCOMES[outcome]
        result = stream_pb2.CommandResult(
            command_id=command_id,
            outcome=target,
            error_kind=kind,
            error_message="" if outcome == "ok" else f"scripted {outcome}",
            stdout_tail=f"out of {tool}\n".encode(),
            started_at=time.time(),
            finished_at=time.time(),
        )
        if exit_code is not None:
            result.exit_code = exit_code
            result.has_exit_code = True
        if self.session is None or self.stream_done.is_set():
            return
        with contextlib.suppress(Exception):
            self.session.result(result)
            await self._flush()

    def start_heartbeats(self, interval: float) -> None:
        self.stop_heartbeats()

        async def beat() -> None:
            while True:
                await self.heartbeat()
                await asyncio.sleep(interval)

        self._beater = asyncio.get_running_loop().create_task(beat())

    def stop_heartbeats(self) -> None:
        if self._beater is not None:
            self._beater.cancel()
            self._beater = None

    async def heartbeat(self) -> None:
        if self.session is None or self.stream_done.is_set():
            return
        with contextlib.suppress(Exception):
            self.session.heartbeat(time.time())
            await self._flush()

    async def request_token_refresh(self) -> None:
        assert self.session is not None
        self.session.request_token_refresh()
        await self._flush()

    async def rotate_key(self) -> NodeKey:
        """Rotate over the stream; returns the new key once the relay confirmed it."""
        assert self.session is not None and self.session.nonce is not None
        new_key = NodeKey.from_seed(os.urandom(32))
        proof = sign_rotation(
            old_key=self.key, new_key=new_key, node_id=self.node_id, nonce=self.session.nonce
        )
        start = len(self.events)
        self.session.rotate_key(
            new_public_key=proof.new_public_key,
            old_key_signature=proof.old_key_signature,
            new_key_signature=proof.new_key_signature,
        )
        await self._flush()
        await wait_until(
            lambda: any(isinstance(e, KeyRotated) for e in self.events[start:]),
            what="KeyRotated",
        )
        self.key = new_key
        return new_key

    def saw(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]

    async def close(self) -> None:
        """Half-close and drop the stream (a clean disconnect)."""
        self.stop_heartbeats()
        if self._call is not None:
            with contextlib.suppress(Exception):
                await self._call.done_writing()
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        self._call = None
        self._reader = None
        for task in list(self._tasks):
            task.cancel()
