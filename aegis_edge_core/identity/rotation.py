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
close enough to expiry to ask for (or push) a fresh one over the stream. A refreshed
token replaces the previous one only once the daemon has *stored* it: revoking the old
token as soon as the new one is sent would lock out a daemon that crashes before its
write lands. :class:`TokenSuccession` keeps, per node, the tokens handed out since the
last one the daemon confirmed (a heartbeat naming the new token's ``jti``, or an
attestation with it), and answers which earlier ones to revoke at each confirmation::

    chain = TokenSuccession.starting_with("A", expires_at=a_exp)
    chain.issued("B", expires_at=b_exp)      # TokenRefresh B sent
    chain.issued("C", expires_at=c_exp)      # and C (the daemon asked twice)
    chain.confirmed("C")                     # -> [("A", a_exp), ("B", b_exp)]: revoke
    chain.confirmed("C")                     # -> []: idempotent
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
    "MAX_UNCONFIRMED_TOKENS",
    "RotationProof",
    "TokenSuccession",
    "VerifiedRotation",
    "needs_refresh",
    "refresh_margin",
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


def refresh_margin(token_ttl: float) -> float:
    """How long before expiry a token of lifetime ``token_ttl`` is refreshed: the default
    hour, or a quarter of the lifetime for shorter-lived tokens (so a 60 s token is not
    due for refresh the moment it is issued)."""
    if not (math.isfinite(token_ttl) and token_ttl > 0):
        raise ValueError("token_ttl must be a positive number of seconds")
    return min(DEFAULT_REFRESH_MARGIN, token_ttl / 4)


MAX_UNCONFIRMED_TOKENS: Final = 16
"""How many tokens a :class:`TokenSuccession` remembers; past it the oldest is forgotten
(not revoked: the daemon may still hold it). Refreshes are rate-limited, so a daemon only
gets here by never confirming for weeks -- an old daemon that does not send the ack."""


@attrs.define
class TokenSuccession:
    """The node tokens handed to one node, oldest first, since the one it last confirmed.

    The first entry is the token the daemon is known to hold (or was enrolled with); later
    ones were sent (refresh, or a fresh token in ``Accepted``) and not yet confirmed.
    """

    _chain: list[tuple[str, float]] = attrs.field(factory=list)

    @classmethod
    def starting_with(cls, jti: str, *, expires_at: float) -> TokenSuccession:
        chain = cls()
        if jti:
            chain.issued(jti, expires_at=expires_at)
        return chain

    def issued(self, jti: str, *, expires_at: float) -> None:
        """A new token for this node was handed out (and is now the relay's current one)."""
        if not isinstance(jti, str) or not jti:
            raise ValueError("jti must be a non-empty string")
        if not math.isfinite(expires_at):
            raise ValueError("expires_at must be a finite time")
        self._chain.append((jti, expires_at))
        if len(self._chain) > MAX_UNCONFIRMED_TOKENS:
            del self._chain[0]

    def confirmed(self, jti: str) -> list[tuple[str, float]]:
        """The daemon holds ``jti``: return ``(jti, expires_at)`` of every token issued
        before it, to revoke, and forget them. A ``jti`` this succession never issued (a
        token from before a relay restart, a forged claim) confirms nothing."""
        for index, (known, _exp) in enumerate(self._chain):
            if known == jti:
                superseded = self._chain[:index]
                del self._chain[:index]
                return superseded
        return []

    @property
    def pending(self) -> tuple[str, ...]:
        """The ``jti`` values remembered, oldest first."""
        return tuple(jti for jti, _ in self._chain)
