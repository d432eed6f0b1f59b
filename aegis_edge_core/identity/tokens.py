"""The relay's three JWT kinds: how they are issued and how they are checked.

Every token is a compact JWS signed by the relay's Ed25519 key with ``alg: EdDSA``, its
``kid`` the key's RFC 7638 thumbprint. There are three kinds, told apart by audience:

==================  =======================  =============================================
kind                ``aud``                  claims beyond ``jti``, ``iat``, ``nbf``, ``exp``
==================  =======================  =============================================
enrollment token    ``aegis-edge-enroll``    ``tid`` tenant, ``rel`` relay endpoint, ``cap``
                                             sha256 hex of the relay CA certificate (DER),
                                             ``rels`` (optional) every relay endpoint of
                                             the cluster
node token          ``aegis-edge-node``      ``sub`` node id, ``tid``, ``cnf.jkt`` thumbprint
                                             of the node key
operator token      ``aegis-edge-operator``  ``sub``, ``role`` (admin/operator/viewer),
                                             ``tenants``: a list, or ``"*"`` for all
==================  =======================  =============================================

Verification order, and why
---------------------------
1. *Shape, before any crypto.* At most :data:`MAX_TOKEN_LENGTH` characters, three
   canonical base64url segments, a JSON object header with ``alg`` exactly ``EdDSA`` and
   no ``crit``. The header is attacker-chosen, so the algorithm is pinned *before* a key
   is ever handed to a JOSE library: ``alg: none`` and ``HS256`` keyed with our public key
   (the classic confusion attacks) are refused here, as ``bad_signature``. Base64 is
   checked canonically because Python's decoder is lenient; see :mod:`._codec`.
2. *Signature,* with the public key whose thumbprint is the header's ``kid``. Holding a
   list of keys lets a relay roll its signing key over, and lets every relay of a cluster
   verify the tokens any of them issued (each signs with its own key). A ``kid`` no key
   in the list has is refused ``bad_signature`` saying the key is unknown (the relay
   reloads the published keys first, see :func:`key_reload_due`; the reason stays
   ``bad_signature`` so daemons of every v1 version read it). Every token we issue names
   its ``kid``, so one without it is refused too. The signature is checked once, with
   ``cryptography``, over the segments step 1 checked; PyJWT only signs (its claim checks
   read the system clock, and this core takes ``now`` from the caller).
3. *Audience.* A node token is never an enrollment or operator token, whatever else it
   says; a mismatch is ``wrong_audience``.
4. *Claims:* present, typed, well-formed, else ``malformed``.
5. *Revocation* of the ``jti``, if the caller passes a revocation list.
6. *Time,* against the caller's ``now`` with ``leeway`` (default 60 s) either side. A
   token that is not valid yet was made by a clock ahead of the one checking it, which is
   the one time-related refusal that says for certain that clocks disagree, so its
   message says by how much: "token not valid yet: host clock is 312 s behind the
   relay; check NTP". An expired token only *might* mean a skewed clock, so it says how
   long ago it expired and leaves the clock as a hint.

Nothing here reads the clock or draws randomness: ``now`` is passed in, and so is the
``jti`` (see :func:`new_jti`, which takes caller randomness). Messages never include the
token; the issued token's repr hides it too.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final, Generic, Literal, NoReturn, TypeVar

import attrs

from aegis_edge_core.identity._codec import b64url_decode, b64url_encode, sha256
from aegis_edge_core.identity.errors import IdentityError, Reason, TokenError, default_hint
from aegis_edge_core.identity.keys import PublicKey, RelaySigningKey
from aegis_edge_core.identity.revocation import Revocations

__all__ = [
    "DEFAULT_LEEWAY",
    "ENROLLMENT_AUDIENCE",
    "ENROLLMENT_TOKEN_TTL",
    "MAX_RELAY_ENDPOINTS",
    "MAX_TOKEN_LENGTH",
    "NODE_AUDIENCE",
    "NODE_TOKEN_TTL",
    "OPERATOR_AUDIENCE",
    "OPERATOR_TOKEN_TTL",
    "ROLES",
    "TENANT_ID_PATTERN",
    "TENANT_ID_RULE",
    "UNKNOWN_KEY_MESSAGE",
    "EnrollmentClaims",
    "IssuedToken",
    "NodeClaims",
    "OperatorClaims",
    "Role",
    "TokenIssuer",
    "TokenVerifier",
    "ca_pin",
    "check_tenant_id",
    "key_reload_due",
    "new_jti",
    "peek_enrollment_token",
    "peek_kid",
    "peek_node_token",
    "token_hint",
]

ENROLLMENT_AUDIENCE: Final = "aegis-edge-enroll"
NODE_AUDIENCE: Final = "aegis-edge-node"
OPERATOR_AUDIENCE: Final = "aegis-edge-operator"

DEFAULT_LEEWAY: Final = 60.0
ENROLLMENT_TOKEN_TTL: Final = 15 * 60.0
NODE_TOKEN_TTL: Final = 24 * 3600.0
OPERATOR_TOKEN_TTL: Final = 30 * 24 * 3600.0

UNKNOWN_KEY_MESSAGE: Final = "token is signed by a key no relay of this cluster has published"
"""The refusal of a token whose ``kid`` is unknown: forged, or from another cluster."""

MAX_TOKEN_LENGTH: Final = 8192
"""Longer input is refused unread: our tokens are a few hundred bytes."""

_ALGORITHM: Final = "EdDSA"

Role = Literal["viewer", "operator", "admin"]
ROLES: Final[tuple[Role, ...]] = ("viewer", "operator", "admin")
"""Operator roles, least to most privileged: each may do what the ones before it may."""

_KIND_BY_AUDIENCE: Final[Mapping[str, str]] = {
    ENROLLMENT_AUDIENCE: "enrollment token",
    NODE_AUDIENCE: "node token",
    OPERATOR_AUDIENCE: "operator token",
}
_EXPIRED_HINT: Final[Mapping[str, str]] = {
    ENROLLMENT_AUDIENCE: "issue a fresh enrollment token (aegis edge tokens issue); "
    "if it was just issued, check the host clock (NTP)",
    NODE_AUDIENCE: "re-enroll with a fresh token; if it was just issued, "
    "check the host clock (NTP)",
    OPERATOR_AUDIENCE: "ask for a fresh operator token (aegis relay operator-token)",
}

_ASK_OPERATOR: Final = (
    "use the admin token the relay wrote to <data-dir>/operator.token, or ask an admin for "
    "one (aegis relay operator-token --data-dir D --tenant T)"
)
_ASK_ENROLL: Final = "issue a fresh one with `aegis edge tokens issue --tenant T`"
# What to do about a refusal depends on which token was refused: an operator whose token is
# damaged needs another operator token, not the host owner's "re-enroll". Reasons not listed
# keep the family's default hint (identity.errors).
_HINTS_BY_AUDIENCE: Final[Mapping[str, Mapping[str, str]]] = {
    ENROLLMENT_AUDIENCE: {
        "empty": "pass the token `aegis edge tokens issue --tenant T` printed (was it empty?)",
        "malformed": f"the enrollment token is damaged; {_ASK_ENROLL}",
        "bad_signature": f"the token was not issued by this relay; {_ASK_ENROLL}",
        "revoked": _ASK_ENROLL,
        "replayed": _ASK_ENROLL,
    },
    OPERATOR_AUDIENCE: {
        "empty": f"pass --token TOKEN or set AEGIS_OPERATOR_TOKEN; {_ASK_OPERATOR}",
        "malformed": f"that is not an operator token; {_ASK_OPERATOR}",
        "bad_signature": f"the token was not issued by this relay; {_ASK_OPERATOR}",
        "revoked": _ASK_OPERATOR,
    },
    NODE_AUDIENCE: {
        "empty": "node.token is empty; re-enroll with a fresh enrollment token",
    },
}


TENANT_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TENANT_ID_RULE: Final = (
    "a tenant id is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
)
"""What a tenant id may be. Tenant ids appear in metric labels, log fields, shell commands
and the OTLP header template, where spaces, quotes and ``*`` (all tenants) would bite."""


def check_tenant_id(tenant_id: str) -> None:
    """Raise ``IdentityError(reason="malformed")`` naming :data:`TENANT_ID_RULE` if
    ``tenant_id`` breaks it."""
    if not isinstance(tenant_id, str) or not TENANT_ID_PATTERN.fullmatch(tenant_id):
        raise IdentityError(
            f"tenant id {tenant_id!r} is not allowed", reason="malformed", hint=TENANT_ID_RULE
        )


def token_hint(reason: str, audience: str) -> str | None:
    """What to do about a refused token of ``audience`` for ``reason`` (``"empty"`` too).

    None when there is nothing more specific than the reason's default hint.
    """
    return _HINTS_BY_AUDIENCE.get(audience, {}).get(reason)


# ---------------------------------------------------------------------------------------
# Small helpers callers need to issue tokens without breaking the sans-I/O rule.


def new_jti(source: bytes | random.Random) -> str:
    """A token id from caller randomness: 16-64 random bytes, or a ``random.Random``.

    Pass ``os.urandom(16)`` in production; a seeded ``random.Random`` makes tests and
    simulations reproducible (it is not a CSPRNG, so only there).
    """
    if isinstance(source, random.Random):
        data = source.getrandbits(128).to_bytes(16, "big")
    elif isinstance(source, bytes):
        if not 16 <= len(source) <= 64:
            raise ValueError(f"a jti needs 16 to 64 random bytes, got {len(source)}")
        data = source
    else:
        raise TypeError(f"new_jti takes bytes or random.Random, not {type(source).__name__}")
    return b64url_encode(data)


def ca_pin(ca_certificate_der: bytes) -> str:
    """The ``cap`` claim: lowercase sha256 hex of the relay CA certificate in DER."""
    if not isinstance(ca_certificate_der, bytes) or not ca_certificate_der:
        raise ValueError("pass the CA certificate's DER bytes")
    return sha256(ca_certificate_der).hex()


def _duration(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


# ---------------------------------------------------------------------------------------
# Claims: what a verified token says, as validated values.

_PIN_RE: Final = re.compile(r"[0-9a-f]{64}")
_THUMBPRINT_RE: Final = re.compile(r"[A-Za-z0-9_-]{43}")


def _text(max_len: int) -> Any:
    def check(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"{attribute.name} must be a string")
        if not value or len(value) > max_len:
            raise ValueError(f"{attribute.name} must be 1 to {max_len} characters")
        if not value.isprintable() or value != value.strip():
            raise ValueError(f"{attribute.name} must be printable, without outer spaces")

    return check


def _timestamp(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{attribute.name} must be a number")
    if isinstance(value, int) or not math.isfinite(value) or not 0 <= value < 2**40:
        raise ValueError(f"{attribute.name} must be a plausible Unix time")


def _regex(pattern: re.Pattern[str], what: str) -> Any:
    def check(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
        if not isinstance(value, str) or pattern.fullmatch(value) is None:
            raise ValueError(f"{attribute.name} must be {what}")

    return check


def _int_to_float(value: Any) -> Any:
    # JSON gives ints for whole seconds; times are floats everywhere else. Anything that
    # is not a number is left alone for the validator to refuse (float("12") would not be).
    # Ints too large for a float stay ints, for the validator to refuse by range.
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53:
        return float(value)
    return value


@attrs.frozen(kw_only=True)
class _Claims:
    jti: str = attrs.field(validator=_text(256))
    issued_at: float = attrs.field(converter=_int_to_float, validator=_timestamp)
    not_before: float = attrs.field(converter=_int_to_float, validator=_timestamp)
    expires_at: float = attrs.field(converter=_int_to_float, validator=_timestamp)

    def __attrs_post_init__(self) -> None:
        if self.expires_at <= self.not_before:
            raise ValueError("expires_at must be after not_before")

    def _common(self, audience: str) -> dict[str, Any]:
        return {
            "aud": audience,
            "jti": self.jti,
            "iat": _numeric_date(self.issued_at),
            "nbf": _numeric_date(self.not_before),
            "exp": _numeric_date(self.expires_at),
        }


def _numeric_date(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


MAX_RELAY_ENDPOINTS: Final = 32


def _endpoint_tuple(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError("relay_endpoints must be a list of host:port, not a string")
    return tuple(value)


def _check_endpoints(
    instance: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
) -> None:
    if len(value) > MAX_RELAY_ENDPOINTS:
        raise ValueError(f"{attribute.name} holds at most {MAX_RELAY_ENDPOINTS} endpoints")
    check = _text(512)
    for endpoint in value:
        check(instance, attribute, endpoint)


@attrs.frozen(kw_only=True)
class EnrollmentClaims(_Claims):
    """A verified enrollment token: everything ``aegis edge enroll <token>`` needs."""

    tenant_id: str = attrs.field(validator=_text(256))
    relay_endpoint: str = attrs.field(validator=_text(512))
    ca_pin: str = attrs.field(validator=_regex(_PIN_RE, "64 lowercase hex digits (sha256)"))
    relay_endpoints: tuple[str, ...] = attrs.field(
        default=(), converter=_endpoint_tuple, validator=_check_endpoints
    )
    """Every relay endpoint of the cluster (``rels``); empty for a single relay, whose
    tokens stay exactly as before."""

    def to_payload(self) -> dict[str, Any]:
        payload = self._common(ENROLLMENT_AUDIENCE) | {
            "tid": self.tenant_id,
            "rel": self.relay_endpoint,
            "cap": self.ca_pin,
        }
        if self.relay_endpoints:
            payload["rels"] = list(self.relay_endpoints)
        return payload


@attrs.frozen(kw_only=True)
class NodeClaims(_Claims):
    """A verified NodeSecurityToken: which node, which tenant, bound to which key."""

    node_id: str = attrs.field(validator=_text(256))
    tenant_id: str = attrs.field(validator=_text(256))
    key_thumbprint: str = attrs.field(
        validator=_regex(_THUMBPRINT_RE, "an RFC 7638 SHA-256 thumbprint")
    )

    def to_payload(self) -> dict[str, Any]:
        return self._common(NODE_AUDIENCE) | {
            "sub": self.node_id,
            "tid": self.tenant_id,
            "cnf": {"jkt": self.key_thumbprint},
        }


def _tenant_set(value: Iterable[str]) -> frozenset[str]:
    if isinstance(value, str):
        # A bare string would otherwise become a set of its characters.
        raise TypeError("tenants must be a collection of tenant ids, not a string")
    return frozenset(value)


def _check_tenants(
    instance: object, attribute: attrs.Attribute[frozenset[str]], value: frozenset[str]
) -> None:
    check = _text(256)
    for tenant in value:
        check(instance, attribute, tenant)


@attrs.frozen(kw_only=True)
class OperatorClaims(_Claims):
    """A verified operator token: who, with which role, over which tenants.

    ``all_tenants`` is the token's ``"tenants": "*"``; then ``tenants`` is empty.
    """

    subject: str = attrs.field(validator=_text(256))
    role: Role = attrs.field(validator=attrs.validators.in_(ROLES))
    tenants: frozenset[str] = attrs.field(
        converter=_tenant_set, validator=_check_tenants, factory=frozenset
    )
    all_tenants: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.all_tenants and self.tenants:
            raise ValueError("an all-tenants operator token lists no tenants")

    def may_access(self, tenant_id: str) -> bool:
        return self.all_tenants or tenant_id in self.tenants

    def check_tenant(self, tenant_id: str) -> None:
        """Raise ``TokenError(reason="wrong_tenant")`` unless this operator may touch the tenant.

        The message does not name the tenants the token does cover: an operator of
        tenant A learns nothing about tenant B by probing.
        """
        if not self.may_access(tenant_id):
            raise TokenError(
                f"operator {self.subject!r} may not act on tenant {tenant_id!r}",
                reason="wrong_tenant",
                hint="use an operator token scoped to that tenant",
            )

    def check_role(self, minimum: Role) -> None:
        """Raise ``TokenError(reason="forbidden")`` unless the role is at least ``minimum``."""
        if ROLES.index(self.role) < ROLES.index(minimum):
            raise TokenError(
                f"operator {self.subject!r} has role {self.role!r}; this needs {minimum!r}",
                reason="forbidden",
            )

    def to_payload(self) -> dict[str, Any]:
        tenants: str | list[str] = "*" if self.all_tenants else sorted(self.tenants)
        return self._common(OPERATOR_AUDIENCE) | {
            "sub": self.subject,
            "role": self.role,
            "tenants": tenants,
        }


ClaimsT = TypeVar("ClaimsT", EnrollmentClaims, NodeClaims, OperatorClaims)


@attrs.frozen(kw_only=True)
class IssuedToken(Generic[ClaimsT]):
    """A freshly signed token and the claims in it. The repr leaves the token out."""

    token: str = attrs.field(repr=False)
    claims: ClaimsT


# ---------------------------------------------------------------------------------------
# Issuing.


def _window(now: float, ttl: float) -> tuple[float, float]:
    if not math.isfinite(now) or not math.isfinite(ttl) or ttl <= 0:
        raise ValueError("now must be finite and ttl positive")
    # Whole seconds: NumericDate may be fractional, but many verifiers round it.
    start = float(math.floor(now))
    return start, start + max(1, math.ceil(ttl))


@attrs.frozen(kw_only=True)
class TokenIssuer:
    """Signs the three token kinds with the relay's key. Callers pass ``now`` and ``jti``."""

    signing_key: RelaySigningKey

    def sign(self, claims: EnrollmentClaims | NodeClaims | OperatorClaims) -> str:
        import jwt  # here, not at the top: hosts that only peek at tokens never load PyJWT

        headers = {"kid": self.signing_key.kid, "typ": "JWT"}
        return jwt.encode(
            claims.to_payload(),
            self.signing_key.to_cryptography(),
            algorithm=_ALGORITHM,
            headers=headers,
        )

    def issue_enrollment_token(
        self,
        *,
        tenant_id: str,
        relay_endpoint: str,
        ca_pin: str,
        now: float,
        jti: str,
        ttl: float = ENROLLMENT_TOKEN_TTL,
        relay_endpoints: Iterable[str] = (),
    ) -> IssuedToken[EnrollmentClaims]:
        check_tenant_id(tenant_id)  # tenants come into being here: the rule holds from birth
        start, end = _window(now, ttl)
        claims = EnrollmentClaims(
            jti=jti,
            issued_at=start,
            not_before=start,
            expires_at=end,
            tenant_id=tenant_id,
            relay_endpoint=relay_endpoint,
            ca_pin=ca_pin,
            relay_endpoints=tuple(relay_endpoints),
        )
        return IssuedToken(token=self.sign(claims), claims=claims)

    def issue_node_token(
        self,
        *,
        node_id: str,
        tenant_id: str,
        key_thumbprint: str,
        now: float,
        jti: str,
        ttl: float = NODE_TOKEN_TTL,
    ) -> IssuedToken[NodeClaims]:
        start, end = _window(now, ttl)
        claims = NodeClaims(
            jti=jti,
            issued_at=start,
            not_before=start,
            expires_at=end,
            node_id=node_id,
            tenant_id=tenant_id,
            key_thumbprint=key_thumbprint,
        )
        return IssuedToken(token=self.sign(claims), claims=claims)

    def issue_operator_token(
        self,
        *,
        subject: str,
        role: Role,
        tenants: Iterable[str] | Literal["*"],
        now: float,
        jti: str,
        ttl: float = OPERATOR_TOKEN_TTL,
    ) -> IssuedToken[OperatorClaims]:
        start, end = _window(now, ttl)
        everything = tenants == "*"
        claims = OperatorClaims(
            jti=jti,
            issued_at=start,
            not_before=start,
            expires_at=end,
            subject=subject,
            role=role,
            tenants=frozenset() if everything else frozenset(tenants),
            all_tenants=everything,
        )
        return IssuedToken(token=self.sign(claims), claims=claims)


