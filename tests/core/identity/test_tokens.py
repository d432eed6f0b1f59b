"""The three JWT kinds: issue, verify, and every way a token is refused."""

from __future__ import annotations

import hashlib
import hmac
import random
import time
import warnings
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from joserfc import jwt as jose_jwt
from joserfc.jwk import OKPKey

from aegis_edge_core.identity import (
    ENROLLMENT_AUDIENCE,
    NODE_AUDIENCE,
    OPERATOR_AUDIENCE,
    IssuedToken,
    PublicKey,
    RevocationList,
    TokenError,
    TokenVerifier,
    ca_pin,
    new_jti,
    peek_enrollment_token,
    peek_node_token,
)

from .helpers import (
    CA_PIN,
    NOW,
    b64,
    enrollment_token,
    issuer,
    node_key,
    node_token,
    operator_token,
    relay_key,
    resign,
    segment,
    split,
    verifier,
)


def public_jwk(key: PublicKey) -> dict[str, str | list[str]]:
    return dict(key.to_jwk())


def refused(call: Any, *args: Any, **kwargs: Any) -> TokenError:
    with pytest.raises(TokenError) as info:
        call(*args, **kwargs)
    return info.value


def verify_any(token: str, audience: str, *, now: float = NOW) -> object:
    v = verifier()
    if audience == ENROLLMENT_AUDIENCE:
        return v.verify_enrollment_token(token, now=now)
    if audience == NODE_AUDIENCE:
        return v.verify_node_token(token, now=now)
    return v.verify_operator_token(token, now=now)


class TestIssueAndVerify:
    def test_enrollment_token(self) -> None:
        claims = verifier().verify_enrollment_token(enrollment_token(), now=NOW + 10)
        assert claims.tenant_id == "tenant-a"
        assert claims.relay_endpoint == "relay.example.net:7443"
        assert claims.ca_pin == CA_PIN
        assert claims.expires_at == NOW + 900
        header, payload, _ = split(enrollment_token())
        assert header == {"alg": "EdDSA", "typ": "JWT", "kid": relay_key().kid}
        assert payload["aud"] == "aegis-edge-enroll"
        assert {"tid", "jti", "exp", "iat", "nbf", "rel", "cap"} <= payload.keys()

    def test_node_token(self) -> None:
        claims = verifier().verify_node_token(node_token(), now=NOW)
        assert claims.node_id == "node-1"
        assert claims.tenant_id == "tenant-a"
        assert claims.key_thumbprint == node_key().thumbprint
        assert claims.expires_at == NOW + 24 * 3600
        _, payload, _ = split(node_token())
        assert payload["aud"] == "aegis-edge-node"
        assert payload["cnf"] == {"jkt": node_key().thumbprint}
        assert payload["sub"] == "node-1"

    def test_operator_token(self) -> None:
        claims = verifier().verify_operator_token(operator_token(), now=NOW)
        assert claims.subject == "alice"
        assert claims.role == "operator"
        assert claims.tenants == frozenset({"tenant-a"})
        assert not claims.all_tenants
        assert claims.may_access("tenant-a") and not claims.may_access("tenant-b")
        claims.check_tenant("tenant-a")
        err = refused(claims.check_tenant, "tenant-b")
        assert err.reason == "wrong_tenant"

    def test_operator_token_for_all_tenants(self) -> None:
        token = operator_token(role="admin", tenants="*")
        assert split(token)[1]["tenants"] == "*"
        claims = verifier().verify_operator_token(token, now=NOW)
        assert claims.all_tenants and claims.may_access("anything")

    def test_operator_roles(self) -> None:
        viewer = verifier().verify_operator_token(operator_token(role="viewer"), now=NOW)
        viewer.check_role("viewer")
        assert refused(viewer.check_role, "operator").reason == "forbidden"
        admin = verifier().verify_operator_token(operator_token(role="admin"), now=NOW)
        admin.check_role("operator")
        admin.check_role("admin")

    def test_operator_role_must_be_known(self) -> None:
        with pytest.raises(ValueError):
            operator_token(role="root")

    def test_issued_token_repr_hides_token(self) -> None:
        issued = issuer().issue_node_token(
            node_id="n", tenant_id="t", key_thumbprint=node_key().thumbprint, now=NOW, jti="j" * 8
        )
        assert isinstance(issued, IssuedToken)
        assert issued.token not in repr(issued)
        assert issued.token.split(".")[2] not in repr(issued)

    def test_key_rollover(self) -> None:
        old, new = relay_key(1), relay_key(2)
        both = TokenVerifier(keys=[new.public_key, old.public_key])
        old_token = node_token(relay=old)
        new_token = node_token(relay=new)
        assert both.verify_node_token(old_token, now=NOW).node_id == "node-1"
        assert both.verify_node_token(new_token, now=NOW).node_id == "node-1"
        # Once the old key is retired its tokens stop verifying.
        assert (
            refused(verifier(new).verify_node_token, old_token, now=NOW).reason == "bad_signature"
        )

    def test_verifier_needs_keys(self) -> None:
        with pytest.raises(ValueError):
            TokenVerifier(keys=[])
        with pytest.raises(ValueError):
            TokenVerifier(keys=[relay_key().public_key], leeway=-1)

    def test_new_jti_and_ca_pin(self) -> None:
        assert new_jti(random.Random(1)) == new_jti(random.Random(1))
        assert new_jti(random.Random(1)) != new_jti(random.Random(2))
        assert len(new_jti(b"\x00" * 16)) == 22
        with pytest.raises(ValueError):
            new_jti(b"short")
        assert ca_pin(b"der") == hashlib.sha256(b"der").hexdigest()


