"""Token attacks end to end on a real relay: forged, expired, ``alg: none``, algorithm
confusion, wrong audience, cross-tenant, stolen-without-key, replayed enrollment, replayed
attestation signature, and a revoked daemon's token and key. Each must be refused with its
reason; none may get in."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from aegis_edge_core.identity import (
    NodeKey,
    RelaySigningKey,
    TokenIssuer,
    load_relay_signing_key,
    sign_attestation,
)
from aegis_edge_core.identity.enrollment import sign_enrollment
from aegis_edge_core.session import Refused, SessionAccepted
from aegis_edge_core.wire import admin_pb2, enrollment_pb2, enrollment_pb2_grpc, stream_pb2
from tests.faults.conftest import Tally
from tests.faults.helpers import STREAM_METHOD, enrolled, issue_token
from tests.relay.daemon_driver import DaemonDriver, RelayProcess

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(120)]

EOF_: Any = grpc.aio.EOF  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    proc = RelayProcess.start(tmp_path_factory.mktemp("relay"))
    yield proc
    assert proc.stop() == 0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def alg_none(token: str) -> str:
    _, payload, _ = token.split(".")
    return f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{payload}."


def alg_hs256(token: str, secret: bytes) -> str:
    """Algorithm confusion: re-sign the claims with HMAC keyed by the relay's public key."""
    _, payload, _ = token.split(".")
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    sig = hmac.new(secret, f"{head}.{payload}".encode(), hashlib.sha256).digest()
    return f"{head}.{payload}.{_b64(sig)}"


def tampered(token: str, **claims: Any) -> str:
    """Change claims but keep the original signature."""
    head, payload, sig = token.split(".")
    data = json.loads(_unb64(payload))
    data.update(claims)
    return f"{head}.{_b64(json.dumps(data).encode())}.{sig}"


def issuers(relay: RelayProcess) -> tuple[TokenIssuer, TokenIssuer, RelaySigningKey]:
    path = relay.data_dir / "relay-signing.key"
    real = load_relay_signing_key(path.read_bytes(), source=str(path))
    forged = TokenIssuer(signing_key=RelaySigningKey.from_seed(os.urandom(32)))
    return TokenIssuer(signing_key=real), forged, real


def _jti() -> str:
    return "attack-" + os.urandom(8).hex()


def test_node_token_attacks(relay: RelayProcess, tally: Tally) -> None:
    insider, outsider, real_key = issuers(relay)
    now = time.time()

    async def scenario() -> None:
        async with relay.channel() as channel:
            victim = await enrolled(relay, channel, "victims")
            other = await enrolled(relay, channel, "victims")
            foreign = await enrolled(relay, channel, "strangers")
            assert isinstance(await victim.connect(), SessionAccepted)
            await victim.close()

            def node_token(issuer: TokenIssuer, **kw: Any) -> str:
                args: dict[str, Any] = {
                    "node_id": victim.node_id,
                    "tenant_id": "victims",
                    "key_thumbprint": victim.key.thumbprint,
                    "now": now,
                    "jti": _jti(),
                    "ttl": 3600,
                }
                args.update(kw)
                return issuer.issue_node_token(**args).token

            admin_token = relay.admin_token
            enroll_token = await issue_token(relay, channel, "victims")
            attacker_key = NodeKey.from_seed(os.urandom(32))
            # (label, node id, token, key the attacker holds, acceptable refusal reasons)
            cases: list[tuple[str, str, str, NodeKey, set[str]]] = [
                ("forged", victim.node_id, node_token(outsider), victim.key, {"bad_signature"}),
                (
                    "alg none",
                    victim.node_id,
                    alg_none(victim.token),
                    victim.key,
                    {"malformed", "bad_signature"},
                ),
                (
                    "alg HS256 with the relay's public key",
                    victim.node_id,
                    alg_hs256(victim.token, real_key.public_key.raw),
                    victim.key,
                    {"malformed", "bad_signature"},
                ),
                (
                    "claims edited under the old signature",
                    victim.node_id,
                    tampered(victim.token, exp=now + 10**6),
                    victim.key,
                    {"bad_signature"},
                ),
                (
                    "enrollment token as node token",
                    victim.node_id,
                    enroll_token,
                    victim.key,
                    {"wrong_audience"},
                ),
                (
                    "operator token as node token",
                    victim.node_id,
                    admin_token,
                    victim.key,
                    {"wrong_audience"},
                ),
                (
                    "cross-tenant claim (relay-signed)",
                    victim.node_id,
                    node_token(insider, tenant_id="strangers"),
                    victim.key,
                    {"wrong_tenant"},
                ),
                (
                    "another tenant's node token for this node id",
                    victim.node_id,
                    foreign.token,
                    foreign.key,
                    {"key_mismatch"},
                ),
                (
                    "same-tenant node's token for this node id",
                    victim.node_id,
                    other.token,
                    other.key,
                    {"key_mismatch"},
                ),
                (
                    "stolen token without the key",
                    victim.node_id,
                    victim.token,
                    attacker_key,
                    {"bad_signature"},
                ),
                (
                    "expired token without the key",
                    victim.node_id,
                    node_token(insider, now=now - 7 * 86400),
                    attacker_key,
                    {"bad_signature"},
                ),
                (
                    "token bound to the attacker's key (cnf swap, relay-signed)",
                    victim.node_id,
                    node_token(insider, key_thumbprint=attacker_key.thumbprint),
                    attacker_key,
                    {"key_mismatch"},
                ),
                (
                    "token issued in the future",
                    victim.node_id,
                    node_token(insider, now=now + 86400),
                    victim.key,
                    {"not_yet_valid"},
                ),
                ("garbage", victim.node_id, "not.a.jwt", victim.key, {"malformed"}),
                ("huge", victim.node_id, "e" * 20000, victim.key, {"malformed"}),
                (
                    "unknown node",
                    "n-doesnotexist0000",
                    node_token(insider, node_id="n-doesnotexist0000"),
                    victim.key,
                    {"unknown_node"},
                ),
            ]
            for label, node_id, token, key, reasons in cases:
                attacker = DaemonDriver(channel, key=key)
                attacker.node_id, attacker.token = node_id, token
                answer = await attacker.connect()
                await attacker.close()
                tally.refused(isinstance(answer, Refused), f"node token attack: {label}")
                assert isinstance(answer, Refused) and answer.reason in reasons, (label, answer)
                assert "eyJ" not in answer.message  # never echo a token

            # a replayed attestation signature (from an earlier session's nonce)
            ok = await replayed_signature(channel, victim)
            tally.refused(ok, "replayed attestation signature")
            assert ok

            # the real daemon still gets in after all that
            assert isinstance(await victim.connect(), SessionAccepted)
            await victim.close()

    asyncio.run(scenario())
    assert "eyJ" not in (relay.data_dir / "stderr.log").read_text()


