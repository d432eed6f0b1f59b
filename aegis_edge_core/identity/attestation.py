"""Attestation: how a daemon proves, on every connect, that it holds its node key.

The exchange (see ``stream.proto``)::

    daemon                                      relay
    Hello(protocol version, node id, token, host_time) -->
                                              <-- Challenge(nonce)
    AttestationResponse(signature)            -->
                                              <-- Accepted(maybe a fresh token) or Refused

The daemon signs :func:`attestation_transcript` -- a domain label, then the protocol
version, node id and the relay's fresh nonce, each length-prefixed -- with ``node.key``.
The fresh nonce makes every signature single use, so nothing recorded off one stream
opens another; the label keeps an attestation signature from ever passing as an
enrollment or rotation proof.

:func:`verify_attestation` is the relay's whole decision, in this order:

1. **Shape** of what the daemon sent (node id, 64-byte signature) -> ``malformed``.
2. **The token**, a NodeSecurityToken from this relay: signature, ``alg``, audience and
   claims, as :class:`~.tokens.TokenVerifier` checks them -> ``bad_signature``,
   ``wrong_audience``, ``malformed``, ``not_yet_valid``. *Expiry is not a refusal here.*
3. **Sub vs node id.** A token naming another node than the hello does is someone
   else's credential bound to someone else's key, so it is ``key_mismatch`` (not
   ``malformed``: both halves are well-formed, they just do not belong together).
4. **Revocation** of the token's ``jti`` or the key's thumbprint -> ``revoked``. Checked
   before the node record so that a revoked daemon hears ``revoked`` on every attempt,
   whatever else is wrong, and stops retrying.
5. **The node record** from the relay's store: absent -> ``unknown_node``; another
   tenant than the token's -> ``wrong_tenant``; marked revoked -> ``revoked``; stored key
   not the one ``cnf.jkt`` names -> ``key_mismatch`` (this is also what an old token
   meets after a rotation).
6. **The transcript signature** by the stored key -> ``bad_signature``.
7. **The host clock,** when the hello carried one: more than ``max_clock_skew`` off the
   relay's -> ``clock_skew``, with the offset in the message. Last, because a skewed
   host that is also revoked should hear ``revoked``. A host that far off would
   mistime its token refresh and write misleading logs; 300 s is Kerberos' long-standing
   bound.

The key is the identity and the token a short-lived credential: a token past ``exp``
that passes everything above -- signed by this relay, ``cnf`` matching the stored key,
transcript signed by that key, nothing revoked -- is accepted with
``token_expired=True``, and the relay hands the daemon a fresh token. A daemon that was
offline for a week comes back without re-enrolling; a revoked one never does.
"""

from __future__ import annotations

import math
from typing import Final

import attrs

from aegis_edge_core.identity._codec import transcript
from aegis_edge_core.identity.errors import AttestationError, TokenError
from aegis_edge_core.identity.keys import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, NodeKey, PublicKey
from aegis_edge_core.identity.revocation import RevocationList, Revocations
from aegis_edge_core.identity.tokens import TokenVerifier

__all__ = [
    "DEFAULT_MAX_CLOCK_SKEW",
    "MIN_NONCE_SIZE",
    "AttestationError",
    "NodeRecord",
    "RevocationList",
    "TokenVerifier",
    "VerifiedAttestation",
    "attestation_transcript",
    "sign_attestation",
    "verify_attestation",
]

MIN_NONCE_SIZE: Final = 16
DEFAULT_MAX_CLOCK_SKEW: Final = 300.0
_MAX_NODE_ID: Final = 256


def _check_version(protocol_version: int) -> None:
    if (
        isinstance(protocol_version, bool)
        or not isinstance(protocol_version, int)
        or not 0 <= protocol_version < 2**32
    ):
        raise ValueError("protocol_version must be an unsigned 32-bit integer")


def attestation_transcript(*, protocol_version: int, node_id: str, nonce: bytes) -> bytes:
    """The bytes a daemon signs to attest: ``aegis-edge/v1/attest NUL`` + length-prefixed
    protocol version (u32 big-endian), node id (UTF-8) and nonce."""
    _check_version(protocol_version)
    if not isinstance(node_id, str) or not isinstance(nonce, bytes):
        raise TypeError("node_id is a str and nonce bytes")
    return transcript(
        b"attest", protocol_version.to_bytes(4, "big"), node_id.encode("utf-8"), nonce
    )


def sign_attestation(key: NodeKey, *, protocol_version: int, node_id: str, nonce: bytes) -> bytes:
    """The daemon's answer to a challenge: its node key's signature over the transcript."""
    return key.sign(
        attestation_transcript(protocol_version=protocol_version, node_id=node_id, nonce=nonce)
    )


def _check_raw_public_key(
    instance: object, attribute: attrs.Attribute[bytes], value: bytes
) -> None:
    if not isinstance(value, bytes) or len(value) != PUBLIC_KEY_SIZE:
        raise ValueError(f"public_key must be {PUBLIC_KEY_SIZE} raw bytes")


