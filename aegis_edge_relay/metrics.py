"""The relay's Prometheus metrics, built from the core's catalogue, on their own registry.

The relay's HTTP server (:mod:`aegis_edge_relay.http`) serves them at ``/metrics`` with
prometheus_client's own exposition of :attr:`RelayMetrics.registry`.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from aegis_edge_core import metrics_catalogue as cat

__all__ = ["RelayMetrics"]


class RelayMetrics:
    """The seven seed metrics plus the relay's own stream-protocol-error counter."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.daemons = Gauge(
            cat.DAEMONS.declared_name, cat.DAEMONS.help, cat.DAEMONS.labels, registry=r
        )
        self.stream_seconds = Counter(
            cat.STREAM_SECONDS.declared_name, cat.STREAM_SECONDS.help, registry=r
        )
        self.heartbeats = Counter(
            cat.HEARTBEATS.declared_name, cat.HEARTBEATS.help, cat.HEARTBEATS.labels, registry=r
        )
        self.commands_dispatched = Counter(
            cat.COMMANDS_DISPATCHED.declared_name,
            cat.COMMANDS_DISPATCHED.help,
            cat.COMMANDS_DISPATCHED.labels,
            registry=r,
        )
        self.command_duration = Histogram(
            cat.COMMAND_DURATION.declared_name,
            cat.COMMAND_DURATION.help,
            cat.COMMAND_DURATION.labels,
            buckets=cat.DURATION_BUCKETS,
            registry=r,
        )
        self.fleet_runs = Counter(
            cat.FLEET_RUNS.declared_name, cat.FLEET_RUNS.help, cat.FLEET_RUNS.labels, registry=r
        )
        self.fleet_targets_skipped = Counter(
            cat.FLEET_TARGETS_SKIPPED.declared_name,
            cat.FLEET_TARGETS_SKIPPED.help,
            cat.FLEET_TARGETS_SKIPPED.labels,
            registry=r,
        )
        self.stream_protocol_errors = Counter(
            "aegis_edge_stream_protocol_errors",
            "Daemon streams closed because the peer broke the protocol, by reason.",
            ("reason",),
            registry=r,
        )
        self.refusals = Counter(
            "aegis_edge_attestation_refusals",
            "Daemon connections refused before or at attestation, by reason (a failed "
            "attestation, rate_limited, handshake_timeout, too_many_unattested).",
            ("reason",),
            registry=r,
        )
        self.token_refreshes = Counter(
            "aegis_edge_token_refreshes",
            "Node token refreshes daemons asked for, by result (issued, rate_limited).",
            ("result",),
            registry=r,
        )
        self.enrollment_refusals = Counter(
            "aegis_edge_enrollment_refusals",
            "Enrollment attempts refused, by reason.",
            ("reason",),
            registry=r,
        )
        self.cluster_syncs = Counter(
            "aegis_edge_cluster_syncs",
            "Cluster syncs of this relay (a shared store only), by read: feed (the rows "
            "changed since the last sync) or full (every row: at start and every few minutes).",
            ("read",),
            registry=r,
        )
        self.cluster_sync_rows = Counter(
            "aegis_edge_cluster_sync_rows",
            "Node and stream-holder rows cluster syncs read, by read (feed, full).",
            ("read",),
            registry=r,
        )
        self._lock = threading.Lock()
        self._daemon_counts: Tally[tuple[str, str]] = Tally()
        self._tenants: set[str] = set()

    # -- daemons_total{status,tenant}: kept as exact counts, every status exported per tenant

    def set_daemon_counts(self, counts: Iterable[tuple[str, str]]) -> None:
        """Reset the gauge from ``(tenant, status)`` pairs, one per daemon."""
        with self._lock:
            self._daemon_counts = Tally(counts)
            for tenant, _ in self._daemon_counts:
                self._tenants.add(tenant)
            self._publish()

    def daemon_moved(self, tenant: str, old: str | None, new: str | None) -> None:
        with self._lock:
            if old is not None:
                self._daemon_counts[(tenant, old)] -= 1
            if new is not None:
                self._daemon_counts[(tenant, new)] += 1
            self._tenants.add(tenant)
            self._publish_tenant(tenant)

    def _publish(self) -> None:
        for tenant in self._tenants:
            self._publish_tenant(tenant)

    def _publish_tenant(self, tenant: str) -> None:
        for status in cat.DAEMON_STATUSES:
            value = max(0, self._daemon_counts[(tenant, status)])
            self.daemons.labels(status=status, tenant=tenant).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
