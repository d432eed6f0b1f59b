"""Built-in tools: argument validation and result shaping, as pure functions.

A daemon receives a tool call as a tool name and a JSON object of arguments
(``CommandInvocation.args_json``). Before anything runs, the daemon

1. parses and validates the arguments here (:func:`validate_args`): a bad call answers
   ``BAD_ARGUMENTS`` and runs nothing. A built-in tool's arguments must also satisfy its
   JSON Schema (:func:`tool_schema`), the published contract (docs/tools.md); the relay
   runs the same check when a fleet run starts, so bad arguments never reach a daemon;
2. asks the host's policy whether the call may run (``aegis_edge_core.policy``);
3. runs it, feeding output into an :class:`OutputCapture`, which decides what is
   streamed back and keeps the capped tails for the final result;
4. shapes the answer with :func:`build_result`, which maps the typed
   :class:`~aegis_edge_core.wire.stream_pb2.ErrorKind` to the fleet-level
   :class:`~aegis_edge_core.wire.common_pb2.TargetOutcome`.

Nothing here spawns a process or reads the host: the agent does that and passes facts in.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs

from aegis_edge_core.errors import AegisError
from aegis_edge_core.wire import common_pb2, stream_pb2

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator

__all__ = [
    "ARCH_ALIASES",
    "BUILTIN_TOOLS",
    "CMD_RUN",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_OUTPUT_CAP",
    "EDGE_PING",
    "KEYS_ROTATE",
    "SYS_INFO",
    "CmdRunArgs",
    "OutputCapture",
    "ToolArgumentError",
    "build_result",
    "capabilities",
    "effective_timeout",
    "normalize_arch",
    "normalize_os",
    "outcome_for",
    "own_timeout",
    "parse_args_json",
    "sys_info_json",
    "tool_schema",
    "validate_args",
    "validate_result",
]

CMD_RUN: Final = "cmd.run"
SYS_INFO: Final = "sys.info"
EDGE_PING: Final = "edge.ping"
KEYS_ROTATE: Final = "keys.rotate"
BUILTIN_TOOLS: Final[tuple[str, ...]] = (CMD_RUN, SYS_INFO, EDGE_PING, KEYS_ROTATE)

DEFAULT_OUTPUT_CAP: Final = 1024 * 1024
"""Bytes of output per stream (stdout, stderr) streamed back and kept as tail by default."""
DEFAULT_CHUNK_BYTES: Final = 32 * 1024
"""Largest output chunk per CommandOutput frame."""
MAX_ARGS_JSON: Final = 256 * 1024


class ToolArgumentError(AegisError):
    """A tool call's arguments are invalid; ``field`` names the argument."""

    def __init__(self, message: str, *, tool: str, field: str = "", hint: str = "") -> None:
        where = f"{tool}.{field}" if field else tool
        super().__init__(f"{where}: {message}", hint=hint)
        self.tool = tool
        self.field = field


def parse_args_json(tool: str, text: str) -> dict[str, Any]:
    """Parse ``args_json``: empty means ``{}``; anything but a JSON object is refused."""
    if not text.strip():
        return {}
    if len(text) > MAX_ARGS_JSON:
        raise ToolArgumentError(f"arguments exceed {MAX_ARGS_JSON} bytes", tool=tool)
    try:
        value = json.loads(text)
    except ValueError as err:
        raise ToolArgumentError(f"arguments are not valid JSON ({err})", tool=tool) from None
    if not isinstance(value, dict):
        raise ToolArgumentError("arguments must be a JSON object", tool=tool)
    return value


