"""Key rotation and token refresh.

Rotation replaces a node's key without re-enrolling. It runs over an attested stream, so
the relay already knows which node it is talking to and holds this session's
attestation nonce. The daemon makes a new key and sends :class:`RotationProof`: the new
public key and two signatures, by the old key and by the new key, over
:func:`rotation_transcript` (domain label, node id, new public key, nonce).

* The **old** key's signature says the node's current identity consents: a stolen
  token alone cannot swap in an attacker's key.
* The **new** key's signature proves somebody holds it, so a node cannot be rotated to
  a key nobody can use (or someone else's public key).
* The **nonce** makes the proof good for this session only; a recorded proof cannot be
  replayed later to roll a node back to a key it abandoned.

On success the relay stores the new key, issues a node token bound to it and revokes
both the old token (``RevocationList.revoke_token``) and the old key
(``RevocationList.revoke_key``, in the same store transaction). The old key is retired for
good: a copy left in a backup must not enroll again as a new node (enrollment refuses a
revoked key) nor attest with the old token (``revoked``, before the ``cnf`` check would
say ``key_mismatch``). The daemon swaps its ``node.key`` atomically only once the relay
has confirmed.

Token refresh is simpler: :func:`needs_refresh` tells either side when a node token is
close enough to expiry to ask for (or push) a fresh one over the stream.
"""

from __future__ import annotations

import math
from typing import Final

import attrs

from aegis_edge_core.identity._codec import transcript
from aegis_edge_core.identity.errors import RotationError
from aegis_edge_core.identity.keys import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, NodeKey, PublicKey
from aegis_edge_core.identity.revocation import Revocations

__all__ = [
    "DEFAULT_REFRESH_MARGIN",
    "RotationProof",
    "VerifiedRotation",
    "needs_refresh",
    "rotation_transcript",
    "sign_rotation",
    "verify_rotation",
]

DEFAULT_REFRESH_MARGIN: Final = 3600.0
"""Refresh a node token once it has less than an hour left (of the default 24)."""


def rotation_transcript(*, node_id: str, new_public_key: bytes, nonce: bytes) -> bytes:
    """The bytes both keys sign: ``aegis-edge/v1/rotate NUL`` + length-prefixed node id
    (UTF-8), new raw public key and the session's attestation nonce."""
    if not isinstance(node_id, str):
        raise TypeError("node_id is a str")
    if not isinstance(new_public_key, bytes) or not isinstance(nonce, bytes):
        raise TypeError("new_public_key and nonce are bytes")
    return transcript(b"rotate", node_id.encode("utf-8"), new_public_key, nonce)


@attrs.frozen(kw_only=True)
class RotationProof:
    """What the daemon sends to rotate (``RotateKey`` on the wire, field for field)."""

    new_public_key: bytes
    old_key_signature: bytes = attrs.field(repr=False)
    new_key_signature: bytes = attrs.field(repr=False)


@attrs.frozen(kw_only=True)
class VerifiedRotation:
    """An accepted rotation: store ``new_public_key`` for ``node_id``."""

    node_id: str
    old_key_thumbprint: str
    new_public_key: bytes = attrs.field(repr=False)
    new_key_thumbprint: str


def sign_rotation(
    *, old_key: NodeKey, new_key: NodeKey, node_id: str, nonce: bytes
) -> RotationProof:
    """The daemon's rotation proof, signed by both keys."""
    new_public_key = new_key.public_key.raw
    message = rotation_transcript(node_id=node_id, new_public_key=new_public_key, nonce=nonce)
    return RotationProof(
        new_public_key=new_public_key,
        old_key_signature=old_key.sign(message),
        new_key_signature=new_key.sign(message),
    )


def verify_rotation(
    *,
    proof: RotationProof,
    node_id: str,
    old_public_key: bytes,
    nonce: bytes,
    revocations: Revocations | None = None,
) -> VerifiedRotation:
    """Decide a rotation for the attested ``node_id`` whose stored key is ``old_public_key``.

    ``proof`` comes from the daemon and may hold anything; the other arguments come from
    the relay's attested session and store. Raises :class:`RotationError`: ``malformed``
    (sizes), ``key_mismatch`` (the new key is the old one), ``revoked`` (the new key is on
    the revocation list), ``bad_signature`` (either signature fails).
    """
    old = PublicKey(raw=old_public_key)
    new_raw = proof.new_public_key
    if not isinstance(new_raw, bytes) or len(new_raw) != PUBLIC_KEY_SIZE:
        raise RotationError(
            f"the new public key must be {PUBLIC_KEY_SIZE} raw bytes", reason="malformed"
        )
    for signature in (proof.old_key_signature, proof.new_key_signature):
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
            raise RotationError(
                "a rotation signature is not a 64-byte Ed25519 signature", reason="malformed"
            )
    new = PublicKey(raw=new_raw)
    if new.raw == old.raw:
        raise RotationError(
            "the new key is the current key",
            reason="key_mismatch",
            hint="generate a new key to rotate to",
        )
    if revocations is not None and revocations.is_key_revoked(new.thumbprint):
        raise RotationError(
            "the new key has been revoked", reason="revoked", hint="generate a new key"
        )
    message = rotation_transcript(node_id=node_id, new_public_key=new_raw, nonce=nonce)
    if not old.verify(proof.old_key_signature, message):
        raise RotationError(
            "the rotation proof is not signed by the node's current key",
            reason="bad_signature",
            hint="sign with the node.key the relay knows; if it is lost, re-enroll",
        )
    if not new.verify(proof.new_key_signature, message):
        raise RotationError(
            "the rotation proof is not signed by the new key",
            reason="bad_signature",
            hint="sign the rotation transcript with the new key too",
        )
    return VerifiedRotation(
        node_id=node_id,
        old_key_thumbprint=old.thumbprint,
        new_public_key=new_raw,
        new_key_thumbprint=new.thumbprint,
    )


def needs_refresh(expires_at: float, now: float, margin: float = DEFAULT_REFRESH_MARGIN) -> bool:
    """True once a token expiring at ``expires_at`` has ``margin`` seconds or less left."""
    if not (math.isfinite(expires_at) and math.isfinite(now) and math.isfinite(margin)):
        raise ValueError("expires_at, now and margin must be finite")
    if margin < 0:
        raise ValueError("margin must not be negative")
    return now >= expires_at - margin
