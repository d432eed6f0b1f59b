"""Attestation: every connect proves possession of the node key; every refusal has a reason."""

from __future__ import annotations

from typing import Any

import pytest

from aegis_edge_core.identity import (
    AttestationError,
    NodeKey,
    RevocationList,
    TokenVerifier,
    VerifiedAttestation,
    attestation_transcript,
    sign_attestation,
    verify_attestation,
)

from .helpers import (
    NONCE,
    NOW,
    enrollment_token,
    node_key,
    node_token,
    operator_token,
    record,
    relay_key,
    resign,
    split,
    verifier,
)


def attest(
    *,
    token: str | None = None,
    key: NodeKey | None = None,
    signature: bytes | None = None,
    node_id: str = "node-1",
    nonce: bytes = NONCE,
    signed_nonce: bytes | None = None,
    protocol_version: int = 1,
    node_record: Any = "default",
    revocations: RevocationList | None = None,
    now: float = NOW + 10,
    host_time: float | None = None,
    verifier_: TokenVerifier | None = None,
    **extra: Any,
) -> VerifiedAttestation:
    key = key or node_key()
    if signature is None:
        signature = sign_attestation(
            key, protocol_version=protocol_version, node_id=node_id, nonce=signed_nonce or nonce
        )
    return verify_attestation(
        token=node_token() if token is None else token,
        signature=signature,
        nonce=nonce,
        protocol_version=protocol_version,
        node_id=node_id,
        verifier=verifier_ or verifier(),
        node_record=record() if node_record == "default" else node_record,
        revocations=revocations or RevocationList(),
        now=now,
        host_time=host_time,
        **extra,
    )


def refusal(**kwargs: Any) -> AttestationError:
    with pytest.raises(AttestationError) as info:
        attest(**kwargs)
    return info.value


class TestTranscript:
    def test_layout_is_domain_separated_and_length_prefixed(self) -> None:
        data = attestation_transcript(protocol_version=1, node_id="n", nonce=b"\x01\x02")
        assert data == (
            b"aegis-edge/v1/attest\x00"
            + b"\x00\x00\x00\x04\x00\x00\x00\x01"
            + b"\x00\x00\x00\x01n"
            + b"\x00\x00\x00\x02\x01\x02"
        )

    def test_fields_cannot_slide_into_each_other(self) -> None:
        a = attestation_transcript(protocol_version=1, node_id="ab", nonce=b"c" * 16)
        b = attestation_transcript(protocol_version=1, node_id="a", nonce=b"b" + b"c" * 16)
        assert a != b

    def test_protocol_version_bounds(self) -> None:
        with pytest.raises(ValueError):
            attestation_transcript(protocol_version=-1, node_id="n", nonce=b"")
        with pytest.raises(ValueError):
            attestation_transcript(protocol_version=True, node_id="n", nonce=b"")


class TestAccepted:
    def test_fresh_token(self) -> None:
        result = attest()
        assert result.node_id == "node-1"
        assert result.tenant_id == "tenant-a"
        assert result.nonce == NONCE
        assert result.key_thumbprint == node_key().thumbprint
        assert not result.token_expired
        assert result.token_expires_at == NOW + 24 * 3600
        assert result.token_jti == split(node_token())[1]["jti"] or result.token_jti

    def test_expired_token_still_attests_with_the_key(self) -> None:
        # The key is the identity: a daemon offline for a month comes back.
        result = attest(now=NOW + 30 * 86400)
        assert result.token_expired
        assert result.token_expires_at == NOW + 24 * 3600

    def test_small_clock_skew_is_fine(self) -> None:
        assert attest(host_time=NOW + 10 - 250).node_id == "node-1"

    def test_skew_check_can_be_turned_off(self) -> None:
        assert attest(host_time=NOW - 10_000, max_clock_skew=None).node_id == "node-1"