async def replayed_signature(channel: grpc.aio.Channel, victim: DaemonDriver) -> bool:
    old_nonce = os.urandom(32)
    stale = sign_attestation(
        victim.key, protocol_version=1, node_id=victim.node_id, nonce=old_nonce
    )
    call = channel.stream_stream(
        STREAM_METHOD,
        request_serializer=lambda b: b,
        response_deserializer=stream_pb2.RelayMessage.FromString,
    )(timeout=10)
    await call.write(
        stream_pb2.DaemonMessage(
            hello=stream_pb2.Hello(
                protocol_version=1,
                node_id=victim.node_id,
                node_token=victim.token,
                host_time=time.time(),
            )
        ).SerializeToString()
    )
    challenge = await call.read()
    assert challenge.WhichOneof("body") == "challenge"
    await call.write(
        stream_pb2.DaemonMessage(
            attestation=stream_pb2.AttestationResponse(signature=stale)
        ).SerializeToString()
    )
    answer = await call.read()
    await call.done_writing()
    return bool(
        answer is not EOF_
        and answer.WhichOneof("body") == "refused"
        and answer.refused.reason == 3  # REFUSAL_REASON_BAD_SIGNATURE
    )


def test_enrollment_attacks(relay: RelayProcess, tally: Tally) -> None:
    insider, outsider, real_key = issuers(relay)
    now = time.time()

    async def scenario() -> None:
        async with relay.channel() as channel:
            stub = enrollment_pb2_grpc.EnrollmentStub(channel)
            admin = relay.admin(channel)

            def enroll_token(issuer: TokenIssuer, **kw: Any) -> str:
                args: dict[str, Any] = {
                    "tenant_id": "enrollees",
                    "relay_endpoint": relay.address,
                    "ca_pin": "0" * 64,
                    "now": now,
                    "jti": _jti(),
                    "ttl": 900,
                }
                args.update(kw)
                return issuer.issue_enrollment_token(**args).token

            async def attempt(
                token: str, *, key: NodeKey | None = None, proof_key: Any = None
            ) -> Any:
                key = key or NodeKey.from_seed(os.urandom(32))
                try:
                    from aegis_edge_core.identity.tokens import peek_enrollment_token

                    jti = peek_enrollment_token(token).jti
                except Exception:
                    jti = "unknown"
                try:
                    return await stub.Enroll(
                        enrollment_pb2.EnrollRequest(
                            enrollment_token=token,
                            public_key=key.public_key.raw,
                            proof=sign_enrollment(proof_key or key, token_jti=jti),
                            host_time=time.time(),
                        ),
                        timeout=10,
                    )
                except grpc.aio.AioRpcError as err:
                    return err

            used = await issue_token(relay, channel, "enrollees")
            assert not isinstance(await attempt(used), grpc.aio.AioRpcError)

            # a daemon that gets revoked: its key may not come back through a fresh token
            revoked = await enrolled(relay, channel, "enrollees")
            await admin.RevokeNode(
                admin_pb2.RevokeNodeRequest(node_id=revoked.node_id), metadata=relay.auth()
            )
            await admin.DeleteTenant(
                admin_pb2.DeleteTenantRequest(tenant_id="gone"), metadata=relay.auth()
            )
            victim = await enrolled(relay, channel, "enrollees")
            cases: list[tuple[str, Any, set[grpc.StatusCode]]] = [
                ("replayed", attempt(used), {grpc.StatusCode.ALREADY_EXISTS}),
                (
                    "forged",
                    attempt(enroll_token(outsider)),
                    {grpc.StatusCode.UNAUTHENTICATED},
                ),
                (
                    "expired",
                    attempt(enroll_token(insider, now=now - 3600)),
                    {grpc.StatusCode.UNAUTHENTICATED},
                ),
                (
                    "alg none",
                    attempt(alg_none(enroll_token(insider))),
                    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED},
                ),
                (
                    "alg HS256",
                    attempt(alg_hs256(enroll_token(insider), real_key.public_key.raw)),
                    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED},
                ),
                (
                    "tenant edited under the signature",
                    attempt(tampered(enroll_token(insider), tid="other")),
                    {grpc.StatusCode.UNAUTHENTICATED},
                ),
                (
                    "node token as enrollment token",
                    attempt(victim.token),
                    {grpc.StatusCode.UNAUTHENTICATED},
                ),
                (
                    "operator token as enrollment token",
                    attempt(relay.admin_token),
                    {grpc.StatusCode.UNAUTHENTICATED},
                ),
                (
                    "proof by another key",
                    attempt(
                        await issue_token(relay, channel, "enrollees"),
                        proof_key=NodeKey.from_seed(os.urandom(32)),
                    ),
                    {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED},
                ),
                (
                    "revoked key re-enrolling",
                    attempt(await issue_token(relay, channel, "enrollees"), key=revoked.key),
                    {grpc.StatusCode.PERMISSION_DENIED},
                ),
                (
                    "deleted tenant",
                    attempt(enroll_token(insider, tenant_id="gone")),
                    {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION},
                ),
                ("garbage", attempt("x" * 100), {grpc.StatusCode.INVALID_ARGUMENT}),
            ]
            for label, coro, codes in cases:
                answer = await coro
                refused = isinstance(answer, grpc.aio.AioRpcError)
                tally.refused(refused, f"enrollment attack: {label}")
                assert refused and answer.code() in codes, (label, answer)
                assert "eyJ" not in (answer.details() or "")

            # the revoked daemon's own token and key
            answer = await revoked.connect()
            await revoked.close()
            tally.refused(isinstance(answer, Refused), "revoked daemon's token and key")
            assert isinstance(answer, Refused) and answer.reason == "revoked", answer

    asyncio.run(scenario())


