"""The daemon against a scripted in-process relay: stall detection and token refresh."""

from __future__ import annotations

import asyncio
import datetime
import io
import ipaddress
import json
import os
import time

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from aegis_edge_agent.daemon import Daemon
from aegis_edge_agent.logs import EventLog
from aegis_edge_agent.statedir import StateDir
from aegis_edge_core import hoststate as hs
from aegis_edge_core import session as s
from aegis_edge_core.identity import NodeKey, RelaySigningKey, TokenIssuer, peek_node_token
from aegis_edge_core.identity.attestation import VerifiedAttestation
from aegis_edge_core.wire import stream_pb2_grpc

ISSUER = TokenIssuer(signing_key=RelaySigningKey.from_seed(b"\x03" * 32))


def _self_signed() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test relay")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _token(key: NodeKey, ttl: float) -> str:
    return ISSUER.issue_node_token(
        node_id="n-1",
        tenant_id="t",
        key_thumbprint=key.thumbprint,
        now=time.time(),
        jti=os.urandom(8).hex() + "abcdefgh",
        ttl=ttl,
    ).token


class FakeRelay(stream_pb2_grpc.EdgeStreamServicer):
    def __init__(self, *, ack_heartbeats: bool, key: NodeKey) -> None:
        self.ack = ack_heartbeats
        self.key = key
        self.accepted = 0
        self.refreshes = 0
        self.acked: list[str] = []
        """jti values the daemon acknowledged (a heartbeat naming a token it stored)."""

    async def Connect(self, request_iterator, context):  # type: ignore[override]
        sess = s.RelaySession()
        async for msg in request_iterator:
            now = time.time()
            for ev in sess.receive(msg, now):
                if isinstance(ev, s.HelloReceived):
                    sess.challenge(os.urandom(32), now)
                elif isinstance(ev, s.AttestationReceived):
                    self.accepted += 1
                    sess.accept(
                        VerifiedAttestation(
                            node_id="n-1",
                            tenant_id="t",
                            nonce=ev.nonce,
                            key_thumbprint="x",
                            token_jti="j",
                            token_expired=False,
                            token_expires_at=now + 3,
                        ),
                        heartbeat_interval_secs=0.2,
                        stale_threshold_secs=0.6,
                        now=now,
                    )
                elif isinstance(ev, s.HeartbeatReceived) and ev.token_jti:
                    self.acked.append(ev.token_jti)
                elif isinstance(ev, s.TokenRefreshRequested):
                    self.refreshes += 1
                    sess.refresh_token(_token(self.key, 3600), now + 3600)
            for out in sess.messages_to_send():
                if out.WhichOneof("body") == "heartbeat_ack" and not self.ack:
                    continue
                yield out


def _state(tmp_path, port: int, ca: bytes, key: NodeKey, ttl: float) -> StateDir:
    sd = StateDir(tmp_path)
    sd.ensure()
    sd.write(hs.NODE_KEY, key.to_pem())
    sd.write(hs.NODE_TOKEN, _token(key, ttl))
    sd.write(hs.CA_PEM, ca)
    sd.write(hs.CONFIG_FILE, f"relay: 127.0.0.1:{port}\n")
    info = hs.NodeInfo(
        node_id="n-1",
        tenant_id="t",
        relay=f"127.0.0.1:{port}",
        key_thumbprint=key.thumbprint,
        enrolled_at=time.time(),
    )
    sd.write(hs.NODE_JSON, info.to_json())
    return sd


async def _with_relay(tmp_path, *, ack: bool, ttl: float, until, timeout: float = 15.0):
    cert, key_pem = _self_signed()
    node_key = NodeKey.from_seed(os.urandom(32))
    relay = FakeRelay(ack_heartbeats=ack, key=node_key)
    server = grpc.aio.server()
    stream_pb2_grpc.add_EdgeStreamServicer_to_server(relay, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, cert)]))
    await server.start()
    buf = io.StringIO()
    sd = _state(tmp_path, port, cert, node_key, ttl)
    daemon = Daemon(sd, log=EventLog(buf))
    task = asyncio.create_task(daemon.run())
    try:
        deadline = time.monotonic() + timeout
        while not until(relay, sd, buf.getvalue()):
            assert time.monotonic() < deadline, buf.getvalue()[-3000:]
            assert not task.done(), buf.getvalue()[-3000:]
            await asyncio.sleep(0.05)
    finally:
        daemon.stop_event.set()
        if daemon.conn is not None:
            daemon.conn.close("test over")
        assert await asyncio.wait_for(task, 10) == 0
        await server.stop(0)
    return buf.getvalue()


def _events(log: str) -> list[dict]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def test_stalled_relay_is_detected_and_redialled(tmp_path):
    log = asyncio.run(
        _with_relay(tmp_path, ack=False, ttl=3600, until=lambda r, sd, log: r.accepted >= 2)
    )
    stalls = [e for e in _events(log) if e["event"] == "relay_stalled"]
    assert stalls and stalls[0]["heartbeats_unacked"] >= 3
    assert any(e["event"] == "reconnect_backoff" for e in _events(log))


def test_token_is_refreshed_before_expiry(tmp_path):
    def refreshed(relay, sd, log):
        claims = sd.token_claims()
        return (
            relay.refreshes >= 1
            and claims is not None
            and (claims.expires_at - claims.issued_at > 1000)
            # acknowledged, naming the token that is on disk: the relay may now revoke
            # the one it replaced
            and claims.jti in relay.acked
        )

    log = asyncio.run(_with_relay(tmp_path, ack=True, ttl=3, until=refreshed))
    events = [e["event"] for e in _events(log)]
    assert "token_refresh_requested" in events and "token_refreshed" in events
    sd = StateDir(tmp_path)
    assert (sd.token_path.stat().st_mode & 0o777) == 0o600
    assert peek_node_token(sd.load_token()).node_id == "n-1"
    assert "eyJ" not in log  # no token in the logs
