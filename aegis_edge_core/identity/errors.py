"""The identity error family: every refusal carries a machine-readable ``reason``.

The relay turns ``reason`` into ``RefusalReason`` on the wire, the daemon prints the
sentence and the hint, and metrics count by reason. So reasons are a closed set of short
strings, and a message never contains token or key material: messages end up in logs,
and logs are not a place for secrets.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

from aegis_edge_core.errors import AegisError

__all__ = [
    "REASONS",
    "REFUSAL_REASONS",
    "AttestationError",
    "EnrollmentError",
    "IdentityError",
    "KeyFileError",
    "Reason",
    "RefusalReason",
    "RotationError",
    "TokenError",
    "default_hint",
    "enrollment_refusal",
]

RefusalReason = Literal[
    "expired",
    "not_yet_valid",
    "bad_signature",
    "wrong_audience",
    "revoked",
    "unknown_node",
    "key_mismatch",
    "replayed",
    "malformed",
    "wrong_tenant",
    "clock_skew",
]
"""Why a token, an attestation, an enrollment or a rotation was refused.

These mirror ``aegis.edge.v1.RefusalReason`` one to one (``expired`` is
``REFUSAL_REASON_EXPIRED`` and so on), so the relay can put any refusal on the wire.
"""

Reason = Literal[
    RefusalReason,
    # An operator token that is valid but whose role may not do the thing asked.
    "forbidden",
    # Reasons a node.key file could not be loaded; never sent on the wire.
    "not_pem",
    "encrypted",
    "wrong_key_type",
    "corrupt",
]

REFUSAL_REASONS: Final[frozenset[str]] = frozenset(get_args(RefusalReason))
REASONS: Final[frozenset[str]] = REFUSAL_REASONS | {
    "forbidden",
    "not_pem",
    "encrypted",
    "wrong_key_type",
    "corrupt",
}

# What to do about each reason, when the raiser has nothing more specific to say.
_DEFAULT_HINTS: Final[dict[str, str]] = {
    "expired": "re-enroll with a fresh token; if it was just issued, check the host clock (NTP)",
    "not_yet_valid": "check the host clock (NTP)",
    "bad_signature": "the token was not signed by this relay; re-enroll with a fresh token",
    "wrong_audience": "this kind of token cannot be used here; use the token meant for it",
    "revoked": "re-enroll with a fresh enrollment token (aegis edge enroll <token>)",
    "unknown_node": "the relay does not know this node; re-enroll with a fresh token",
    "key_mismatch": "node.key does not match the token; re-enroll with a fresh token",
    "replayed": "enrollment tokens are single use; issue a fresh one (aegis edge tokens issue)",
    "malformed": "the token or message is damaged; re-enroll with a fresh token",
    "wrong_tenant": "the token belongs to another tenant; use a token for this tenant",
    "clock_skew": "check the host clock (NTP)",
    "forbidden": "ask an admin for a token with a role that may do this",
    "not_pem": "the file is not an Ed25519 PKCS#8 key; re-enroll or restore it",
    "encrypted": "the key must be stored unencrypted (PKCS#8 PEM); re-enroll or restore it",
    "wrong_key_type": "the file is not an Ed25519 PKCS#8 key; re-enroll or restore it",
    "corrupt": "the file is not an Ed25519 PKCS#8 key; re-enroll or restore it",
}


def default_hint(reason: str) -> str:
    """The hint a refusal for ``reason`` carries when its raiser says nothing more specific."""
    return _DEFAULT_HINTS.get(reason, "")


# What a host owner reads when the relay refused `aegis edge enroll`, by the refusal reason
# the relay sent (its status details; see aegis_edge_core.refusals). The relay's own sentence is
# used for every other reason; it already carries its hint.
_ENROLLMENT_REFUSALS: Final[dict[str, tuple[str, str]]] = {
    "replayed": (
        "this enrollment token was already used",
        "issue a fresh one with `aegis edge tokens issue`",
    ),
}


def enrollment_refusal(reason: str, detail: str) -> tuple[str, str]:
    """The sentence and hint for an enrollment the relay refused with ``reason``.

    ``detail`` is the relay's own description, used when the reason has no wording here.
    """
    known = _ENROLLMENT_REFUSALS.get(reason)
    if known is not None:
        return known
    return (detail or f"the relay refused the enrollment ({reason or 'no reason given'})", "")


class IdentityError(AegisError):
    """A token, key, attestation, enrollment or rotation was refused.

    ``reason`` is one of :data:`REASONS`; ``str(err)`` is a sentence plus a hint. Neither
    ever contains a token or key material.
    """

    reason: Reason

    def __init__(self, message: str, *, reason: Reason, hint: str | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown identity error reason {reason!r}")
        super().__init__(message, hint=_DEFAULT_HINTS[reason] if hint is None else hint)
        self.reason = reason


class TokenError(IdentityError):
    """A JWT was refused: forged, expired, for another audience, malformed, revoked...

    ``clock_offset`` is set on ``not_yet_valid``: how many seconds the checking clock is
    behind the clock that issued the token (at least; the token may be older).
    """

    clock_offset: float | None

    def __init__(
        self,
        message: str,
        *,
        reason: Reason,
        hint: str | None = None,
        clock_offset: float | None = None,
    ) -> None:
        super().__init__(message, reason=reason, hint=hint)
        self.clock_offset = clock_offset


class AttestationError(IdentityError):
    """A daemon's attestation was refused; ``reason`` is a :data:`RefusalReason`."""


class EnrollmentError(IdentityError):
    """An enrollment redemption was refused; ``reason`` is a :data:`RefusalReason`."""


class RotationError(IdentityError):
    """A key rotation proof was refused; ``reason`` is a :data:`RefusalReason`."""


class KeyFileError(IdentityError):
    """A key file could not be loaded. ``source`` is the path the caller named."""

    source: str

    def __init__(
        self, message: str, *, reason: Reason, source: str, hint: str | None = None
    ) -> None:
        super().__init__(f"{source}: {message}", reason=reason, hint=hint)
        self.source = source
