"""How the operator commands show Admin answers to people: tables, detail views, relative
times, the live progress bar and the live output of a fleet run.

Functions that build strings and rows are pure and take ``now`` (tests call them without a
server or a clock); the ``print_*`` functions and the two live displays write to stdout
and stderr. ``--output json`` is not here: it is :mod:`.jsonrepr`, whole values, no
rounding or cutting.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from typing import Any, Final

from aegis_edge_cli import print_table
from aegis_edge_core.fleet.output import LineAssembler, dropped_marker
from aegis_edge_core.wire import admin_pb2, common_pb2
from aegis_edge_relay.operator.jsonrepr import (
    iso_time,
    message_to_dict,
    outcome_counts,
    result_value,
    run_outcome_name,
    status_name,
    target_outcome_name,
)

__all__ = [
    "HOST_COLUMNS",
    "RESULT_WIDTH",
    "TARGET_COLUMNS",
    "LiveOutput",
    "Progress",
    "compact_result",
    "fleet_run_summary",
    "format_duration",
    "host_row",
    "last_heard",
    "last_output_line",
    "print_fields",
    "print_host_detail",
    "print_run_detail",
    "print_run_tables",
    "relative_time",
    "target_row",
]

HOST_COLUMNS: Final = (
    "NODE",
    "HOSTNAME",
    "TENANT",
    "STATUS",
    "LAST HEARTBEAT",
    "OS/ARCH",
    "TAGS",
)

TARGET_COLUMNS: Final = ("NODE", "OUTCOME", "EXIT", "DURATION", "LAST OUTPUT", "ERROR")

RESULT_WIDTH: Final = 40
"""Characters of a tool's result shown in a table cell; JSON output has it whole."""

# --------------------------------------------------------------------------------------------
# Times
# --------------------------------------------------------------------------------------------


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


def _took(dispatched_at: float, finished_at: float) -> str:
    if dispatched_at and finished_at:
        return format_duration(finished_at - dispatched_at) or "-"
    return "-"


# --------------------------------------------------------------------------------------------
# Cells and rows
# --------------------------------------------------------------------------------------------


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


def last_heard(host: admin_pb2.Host, now: float) -> str:
    """LAST HEARTBEAT: when the host last heartbeat, or, for a stream that has attested
    but not heartbeat yet, when it attested -- not ``never`` for a host that is there."""
    live = host.status in (common_pb2.DAEMON_STATUS_CONNECTED, common_pb2.DAEMON_STATUS_UNHEALTHY)
    if not host.last_heartbeat_at and live and host.connected_since:
        return f"attested {relative_time(host.connected_since, now)}"
    return relative_time(host.last_heartbeat_at, now)


def _os_arch(caps: common_pb2.Capabilities) -> str:
    return "/".join(part for part in (caps.os, caps.arch) if part) or "-"


def host_row(host: admin_pb2.Host, now: float) -> list[str]:
    """A row under :data:`HOST_COLUMNS`."""
    caps = host.capabilities
    return [
        host.node_id,
        caps.hostname or "-",
        host.tenant_id,
        status_name(host.status),
        last_heard(host, now),
        _os_arch(caps),
        ",".join(sorted(caps.tags)) or "-",
    ]


def last_output_line(res: admin_pb2.TargetResult, width: int = 60) -> str:
    """The last line the command printed (stdout, else stderr), for a glance in a table;
    `fleet show -o json` has the whole captured tails."""
    for tail in (res.stdout_tail, res.stderr_tail):
        lines = [ln for ln in tail.decode("utf-8", "replace").splitlines() if ln.strip()]
        if lines:
            line = lines[-1].strip()
            return line if len(line) <= width else line[: width - 1] + "…"
    return ""


def target_row(res: admin_pb2.TargetResult, *, with_result: bool = False) -> list[str]:
    """A row under :data:`TARGET_COLUMNS` (plus ``RESULT`` with ``with_result``)."""
    note = res.error_message or (f"skipped: {res.skip_reason}" if res.skip_reason else "")
    row = [
        res.node_id,
        target_outcome_name(res.outcome, dispatched=res.dispatched_at > 0),
        str(res.exit_code) if res.has_exit_code else "-",
        _took(res.dispatched_at, res.finished_at),
        last_output_line(res),
    ]
    if with_result:
        row.append(compact_result(res.result_json, RESULT_WIDTH) or "-")
    row.append(note.splitlines()[0] if note else "")
    return row


def fleet_run_summary(run: admin_pb2.FleetRun) -> str:
    """``halted: 3 ok, 1 error, 6 not_started; 2 skipped`` -- the one-line verdict."""
    counts = outcome_counts(run)
    parts = ", ".join(f"{n} {name}" for name, n in counts.items()) or "no targets"
    line = f"{run_outcome_name(run.outcome)}: {parts}"
    if run.skipped:
        line += f"; {len(run.skipped)} skipped"
    return line


