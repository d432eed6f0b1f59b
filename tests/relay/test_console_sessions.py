"""The console's sessions and one-time login links, kept in the store: one use for a link,
stale after LINK_TTL, a session honoured by every relay over the store and ended at all of
them by one logout, and never the cookie, the code or the token in the database."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from aegis_edge_relay.http.console import COOKIE, LINK_TTL, Sessions
from aegis_edge_relay.store import SQLiteStore, StoreWorker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Iterator[StoreWorker]:
    worker = StoreWorker(SQLiteStore(tmp_path / "relay.db"))
    yield worker
    worker.close()


def with_cookie(sid: str) -> web.Request:
    return make_mocked_request("GET", "/", headers={"Cookie": f"{COOKIE}={sid}"})


def test_a_link_logs_in_once(db: StoreWorker) -> None:
    async def scenario() -> None:
        sessions = Sessions(db, clock=Clock())
        code, expires_at = await sessions.new_link("the-token")
        assert expires_at == 1000.0 + LINK_TTL
        assert "the-token" not in code
        assert await sessions.redeem_link(code) == "the-token"
        assert await sessions.redeem_link(code) is None

    asyncio.run(scenario())


def test_a_stale_link_is_refused_and_forgotten(db: StoreWorker) -> None:
    async def scenario() -> None:
        clock = Clock()
        sessions = Sessions(db, clock=clock)
        stale, _ = await sessions.new_link("old")
        clock.now += LINK_TTL
        assert await sessions.redeem_link(stale) is None
        fresh, _ = await sessions.new_link("new")
        assert await sessions.redeem_link(fresh) == "new"
        assert await sessions.redeem_link("not-a-code") is None

    asyncio.run(scenario())


def test_a_session_is_shared_through_the_store_and_ends_with_its_token(
    db: StoreWorker, tmp_path: Path
) -> None:
    async def scenario() -> list[str]:
        clock = Clock()
        here, there = Sessions(db, clock=clock), Sessions(db, clock=clock)
        sid, opened = await here.open("operator-token-xyz", 1500.0)
        found = await there.find(sid)
        assert found is not None and found.token == "operator-token-xyz"
        assert found.csrf == opened.csrf and found.expires_at == 1500.0
        assert await there.find(sid[:-1] + ("A" if sid[-1] != "A" else "B")) is None
        clock.now = 1500.0  # the token expired: so did the session
        assert await there.find(sid) is None
        clock.now = 1000.0
        assert await here.still_open(with_cookie(sid))
        await there.close(with_cookie(sid))  # a logout at the other relay
        assert not await here.still_open(with_cookie(sid))
        await here.open("operator-token-xyz", 1500.0)
        code, _ = await here.new_link("operator-token-xyz")
        return [sid, code, opened.csrf, "operator-token-xyz"]

    secrets = asyncio.run(scenario())
    dump = "\n".join(sqlite3.connect(tmp_path / "relay.db").iterdump())
    for secret in secrets:
        assert secret not in dump


def test_without_its_store_the_console_answers_503_not_a_crash(tmp_path: Path) -> None:
    from aiohttp.test_utils import TestClient, TestServer
    from prometheus_client import CollectorRegistry

    from aegis_edge_relay.http.app import make_app

    store = SQLiteStore(tmp_path / "relay.db")
    worker = StoreWorker(store)
    store.close()  # the database is gone: every store call is unavailable

    async def ready() -> None:
        return None

    async def scenario() -> tuple[int, str, int]:
        app = make_app(
            registry=CollectorRegistry(),
            ready=ready,
            admin=None,  # type: ignore[arg-type]
            check_token=lambda token: 2e9,
            db=worker,
        )
        async with TestClient(TestServer(app)) as client:
            page = await client.get("/", headers={"Cookie": f"{COOKIE}=some-session"})
            login = await client.post("/login", data={"token": "t"}, allow_redirects=False)
            return page.status, page.content_type, login.status

    try:
        assert asyncio.run(scenario()) == (503, "application/problem+json", 503)
    finally:
        worker.close()
