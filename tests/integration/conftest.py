"""Every integration module runs twice: its relays on SQLite in their data dirs, then on a
fresh PostgreSQL database. ``AEGIS_STORE_URL`` reaches every relay the tests start
(``RelayProcess.start`` or ``aegis relay serve`` directly, restarts included). Module scope,
because several modules share one relay across their tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import STORES
from tests.pg import store_for


@pytest.fixture(scope="module", params=STORES, autouse=True)
def relay_store_url(request: pytest.FixtureRequest) -> Iterator[str]:
    with store_for(request.param) as url, pytest.MonkeyPatch.context() as env:
        if url:
            env.setenv("AEGIS_STORE_URL", url)
        else:
            env.delenv("AEGIS_STORE_URL", raising=False)
        yield url
