"""JSON-lines logs on stderr: timestamp, level, node_id, tenant_id, command_id, event.

Under systemd, stderr is the journal; under launchd and NSSM it is the ``.err.log`` file.
Secrets never reach a log: callers pass ids and sentences, never tokens or key material.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

__all__ = ["EventLog", "JsonFormatter"]

LOGGER_NAME = "aegis_edge_agent"


class JsonFormatter(logging.Formatter):
    def __init__(self, base: dict[str, str] | None = None) -> None:
        super().__init__()
        self.base = base if base is not None else {}

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        line: dict[str, Any] = {
            "timestamp": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "node_id": self.base.get("node_id", ""),
            "tenant_id": self.base.get("tenant_id", ""),
        }
        fields = getattr(record, "fields", None)
        event = getattr(record, "event", None)
        if event is None:
            # A record from another library (grpc, opentelemetry): keep its text.
            line["event"] = "library_log"
            line["logger"] = record.name
            line["message"] = record.getMessage()
        else:
            line["event"] = event
            if isinstance(fields, dict):
                line.update(fields)
        if record.exc_info and record.levelno >= logging.ERROR:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, sort_keys=False)


class EventLog:
    """Structured event logging: ``log.info("connected", relay=...)``."""

    def __init__(self, stream: TextIO | None = None, *, level: int = logging.INFO) -> None:
        self.context: dict[str, str] = {}
        self.formatter = JsonFormatter(self.context)
        self.handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
        self.handler.setFormatter(self.formatter)
        self.logger = logging.getLogger(LOGGER_NAME)
        self.logger.handlers[:] = [self.handler]
        self.logger.setLevel(level)
        self.logger.propagate = False
        root = logging.getLogger()
        if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
            lib = logging.StreamHandler(stream if stream is not None else sys.stderr)
            lib.setFormatter(self.formatter)
            lib.setLevel(logging.WARNING)
            root.addHandler(lib)

    def bind(self, **ids: str) -> None:
        """Set node_id / tenant_id for every later line."""
        self.context.update({k: v for k, v in ids.items() if v})

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        clean = {k: v for k, v in fields.items() if v is not None}
        self.logger.log(level, event, extra={"event": event, "fields": clean})

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)