class TestAudienceSeparation:
    TOKENS = {
        ENROLLMENT_AUDIENCE: enrollment_token,
        NODE_AUDIENCE: node_token,
        OPERATOR_AUDIENCE: operator_token,
    }

    @pytest.mark.parametrize("presented", list(TOKENS))
    @pytest.mark.parametrize("expected", list(TOKENS))
    def test_each_kind_only_where_it_belongs(self, presented: str, expected: str) -> None:
        token = self.TOKENS[presented]()  # type: ignore[operator]
        if presented == expected:
            verify_any(token, expected)
            return
        err = refused(verify_any, token, expected)
        assert err.reason == "wrong_audience"

    def test_node_token_as_operator_token_message(self) -> None:
        err = refused(verifier().verify_operator_token, node_token(), now=NOW)
        assert "a node token was presented where an operator token is required" in str(err)

    def test_audience_list_is_refused(self) -> None:
        header, payload, _ = split(node_token())
        payload["aud"] = [NODE_AUDIENCE, OPERATOR_AUDIENCE]
        token = resign(header, payload, relay_key())
        assert refused(verifier().verify_operator_token, token, now=NOW).reason == "malformed"
        assert refused(verifier().verify_node_token, token, now=NOW).reason == "malformed"


class TestForgery:
    def test_alg_none(self) -> None:
        header, payload, _ = split(node_token())
        for alg in ("none", "None", "NONE"):
            header["alg"] = alg
            for sig in ("", b64(b"x" * 64)):
                token = f"{segment(header)}.{segment(payload)}.{sig}"
                err = refused(verifier().verify_node_token, token, now=NOW)
                assert err.reason == "bad_signature"
                assert "only EdDSA" in str(err)

    def test_missing_alg(self) -> None:
        header, payload, sig = split(node_token())
        del header["alg"]
        token = f"{segment(header)}.{segment(payload)}.{sig}"
        assert refused(verifier().verify_node_token, token, now=NOW).reason == "bad_signature"

    def test_signed_by_another_key(self) -> None:
        token = node_token(relay=relay_key(9))
        err = refused(verifier().verify_node_token, token, now=NOW)
        assert err.reason == "bad_signature"

    def test_another_key_claiming_our_kid(self) -> None:
        header, payload, _ = split(node_token())
        assert header["kid"] == relay_key().kid
        token = resign(header, payload, relay_key(9))
        assert refused(verifier().verify_node_token, token, now=NOW).reason == "bad_signature"

    @pytest.mark.parametrize("secret_form", ["pem", "raw", "jwk_x"])
    def test_hs256_with_public_key_as_secret(self, secret_form: str) -> None:
        public = relay_key().public_key
        secret = {
            "pem": public.to_cryptography().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "raw": public.raw,
            "jwk_x": public.to_jwk()["x"].encode(),
        }[secret_form]
        header, payload, _ = split(node_token())
        header["alg"] = "HS256"
        signing_input = f"{segment(header)}.{segment(payload)}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        token = f"{signing_input}.{b64(mac)}"
        err = refused(verifier().verify_node_token, token, now=NOW)
        assert err.reason == "bad_signature"
        assert "'HS256'" in str(err)

    def test_payload_swapped_under_valid_signature(self) -> None:
        a = node_token(node_id="node-1")
        b = node_token(node_id="node-2")
        ha, _, sa = a.split(".")
        _, pb, _ = b.split(".")
        token = f"{ha}.{pb}.{sa}"
        assert refused(verifier().verify_node_token, token, now=NOW).reason == "bad_signature"

    def test_unknown_and_missing_kid(self) -> None:
        header, payload, _ = split(node_token())
        header["kid"] = "somebody-else"
        token = resign(header, payload, relay_key())
        assert refused(verifier().verify_node_token, token, now=NOW).reason == "bad_signature"
        del header["kid"]
        token = resign(header, payload, relay_key())
        assert refused(verifier().verify_node_token, token, now=NOW).reason == "bad_signature"

    def test_crit_header(self) -> None:
        header, payload, _ = split(node_token())
        header["crit"] = ["exp"]
        token = resign(header, payload, relay_key())
        assert refused(verifier().verify_node_token, token, now=NOW).reason == "malformed"

    def test_duplicate_header_member(self) -> None:
        header_json = '{"alg":"EdDSA","alg":"none","kid":"' + relay_key().kid + '"}'
        _, payload, _ = split(node_token())
        signing_input = f"{b64(header_json.encode())}.{segment(payload)}"
        token = f"{signing_input}.{b64(relay_key().sign(signing_input.encode()))}"
        assert refused(verifier().verify_node_token, token, now=NOW).reason == "malformed"

    def test_non_canonical_base64_is_refused(self) -> None:
        token = node_token()
        h, p, s = token.split(".")
        # The last character of a 64-byte signature carries 4 unused bits: flipping them
        # decodes to the same signature with a lenient decoder.
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        last = alphabet.index(s[-1])
        twin = alphabet[last ^ 0b0001]
        assert (
            refused(verifier().verify_node_token, f"{h}.{p}.{s[:-1]}{twin}", now=NOW).reason
            == "malformed"
        )
        assert (
            refused(verifier().verify_node_token, f"{h}.{p}.{s}==", now=NOW).reason == "malformed"
        )
        assert refused(verifier().verify_node_token, f"{h}.{p}!.{s}", now=NOW).reason == "malformed"


