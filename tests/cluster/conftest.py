"""Three relay processes over one fresh PostgreSQL database: the cluster the multi-relay
tests share the shape of (each test gets its own database and relays)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg import fresh_database
from tests.relay.daemon_driver import RelayProcess

STALE: float = 3.0
"""The relays' stale threshold (seconds): their leases last half of it."""


@contextlib.contextmanager
def relay_cluster(
    root: Path, *extra: str, count: int = 3, stale: float = STALE
) -> Iterator[list[RelayProcess]]:
    """``count`` relays (each its own data dir, CA and signing key) over one new database."""
    with fresh_database() as url:
        relays: list[RelayProcess] = []
        try:
            for i in range(count):
                relays.append(
                    RelayProcess.start(
                        root / f"relay{i}",
                        "--stale-threshold",
                        f"{stale:g}s",
                        "--heartbeat-interval",
                        "0.5s",
                        *extra,
                        store_url=url,
                    )
                )
            yield relays
        finally:
            for relay in relays:
                relay.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[RelayProcess]]:
    with relay_cluster(tmp_path) as relays:
        yield relays
