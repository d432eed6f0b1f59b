"""Shared fixtures-as-functions for the identity tests: deterministic keys, a fixed clock."""

from __future__ import annotations

import base64
import json
import random
from typing import Any

from aegis_edge_core.identity import (
    NodeKey,
    NodeRecord,
    RelaySigningKey,
    TokenIssuer,
    TokenVerifier,
    new_jti,
)

NOW = 1_750_000_000.0
CA_PIN = "ab" * 32
NONCE = bytes(range(32))


def relay_key(n: int = 1) -> RelaySigningKey:
    return RelaySigningKey.from_seed(bytes([n]) * 32)


def node_key(n: int = 1) -> NodeKey:
    return NodeKey.from_seed(bytes([0x80 + n]) * 32)


def issuer(key: RelaySigningKey | None = None) -> TokenIssuer:
    return TokenIssuer(signing_key=key or relay_key())


def verifier(key: RelaySigningKey | None = None, *, leeway: float = 60.0) -> TokenVerifier:
    return TokenVerifier.for_signing_key(key or relay_key(), leeway=leeway)


_RNG = random.Random(7)


def jti() -> str:
    return new_jti(_RNG)


def node_token(
    *,
    node_id: str = "node-1",
    tenant_id: str = "tenant-a",
    key: NodeKey | None = None,
    now: float = NOW,
    ttl: float = 24 * 3600.0,
    relay: RelaySigningKey | None = None,
) -> str:
    return (
        issuer(relay)
        .issue_node_token(
            node_id=node_id,
            tenant_id=tenant_id,
            key_thumbprint=(key or node_key()).thumbprint,
            now=now,
            jti=jti(),
            ttl=ttl,
        )
        .token
    )


def enrollment_token(
    *, tenant_id: str = "tenant-a", now: float = NOW, ttl: float = 900.0, token_jti: str = ""
) -> str:
    return (
        issuer()
        .issue_enrollment_token(
            tenant_id=tenant_id,
            relay_endpoint="relay.example.net:7443",
            ca_pin=CA_PIN,
            now=now,
            jti=token_jti or jti(),
            ttl=ttl,
        )
        .token
    )


def operator_token(
    *, role: Any = "operator", tenants: Any = ("tenant-a",), now: float = NOW
) -> str:
    return (
        issuer()
        .issue_operator_token(subject="alice", role=role, tenants=tenants, now=now, jti=jti())
        .token
    )


def record(
    *,
    node_id: str = "node-1",
    tenant_id: str = "tenant-a",
    key: NodeKey | None = None,
    revoked: bool = False,
) -> NodeRecord:
    return NodeRecord(
        node_id=node_id,
        tenant_id=tenant_id,
        public_key=(key or node_key()).public_key.raw,
        revoked=revoked,
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segment(obj: dict[str, Any]) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def split(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    h, p, s = token.split(".")
    return json.loads(_unb64(h)), json.loads(_unb64(p)), s


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def resign(header: dict[str, Any], payload: dict[str, Any], key: RelaySigningKey) -> str:
    """A token with arbitrary header and payload, properly signed by ``key``."""
    signing_input = f"{segment(header)}.{segment(payload)}"
    return f"{signing_input}.{b64(key.sign(signing_input.encode()))}"
