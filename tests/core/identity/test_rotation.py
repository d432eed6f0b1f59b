"""Key rotation proofs, token refresh, and what an old token meets after a rotation."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from aegis_edge_core.identity import (
    AttestationError,
    RevocationList,
    RotationError,
    RotationProof,
    VerifiedRotation,
    needs_refresh,
    rotation_transcript,
    sign_attestation,
    sign_rotation,
    verify_attestation,
    verify_rotation,
)

from .helpers import NONCE, NOW, node_key, node_token, record, split, verifier

OLD, NEW = node_key(1), node_key(2)


def proof(**changes: Any) -> RotationProof:
    return attrs.evolve(
        sign_rotation(old_key=OLD, new_key=NEW, node_id="node-1", nonce=NONCE), **changes
    )


def verify(p: RotationProof, **kwargs: Any) -> VerifiedRotation:
    args: dict[str, Any] = {
        "node_id": "node-1",
        "old_public_key": OLD.public_key.raw,
        "nonce": NONCE,
    }
    args.update(kwargs)
    return verify_rotation(proof=p, **args)


def refusal(p: RotationProof, **kwargs: Any) -> RotationError:
    with pytest.raises(RotationError) as info:
        verify(p, **kwargs)
    return info.value


def test_valid_rotation() -> None:
    result = verify(proof())
    assert result.new_public_key == NEW.public_key.raw
    assert result.new_key_thumbprint == NEW.thumbprint
    assert result.old_key_thumbprint == OLD.thumbprint


def test_transcript_is_domain_separated() -> None:
    assert rotation_transcript(node_id="n", new_public_key=b"k", nonce=b"n").startswith(
        b"aegis-edge/v1/rotate\x00"
    )


def test_old_signature_must_verify() -> None:
    bad = proof(old_key_signature=node_key(3).sign(b"x"))
    assert refusal(bad).reason == "bad_signature"


def test_new_signature_must_verify() -> None:
    # Somebody else's public key with our own signature: the new key proves nothing.
    p = sign_rotation(old_key=OLD, new_key=node_key(3), node_id="node-1", nonce=NONCE)
    assert refusal(proof(new_key_signature=p.new_key_signature)).reason == "bad_signature"


def test_bound_to_session_nonce_and_node() -> None:
    assert refusal(proof(), nonce=b"\x01" * 32).reason == "bad_signature"
    assert refusal(proof(), node_id="node-2").reason == "bad_signature"


def test_signed_by_a_key_other_than_the_stored_one() -> None:
    assert refusal(proof(), old_public_key=node_key(4).public_key.raw).reason == "bad_signature"


def test_same_key_is_refused() -> None:
    same = sign_rotation(old_key=OLD, new_key=OLD, node_id="node-1", nonce=NONCE)
    assert refusal(same).reason == "key_mismatch"


def test_malformed() -> None:
    assert refusal(proof(new_public_key=b"\x00" * 5)).reason == "malformed"
    assert refusal(proof(old_key_signature=b"")).reason == "malformed"


def test_revoked_new_key() -> None:
    revocations = RevocationList()
    revocations.revoke_key(NEW.thumbprint)
    assert refusal(proof(), revocations=revocations).reason == "revoked"


def test_old_token_after_rotation() -> None:
    """The relay stores the new key and revokes the old token; the old token is dead."""
    old_token = node_token(key=OLD)
    verify(proof())
    revocations = RevocationList()
    revocations.revoke_token(split(old_token)[1]["jti"], prune_after=NOW + 86400 + 60)
    new_record = record(key=NEW)
    signature = sign_attestation(NEW, protocol_version=1, node_id="node-1", nonce=NONCE)
    common: dict[str, Any] = {
        "signature": signature,
        "nonce": NONCE,
        "protocol_version": 1,
        "node_id": "node-1",
        "verifier": verifier(),
        "node_record": new_record,
        "now": NOW + 100,
        "host_time": None,
    }
    with pytest.raises(AttestationError) as info:
        verify_attestation(token=old_token, revocations=revocations, **common)
    assert info.value.reason == "revoked"
    # Even once the revocation entry is pruned, the old token's cnf no longer matches.
    with pytest.raises(AttestationError) as info:
        verify_attestation(token=old_token, revocations=RevocationList(), **common)
    assert info.value.reason == "key_mismatch"
    new_token = node_token(key=NEW, now=NOW + 100)
    result = verify_attestation(token=new_token, revocations=revocations, **common)
    assert result.key_thumbprint == NEW.thumbprint


def test_needs_refresh() -> None:
    expires = NOW + 86400
    assert not needs_refresh(expires, NOW)
    assert not needs_refresh(expires, expires - 3601)
    assert needs_refresh(expires, expires - 3600)
    assert needs_refresh(expires, expires + 10)
    assert needs_refresh(expires, NOW, margin=86400)
    assert not needs_refresh(expires, NOW, 0)
    with pytest.raises(ValueError):
        needs_refresh(expires, NOW, -1)
    with pytest.raises(ValueError):
        needs_refresh(float("inf"), NOW)