# ---------------------------------------------------------------------------------------
# Verifying.


def _refuse(message: str, reason: Reason, hint: str | None = None) -> NoReturn:
    raise TokenError(message, reason=reason, hint=hint)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        # Two parsers could each pick a different copy; refuse the ambiguity.
        raise ValueError("duplicate member")
    return result


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _describe_alg(alg: object) -> str:
    # The header is attacker-chosen: quote it only when short and printable.
    if isinstance(alg, str) and len(alg) <= 16 and alg.isprintable():
        return repr(alg)
    return "an unsupported algorithm"


@attrs.frozen(kw_only=True)
class _Parsed:
    signing_input: bytes
    signature: bytes
    kid: str | None
    payload: dict[str, Any]


def _parse(token: object, audience: str) -> _Parsed:
    """Step 1 (shape and header); the payload is parsed but *not* yet trusted."""
    if not isinstance(token, str):
        _refuse("token is not text", "malformed")
    if len(token) > MAX_TOKEN_LENGTH:
        _refuse(f"token is longer than {MAX_TOKEN_LENGTH} characters", "malformed")
    # No stripping: a token has one spelling; callers strip what they read from files.
    if not token:
        kind = _KIND_BY_AUDIENCE[audience]
        _refuse(f"the {kind} is empty", "malformed", token_hint("empty", audience))
    segments = token.split(".")
    if len(segments) != 3:
        _refuse("token is not a JWT (expected three dot-separated parts)", "malformed")
    header_b64, payload_b64, signature_b64 = segments
    header_bytes = b64url_decode(header_b64)
    payload_bytes = b64url_decode(payload_b64)
    signature = b64url_decode(signature_b64)
    if header_bytes is None or payload_bytes is None or signature is None:
        _refuse("token is not valid base64url", "malformed")
    header = _json_object(header_bytes)
    if header is None:
        _refuse("token header is not a JSON object", "malformed")
    alg = header.get("alg")
    if alg != _ALGORITHM:
        _refuse(
            f"token is signed with {_describe_alg(alg)}; only EdDSA is accepted",
            "bad_signature",
        )
    if "crit" in header:
        _refuse("token header names critical extensions this relay does not know", "malformed")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        _refuse("token header kid is not a string", "malformed")
    payload = _json_object(payload_bytes)
    if payload is None:
        _refuse("token payload is not a JSON object", "malformed")
    return _Parsed(
        signing_input=f"{header_b64}.{payload_b64}".encode("ascii"),
        signature=signature,
        kid=kid,
        payload=payload,
    )


