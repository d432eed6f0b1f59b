"""The console's one-time login links: one use, and stale after LINK_TTL."""

from __future__ import annotations

from aegis_edge_relay.http.console import LINK_TTL, Sessions


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_link_logs_in_once() -> None:
    sessions = Sessions(clock=Clock())
    code, expires_at = sessions.new_link("the-token")
    assert expires_at == 1000.0 + LINK_TTL
    assert "the-token" not in code
    assert sessions.redeem_link(code) == "the-token"
    assert sessions.redeem_link(code) is None


def test_a_stale_link_is_refused_and_forgotten() -> None:
    clock = Clock()
    sessions = Sessions(clock=clock)
    stale, _ = sessions.new_link("old")
    clock.now += LINK_TTL
    assert sessions.redeem_link(stale) is None
    fresh, _ = sessions.new_link("new")
    assert sessions.redeem_link(fresh) == "new"
    assert sessions.redeem_link("not-a-code") is None