# --------------------------------------------------------------------------------------------
# Detail views
# --------------------------------------------------------------------------------------------


def print_fields(fields: Sequence[tuple[str, str]]) -> None:
    """``Key:`` / value lines, the values aligned in one column."""
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key + ':':<{width + 1}} {value}")


def print_host_detail(host: admin_pb2.Host, now: float) -> None:
    """``edge show``: the host's fields, then its command history as a table."""
    caps = host.capabilities
    heartbeat = "never"
    if host.last_heartbeat_at:
        heartbeat = (
            f"{iso_time(host.last_heartbeat_at) or 'never'} "
            f"({relative_time(host.last_heartbeat_at, now)})"
        )
    fields: list[tuple[str, str]] = [
        ("Node", host.node_id),
        ("Tenant", host.tenant_id),
        ("Status", status_name(host.status)),
        ("Last heartbeat", heartbeat),
        ("Connected since", iso_time(host.connected_since) or "-"),
        ("Enrolled", iso_time(host.enrolled_at) or "-"),
        ("Hostname", caps.hostname or "-"),
        ("OS/arch", _os_arch(caps)),
        ("Agent version", caps.agent_version or "-"),
        ("Tools", ", ".join(sorted(caps.tools)) or "-"),
        ("Labels", ", ".join(f"{k}={v}" for k, v in sorted(caps.labels.items())) or "-"),
        ("Tags", ", ".join(sorted(caps.tags)) or "-"),
        ("Key thumbprint", host.key_thumbprint or "-"),
    ]
    if host.revoked_reason:
        fields.append(("Revoked reason", host.revoked_reason))
    print_fields(fields)
    print()
    if not host.history:
        print("Command history: none")
        return
    rows = []
    with_result = any(rec.result_json for rec in host.history)
    for rec in host.history:
        row = [
            relative_time(rec.dispatched_at, now),
            rec.tool,
            target_outcome_name(rec.outcome, dispatched=rec.dispatched_at > 0),
            str(rec.exit_code) if rec.has_exit_code else "-",
            _took(rec.dispatched_at, rec.finished_at),
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


def print_run_tables(run: admin_pb2.FleetRun) -> None:
    """A run's targets (with a RESULT column when some tool returned one) and skips."""
    if run.targets:
        # A RESULT column only when some tool returned one (sys.info does, cmd.run not).
        if any(t.result_json for t in run.targets):
            columns = (*TARGET_COLUMNS[:-1], "RESULT", TARGET_COLUMNS[-1])
            print_table(columns, (target_row(t, with_result=True) for t in run.targets))
        else:
            print_table(TARGET_COLUMNS, (target_row(t) for t in run.targets))
    if run.skipped:
        print_table(("NODE", "SKIPPED BECAUSE"), ((s.node_id, s.reason) for s in run.skipped))


def _shown_args(spec: admin_pb2.FleetRunSpec) -> str:
    if not spec.args_json and not spec.secret_keys:
        return "{} (not stored)" if spec.tool else "{}"
    shown = message_to_dict(spec)["args"]
    return json.dumps(shown, sort_keys=True) if isinstance(shown, dict) else str(shown)


def print_run_detail(run: admin_pb2.FleetRun) -> None:
    """``fleet show``: the run's spec and times, its tables, results and verdict."""
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
    print_fields(fields)
    print()
    print_run_tables(run)
    results = [(t.node_id, compact_result(t.result_json)) for t in run.targets if t.result_json]
    if results:
        print("Results:")
        for node_id, text in results:
            print(f"  {node_id}: {text}")
    print(fleet_run_summary(run))


# --------------------------------------------------------------------------------------------
# Live displays of a run
# --------------------------------------------------------------------------------------------


class Progress:
    """The live progress bar of ``fleet run|watch|rerun`` on a terminal; a no-op elsewhere."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None
        self.total = 0
        self.done = 0
        self.running = 0
        self.saw_dispatched = False
        self.failed = 0

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as Bar

            self._progress = Bar(
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

    def counts(self, progress: admin_pb2.FleetRunProgress) -> None:
        """A summary-only stream's counts, in place of per-target events."""
        self.saw_dispatched = True
        self.total = progress.targets
        self.done = progress.finished
        self.running = max(0, progress.dispatched - progress.finished)
        self.failed = progress.finished - progress.counts.get("ok", 0)
        self._refresh()

    def finished(self, res: admin_pb2.TargetResult) -> None:
        if res.dispatched_at:
            self.running = max(0, self.running - 1)
        self.done += 1
        if res.outcome != common_pb2.TARGET_OUTCOME_OK:
            self.failed += 1
        self._refresh()


class LiveOutput:
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
