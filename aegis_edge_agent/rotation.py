"""Key rotation on the host: stage the new key, commit it once the relay confirms, and
recover a rotation a crash interrupted.

The new key is written as ``node.key.next`` before the proof is sent, and renamed over
``node.key`` only after the relay answered ``KeyRotated`` and the new token is on disk; so a
crash at any point leaves either the old key (the relay never switched) or a staged key the
token already names (start-up promotes it).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc
import grpc.aio

from aegis_edge_agent.connection import EOF, answer_challenge, rpc_error
from aegis_edge_agent.errors import refusal_of
from aegis_edge_agent.logs import EventLog
from aegis_edge_agent.statedir import StateDir
from aegis_edge_agent.status import StatusBoard
from aegis_edge_core import __version__
from aegis_edge_core import hoststate as hs
from aegis_edge_core import session as s
from aegis_edge_core.errors import AegisError
from aegis_edge_core.identity import NodeKey, dial_order, load_node_key
from aegis_edge_core.identity.errors import default_hint
from aegis_edge_core.identity.rotation import RotationProof, sign_rotation
from aegis_edge_core.wire import common_pb2, stream_pb2, stream_pb2_grpc

__all__ = [
    "KeyRotator",
    "commit_rotation",
    "control_rotate",
    "recover_rotation",
    "stage_rotation",
]

ROTATE_TIMEOUT = 30.0


def stage_rotation(
    state: StateDir, old_key: NodeKey, node_id: str, nonce: bytes
) -> tuple[NodeKey, RotationProof]:
    """Make the new key, stage it as node.key.next, and sign the rotation proof."""
    new_key = NodeKey.from_seed(os.urandom(32))
    state.write(hs.NODE_KEY_NEXT, new_key.to_pem())
    proof = sign_rotation(old_key=old_key, new_key=new_key, node_id=node_id, nonce=nonce)
    return new_key, proof


def commit_rotation(state: StateDir, new_key: NodeKey, token: str) -> None:
    """After KeyRotated: new token first, then the staged key over node.key (both atomic)."""
    state.write(hs.NODE_TOKEN, token + "\n")
    os.replace(state.file(hs.NODE_KEY_NEXT), state.key_path)
    node = state.load_node()
    state.write(hs.NODE_JSON, node.with_thumbprint(new_key.thumbprint).to_json())


def recover_rotation(state: StateDir, log: EventLog) -> None:
    """At start: finish a rotation the relay confirmed, or drop one it never did."""
    staged = state.file(hs.NODE_KEY_NEXT)
    if not staged.exists():
        return
    try:
        new_key = load_node_key(staged.read_bytes(), source=str(staged))
        claims = state.token_claims()
        try:
            current: str | None = state.load_key().thumbprint
        except (AegisError, OSError):
            current = None
        action = hs.rotation_recovery(
            token_thumbprint=claims.key_thumbprint if claims else None,
            current_thumbprint=current,
            staged_thumbprint=new_key.thumbprint,
        )
    except (AegisError, OSError):
        action = "discard"
    if action == "promote":
        os.replace(staged, state.key_path)
        log.warning("rotation_recovered", key_thumbprint=new_key.thumbprint)
    else:
        staged.unlink(missing_ok=True)


class RotationChannel(Protocol):
    """The accepted stream a rotation runs over."""

    @property
    def node_id(self) -> str: ...

    @property
    def nonce(self) -> bytes | None:
        """This session's attestation nonce: the proof is good for this session only."""

    def begin_rotation(self, proof: RotationProof) -> asyncio.Future[s.KeyRotated]:
        """Send the proof; the future resolves with the relay's answer."""


class KeyRotator:
    """``keys.rotate`` from the relay: rotate over the daemon's live stream."""

    def __init__(
        self,
        state: StateDir,
        *,
        log: EventLog,
        status: StatusBoard,
        channel: Callable[[], RotationChannel | None],
    ) -> None:
        self._state = state
        self._log = log
        self._status = status
        self._channel = channel

    async def rotate(self) -> str:
        channel = self._channel()
        if channel is None or channel.nonce is None:
            raise ConnectionError("no live stream to rotate the key over")
        old_key = self._state.load_key()
        new_key, proof = stage_rotation(self._state, old_key, channel.node_id, channel.nonce)
        confirmed = channel.begin_rotation(proof)
        try:
            rotated = await asyncio.wait_for(confirmed, timeout=ROTATE_TIMEOUT)
        except BaseException:
            self._state.file(hs.NODE_KEY_NEXT).unlink(missing_ok=True)
            raise
        commit_rotation(self._state, new_key, rotated.node_token)
        self._status.set(token_expires_at=rotated.expires_at)
        self._log.info("key_rotated", key_thumbprint=new_key.thumbprint)
        return new_key.thumbprint


