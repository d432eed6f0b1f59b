"""The fleet view taking the change feed's rows while the relay's own writes are in flight:
a node the feed brought before its enrollment returned is not loaded twice."""

from __future__ import annotations

import time
from pathlib import Path

from aegis_edge_core.health import DaemonStatus, HealthTracker
from aegis_edge_relay.cluster import ClusterView
from aegis_edge_relay.fleetview import FleetView
from aegis_edge_relay.metrics import RelayMetrics
from aegis_edge_relay.state import NodeState
from aegis_edge_relay.store import SQLiteStore, StoreWorker
from tests.relay.test_store import node


def test_a_node_the_feed_brought_first_is_kept_when_its_enrollment_returns(
    tmp_path: Path,
) -> None:
    db = StoreWorker(SQLiteStore(tmp_path / "relay.db"))
    try:
        metrics = RelayMetrics()
        cluster = ClusterView(
            relay_id="r1",
            db=db,
            clock=time.time,
            stale_threshold=3.0,
            shared=False,
            metrics=metrics,
        )
        fleet = FleetView(
            health=HealthTracker(stale_threshold_secs=3.0, heartbeat_interval_secs=1.0),
            metrics=metrics,
            db=db,
            clock=time.time,
            cluster=cluster,
        )
        record = node("n1")
        assert fleet.merge([record]) == []  # the feed's read lands first...
        fleet.enrolled(NodeState.from_record(record))  # ...then the enrollment's own step
        assert list(fleet.nodes) == ["n1"]
        assert fleet.status_of("n1") is DaemonStatus.DISCONNECTED
    finally:
        db.close()
