"""Duration and address arguments of ``aegis relay serve``: ``30s``, ``1.5s``, ``500ms``, ``2m``."""

from __future__ import annotations

import math
import re
from typing import Final

__all__ = ["parse_duration", "parse_hostport"]

_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE: Final = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number with an optional unit (ms, s, m, h, d; default s)."""
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 1.5s, 500ms, 2m, 24h)")
    value = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"a duration must be positive: {text!r}")
    return value


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` as (host, port); port 0 asks for a free port."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"not HOST:PORT: {text!r}")
        port_text = rest
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"not HOST:PORT: {text!r} (e.g. 0.0.0.0:7443)")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port is not a number in {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, port