class TestMalformed:
    @pytest.mark.parametrize(
        "token",
        [
            "",
            "   ",
            "abc",
            "a.b",
            "a.b.c.d",
            "...",
            "x" * 10_000,
            "eyJ.eyJ.sig",
            "\u00e9.\u00e9.\u00e9",
        ],
    )
    def test_garbage(self, token: str) -> None:
        assert refused(verifier().verify_node_token, token, now=NOW).reason == "malformed"

    def test_not_a_string(self) -> None:
        assert refused(verifier().verify_node_token, b"a.b.c", now=NOW).reason == "malformed"

    @pytest.mark.parametrize(
        ("claim", "value"),
        [
            ("sub", None),
            ("sub", 12),
            ("tid", None),
            ("tid", ""),
            ("jti", None),
            ("exp", None),
            ("exp", "1750000000"),
            ("exp", True),
            ("iat", None),
            ("cnf", None),
            ("cnf", {"jwk": {}}),
            ("cnf", {"jkt": "short"}),
            ("cnf", "thumb"),
            ("aud", None),
            ("sub", "bad\nnode"),
        ],
    )
    def test_bad_node_claims(self, claim: str, value: object) -> None:
        header, payload, _ = split(node_token())
        if value is None:
            del payload[claim]
        else:
            payload[claim] = value
        token = resign(header, payload, relay_key())
        assert refused(verifier().verify_node_token, token, now=NOW).reason == "malformed"

    @pytest.mark.parametrize(
        ("claim", "value"),
        [("cap", "AB" * 32), ("cap", "ab" * 31), ("rel", None), ("tid", ["a"])],
    )
    def test_bad_enrollment_claims(self, claim: str, value: object) -> None:
        header, payload, _ = split(enrollment_token())
        if value is None:
            del payload[claim]
        else:
            payload[claim] = value
        token = resign(header, payload, relay_key())
        assert refused(verifier().verify_enrollment_token, token, now=NOW).reason == "malformed"

    @pytest.mark.parametrize(
        ("claim", "value"),
        [("role", "root"), ("tenants", "tenant-a"), ("tenants", [1]), ("tenants", None)],
    )
    def test_bad_operator_claims(self, claim: str, value: object) -> None:
        header, payload, _ = split(operator_token())
        if value is None:
            del payload[claim]
        else:
            payload[claim] = value
        token = resign(header, payload, relay_key())
        assert refused(verifier().verify_operator_token, token, now=NOW).reason == "malformed"


