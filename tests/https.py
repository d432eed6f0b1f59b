"""HTTPS to a relay's HTTP server (``/metrics``, ``/healthz``, ``/api/v1``), trusting only
the relay's CA, as a scraper or API client would. Takes the relay's ``relay.json`` dict."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

__all__ = ["Answer", "request", "scrape", "ssl_context"]

Answer = tuple[int, dict[str, str], bytes]


def ssl_context(info: Mapping[str, Any]) -> ssl.SSLContext | None:
    """A client context whose one root is the relay's CA (``None`` for a plaintext relay)."""
    if not info.get("tls", True):
        return None
    return ssl.create_default_context(cafile=str(info["ca_cert"]))


def request(
    info: Mapping[str, Any],
    path: str,
    *,
    token: str | None = None,
    method: str = "GET",
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Answer:
    """``(status, headers, body)`` of one request; an HTTP error status is an answer too."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(str(info["http"]) + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ssl_context(info)) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def scrape(info: Mapping[str, Any], *, token: str | None = None, timeout: float = 10.0) -> str:
    """The text of ``/metrics`` (fails on anything but 200)."""
    status, _headers, body = request(info, "/metrics", token=token, timeout=timeout)
    assert status == 200, (status, body[:200])
    return body.decode()
