"""Enrollment: redeeming a single-use enrollment token for a place in the fleet.

The host side (``aegis edge enroll <token>``)::

    key = NodeKey.from_seed(os.urandom(32))
    claims = peek_enrollment_token(token)          # rel + cap: where and whom to trust
    proof = sign_enrollment(key, token_jti=claims.jti)
    -> EnrollRequest(token, key.public_key.raw, proof, host_time)

The relay side is :func:`redeem_enrollment`, which decides and records nothing:

1. The token must be a valid, unexpired enrollment token from this relay (reasons as in
   :mod:`.tokens`). The tenant, relay endpoint and CA pin all come from the token, so a
   host cannot pick its tenant: a tenant is bound here, once, for good.
2. The public key must be 32 bytes and not a revoked key (``malformed``, ``revoked``).
3. The proof of possession must be the key's signature over
   :func:`enrollment_transcript` -- domain label, token ``jti``, public key. It ties the
   redemption to one key somebody holds, so a token that leaks in transit cannot be
   redeemed for a key nobody has, and the signature cannot be replayed for another
   token (``bad_signature``).
4. The token must not have been redeemed before (``replayed``). The caller answers that
   question (a set or a callable over its store); after a success it records the
   ``jti``, with the token's ``exp`` as the time after which the record may go. The
   check here reads a snapshot, so the store must also insert the ``jti`` under a
   uniqueness constraint in the same transaction that creates the node: two concurrent
   redemptions of one token then cannot both win.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container

import attrs

from aegis_edge_core.identity._codec import transcript
from aegis_edge_core.identity.errors import EnrollmentError, TokenError
from aegis_edge_core.identity.keys import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, NodeKey, PublicKey
from aegis_edge_core.identity.revocation import Revocations
from aegis_edge_core.identity.tokens import TokenVerifier

__all__ = [
    "EnrollmentGrant",
    "enrollment_transcript",
    "redeem_enrollment",
    "sign_enrollment",
]


def enrollment_transcript(*, token_jti: str, public_key: bytes) -> bytes:
    """The bytes an enrolling host signs: ``aegis-edge/v1/enroll NUL`` + length-prefixed
    token ``jti`` (UTF-8) and raw 32-byte public key."""
    if not isinstance(token_jti, str) or not isinstance(public_key, bytes):
        raise TypeError("token_jti is a str and public_key bytes")
    return transcript(b"enroll", token_jti.encode("utf-8"), public_key)


def sign_enrollment(key: NodeKey, *, token_jti: str) -> bytes:
    """The host's proof of possession for redeeming the token ``token_jti`` with ``key``."""
    return key.sign(enrollment_transcript(token_jti=token_jti, public_key=key.public_key.raw))


@attrs.frozen(kw_only=True)
class EnrollmentGrant:
    """A redemption the relay should carry out: create the node, record the ``jti``.

    Everything the new node is bound to comes from the token, never from the request.
    """

    tenant_id: str
    token_jti: str
    token_expires_at: float
    relay_endpoint: str
    ca_pin: str
    public_key: bytes = attrs.field(repr=False)
    key_thumbprint: str


def redeem_enrollment(
    *,
    token: str,
    public_key: bytes,
    proof: bytes,
    verifier: TokenVerifier,
    already_redeemed: Container[str] | Callable[[str], bool],
    now: float,
    revocations: Revocations | None = None,
) -> EnrollmentGrant:
    """Decide an enrollment request; see the module docstring for the rules and order.

    Raises :class:`EnrollmentError` with the reason. ``already_redeemed`` is either a
    container of redeemed ``jti`` values or a callable answering for one ``jti``.
    """
    if not math.isfinite(now):
        raise ValueError("now must be a finite Unix time")
    try:
        claims = verifier.verify_enrollment_token(token, now=now, revocations=revocations)
    except TokenError as exc:
        raise EnrollmentError(
            f"enrollment token refused: {exc.message}", reason=exc.reason, hint=exc.hint
        ) from None
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_SIZE:
        raise EnrollmentError(
            f"the node public key must be {PUBLIC_KEY_SIZE} raw bytes", reason="malformed"
        )
    key = PublicKey(raw=public_key)
    if revocations is not None and revocations.is_key_revoked(key.thumbprint):
        raise EnrollmentError(
            "this node key has been revoked",
            reason="revoked",
            hint="enroll with a newly generated key",
        )
    if not isinstance(proof, bytes) or len(proof) != SIGNATURE_SIZE:
        raise EnrollmentError(
            "the proof of possession is not a 64-byte Ed25519 signature", reason="malformed"
        )
    if not key.verify(proof, enrollment_transcript(token_jti=claims.jti, public_key=public_key)):
        raise EnrollmentError(
            "the proof of possession does not verify with the presented key",
            reason="bad_signature",
            hint="sign the enrollment transcript with the key being enrolled",
        )
    redeemed = (
        already_redeemed(claims.jti)
        if callable(already_redeemed)
        else claims.jti in already_redeemed
    )
    if redeemed:
        raise EnrollmentError("this enrollment token has already been used", reason="replayed")
    return EnrollmentGrant(
        tenant_id=claims.tenant_id,
        token_jti=claims.jti,
        token_expires_at=claims.expires_at,
        relay_endpoint=claims.relay_endpoint,
        ca_pin=claims.ca_pin,
        public_key=public_key,
        key_thumbprint=key.thumbprint,
    )
