"""Property tests: nothing but a genuine token verifies, and refusals are always typed.

Whatever bytes arrive -- random text, a valid token with a character flipped, segments
swapped or the end cut off, a properly signed token with claims of any JSON type --
verification either returns claims for a genuine token or raises the identity error
for that operation. Never another exception, never a forgery accepted.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from aegis_edge_core.identity import (
    AttestationError,
    EnrollmentError,
    KeyFileError,
    NodeClaims,
    RevocationList,
    TokenError,
    load_node_key,
    peek_enrollment_token,
    peek_node_token,
    redeem_enrollment,
    sign_attestation,
    sign_enrollment,
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

# IDENTITY_FUZZ_EXAMPLES=5000 for a longer soak; the default keeps the suite quick.
SETTINGS = settings(
    max_examples=int(os.environ.get("IDENTITY_FUZZ_EXAMPLES", "150")), deadline=None
)

VALID_NODE_TOKEN = node_token()
VALID_TOKENS = [VALID_NODE_TOKEN, enrollment_token(), operator_token()]
OTHER_NODE_TOKEN = node_token(node_id="node-2")
TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ !\n\u00e9"


def refuses_everywhere(token: str) -> None:
    """No verifier accepts ``token``; each refuses with TokenError."""
    v = verifier()
    for check in (v.verify_node_token, v.verify_enrollment_token, v.verify_operator_token):
        try:
            check(token, now=NOW + 10)
        except TokenError:
            continue
        raise AssertionError("a mutated or random token verified")


@st.composite
def mutated_tokens(draw: st.DrawFn) -> str:
    token = draw(st.sampled_from(VALID_TOKENS))
    kind = draw(st.sampled_from(["flip", "swap", "truncate", "insert", "delete", "splice"]))
    if kind == "flip":
        i = draw(st.integers(0, len(token) - 1))
        c = draw(st.sampled_from(TOKEN_CHARS))
        mutated = token[:i] + c + token[i + 1 :]
    elif kind == "swap":
        parts = token.split(".")
        order = draw(st.permutations([0, 1, 2]))
        mutated = ".".join(parts[j] for j in order)
    elif kind == "truncate":
        mutated = token[: draw(st.integers(0, len(token) - 1))]
    elif kind == "insert":
        i = draw(st.integers(0, len(token)))
        mutated = token[:i] + draw(st.text(TOKEN_CHARS, min_size=1, max_size=4)) + token[i:]
    elif kind == "delete":
        i = draw(st.integers(0, len(token) - 1))
        j = draw(st.integers(i + 1, min(len(token), i + 8)))
        mutated = token[:i] + token[j:]
    else:
        # A segment taken from another genuine token, signed for something else.
        parts = token.split(".")
        other = OTHER_NODE_TOKEN.split(".")
        k = draw(st.integers(0, 2))
        parts[k] = other[k]
        mutated = ".".join(parts)
    assume(mutated != token)
    return mutated


@SETTINGS
@given(st.text(max_size=400))
def test_random_text_never_verifies(token: str) -> None:
    refuses_everywhere(token)


@SETTINGS
@given(st.binary(max_size=400))
def test_random_bytes_never_verify(data: bytes) -> None:
    refuses_everywhere(data.decode("latin-1"))


@SETTINGS
@given(st.lists(st.binary(min_size=0, max_size=120), min_size=3, max_size=3))
def test_random_base64_segments_never_verify(parts: list[bytes]) -> None:
    from .helpers import b64

    refuses_everywhere(".".join(b64(p) for p in parts))


@SETTINGS
@given(mutated_tokens())
def test_mutated_tokens_never_verify(token: str) -> None:
    refuses_everywhere(token)


@SETTINGS
@given(mutated_tokens())
def test_peek_is_typed_too(token: str) -> None:
    for peek in (peek_enrollment_token, peek_node_token):
        with contextlib.suppress(TokenError):
            peek(token)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


@SETTINGS
@given(
    st.sampled_from(["sub", "tid", "jti", "exp", "iat", "nbf", "cnf", "aud", "extra"]),
    json_values,
)
def test_signed_tokens_with_odd_claims_verify_or_refuse_typed(claim: str, value: Any) -> None:
    header, payload, _ = split(VALID_NODE_TOKEN)
    payload[claim] = value
    token = resign(header, payload, relay_key())
    try:
        claims = verifier().verify_node_token(token, now=NOW + 10)
    except TokenError:
        return
    assert isinstance(claims, NodeClaims)


@SETTINGS
@given(mutated_tokens(), st.binary(min_size=0, max_size=80))
def test_attestation_with_garbage_is_typed(token: str, signature: bytes) -> None:
    genuine = sign_attestation(node_key(), protocol_version=1, node_id="node-1", nonce=NONCE)
    for sig in (signature, genuine):
        try:
            verify_attestation(
                token=token,
                signature=sig,
                nonce=NONCE,
                protocol_version=1,
                node_id="node-1",
                verifier=verifier(),
                node_record=record(),
                revocations=RevocationList(),
                now=NOW + 10,
                host_time=None,
            )
        except AttestationError:
            continue
        raise AssertionError("attestation accepted a mutated token")


@SETTINGS
@given(mutated_tokens())
def test_enrollment_with_mutated_token_is_typed(token: str) -> None:
    try:
        redeem_enrollment(
            token=token,
            public_key=node_key().public_key.raw,
            proof=sign_enrollment(node_key(), token_jti="whatever"),
            verifier=verifier(),
            already_redeemed=set(),
            now=NOW + 10,
        )
    except EnrollmentError:
        return
    raise AssertionError("a mutated enrollment token was redeemed")


VALID_PEM = node_key().to_pem()


@SETTINGS
@given(st.binary(max_size=300))
def test_random_key_files_raise_key_file_error(data: bytes) -> None:
    try:
        load_node_key(data, source="node.key")
    except KeyFileError as err:
        assert "node.key" in str(err)


@SETTINGS
@given(st.integers(0, len(VALID_PEM) - 1), st.integers(0, 255))
def test_mutated_key_files_load_or_raise_key_file_error(i: int, byte: int) -> None:
    data = VALID_PEM[:i] + bytes([byte]) + VALID_PEM[i + 1 :]
    with contextlib.suppress(KeyFileError):
        load_node_key(data, source="node.key")