def test_operator_token_attacks(relay: RelayProcess, tally: Tally) -> None:
    insider, outsider, real_key = issuers(relay)
    now = time.time()

    def op(issuer: TokenIssuer, **kw: Any) -> str:
        args: dict[str, Any] = {
            "subject": "mallory",
            "role": "admin",
            "tenants": "*",
            "now": now,
            "jti": _jti(),
            "ttl": 3600,
        }
        args.update(kw)
        return issuer.issue_operator_token(**args).token

    async def scenario() -> None:
        async with relay.channel() as channel:
            admin = relay.admin(channel)
            node = await enrolled(relay, channel, "ops")
            real = relay.admin_token
            cases = {
                "forged": op(outsider),
                "alg none": alg_none(real),
                "alg HS256": alg_hs256(real, real_key.public_key.raw),
                "tenants widened under the signature": tampered(
                    relay.operator_token("ops-a", "viewer"), role="admin"
                ),
                "expired": op(insider, now=now - 40 * 86400, ttl=3600),
                "node token": node.token,
                "enrollment token": await issue_token(relay, channel, "ops"),
                "garbage": "abc",
                "empty": "",
            }
            for label, token in cases.items():
                meta = (("authorization", f"Bearer {token}"),) if token else ()
                try:
                    await admin.ListHosts(admin_pb2.ListHostsRequest(), metadata=meta)
                    ok = False
                except grpc.aio.AioRpcError as err:
                    ok = err.code() == grpc.StatusCode.UNAUTHENTICATED
                tally.refused(ok, f"operator token attack: {label}")
                assert ok, label
            # a viewer may not write, whatever it asks
            viewer = relay.auth(relay.operator_token("ops", "viewer"))
            for label, call, req in (
                (
                    "viewer tags",
                    admin.AddTags,
                    admin_pb2.TagsRequest(node_id=node.node_id, tags=["x"]),
                ),
                (
                    "viewer revokes",
                    admin.RevokeNode,
                    admin_pb2.RevokeNodeRequest(node_id=node.node_id),
                ),
                (
                    "viewer issues tokens",
                    admin.IssueEnrollmentToken,
                    admin_pb2.IssueEnrollmentTokenRequest(tenant_id="ops"),
                ),
            ):
                try:
                    await call(req, metadata=viewer)
                    ok = False
                except grpc.aio.AioRpcError as err:
                    ok = err.code() == grpc.StatusCode.PERMISSION_DENIED
                tally.refused(ok, label)
                assert ok, label

    asyncio.run(scenario())
