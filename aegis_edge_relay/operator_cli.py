"""The operator-side ``aegis edge`` commands: gRPC clients of the relay's Admin service.

``register(tree)`` adds ``ls``, ``show``, ``tag add|rm``, ``keys revoke-remote``,
``tenants delete``, ``tokens issue``, the ``fleet`` group (``preview``, ``run``,
``runs``, ``show``, ``watch``, ``rerun``, ``cancel``, ``keys rotate``) and the ``groups``
group (``create``, ``ls``, ``show``, ``rm``) to the ``aegis`` command tree.

Every command finds the relay through ``--relay HOST:PORT``, ``--ca-cert PATH`` and
``--token TOKEN|@FILE`` or the environment (``AEGIS_RELAY``, ``AEGIS_CA_CERT``,
``AEGIS_OPERATOR_TOKEN``), speaks TLS with the CA as its only root and sends the operator
token as ``authorization: Bearer <token>`` metadata. A failure is one line on stderr and a
non-zero exit (the CLI root prints :class:`~aegis_edge_cli.CliError`).

The module is split in two: pure functions that turn proto messages into JSON values, table
rows and relative times (tests call them without a server), and the command handlers that
open a channel, make one call and print.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TextIO

from aegis_edge_cli import CliError, CommandTree, add_output_flag, print_json, print_table
from aegis_edge_core.errors import AegisError
from aegis_edge_core.fleet.errors import FleetSpecError, SelectorError
from aegis_edge_core.fleet.groups import GroupError, check_group_name, check_group_selector
from aegis_edge_core.fleet.output import LineAssembler, dropped_marker
from aegis_edge_core.fleet.rerun import parse_rerun_scope, redact_args
from aegis_edge_core.fleet.selector import parse_selector
from aegis_edge_core.fleet.spec import parse_duration, parse_mode, parse_on_error
from aegis_edge_core.identity.tokens import check_tenant_id
from aegis_edge_core.wire import admin_pb2, common_pb2

if TYPE_CHECKING:
    import grpc

    from aegis_edge_core.wire.admin_pb2_grpc import AdminStub

__all__ = [
    "ENV_CA_CERT",
    "ENV_RELAY",
    "ENV_RELAY_DATA_DIR",
    "ENV_TLS_SERVER_NAME",
    "ENV_TOKEN",
    "Connection",
    "build_fleet_spec",
    "command_record_to_dict",
    "fleet_preview_to_dict",
    "fleet_run_summary",
    "fleet_run_to_dict",
    "format_duration",
    "group_to_dict",
    "host_row",
    "host_to_dict",
    "iso_time",
    "parse_arg_pairs",
    "parse_duration_secs",
    "parse_secret_args",
    "register",
    "relative_time",
    "resolve_connection",
    "rpc_error_message",
    "run_outcome_name",
    "skipped_to_dict",
    "status_name",
    "target_outcome_name",
    "target_result_to_dict",
]

ENV_RELAY: Final = "AEGIS_RELAY"
ENV_CA_CERT: Final = "AEGIS_CA_CERT"
ENV_TOKEN: Final = "AEGIS_OPERATOR_TOKEN"  # noqa: S105 -- a variable name, not a secret
ENV_TLS_SERVER_NAME: Final = "AEGIS_TLS_SERVER_NAME"
ENV_RELAY_DATA_DIR: Final = "AEGIS_RELAY_DATA_DIR"

UNARY_TIMEOUT_SECS: Final = 30.0
"""How long a unary admin call may take before the CLI gives up."""

DEFAULT_HISTORY: Final = 20
"""How many recent tool calls ``edge show`` asks for."""

HOST_COLUMNS: Final = (
    "NODE",
    "HOSTNAME",
    "TENANT",
    "STATUS",
    "LAST HEARTBEAT",
    "OS/ARCH",
    "TAGS",
)

# --------------------------------------------------------------------------------------------
# Enum names: the seed's strings for the wire's enums
# --------------------------------------------------------------------------------------------

_STATUS_NAMES: Final[Mapping[int, str]] = {
    common_pb2.DAEMON_STATUS_CONNECTED: "Connected",
    common_pb2.DAEMON_STATUS_UNHEALTHY: "Unhealthy",
    common_pb2.DAEMON_STATUS_DISCONNECTED: "Disconnected",
    common_pb2.DAEMON_STATUS_REVOKED: "Revoked",
}

_TARGET_OUTCOME_NAMES: Final[Mapping[int, str]] = {
    common_pb2.TARGET_OUTCOME_OK: "ok",
    common_pb2.TARGET_OUTCOME_ERROR: "error",
    common_pb2.TARGET_OUTCOME_TIMEOUT: "timeout",
    common_pb2.TARGET_OUTCOME_CANCELLED: "cancelled",
    common_pb2.TARGET_OUTCOME_DENIED: "denied",
    common_pb2.TARGET_OUTCOME_EDGE_DISCONNECTED: "edge_disconnected",
    common_pb2.TARGET_OUTCOME_NOT_STARTED: "not_started",
}

_RUN_OUTCOME_NAMES: Final[Mapping[int, str]] = {
    common_pb2.RUN_OUTCOME_RUNNING: "running",
    common_pb2.RUN_OUTCOME_COMPLETED: "completed",
    common_pb2.RUN_OUTCOME_COMPLETED_WITH_ERRORS: "completed_with_errors",
    common_pb2.RUN_OUTCOME_HALTED: "halted",
    common_pb2.RUN_OUTCOME_DEADLINE_EXCEEDED: "deadline_exceeded",
    common_pb2.RUN_OUTCOME_CANCELLED: "cancelled",
}


def status_name(status: int) -> str:
    """``DaemonStatus`` as the seed's status pill; an unknown value reads ``Unknown``."""
    return _STATUS_NAMES.get(status, "Unknown")


def target_outcome_name(outcome: int, *, dispatched: bool = False) -> str:
    """``TargetOutcome`` as its wire string.

    UNSPECIFIED (or a value too new to know) means the target has not ended yet: it reads
    ``running`` once dispatched and ``pending`` before.
    """
    name = _TARGET_OUTCOME_NAMES.get(outcome)
    if name is not None:
        return name
    return "running" if dispatched else "pending"


def run_outcome_name(outcome: int) -> str:
    """``RunOutcome`` as its wire string; UNSPECIFIED (or unknown) reads ``unknown``."""
    return _RUN_OUTCOME_NAMES.get(outcome, "unknown")


# --------------------------------------------------------------------------------------------
# Times
# --------------------------------------------------------------------------------------------


