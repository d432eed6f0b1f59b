"""Fixtures every test directory may use: the relay store under test, on both stores."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pg import store_for

STORES = ("sqlite", "postgresql")


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """``""`` (SQLite in the data dir) or the URL of a fresh PostgreSQL database."""
    with store_for(request.param) as url:
        yield url