def _claim(payload: Mapping[str, Any], name: str) -> Any:
    if name not in payload:
        _refuse(f"token has no {name!r} claim", "malformed")
    return payload[name]


def _build_claims(audience: str, payload: Mapping[str, Any]) -> _Claims:
    """Step 4: turn a payload into claims, or refuse as malformed."""
    kind = _KIND_BY_AUDIENCE[audience]
    iat = _claim(payload, "iat")
    try:
        common: dict[str, Any] = {
            "jti": _claim(payload, "jti"),
            "issued_at": iat,
            "not_before": payload.get("nbf", iat),
            "expires_at": _claim(payload, "exp"),
        }
        if audience == ENROLLMENT_AUDIENCE:
            rels = payload.get("rels", [])
            if not (isinstance(rels, list) and all(isinstance(r, str) for r in rels)):
                _refuse("enrollment token rels must be a list of host:port", "malformed")
            return EnrollmentClaims(
                **common,
                tenant_id=_claim(payload, "tid"),
                relay_endpoint=_claim(payload, "rel"),
                ca_pin=_claim(payload, "cap"),
                relay_endpoints=tuple(rels),
            )
        if audience == NODE_AUDIENCE:
            cnf = _claim(payload, "cnf")
            if not isinstance(cnf, dict) or "jkt" not in cnf:
                _refuse("node token has no cnf.jkt key binding", "malformed")
            return NodeClaims(
                **common,
                node_id=_claim(payload, "sub"),
                tenant_id=_claim(payload, "tid"),
                key_thumbprint=cnf["jkt"],
            )
        tenants = _claim(payload, "tenants")
        if tenants != "*" and not (
            isinstance(tenants, list) and all(isinstance(t, str) for t in tenants)
        ):
            _refuse('operator token tenants must be a list of tenant ids or "*"', "malformed")
        return OperatorClaims(
            **common,
            subject=_claim(payload, "sub"),
            role=_claim(payload, "role"),
            tenants=frozenset() if tenants == "*" else frozenset(tenants),
            all_tenants=tenants == "*",
        )
    except (TypeError, ValueError) as exc:
        # Validator messages name the field, never its value.
        raise TokenError(f"{kind} claims are invalid: {exc}", reason="malformed") from None


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def _check_audience(audience: str, payload: Mapping[str, Any]) -> None:
    aud = _claim(payload, "aud")
    if not isinstance(aud, str):
        # We only ever issue a single audience; a list is someone else's token.
        _refuse("token audience is not a single string", "malformed")
    if aud != audience:
        presented = _KIND_BY_AUDIENCE.get(aud, "token for another service")
        wanted = _KIND_BY_AUDIENCE[audience]
        _refuse(
            f"{_article(presented)} {presented} was presented where "
            f"{_article(wanted)} {wanted} is required",
            "wrong_audience",
        )