def iso_time(ts: float) -> str | None:
    """Seconds since the epoch as ISO 8601 UTC (``2025-01-02T03:04:05.678Z``); 0 is None."""
    if not ts or not math.isfinite(ts) or ts < 0:
        return None
    try:
        moment = datetime.fromtimestamp(ts, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _span(secs: float) -> str:
    secs = int(secs)
    if secs < 60:
        return f"{secs}s"
    if secs < 3600:
        return f"{secs // 60}m"
    if secs < 86400:
        return f"{secs // 3600}h"
    return f"{secs // 86400}d"


def relative_time(ts: float, now: float) -> str:
    """``12s ago``, ``3m ago``, ``2h ago``, ``4d ago``; ``never`` for 0.

    A time slightly ahead of ``now`` (clock skew between relay and operator) reads ``just
    now``; one well in the future ``in 5m``.
    """
    if not ts or not math.isfinite(ts):
        return "never"
    delta = now - ts
    if delta < 0:
        return "just now" if delta > -5 else f"in {_span(-delta)}"
    return f"{_span(delta)} ago"


def format_duration(secs: float) -> str:
    """A short duration for tables: ``850ms``, ``12.3s``, ``4m05s``, ``2h03m``."""
    if secs < 0 or not math.isfinite(secs):
        return ""
    if secs < 1:
        return f"{round(secs * 1000)}ms"
    if secs < 60:
        return f"{secs:.1f}s"
    whole = int(secs)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{(whole % 3600) // 60:02d}m"


def parse_duration_secs(text: str, *, flag: str) -> float:
    """``120s``, ``15m``, ``1h30m`` or bare seconds to a positive float (the core's grammar).

    Raises :class:`CliError` naming ``flag`` for anything else.
    """
    try:
        return parse_duration(text, field=flag.lstrip("-"))
    except FleetSpecError as err:
        raise CliError(f"{flag}: {err}") from None


# --------------------------------------------------------------------------------------------
# Proto -> JSON values and table rows
# --------------------------------------------------------------------------------------------


def capabilities_to_dict(caps: common_pb2.Capabilities) -> dict[str, Any]:
    return {
        "os": caps.os,
        "arch": caps.arch,
        "tools": sorted(caps.tools),
        "labels": dict(sorted(caps.labels.items())),
        "tags": sorted(caps.tags),
        "hostname": caps.hostname,
        "agent_version": caps.agent_version,
    }


def result_value(result_json: str) -> Any:
    """A tool's ``result_json`` as a JSON value for ``--output json`` (``None`` when there
    is none); a result that is not valid JSON is kept as its string."""
    if not result_json:
        return None
    try:
        return json.loads(result_json)
    except ValueError:
        return result_json


def compact_result(result_json: str, width: int | None = None) -> str:
    """A tool's result as one line of compact JSON, cut to ``width`` with an ellipsis."""
    value = result_value(result_json)
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    text = " ".join(text.split()) if isinstance(value, str) else text
    if width is not None and len(text) > width:
        return text[: width - 1] + "…"
    return text


RESULT_WIDTH: Final = 40
"""Characters of a tool's result shown in a table cell; JSON output has it whole."""


def command_record_to_dict(rec: admin_pb2.CommandRecord) -> dict[str, Any]:
    return {
        "command_id": rec.command_id,
        "fleet_command_id": rec.fleet_command_id or None,
        "tool": rec.tool,
        "outcome": target_outcome_name(rec.outcome, dispatched=rec.dispatched_at > 0),
        "exit_code": rec.exit_code if rec.has_exit_code else None,
        "dispatched_at": iso_time(rec.dispatched_at),
        "finished_at": iso_time(rec.finished_at),
        "error_message": rec.error_message or None,
        "result": result_value(rec.result_json),
    }


def host_to_dict(host: admin_pb2.Host, *, with_history: bool = False) -> dict[str, Any]:
    """One host as ``ls --output json`` and ``show --output json`` print it."""
    out: dict[str, Any] = {
        "node_id": host.node_id,
        "tenant_id": host.tenant_id,
        "status": status_name(host.status),
        "last_heartbeat_at": iso_time(host.last_heartbeat_at),
        "enrolled_at": iso_time(host.enrolled_at),
        "connected_since": iso_time(host.connected_since),
        "capabilities": capabilities_to_dict(host.capabilities),
        "key_thumbprint": host.key_thumbprint or None,
        "revoked_reason": host.revoked_reason or None,
    }
    if with_history:
        out["history"] = [command_record_to_dict(rec) for rec in host.history]
    return out


def last_heard(host: admin_pb2.Host, now: float) -> str:
    """LAST HEARTBEAT: when the host last heartbeat, or, for a stream that has attested
    but not heartbeat yet, when it attested -- not ``never`` for a host that is there."""
    live = host.status in (common_pb2.DAEMON_STATUS_CONNECTED, common_pb2.DAEMON_STATUS_UNHEALTHY)
    if not host.last_heartbeat_at and live and host.connected_since:
        return f"attested {relative_time(host.connected_since, now)}"
    return relative_time(host.last_heartbeat_at, now)


def host_row(host: admin_pb2.Host, now: float) -> list[str]:
    """A row under :data:`HOST_COLUMNS`."""
    caps = host.capabilities
    os_arch = "/".join(part for part in (caps.os, caps.arch) if part) or "-"
    return [
        host.node_id,
        caps.hostname or "-",
        host.tenant_id,
        status_name(host.status),
        last_heard(host, now),
        os_arch,
        ",".join(sorted(caps.tags)) or "-",
    ]


def _tail(data: bytes) -> str | None:
    return data.decode("utf-8", errors="replace") if data else None


def target_result_to_dict(res: admin_pb2.TargetResult) -> dict[str, Any]:
    return {
        "node_id": res.node_id,
        "tenant_id": res.tenant_id or None,
        "command_id": res.command_id or None,
        "outcome": target_outcome_name(res.outcome, dispatched=res.dispatched_at > 0),
        "exit_code": res.exit_code if res.has_exit_code else None,
        "error_message": res.error_message or None,
        "skip_reason": res.skip_reason or None,
        "ended_by": res.ended_by or None,
        "dispatched_at": iso_time(res.dispatched_at),
        "finished_at": iso_time(res.finished_at),
        "duration_secs": (
            round(res.finished_at - res.dispatched_at, 6)
            if res.dispatched_at and res.finished_at
            else None
        ),
        "stdout_tail": _tail(res.stdout_tail),
        "stderr_tail": _tail(res.stderr_tail),
        "result": result_value(res.result_json),
    }


def skipped_to_dict(skip: admin_pb2.SkippedTarget) -> dict[str, Any]:
    return {"node_id": skip.node_id, "reason": skip.reason}


def _spec_to_dict(spec: admin_pb2.FleetRunSpec) -> dict[str, Any]:
    try:
        args: Any = json.loads(spec.args_json) if spec.args_json else {}
    except ValueError:
        args = spec.args_json
    if isinstance(args, dict):
        args = redact_args(args, spec.secret_keys)
    return {
        "selector": spec.selector,
        "tool": spec.tool,
        "args": args,
        "secret_args": sorted(spec.secret_keys),
        "mode": spec.mode or "all",
        "on_error": spec.on_error or "continue",
        "deadline_secs": spec.deadline_secs or None,
        "canary": spec.canary or None,
        "tenant_id": spec.tenant_id or None,
    }


def fleet_run_to_dict(run: admin_pb2.FleetRun) -> dict[str, Any]:
    """A run as ``fleet run|show|runs --output json`` print it.

    ``fleet runs`` gets runs without per-target rows (``targets_omitted``): then the
    ``targets`` key is left out, never printed as an empty list, and ``counts`` comes
    from the relay.
    """
    spec = _spec_to_dict(run.spec)
    out = {
        "fleet_command_id": run.fleet_command_id,
        "outcome": run_outcome_name(run.outcome),
        "tool": spec["tool"],
        "selector": spec["selector"],
        "spec": spec,
        "created_at": iso_time(run.created_at),
        "finished_at": iso_time(run.finished_at),
        "created_by": run.created_by or None,
        "trace_id": run.trace_id or None,
        "halt_reason": run.halt_reason or None,
        "rerun_of": run.rerun_of or None,
        "targets": [target_result_to_dict(t) for t in run.targets],
        "skipped": [skipped_to_dict(s) for s in run.skipped],
        "counts": _outcome_counts(run),
    }
    if run.targets_omitted:
        del out["targets"]
    return out


def fleet_preview_to_dict(preview: admin_pb2.FleetPreview) -> dict[str, Any]:
    return {
        "selector": preview.selector,
        "matched": preview.matched,
        "targets": list(preview.targets),
        "skipped": [skipped_to_dict(s) for s in preview.skipped],
    }


def _outcome_counts(run: admin_pb2.FleetRun) -> dict[str, int]:
    if run.targets_omitted:
        return dict(sorted(run.counts.items()))
    counts: dict[str, int] = {}
    for res in run.targets:
        name = target_outcome_name(res.outcome, dispatched=res.dispatched_at > 0)
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def fleet_run_summary(run: admin_pb2.FleetRun) -> str:
    """``halted: 3 ok, 1 error, 6 not_started; 2 skipped`` -- the one-line verdict."""
    counts = _outcome_counts(run)
    parts = ", ".join(f"{n} {name}" for name, n in counts.items()) or "no targets"
    line = f"{run_outcome_name(run.outcome)}: {parts}"
    if run.skipped:
        line += f"; {len(run.skipped)} skipped"
    return line


def target_row(res: admin_pb2.TargetResult, *, with_result: bool = False) -> list[str]:
    """A row under :data:`TARGET_COLUMNS` (plus ``RESULT`` with ``with_result``)."""
    duration = ""
    if res.dispatched_at and res.finished_at:
        duration = format_duration(res.finished_at - res.dispatched_at)
    note = res.error_message or (f"skipped: {res.skip_reason}" if res.skip_reason else "")
    row = [
        res.node_id,
        target_outcome_name(res.outcome, dispatched=res.dispatched_at > 0),
        str(res.exit_code) if res.has_exit_code else "-",
        duration or "-",
        last_output_line(res),
    ]
    if with_result:
        row.append(compact_result(res.result_json, RESULT_WIDTH) or "-")
    row.append(note.splitlines()[0] if note else "")
    return row


def last_output_line(res: admin_pb2.TargetResult, width: int = 60) -> str:
    """The last line the command printed (stdout, else stderr), for a glance in a table;
    `fleet show -o json` has the whole captured tails."""
    for tail in (res.stdout_tail, res.stderr_tail):
        lines = [ln for ln in tail.decode("utf-8", "replace").splitlines() if ln.strip()]
        if lines:
            line = lines[-1].strip()
            return line if len(line) <= width else line[: width - 1] + "…"
    return ""


TARGET_COLUMNS: Final = ("NODE", "OUTCOME", "EXIT", "DURATION", "LAST OUTPUT", "ERROR")


# --------------------------------------------------------------------------------------------
# Fleet arguments
# --------------------------------------------------------------------------------------------


def parse_arg_pairs(pairs: Sequence[str], json_pairs: Sequence[str] = ()) -> dict[str, Any]:
    """``--arg k=v`` (string value, split on the first ``=`` only) and ``--arg-json k=<json>``.

    ``--arg cmd="a && b=c"`` gives ``{"cmd": "a && b=c"}``. A key given twice is an error.
    """
    out: dict[str, Any] = {}

    def put(flag: str, item: str, value_of: Callable[[str], Any]) -> None:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CliError(f"{flag} {item!r}: expected KEY=VALUE")
        if key in out:
            raise CliError(f"{flag} {item!r}: argument {key!r} given twice")
        out[key] = value_of(raw)

    def as_json(raw: str) -> Any:
        try:
            return json.loads(raw)
        except ValueError as err:
            raise CliError(f"--arg-json: value is not valid JSON ({err}): {raw!r}") from None

    for item in pairs:
        put("--arg", item, str)
    for item in json_pairs:
        put("--arg-json", item, as_json)
    return out


def validate_selector(text: str) -> None:
    """Check ``--target`` with the core's selector parser (the relay checks it again).

    The error keeps the core's column and draws a caret under it on a second line.
    """
    if not text.strip():
        raise CliError("--target: the selector is empty (write 'all' to mean every daemon)")
    try:
        parse_selector(text)
    except SelectorError as err:
        raise CliError(f"--target: {err.render()}") from None


def validate_mode(text: str) -> None:
    try:
        parse_mode(text)
    except FleetSpecError as err:
        raise CliError(f"--mode: {err}") from None


def validate_on_error(text: str) -> None:
    try:
        parse_on_error(text)
    except FleetSpecError as err:
        raise CliError(f"--on-error: {err}") from None


def build_fleet_spec(
    args: argparse.Namespace, *, tool: str | None = None
) -> admin_pb2.FleetRunSpec:
    """The ``FleetRunSpec`` for ``fleet preview|run|keys rotate``, validated locally first."""
    selector: str = args.target
    validate_selector(selector)
    tool_name = tool if tool is not None else args.tool
    if not tool_name:
        raise CliError("--tool: a tool name is required (e.g. cmd.run, sys.info, edge.ping)")
    mode: str = getattr(args, "mode", None) or "all"
    on_error: str = getattr(args, "on_error", None) or "continue"
    validate_mode(mode)
    validate_on_error(on_error)
    deadline_secs = 0.0
    deadline: str | None = getattr(args, "deadline", None)
    if deadline:
        deadline_secs = parse_duration_secs(deadline, flag="--deadline")
    tool_args: dict[str, Any] = {}
    args_json: str | None = getattr(args, "args_json", None)
    if args_json:
        try:
            loaded = json.loads(args_json)
        except ValueError as err:
            raise CliError(f"--args-json: not valid JSON ({err})") from None
        if not isinstance(loaded, dict):
            raise CliError("--args-json: expected a JSON object of tool arguments")
        tool_args.update(loaded)
    extra = parse_arg_pairs(getattr(args, "arg", None) or (), getattr(args, "arg_json", None) or ())
    for key in extra:
        if key in tool_args:
            raise CliError(f"--arg {key}=...: argument {key!r} is also in --args-json")
    tool_args.update(extra)
    secrets = parse_secret_args(getattr(args, "secret_arg", None) or ())
    for key in secrets:
        if key in tool_args:
            raise CliError(
                f"--secret-arg {key}=...: argument {key!r} is also given as a plain argument"
            )
    canary: int = getattr(args, "canary", None) or 0
    if canary < 0:
        raise CliError("--canary: must be zero or more")
    return admin_pb2.FleetRunSpec(
        selector=selector,
        tool=tool_name,
        args_json=json.dumps(tool_args, sort_keys=True) if tool_args else "",
        mode=mode,
        on_error=on_error,
        deadline_secs=deadline_secs,
        canary=canary,
        tenant_id=getattr(args, "tenant", None) or "",
        secret_args_json=json.dumps(secrets, sort_keys=True) if secrets else "",
    )


def parse_secret_args(pairs: Sequence[str]) -> dict[str, str]:
    """``--secret-arg k=v``: like ``--arg``, but the error never echoes the value."""
    out: dict[str, str] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CliError("--secret-arg: expected KEY=VALUE (the value is not shown here)")
        if key in out:
            raise CliError(f"--secret-arg {key}=...: argument {key!r} given twice")
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# Connection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Connection:
    """Where the relay is and how to prove who we are to it."""

    relay: str
    ca_pem: bytes
    token: str
    server_name: str = ""
    """TLS name to verify instead of the host of ``relay`` (``--tls-server-name``)."""
    insecure: bool = False
    """Plaintext, for a relay started with ``--insecure`` (``ca_pem`` is then empty)."""

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)


def _read_file(path: str, what: str, flag: str) -> bytes:
    try:
        with open(os.path.expanduser(path), "rb") as fh:
            return fh.read()
    except OSError as err:
        raise CliError(f"{flag}: cannot read the {what} {path!r}: {err.strerror or err}") from None


def _relay_json(data_dir: str) -> dict[str, Any]:
    path = os.path.join(os.path.expanduser(data_dir), "relay.json")
    raw = _read_file(path, "relay description", "--relay-data-dir")
    try:
        info = json.loads(raw)
    except ValueError as err:
        raise CliError(f"--relay-data-dir: {path!r} is not JSON ({err})") from None
    if not isinstance(info, dict):
        raise CliError(f"--relay-data-dir: {path!r} is not a JSON object")
    return info


def _relay_from_json(info: Mapping[str, Any]) -> str:
    host, port = info.get("host"), info.get("port")
    if not isinstance(host, str) or not isinstance(port, int):
        listen = info.get("listen")
        return listen if isinstance(listen, str) else ""
    if host in ("", "0.0.0.0", "::", "[::]"):  # noqa: S104 -- a bind-all address, not a bind
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve_connection(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Connection:
    """Flags first, then the environment; a missing setting names both.

    ``--relay-data-dir D`` (or ``AEGIS_RELAY_DATA_DIR``) fills whatever is not given from
    the ``D/relay.json`` a local ``aegis relay serve --data-dir D`` writes: its address, CA
    and admin token. Given as a flag it beats the environment; from the environment it only
    fills gaps.
    """
    env = os.environ if environ is None else environ
    dir_flag: str = getattr(args, "relay_data_dir", None) or ""
    data_dir = dir_flag or env.get(ENV_RELAY_DATA_DIR, "")
    info = _relay_json(data_dir) if data_dir else {}

    def pick(flag_value: str | None, env_name: str, from_dir: str) -> tuple[str, bool]:
        if flag_value:
            return flag_value.strip(), False
        if dir_flag and from_dir:
            return from_dir, True
        if env.get(env_name, "").strip():
            return env[env_name].strip(), False
        return from_dir, bool(from_dir)

    relay, relay_from_dir = pick(getattr(args, "relay", None), ENV_RELAY, _relay_from_json(info))
    if not relay:
        raise CliError(
            f"no relay address: pass --relay HOST:PORT or set {ENV_RELAY} "
            "(or --relay-data-dir D for a local relay)"
        )
    for scheme in ("grpcs://", "https://"):
        if relay.startswith(scheme):
            relay = relay[len(scheme) :]
    host, sep, port = relay.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CliError(f"--relay: expected HOST:PORT, got {relay!r}")

    insecure = bool(getattr(args, "insecure", False)) or (
        relay_from_dir and info.get("tls") is False
    )
    ca_pem = b""
    if not insecure:
        ca_from_dir = info.get("ca_cert") if isinstance(info.get("ca_cert"), str) else ""
        ca_path, _ = pick(getattr(args, "ca_cert", None), ENV_CA_CERT, str(ca_from_dir or ""))
        if not ca_path:
            raise CliError(
                f"no CA certificate: pass --ca-cert PATH or set {ENV_CA_CERT} "
                "(the relay writes it to <data-dir>/ca.pem)"
            )
        ca_pem = _read_file(ca_path, "CA certificate", "--ca-cert")
        if b"-----BEGIN CERTIFICATE-----" not in ca_pem:
            raise CliError(f"--ca-cert: {ca_path!r} is not a PEM certificate")

    token_file = info.get("operator_token")
    token, _ = pick(
        getattr(args, "token", None),
        ENV_TOKEN,
        f"@{token_file}" if isinstance(token_file, str) and token_file else "",
    )
    if not token:
        raise CliError(
            f"no operator token: pass --token TOKEN (or @FILE) or set {ENV_TOKEN} "
            "(the relay writes an admin token to <data-dir>/operator.token)"
        )
    if token.startswith("@"):
        token_path = token[1:]
        token = _read_file(token_path, "token file", "--token").decode("utf-8", "replace").strip()
        if not token:
            raise CliError(f"--token: the token file {token_path!r} is empty")
    if any(ch.isspace() for ch in token) or not token.isprintable():
        raise CliError("--token: the operator token contains whitespace or control characters")
    server_name = (
        getattr(args, "tls_server_name", None) or env.get(ENV_TLS_SERVER_NAME, "")
    ).strip()
    return Connection(
        relay=relay, ca_pem=ca_pem, token=token, server_name=server_name, insecure=insecure
    )


def rpc_error_message(err: grpc.RpcError, relay: str) -> str:
    """One line for a failed call, for people: the relay's sentence, no status-code name.

    The relay's details already say what to do where it knows (a refused token says how
    to get a good one), so nothing is added to them except where the relay could not
    answer at all.
    """
    import grpc

    code = err.code() if isinstance(err, grpc.Call) else None
    details = (err.details() if isinstance(err, grpc.Call) else None) or str(err) or ""
    details = " ".join(details.split())
    if code is grpc.StatusCode.UNAVAILABLE:
        hint = "is `aegis relay serve` running?"
        lowered = details.lower()
        if any(word in lowered for word in ("ssl", "tls", "handshake", "certificate")):
            hint = f"check --ca-cert / {ENV_CA_CERT} and that it is the relay's CA"
        return f"cannot reach the relay at {relay}: {details or 'no answer'}; {hint}"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the relay at {relay} did not answer in time" + (f" ({details})" if details else "")
    if details:
        return details
    what = code.name.lower().replace("_", " ") if code is not None else "an unknown error"
    return f"the relay answered {what} without details"


class AdminClient:
    """A blocking Admin stub on a TLS channel, mapping gRPC failures to :class:`CliError`."""

    def __init__(self, conn: Connection) -> None:
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # see register()
        import grpc

        from aegis_edge_core.wire import admin_pb2_grpc

        self.conn = conn
        if conn.insecure:
            self._channel = grpc.insecure_channel(conn.relay)
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=conn.ca_pem)
            options = (
                [("grpc.ssl_target_name_override", conn.server_name)] if conn.server_name else []
            )
            self._channel = grpc.secure_channel(conn.relay, creds, options=options)
        self.stub: AdminStub = admin_pb2_grpc.AdminStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        import grpc

        try:
            yield
        except grpc.RpcError as err:
            raise CliError(rpc_error_message(err, self.conn.relay)) from None

    def unary(self, method: str, request: Any) -> Any:
        with self._errors():
            return getattr(self.stub, method)(
                request, metadata=self.conn.metadata, timeout=UNARY_TIMEOUT_SECS
            )

    def stream(self, method: str, request: Any) -> Iterator[admin_pb2.FleetRunEvent]:
        with self._errors():
            call = getattr(self.stub, method)(request, metadata=self.conn.metadata)
            try:
                yield from call
            finally:
                call.cancel()


def _client(args: argparse.Namespace) -> AdminClient:
    return AdminClient(resolve_connection(args))


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("relay connection")
    group.add_argument(
        "--relay", metavar="HOST:PORT", help=f"the relay's admin address (env {ENV_RELAY})"
    )
    group.add_argument(
        "--ca-cert",
        metavar="PATH",
        help=f"the relay's CA certificate, <data-dir>/ca.pem (env {ENV_CA_CERT})",
    )
    group.add_argument(
        "--token",
        metavar="TOKEN|@FILE",
        help=f"operator token, or @path to a file holding it (env {ENV_TOKEN})",
    )
    group.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="the name in the relay's certificate, when it differs from HOST "
        f"(env {ENV_TLS_SERVER_NAME})",
    )
    group.add_argument(
        "--relay-data-dir",
        metavar="DIR",
        help="a local relay's --data-dir: address, CA and admin token from DIR/relay.json "
        f"(env {ENV_RELAY_DATA_DIR})",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC, for a relay started with --insecure (the token travels in clear)",
    )


