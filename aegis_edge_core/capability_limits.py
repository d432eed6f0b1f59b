"""Bounds on a daemon's capability snapshot (OS, arch, tools, labels).

A daemon describes itself at enrollment, in its hello and whenever that description
changes; the relay stores the snapshot in the node's row and keeps it in memory for every
selector. Nothing about that needs more than a few kilobytes, and an unbounded snapshot is
a cheap way to fill the relay's disk and memory (a 2 MB one was stored before these
limits). So a snapshot is bounded, field by field and as a whole:

=====================  =====================================================
field                  bound (:class:`CapabilityLimits` defaults)
=====================  =====================================================
whole snapshot         64 KiB encoded (``max_bytes``)
``tools``              256 names (``max_tools``), each 1..128 chars
``labels``             128 entries (``max_labels``); key 1..63 chars, value
                       at most 256 chars
``os``, ``arch``,      at most 256 chars each (``max_text``)
``hostname``,
``agent_version``
=====================  =====================================================

:func:`check_capabilities` raises :class:`CapabilityError`, whose sentence names the
field and the limit (``capabilities.labels.site: the value is 300 characters; the
limit is 256``). Per-field bounds are checked before the total, so the error points at
what to shorten. Both ends use it: the daemon refuses to send an oversize snapshot (and
the host config refuses an oversize label, see :mod:`aegis_edge_core.config`), the relay
refuses an enrollment that carries one (INVALID_ARGUMENT) and closes a stream whose
hello or CapabilityUpdate carries one (RESOURCE_EXHAUSTED, see
:class:`~aegis_edge_core.session.RelaySession`), storing nothing.

Relay-owned ``tags`` are not a daemon's to send; they count towards the total only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

import attrs

from aegis_edge_core.errors import AegisError
from aegis_edge_core.wire import common_pb2

__all__ = [
    "DEFAULT_CAPABILITY_LIMITS",
    "CapabilityError",
    "CapabilityLimits",
    "check_capabilities",
    "check_labels",
]


class CapabilityError(AegisError):
    """A capability snapshot is over a bound; ``field`` names it, ``limit`` is the bound."""

    def __init__(self, message: str, *, field: str, limit: int, hint: str = "") -> None:
        super().__init__(f"{field}: {message}", hint=hint)
        self.detail = message
        """The sentence without the field name."""
        self.field = field
        self.limit = limit


def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


@attrs.frozen(kw_only=True)
class CapabilityLimits:
    """The bounds :func:`check_capabilities` applies (see the module table)."""

    max_bytes: int = attrs.field(default=64 * 1024, validator=_positive)
    max_tools: int = attrs.field(default=256, validator=_positive)
    max_tool_name: int = attrs.field(default=128, validator=_positive)
    max_labels: int = attrs.field(default=128, validator=_positive)
    max_label_key: int = attrs.field(default=63, validator=_positive)
    max_label_value: int = attrs.field(default=256, validator=_positive)
    max_text: int = attrs.field(default=256, validator=_positive)


DEFAULT_CAPABILITY_LIMITS: Final = CapabilityLimits()


def check_labels(
    labels: Mapping[str, str],
    limits: CapabilityLimits = DEFAULT_CAPABILITY_LIMITS,
    *,
    field: str = "capabilities.labels",
) -> None:
    """Bound a label map: how many, and how long each key and value is."""
    if len(labels) > limits.max_labels:
        raise CapabilityError(
            f"{len(labels)} labels; the limit is {limits.max_labels}",
            field=field,
            limit=limits.max_labels,
            hint="describe the host with fewer labels (operators can add tags)",
        )
    for key, value in labels.items():
        if not 0 < len(key) <= limits.max_label_key:
            raise CapabilityError(
                f"a label name must be 1 to {limits.max_label_key} characters, got {len(key)}",
                field=f"{field}.{key[:40]}",
                limit=limits.max_label_key,
            )
        if len(value) > limits.max_label_value:
            raise CapabilityError(
                f"the value is {len(value)} characters; the limit is {limits.max_label_value}",
                field=f"{field}.{key}",
                limit=limits.max_label_value,
            )


def _check_tools(tools: Iterable[str], limits: CapabilityLimits) -> None:
    names = list(tools)
    if len(names) > limits.max_tools:
        raise CapabilityError(
            f"{len(names)} tools; the limit is {limits.max_tools}",
            field="capabilities.tools",
            limit=limits.max_tools,
            hint="allow fewer tools in the host's policy (tools.allow)",
        )
    for name in names:
        if not 0 < len(name) <= limits.max_tool_name:
            raise CapabilityError(
                f"a tool name must be 1 to {limits.max_tool_name} characters, got {len(name)}",
                field=f"capabilities.tools[{name[:40]!r}]",
                limit=limits.max_tool_name,
            )


def check_capabilities(
    caps: common_pb2.Capabilities, limits: CapabilityLimits = DEFAULT_CAPABILITY_LIMITS
) -> None:
    """Raise :class:`CapabilityError` if ``caps`` is over any bound; see the module table."""
    for name in ("os", "arch", "hostname", "agent_version"):
        value: str = getattr(caps, name)
        if len(value) > limits.max_text:
            raise CapabilityError(
                f"{len(value)} characters; the limit is {limits.max_text}",
                field=f"capabilities.{name}",
                limit=limits.max_text,
            )
    _check_tools(caps.tools, limits)
    check_labels(caps.labels, limits)
    size = caps.ByteSize()
    if size > limits.max_bytes:
        raise CapabilityError(
            f"the snapshot is {size} bytes encoded; the limit is {limits.max_bytes}",
            field="capabilities",
            limit=limits.max_bytes,
        )
