"""The revocation list: jtis with a prune-after time, key thumbprints forever."""

from __future__ import annotations

import pytest

from aegis_edge_core.identity import RevocationList, Revocations


def test_revoke_and_prune() -> None:
    rl = RevocationList()
    rl.revoke_token("a", prune_after=100.0)
    rl.revoke_token("b", prune_after=200.0)
    rl.revoke_key("thumb")
    assert rl.is_token_revoked("a") and rl.is_token_revoked("b")
    assert rl.is_key_revoked("thumb") and not rl.is_key_revoked("other")
    assert len(rl) == 3
    assert rl.prune(150.0) == 1
    assert not rl.is_token_revoked("a") and rl.is_token_revoked("b")
    assert rl.prune(10_000.0) == 1
    assert rl.is_key_revoked("thumb")  # keys never expire


def test_revoking_twice_keeps_the_later_time() -> None:
    rl = RevocationList()
    rl.revoke_token("a", prune_after=500.0)
    rl.revoke_token("a", prune_after=100.0)
    assert rl.prune(200.0) == 0
    assert rl.tokens == {"a": 500.0}


def test_round_trip_through_the_store() -> None:
    rl = RevocationList()
    rl.revoke_token("a", prune_after=1.0)
    rl.revoke_key("k")
    again = RevocationList.from_entries(tokens=rl.tokens, keys=rl.keys)
    assert again.tokens == rl.tokens and again.keys == rl.keys


def test_validation() -> None:
    rl = RevocationList()
    with pytest.raises(ValueError):
        rl.revoke_token("", prune_after=1.0)
    with pytest.raises(ValueError):
        rl.revoke_token("a", prune_after=float("nan"))
    with pytest.raises(ValueError):
        rl.revoke_key("")


def test_is_a_revocations_provider() -> None:
    provider: Revocations = RevocationList()
    assert not provider.is_token_revoked("x")