# --------------------------------------------------------------------------------------------
# Host commands
# --------------------------------------------------------------------------------------------


def _now() -> float:
    return datetime.now(tz=UTC).timestamp()


def cmd_ls(args: argparse.Namespace) -> int:
    selector = args.target or ""
    if selector:
        validate_selector(selector)
    request = admin_pb2.ListHostsRequest(
        connected_only=args.connected, tenant_id=args.tenant or "", selector=selector
    )
    with _client(args) as client:
        resp: admin_pb2.ListHostsResponse = client.unary("ListHosts", request)
    hosts = sorted(resp.hosts, key=lambda h: (h.tenant_id, h.node_id))
    if args.output == "json":
        print_json([host_to_dict(h) for h in hosts])
        return 0
    if not hosts:
        print("no hosts" + (" connected" if args.connected else ""))
        return 0
    now = _now()
    print_table(HOST_COLUMNS, (host_row(h, now) for h in hosts))
    return 0


def _print_host_detail(host: admin_pb2.Host) -> None:
    now = _now()
    caps = host.capabilities
    fields: list[tuple[str, str]] = [
        ("Node", host.node_id),
        ("Tenant", host.tenant_id),
        ("Status", status_name(host.status)),
        (
            "Last heartbeat",
            f"{iso_time(host.last_heartbeat_at) or 'never'} "
            f"({relative_time(host.last_heartbeat_at, now)})"
            if host.last_heartbeat_at
            else "never",
        ),
        ("Connected since", iso_time(host.connected_since) or "-"),
        ("Enrolled", iso_time(host.enrolled_at) or "-"),
        ("Hostname", caps.hostname or "-"),
        ("OS/arch", "/".join(p for p in (caps.os, caps.arch) if p) or "-"),
        ("Agent version", caps.agent_version or "-"),
        ("Tools", ", ".join(sorted(caps.tools)) or "-"),
        ("Labels", ", ".join(f"{k}={v}" for k, v in sorted(caps.labels.items())) or "-"),
        ("Tags", ", ".join(sorted(caps.tags)) or "-"),
        ("Key thumbprint", host.key_thumbprint or "-"),
    ]
    if host.revoked_reason:
        fields.append(("Revoked reason", host.revoked_reason))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key + ':':<{width + 1}} {value}")
    print()
    if not host.history:
        print("Command history: none")
        return
    rows = []
    with_result = any(rec.result_json for rec in host.history)
    for rec in host.history:
        duration = ""
        if rec.dispatched_at and rec.finished_at:
            duration = format_duration(rec.finished_at - rec.dispatched_at)
        row = [
            relative_time(rec.dispatched_at, now),
            rec.tool,
            target_outcome_name(rec.outcome, dispatched=rec.dispatched_at > 0),
            str(rec.exit_code) if rec.has_exit_code else "-",
            duration or "-",
            rec.fleet_command_id or "-",
            rec.command_id,
        ]
        if with_result:
            row.append(compact_result(rec.result_json, RESULT_WIDTH) or "-")
        rows.append(row)
    columns = ("DISPATCHED", "TOOL", "OUTCOME", "EXIT", "DURATION", "FLEET RUN", "COMMAND")
    print_table(
        (*columns, "RESULT") if with_result else columns,
        rows,
        title=f"Command history (last {len(rows)})",
    )


