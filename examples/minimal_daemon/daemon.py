"""A minimal aegis-edge daemon written from docs/protocol.md and docs/tools.md alone.

It uses grpcio (with its runtime loading of the ``.proto`` files in ``proto/``),
cryptography and PyJWT -- none of this repository's Python packages -- to show that the
documents are enough to build a daemon: it enrolls with an enrollment token, attests on
every connect, heartbeats, keeps its node token fresh and answers ``edge.ping``, spooling
each result to disk until the relay acknowledges it. Section
numbers in the comments are docs/protocol.md's.

Run it (``grpcio-tools`` must be installed for the runtime proto loading)::

    python examples/minimal_daemon/daemon.py enroll <TOKEN> --state-dir /tmp/mini
    python examples/minimal_daemon/daemon.py run --state-dir /tmp/mini

``run`` prints one JSON line per event on stdout and exits 3 once the node is revoked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import random
import socket
import ssl
import struct
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

HERE = Path(__file__).resolve().parent
# grpcio's runtime loading finds .proto files on sys.path: the repository's proto/ and the
# copy of google/rpc/status.proto beside this file.
sys.path[:0] = [str(HERE.parent.parent / "proto"), str(HERE / "proto")]
stream_pb2, stream_pb2_grpc = grpc.protos_and_services("aegis/edge/v1/stream.proto")
enrollment_pb2, enrollment_pb2_grpc = grpc.protos_and_services("aegis/edge/v1/enrollment.proto")
common_pb2 = grpc.protos("aegis/edge/v1/common.proto")
status_pb2 = grpc.protos("google/rpc/status.proto")

PROTOCOL_VERSION = 1  # §3.1
AGENT_VERSION = "minimal-0.1"
TOOLS = ["edge.ping"]  # §9.2: exactly the tools this host runs
EXIT_REVOKED = 3
REFUSED_TYPE_URL = "type.googleapis.com/aegis.edge.v1.Refused"  # §11.3


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


# --------------------------------------------------------------------------- §5 transcripts


def transcript(label: str, *fields: bytes) -> bytes:
    """§5.1: "aegis-edge/v1/" || label || 0x00, then each field as u32be(len) || bytes."""
    out = b"aegis-edge/v1/" + label.encode("ascii") + b"\x00"
    for field in fields:
        out += struct.pack(">I", len(field)) + field
    return out


def raw_public_key(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# --------------------------------------------------------------------------- §11.3 refusals


def refusal_of(err: grpc.RpcError) -> tuple[str, str, float] | None:
    """(reason, message, retry_after_secs) from grpc-status-details-bin, or None."""
    call: Any = err
    for key, value in call.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.type_url == REFUSED_TYPE_URL:
                refused = stream_pb2.Refused.FromString(detail.value)
                return reason_name(refused.reason), refused.message, refused.retry_after_secs
    return None


def reason_name(value: int) -> str:
    try:
        return str(common_pb2.RefusalReason.Name(value)).removeprefix("REFUSAL_REASON_").lower()
    except ValueError:  # §11.1: a reason this daemon does not know reads as unspecified
        return "unspecified"


# --------------------------------------------------------------------------- state


class State:
    """The host's files: node.key (PKCS#8 PEM), node.token, ca.pem and node.json."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, name: str, data: bytes) -> None:
        # temp file, fsync, rename: a crash leaves the old file or the new one (§7.1 step 4)
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path / name)

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def key(self) -> Ed25519PrivateKey:
        key = serialization.load_pem_private_key(self.read("node.key"), password=None)
        assert isinstance(key, Ed25519PrivateKey)
        return key

    def node(self) -> dict[str, Any]:
        node: dict[str, Any] = json.loads(self.read("node.json"))
        return node