async def control_rotate(state: StateDir, *, timeout: float = 30.0) -> str:
    """``aegis edge keys rotate``: a CONTROL session that rotates the key and swaps files.

    It dials the cluster's endpoints as the daemon does (``node.json``'s relay first, then
    the others, :func:`~aegis_edge_core.identity.dial_order`), moving on only while no relay
    has been reached: once one answered, its word is final, and once the proof is sent a
    failure is never retried elsewhere (the rotation may have happened there).
    """
    node = state.load_node()
    endpoints = node.endpoints
    missed: list[str] = []
    for failures in range(len(endpoints)):
        relay = dial_order(endpoints, node.relay, failures)
        try:
            return await _rotate_at(state, relay, timeout=timeout)
        except _Unreachable as err:
            missed.append(f"{relay}: {err}")
    raise AegisError(
        "key rotation failed: no relay could be reached (" + "; ".join(missed) + ")",
        hint="check that a relay of this host's cluster runs, then rotate again",
    )


class _Unreachable(Exception):
    """The relay was not reached (or refused the connection) before the proof was sent."""


async def _rotate_at(state: StateDir, relay: str, *, timeout: float) -> str:
    key = state.load_key()
    token = state.load_token()
    node = state.load_node()
    ca = state.load_ca()
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    proof_sent = False
    async with grpc.aio.secure_channel(relay, creds) as channel:
        stub: Any = stream_pb2_grpc.EdgeStreamStub(channel)
        call = stub.Connect()
        session = s.DaemonSession()

        async def flush() -> None:
            for msg in session.messages_to_send():
                await call.write(msg)

        async def exchange() -> str:
            nonlocal proof_sent
            session.hello(
                node_id=node.node_id,
                node_token=token,
                capabilities=common_pb2.Capabilities(agent_version=__version__),
                now=time.time(),
                control=True,
            )
            await flush()
            new_key: NodeKey | None = None
            while True:
                msg = await call.read()
                if msg is EOF:
                    raise AegisError("the relay closed the stream before confirming the rotation")
                assert isinstance(msg, stream_pb2.RelayMessage)
                for event in session.receive(msg, time.time()):
                    if isinstance(event, s.ChallengeReceived):
                        answer_challenge(session, key, node.node_id, event.nonce)
                    elif isinstance(event, s.Refused):
                        raise AegisError(
                            f"the relay refused this host ({event.reason}): {event.message}"
                        )
                    elif isinstance(event, s.SessionAccepted):
                        assert session.nonce is not None
                        new_key, proof = stage_rotation(state, key, node.node_id, session.nonce)
                        session.rotate_key(
                            new_public_key=proof.new_public_key,
                            old_key_signature=proof.old_key_signature,
                            new_key_signature=proof.new_key_signature,
                        )
                        proof_sent = True
                    elif isinstance(event, s.KeyRotated):
                        assert new_key is not None
                        commit_rotation(state, new_key, event.node_token)
                        return new_key.thumbprint
                    elif isinstance(event, s.Revoked):
                        raise AegisError(
                            "the relay revoked this node", hint=default_hint("revoked")
                        )
                await flush()

        try:
            return await asyncio.wait_for(exchange(), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            if not proof_sent and err.code() == grpc.StatusCode.UNAVAILABLE:
                raise _Unreachable(rpc_error(err)) from None
            refusal = refusal_of(err)
            if refusal is None:
                raise AegisError(f"key rotation failed: {rpc_error(err)}") from None
            raise AegisError(refusal.message, hint=default_hint(refusal.reason)) from None
        except TimeoutError:
            raise AegisError("the relay did not confirm the key rotation in time") from None
        finally:
            state.file(hs.NODE_KEY_NEXT).unlink(missing_ok=True)
            call.cancel()