def cmd_show(args: argparse.Namespace) -> int:
    request = admin_pb2.GetHostRequest(node_id=args.node_id, history_limit=args.history)
    with _client(args) as client:
        host: admin_pb2.Host = client.unary("GetHost", request)
    if args.output == "json":
        print_json(host_to_dict(host, with_history=True))
    else:
        _print_host_detail(host)
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    tags: list[str] = list(args.tags)
    for tag in tags:
        if not tag or any(ch.isspace() or ch in ",()=" for ch in tag):
            raise CliError(f"invalid tag {tag!r}: tags may not be empty or hold spaces , ( ) =")
    method = "AddTags" if args.tag_action == "add" else "RemoveTags"
    with _client(args) as client:
        host: admin_pb2.Host = client.unary(
            method, admin_pb2.TagsRequest(node_id=args.node_id, tags=tags)
        )
    if args.output == "json":
        print_json(host_to_dict(host))
    else:
        print(f"{host.node_id}: tags {', '.join(sorted(host.capabilities.tags)) or '(none)'}")
    return 0


def cmd_revoke_remote(args: argparse.Namespace) -> int:
    request = admin_pb2.RevokeNodeRequest(node_id=args.node_id, reason=args.reason or "")
    with _client(args) as client:
        host: admin_pb2.Host = client.unary("RevokeNode", request)
    if args.output == "json":
        print_json(host_to_dict(host))
    else:
        reason = f" ({host.revoked_reason})" if host.revoked_reason else ""
        print(f"revoked {host.node_id}: status {status_name(host.status)}{reason}")
    return 0