def _no_unknown(tool: str, args: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        known = ", ".join(allowed) if allowed else "none"
        raise ToolArgumentError(
            f"unknown argument(s) {', '.join(unknown)}", tool=tool, hint=f"known: {known}"
        )


def _parse_timeout(tool: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        scale = 1.0
        for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
            if text.endswith(suffix):
                text, scale = text[: -len(suffix)], factor
                break
        try:
            value = float(text) * scale
        except ValueError:
            raise ToolArgumentError(
                f"timeout {value!r} is not a duration",
                tool=tool,
                field="timeout",
                hint="seconds as a number, or e.g. '30s', '5m'",
            ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ToolArgumentError("timeout must be a number of seconds", tool=tool, field="timeout")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ToolArgumentError("timeout must be a positive number", tool=tool, field="timeout")
    return seconds


@attrs.frozen(kw_only=True)
class CmdRunArgs:
    """``cmd.run``: exactly one of ``cmd`` (run by ``/bin/sh -c``) or ``argv`` (no shell)."""

    cmd: str | None = None
    argv: tuple[str, ...] | None = None
    cwd: str | None = None
    timeout: float | None = None
    env: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def command_line(self) -> tuple[str, ...]:
        """The call as written: ``/bin/sh -c <cmd>`` or ``argv`` itself. The daemon does not
        exec this but the host policy's :class:`~aegis_edge_core.policy.ExecPlan`."""
        if self.argv is not None:
            return self.argv
        assert self.cmd is not None
        return ("/bin/sh", "-c", self.cmd)

    @property
    def display(self) -> str:
        """The shell string or argv joined, for a person reading the call. The host policy
        matches resolved programs instead, and its denials never repeat this text."""
        if self.cmd is not None:
            return self.cmd
        assert self.argv is not None
        return " ".join(self.argv)


def _validate_cmd_run(args: Mapping[str, Any]) -> CmdRunArgs:
    tool = CMD_RUN
    _no_unknown(tool, args, ("cmd", "argv", "cwd", "timeout", "env"))
    cmd, argv = args.get("cmd"), args.get("argv")
    if (cmd is None) == (argv is None):
        raise ToolArgumentError(
            "give exactly one of 'cmd' (a shell string) or 'argv' (a list)", tool=tool
        )
    parsed_argv: tuple[str, ...] | None = None
    if cmd is not None:
        if not isinstance(cmd, str) or not cmd.strip():
            raise ToolArgumentError("must be a non-empty string", tool=tool, field="cmd")
        if "\x00" in cmd:
            raise ToolArgumentError("must not contain NUL bytes", tool=tool, field="cmd")
    else:
        if (
            not isinstance(argv, list)
            or not argv
            or not all(isinstance(a, str) and "\x00" not in a for a in argv)
        ):
            raise ToolArgumentError("must be a non-empty list of strings", tool=tool, field="argv")
        if not argv[0]:
            raise ToolArgumentError("argv[0] must name a program", tool=tool, field="argv")
        parsed_argv = tuple(argv)
    cwd = args.get("cwd")
    if cwd is not None and (not isinstance(cwd, str) or not cwd or "\x00" in cwd):
        raise ToolArgumentError("must be a non-empty path", tool=tool, field="cwd")
    env = args.get("env", {})
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in env.items()
    ):
        raise ToolArgumentError("must be an object of string to string", tool=tool, field="env")
    return CmdRunArgs(
        cmd=cmd,
        argv=parsed_argv,
        cwd=cwd,
        timeout=_parse_timeout(tool, args.get("timeout")),
        env=dict(env),
    )


# --------------------------------------------------------------------------- contracts

SchemaPart = Literal["args", "result"]


@functools.cache
def _schema_validator(tool: str, part: SchemaPart) -> Draft202012Validator | None:
    if tool not in BUILTIN_TOOLS:
        return None
    # Imported on first use: jsonschema is most of this module's import time, and neither
    # it nor importlib.resources is needed by the CLI or by a daemon that has run no tool.
    import importlib.resources

    import jsonschema

    # Package data shipped beside this module, read once like the code itself: not the
    # outside-world I/O the sans-I/O rule keeps out of the core.
    text = (
        importlib.resources.files("aegis_edge_core.tool_schemas")
        .joinpath(f"{tool}.{part}.json")
        .read_text(encoding="utf-8")
    )
    schema = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def tool_schema(tool: str, part: SchemaPart) -> Mapping[str, Any] | None:
    """The JSON Schema (draft 2020-12) of a built-in tool's arguments (``args_json``) or
    result (``result_json``); None for a tool that is not built in (plug-ins have none)."""
    validator = _schema_validator(tool, part)
    if validator is None:
        return None
    schema = validator.schema
    assert isinstance(schema, Mapping)  # every shipped schema is an object
    return schema


def _schema_error(tool: str, part: SchemaPart, value: Any) -> ToolArgumentError | None:
    validator = _schema_validator(tool, part)
    if validator is None:
        return None
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(value))
    if error is None:
        return None
    field = ".".join(str(p) for p in error.absolute_path)
    # The rule's name, not jsonschema's sentence: that one quotes the value, and an
    # argument may be a secret one.
    return ToolArgumentError(
        f"fails the {part} schema's {error.validator!r} rule",
        tool=tool,
        field=field,
        hint=f"see {tool}.{part}.json in docs/tools.md",
    )


def validate_result(tool: str, result_json: str) -> None:
    """Check a built-in tool's ``result_json`` (empty reads as ``{}``) against its result
    schema; raises :class:`ToolArgumentError`. Other tools' results are not checked."""
    if _schema_validator(tool, "result") is None:
        return
    try:
        value = json.loads(result_json) if result_json.strip() else {}
    except ValueError as err:
        raise ToolArgumentError(f"result is not valid JSON ({err})", tool=tool) from None
    error = _schema_error(tool, "result", value)
    if error is not None:
        raise error


def validate_args(tool: str, args: Mapping[str, Any]) -> object:
    """Validate a built-in tool's arguments; returns its typed form.

    ``cmd.run`` gives :class:`CmdRunArgs`; ``edge.ping`` gives its optional ``echo``
    string; ``sys.info`` and ``keys.rotate`` take no arguments and give None. A tool that
    is not built in is not validated here (plugins validate their own arguments) and its
    arguments come back unchanged.

    The checks below speak the host owner's language; the tool's JSON Schema is checked
    after them, so that a call the published contract refuses is refused here too.
    """
    typed = _validate_typed(tool, args)
    error = _schema_error(tool, "args", dict(args))
    if error is not None:
        raise error
    return typed


def _validate_typed(tool: str, args: Mapping[str, Any]) -> object:
    if tool == CMD_RUN:
        return _validate_cmd_run(args)
    if tool == EDGE_PING:
        _no_unknown(tool, args, ("echo",))
        echo = args.get("echo", "")
        if not isinstance(echo, str) or len(echo) > 1024:
            raise ToolArgumentError(
                "must be a string of at most 1024 chars", tool=tool, field="echo"
            )
        return echo
    if tool in (SYS_INFO, KEYS_ROTATE):
        _no_unknown(tool, args, ())
        return None
    return dict(args)


def own_timeout(tool: str, args: Mapping[str, Any]) -> float | None:
    """The tool's own ``timeout`` argument in seconds, as the daemon will apply it.

    Only ``cmd.run`` takes one. A malformed value is ``None`` here: the daemon refuses
    such a call with ``bad_arguments``, so no timeout of its own ever fires.
    """
    if tool != CMD_RUN:
        return None
    try:
        return _parse_timeout(tool, args.get("timeout"))
    except ToolArgumentError:
        return None


def effective_timeout(*bounds: float | None) -> float | None:
    """The tightest of the given bounds (seconds); None and non-positive mean "no bound"."""
    live = [b for b in bounds if b is not None and b > 0 and math.isfinite(b)]
    return min(live) if live else None


# --------------------------------------------------------------------------- output


@attrs.define
class OutputCapture:
    """Decides which output is streamed and keeps the capped tail for the result.

    Up to ``cap`` bytes per stream are streamed back in chunks of at most ``chunk`` bytes;
    past the cap nothing more is streamed and the result is marked truncated, but the
    tail (the last ``cap`` bytes) keeps following the output, because the end of a failed
    command's output is what an operator wants to see.
    """

    cap: int = DEFAULT_OUTPUT_CAP
    chunk: int = DEFAULT_CHUNK_BYTES
    streamed: dict[str, int] = attrs.field(factory=lambda: {"stdout": 0, "stderr": 0})
    totals: dict[str, int] = attrs.field(factory=lambda: {"stdout": 0, "stderr": 0})
    tails: dict[str, bytearray] = attrs.field(
        factory=lambda: {"stdout": bytearray(), "stderr": bytearray()}
    )
    truncated: bool = False

    def feed(self, stream: str, data: bytes) -> list[bytes]:
        """Record ``data`` from ``stream`` ("stdout"/"stderr"); returns the chunks to send."""
        if stream not in self.tails:
            raise ValueError(f"unknown stream {stream!r}")
        self.totals[stream] += len(data)
        tail = self.tails[stream]
        tail += data
        if len(tail) > self.cap:
            del tail[: len(tail) - self.cap]
        room = max(0, self.cap - self.streamed[stream])
        send = data[:room]
        if len(send) < len(data):
            self.truncated = True
        self.streamed[stream] += len(send)
        step = max(1, self.chunk)
        return [send[i : i + step] for i in range(0, len(send), step)]

    def tail(self, stream: str) -> bytes:
        return bytes(self.tails[stream])


# --------------------------------------------------------------------------- results

_OUTCOME: Final[Mapping[int, common_pb2.TargetOutcome.ValueType]] = {
    stream_pb2.ERROR_KIND_OK: common_pb2.TARGET_OUTCOME_OK,
    stream_pb2.ERROR_KIND_EXIT_NONZERO: common_pb2.TARGET_OUTCOME_ERROR,
    stream_pb2.ERROR_KIND_TIMEOUT: common_pb2.TARGET_OUTCOME_TIMEOUT,
    stream_pb2.ERROR_KIND_CANCELLED: common_pb2.TARGET_OUTCOME_CANCELLED,
    stream_pb2.ERROR_KIND_DENIED: common_pb2.TARGET_OUTCOME_DENIED,
}


def outcome_for(kind: stream_pb2.ErrorKind.ValueType) -> common_pb2.TargetOutcome.ValueType:
    """The fleet-level outcome of a typed error kind (everything unlisted is ``error``)."""
    return _OUTCOME.get(kind, common_pb2.TARGET_OUTCOME_ERROR)


def build_result(
    command_id: str,
    kind: stream_pb2.ErrorKind.ValueType,
    *,
    started_at: float,
    finished_at: float,
    message: str = "",
    exit_code: int | None = None,
    capture: OutputCapture | None = None,
    result_json: str = "",
) -> stream_pb2.CommandResult:
    """Shape a tool call's ``CommandResult``."""
    result = stream_pb2.CommandResult(
        command_id=command_id,
        outcome=outcome_for(kind),
        error_kind=kind,
        error_message=message,
        started_at=started_at,
        finished_at=finished_at,
        result_json=result_json,
    )
    if exit_code is not None:
        result.exit_code = exit_code
        result.has_exit_code = True
    if capture is not None:
        result.stdout_tail = capture.tail("stdout")
        result.stderr_tail = capture.tail("stderr")
        result.output_truncated = capture.truncated
    return result


# --------------------------------------------------------------------------- host facts

ARCH_ALIASES: Final[Mapping[str, str]] = {
    "amd64": "x86_64",
    "x64": "x86_64",
    "x86-64": "x86_64",
    "arm64": "aarch64",
    "armv8": "aarch64",
    "i686": "x86",
    "i386": "x86",
}
"""Other spellings of an architecture (``platform.machine()`` differs by OS), each mapped to
the one ``Capabilities.arch`` carries; docs/protocol.md §9.2 lists them."""


def normalize_arch(machine: str) -> str:
    """``platform.machine()`` spelled the way selectors spell it (``x86_64``, ``aarch64``)."""
    m = machine.strip().lower()
    return ARCH_ALIASES.get(m, m or "unknown")


def normalize_os(system: str) -> str:
    """``platform.system()`` lower-cased: ``linux``, ``darwin``, ``windows``."""
    return system.strip().lower() or "unknown"


def capabilities(
    *,
    os: str,
    arch: str,
    tools: Sequence[str],
    labels: Mapping[str, str],
    hostname: str,
    agent_version: str,
) -> common_pb2.Capabilities:
    """The capability snapshot sent at hello and on change (tools sorted, no tags)."""
    caps = common_pb2.Capabilities(
        os=normalize_os(os),
        arch=normalize_arch(arch),
        tools=sorted(set(tools)),
        hostname=hostname,
        agent_version=agent_version,
    )
    caps.labels.update(dict(labels))
    return caps


def sys_info_json(
    *,
    os: str,
    arch: str,
    hostname: str,
    python: str,
    uptime_secs: float | None,
    load: Sequence[float] | None,
    agent_version: str,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """The ``result_json`` of ``sys.info``."""
    body: dict[str, Any] = {
        "os": normalize_os(os),
        "arch": normalize_arch(arch),
        "hostname": hostname,
        "python": python,
        "uptime_secs": None if uptime_secs is None else round(uptime_secs, 3),
        "load": None if load is None else [round(x, 3) for x in load],
        "agent_version": agent_version,
    }
    if extra:
        body.update(extra)
    return json.dumps(body, sort_keys=True)