class Spool:
    """§9.4: every result stays on disk, one file each, until its ResultAck; a crash or a
    dropped stream loses none, and §9.3's repeated command_id is answered from here."""

    def __init__(self, state: State) -> None:
        self.state = state

    def _name(self, command_id: str) -> str:
        # any command id, whatever its characters, as a file name
        return "result-" + hashlib.sha256(command_id.encode()).hexdigest()

    def put(self, result: Any) -> None:
        self.state.write(self._name(result.command_id), result.SerializeToString())

    def get(self, command_id: str) -> Any:
        path = self.state.path / self._name(command_id)
        return stream_pb2.CommandResult.FromString(path.read_bytes()) if path.exists() else None

    def ack(self, command_id: str) -> None:
        (self.state.path / self._name(command_id)).unlink(missing_ok=True)

    def pending(self) -> list[Any]:
        paths = self.state.path.glob("result-*")
        return [stream_pb2.CommandResult.FromString(p.read_bytes()) for p in sorted(paths)]


# --------------------------------------------------------------------------- §2.2, §7 enroll


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def pinned_ca(endpoint: str, pin: str, ca_file: str | None) -> bytes:
    """§2.2: the certificate whose DER SHA-256 is the pin, as PEM."""
    if ca_file:
        ders = [
            c.public_bytes(serialization.Encoding.DER)
            for c in x509.load_pem_x509_certificates(Path(ca_file).read_bytes())
        ]
    else:
        host, port = split_endpoint(endpoint)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # only to read the presented chain; the pin decides
        ctx.set_alpn_protocols(["h2"])
        with (
            socket.create_connection((host, port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            # Public from Python 3.13 (a list of DER bytes); private before it.
            getter = getattr(tls, "get_unverified_chain", None)
            chain = getter() if getter else tls._sslobj.get_unverified_chain()
            der_format = getattr(ssl, "_ssl").ENCODING_DER  # noqa: B009
            ders = [c if isinstance(c, bytes) else c.public_bytes(der_format) for c in chain]
    for der in ders:
        if hashlib.sha256(der).hexdigest() == pin:
            return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    raise SystemExit(f"no certificate with the pinned hash {pin} at {endpoint}: refusing to enroll")


def enroll(token: str, state: State, ca_file: str | None) -> None:
    header = jwt.get_unverified_header(token)
    # §6.4: read without verifying (there is no relay key yet); TLS pinned to cap vouches
    claims = jwt.decode(token, options={"verify_signature": False})
    if header.get("alg") != "EdDSA" or claims.get("aud") != "aegis-edge-enroll":
        raise SystemExit("this is not an enrollment token")
    endpoint, pin, jti = claims["rel"], claims["cap"], claims["jti"]
    ca_pem = pinned_ca(endpoint, pin, ca_file)
    key = Ed25519PrivateKey.generate()
    public_key = raw_public_key(key)
    request = enrollment_pb2.EnrollRequest(
        enrollment_token=token,
        public_key=public_key,
        proof=key.sign(transcript("enroll", jti.encode(), public_key)),  # §5.2
        capabilities=capabilities(),
        host_time=time.time(),
    )
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    with grpc.secure_channel(endpoint, creds) as channel:
        try:
            answer = enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(request, timeout=15)
        except grpc.RpcError as err:
            refusal = refusal_of(err)
            if refusal is None:
                raise SystemExit(f"enrollment failed: {err}") from None
            raise SystemExit(f"enrollment refused ({refusal[0]}): {refusal[1]}") from None
    state.write(
        "node.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    state.write("ca.pem", ca_pem)
    state.write("node.token", answer.node_token.encode())
    endpoints = [endpoint, *[e for e in claims.get("rels", []) if e != endpoint]]
    node = {"node_id": answer.node_id, "tenant_id": answer.tenant_id, "endpoints": endpoints}
    state.write("node.json", json.dumps(node).encode())
    emit("enrolled", node_id=answer.node_id, tenant_id=answer.tenant_id)


# §9.2: other spellings of an architecture, as selectors' arch= expects them
ARCH_NAMES = {"amd64": "x86_64", "x64": "x86_64", "x86-64": "x86_64"}
ARCH_NAMES |= {"arm64": "aarch64", "armv8": "aarch64", "i686": "x86", "i386": "x86"}


def capabilities() -> Any:
    machine = platform.machine().lower()
    return common_pb2.Capabilities(
        os=platform.system().lower() or "unknown",
        arch=ARCH_NAMES.get(machine, machine or "unknown"),
        tools=TOOLS,
        hostname=socket.gethostname(),
        agent_version=AGENT_VERSION,
    )


# --------------------------------------------------------------------------- §8, §9 stream


class Revoked(Exception):
    pass


class Stream:
    """One EdgeStream.Connect call, from Hello to its end."""

    def __init__(self, state: State, call: Any) -> None:
        self.state = state
        self.call = call
        self.node = state.node()
        self.nonce = b""
        self.accepted: Any = None
        self.seq = 0
        self.unacked: dict[str, Any] = {}
        self.refresh_asked = False
        self.lock = asyncio.Lock()

    async def send(self, **body: Any) -> None:
        async with self.lock:  # one writer at a time on the call
            await self.call.write(stream_pb2.DaemonMessage(**body))

    async def heartbeat(self, token_jti: str = "") -> None:
        self.seq += 1  # §9.1: 1 on the first heartbeat of each stream, then +1
        beat = stream_pb2.Heartbeat(seq=self.seq, host_time=time.time(), token_jti=token_jti)
        await self.send(heartbeat=beat)

    async def store_token(self, token: str) -> None:
        """§9.6: store durably, then confirm with one heartbeat naming the jti."""
        self.state.write("node.token", token.encode())
        self.refresh_asked = False
        jti = jwt.decode(token, options={"verify_signature": False})["jti"]
        await self.heartbeat(token_jti=jti)

    async def heartbeats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.heartbeat()
            token = self.state.read("node.token").decode()
            claims = jwt.decode(token, options={"verify_signature": False})
            life = claims["exp"] - claims["iat"]
            left = claims["exp"] - time.time()
            if not self.refresh_asked and left < min(3600.0, life / 3):  # §9.6
                self.refresh_asked = True
                await self.send(token_refresh=stream_pb2.TokenRefreshRequest())

    async def run(self, spool: Spool) -> float:
        """Serve until the call ends; returns the delay before reconnecting."""
        node_id = self.node["node_id"]
        await self.send(
            hello=stream_pb2.Hello(
                protocol_version=PROTOCOL_VERSION,
                node_id=node_id,
                node_token=self.state.read("node.token").decode(),
                capabilities=capabilities(),
                host_time=time.time(),
                kind=stream_pb2.SESSION_KIND_DAEMON,
            )
        )
        beating: asyncio.Task[None] | None = None
        try:
            while True:
                msg = await self.call.read()
                if msg is grpc.aio.EOF:
                    emit("stream_ended")
                    return 1.0
                kind = msg.WhichOneof("body")
                if kind == "challenge":  # §8.3
                    ch = msg.challenge
                    if ch.protocol_version != PROTOCOL_VERSION or len(ch.nonce) < 16:
                        raise SystemExit("the relay speaks another protocol version")
                    self.nonce = ch.nonce
                    body = transcript(
                        "attest", struct.pack(">I", PROTOCOL_VERSION), node_id.encode(), ch.nonce
                    )
                    signature = self.state.key().sign(body)
                    await self.send(attestation=stream_pb2.AttestationResponse(signature=signature))
                elif kind == "refused":  # §8.5: the status that ends the call says it too
                    emit("refused", reason=reason_name(msg.refused.reason))
                elif kind == "accepted":  # §8.6
                    self.accepted = msg.accepted
                    emit("accepted", node_id=msg.accepted.node_id, seq_next=self.seq + 1)
                    if msg.accepted.node_token:
                        await self.store_token(msg.accepted.node_token)
                    for result in spool.pending():  # §9.4: unacknowledged, sent again
                        result.delivered_late = True
                        await self.send(result=result)
                    interval = msg.accepted.heartbeat_interval_secs or 30.0
                    beating = asyncio.get_running_loop().create_task(self.heartbeats(interval))
                elif kind == "heartbeat_ack":
                    emit("heartbeat_ack", seq=msg.heartbeat_ack.seq)
                elif kind == "command":
                    # §9.3: a command_id runs once; a repeat gets the spooled result again
                    result = spool.get(msg.command.command_id)
                    if result is None:
                        result = answer(msg.command)
                        spool.put(result)  # on disk before the relay can hear of it
                    await self.send(result=result)
                    emit("command", tool=msg.command.tool, outcome=result.outcome)
                elif kind == "result_ack":
                    spool.ack(msg.result_ack.command_id)
                    emit("result_acked", command_id=msg.result_ack.command_id)
                elif kind == "token_refresh":
                    await self.store_token(msg.token_refresh.node_token)
                elif kind == "drain":  # §9.9
                    emit("drained", reason=msg.drain.reason)
                    return msg.drain.reconnect_after_secs or 1.0
                elif kind == "revoked":  # §9.10
                    raise Revoked(msg.revoked.reason)
                # cancel: edge.ping finishes at once, so there is never anything to stop
        except grpc.aio.AioRpcError as err:
            refusal = refusal_of(err)
            if refusal is not None and refusal[0] == "revoked":
                raise Revoked(refusal[1]) from None
            emit("stream_failed", code=err.code().name, reason=refusal and refusal[0])
            return refusal[2] if refusal and refusal[2] else 1.0
        finally:
            if beating is not None:
                beating.cancel()


def answer(cmd: Any) -> Any:
    """§9.3 and docs/tools.md: the CommandResult for one invocation."""
    started = time.time()

    def result(kind: int, message: str = "", result_json: str = "") -> Any:
        ok = kind == stream_pb2.ERROR_KIND_OK
        return stream_pb2.CommandResult(
            command_id=cmd.command_id,
            outcome=common_pb2.TARGET_OUTCOME_OK if ok else common_pb2.TARGET_OUTCOME_ERROR,
            error_kind=kind,
            error_message=message,
            result_json=result_json,
            started_at=started,
            finished_at=time.time(),
        )

    try:
        args = json.loads(cmd.args_json) if cmd.args_json.strip() else {}
    except ValueError:
        return result(stream_pb2.ERROR_KIND_BAD_ARGUMENTS, "arguments are not JSON")
    if not isinstance(args, dict):
        return result(stream_pb2.ERROR_KIND_BAD_ARGUMENTS, "arguments must be a JSON object")
    if cmd.tool not in TOOLS:
        return result(stream_pb2.ERROR_KIND_UNKNOWN_TOOL, f"no tool {cmd.tool!r} here")
    # edge.ping.args.json: at most an "echo" string of up to 1024 characters
    echo = args.get("echo", "")
    if set(args) - {"echo"} or not isinstance(echo, str) or len(echo) > 1024:
        return result(stream_pb2.ERROR_KIND_BAD_ARGUMENTS, "edge.ping takes only echo (string)")
    body = json.dumps({"pong": True, "echo": echo, "t": time.time()})
    return result(stream_pb2.ERROR_KIND_OK, result_json=body)


async def run(state: State) -> int:
    node = state.node()
    creds = grpc.ssl_channel_credentials(root_certificates=state.read("ca.pem"))
    spool = Spool(state)
    attempt = 0
    while True:
        endpoint = node["endpoints"][attempt % len(node["endpoints"])]
        async with grpc.aio.secure_channel(endpoint, creds) as channel:
            stream = Stream(state, stream_pb2_grpc.EdgeStreamStub(channel).Connect())
            try:
                delay = await stream.run(spool)
            except Revoked as err:
                emit("revoked", message=str(err))
                return EXIT_REVOKED
            finally:
                stream.call.cancel()
        attempt = 0 if stream.accepted is not None else attempt + 1
        # §8.5: exponential backoff with jitter, at least what the relay asked for
        backoff = min(60.0, 2.0**attempt) * random.uniform(0.5, 1.0)  # noqa: S311
        await asyncio.sleep(max(delay, backoff if stream.accepted is None else delay))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_enroll = sub.add_parser("enroll", help="redeem an enrollment token")
    p_enroll.add_argument("token")
    p_enroll.add_argument("--state-dir", required=True)
    p_enroll.add_argument("--ca-cert", help="the relay CA, given out of band (§2.2)")
    p_run = sub.add_parser("run", help="connect, attest, heartbeat, answer edge.ping")
    p_run.add_argument("--state-dir", required=True)
    args = parser.parse_args()
    state = State(Path(args.state_dir))
    if args.command == "enroll":
        enroll(args.token.strip(), state, args.ca_cert)
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