def _confirm(prompt: str, expected: str, stdin: TextIO) -> bool:
    sys.stderr.write(prompt)
    sys.stderr.flush()
    answer = stdin.readline()
    return answer.strip() == expected


def cmd_tenants_delete(args: argparse.Namespace) -> int:
    tenant: str = args.tenant
    if not tenant.strip():
        raise CliError("tenants delete: the tenant id is empty")
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError(
                f"refusing to delete tenant {tenant!r} without confirmation: "
                "stdin is not a terminal; pass --yes"
            )
        prompt = (
            f"Deleting tenant {tenant!r} revokes every daemon bound to it; this cannot be "
            f"undone.\nType the tenant id to confirm: "
        )
        if not _confirm(prompt, tenant, sys.stdin):
            raise CliError(f"not deleting tenant {tenant!r}: confirmation did not match")
    with _client(args) as client:
        resp: admin_pb2.DeleteTenantResponse = client.unary(
            "DeleteTenant", admin_pb2.DeleteTenantRequest(tenant_id=tenant)
        )
    if args.output == "json":
        print_json({"tenant_id": tenant, "revoked_daemons": resp.revoked_daemons})
    else:
        noun = "daemon" if resp.revoked_daemons == 1 else "daemons"
        print(f"deleted tenant {tenant}; revoked {resp.revoked_daemons} {noun}")
    return 0


def cmd_tokens_issue(args: argparse.Namespace) -> int:
    tenant: str = args.tenant
    if not tenant.strip():
        raise CliError("--tenant: the tenant id is empty")
    try:
        check_tenant_id(tenant)
    except AegisError as err:
        raise CliError(f"--tenant: {err.message}", hint=err.hint) from None
    ttl = parse_duration_secs(args.ttl, flag="--ttl") if args.ttl else 0.0
    with _client(args) as client:
        resp: admin_pb2.IssueEnrollmentTokenResponse = client.unary(
            "IssueEnrollmentToken",
            admin_pb2.IssueEnrollmentTokenRequest(tenant_id=tenant, ttl_secs=ttl),
        )
    if args.output == "json":
        print_json({"token": resp.token, "expires_at": iso_time(resp.expires_at)})
    else:
        # The token alone, so `TOKEN=$(aegis edge tokens issue --tenant t)` just works.
        sys.stdout.write(resp.token + "\n")
    return 0


# --------------------------------------------------------------------------------------------
# Fleet commands
# --------------------------------------------------------------------------------------------


def cmd_fleet_preview(args: argparse.Namespace) -> int:
    spec = build_fleet_spec(args)
    with _client(args) as client:
        preview: admin_pb2.FleetPreview = client.unary("PreviewFleetRun", spec)
    if args.output == "json":
        print_json(fleet_preview_to_dict(preview))
        return 0
    print(
        f"selector {preview.selector or spec.selector!r} matched {preview.matched}: "
        f"{len(preview.targets)} target(s), {len(preview.skipped)} skipped"
    )
    rows: list[list[str]] = [[node, "target", ""] for node in preview.targets]
    rows += [[s.node_id, "skip", s.reason] for s in preview.skipped]
    if rows:
        print_table(("NODE", "ACTION", "REASON"), rows)
    return 0


