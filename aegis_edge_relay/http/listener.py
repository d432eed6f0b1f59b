"""Binding the HTTP app: one aiohttp site on the running loop, TLS from the relay's material."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl

from aiohttp import web

from aegis_edge_relay.tls import TlsMaterial

__all__ = ["HttpListener", "server_ssl_context"]


def server_ssl_context(tls: TlsMaterial) -> ssl.SSLContext:
    """A server context presenting the relay's certificate chain (the gRPC one).

    ``load_cert_chain`` reads only files; the chain and key go through an anonymous memory
    file so the key is never written anywhere new.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    fd = os.memfd_create("aegis-relay-http-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, tls.cert_chain + b"\n" + tls.private_key)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return ctx


class HttpListener:
    """The HTTP server bound to ``host:port`` (``OSError`` if it cannot be)."""

    def __init__(self, runner: web.AppRunner, site: web.SockSite, sock: socket.socket) -> None:
        self._runner = runner
        self._site = site
        self._sock = sock

    @classmethod
    async def bind(
        cls, app: web.Application, host: str, port: int, *, ssl_context: ssl.SSLContext | None
    ) -> HttpListener:
        # Bound here, before the relay starts, so a taken port is a startup error with
        # nothing started; served from start().
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
            0
        ][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        # Open requests (a console's event stream) get a second at shutdown, not 60.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.SockSite(runner, sock, ssl_context=ssl_context)
        return cls(runner, site, sock)

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    async def start(self) -> None:
        await self._site.start()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._runner.cleanup()
        self._sock.close()
