"""Tools the daemon runs: the built-ins and the ``aegis_edge.tools`` plugin group.

A tool is any object with a ``name`` and an ``async run(args, context)`` (:class:`Tool`).
It returns a :class:`ToolResult`; output goes through ``context.emit`` while it runs.
Cancellation (relay cancel, deadline, daemon shutdown) arrives as ``asyncio.CancelledError``
in ``run``: a tool that started processes must kill them and re-raise.

Argument validation and result shaping are the core's (:mod:`aegis_edge_core.tools_spec`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import signal
import socket
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import attrs

from aegis_edge_cli.entrypoints import entry_points
from aegis_edge_core import __version__, policy, tools_spec
from aegis_edge_core.wire import stream_pb2

__all__ = [
    "BUILTIN",
    "DaemonPaths",
    "ProcessRegistry",
    "Tool",
    "ToolContext",
    "ToolResult",
    "kill_process_group",
    "load_plugins",
]

KILL_GRACE_SECS = 2.0


@attrs.frozen(kw_only=True)
class ToolResult:
    kind: stream_pb2.ErrorKind.ValueType = stream_pb2.ERROR_KIND_OK
    message: str = ""
    exit_code: int | None = None
    result_json: str = ""


class ProcessRegistry(Protocol):
    """Where a tool records the process groups it starts (the daemon's pid spool)."""

    def add(self, pgid: int, command_id: str) -> None: ...

    def remove(self, pgid: int) -> None: ...


class _NullRegistry:
    def add(self, pgid: int, command_id: str) -> None:
        pass

    def remove(self, pgid: int) -> None:
        pass


@attrs.define(kw_only=True)
class ToolContext:
    """What a running tool may use; the daemon fills it in per call."""

    command_id: str
    fleet_command_id: str = ""
    capture: tools_spec.OutputCapture = attrs.field(factory=tools_spec.OutputCapture)
    emit: Callable[[str, bytes], None] = lambda stream, data: None
    """Send an output chunk ("stdout"/"stderr") back; a no-op while disconnected."""
    processes: ProcessRegistry = attrs.field(factory=_NullRegistry)
    rotate_key: Callable[[], Awaitable[str]] | None = None
    """Rotate the node key over the live stream; returns the new key thumbprint."""
    kill_grace_secs: float = KILL_GRACE_SECS

    def output(self, stream: str, data: bytes) -> None:
        for chunk in self.capture.feed(stream, data):
            self.emit(stream, chunk)


@runtime_checkable
class Tool(Protocol):
    """A daemon tool: built in, or contributed through the ``aegis_edge.tools`` group."""

    name: str

    async def run(self, args: Mapping[str, Any], context: ToolContext) -> ToolResult: ...


# --------------------------------------------------------------------------- processes


def kill_process_group(pgid: int, sig: int = signal.SIGTERM) -> bool:
    """Signal a process group; False if it no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


async def _terminate(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not gone within ``grace``."""
    pgid = proc.pid
    kill_process_group(pgid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), timeout=grace)
    # Children that ignored SIGTERM (or outlived the shell) go now.
    kill_process_group(pgid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), timeout=grace)


def _daemon_path() -> str:
    return os.environ.get("PATH", os.defpath)


def _absolute_entries(search_path: str) -> str:
    return os.pathsep.join(d for d in search_path.split(os.pathsep) if os.path.isabs(d))


@attrs.frozen
class DaemonPaths:
    """The policy's :class:`~aegis_edge_core.policy.HostPaths`, answered from this host's disk.

    Bare names are looked up on the daemon's own ``PATH`` (``search_path``; relative entries
    are skipped, so the daemon's working directory never decides), never on a caller's.
    """

    search_path: str = attrs.field(factory=_daemon_path, converter=_absolute_entries)

    def program(self, word: str) -> str | None:
        if "/" in word:
            if not os.path.isabs(word):
                return None
            found: str | None = word
        else:
            found = shutil.which(word, path=self.search_path)
        if found is None:
            return None
        real = os.path.realpath(found)
        try:
            mode = os.stat(real).st_mode
        except OSError:
            return None
        return real if stat.S_ISREG(mode) and os.access(real, os.X_OK) else None

    def directory(self, path: str) -> str | None:
        if not os.path.isabs(path):
            return None
        real = os.path.realpath(path)
        return real if os.path.isdir(real) else None


