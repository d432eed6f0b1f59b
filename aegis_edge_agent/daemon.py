"""The reference daemon: one outbound stream to the relay, pumped into the core's session.

Protocol state lives in :class:`aegis_edge_core.session.DaemonSession`; backoff in
:class:`aegis_edge_core.backoff.Backoff`; policy in :class:`aegis_edge_core.policy.ToolPolicy`;
argument checks and result shapes in :mod:`aegis_edge_core.tools_spec`. This module moves
bytes, runs processes, keeps time and writes files.

Tool calls are owned by the daemon, not by a stream: a call keeps running when the stream
drops, and its result waits (in memory and in ``results.spool``) until a relay acknowledges
it on some later stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import math
import os
import platform
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import attrs
import grpc
import grpc.aio

from aegis_edge_agent.logs import EventLog
from aegis_edge_agent.otel import Telemetry
from aegis_edge_agent.settings import AgentSettings, load_settings
from aegis_edge_agent.statedir import StateDir
from aegis_edge_agent.tools import (
    BUILTIN,
    DaemonPaths,
    Tool,
    ToolContext,
    kill_process_group,
    load_plugins,
    reported_hostname,
)
from aegis_edge_core import PROTOCOL_VERSION, __version__, tools_spec
from aegis_edge_core import hoststate as hs
from aegis_edge_core import session as s
from aegis_edge_core.backoff import Backoff
from aegis_edge_core.capability_limits import CapabilityError, check_capabilities
from aegis_edge_core.errors import AegisError, ConfigError, LocalProtocolError, ProtocolError
from aegis_edge_core.identity import NodeKey, peek_node_token, sign_attestation
from aegis_edge_core.identity.errors import default_hint
from aegis_edge_core.identity.rotation import DEFAULT_REFRESH_MARGIN, needs_refresh, sign_rotation
from aegis_edge_core.policy import child_environment
from aegis_edge_core.wire import common_pb2, stream_pb2, stream_pb2_grpc

__all__ = ["EXIT_REVOKED", "Daemon", "run_daemon"]

_EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009 - the stubs do not declare it

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_REVOKED = 3
HANDSHAKE_TIMEOUT = 15.0
ROTATE_TIMEOUT = 30.0
CHILD_MARKER_ENV = "AEGIS_EDGE_COMMAND_ID"


class Revoked(Exception):
    """The relay says this node is revoked: stop, do not retry."""


class Fatal(Exception):
    """Retrying cannot help (credentials gone or unreadable): stop with this message."""

    def __init__(self, message: str, *, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ConnectFailed(Exception):
    def __init__(self, message: str, *, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; only its parent has not reaped it yet
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@attrs.define
class _Running:
    invocation: stream_pb2.CommandInvocation
    task: asyncio.Task[None] | None = None
    cancel_reason: str = ""
    timer: asyncio.TimerHandle | None = None


class _Connection:
    """One attested stream: its session, its call, and a single ordered writer."""

    def __init__(self, session: s.DaemonSession, call: Any) -> None:
        self.session = session
        self.call = call
        self.wake = asyncio.Event()
        self.closed = False
        self.accepted: s.SessionAccepted | None = None
        self.capabilities: common_pb2.Capabilities | None = None
        self.refresh_requested = False
        self.rotation: asyncio.Future[s.KeyRotated] | None = None
        self.end_reason = ""

    def kick(self) -> None:
        self.wake.set()

    async def flush(self) -> None:
        for msg in self.session.messages_to_send():
            await self.call.write(msg)

    async def writer(self) -> None:
        while not self.closed:
            await self.wake.wait()
            self.wake.clear()
            await self.flush()

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.end_reason = self.end_reason or reason
            self.call.cancel()


class Daemon:
    def __init__(
        self,
        state: StateDir,
        *,
        log: EventLog,
        rng: random.Random | None = None,
        stall_heartbeats: int | None = None,
    ) -> None:
        self.state = state
        self.log = log
        self.rng = rng or random.SystemRandom()
        self.backoff = Backoff()
        self.stop_event = asyncio.Event()
        self.conn: _Connection | None = None
        self.running: dict[str, _Running] = {}
        self.results: dict[str, stream_pb2.CommandResult] = {}
        self.children: dict[int, hs.ChildProcess] = {}
        self.tools: dict[str, Tool] = dict(BUILTIN)
        self.settings = AgentSettings()
        # Programs a policy names are looked up on the PATH the daemon started with.
        self.host_paths = DaemonPaths()
        self.node: hs.NodeInfo | None = None
        self.telemetry: Telemetry | None = None
        self.stall_heartbeats = stall_heartbeats
        self._status: dict[str, Any] = {
            "state": hs.ConnectionState.STARTING,
            "pid": os.getpid(),
            "relay": "",
            "agent_version": __version__,
        }
        self._lock_file: IO[bytes] | None = None
        self._config_mtime: float | None = None
        self._exit_reason = ""

    # ------------------------------------------------------------------ status

    def set_status(self, **changes: Any) -> None:
        self._status.update(changes)
        self._status["updated_at"] = time.time()
        self._status["inflight"] = len(self.running)
        self._status["pending_results"] = len(self.results)
        try:
            self.state.write_status(hs.DaemonStatus(**self._status))
        except OSError as err:
            self.log.warning("status_write_failed", error=str(err))

    # ------------------------------------------------------------------ start-up

    def _acquire_lock(self) -> None:
        path = self.state.file("daemon.lock")
        fh = open(path, "ab")  # noqa: SIM115 - held for the daemon's lifetime
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            status = self.state.load_status()
            pid = f" (pid {status.pid})" if status else ""
            raise Fatal(f"another daemon is already running for {self.state.path}{pid}") from None
        self._lock_file = fh

    def _kill_orphans(self) -> None:
        """Kill process groups a crashed daemon left behind (we hold the lock: it is dead)."""
        for child in self.state.load_children():
            if child.daemon_pid == os.getpid():
                continue
            if not _is_our_child(child):
                continue
            if kill_process_group(child.pgid, signal.SIGKILL):
                self.log.warning(
                    "orphan_killed",
                    command_id=child.command_id,
                    pgid=child.pgid,
                    daemon_pid=child.daemon_pid,
                )
        self.state.write_children([])

    def _load_spool(self) -> None:
        results, problems = self.state.load_spool()
        for problem in problems:
            self.log.warning("spool_record_skipped", problem=problem)
        for result in results:
            self.results[result.command_id] = result
        if results:
            self.log.info("spool_loaded", pending_results=len(results))

    def _recover_rotation(self) -> None:
        staged = self.state.file(hs.NODE_KEY_NEXT)
        if not staged.exists():
            return
        try:
            from aegis_edge_core.identity import load_node_key

            new_key = load_node_key(staged.read_bytes(), source=str(staged))
            claims = self.state.token_claims()
            try:
                current: str | None = self.state.load_key().thumbprint
            except (AegisError, OSError):
                current = None
            action = hs.rotation_recovery(
                token_thumbprint=claims.key_thumbprint if claims else None,
                current_thumbprint=current,
                staged_thumbprint=new_key.thumbprint,
            )
        except (AegisError, OSError):
            action = "discard"
        if action == "promote":
            os.replace(staged, self.state.key_path)
            self.log.warning("rotation_recovered", key_thumbprint=new_key.thumbprint)
        else:
            staged.unlink(missing_ok=True)

    def _reload_settings(self, *, force: bool = False) -> bool:
        """Re-read aegis-config.yaml if it changed; True when the settings changed."""
        try:
            mtime = self.state.config_path.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        if not force and mtime == self._config_mtime:
            return False
        self._config_mtime = mtime
        variables = {}
        if self.node is not None:
            variables = {"tenant_id": self.node.tenant_id, "node_id": self.node.node_id}
        try:
            new = load_settings(self.state.config_path, variables=variables)
        except ConfigError as err:
            if force:
                raise
            self.log.error("config_invalid", error=str(err), action="keeping the previous config")
            return False
        changed = new != self.settings
        self.settings = new
        return changed

    def _capabilities(self) -> common_pb2.Capabilities:
        policy = self.settings.policy
        tools = [name for name in self.tools if policy.allows_tool(name)]
        return tools_spec.capabilities(
            os=platform.system(),
            arch=platform.machine(),
            tools=tools,
            labels=self.settings.labels,
            hostname=reported_hostname(),
            agent_version=__version__,
        )

    # ------------------------------------------------------------------ main loop

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            return await self._run()
        except Fatal as err:
            self.log.error("daemon_stopped", error=str(err))
            if self.state.node_json_path.exists():
                self.set_status(state=hs.ConnectionState.STOPPED, last_error=str(err))
            return err.exit_code
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            if self.telemetry is not None:
                await asyncio.to_thread(self.telemetry.shutdown)

    def _on_signal(self, sig: int) -> None:
        self.log.info("signal_received", signal=signal.Signals(sig).name)
        self.stop_event.set()
        if self.conn is not None:
            self.conn.close("shutdown")

    async def _run(self) -> int:
        try:
            self.node = self.state.load_node()
            self._reload_settings(force=True)
        except AegisError as err:
            raise Fatal(str(err)) from None
        node = self.node
        self.log.bind(node_id=node.node_id, tenant_id=node.tenant_id)
        self._status.update(relay=node.relay, node_id=node.node_id, tenant_id=node.tenant_id)
        for name, old in self.state.tighten_modes():
            self.log.warning("file_mode_tightened", file=name, old_mode=f"{old:04o}")
        self._acquire_lock()
        self._kill_orphans()
        self._recover_rotation()
        self._load_spool()
        for name, tool in load_plugins(
            lambda ep, err: self.log.warning("plugin_skipped", plugin=ep, error=err)
        ).items():
            self.tools[name] = tool
        try:
            check_capabilities(self._capabilities())
        except CapabilityError as err:
            # The relay would close every stream that carries it: say so once, here.
            raise Fatal(f"this host's capability snapshot is too large to send: {err}") from None
        self.telemetry = Telemetry(
            self.settings.otlp, log=self.log, node_id=node.node_id, tenant_id=node.tenant_id
        )
        self.log.info(
            "daemon_started",
            pid=os.getpid(),
            relay=node.relay,
            state_dir=str(self.state.path),
            version=__version__,
            tools=sorted(self._capabilities().tools),
        )
        self.set_status(state=hs.ConnectionState.STARTING)
        exit_code = EXIT_OK
        try:
            while not self.stop_event.is_set():
                delay: float | None = None
                try:
                    delay = await self._connect_once()
                except Revoked as err:
                    self.log.error("revoked", reason=str(err))
                    self.set_status(state=hs.ConnectionState.REVOKED, last_error=f"revoked: {err}")
                    self._record_revocation(str(err))
                    # The advice once, here; the relay's sentence stays in the log line.
                    self._print_plain(
                        f"aegis: the relay revoked node {node.node_id}; {default_hint('revoked')}"
                    )
                    exit_code = EXIT_REVOKED
                    break
                except ConnectFailed as err:
                    self.log.warning("connect_failed", error=str(err))
                    self._status["last_error"] = str(err)
                    if err.retry_after > 0:
                        delay = err.retry_after
                if self.stop_event.is_set():
                    break
                if delay is None:
                    # now: a failure soon after a relay's Drain does not climb the ladder
                    delay = self.backoff.next_delay(self.rng, time.time())
                self.log.info(
                    "reconnect_backoff", delay_secs=round(delay, 3), attempt=self.backoff.attempt
                )
                self.set_status(
                    state=hs.ConnectionState.BACKOFF,
                    next_retry_at=time.time() + delay,
                    connected_since=None,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), timeout=delay)
        finally:
            await self._shutdown_tools()
        self.set_status(
            state=hs.ConnectionState.STOPPED
            if exit_code != EXIT_REVOKED
            else hs.ConnectionState.REVOKED,
            next_retry_at=None,
        )
        self.log.info("daemon_stopped", exit_code=exit_code, reason=self._exit_reason or None)
        return exit_code

    def _record_revocation(self, message: str) -> None:
        # So that `aegis edge enroll <new-token>` knows there is nothing left to protect.
        node_id = self.node.node_id if self.node is not None else ""
        try:
            self.state.write(
                hs.REVOKED_JSON,
                hs.encode_revoked(node_id=node_id, revoked_at=time.time(), message=message),
            )
        except OSError as err:
            self.log.warning("revocation_not_recorded", error=str(err))

    def _print_plain(self, line: str) -> None:
        import sys

        print(line, file=sys.stderr, flush=True)

    async def _shutdown_tools(self) -> None:
        for running in list(self.running.values()):
            running.cancel_reason = running.cancel_reason or "shutdown"
            if running.task is not None:
                running.task.cancel()
        tasks = [r.task for r in self.running.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10)

    # ------------------------------------------------------------------ one connection

    def _read_credentials(self) -> tuple[NodeKey, str, hs.NodeInfo, bytes]:
        if not self.state.key_path.exists() and not self.state.token_path.exists():
            self._exit_reason = "logged out"
            raise Fatal(
                f"this host is logged out: no node.key or node.token in {self.state.path}",
                exit_code=EXIT_OK,
            )
        try:
            key = self.state.load_key()
            token = self.state.load_token()
            node = self.state.load_node()
            ca = self.state.load_ca()
        except AegisError as err:
            raise Fatal(str(err)) from None
        return key, token, node, ca

    async def _connect_once(self) -> float | None:
        """Connect, attest, serve until the stream ends. Returns a delay override or None."""
        key, token, node, ca = self._read_credentials()
        self._reload_settings()
        self.set_status(state=hs.ConnectionState.CONNECTING, next_retry_at=None)
        self.log.info("connecting", relay=node.relay)
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
        options = [
            ("grpc.max_receive_message_length", s.MAX_MESSAGE_BYTES),
            ("grpc.enable_retries", 0),
        ]
        async with grpc.aio.secure_channel(node.relay, creds, options=options) as channel:
            stub: Any = stream_pb2_grpc.EdgeStreamStub(channel)
            call = stub.Connect()
            conn = _Connection(s.DaemonSession(), call)
            try:
                try:
                    await asyncio.wait_for(
                        self._handshake(conn, key, token, node), timeout=HANDSHAKE_TIMEOUT
                    )
                except TimeoutError:
                    raise ConnectFailed("the relay did not finish the handshake in time") from None
                except grpc.aio.AioRpcError as err:
                    raise ConnectFailed(_rpc_error(err)) from None
                except ProtocolError as err:
                    raise ConnectFailed(f"protocol error during handshake: {err}") from None
                return await self._serve(conn, key)
            finally:
                conn.closed = True
                call.cancel()

    async def _read(self, conn: _Connection) -> stream_pb2.RelayMessage | None:
        try:
            msg = await conn.call.read()
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError from read() once *we* cancelled the call.
            if conn.closed:
                return None
            raise
        if msg is _EOF:
            return None
        assert isinstance(msg, stream_pb2.RelayMessage)
        return msg

    async def _handshake(
        self, conn: _Connection, key: NodeKey, token: str, node: hs.NodeInfo
    ) -> None:
        session = conn.session
        conn.capabilities = self._capabilities()
        session.hello(
            node_id=node.node_id, node_token=token, capabilities=conn.capabilities, now=time.time()
        )
        await conn.flush()
        while conn.accepted is None:
            msg = await self._read(conn)
            if msg is None:
                raise ConnectFailed("the relay closed the stream during the handshake")
            for event in session.receive(msg, time.time()):
                if isinstance(event, s.ChallengeReceived):
                    session.attest(
                        sign_attestation(
                            key,
                            protocol_version=PROTOCOL_VERSION,
                            node_id=node.node_id,
                            nonce=event.nonce,
                        )
                    )
                    await conn.flush()
                elif isinstance(event, s.Refused):
                    if event.reason == "revoked":
                        raise Revoked(event.message or "revoked")
                    raise ConnectFailed(
                        f"refused ({event.reason}): {event.message}",
                        retry_after=event.retry_after_secs,
                    )
                elif isinstance(event, s.SessionAccepted):
                    conn.accepted = event

    async def _serve(self, conn: _Connection, key: NodeKey) -> float | None:
        accepted = conn.accepted
        assert accepted is not None
        now = time.time()
        self.backoff.connected(now)
        self.conn = conn
        if accepted.node_token:
            self._store_token(accepted.node_token)
            self._ack_token(conn, accepted.node_token)
        token_exp = accepted.token_expires_at or self._token_expiry()
        self.set_status(
            state=hs.ConnectionState.CONNECTED,
            connected_since=now,
            heartbeat_interval_secs=accepted.heartbeat_interval_secs,
            token_expires_at=token_exp,
            last_error="",
            next_retry_at=None,
        )
        self.log.info(
            "connected",
            relay=self.node.relay if self.node else "",
            heartbeat_interval_secs=accepted.heartbeat_interval_secs,
            pending_results=len(self.results),
        )
        # Results that finished while no stream was up.
        for result in list(self.results.values()):
            conn.session.result(result)
        writer = asyncio.create_task(conn.writer())
        heart = asyncio.create_task(self._heartbeats(conn))
        conn.kick()
        delay: float | None = None
        try:
            while not conn.closed:
                try:
                    msg = await self._read(conn)
                except grpc.aio.AioRpcError as err:
                    if not conn.closed:
                        conn.end_reason = _rpc_error(err)
                    break
                if msg is None:
                    conn.end_reason = conn.end_reason or "the relay closed the stream"
                    break
                try:
                    events = conn.session.receive(msg, time.time())
                except ProtocolError as err:
                    conn.end_reason = f"protocol error: {err}"
                    break
                for event in events:
                    d = await self._on_event(conn, event, key)
                    if d is not None:
                        delay = d
                conn.kick()
        finally:
            conn.closed = True
            conn.wake.set()
            heart.cancel()
            writer.cancel()
            for t in (heart, writer):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            if conn.rotation is not None and not conn.rotation.done():
                conn.rotation.set_exception(ConnectionError("the stream dropped during rotation"))
            self.conn = None
            self.backoff.disconnected(time.time())
            conn.session.close()
        reason = conn.end_reason or "stream ended"
        if conn.end_reason == "revoked":
            raise Revoked("the relay revoked this node")
        self.log.warning("disconnected", reason=reason, inflight=len(self.running))
        self._status["last_error"] = reason if reason not in ("shutdown",) else ""
        return delay

    async def _on_event(self, conn: _Connection, event: s.Event, key: NodeKey) -> float | None:
        if isinstance(event, s.HeartbeatAcked):
            self.set_status(last_heartbeat_acked_at=time.time())
        elif isinstance(event, s.CommandReceived):
            self._start_command(event.command)
        elif isinstance(event, s.CancelRequested):
            running = self.running.get(event.command_id)
            if running is not None and running.task is not None:
                running.cancel_reason = "cancel"
                self.log.info("command_cancel", command_id=event.command_id, reason=event.reason)
                running.task.cancel()
        elif isinstance(event, s.ResultAcked):
            if self.results.pop(event.command_id, None) is not None:
                self._write_spool()
                self.set_status()
        elif isinstance(event, s.TokenRefreshed):
            self._store_token(event.node_token)
            self._ack_token(conn, event.node_token)
            conn.refresh_requested = False
            self.set_status(token_expires_at=event.expires_at)
            self.log.info("token_refreshed", expires_at=event.expires_at)
        elif isinstance(event, s.KeyRotated):
            if conn.rotation is not None and not conn.rotation.done():
                conn.rotation.set_result(event)
        elif isinstance(event, s.Drained):
            self.log.info("drain", reason=event.reason)
            conn.close(f"drained: {event.reason}")
            # jittered: every daemon of a restarting relay hears the same hint at once
            # now: the relay is restarting, not the network broken -- the schedule starts
            # again at the bottom and refused attempts in the drain window do not climb
            return self.backoff.after_drain(event.reconnect_after_secs, self.rng, time.time())
        elif isinstance(event, s.Revoked):
            conn.end_reason = "revoked"
            conn.close("revoked")
        return None

    def _token_expiry(self) -> float | None:
        claims = self.state.token_claims()
        return claims.expires_at if claims else None

    def _store_token(self, token: str) -> None:
        self.state.write(hs.NODE_TOKEN, token + "\n")

    def _ack_token(self, conn: _Connection, token: str) -> None:
        """Tell the relay the token is on disk (a heartbeat naming its jti), so it can
        revoke the one it replaces. Only after ``_store_token`` returned: fsynced."""
        try:
            jti = peek_node_token(token).jti
        except AegisError:
            return  # not a token we can read; the relay will not revoke on our behalf
        conn.session.heartbeat(time.time(), inflight=len(self.running), token_jti=jti)

    async def _heartbeats(self, conn: _Connection) -> None:
        accepted = conn.accepted
        assert accepted is not None
        interval = accepted.heartbeat_interval_secs or 30.0
        stale = accepted.stale_threshold_secs or 3 * interval
        limit = self.stall_heartbeats or max(2, math.ceil(stale / interval))
        while not conn.closed:
            await asyncio.sleep(interval)
            session = conn.session
            if session.heartbeats_unacked >= limit:
                self.log.warning("relay_stalled", heartbeats_unacked=session.heartbeats_unacked)
                conn.close(f"relay stalled: {session.heartbeats_unacked} heartbeats unacknowledged")
                return
            if not self.state.key_path.exists():
                self._exit_reason = "logged out"
                self.log.info("logged_out", action="stopping")
                self.stop_event.set()
                conn.close("logged out")
                return
            now = time.time()
            session.heartbeat(now, inflight=len(self.running))
            self._maybe_refresh(conn, now)
            if self._reload_settings():
                self.log.info("config_reloaded")
            caps = self._capabilities()
            if caps != conn.capabilities:
                conn.capabilities = caps
                try:
                    session.capabilities(caps)
                except LocalProtocolError as err:
                    # keep the relay's copy as it was rather than lose the stream over it
                    self.log.error("capabilities_not_sent", error=str(err))
                else:
                    self.log.info("capabilities_changed", tools=list(caps.tools))
            conn.kick()

    def _maybe_refresh(self, conn: _Connection, now: float) -> None:
        if conn.refresh_requested:
            return
        try:
            claims = peek_node_token(self.state.load_token())
        except (AegisError, OSError):
            return
        margin = min(DEFAULT_REFRESH_MARGIN, (claims.expires_at - claims.issued_at) / 3)
        if needs_refresh(claims.expires_at, now, margin):
            conn.refresh_requested = True
            conn.session.request_token_refresh()
            self.log.info("token_refresh_requested", expires_at=claims.expires_at)

    # ------------------------------------------------------------------ key rotation

    async def rotate_key(self) -> str:
        conn = self.conn
        if conn is None or conn.accepted is None or conn.session.nonce is None:
            raise ConnectionError("no live stream to rotate the key over")
        old_key = self.state.load_key()
        new_key, proof = stage_rotation(
            self.state, old_key, conn.accepted.node_id, conn.session.nonce
        )
        conn.rotation = asyncio.get_running_loop().create_future()
        conn.session.rotate_key(
            new_public_key=proof.new_public_key,
            old_key_signature=proof.old_key_signature,
            new_key_signature=proof.new_key_signature,
        )
        conn.kick()
        try:
            rotated = await asyncio.wait_for(conn.rotation, timeout=ROTATE_TIMEOUT)
        except BaseException:
            self.state.file(hs.NODE_KEY_NEXT).unlink(missing_ok=True)
            raise
        commit_rotation(self.state, new_key, rotated.node_token)
        self.set_status(token_expires_at=rotated.expires_at)
        self.log.info("key_rotated", key_thumbprint=new_key.thumbprint)
        return new_key.thumbprint

    # ------------------------------------------------------------------ commands

    def _write_spool(self) -> None:
        try:
            self.state.write_spool(self.results.values())
        except OSError as err:
            self.log.error("spool_write_failed", error=str(err))

    def add(self, pgid: int, command_id: str) -> None:
        self.children[pgid] = hs.ChildProcess(
            pgid=pgid, command_id=command_id, started_at=time.time(), daemon_pid=os.getpid()
        )
        self.state.write_children(self.children.values())

    def remove(self, pgid: int) -> None:
        if self.children.pop(pgid, None) is not None:
            self.state.write_children(self.children.values())

    def _finish_now(
        self,
        inv: stream_pb2.CommandInvocation,
        kind: stream_pb2.ErrorKind.ValueType,
        message: str,
    ) -> None:
        now = time.time()
        self._deliver(
            tools_spec.build_result(
                inv.command_id, kind, started_at=now, finished_at=now, message=message
            ),
            inv,
        )

    def _deliver(self, result: stream_pb2.CommandResult, inv: stream_pb2.CommandInvocation) -> None:
        self.results[result.command_id] = result
        self._write_spool()
        self.log.info(
            "command_finished",
            command_id=result.command_id,
            tool=inv.tool,
            outcome=common_pb2.TargetOutcome.Name(result.outcome)
            .removeprefix("TARGET_OUTCOME_")
            .lower(),
            error_kind=stream_pb2.ErrorKind.Name(result.error_kind)
            .removeprefix("ERROR_KIND_")
            .lower(),
            exit_code=result.exit_code if result.has_exit_code else None,
            duration_secs=round(result.finished_at - result.started_at, 3),
            message=result.error_message or None,
        )
        conn = self.conn
        if conn is not None and not conn.closed and conn.accepted is not None:
            try:
                conn.session.result(result)
            except ProtocolError as err:
                self.log.warning("result_not_sent", command_id=result.command_id, error=str(err))
            conn.kick()
        self.set_status()

    def _emit_output(self, command_id: str) -> Callable[[str, bytes], None]:
        seq = 0

        def emit(stream: str, data: bytes) -> None:
            nonlocal seq
            conn = self.conn
            if conn is None or conn.closed or conn.accepted is None:
                return
            kwargs = {stream: data}
            try:
                conn.session.output(command_id, seq, **kwargs)
            except ProtocolError:
                return
            seq += 1
            conn.kick()

        return emit

    def _start_command(self, inv: stream_pb2.CommandInvocation) -> None:
        cid = inv.command_id
        self.log.info(
            "command_received",
            command_id=cid,
            tool=inv.tool,
            fleet_command_id=inv.fleet_command_id or None,
        )
        if cid in self.running:
            return  # already running from an earlier stream; its result will follow
        if cid in self.results:
            conn = self.conn
            if conn is not None:
                with contextlib.suppress(ProtocolError):
                    conn.session.result(self.results[cid])
            return
        try:
            args = tools_spec.parse_args_json(inv.tool, inv.args_json)
        except tools_spec.ToolArgumentError as err:
            self._finish_now(inv, stream_pb2.ERROR_KIND_BAD_ARGUMENTS, str(err))
            return
        decision = self.settings.policy.evaluate(inv.tool, args, paths=self.host_paths)
        if not decision.allowed:
            self.log.warning(
                "command_denied",
                command_id=cid,
                tool=inv.tool,
                rule=decision.rule,
                reason=decision.reason,
            )
            self._finish_now(
                inv,
                stream_pb2.ERROR_KIND_DENIED,
                f"denied by host policy ({decision.rule}): {decision.reason}",
            )
            return
        tool = self.tools.get(inv.tool)
        if tool is None:
            self._finish_now(
                inv,
                stream_pb2.ERROR_KIND_UNKNOWN_TOOL,
                f"this daemon has no tool {inv.tool!r}",
            )
            return
        try:
            spec = tools_spec.validate_args(inv.tool, args)
        except tools_spec.ToolArgumentError as err:
            self._finish_now(inv, stream_pb2.ERROR_KIND_BAD_ARGUMENTS, str(err))
            return
        bound = self.settings.max_concurrent
        if self.conn is not None and self.conn.accepted is not None:
            relay_bound = self.conn.accepted.max_concurrent_commands
            if relay_bound:
                bound = min(bound, relay_bound)
        if len(self.running) >= bound:
            self._finish_now(
                inv,
                stream_pb2.ERROR_KIND_BUSY,
                f"{len(self.running)} commands already running (tools.max_concurrent={bound})",
            )
            return
        arg_timeout = spec.timeout if isinstance(spec, tools_spec.CmdRunArgs) else None
        timeout = tools_spec.effective_timeout(inv.timeout_secs or None, arg_timeout)
        if timeout is None and inv.tool == tools_spec.CMD_RUN:
            timeout = self.settings.default_timeout_secs
        run_args: dict[str, Any] = dict(args)
        if decision.plan is not None:
            run_args["_plan"] = decision.plan
            run_args["_env"] = child_environment(
                os.environ, decision.plan.env, extra={CHILD_MARKER_ENV: cid}
            )
        running = _Running(invocation=inv)
        self.running[cid] = running
        running.task = asyncio.create_task(self._run_tool(tool, run_args, inv, running))
        running.task.add_done_callback(lambda task: self._task_done(task, inv, running))
        if timeout is not None:
            running.timer = asyncio.get_running_loop().call_later(
                timeout, self._expire, cid, timeout
            )

    def _task_done(
        self, task: asyncio.Task[None], inv: stream_pb2.CommandInvocation, running: _Running
    ) -> None:
        """A task cancelled before it ever ran still owes the relay a result."""
        if not task.cancelled() or self.running.get(inv.command_id) is not running:
            return
        if running.timer is not None:
            running.timer.cancel()
        self.running.pop(inv.command_id, None)
        timeout = running.cancel_reason == "timeout"
        self._finish_now(
            inv,
            stream_pb2.ERROR_KIND_TIMEOUT if timeout else stream_pb2.ERROR_KIND_CANCELLED,
            "deadline passed before it started" if timeout else "cancelled before it started",
        )

    def _expire(self, cid: str, timeout: float) -> None:
        running = self.running.get(cid)
        if running is not None and running.task is not None and not running.task.done():
            running.cancel_reason = "timeout"
            self.log.info("command_timeout", command_id=cid, timeout_secs=timeout)
            running.task.cancel()

    async def _run_tool(
        self,
        tool: Tool,
        args: dict[str, Any],
        inv: stream_pb2.CommandInvocation,
        running: _Running,
    ) -> None:
        cid = inv.command_id
        started = time.time()
        ctx = ToolContext(
            command_id=cid,
            fleet_command_id=inv.fleet_command_id,
            capture=tools_spec.OutputCapture(cap=self.settings.output_cap_bytes),
            emit=self._emit_output(cid),
            processes=self,
            rotate_key=self.rotate_key,
        )
        kind: stream_pb2.ErrorKind.ValueType = stream_pb2.ERROR_KIND_OK
        message = ""
        exit_code: int | None = None
        result_json = ""
        telemetry = self.telemetry
        span_cm = telemetry.tool_span(inv) if telemetry else contextlib.nullcontext()
        try:
            with span_cm as span:
                try:
                    res = await tool.run(args, ctx)
                    kind, message = res.kind, res.message
                    exit_code, result_json = res.exit_code, res.result_json
                except asyncio.CancelledError:
                    reason = running.cancel_reason or "shutdown"
                    if reason == "timeout":
                        kind, message = stream_pb2.ERROR_KIND_TIMEOUT, "deadline passed; killed"
                    else:
                        kind = stream_pb2.ERROR_KIND_CANCELLED
                        message = (
                            "cancelled by the relay; killed"
                            if reason == "cancel"
                            else "the daemon stopped; killed"
                        )
                except tools_spec.ToolArgumentError as err:
                    kind, message = stream_pb2.ERROR_KIND_BAD_ARGUMENTS, str(err)
                except Exception as err:
                    kind = stream_pb2.ERROR_KIND_INTERNAL
                    message = f"{type(err).__name__}: {err}"
                    self.log.error("tool_crashed", command_id=cid, tool=inv.tool, error=message)
                if span is not None:
                    span.set_attribute(
                        "aegis.outcome",
                        stream_pb2.ErrorKind.Name(kind).removeprefix("ERROR_KIND_").lower(),
                    )
                    if exit_code is not None:
                        span.set_attribute("aegis.exit_code", exit_code)
        finally:
            if running.timer is not None:
                running.timer.cancel()
            self.running.pop(cid, None)
        result = tools_spec.build_result(
            cid,
            kind,
            started_at=started,
            finished_at=time.time(),
            message=message,
            exit_code=exit_code,
            capture=ctx.capture,
            result_json=result_json,
        )
        self._deliver(result, inv)


def stage_rotation(
    state: StateDir, old_key: NodeKey, node_id: str, nonce: bytes
) -> tuple[NodeKey, Any]:
    """Make the new key, stage it as node.key.next, and sign the rotation proof."""
    new_key = NodeKey.from_seed(os.urandom(32))
    state.write(hs.NODE_KEY_NEXT, new_key.to_pem())
    proof = sign_rotation(old_key=old_key, new_key=new_key, node_id=node_id, nonce=nonce)
    return new_key, proof


def commit_rotation(state: StateDir, new_key: NodeKey, token: str) -> None:
    """After KeyRotated: new token first, then the staged key over node.key (both atomic)."""
    state.write(hs.NODE_TOKEN, token + "\n")
    os.replace(state.file(hs.NODE_KEY_NEXT), state.key_path)
    node = state.load_node()
    state.write(hs.NODE_JSON, node.with_thumbprint(new_key.thumbprint).to_json())


def _is_our_child(child: hs.ChildProcess) -> bool:
    """Best effort: the group leader still carries our marker (Linux /proc), or we can't tell."""
    environ = Path(f"/proc/{child.pgid}/environ")
    try:
        data = environ.read_bytes()
    except FileNotFoundError:
        return pid_alive(child.pgid)
    except OSError:
        return True
    return f"{CHILD_MARKER_ENV}={child.command_id}".encode() in data.split(b"\0")