class TestTime:
    def test_expired(self) -> None:
        token = node_token()
        exp = NOW + 24 * 3600
        verifier().verify_node_token(token, now=exp + 60)  # inside the leeway
        err = refused(verifier().verify_node_token, token, now=exp + 61)
        assert err.reason == "expired"
        assert "expired" in str(err)
        err = refused(verifier().verify_node_token, token, now=exp + 3 * 3600)
        assert "3 h ago" in str(err)

    def test_expired_enrollment_token(self) -> None:
        err = refused(verifier().verify_enrollment_token, enrollment_token(), now=NOW + 900 + 61)
        assert err.reason == "expired"
        assert "enrollment token expired" in str(err)
        assert "tokens issue" in err.hint

    def test_not_yet_valid_names_the_skew(self) -> None:
        token = node_token()
        verifier().verify_node_token(token, now=NOW - 60)  # inside the leeway
        err = refused(verifier().verify_node_token, token, now=NOW - 312)
        assert err.reason == "not_yet_valid"
        assert err.message == "token not valid yet: host clock is 312 s behind the relay"
        assert "NTP" in str(err)
        assert err.clock_offset == 312

    def test_configurable_leeway(self) -> None:
        token = node_token()
        strict = verifier(leeway=0)
        assert refused(strict.verify_node_token, token, now=NOW - 1).reason == "not_yet_valid"
        lax = verifier(leeway=600)
        lax.verify_node_token(token, now=NOW - 599)
        lax.verify_node_token(token, now=NOW + 24 * 3600 + 599)

    def test_allow_expired_still_checks_everything_else(self) -> None:
        token = node_token()
        late = NOW + 30 * 86400
        assert verifier().verify_node_token(token, now=late, allow_expired=True).node_id == "node-1"
        assert (
            refused(verifier().verify_node_token, token, now=NOW - 1000, allow_expired=True).reason
            == "not_yet_valid"
        )


class TestRevocation:
    def test_revoked_jti(self) -> None:
        token = operator_token()
        claims = verifier().verify_operator_token(token, now=NOW)
        revocations = RevocationList()
        revocations.revoke_token(claims.jti, prune_after=claims.expires_at + 60)
        err = refused(verifier().verify_operator_token, token, now=NOW, revocations=revocations)
        assert err.reason == "revoked"


class TestSecretsStayOut:
    def test_messages_never_contain_the_token(self) -> None:
        token = node_token()
        h, p, s = token.split(".")
        attempts: list[tuple[Any, str]] = [
            (verifier().verify_operator_token, token),
            (verifier(relay_key(3)).verify_node_token, token),
            (verifier().verify_node_token, f"{h}.{p}.{'B' if s[0] == 'A' else 'A'}{s[1:]}"),
            (verifier().verify_node_token, f"{h}.{p}"),
        ]
        for call, presented in attempts:
            err = refused(call, presented, now=NOW)
            for part in (h, p, s):
                assert part[:16] not in str(err)
            assert err.__cause__ is None


class TestPeek:
    def test_peek_enrollment_token(self) -> None:
        claims = peek_enrollment_token(enrollment_token())
        assert claims.relay_endpoint == "relay.example.net:7443"
        assert claims.ca_pin == CA_PIN
        assert refused(peek_enrollment_token, node_token()).reason == "wrong_audience"
        assert refused(peek_enrollment_token, "garbage").reason == "malformed"

    def test_peek_node_token(self) -> None:
        assert peek_node_token(node_token()).node_id == "node-1"


class TestIndependentImplementation:
    def test_joserfc_verifies_a_node_token(self) -> None:
        key = relay_key()
        now = time.time()  # joserfc checks exp/nbf against the real clock
        token = node_token(now=now, relay=key)
        jwk = OKPKey.import_key(public_jwk(key.public_key))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # joserfc flags "EdDSA" as superseded by RFC 9864
            decoded = jose_jwt.decode(token, jwk, algorithms=["EdDSA"])
        assert decoded.header["alg"] == "EdDSA"
        assert decoded.header["kid"] == jwk.thumbprint()
        registry = jose_jwt.JWTClaimsRegistry(
            aud={"essential": True, "value": "aegis-edge-node"},
            sub={"essential": True, "value": "node-1"},
            tid={"essential": True, "value": "tenant-a"},
            exp={"essential": True},
            jti={"essential": True},
        )
        registry.validate(decoded.claims)
        assert decoded.claims["cnf"]["jkt"] == node_key().thumbprint
        assert decoded.claims["exp"] - decoded.claims["iat"] == 24 * 3600

    def test_we_verify_a_joserfc_token(self) -> None:
        key = relay_key()
        jwk = OKPKey.import_key(key.to_pem())
        claims = {
            "aud": NODE_AUDIENCE,
            "sub": "node-1",
            "tid": "tenant-a",
            "jti": "from-joserfc",
            "iat": int(NOW),
            "exp": int(NOW) + 600,
            "cnf": {"jkt": node_key().thumbprint},
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            token = jose_jwt.encode(
                {"alg": "EdDSA", "kid": key.kid}, claims, jwk, algorithms=["EdDSA"]
            )
        assert verifier().verify_node_token(token, now=NOW).jti == "from-joserfc"
