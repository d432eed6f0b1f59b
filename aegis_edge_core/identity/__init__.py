"""Identity in the core: node keys, relay-signed tokens, attestation, enrollment, rotation.

Theory of operation
-------------------
A daemon's identity is its Ed25519 **node key** (``node.key``). The relay's identity, as
far as tokens go, is its Ed25519 **signing key**. Everything else is derived:

* The relay issues three kinds of EdDSA-signed JWT (:mod:`.tokens`), told apart by
  audience: an *enrollment token* (single use, tenant-bound, carrying the relay endpoint
  and a pin of its CA so that ``aegis edge enroll <token>`` needs nothing else), a
  *NodeSecurityToken* (which node, which tenant, bound to the node key by thumbprint)
  and an *operator token* (who, which role, which tenants).
* **Enrollment** (:mod:`.enrollment`): the host makes a key, signs a transcript binding
  the token id and its public key, and redeems the token once. The relay decides from
  the token and a caller-supplied "already redeemed?" answer; the store records.
* **Attestation** (:mod:`.attestation`), on every connect: the daemon signs the relay's
  fresh nonce with its node key. The key is the identity and the token a short-lived
  credential: an expired token still attests, if everything else holds, and the relay
  hands out a fresh one; a revoked node never does.
* **Rotation** (:mod:`.rotation`): a proof signed by the old and the new key.
* **Revocation** (:mod:`.revocation`): token ids and key thumbprints the relay refuses.

Every refusal is an :class:`IdentityError` with a ``reason`` that maps onto the wire's
``RefusalReason``, a sentence, and a hint; none ever quotes a token or key.

Like the rest of ``aegis_edge_core`` this package is sans-I/O: it reads no files (key
loaders take bytes and the path they came from, for messages), no clock (``now`` is
passed in) and draws no randomness (seeds, nonces and token ids are passed in).
"""

from __future__ import annotations

from aegis_edge_core.identity.attestation import (
    DEFAULT_MAX_CLOCK_SKEW,
    MIN_NONCE_SIZE,
    NodeRecord,
    VerifiedAttestation,
    attestation_transcript,
    sign_attestation,
    verify_attestation,
)
from aegis_edge_core.identity.enrollment import (
    EnrollmentGrant,
    enrollment_transcript,
    redeem_enrollment,
    sign_enrollment,
)
from aegis_edge_core.identity.errors import (
    REASONS,
    REFUSAL_REASONS,
    AttestationError,
    EnrollmentError,
    IdentityError,
    KeyFileError,
    Reason,
    RefusalReason,
    RotationError,
    TokenError,
)
from aegis_edge_core.identity.keys import (
    PUBLIC_KEY_SIZE,
    SEED_SIZE,
    SIGNATURE_SIZE,
    NodeKey,
    PublicKey,
    RelaySigningKey,
    jwk_thumbprint,
    load_node_key,
    load_relay_signing_key,
)
from aegis_edge_core.identity.revocation import RevocationList, Revocations
from aegis_edge_core.identity.rotation import (
    DEFAULT_REFRESH_MARGIN,
    RotationProof,
    VerifiedRotation,
    needs_refresh,
    refresh_margin,
    rotation_transcript,
    sign_rotation,
    verify_rotation,
)
from aegis_edge_core.identity.tokens import (
    DEFAULT_LEEWAY,
    ENROLLMENT_AUDIENCE,
    ENROLLMENT_TOKEN_TTL,
    MAX_TOKEN_LENGTH,
    NODE_AUDIENCE,
    NODE_TOKEN_TTL,
    OPERATOR_AUDIENCE,
    OPERATOR_TOKEN_TTL,
    ROLES,
    EnrollmentClaims,
    IssuedToken,
    NodeClaims,
    OperatorClaims,
    Role,
    TokenIssuer,
    TokenVerifier,
    ca_pin,
    new_jti,
    peek_enrollment_token,
    peek_node_token,
)

__all__ = [
    "DEFAULT_LEEWAY",
    "DEFAULT_MAX_CLOCK_SKEW",
    "DEFAULT_REFRESH_MARGIN",
    "ENROLLMENT_AUDIENCE",
    "ENROLLMENT_TOKEN_TTL",
    "MAX_TOKEN_LENGTH",
    "MIN_NONCE_SIZE",
    "NODE_AUDIENCE",
    "NODE_TOKEN_TTL",
    "OPERATOR_AUDIENCE",
    "OPERATOR_TOKEN_TTL",
    "PUBLIC_KEY_SIZE",
    "REASONS",
    "REFUSAL_REASONS",
    "ROLES",
    "SEED_SIZE",
    "SIGNATURE_SIZE",
    "AttestationError",
    "EnrollmentClaims",
    "EnrollmentError",
    "EnrollmentGrant",
    "IdentityError",
    "IssuedToken",
    "KeyFileError",
    "NodeClaims",
    "NodeKey",
    "NodeRecord",
    "OperatorClaims",
    "PublicKey",
    "Reason",
    "RefusalReason",
    "RelaySigningKey",
    "RevocationList",
    "Revocations",
    "Role",
    "RotationError",
    "RotationProof",
    "TokenError",
    "TokenIssuer",
    "TokenVerifier",
    "VerifiedAttestation",
    "VerifiedRotation",
    "attestation_transcript",
    "ca_pin",
    "enrollment_transcript",
    "jwk_thumbprint",
    "load_node_key",
    "load_relay_signing_key",
    "needs_refresh",
    "new_jti",
    "peek_enrollment_token",
    "peek_node_token",
    "redeem_enrollment",
    "refresh_margin",
    "rotation_transcript",
    "sign_attestation",
    "sign_enrollment",
    "sign_rotation",
    "verify_attestation",
    "verify_rotation",
]
