"""The floor: a bare grpc.aio server that only holds ``EdgeStream.Connect`` streams and reads
their messages (raw bytes, discarded), over the same TLS certificate and server options as the
relay (passed in as JSON by scale.py, so this process imports grpc and nothing of ours: its
RSS is grpcio's, not our modules'). Whatever a grpcio relay does per daemon, it cannot cost
less than this.

    python benchmarks/scale_floor.py --cert D/server.pem --key D/server.key --out floor.json

Writes ``{"pid": ..., "port": ...}`` to ``--out`` once listening; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009


async def connect(request_iterator: Any, context: Any) -> None:
    while True:
        data = await context.read()
        if data is EOF:
            return


def raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(args: argparse.Namespace) -> None:
    raise_nofile_limit()
    options = [tuple(o) for o in json.loads(args.options)]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=None)
    handler = grpc.stream_stream_rpc_method_handler(
        connect, request_deserializer=None, response_serializer=None
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("aegis.edge.v1.EdgeStream", {"Connect": handler}),)
    )
    creds = grpc.ssl_server_credentials(
        [(Path(args.key).read_bytes(), Path(args.cert).read_bytes())]
    )
    port = server.add_secure_port(args.listen, creds)
    await server.start()
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "port": port}))
    tmp.replace(args.out)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--out", required=True)
    ap.add_argument("--options", default="[]", help="server options as JSON [[name, value]]")
    asyncio.run(serve(ap.parse_args()))


if __name__ == "__main__":
    main()