class _Progress:
    """The live display of ``fleet run`` on a terminal; a no-op elsewhere."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None
        self.total = 0
        self.done = 0
        self.running = 0
        self.saw_dispatched = False
        self.failed = 0

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("fleet run", total=None, detail="starting")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _refresh(self) -> None:
        if self._progress is None:
            return
        # Large runs (more than the relay's DETAIL_LIMIT targets) send no per-target
        # ``dispatched`` events: then only what finished is known.
        detail = (
            f"{self.running} running, {self.failed} failed"
            if self.saw_dispatched
            else f"{self.failed} failed"
        )
        self._progress.update(
            self._task, total=self.total or None, completed=self.done, detail=detail
        )

    def started(self, run: admin_pb2.FleetRun) -> None:
        self.total = len(run.targets)
        if self._progress is not None:
            self._progress.update(self._task, description=run.fleet_command_id or "fleet run")
        self._refresh()

    def dispatched(self, _res: admin_pb2.TargetResult) -> None:
        self.saw_dispatched = True
        self.running += 1
        self._refresh()

    def finished(self, res: admin_pb2.TargetResult) -> None:
        if res.dispatched_at:
            self.running = max(0, self.running - 1)
        self.done += 1
        if res.outcome != common_pb2.TARGET_OUTCOME_OK:
            self.failed += 1
        self._refresh()


FOLLOW_AUTO_LIMIT: Final = 20
"""On a terminal, ``fleet run|watch|rerun`` print live output by default for runs of at most
this many targets; ``--follow`` forces it for any size, ``--no-follow`` turns it off."""


class _LiveOutput:
    """Prints each target's output lines as they arrive, prefixed by host (pssh -P style).

    Output of the command's stdout goes to our stdout, its stderr to our stderr; with
    ``--output json`` every line goes to stderr, so stdout stays one JSON document.
    """

    def __init__(self, *, json_mode: bool) -> None:
        self.json_mode = json_mode
        self.enabled = False
        self.hosts: dict[str, str] = {}
        self._lines = LineAssembler()

    def _print(self, host: str, stream: str, line: str) -> None:
        out = sys.stderr if self.json_mode or stream == "stderr" else sys.stdout
        print(f"{host}: {line}", file=out, flush=True)

    def output(self, out: admin_pb2.TargetOutput) -> None:
        if not self.enabled:
            return
        host = out.host or out.node_id
        self.hosts[out.node_id] = host
        if out.dropped_bytes:
            self.target_done(out.node_id)  # a partial line ends where the gap begins
            self._print(host, "stdout", dropped_marker(out.dropped_bytes))
        for stream, data in (("stdout", out.stdout), ("stderr", out.stderr)):
            if data:
                for line in self._lines.feed(out.node_id, stream, data):
                    self._print(host, stream, line)

    def target_done(self, node_id: str) -> None:
        for stream, line in self._lines.flush(node_id):
            self._print(self.hosts.get(node_id, node_id), stream, line)

    def close(self) -> None:
        for node_id in list(self.hosts):
            self.target_done(node_id)


def _print_run_tables(run: admin_pb2.FleetRun) -> None:
    if run.targets:
        # A RESULT column only when some tool returned one (sys.info does, cmd.run not).
        if any(t.result_json for t in run.targets):
            columns = (*TARGET_COLUMNS[:-1], "RESULT", TARGET_COLUMNS[-1])
            print_table(columns, (target_row(t, with_result=True) for t in run.targets))
        else:
            print_table(TARGET_COLUMNS, (target_row(t) for t in run.targets))
    if run.skipped:
        print_table(("NODE", "SKIPPED BECAUSE"), ((s.node_id, s.reason) for s in run.skipped))


def _run_and_report(args: argparse.Namespace, method: str, request: Any) -> int:
    """Follow a run's event stream (``StartFleetRun`` or ``WatchFleetRun``) to its end."""
    as_json = args.output == "json"
    live = not as_json and sys.stdout.isatty()
    follow: bool | None = getattr(args, "follow", None)
    request.follow_output = live if follow is None else follow
    printer = _LiveOutput(json_mode=as_json)
    final: admin_pb2.FleetRun | None = None
    started: admin_pb2.FleetRun | None = None
    with _client(args) as client:
        try:
            with _Progress(live) as progress:
                for event in client.stream(method, request):
                    kind = event.WhichOneof("body")
                    if kind == "started":
                        started = event.started
                        progress.started(event.started)
                        printer.enabled = bool(follow) or (
                            request.follow_output and len(started.targets) <= FOLLOW_AUTO_LIMIT
                        )
                    elif kind == "output":
                        printer.output(event.output)
                    elif kind == "dispatched":
                        progress.dispatched(event.dispatched)
                    elif kind == "target_finished":
                        printer.target_done(event.target_finished.node_id)
                        progress.finished(event.target_finished)
                    elif kind == "finished":
                        final = event.finished
                        break
                printer.close()
        except KeyboardInterrupt:
            run_id = started.fleet_command_id if started is not None else ""
            if run_id:
                raise CliError(
                    f"interrupted; fleet run {run_id} goes on at the relay "
                    f"(`aegis edge fleet watch {run_id}` follows it again, "
                    f"`aegis edge fleet cancel {run_id}` stops it)",
                    exit_code=130,
                ) from None
            raise
    if final is None:
        run_id = started.fleet_command_id if started is not None else "?"
        raise CliError(
            f"the relay closed the event stream before fleet run {run_id} finished "
            f"(`aegis edge fleet show {run_id}` shows where it is)"
        )
    if as_json:
        print_json(fleet_run_to_dict(final))
    else:
        _print_run_tables(final)
        print(f"fleet run {final.fleet_command_id}: {fleet_run_summary(final)}")
    if final.outcome != common_pb2.RUN_OUTCOME_COMPLETED:
        reason = f" ({final.halt_reason})" if final.halt_reason else ""
        raise CliError(f"fleet run {final.fleet_command_id} {fleet_run_summary(final)}{reason}")
    return 0


def cmd_fleet_run(args: argparse.Namespace) -> int:
    return _run_and_report(args, "StartFleetRun", build_fleet_spec(args))


def cmd_fleet_keys_rotate(args: argparse.Namespace) -> int:
    return _run_and_report(args, "StartFleetRun", build_fleet_spec(args, tool="keys.rotate"))


def cmd_fleet_rerun(args: argparse.Namespace) -> int:
    try:
        only = parse_rerun_scope(args.only)
    except FleetSpecError as err:
        raise CliError(f"--only: {err}") from None
    secrets = parse_secret_args(args.secret_arg or ())
    request = admin_pb2.RerunFleetRunRequest(
        fleet_command_id=args.fleet_command_id,
        only=only.value,
        secret_args_json=json.dumps(secrets, sort_keys=True) if secrets else "",
    )
    return _run_and_report(args, "RerunFleetRun", request)


def cmd_fleet_watch(args: argparse.Namespace) -> int:
    request = admin_pb2.GetFleetRunRequest(fleet_command_id=args.fleet_command_id)
    return _run_and_report(args, "WatchFleetRun", request)


