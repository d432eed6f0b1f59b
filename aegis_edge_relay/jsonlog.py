"""JSON logs: one object per line on stderr with timestamp, level, event and context.

Fields the seed names (``node_id``, ``tenant_id``, ``command_id``) are top-level keys when
they apply. Tokens and keys are never passed here; :func:`log` drops any field whose name
suggests a secret, as a second line of defence.
"""

from __future__ import annotations

import datetime
import json
import sys
import threading
from typing import Any, Final, TextIO

__all__ = ["configure", "log"]

_SECRET_WORDS: Final = ("token", "key", "secret", "signature", "password", "proof")
_ALLOWED_KEY_FIELDS: Final = frozenset({"key_thumbprint"})
_LEVELS: Final = {"debug": 10, "info": 20, "warning": 30, "error": 40}

_state: dict[str, Any] = {"stream": None, "level": 20}
_lock = threading.Lock()


def configure(*, level: str = "info", stream: TextIO | None = None) -> None:
    _state["level"] = _LEVELS.get(level, 20)
    _state["stream"] = stream


def log(level: str, event: str, **fields: Any) -> None:
    if _LEVELS.get(level, 20) < _state["level"]:
        return
    record: dict[str, Any] = {
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        "level": level,
        "event": event,
    }
    for name, value in fields.items():
        if value is None:
            continue
        lowered = name.lower()
        if name not in _ALLOWED_KEY_FIELDS and any(w in lowered for w in _SECRET_WORDS):
            continue
        record[name] = value
    line = json.dumps(record, default=str, separators=(",", ":"))
    out: TextIO = _state["stream"] or sys.stderr
    with _lock:
        out.write(line + "\n")
        out.flush()