class TestRefusals:
    def test_malformed_token(self) -> None:
        assert refusal(token="not-a-token").reason == "malformed"

    def test_malformed_signature(self) -> None:
        assert refusal(signature=b"\x00" * 63).reason == "malformed"
        assert refusal(signature=b"").reason == "malformed"

    @pytest.mark.parametrize("node_id", ["", "x" * 300, "bad\nid"])
    def test_malformed_node_id(self, node_id: str) -> None:
        assert refusal(node_id=node_id, node_record=None).reason == "malformed"

    def test_bad_transcript_signature(self) -> None:
        err = refusal(signature=node_key().sign(b"something else"))
        assert err.reason == "bad_signature"

    def test_signature_over_an_old_nonce(self) -> None:
        err = refusal(signed_nonce=b"\xff" * 32)
        assert err.reason == "bad_signature"

    def test_signature_for_another_protocol_version(self) -> None:
        signature = sign_attestation(node_key(), protocol_version=2, node_id="node-1", nonce=NONCE)
        assert refusal(signature=signature).reason == "bad_signature"

    def test_signature_by_another_key(self) -> None:
        assert refusal(key=node_key(2)).reason == "bad_signature"

    def test_forged_token(self) -> None:
        assert refusal(token=node_token(relay=relay_key(7))).reason == "bad_signature"

    def test_alg_none_token(self) -> None:
        header, payload, _ = split(node_token())
        header["alg"] = "none"
        from .helpers import segment

        token = f"{segment(header)}.{segment(payload)}."
        assert refusal(token=token).reason == "bad_signature"

    @pytest.mark.parametrize("make", [enrollment_token, operator_token])
    def test_wrong_audience(self, make: Any) -> None:
        assert refusal(token=make()).reason == "wrong_audience"

    def test_not_yet_valid(self) -> None:
        err = refusal(token=node_token(now=NOW + 400), now=NOW)
        assert err.reason == "not_yet_valid"
        assert "400 s in this relay's future" in str(err)

    def test_unknown_node(self) -> None:
        err = refusal(node_record=None)
        assert err.reason == "unknown_node"
        assert "re-enroll" in err.hint

    def test_key_mismatch_between_token_and_store(self) -> None:
        # The token is bound to node key 1; the store says the node has key 2.
        err = refusal(node_record=record(key=node_key(2)), key=node_key(2))
        assert err.reason == "key_mismatch"

    def test_token_for_another_node_is_key_mismatch(self) -> None:
        token = node_token(node_id="node-2")
        err = refusal(token=token)
        assert err.reason == "key_mismatch"

    def test_token_for_tenant_a_on_tenant_b_node(self) -> None:
        token = node_token(tenant_id="tenant-a")
        err = refusal(token=token, node_record=record(tenant_id="tenant-b"))
        assert err.reason == "wrong_tenant"

    def test_revoked_node_record(self) -> None:
        err = refusal(node_record=record(revoked=True))
        assert err.reason == "revoked"
        assert "re-enroll" in err.hint

    def test_revoked_token(self) -> None:
        token = node_token()
        revocations = RevocationList()
        revocations.revoke_token(split(token)[1]["jti"], prune_after=NOW + 86400)
        assert refusal(token=token, revocations=revocations).reason == "revoked"

    def test_revoked_key(self) -> None:
        revocations = RevocationList()
        revocations.revoke_key(node_key().thumbprint)
        assert refusal(revocations=revocations).reason == "revoked"

    def test_revoked_wins_over_expired_token_and_skew(self) -> None:
        err = refusal(
            node_record=record(revoked=True), now=NOW + 90 * 86400, host_time=NOW - 10_000
        )
        assert err.reason == "revoked"

    def test_clock_skew_names_the_offset(self) -> None:
        err = refusal(host_time=NOW + 10 - 312)
        assert err.reason == "clock_skew"
        assert err.message == "host clock is 312 s behind the relay"
        assert "NTP" in err.hint
        err = refusal(host_time=NOW + 10 + 3600)
        assert "3600 s ahead of the relay" in str(err)

    def test_unreadable_host_clock(self) -> None:
        assert refusal(host_time=float("nan")).reason == "clock_skew"

    def test_token_with_bad_cnf(self) -> None:
        header, payload, _ = split(node_token())
        payload["cnf"] = {}
        token = resign(header, payload, relay_key())
        assert refusal(token=token).reason == "malformed"


class TestCallerBugs:
    def test_short_nonce(self) -> None:
        with pytest.raises(ValueError):
            attest(nonce=b"short")

    def test_record_for_another_node(self) -> None:
        with pytest.raises(ValueError):
            attest(node_record=record(node_id="node-9"))

    def test_record_validation(self) -> None:
        with pytest.raises(ValueError):
            record(node_id="")
        from aegis_edge_core.identity import NodeRecord

        with pytest.raises(ValueError):
            NodeRecord(node_id="n", tenant_id="t", public_key=b"short")