def _nonempty_str(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty string")


@attrs.frozen(kw_only=True)
class NodeRecord:
    """What the relay's store knows about a node, as attestation needs it."""

    node_id: str = attrs.field(validator=_nonempty_str)
    tenant_id: str = attrs.field(validator=_nonempty_str)
    public_key: bytes = attrs.field(validator=_check_raw_public_key, repr=False)
    revoked: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    @property
    def key_thumbprint(self) -> str:
        return PublicKey(raw=self.public_key).thumbprint


@attrs.frozen(kw_only=True)
class VerifiedAttestation:
    """An accepted attestation. ``token_expired``: hand the daemon a fresh token."""

    node_id: str
    tenant_id: str
    nonce: bytes = attrs.field(repr=False)
    key_thumbprint: str
    token_jti: str
    token_expired: bool
    token_expires_at: float


def _describe_offset(host_time: float, now: float) -> str:
    offset = host_time - now
    direction = "behind" if offset < 0 else "ahead of"
    return f"host clock is {abs(offset):.0f} s {direction} the relay"


def verify_attestation(
    *,
    token: str,
    signature: bytes,
    nonce: bytes,
    protocol_version: int,
    node_id: str,
    verifier: TokenVerifier,
    node_record: NodeRecord | None,
    revocations: Revocations,
    now: float,
    host_time: float | None,
    max_clock_skew: float | None = DEFAULT_MAX_CLOCK_SKEW,
) -> VerifiedAttestation:
    """Decide whether a daemon's attestation is accepted; see the module docstring.

    ``token``, ``signature``, ``node_id`` and ``host_time`` come from the daemon and are
    judged: any fault raises :class:`AttestationError` with a reason. ``nonce``,
    ``protocol_version``, ``node_record``, ``verifier`` and ``now`` come from the relay
    itself; nonsense there (a nonce shorter than 16 bytes, a record for another node) is
    a bug in the caller and raises ``ValueError``. Pass ``host_time=None`` when the hello
    carried no clock (proto3 sends 0.0); ``max_clock_skew=None`` turns the check off.
    """
    if not isinstance(nonce, bytes) or len(nonce) < MIN_NONCE_SIZE:
        raise ValueError(f"the relay's nonce must be at least {MIN_NONCE_SIZE} random bytes")
    _check_version(protocol_version)
    if not math.isfinite(now):
        raise ValueError("now must be a finite Unix time")
    if (
        not isinstance(node_id, str)
        or not 0 < len(node_id) <= _MAX_NODE_ID
        or not node_id.isprintable()
    ):
        raise AttestationError("the hello carries no usable node id", reason="malformed")
    if node_record is not None and node_record.node_id != node_id:
        raise ValueError("node_record is for another node than the one attesting")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
        raise AttestationError(
            "the attestation signature is not a 64-byte Ed25519 signature", reason="malformed"
        )

    try:
        claims = verifier.verify_node_token(token, now=now, allow_expired=True)
    except TokenError as exc:
        message = f"node token refused: {exc.message}"
        hint = exc.hint
        if exc.reason == "not_yet_valid" and exc.clock_offset is not None:
            # The relay (or the relay that issued the token) is the clock that is off
            # here: the host's clock plays no part in checking its token.
            message = (
                f"node token refused: it was issued {exc.clock_offset:.0f} s in this relay's future"
            )
            hint = "check the relays' clocks (NTP)"
        raise AttestationError(message, reason=exc.reason, hint=hint) from None

    if claims.node_id != node_id:
        raise AttestationError(
            "the node token was issued to another node than the one attesting",
            reason="key_mismatch",
        )
    if revocations.is_token_revoked(claims.jti) or revocations.is_key_revoked(
        claims.key_thumbprint
    ):
        raise AttestationError(f"node {node_id!r} has been revoked", reason="revoked")
    if node_record is None:
        raise AttestationError(
            f"node {node_id!r} is not known to this relay", reason="unknown_node"
        )
    if node_record.tenant_id != claims.tenant_id:
        raise AttestationError(
            f"the node token is for another tenant than node {node_id!r}", reason="wrong_tenant"
        )
    if node_record.revoked:
        raise AttestationError(f"node {node_id!r} has been revoked", reason="revoked")
    stored_key = PublicKey(raw=node_record.public_key)
    if stored_key.thumbprint != claims.key_thumbprint:
        raise AttestationError(
            f"the node token is bound to another key than node {node_id!r} has",
            reason="key_mismatch",
        )
    signed = attestation_transcript(protocol_version=protocol_version, node_id=node_id, nonce=nonce)
    if not stored_key.verify(signature, signed):
        raise AttestationError(
            "the attestation signature does not verify with the node's key",
            reason="bad_signature",
            hint="node.key does not match this node; restore it or re-enroll",
        )
    if (
        max_clock_skew is not None
        and host_time is not None
        and (not math.isfinite(host_time) or abs(host_time - now) > max_clock_skew)
    ):
        offset = (
            _describe_offset(host_time, now)
            if math.isfinite(host_time)
            else "host clock is unreadable"
        )
        raise AttestationError(offset, reason="clock_skew")

    return VerifiedAttestation(
        node_id=node_id,
        tenant_id=claims.tenant_id,
        nonce=nonce,
        key_thumbprint=claims.key_thumbprint,
        token_jti=claims.jti,
        token_expired=now >= claims.expires_at,
        token_expires_at=claims.expires_at,
    )
