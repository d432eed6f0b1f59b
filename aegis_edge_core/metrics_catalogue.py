"""The seven ``aegis_edge_*`` metrics of the seed, as data.

Servers build their instruments from :data:`CATALOGUE` so that names, types, labels and help
texts are written down exactly once, and tests and alert rules can check against the same
list. ``name`` is the name as *exposed* (what PromQL and alert rules use). Prometheus
clients that append ``_total`` to counters by themselves should be given
:attr:`MetricSpec.declared_name`.

The ``status`` label of ``aegis_edge_daemons_total`` takes exactly the seed's status pills,
:data:`DAEMON_STATUSES`.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs

__all__ = [
    "CATALOGUE",
    "COMMANDS_DISPATCHED",
    "COMMAND_DURATION",
    "DAEMONS",
    "DAEMON_STATUSES",
    "DURATION_BUCKETS",
    "FLEET_RUNS",
    "FLEET_TARGETS_SKIPPED",
    "HEARTBEATS",
    "STREAM_SECONDS",
    "MetricKind",
    "MetricSpec",
    "by_name",
]


class MetricKind(enum.StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@attrs.frozen(kw_only=True)
class MetricSpec:
    """One metric: exposed name, kind, label names (in order) and help text."""

    name: str
    kind: MetricKind
    labels: tuple[str, ...]
    help: str

    @property
    def declared_name(self) -> str:
        """The name to give a client that appends ``_total`` to counters itself."""
        if self.kind is MetricKind.COUNTER:
            return self.name.removesuffix("_total")
        return self.name


DAEMON_STATUSES: Final[tuple[str, ...]] = ("Connected", "Unhealthy", "Disconnected", "Revoked")

DAEMONS: Final = MetricSpec(
    name="aegis_edge_daemons_total",
    kind=MetricKind.GAUGE,
    labels=("status", "tenant"),
    help="Count of edge daemons by status and tenant.",
)
STREAM_SECONDS: Final = MetricSpec(
    name="aegis_edge_stream_seconds_total",
    kind=MetricKind.COUNTER,
    labels=(),
    help="Aggregate stream lifetime.",
)
HEARTBEATS: Final = MetricSpec(
    name="aegis_edge_heartbeats_total",
    kind=MetricKind.COUNTER,
    labels=("tenant",),
    help="Heartbeat events received.",
)
COMMANDS_DISPATCHED: Final = MetricSpec(
    name="aegis_edge_commands_dispatched_total",
    kind=MetricKind.COUNTER,
    labels=("tool", "outcome"),
    help="Per-tool dispatch outcomes.",
)
COMMAND_DURATION: Final = MetricSpec(
    name="aegis_edge_command_duration_seconds",
    kind=MetricKind.HISTOGRAM,
    labels=("tool",),
    help="Per-tool dispatch latency.",
)
FLEET_RUNS: Final = MetricSpec(
    name="aegis_edge_fleet_runs_total",
    kind=MetricKind.COUNTER,
    labels=("outcome",),
    help="Fleet runs by outcome.",
)
FLEET_TARGETS_SKIPPED: Final = MetricSpec(
    name="aegis_edge_fleet_targets_skipped_total",
    kind=MetricKind.COUNTER,
    labels=("reason",),
    help="Per-skip-reason counts.",
)

CATALOGUE: Final[tuple[MetricSpec, ...]] = (
    DAEMONS,
    STREAM_SECONDS,
    HEARTBEATS,
    COMMANDS_DISPATCHED,
    COMMAND_DURATION,
    FLEET_RUNS,
    FLEET_TARGETS_SKIPPED,
)

DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
"""Buckets of ``aegis_edge_command_duration_seconds``: a ping is milliseconds, an upgrade
script minutes."""


def by_name(name: str) -> MetricSpec:
    """The spec whose exposed name is ``name``; ``KeyError`` if it is not in the catalogue."""
    for spec in CATALOGUE:
        if spec.name == name:
            return spec
    raise KeyError(name)
