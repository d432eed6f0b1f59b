"""When a node token is due for a refresh, by its lifetime."""

from __future__ import annotations

import pytest

from aegis_edge_core.identity import DEFAULT_REFRESH_MARGIN, needs_refresh, refresh_margin


def test_a_day_long_token_is_refreshed_in_its_last_hour() -> None:
    assert refresh_margin(86400.0) == DEFAULT_REFRESH_MARGIN


def test_a_short_token_is_refreshed_in_its_last_quarter() -> None:
    assert refresh_margin(60.0) == 15.0
    issued_at, ttl = 1000.0, 60.0
    expires = issued_at + ttl
    assert not needs_refresh(expires, issued_at, refresh_margin(ttl))
    assert needs_refresh(expires, expires - 15.0, refresh_margin(ttl))


@pytest.mark.parametrize("ttl", [0.0, -1.0, float("inf"), float("nan")])
def test_a_lifetime_that_is_no_lifetime_is_refused(ttl: float) -> None:
    with pytest.raises(ValueError, match="token_ttl"):
        refresh_margin(ttl)
