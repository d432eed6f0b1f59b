"""``example.disk_usage``: a third-party tool for the aegis-edge daemon.

A daemon tool is any object with a ``name`` and ``async run(args, context)`` returning a
:class:`~aegis_edge_agent.tools.ToolResult` (the :class:`~aegis_edge_agent.tools.Tool`
protocol). This one reports how full the filesystem holding ``path`` is and fails -- exit
code 1, target outcome ``error`` -- when it is fuller than ``warn_percent``, so a fleet run
with ``--on-error stop-after=N`` stops on full disks::

    aegis edge fleet run --target tags=prod --tool example.disk_usage \\
        --arg path=/var --arg-json warn_percent=90 --on-error continue

Install it next to the daemon and allow it on the host (see README.md)::

    pip install ./examples/custom_tool_plugin
    # ~/.aegis/edge/aegis-config.yaml -> tools: {allow: [sys.info, edge.ping, keys.rotate,
    #                                                  example.disk_usage]}

Try it without a daemon (prints the result for ``/``)::

    .venv/bin/python examples/custom_tool_plugin/aegis_example_disk_tool.py /
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import sys
from collections.abc import Mapping
from typing import Any

from aegis_edge_agent.tools import ToolContext, ToolResult
from aegis_edge_core.tools_spec import ToolArgumentError
from aegis_edge_core.wire import stream_pb2

__all__ = ["DiskUsage"]


class DiskUsage:
    """Disk usage of ``path`` (default ``/``); ``warn_percent`` (0-100) makes it fail."""

    name = "example.disk_usage"

    def _parse(self, args: Mapping[str, Any]) -> tuple[str, float | None]:
        # Plugins validate their own arguments; ToolArgumentError becomes bad_arguments.
        unknown = sorted(set(args) - {"path", "warn_percent"})
        if unknown:
            raise ToolArgumentError(f"unknown argument(s) {', '.join(unknown)}", tool=self.name)
        path = args.get("path", "/")
        if not isinstance(path, str) or not path:
            raise ToolArgumentError("must be a non-empty string", tool=self.name, field="path")
        warn = args.get("warn_percent")
        if warn is not None and (
            isinstance(warn, bool)
            or not isinstance(warn, int | float)
            or not math.isfinite(warn)
            or not 0 <= warn <= 100
        ):
            raise ToolArgumentError(
                "must be a number from 0 to 100", tool=self.name, field="warn_percent"
            )
        return path, None if warn is None else float(warn)

    async def run(self, args: Mapping[str, Any], context: ToolContext) -> ToolResult:
        path, warn = self._parse(args)
        try:
            # Blocking calls go to a thread: the daemon's event loop serves the stream.
            usage = await asyncio.to_thread(shutil.disk_usage, path)
        except OSError as err:
            return ToolResult(
                kind=stream_pb2.ERROR_KIND_EXIT_NONZERO,
                exit_code=2,
                message=f"cannot stat {path}: {err.strerror or err}",
            )
        percent = round(100.0 * usage.used / usage.total, 1) if usage.total else 0.0
        # Output is streamed back to the relay in chunks and its tail kept in the result.
        context.output("stdout", f"{path}: {percent}% used of {usage.total} bytes\n".encode())
        body = json.dumps(
            {
                "path": path,
                "total": usage.total,
                "used": usage.used,
                "free": usage.free,
                "used_percent": percent,
            }
        )
        if warn is not None and percent > warn:
            return ToolResult(
                kind=stream_pb2.ERROR_KIND_EXIT_NONZERO,
                exit_code=1,
                message=f"{path} is {percent}% full (warn_percent {warn:g})",
                result_json=body,
            )
        return ToolResult(exit_code=0, result_json=body)


if __name__ == "__main__":
    context = ToolContext(
        command_id="local", emit=lambda stream, data: print(data.decode(), end="")
    )
    result = asyncio.run(
        DiskUsage().run({"path": sys.argv[1] if len(sys.argv) > 1 else "/"}, context)
    )
    print(result.result_json or result.message)
    sys.exit(result.exit_code or 0)
