"""The daemon's floor: a bare grpc.aio TLS client with ``cryptography`` loaded, idle on one
stream. It imports nothing of ours (no protobuf either: the frames are raw bytes), signs one
frame with Ed25519 as a daemon's attestation does, then writes a heartbeat-sized frame every
``--interval`` seconds to ``benchmarks/scale_floor.py``. Whatever a grpcio daemon holds, it
cannot hold less than this; ``daemon_idle.py`` prints the daemon's RSS as a ratio to it.

    python benchmarks/daemon_floor.py --address 127.0.0.1:PORT --ca D/ca.pem [--interval 30]

Prints ``connected`` once the first frame is written; runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import grpc
import grpc.aio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

HEARTBEAT = b"\x0a\x26" + b"\x00" * 38
"""About the size of a daemon's heartbeat frame."""


async def run(args: argparse.Namespace) -> None:
    # The daemon reads its key from PEM: load one the same way.
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key = serialization.load_pem_private_key(pem, None)
    assert isinstance(key, Ed25519PrivateKey)
    creds = grpc.ssl_channel_credentials(root_certificates=Path(args.ca).read_bytes())
    options = [("grpc.enable_retries", 0)]  # as the agent's channel
    async with grpc.aio.secure_channel(args.address, creds, options=options) as channel:
        call = channel.stream_stream(
            "/aegis.edge.v1.EdgeStream/Connect",
            request_serializer=None,
            response_deserializer=None,
        )()
        await call.write(key.sign(os.urandom(32)))
        print("connected", flush=True)
        while True:
            await asyncio.sleep(args.interval)
            await call.write(HEARTBEAT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--interval", type=float, default=30.0)
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