def _key_tuple(keys: Iterable[PublicKey]) -> tuple[PublicKey, ...]:
    return tuple(keys)


@attrs.frozen(kw_only=True)
class TokenVerifier:
    """The relay's verifying side: its public key(s) and the leeway for time checks.

    ``keys`` holds every relay key whose tokens are still honoured, newest first; during
    a key rollover it holds the old and the new one and each token is checked with the
    key its ``kid`` names.
    """

    keys: tuple[PublicKey, ...] = attrs.field(converter=_key_tuple)
    leeway: float = attrs.field(default=DEFAULT_LEEWAY)

    @keys.validator
    def _check_keys(self, attribute: attrs.Attribute[tuple[PublicKey, ...]], value: Any) -> None:
        if not value or not all(isinstance(k, PublicKey) for k in value):
            raise ValueError("a TokenVerifier needs at least one PublicKey")

    @leeway.validator
    def _check_leeway(self, attribute: attrs.Attribute[float], value: float) -> None:
        if not math.isfinite(value) or not 0 <= value <= 3600:
            raise ValueError("leeway must be between 0 and 3600 seconds")

    @classmethod
    def for_signing_key(
        cls, key: RelaySigningKey, *, leeway: float = DEFAULT_LEEWAY
    ) -> TokenVerifier:
        return cls(keys=(key.public_key,), leeway=leeway)

    def verify_enrollment_token(
        self, token: str, *, now: float, revocations: Revocations | None = None
    ) -> EnrollmentClaims:
        claims = self._verify(token, ENROLLMENT_AUDIENCE, now, revocations, allow_expired=False)
        assert isinstance(claims, EnrollmentClaims)
        return claims

    def verify_node_token(
        self,
        token: str,
        *,
        now: float,
        revocations: Revocations | None = None,
        allow_expired: bool = False,
    ) -> NodeClaims:
        """Verify a NodeSecurityToken.

        ``allow_expired`` is for attestation only, where a valid signature by the bound
        key stands in for freshness (see :mod:`.attestation`); the caller must then look
        at ``expires_at`` itself.
        """
        claims = self._verify(token, NODE_AUDIENCE, now, revocations, allow_expired=allow_expired)
        assert isinstance(claims, NodeClaims)
        return claims

    def verify_operator_token(
        self, token: str, *, now: float, revocations: Revocations | None = None
    ) -> OperatorClaims:
        claims = self._verify(token, OPERATOR_AUDIENCE, now, revocations, allow_expired=False)
        assert isinstance(claims, OperatorClaims)
        return claims

    @classmethod
    def for_cluster(
        cls,
        own: RelaySigningKey,
        published: Mapping[str, bytes],
        *,
        leeway: float = DEFAULT_LEEWAY,
    ) -> TokenVerifier:
        """The relay's own key first, then every key the cluster published (``kid`` to raw
        public key). A row whose ``kid`` is not its key's thumbprint is left out: a key is
        named by what it is, so a tampered row cannot lend its name to another key."""
        keys = [own.public_key]
        for kid, raw in sorted(published.items()):
            if kid == own.kid or len(raw) != 32:
                continue
            key = PublicKey(raw=raw)
            if key.thumbprint == kid:
                keys.append(key)
        return cls(keys=keys, leeway=leeway)

    def knows(self, kid: str | None) -> bool:
        """Whether a token with this header ``kid`` has a key to be checked with here
        (``None``: no key could tell, so there is nothing to look up)."""
        return kid is None or any(key.thumbprint == kid for key in self.keys)

    def _key_for(self, kid: str | None) -> PublicKey:
        if kid is None:
            _refuse("token header names no signing key (kid)", "bad_signature")
        for key in self.keys:
            if key.thumbprint == kid:
                return key
        _refuse(UNKNOWN_KEY_MESSAGE, "bad_signature")

    def _verify(
        self,
        token: str,
        audience: str,
        now: float,
        revocations: Revocations | None,
        *,
        allow_expired: bool,
    ) -> _Claims:
        if not math.isfinite(now):
            raise ValueError("now must be a finite Unix time")
        try:
            return self._verify_checked(token, audience, now, revocations, allow_expired)
        except TokenError as err:
            raise _for_audience(err, audience) from None

    def _verify_checked(
        self,
        token: str,
        audience: str,
        now: float,
        revocations: Revocations | None,
        allow_expired: bool,
    ) -> _Claims:
        parsed = _parse(token, audience)
        key = self._key_for(parsed.kid)
        # One Ed25519 verification, over exactly the bytes _parse checked (alg pinned to
        # EdDSA, canonical base64url). PyJWT used to repeat it: a third of the signature
        # work of every attestation, and a restarted relay attests its whole fleet at once.
        if not key.verify(parsed.signature, parsed.signing_input):
            _refuse("token signature does not verify", "bad_signature")
        _check_audience(audience, parsed.payload)
        claims = _build_claims(audience, parsed.payload)
        kind = _KIND_BY_AUDIENCE[audience]
        if revocations is not None and revocations.is_token_revoked(claims.jti):
            _refuse(f"this {kind} has been revoked", "revoked")
        starts = max(claims.not_before, claims.issued_at)
        if starts > now + self.leeway:
            raise TokenError(
                f"token not valid yet: host clock is {starts - now:.0f} s behind the relay",
                reason="not_yet_valid",
                hint="check NTP",
                clock_offset=starts - now,
            )
        if not allow_expired and now > claims.expires_at + self.leeway:
            _refuse(
                f"{kind} expired {_duration(now - claims.expires_at)} ago",
                "expired",
                _EXPIRED_HINT[audience],
            )
        return claims


