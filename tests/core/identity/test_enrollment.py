"""Enrollment redemption: single use, tenant from the token, proof of possession."""

from __future__ import annotations

from typing import Any

import pytest

from aegis_edge_core.identity import (
    EnrollmentError,
    EnrollmentGrant,
    RevocationList,
    enrollment_transcript,
    peek_enrollment_token,
    redeem_enrollment,
    sign_enrollment,
)

from .helpers import CA_PIN, NOW, enrollment_token, node_key, node_token, relay_key, verifier


def redeem(
    token: str | None = None,
    *,
    key: Any = None,
    public_key: bytes | None = None,
    proof: bytes | None = None,
    redeemed: Any = frozenset(),
    now: float = NOW + 5,
    revocations: RevocationList | None = None,
) -> EnrollmentGrant:
    token = enrollment_token() if token is None else token
    key = key or node_key()
    if proof is None:
        proof = sign_enrollment(key, token_jti=peek_enrollment_token(token).jti)
    return redeem_enrollment(
        token=token,
        public_key=key.public_key.raw if public_key is None else public_key,
        proof=proof,
        verifier=verifier(),
        already_redeemed=redeemed,
        now=now,
        revocations=revocations,
    )


def refusal(*args: Any, **kwargs: Any) -> EnrollmentError:
    with pytest.raises(EnrollmentError) as info:
        redeem(*args, **kwargs)
    return info.value


def test_grant_carries_everything_from_the_token() -> None:
    token = enrollment_token(tenant_id="tenant-z", token_jti="enroll-1")
    grant = redeem(token)
    assert grant.tenant_id == "tenant-z"
    assert grant.token_jti == "enroll-1"
    assert grant.relay_endpoint == "relay.example.net:7443"
    assert grant.ca_pin == CA_PIN
    assert grant.public_key == node_key().public_key.raw
    assert grant.key_thumbprint == node_key().thumbprint
    assert grant.token_expires_at == NOW + 900


def test_transcript_is_domain_separated() -> None:
    data = enrollment_transcript(token_jti="j", public_key=b"k" * 32)
    assert data.startswith(b"aegis-edge/v1/enroll\x00")


def test_replayed_with_a_set() -> None:
    token = enrollment_token(token_jti="enroll-2")
    store: set[str] = set()
    grant = redeem(token, redeemed=store)
    store.add(grant.token_jti)  # the relay's store records
    err = refusal(token, redeemed=store, key=node_key(2))
    assert err.reason == "replayed"
    assert "already been used" in str(err)


def test_replayed_with_a_callable() -> None:
    token = enrollment_token(token_jti="enroll-3")
    assert refusal(token, redeemed=lambda jti: jti == "enroll-3").reason == "replayed"
    assert redeem(token, redeemed=lambda jti: False).token_jti == "enroll-3"


def test_expired() -> None:
    err = refusal(now=NOW + 900 + 61)
    assert err.reason == "expired"
    assert "tokens issue" in err.hint


def test_not_yet_valid() -> None:
    assert refusal(now=NOW - 500).reason == "not_yet_valid"


def test_node_token_is_not_an_enrollment_token() -> None:
    token = node_token()
    err = refusal(token, proof=b"\x00" * 64)
    assert err.reason == "wrong_audience"


def test_forged_token() -> None:
    from .helpers import issuer

    forged = (
        issuer(relay_key(5))
        .issue_enrollment_token(
            tenant_id="tenant-a", relay_endpoint="evil:1", ca_pin=CA_PIN, now=NOW, jti="x" * 8
        )
        .token
    )
    assert refusal(forged).reason == "bad_signature"


def test_proof_by_another_key() -> None:
    token = enrollment_token()
    proof = sign_enrollment(node_key(2), token_jti=peek_enrollment_token(token).jti)
    assert refusal(token, proof=proof).reason == "bad_signature"


def test_proof_for_another_token() -> None:
    assert refusal(proof=sign_enrollment(node_key(), token_jti="other")).reason == "bad_signature"


def test_malformed_key_and_proof() -> None:
    assert refusal(public_key=b"\x00" * 31).reason == "malformed"
    assert refusal(proof=b"\x00" * 10).reason == "malformed"


def test_revoked_key_cannot_enroll_again() -> None:
    revocations = RevocationList()
    revocations.revoke_key(node_key().thumbprint)
    assert refusal(revocations=revocations).reason == "revoked"


def test_revoked_token() -> None:
    token = enrollment_token(token_jti="enroll-4")
    revocations = RevocationList()
    revocations.revoke_token("enroll-4", prune_after=NOW + 960)
    assert refusal(token, revocations=revocations).reason == "revoked"
