"""The one adapter from an HTTP request to an Admin servicer call.

:class:`HttpContext` implements what the Admin servicer uses of
``grpc.aio.ServicerContext``: ``invocation_metadata()`` carries the request's operator token
as ``authorization: Bearer <token>``, so the servicer authenticates and authorizes it with
the core's ``authz`` exactly as for a gRPC call; ``abort(code, details)`` raises
:class:`Aborted`, which the API renders as a problem with the relay's sentence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import grpc

__all__ = ["Aborted", "HttpContext"]


class Aborted(Exception):
    """The servicer ended the call with ``code`` and ``details`` (the relay's sentence)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class HttpContext:
    """A ``grpc.aio.ServicerContext`` for one HTTP request (the subset servicers use)."""

    def __init__(self, *, token: str, peer: str) -> None:
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._peer = peer
        self.trailing_metadata: Sequence[tuple[str, Any]] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, Any]]) -> None:
        self.trailing_metadata = metadata

    async def abort(self, code: grpc.StatusCode, details: str = "", *_: Any) -> NoReturn:
        raise Aborted(code, details)