# ---------------------------------------------------------------------------------------
# Reading without verifying, for the host side.


def _for_audience(err: TokenError, audience: str) -> TokenError:
    """``err`` with the hint for this kind of token, if it still has its reason's default."""
    hint = token_hint(err.reason, audience)
    if hint is None or err.hint != default_hint(err.reason):
        return err
    return TokenError(err.message, reason=err.reason, hint=hint, clock_offset=err.clock_offset)


def _peek(token: str, audience: str) -> _Claims:
    try:
        parsed = _parse(token, audience)
        _check_audience(audience, parsed.payload)
        return _build_claims(audience, parsed.payload)
    except TokenError as err:
        raise _for_audience(err, audience) from None


def peek_kid(token: object) -> str | None:
    """The header ``kid`` of a token, unverified; ``None`` when it has none or is no JWT.

    For the relay to tell whether it should fetch the cluster's keys before verifying."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        return None
    header_b64 = token.split(".", 1)[0]
    header_bytes = b64url_decode(header_b64)
    header = _json_object(header_bytes) if header_bytes is not None else None
    kid = header.get("kid") if header is not None else None
    return kid if isinstance(kid, str) else None


def key_reload_due(
    verifier: TokenVerifier, kid: str | None, *, last_reload: float, now: float, interval: float
) -> bool:
    """Should the relay reload the cluster's published keys before verifying a token with
    ``kid``? Only for a ``kid`` it does not know, and at most once per ``interval``: a
    stream of forged kids must not turn into a stream of database reads."""
    return not verifier.knows(kid) and now - last_reload >= interval


def peek_enrollment_token(token: str) -> EnrollmentClaims:
    """Read an enrollment token's claims on the host, **without** verifying the signature.

    The host has no relay key before it enrolls; it needs ``rel`` and ``cap`` to reach
    the relay, and trust comes from there: TLS is pinned to ``cap`` and the relay verifies
    the token when it is redeemed. Raises ``TokenError`` (``malformed``,
    ``bad_signature`` for a non-EdDSA header, ``wrong_audience``). No time check: the
    host's clock may be wrong, and the relay's verdict is the one that counts.
    """
    claims = _peek(token, ENROLLMENT_AUDIENCE)
    assert isinstance(claims, EnrollmentClaims)
    return claims


def peek_node_token(token: str) -> NodeClaims:
    """Read a node token's claims on the host, **without** verifying the signature.

    For showing status and scheduling refresh; the relay is the one that verifies it.
    """
    claims = _peek(token, NODE_AUDIENCE)
    assert isinstance(claims, NodeClaims)
    return claims
