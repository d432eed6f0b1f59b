"""The protocol's test vectors (docs/spec/vectors-v1.json) hold for the core.

Each vector is checked two ways: against the core's own functions, and, for the transcript
bytes, against the format as docs/protocol.md §5.1 states it, built here from the listed
fields alone. So the vectors, the spec and the core cannot drift apart without a test
failing; and scripts/gen_vectors.py --check (tests/test_protocol_doc.py, the nox proto
gate) fails when the core's encodings change.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519

from aegis_edge_core import PROTOCOL_VERSION
from aegis_edge_core.identity import NodeKey, PublicKey, RelaySigningKey, TokenVerifier
from aegis_edge_core.identity.attestation import attestation_transcript
from aegis_edge_core.identity.enrollment import enrollment_transcript
from aegis_edge_core.identity.errors import TokenError
from aegis_edge_core.identity.keys import jwk_thumbprint
from aegis_edge_core.identity.rotation import RotationProof, rotation_transcript, verify_rotation
from aegis_edge_core.identity.tokens import TokenIssuer, ca_pin

ROOT = Path(__file__).resolve().parents[2]
VECTORS: dict[str, Any] = json.loads((ROOT / "docs" / "spec" / "vectors-v1.json").read_text())
KEYS = {entry["name"]: entry for entry in VECTORS["keys"]}
TRANSCRIPTS = {entry["label"]: entry for entry in VECTORS["transcripts"]}
TOKENS = {entry["kind"]: entry for entry in VECTORS["tokens"]}


def _private(name: str) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(KEYS[name]["seed_hex"]))


def _fields(label: str) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in TRANSCRIPTS[label]["fields"]}


def test_the_file_is_versioned_for_this_protocol() -> None:
    assert VECTORS["version"] == 1
    assert VECTORS["protocol_version"] == PROTOCOL_VERSION
    assert set(TRANSCRIPTS) == {"enroll", "attest", "rotate"}
    assert set(TOKENS) == {"enrollment", "node", "operator"}


@pytest.mark.parametrize("name", sorted(KEYS))
def test_keys_and_thumbprints(name: str) -> None:
    entry = KEYS[name]
    seed = bytes.fromhex(entry["seed_hex"])
    key = NodeKey.from_seed(seed) if name != "relay_key" else RelaySigningKey.from_seed(seed)
    assert key.public_key.raw.hex() == entry["public_key_hex"]
    assert key.public_key.to_jwk() == entry["jwk"]
    assert key.thumbprint == entry["thumbprint"]
    # RFC 7638 by hand: the canonical JWK, members sorted, no whitespace.
    jwk = '{{"crv":"Ed25519","kty":"OKP","x":"{}"}}'.format(entry["jwk"]["x"])
    digest = hashlib.sha256(jwk.encode()).digest()
    assert jwk_thumbprint(bytes.fromhex(entry["public_key_hex"])) == entry["thumbprint"]
    assert base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == entry["thumbprint"]


@pytest.mark.parametrize("label", sorted(TRANSCRIPTS))
def test_transcript_bytes_follow_the_stated_format(label: str) -> None:
    vector = TRANSCRIPTS[label]
    expected = b"aegis-edge/v1/" + label.encode("ascii") + b"\x00"
    for field in vector["fields"]:
        data = bytes.fromhex(field["hex"])
        if field["encoding"] == "utf-8":
            assert data == field["value"].encode("utf-8")
        elif field["encoding"] == "u32be":
            assert data == field["value"].to_bytes(4, "big")
        else:
            assert field["encoding"] == "raw"
        expected += len(data).to_bytes(4, "big") + data
    assert expected.hex() == vector["transcript_hex"]


def test_transcripts_are_the_cores() -> None:
    enroll, attest, rotate = _fields("enroll"), _fields("attest"), _fields("rotate")
    assert enrollment_transcript(
        token_jti=enroll["jti"]["value"], public_key=bytes.fromhex(enroll["public_key"]["hex"])
    ) == bytes.fromhex(TRANSCRIPTS["enroll"]["transcript_hex"])
    assert attestation_transcript(
        protocol_version=attest["protocol_version"]["value"],
        node_id=attest["node_id"]["value"],
        nonce=bytes.fromhex(attest["nonce"]["hex"]),
    ) == bytes.fromhex(TRANSCRIPTS["attest"]["transcript_hex"])
    assert rotation_transcript(
        node_id=rotate["node_id"]["value"],
        new_public_key=bytes.fromhex(rotate["new_public_key"]["hex"]),
        nonce=bytes.fromhex(rotate["nonce"]["hex"]),
    ) == bytes.fromhex(TRANSCRIPTS["rotate"]["transcript_hex"])
    # The key fields are the keys the vectors name: enrolling node_key, rotating to new_node_key.
    assert enroll["public_key"]["hex"] == KEYS["node_key"]["public_key_hex"]
    assert rotate["new_public_key"]["hex"] == KEYS["new_node_key"]["public_key_hex"]


@pytest.mark.parametrize("label", sorted(TRANSCRIPTS))
def test_signatures_are_deterministic_and_verify(label: str) -> None:
    vector = TRANSCRIPTS[label]
    transcript = bytes.fromhex(vector["transcript_hex"])
    for signer in vector["signatures"]:
        signature = bytes.fromhex(signer["signature_hex"])
        assert _private(signer["key"]).sign(transcript) == signature
        public = PublicKey(raw=bytes.fromhex(KEYS[signer["key"]]["public_key_hex"]))
        assert public.verify(signature, transcript)
        # The label is bound: the same fields under another label do not verify.
        for other in {"enroll", "attest", "rotate"} - {label}:
            relabelled = transcript.replace(label.encode(), other.encode(), 1)
            assert not public.verify(signature, relabelled)


def test_signatures_pass_the_cores_verifiers() -> None:
    rotate = _fields("rotate")
    old_sig, new_sig = (
        bytes.fromhex(s["signature_hex"]) for s in TRANSCRIPTS["rotate"]["signatures"]
    )
    verified = verify_rotation(
        proof=RotationProof(
            new_public_key=bytes.fromhex(rotate["new_public_key"]["hex"]),
            old_key_signature=old_sig,
            new_key_signature=new_sig,
        ),
        node_id=rotate["node_id"]["value"],
        old_public_key=bytes.fromhex(KEYS["node_key"]["public_key_hex"]),
        nonce=bytes.fromhex(rotate["nonce"]["hex"]),
    )
    assert verified.new_key_thumbprint == KEYS["new_node_key"]["thumbprint"]


def _verifier() -> TokenVerifier:
    relay = RelaySigningKey.from_seed(bytes.fromhex(KEYS["relay_key"]["seed_hex"]))
    return TokenVerifier.for_signing_key(relay)


def test_tokens_verify_and_say_what_the_vectors_say() -> None:
    verifier = _verifier()
    for entry in VECTORS["tokens"]:
        assert entry["signing_key"] == "relay_key"
        assert entry["header"] == {
            "alg": "EdDSA",
            "kid": KEYS["relay_key"]["thumbprint"],
            "typ": "JWT",
        }
    now = TOKENS["enrollment"]["now"]
    enrollment = verifier.verify_enrollment_token(TOKENS["enrollment"]["token"], now=now)
    assert enrollment.to_payload() == TOKENS["enrollment"]["payload"]
    assert enrollment.jti == _fields("enroll")["jti"]["value"]
    assert enrollment.ca_pin == VECTORS["ca_pin"]["pin"]
    node = verifier.verify_node_token(TOKENS["node"]["token"], now=TOKENS["node"]["now"])
    assert node.to_payload() == TOKENS["node"]["payload"]
    assert node.key_thumbprint == KEYS["node_key"]["thumbprint"]
    assert node.node_id == _fields("attest")["node_id"]["value"]
    operator = verifier.verify_operator_token(
        TOKENS["operator"]["token"], now=TOKENS["operator"]["now"]
    )
    assert operator.to_payload() == TOKENS["operator"]["payload"]


def test_token_segments_are_the_compact_json_shown() -> None:
    # docs/protocol.md prints header and payload as compact JSON: those are the signed bytes.
    for entry in VECTORS["tokens"]:
        header, payload, _signature = entry["token"].split(".")
        for segment, value in ((header, entry["header"]), (payload, entry["payload"])):
            compact = json.dumps(value, separators=(",", ":")).encode()
            assert base64.urlsafe_b64encode(compact).rstrip(b"=").decode() == segment


def test_tokens_are_what_the_issuer_signs() -> None:
    verifier = _verifier()
    issuer = TokenIssuer(
        signing_key=RelaySigningKey.from_seed(bytes.fromhex(KEYS["relay_key"]["seed_hex"]))
    )
    tokens = {kind: (entry["token"], entry["now"]) for kind, entry in TOKENS.items()}
    token, now = tokens["enrollment"]
    assert issuer.sign(verifier.verify_enrollment_token(token, now=now)) == token
    token, now = tokens["node"]
    assert issuer.sign(verifier.verify_node_token(token, now=now)) == token
    token, now = tokens["operator"]
    assert issuer.sign(verifier.verify_operator_token(token, now=now)) == token


def test_a_tampered_token_does_not_verify() -> None:
    token = TOKENS["node"]["token"]
    header, payload, signature = token.split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    with pytest.raises(TokenError) as err:
        _verifier().verify_node_token(f"{header}.{payload}.{flipped}", now=TOKENS["node"]["now"])
    assert err.value.reason == "bad_signature"


def test_ca_pin() -> None:
    der = bytes.fromhex(VECTORS["ca_pin"]["certificate_der_hex"])
    x509.load_der_x509_certificate(der)  # a real certificate, not just bytes
    assert ca_pin(der) == VECTORS["ca_pin"]["pin"]
    assert hashlib.sha256(der).hexdigest() == VECTORS["ca_pin"]["pin"]


@pytest.mark.parametrize(
    "case", VECTORS["token_rejections"], ids=[c["description"] for c in VECTORS["token_rejections"]]
)
def test_token_rejections_give_their_reason(case: dict[str, Any]) -> None:
    verify = {
        "node": _verifier().verify_node_token,
        "enrollment": _verifier().verify_enrollment_token,
    }[case["verify_as"]]
    with pytest.raises(TokenError) as err:
        verify(case["token"], now=case["now"])
    assert err.value.reason == case["reason"]
