"""Command execution: tool calls from arrival to result.

A call is checked (arguments, host policy, known tool, concurrency bound), runs as a task
under its deadline, streams its output over the live stream if there is one, and ends as a
result in the spool. Calls are owned by the daemon, not by a stream: one keeps running when
the stream drops. The process groups tools start are recorded in ``children.pids`` so that
a daemon started after a crash can kill what the dead one left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs

from aegis_edge_agent.logs import EventLog
from aegis_edge_agent.otel import Telemetry
from aegis_edge_agent.settings import AgentSettings
from aegis_edge_agent.spool import ResultSpool
from aegis_edge_agent.statedir import StateDir
from aegis_edge_agent.status import StatusBoard
from aegis_edge_agent.tools import Tool, ToolContext, kill_process_group
from aegis_edge_core import daemon_rules as rules
from aegis_edge_core import hoststate as hs
from aegis_edge_core import tools_spec
from aegis_edge_core.errors import ProtocolError
from aegis_edge_core.policy import HostPaths, child_environment
from aegis_edge_core.wire import common_pb2, stream_pb2

__all__ = ["CHILD_MARKER_ENV", "Executor", "Running", "Uplink", "pid_alive"]

CHILD_MARKER_ENV = "AEGIS_EDGE_COMMAND_ID"
SHUTDOWN_WAIT_SECS = 10


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


class Uplink(Protocol):
    """The accepted stream, as execution sees it. Sending raises ``ProtocolError`` when the
    session will not take the message."""

    @property
    def max_concurrent_commands(self) -> int: ...

    def send_result(self, result: stream_pb2.CommandResult) -> None: ...

    def send_output(self, command_id: str, seq: int, stream: str, data: bytes) -> None: ...


@attrs.define
class Running:
    invocation: stream_pb2.CommandInvocation
    task: asyncio.Task[None] | None = None
    cancel_reason: str = ""
    timer: asyncio.TimerHandle | None = None


class Executor:
    """Runs tool calls; also the tools' :class:`~aegis_edge_agent.tools.ProcessRegistry`."""

    def __init__(
        self,
        state: StateDir,
        *,
        log: EventLog,
        spool: ResultSpool,
        status: StatusBoard,
        tools: Mapping[str, Tool],
        host_paths: HostPaths,
        settings: Callable[[], AgentSettings],
        uplink: Callable[[], Uplink | None],
        telemetry: Callable[[], Telemetry | None],
        rotate_key: Callable[[], Awaitable[str]],
    ) -> None:
        self._state = state
        self._log = log
        self._spool = spool
        self._status = status
        self._tools = tools
        # Programs a policy names are looked up on the PATH the daemon started with.
        self._host_paths = host_paths
        self._settings = settings
        self._uplink = uplink
        self._telemetry = telemetry
        self._rotate_key = rotate_key
        self.running: dict[str, Running] = {}
        self.children: dict[int, hs.ChildProcess] = {}

    def __len__(self) -> int:
        return len(self.running)

    # ------------------------------------------------------------------ process groups

    def add(self, pgid: int, command_id: str) -> None:
        self.children[pgid] = hs.ChildProcess(
            pgid=pgid, command_id=command_id, started_at=time.time(), daemon_pid=os.getpid()
        )
        self._state.write_children(self.children.values())

    def remove(self, pgid: int) -> None:
        if self.children.pop(pgid, None) is not None:
            self._state.write_children(self.children.values())

    def kill_orphans(self) -> None:
        """Kill process groups a crashed daemon left behind (we hold the lock: it is dead)."""
        for child in self._state.load_children():
            if child.daemon_pid == os.getpid():
                continue
            if not _is_our_child(child):
                continue
            if kill_process_group(child.pgid, signal.SIGKILL):
                self._log.warning(
                    "orphan_killed",
                    command_id=child.command_id,
                    pgid=child.pgid,
                    daemon_pid=child.daemon_pid,
                )
        self._state.write_children([])

    # ------------------------------------------------------------------ calls

    def start(self, inv: stream_pb2.CommandInvocation) -> None:
        cid = inv.command_id
        self._log.info(
            "command_received",
            command_id=cid,
            tool=inv.tool,
            fleet_command_id=inv.fleet_command_id or None,
        )
        fate = rules.arrival(running=cid in self.running, finished=cid in self._spool)
        if fate is rules.Arrival.RUNNING:
            return
        if fate is rules.Arrival.RESEND:
            spooled, uplink = self._spool.get(cid), self._uplink()
            if spooled is not None and uplink is not None:
                with contextlib.suppress(ProtocolError):
                    uplink.send_result(spooled)
            return
        settings = self._settings()
        try:
            args = tools_spec.parse_args_json(inv.tool, inv.args_json)
        except tools_spec.ToolArgumentError as err:
            self._finish_now(inv, stream_pb2.ERROR_KIND_BAD_ARGUMENTS, str(err))
            return
        decision = settings.policy.evaluate(inv.tool, args, paths=self._host_paths)
        if not decision.allowed:
            self._log.warning(
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
        tool = self._tools.get(inv.tool)
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
        uplink = self._uplink()
        bound = rules.concurrency_bound(
            settings.max_concurrent, uplink.max_concurrent_commands if uplink is not None else 0
        )
        if len(self.running) >= bound:
            self._finish_now(
                inv,
                stream_pb2.ERROR_KIND_BUSY,
                f"{len(self.running)} commands already running (tools.max_concurrent={bound})",
            )
            return
        timeout = rules.command_timeout(
            inv.tool,
            invocation_secs=inv.timeout_secs,
            argument_secs=spec.timeout if isinstance(spec, tools_spec.CmdRunArgs) else None,
            default_cmd_run_secs=settings.default_timeout_secs,
        )
        run_args: dict[str, Any] = dict(args)
        if decision.plan is not None:
            run_args["_plan"] = decision.plan
            run_args["_env"] = child_environment(
                os.environ, decision.plan.env, extra={CHILD_MARKER_ENV: cid}
            )
        running = Running(invocation=inv)
        self.running[cid] = running
        running.task = asyncio.create_task(self._run_tool(tool, run_args, inv, running))
        running.task.add_done_callback(lambda task: self._task_done(task, inv, running))
        if timeout is not None:
            running.timer = asyncio.get_running_loop().call_later(
                timeout, self._expire, cid, timeout
            )

    def cancel(self, command_id: str, reason: str) -> None:
        """The relay cancelled a call; one that already finished has nothing to stop."""
        running = self.running.get(command_id)
        if running is not None and running.task is not None:
            running.cancel_reason = rules.StopReason.CANCEL
            self._log.info("command_cancel", command_id=command_id, reason=reason)
            running.task.cancel()

    async def shutdown(self) -> None:
        for running in list(self.running.values()):
            running.cancel_reason = running.cancel_reason or rules.StopReason.SHUTDOWN
            if running.task is not None:
                running.task.cancel()
        tasks = [r.task for r in self.running.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=SHUTDOWN_WAIT_SECS)

    def _expire(self, cid: str, timeout: float) -> None:
        running = self.running.get(cid)
        if running is not None and running.task is not None and not running.task.done():
            running.cancel_reason = rules.StopReason.TIMEOUT
            self._log.info("command_timeout", command_id=cid, timeout_secs=timeout)
            running.task.cancel()

    def _task_done(
        self, task: asyncio.Task[None], inv: stream_pb2.CommandInvocation, running: Running
    ) -> None:
        """A task cancelled before it ever ran still owes the relay a result."""
        if not task.cancelled() or self.running.get(inv.command_id) is not running:
            return
        if running.timer is not None:
            running.timer.cancel()
        self.running.pop(inv.command_id, None)
        kind, message = rules.stopped_outcome(running.cancel_reason, started=False)
        self._finish_now(inv, kind, message)

    async def _run_tool(
        self,
        tool: Tool,
        args: dict[str, Any],
        inv: stream_pb2.CommandInvocation,
        running: Running,
    ) -> None:
        cid = inv.command_id
        started = time.time()
        ctx = ToolContext(
            command_id=cid,
            fleet_command_id=inv.fleet_command_id,
            capture=tools_spec.OutputCapture(cap=self._settings().output_cap_bytes),
            emit=self._emit_output(cid),
            processes=self,
            rotate_key=self._rotate_key,
        )
        kind: stream_pb2.ErrorKind.ValueType = stream_pb2.ERROR_KIND_OK
        message = ""
        exit_code: int | None = None
        result_json = ""
        telemetry = self._telemetry()
        span_cm = telemetry.tool_span(inv) if telemetry else contextlib.nullcontext()
        try:
            with span_cm as span:
                try:
                    res = await tool.run(args, ctx)
                    kind, message = res.kind, res.message
                    exit_code, result_json = res.exit_code, res.result_json
                except asyncio.CancelledError:
                    kind, message = rules.stopped_outcome(running.cancel_reason, started=True)
                except tools_spec.ToolArgumentError as err:
                    kind, message = stream_pb2.ERROR_KIND_BAD_ARGUMENTS, str(err)
                except Exception as err:
                    kind = stream_pb2.ERROR_KIND_INTERNAL
                    message = f"{type(err).__name__}: {err}"
                    self._log.error("tool_crashed", command_id=cid, tool=inv.tool, error=message)
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

    def _emit_output(self, command_id: str) -> Callable[[str, bytes], None]:
        seq = 0

        def emit(stream: str, data: bytes) -> None:
            nonlocal seq
            uplink = self._uplink()
            if uplink is None:
                return
            try:
                uplink.send_output(command_id, seq, stream, data)
            except ProtocolError:
                return
            seq += 1

        return emit

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
        self._spool.keep(result)
        self._log.info(
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
        uplink = self._uplink()
        if uplink is not None:
            try:
                uplink.send_result(result)
            except ProtocolError as err:
                self._log.warning("result_not_sent", command_id=result.command_id, error=str(err))
        self._status.set()
