"""The cluster identity rows on both stores: published keys, the cluster, endpoints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aegis_edge_relay.store import Store, open_store


@pytest.fixture
def store(store_url: str, tmp_path: Path) -> Iterator[Store]:
    opened = open_store(store_url, tmp_path)
    yield opened
    opened.close()


def test_relay_keys_are_kept_by_kid_and_never_replaced(store: Store) -> None:
    store.publish_relay_key("kid-a", b"\x01" * 32, 10.0)
    store.publish_relay_key("kid-b", b"\x02" * 32, 11.0)
    store.publish_relay_key("kid-a", b"\x09" * 32, 12.0)  # a second start of relay A
    assert store.load_relay_keys() == {"kid-a": b"\x01" * 32, "kid-b": b"\x02" * 32}


def test_the_first_relay_creates_the_cluster_and_later_ones_read_its_ca(store: Store) -> None:
    assert store.join_cluster("prod", "CA-ONE", 1.0) == "CA-ONE"
    assert store.join_cluster("prod", "CA-TWO", 2.0) == "CA-ONE"
    assert store.join_cluster("staging", "CA-TWO", 3.0) == "CA-TWO"


def test_endpoints_per_cluster_once_each(store: Store) -> None:
    store.publish_endpoint("r1", "prod", "b.example:7443", 1.0)
    store.publish_endpoint("r2", "prod", "a.example:7443", 1.0)
    store.publish_endpoint("r3", "prod", "a.example:7443", 1.0)  # behind one balanced name
    store.publish_endpoint("r4", "other", "c.example:7443", 1.0)
    store.publish_endpoint("r1", "prod", "b2.example:7443", 2.0)  # r1 moved
    assert store.cluster_endpoints("prod") == ["a.example:7443", "b2.example:7443"]
    assert store.cluster_endpoints("none") == []
