"""Two peers talking in memory (h11's test rig): a DaemonSession and a RelaySession.

Frames cross as bytes, so every message goes through ``receive_bytes`` like it would off a
real stream. The relay side verifies with the real identity code.
"""

from __future__ import annotations

import random

import attrs

from aegis_edge_core import PROTOCOL_VERSION
from aegis_edge_core.identity import (
    NodeKey,
    RelaySigningKey,
    RevocationList,
    TokenIssuer,
    TokenVerifier,
)
from aegis_edge_core.identity.attestation import (
    NodeRecord,
    VerifiedAttestation,
    sign_attestation,
    verify_attestation,
)
from aegis_edge_core.session import (
    AttestationReceived,
    DaemonSession,
    Event,
    HelloReceived,
    RelaySession,
)
from aegis_edge_core.wire import common_pb2

NOW = 1_800_000_000.0


@attrs.define
class Identity:
    rng: random.Random
    relay_key: RelaySigningKey
    issuer: TokenIssuer
    verifier: TokenVerifier
    node_key: NodeKey
    node_id: str
    tenant_id: str
    token: str
    revocations: RevocationList

    @classmethod
    def make(cls, seed: int = 0) -> Identity:
        rng = random.Random(seed)
        relay_key = RelaySigningKey.from_seed(rng.randbytes(32))
        node_key = NodeKey.from_seed(rng.randbytes(32))
        issuer = TokenIssuer(signing_key=relay_key)
        token = issuer.issue_node_token(
            node_id="node-1",
            tenant_id="tenant-a",
            key_thumbprint=node_key.thumbprint,
            now=NOW,
            jti=f"jti-{seed}",
        ).token
        return cls(
            rng=rng,
            relay_key=relay_key,
            issuer=issuer,
            verifier=TokenVerifier.for_signing_key(relay_key),
            node_key=node_key,
            node_id="node-1",
            tenant_id="tenant-a",
            token=token,
            revocations=RevocationList(),
        )

    @property
    def record(self) -> NodeRecord:
        return NodeRecord(
            node_id=self.node_id,
            tenant_id=self.tenant_id,
            public_key=self.node_key.public_key.raw,
        )

    def sign(self, nonce: bytes) -> bytes:
        return sign_attestation(
            self.node_key, protocol_version=PROTOCOL_VERSION, node_id=self.node_id, nonce=nonce
        )

    def verify(self, hello: HelloReceived, att: AttestationReceived) -> VerifiedAttestation:
        return verify_attestation(
            token=hello.node_token,
            signature=att.signature,
            nonce=att.nonce,
            protocol_version=PROTOCOL_VERSION,
            node_id=hello.node_id,
            verifier=self.verifier,
            node_record=self.record,
            revocations=self.revocations,
            now=NOW,
            host_time=hello.host_time,
        )


def caps() -> common_pb2.Capabilities:
    return common_pb2.Capabilities(os="linux", arch="x86_64", tools=["edge.ping"])


def to_relay(daemon: DaemonSession, relay: RelaySession, now: float = NOW) -> list[Event]:
    events: list[Event] = []
    for msg in daemon.messages_to_send():
        events += relay.receive_bytes(msg.SerializeToString(), now)
    return events


def to_daemon(relay: RelaySession, daemon: DaemonSession, now: float = NOW) -> list[Event]:
    events: list[Event] = []
    for msg in relay.messages_to_send():
        events += daemon.receive_bytes(msg.SerializeToString(), now)
    return events


def handshake(ident: Identity) -> tuple[DaemonSession, RelaySession]:
    """Run a full, valid handshake and return both sessions in ACCEPTED."""
    daemon, relay = DaemonSession(), RelaySession()
    daemon.hello(node_id=ident.node_id, node_token=ident.token, capabilities=caps(), now=NOW)
    (hello,) = to_relay(daemon, relay)
    assert isinstance(hello, HelloReceived)
    relay.challenge(ident.rng.randbytes(32), NOW)
    (challenge,) = to_daemon(relay, daemon)
    daemon.attest(ident.sign(challenge.nonce))  # type: ignore[attr-defined]
    (att,) = to_relay(daemon, relay)
    assert isinstance(att, AttestationReceived)
    relay.accept(
        ident.verify(hello, att), heartbeat_interval_secs=30, stale_threshold_secs=90, now=NOW
    )
    to_daemon(relay, daemon)
    return daemon, relay
