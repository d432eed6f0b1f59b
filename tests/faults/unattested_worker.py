"""The attacker of ``test_unattested_flood.py``: many EdgeStream streams that never attest,
from several source addresses, in a process of its own.

gRPC channels cannot choose their source address, so each source other than 127.0.0.1
gets a small TCP forwarder: a listener on 127.0.0.1 whose outbound connections to the relay
are bound to that source (127.0.0.2, 127.0.0.3, ...: all of 127.0.0.0/8 is loopback on
Linux). TLS runs end to end through it; the relay sees the source as the peer address.

Per source, on one channel: ``held`` streams each send a hello (a made-up node id each, so
no per-node rate limit applies) and then nothing, waiting until the relay's challenge shows
they were admitted; then ``extra`` more streams open, which the per-source cap must refuse.
``silent`` streams from one more source send nothing at all. Every stream is read to its
end; the report (one JSON object on stdout) gives each stream's kind, source, final status
and details, the message kinds it got, and when it opened, was challenged and ended
(monotonic clock). A ``{"phase": "held"}`` line comes first, once every held stream was
challenged and every extra one answered.

    python -m tests.faults.unattested_worker '{"address": ..., "ca": ..., "sources": [...],
        "held": 64, "extra": 36, "silent_source": "127.0.0.12", "silent": 50}'
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

import grpc
import grpc.aio

from aegis_edge_core.wire import stream_pb2

METHOD = "/aegis.edge.v1.EdgeStream/Connect"
STREAM_TIMEOUT = 60.0
OPTIONS: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()


async def forwarder(source: str, host: str, port: int) -> tuple[asyncio.Server, int]:
    """A listener on 127.0.0.1 forwarding to ``host:port`` from ``source``."""

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            r_reader, r_writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
        except OSError:
            c_writer.close()
            return
        # cancelled when the worker exits with connections still up: nothing to report
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(_pipe(c_reader, r_writer), _pipe(r_reader, c_writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


class Stream:
    def __init__(self, kind: str, source: str, index: int) -> None:
        self.kind = kind
        self.source = source
        self.index = index
        self.code = ""
        self.details = ""
        self.got: list[str] = []
        self.opened = 0.0
        self.challenged: float | None = None
        self.ended = 0.0
        self.answered = asyncio.Event()
        """Set once the relay said something: a challenge, or the end of the stream."""

    async def run(self, channel: grpc.aio.Channel, hello: bool) -> None:
        call = channel.stream_stream(
            METHOD,
            request_serializer=lambda b: b,
            response_deserializer=stream_pb2.RelayMessage.FromString,
        )(timeout=STREAM_TIMEOUT)
        self.opened = time.monotonic()
        try:
            if hello:
                msg = stream_pb2.DaemonMessage(
                    hello=stream_pb2.Hello(
                        protocol_version=1,
                        node_id=f"n-flood-{self.source}-{self.index}",
                        node_token="forged.jwt.never-attests",
                        host_time=time.time(),
                    )
                )
                await call.write(msg.SerializeToString())
            async for reply in call:
                kind = str(reply.WhichOneof("body"))
                self.got.append(kind)
                if kind == "challenge" and self.challenged is None:
                    self.challenged = time.monotonic()
                    self.answered.set()
            self.code = (await call.code()).name
            self.details = await call.details() or ""
        except grpc.aio.AioRpcError as err:
            self.code = err.code().name
            self.details = err.details() or ""
        except Exception as err:  # reported, never hidden
            self.code = f"client error {type(err).__name__}: {err}"
        finally:
            self.ended = time.monotonic()
            self.answered.set()

    def report(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "source": self.source,
            "code": self.code,
            "details": self.details,
            "got": self.got,
            "opened": self.opened,
            "challenged": self.challenged,
            "ended": self.ended,
        }


async def main(cfg: dict[str, Any]) -> None:
    host, _, port_text = str(cfg["address"]).rpartition(":")
    port = int(port_text)
    creds = grpc.ssl_channel_credentials(root_certificates=open(cfg["ca"], "rb").read())  # noqa: SIM115
    targets: dict[str, str] = {}
    servers: list[asyncio.Server] = []
    for source in [*cfg["sources"], cfg["silent_source"]]:
        if source == host:
            targets[source] = f"{host}:{port}"
            continue
        server, local_port = await forwarder(source, host, port)
        servers.append(server)
        targets[source] = f"127.0.0.1:{local_port}"
    channels = {s: grpc.aio.secure_channel(t, creds, options=OPTIONS) for s, t in targets.items()}
    streams: list[Stream] = []
    tasks: list[asyncio.Task[None]] = []

    def launch(kind: str, source: str, count: int, hello: bool) -> list[Stream]:
        batch = [Stream(kind, source, len(streams) + i) for i in range(count)]
        streams.extend(batch)
        tasks.extend(asyncio.create_task(s.run(channels[source], hello)) for s in batch)
        return batch

    async def per_source(source: str) -> None:
        held = launch("held", source, int(cfg["held"]), hello=True)
        await asyncio.gather(*(s.answered.wait() for s in held))
        extra = launch("extra", source, int(cfg["extra"]), hello=False)
        await asyncio.gather(*(s.answered.wait() for s in extra))

    launch("silent", cfg["silent_source"], int(cfg["silent"]), hello=False)
    await asyncio.gather(*(per_source(s) for s in cfg["sources"]))
    print(json.dumps({"phase": "held", "streams": len(streams)}), flush=True)
    await asyncio.gather(*tasks)
    for channel in channels.values():
        await channel.close()
    for server in servers:
        server.close()
    print(json.dumps({"phase": "done", "streams": [s.report() for s in streams]}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
    sys.stdout.flush()
    os._exit(0)  # do not wait for grpc to wind a thousand finished calls down