class CmdRun:
    """Runs the :class:`~aegis_edge_core.policy.ExecPlan` the host policy answered with.

    The daemon passes it as ``args["_plan"]`` and the child's whole environment as
    ``args["_env"]``; nothing is looked up again here, so what runs is what the policy matched.
    """

    name = tools_spec.CMD_RUN

    async def run(self, args: Mapping[str, Any], context: ToolContext) -> ToolResult:
        plan = args.get("_plan")
        if not isinstance(plan, policy.ExecPlan):
            return ToolResult(
                kind=stream_pb2.ERROR_KIND_INTERNAL,
                message="cmd.run runs only what the host policy decided (no plan was given)",
            )
        env = args.get("_env")
        if not isinstance(env, Mapping):
            env = policy.child_environment(os.environ, plan.env)
        spawn = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                *plan.argv,
                executable=plan.executable,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=plan.cwd,
                env=dict(env),
                start_new_session=True,
            )
        )
        try:
            # A cancel that lands while the process is being made must not reach asyncio's
            # own clean-up: it kills only the direct child and then waits for pipes that the
            # rest of the group still holds (a `sleep 60` kept the call for a minute). Let
            # the spawn finish, then end the whole group as any cancel does.
            proc = await asyncio.shield(spawn)
        except asyncio.CancelledError:
            with contextlib.suppress(OSError):
                late = await spawn
                await _terminate(late, context.kill_grace_secs)
            raise
        except FileNotFoundError:
            # The plan's program and cwd existed when the policy looked; name neither here
            # (the text of a call stays out of results), only what happened.
            return ToolResult(
                kind=stream_pb2.ERROR_KIND_INTERNAL,
                message="cannot start the command: the program or cwd no longer exists",
            )
        except OSError as err:
            return ToolResult(
                kind=stream_pb2.ERROR_KIND_INTERNAL,
                message=f"cannot start the command: {err.strerror or err}",
            )
        context.processes.add(proc.pid, context.command_id)
        try:

            async def pump(reader: asyncio.StreamReader | None, stream: str) -> None:
                if reader is None:
                    return
                while True:
                    data = await reader.read(65536)
                    if not data:
                        return
                    context.output(stream, data)

            try:
                await asyncio.gather(pump(proc.stdout, "stdout"), pump(proc.stderr, "stderr"))
                code = await proc.wait()
            except asyncio.CancelledError:
                await asyncio.shield(_terminate(proc, context.kill_grace_secs))
                raise
            # The shell is gone but a background child may hold the group: clean it up.
            kill_process_group(proc.pid, signal.SIGKILL)
        finally:
            context.processes.remove(proc.pid)
        if code == 0:
            return ToolResult(exit_code=0)
        if code < 0:
            return ToolResult(
                kind=stream_pb2.ERROR_KIND_EXIT_NONZERO,
                exit_code=128 - code,
                message=f"killed by signal {-code}",
            )
        return ToolResult(
            kind=stream_pb2.ERROR_KIND_EXIT_NONZERO,
            exit_code=code,
            message=f"exited with status {code}",
        )


def _uptime() -> float | None:
    try:
        with open("/proc/uptime", encoding="ascii") as fh:
            return float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _load() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
        return None


ENV_HOSTNAME = "AEGIS_HOSTNAME"


def reported_hostname() -> str:
    """The host name this daemon reports: the machine's, unless ``AEGIS_HOSTNAME`` names
    another -- for several daemons on one machine (containers, ``aegis relay demo``)."""
    return os.environ.get(ENV_HOSTNAME, "").strip() or socket.gethostname()


class SysInfo:
    name = tools_spec.SYS_INFO

    async def run(self, args: Mapping[str, Any], context: ToolContext) -> ToolResult:
        body = tools_spec.sys_info_json(
            os=platform.system(),
            arch=platform.machine(),
            hostname=reported_hostname(),
            python=platform.python_version(),
            uptime_secs=_uptime(),
            load=_load(),
            agent_version=__version__,
            extra={"cpu_count": os.cpu_count(), "kernel": platform.release()},
        )
        return ToolResult(result_json=body)


class EdgePing:
    name = tools_spec.EDGE_PING

    async def run(self, args: Mapping[str, Any], context: ToolContext) -> ToolResult:
        import json

        echo = args.get("echo", "")
        return ToolResult(result_json=json.dumps({"pong": True, "echo": echo, "t": time.time()}))


class KeysRotate:
    name = tools_spec.KEYS_ROTATE

    async def run(self, args: Mapping[str, Any], context: ToolContext) -> ToolResult:
        import json

        if context.rotate_key is None:
            return ToolResult(
                kind=stream_pb2.ERROR_KIND_INTERNAL, message="key rotation needs a live stream"
            )
        thumbprint = await context.rotate_key()
        return ToolResult(result_json=json.dumps({"key_thumbprint": thumbprint}))


BUILTIN: Mapping[str, Tool] = {t.name: t for t in (CmdRun(), SysInfo(), EdgePing(), KeysRotate())}


def load_plugins(log: Callable[[str, str], None] | None = None) -> dict[str, Tool]:
    """Tools from the ``aegis_edge.tools`` entry-point group; broken plugins are skipped.

    An entry point may name a Tool instance, a class (instantiated without arguments) or a
    factory function returning a Tool.
    """
    found: dict[str, Tool] = {}
    for ep in entry_points(group="aegis_edge.tools"):
        try:
            obj: Any = ep.load()
            if isinstance(obj, type) or (callable(obj) and not isinstance(obj, Tool)):
                obj = obj()
            if not isinstance(obj, Tool) or not isinstance(obj.name, str):
                raise TypeError("not a Tool (needs name and async run(args, context))")
            if obj.name in BUILTIN:
                raise ValueError(f"{obj.name!r} is a built-in tool name")
        except Exception as err:  # a broken plugin must not stop the daemon
            if log is not None:
                log(ep.name, f"{type(err).__name__}: {err}")
            continue
        found[obj.name] = obj
    return found


def python_version() -> str:
    return sys.version.split()[0]