def cmd_fleet_runs(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise CliError("--limit: must be zero or more")
    request = admin_pb2.ListFleetRunsRequest(limit=args.limit, tenant_id=args.tenant or "")
    with _client(args) as client:
        resp: admin_pb2.ListFleetRunsResponse = client.unary("ListFleetRuns", request)
    if args.output == "json":
        print_json([fleet_run_to_dict(run) for run in resp.runs])
        return 0
    if not resp.runs:
        print("no fleet runs")
        return 0
    now = _now()
    rows = [
        [
            run.fleet_command_id,
            relative_time(run.created_at, now),
            run.created_by or "-",
            run.spec.tool,
            run.spec.selector,
            run.spec.mode or "all",
            run_outcome_name(run.outcome),
        ]
        for run in resp.runs
    ]
    print_table(("ID", "CREATED", "BY", "TOOL", "TARGET", "MODE", "OUTCOME"), rows)
    return 0


def _print_run_detail(run: admin_pb2.FleetRun) -> None:
    spec = run.spec
    fields = [
        ("Fleet run", run.fleet_command_id),
        ("Outcome", run_outcome_name(run.outcome)),
        ("Tool", spec.tool),
        ("Target", spec.selector),
        ("Arguments", _shown_args(spec)),
        ("Mode", spec.mode or "all"),
        ("On error", spec.on_error or "continue"),
        ("Deadline", format_duration(spec.deadline_secs) if spec.deadline_secs else "none"),
        ("Created", iso_time(run.created_at) or "-"),
        ("Finished", iso_time(run.finished_at) or "-"),
        ("Created by", run.created_by or "-"),
        ("Trace id", run.trace_id or "-"),
    ]
    if run.rerun_of:
        fields.append(("Rerun of", run.rerun_of))
    if spec.canary:
        fields.append(("Canary", str(spec.canary)))
    if run.halt_reason:
        fields.append(("Halt reason", run.halt_reason))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key + ':':<{width + 1}} {value}")
    print()
    _print_run_tables(run)
    results = [(t.node_id, compact_result(t.result_json)) for t in run.targets if t.result_json]
    if results:
        print("Results:")
        for node_id, text in results:
            print(f"  {node_id}: {text}")
    print(fleet_run_summary(run))


def _shown_args(spec: admin_pb2.FleetRunSpec) -> str:
    if not spec.args_json and not spec.secret_keys:
        return "{} (not stored)" if spec.tool else "{}"
    shown = _spec_to_dict(spec)["args"]
    return json.dumps(shown, sort_keys=True) if isinstance(shown, dict) else str(shown)


def cmd_fleet_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        run: admin_pb2.FleetRun = client.unary(
            "GetFleetRun", admin_pb2.GetFleetRunRequest(fleet_command_id=args.fleet_command_id)
        )
    if args.output == "json":
        print_json(fleet_run_to_dict(run))
    else:
        _print_run_detail(run)
    return 0


def cmd_fleet_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        run: admin_pb2.FleetRun = client.unary(
            "CancelFleetRun", admin_pb2.GetFleetRunRequest(fleet_command_id=args.fleet_command_id)
        )
    if args.output == "json":
        print_json(fleet_run_to_dict(run))
    else:
        print(f"fleet run {run.fleet_command_id}: {run_outcome_name(run.outcome)}")
    return 0


# --------------------------------------------------------------------------------------------
# Saved groups
# --------------------------------------------------------------------------------------------


def group_to_dict(group: admin_pb2.Group, *, with_members: bool = False) -> dict[str, Any]:
    """A group as ``groups ls|show --output json`` print it (``show`` adds the members)."""
    out: dict[str, Any] = {
        "name": group.name,
        "tenant_id": group.tenant_id,
        "selector": group.selector,
        "pinned": list(group.pinned),
        "created_at": iso_time(group.created_at),
        "created_by": group.created_by or None,
    }
    if with_members:
        out["members"] = list(group.members)
        out["missing"] = list(group.missing)
    return out


def _group_name(name: str) -> str:
    try:
        return check_group_name(name)
    except GroupError as err:
        raise CliError(str(err)) from None


def _group_request(args: argparse.Namespace) -> admin_pb2.GetGroupRequest:
    return admin_pb2.GetGroupRequest(name=_group_name(args.name), tenant_id=args.tenant or "")


def cmd_groups_create(args: argparse.Namespace) -> int:
    name = _group_name(args.name)
    validate_selector(args.target)
    try:
        check_group_selector(args.target)
    except GroupError as err:
        raise CliError(f"--target: {err}") from None
    request = admin_pb2.CreateGroupRequest(
        name=name, tenant_id=args.tenant or "", selector=args.target, pinned=list(args.pin)
    )
    with _client(args) as client:
        group: admin_pb2.Group = client.unary("CreateGroup", request)
    if args.output == "json":
        print_json(group_to_dict(group, with_members=True))
        return 0
    pinned = f" + {len(group.pinned)} pinned" if group.pinned else ""
    print(
        f"created group {group.name} in tenant {group.tenant_id}: {group.selector}{pinned}; "
        f"{len(group.members)} member(s) now"
    )
    return 0


def cmd_groups_ls(args: argparse.Namespace) -> int:
    request = admin_pb2.ListGroupsRequest(tenant_id=args.tenant or "")
    with _client(args) as client:
        resp: admin_pb2.ListGroupsResponse = client.unary("ListGroups", request)
    if args.output == "json":
        print_json([group_to_dict(g) for g in resp.groups])
        return 0
    if not resp.groups:
        print("no groups")
        return 0
    now = _now()
    rows = [
        [
            g.name,
            g.tenant_id,
            g.selector,
            ",".join(g.pinned) or "-",
            g.created_by or "-",
            relative_time(g.created_at, now),
        ]
        for g in resp.groups
    ]
    print_table(("NAME", "TENANT", "SELECTOR", "PINNED", "CREATED BY", "CREATED"), rows)
    return 0


def cmd_groups_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        group: admin_pb2.Group = client.unary("GetGroup", _group_request(args))
    if args.output == "json":
        print_json(group_to_dict(group, with_members=True))
        return 0
    fields = [
        ("Group", group.name),
        ("Tenant", group.tenant_id),
        ("Selector", group.selector),
        ("Pinned", ", ".join(group.pinned) or "-"),
        ("Created", iso_time(group.created_at) or "-"),
        ("Created by", group.created_by or "-"),
        ("Members now", f"{len(group.members)}: {', '.join(group.members) or '-'}"),
    ]
    if group.missing:
        fields.append(("Pinned, not found", ", ".join(group.missing)))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key + ':':<{width + 1}} {value}")
    print(f"(statuses and skips: aegis edge fleet preview --target group={group.name} --tool TOOL)")
    return 0


def cmd_groups_rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        group: admin_pb2.Group = client.unary("DeleteGroup", _group_request(args))
    if args.output == "json":
        print_json(group_to_dict(group))
    else:
        print(f"removed group {group.name} from tenant {group.tenant_id}")
    return 0


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {value}")
    return value


def _add_fleet_policy_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        default="all",
        help="all (default), sequential, rolling=N (at most N in flight) or rolling=N%%",
    )
    parser.add_argument(
        "--on-error",
        default="continue",
        help="continue (default), fail-fast or stop-after=N",
    )
    parser.add_argument(
        "--deadline", metavar="DURATION", help="bound on the whole run, e.g. 120s or 10m"
    )
    parser.add_argument(
        "--canary",
        type=_nonneg_int,
        default=0,
        metavar="K",
        help="run on K targets first and go on only if they all succeed",
    )
    parser.add_argument("--tenant", metavar="TENANT", help="only daemons of this tenant")


def _add_target_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        required=True,
        metavar="SELECTOR",
        help="which daemons, e.g. all, tags=prod, 'tags=AnyOf(a,b) os=linux'",
    )


def _add_tool_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a string tool argument, split on the first '=' (repeatable)",
    )
    parser.add_argument(
        "--arg-json",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help='a tool argument as JSON, e.g. argv=\'["ls","-l"]\' (repeatable)',
    )
    parser.add_argument(
        "--args-json", metavar="JSON", help="every tool argument as one JSON object"
    )
    _add_secret_arg_flag(parser)


