"""The reference daemon: one outbound stream to the relay, pumped into the core's session.

The work is done by parts, each with one job, and wired here:

* :mod:`~aegis_edge_agent.connection` -- dialling, attestation, the read/write pump,
  heartbeats, stalled-relay detection and token refresh;
* :mod:`~aegis_edge_agent.execution` -- tool calls: checks, concurrency bound, output,
  cancel and deadline, process groups;
* :mod:`~aegis_edge_agent.spool` -- results waiting for a relay's ack, on disk;
* :mod:`~aegis_edge_agent.rotation` -- key rotation and its crash recovery;
* :mod:`~aegis_edge_agent.status` -- ``status.json``.

The :class:`Daemon` owns what they share (the state dir, the settings, the tools) and runs
the reconnect loop. Decisions (backoff, refresh, stall, outcomes) are the core's.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import os
import platform
import random
import signal
import sys
import time
from typing import IO, Any

from aegis_edge_agent.connection import RelayLink, Stream
from aegis_edge_agent.errors import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_REVOKED,
    ConnectFailed,
    Fatal,
    Revoked,
)
from aegis_edge_agent.execution import CHILD_MARKER_ENV, Executor, Running, pid_alive
from aegis_edge_agent.logs import EventLog
from aegis_edge_agent.otel import Telemetry
from aegis_edge_agent.rotation import (
    KeyRotator,
    commit_rotation,
    control_rotate,
    recover_rotation,
    stage_rotation,
)
from aegis_edge_agent.settings import AgentSettings, load_settings
from aegis_edge_agent.spool import ResultSpool
from aegis_edge_agent.statedir import StateDir
from aegis_edge_agent.status import StatusBoard
from aegis_edge_agent.tools import BUILTIN, DaemonPaths, Tool, load_plugins, reported_hostname
from aegis_edge_core import __version__, tools_spec
from aegis_edge_core import hoststate as hs
from aegis_edge_core.backoff import Backoff
from aegis_edge_core.capability_limits import CapabilityError, check_capabilities
from aegis_edge_core.errors import AegisError, ConfigError
from aegis_edge_core.identity.errors import default_hint
from aegis_edge_core.wire import common_pb2, stream_pb2

__all__ = [
    "CHILD_MARKER_ENV",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_REVOKED",
    "ConnectFailed",
    "Daemon",
    "Fatal",
    "Revoked",
    "commit_rotation",
    "control_rotate",
    "pid_alive",
    "run_daemon",
    "stage_rotation",
]


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
        self.tools: dict[str, Tool] = dict(BUILTIN)
        self.settings = AgentSettings()
        self.node: hs.NodeInfo | None = None
        self.telemetry: Telemetry | None = None
        self.spool = ResultSpool(state, log=log)
        self.status = StatusBoard(
            state,
            log=log,
            inflight=lambda: len(self.executor),
            pending_results=lambda: len(self.spool),
        )
        self.rotator = KeyRotator(state, log=log, status=self.status, channel=lambda: self.conn)
        self.executor = Executor(
            state,
            log=log,
            spool=self.spool,
            status=self.status,
            tools=self.tools,
            host_paths=DaemonPaths(),
            settings=lambda: self.settings,
            uplink=lambda: self.conn,
            telemetry=lambda: self.telemetry,
            rotate_key=self.rotator.rotate,
        )
        self.link = RelayLink(
            state,
            log=log,
            status=self.status,
            backoff=self.backoff,
            rng=self.rng,
            stop_event=self.stop_event,
            commands=self.executor,
            results=self.spool,
            capabilities=self._capabilities,
            reload_settings=self._reload_settings,
            stall_heartbeats=stall_heartbeats,
        )
        self._lock_file: IO[bytes] | None = None
        self._config_mtime: float | None = None

    # The parts' state, under the names the daemon always gave it.

    @property
    def conn(self) -> Stream | None:
        """The accepted stream, while there is one."""
        return self.link.stream

    @property
    def running(self) -> dict[str, Running]:
        return self.executor.running

    @property
    def results(self) -> dict[str, stream_pb2.CommandResult]:
        return self.spool.results

    def set_status(self, **changes: Any) -> None:
        self.status.set(**changes)

    def _start_command(self, inv: stream_pb2.CommandInvocation) -> None:
        self.executor.start(inv)

    def _kill_orphans(self) -> None:
        self.executor.kill_orphans()

    async def _shutdown_tools(self) -> None:
        await self.executor.shutdown()

    async def rotate_key(self) -> str:
        return await self.rotator.rotate()

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
        self.status.note(relay=node.relay, node_id=node.node_id, tenant_id=node.tenant_id)
        for name, old in self.state.tighten_modes():
            self.log.warning("file_mode_tightened", file=name, old_mode=f"{old:04o}")
        self._acquire_lock()
        self.executor.kill_orphans()
        recover_rotation(self.state, self.log)
        self.spool.load()
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
        settle = asyncio.create_task(self._release_startup_memory())
        exit_code = EXIT_OK
        try:
            while not self.stop_event.is_set():
                delay: float | None = None
                try:
                    delay = await self.link.connect_once()
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
                    self.status.note(last_error=str(err))
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
            settle.cancel()
            await self.executor.shutdown()
        self.set_status(
            state=hs.ConnectionState.STOPPED
            if exit_code != EXIT_REVOKED
            else hs.ConnectionState.REVOKED,
            next_retry_at=None,
        )
        self.log.info("daemon_stopped", exit_code=exit_code, reason=self.link.exit_reason or None)
        return exit_code

    async def _release_startup_memory(self) -> None:
        # Imports, the config parse and the first TLS handshake are behind a daemon whose
        # stream the relay accepted; an idle daemon need not carry what they freed.
        await self.status.connected.wait()
        release_free_memory()

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


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS: glibc's ``malloc_trim(0)``.

    glibc returns freed memory only from the top of its heap; the holes start-up leaves
    below live objects stay resident (~1.5 MB of an idle daemon, docs/benchmarks.md) until
    trimmed. Nothing to do outside glibc (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except AttributeError:  # musl has no malloc_trim
        return
    gc.collect()  # start-up's reference cycles first, so their memory is among the holes
    trim(0)


def run_daemon(state: StateDir, *, log: EventLog | None = None) -> int:
    log = log or EventLog()
    daemon = Daemon(state, log=log)
    return asyncio.run(daemon.run())