def _rpc_error(err: grpc.aio.AioRpcError) -> str:
    code = err.code()
    name = code.name if code is not None else "UNKNOWN"
    details = err.details() or ""
    return f"{name}: {details}".strip().rstrip(":")


async def control_rotate(state: StateDir, *, timeout: float = 30.0) -> str:
    """``aegis edge keys rotate``: a CONTROL session that rotates the key and swaps files."""
    key = state.load_key()
    token = state.load_token()
    node = state.load_node()
    ca = state.load_ca()
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    async with grpc.aio.secure_channel(node.relay, creds) as channel:
        stub: Any = stream_pb2_grpc.EdgeStreamStub(channel)
        call = stub.Connect()
        session = s.DaemonSession()

        async def flush() -> None:
            for msg in session.messages_to_send():
                await call.write(msg)

        async def exchange() -> str:
            session.hello(
                node_id=node.node_id,
                node_token=token,
                capabilities=common_pb2.Capabilities(agent_version=__version__),
                now=time.time(),
                control=True,
            )
            await flush()
            new_key: NodeKey | None = None
            while True:
                msg = await call.read()
                if msg is _EOF:
                    raise AegisError("the relay closed the stream before confirming the rotation")
                assert isinstance(msg, stream_pb2.RelayMessage)
                for event in session.receive(msg, time.time()):
                    if isinstance(event, s.ChallengeReceived):
                        session.attest(
                            sign_attestation(
                                key,
                                protocol_version=PROTOCOL_VERSION,
                                node_id=node.node_id,
                                nonce=event.nonce,
                            )
                        )
                    elif isinstance(event, s.Refused):
                        raise AegisError(
                            f"the relay refused this host ({event.reason}): {event.message}"
                        )
                    elif isinstance(event, s.SessionAccepted):
                        assert session.nonce is not None
                        new_key, proof = stage_rotation(state, key, node.node_id, session.nonce)
                        session.rotate_key(
                            new_public_key=proof.new_public_key,
                            old_key_signature=proof.old_key_signature,
                            new_key_signature=proof.new_key_signature,
                        )
                    elif isinstance(event, s.KeyRotated):
                        assert new_key is not None
                        commit_rotation(state, new_key, event.node_token)
                        return new_key.thumbprint
                    elif isinstance(event, s.Revoked):
                        raise AegisError(
                            "the relay revoked this node", hint=default_hint("revoked")
                        )
                await flush()

        try:
            return await asyncio.wait_for(exchange(), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise AegisError(f"key rotation failed: {_rpc_error(err)}") from None
        except TimeoutError:
            raise AegisError("the relay did not confirm the key rotation in time") from None
        finally:
            state.file(hs.NODE_KEY_NEXT).unlink(missing_ok=True)
            call.cancel()


def run_daemon(state: StateDir, *, log: EventLog | None = None) -> int:
    log = log or EventLog()
    daemon = Daemon(state, log=log)
    return asyncio.run(daemon.run())