def _add_secret_arg_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--secret-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a string tool argument that is sent to the daemons but never stored, logged "
        "or shown (<secret>); a rerun asks for it again (repeatable)",
    )


def _add_follow_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--follow",
        dest="follow",
        action="store_true",
        default=None,
        help="print each target's output lines as they arrive, prefixed by host "
        f"(default on a terminal for runs of up to {FOLLOW_AUTO_LIMIT} targets)",
    )
    group.add_argument(
        "--no-follow", dest="follow", action="store_false", help="do not print live output"
    )


def register(tree: CommandTree) -> None:
    """Add the operator-side ``aegis edge`` commands to ``tree``."""
    # gRPC's C core reads its log level when grpc is first imported and would print a failed
    # TLS handshake on stderr at INFO, above our one-line error. Errors only, unless the
    # operator set GRPC_VERBOSITY. (Only effective if nothing imported grpc before.)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    p = tree.command("edge ls", cmd_ls, help="list edge hosts known to the relay")
    p.add_argument("--connected", action="store_true", help="only Connected hosts")
    p.add_argument("--tenant", metavar="TENANT", help="only hosts of this tenant")
    p.add_argument("--target", metavar="SELECTOR", help="only hosts this selector matches")
    add_output_flag(p)
    _add_connection_flags(p)

    p = tree.command("edge show", cmd_show, help="one host in full, with its command history")
    p.add_argument("node_id", metavar="NODE_ID")
    p.add_argument(
        "--history",
        type=_nonneg_int,
        default=DEFAULT_HISTORY,
        metavar="N",
        help=f"how many recent tool calls to show (default {DEFAULT_HISTORY})",
    )
    add_output_flag(p)
    _add_connection_flags(p)

    for action, help_ in (("add", "add operator tags to a host"), ("rm", "remove tags")):
        p = tree.command(f"edge tag {action}", cmd_tag, help=help_)
        p.set_defaults(tag_action=action)
        p.add_argument("node_id", metavar="NODE_ID")
        p.add_argument("tags", nargs="+", metavar="TAG")
        add_output_flag(p)
        _add_connection_flags(p)

    p = tree.command(
        "edge keys revoke-remote",
        cmd_revoke_remote,
        help="revoke a daemon from the relay side: status Revoked, token blacklisted, "
        "stream dropped",
    )
    p.add_argument("node_id", metavar="NODE_ID")
    p.add_argument("--reason", help="why, kept with the daemon's record")
    add_output_flag(p)
    _add_connection_flags(p)

    p = tree.command(
        "edge tenants delete",
        cmd_tenants_delete,
        help="delete a tenant and revoke every daemon bound to it",
    )
    p.add_argument("tenant", metavar="TENANT")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    add_output_flag(p)
    _add_connection_flags(p)

    p = tree.command(
        "edge tokens issue",
        cmd_tokens_issue,
        help="issue a single-use enrollment token for a tenant (printed alone on stdout)",
    )
    p.add_argument("--tenant", required=True, metavar="TENANT")
    p.add_argument("--ttl", metavar="DURATION", help="lifetime, e.g. 15m (relay default 15m)")
    p.add_argument(
        "--output", "-o", choices=("text", "json"), default="text", help="text (default) or json"
    )
    _add_connection_flags(p)

    p = tree.command(
        "edge fleet preview",
        cmd_fleet_preview,
        help="dry run: which daemons a fleet run would target and which it would skip",
    )
    _add_target_flag(p)
    p.add_argument("--tool", required=True, help="tool name, e.g. cmd.run")
    _add_tool_args(p)
    _add_fleet_policy_flags(p)
    add_output_flag(p)
    _add_connection_flags(p)

    p = tree.command("edge fleet run", cmd_fleet_run, help="run a tool across the fleet")
    _add_target_flag(p)
    p.add_argument("--tool", required=True, help="tool name, e.g. cmd.run, sys.info, edge.ping")
    _add_tool_args(p)
    _add_fleet_policy_flags(p)
    _add_follow_flags(p)
    add_output_flag(p)
    _add_connection_flags(p)

    p = tree.command(
        "edge fleet keys rotate",
        cmd_fleet_keys_rotate,
        help="rotate daemon keys across the fleet (a fleet run of keys.rotate)",
    )
    _add_target_flag(p)
    _add_fleet_policy_flags(p)
    add_output_flag(p)
    _add_connection_flags(p)

    p = tree.command("edge fleet runs", cmd_fleet_runs, help="recent fleet runs, newest first")
    p.add_argument("--limit", type=_nonneg_int, default=20, help="how many (default 20)")
    p.add_argument("--tenant", metavar="TENANT", help="only runs of this tenant")
    add_output_flag(p)
    _add_connection_flags(p)

    p = tree.command(
        "edge fleet watch",
        cmd_fleet_watch,
        help="follow a fleet run to its end (a finished one: its summary); exits like `fleet run`",
    )
    p.add_argument("fleet_command_id", metavar="FLEET_COMMAND_ID")
    _add_follow_flags(p)
    add_output_flag(p)
    _add_connection_flags(p)

    p = tree.command(
        "edge fleet rerun",
        cmd_fleet_rerun,
        help="run a finished fleet run again (same tool, arguments, mode, on-error, deadline) "
        "on all, the failed or the not-started targets; exits like `fleet run`",
    )
    p.add_argument("fleet_command_id", metavar="FLEET_COMMAND_ID")
    p.add_argument(
        "--only",
        choices=("all", "failed", "not_started"),
        default="all",
        help="which targets of the old run: all (default), failed (any outcome but ok) "
        "or not_started",
    )
    _add_secret_arg_flag(p)
    _add_follow_flags(p)
    add_output_flag(p)
    _add_connection_flags(p)

    p = tree.command("edge fleet show", cmd_fleet_show, help="one fleet run with every target")
    p.add_argument("fleet_command_id", metavar="FLEET_COMMAND_ID")
    add_output_flag(p)
    _add_connection_flags(p)

    p = tree.command(
        "edge fleet cancel",
        cmd_fleet_cancel,
        help="cancel a running fleet run: nothing new is dispatched, in-flight calls cancelled",
    )
    p.add_argument("fleet_command_id", metavar="FLEET_COMMAND_ID")
    add_output_flag(p)
    _add_connection_flags(p)

    p = tree.command(
        "edge groups create",
        cmd_groups_create,
        help="save a group: a selector plus pinned nodes, named in selectors as group=NAME",
    )
    p.add_argument("name", metavar="NAME", help="1-64 of a-z 0-9 - . _")
    p.add_argument(
        "--target",
        required=True,
        metavar="SELECTOR",
        help="which daemons of the tenant belong, e.g. tags=web (cannot name another group)",
    )
    p.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="NODE",
        help="a node that belongs whatever the selector says (repeatable)",
    )
    p.add_argument("--tenant", metavar="TENANT", help="the group's tenant (default: the token's)")
    add_output_flag(p)
    _add_connection_flags(p)

    p = tree.command("edge groups ls", cmd_groups_ls, help="saved groups, by tenant then name")
    p.add_argument("--tenant", metavar="TENANT", help="only groups of this tenant")
    add_output_flag(p)
    _add_connection_flags(p)

    for action, handler, help_ in (
        ("show", cmd_groups_show, "one group with its members now"),
        ("rm", cmd_groups_rm, "delete a group (runs already started are not affected)"),
    ):
        p = tree.command(f"edge groups {action}", handler, help=help_)
        p.add_argument("name", metavar="NAME")
        p.add_argument(
            "--tenant", metavar="TENANT", help="the group's tenant, if several have this name"
        )
        add_output_flag(p)
        _add_connection_flags(p)
