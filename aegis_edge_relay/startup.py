"""What a relay process needs around its parts: bind checks, limits, tokens, gRPC options.

Nothing here holds fleet state; :mod:`.server` calls these while it assembles the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import os
import resource
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import grpc

from aegis_edge_core.handshake import DEFAULT_HANDSHAKE_DEADLINE
from aegis_edge_core.identity import (
    OPERATOR_TOKEN_TTL,
    TokenError,
    TokenIssuer,
    TokenVerifier,
    new_jti,
)
from aegis_edge_core.session import MAX_MESSAGE_BYTES
from aegis_edge_relay import jsonlog
from aegis_edge_relay.files import atomic_write
from aegis_edge_relay.identity import load_or_create_signing_key
from aegis_edge_relay.store import StoreUnavailable

__all__ = [
    "GC_THRESHOLDS",
    "HAND_OVER_SIGNAL",
    "OPERATOR_TOKEN",
    "TAKE_OVER_SLACK",
    "RunningRelay",
    "StartupError",
    "StoreErrorInterceptor",
    "ensure_admin_token",
    "issue_operator_token",
    "load_metrics_token",
    "raise_nofile_limit",
    "running_relay",
    "take_over",
]

OPERATOR_TOKEN: Final = "operator.token"  # noqa: S105 - a file name


class StartupError(Exception):
    """The relay cannot start; ``str()`` is one line for stderr naming what and the fix."""


def load_metrics_token(path: Path) -> bytes:
    """The bearer token in ``path`` (surrounding whitespace dropped)."""
    try:
        text = path.read_bytes().decode("ascii").strip()
    except OSError as err:
        raise StartupError(
            f"--metrics-token-file {path}: cannot read it ({err.strerror or err})"
        ) from None
    except UnicodeDecodeError:
        raise StartupError(
            f"--metrics-token-file {path}: the token must be printable ASCII "
            f"(e.g. the output of 'openssl rand -hex 32')"
        ) from None
    if not text or any(not c.isprintable() or c.isspace() for c in text):
        raise StartupError(
            f"--metrics-token-file {path}: "
            + ("the file is empty" if not text else "the token holds spaces or control characters")
            + "; put one token on one line (e.g. the output of 'openssl rand -hex 32')"
        )
    return text.encode("ascii")


_BIND_ERRORS: Final = {
    errno.EADDRINUSE: "address already in use",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
    errno.EADDRNOTAVAIL: "no such address on this host",
}


def _cannot_listen(shown: str, flag: str, err: OSError | None) -> StartupError:
    if isinstance(err, socket.gaierror):
        why = f"the host name does not resolve ({err.strerror})"
    elif err is None:
        why = "gRPC could not bind it"
    else:
        why = _BIND_ERRORS.get(err.errno or 0, err.strerror or str(err))
    hint = f"another relay running? pick another {flag}"
    if err is not None and err.errno != errno.EADDRINUSE:
        hint = f"pick another {flag}"
    return StartupError(f"cannot listen on {shown}: {why} ({hint})")


def _probe_bind(host: str, port: int, *, share: bool = False) -> OSError | None:
    """Bind ``host:port`` the way gRPC will (SO_REUSEADDR), and let go: gRPC itself says
    only "failed to bind", and logs a line of its own.

    Without ``share`` the probe leaves SO_REUSEPORT off, so a port any relay listens on is
    busy even though gRPC (with ``grpc.so_reuseport``) would bind beside it: two relays
    sharing a port by mistake would split the daemons between them. ``share`` (taking over)
    probes with it."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        return err
    for family, kind, proto, _name, addr in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if share:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                probe.bind(addr)
        except OSError as err:
            return err
    return None


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


GC_THRESHOLDS: tuple[int, int, int] = (50_000, 20, 10)
"""The relay process's cyclic-GC thresholds (Python's default is 700, 10, 10). Per-command
and per-stream objects mostly die young; a larger first generation lets them, instead of
promoting them towards the full collections that walk every object of 10k streams."""


MALLOC_TRIM_THRESHOLD = 256 * 1024 * 1024
"""glibc returns a heap's free top to the system (madvise) once it exceeds this (default
128 KB). With 10k streams every burst of frees (a fleet run's messages, streams closing at a
drain) made it madvise over and over on the event loop's thread: ~40% of the main thread's
samples while a 10k relay drained. Freed memory is reused by the next burst instead."""


def _keep_freed_memory() -> None:
    import ctypes
    import ctypes.util

    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold = -1  # <malloc.h>
        libc.mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (one fd per daemon stream)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def issue_operator_token(
    data_dir: Path, *, subject: str, role: str, tenants: list[str] | None, ttl: float
) -> tuple[str, float]:
    """Sign an operator token with the relay's key in ``data_dir``."""
    key = load_or_create_signing_key(data_dir)
    issued = TokenIssuer(signing_key=key).issue_operator_token(
        subject=subject,
        role=role,  # type: ignore[arg-type]
        tenants="*" if tenants is None else tenants,
        now=_now(),
        jti=new_jti(os.urandom(16)),
        ttl=ttl,
    )
    return issued.token, issued.claims.expires_at


def _now() -> float:
    return time.time()


def ensure_admin_token(verifier: TokenVerifier, data_dir: Path, now: float) -> Path:
    """``D/operator.token``: an admin token for every tenant, (re)made when missing or
    within a day of expiry."""
    path = data_dir / OPERATOR_TOKEN
    if path.exists():
        try:
            claims = verifier.verify_operator_token(path.read_text().strip(), now=now + 86400)
            if claims.all_tenants and claims.role == "admin":
                return path
        except TokenError:
            pass
    token, _ = issue_operator_token(
        data_dir, subject="admin", role="admin", tenants=None, ttl=OPERATOR_TOKEN_TTL
    )
    atomic_write(path, (token + "\n").encode(), mode=0o600)
    return path


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class StoreErrorInterceptor(_Interceptor):
    """A store that cannot be written (locked, disk full) answers UNAVAILABLE with the
    store's sentence, instead of gRPC's generic UNKNOWN. The store rolled back: nothing
    half-written."""

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                try:
                    return await inner_uu(request, context)
                except StoreUnavailable as err:
                    await _store_abort(context, err)

            return handler._replace(unary_unary=unary_unary)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: Any) -> Any:
                try:
                    async for item in inner_us(request, context):
                        yield item
                except StoreUnavailable as err:
                    await _store_abort(context, err)

            return handler._replace(unary_stream=unary_stream)
        return handler


async def _store_abort(context: Any, err: StoreUnavailable) -> None:
    jsonlog.log("error", "store.unavailable", error=err.message, hint=err.hint)
    await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))


def _grpc_options(handshake_timeout: float = DEFAULT_HANDSHAKE_DEADLINE) -> list[tuple[str, Any]]:
    # Tuned for many long-lived streams and reconnect storms: no cap on concurrent
    # streams or pending requests that a few thousand reconnecting daemons would hit.
    return [
        # A TCP connection that has not finished TLS and the HTTP/2 preface by then is
        # closed by gRPC core (its default is 120 s: long enough to hold sockets open).
        ("grpc.server_handshake_timeout_ms", max(1, round(handshake_timeout * 1000))),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.max_receive_message_length", 2 * MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", 2 * MAX_MESSAGE_BYTES),
        ("grpc.max_concurrent_streams", 1_000_000),
        ("grpc.server.max_pending_requests", 1_000_000),
        ("grpc.server.max_pending_requests_hard_limit", 2_000_000),
        # Every relay lets a successor bind its port beside it (`serve --take-over`), so the
        # port never refuses a daemon during a restart; `_probe_bind` keeps an accidental
        # second relay out.
        ("grpc.so_reuseport", 1),
        # BDP probing pings the peer as data arrives, to size flow-control windows for bulk
        # transfers; 10k streams of small heartbeats gain nothing from it and pay a ping
        # round trip per burst (measured: -35% CPU on the bare floor at 10k streams).
        ("grpc.http2.bdp_probe", 0),
    ]


def _advertised(host: str, port: int, advertise: str | None) -> str:
    if advertise:
        return advertise
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - comparing, not binding
        host = socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


TAKE_OVER_SLACK: Final = 60.0
"""Seconds beyond the running relay's drain grace that ``--take-over`` waits for it to close
its store (it flushes heartbeats and hands runs over after the grace)."""


HAND_OVER_SIGNAL: Final = signal.SIGUSR2
"""What ``--take-over`` sends the running relay: drain like SIGTERM, but hand the fleet runs
over to the successor (which resumes them) instead of cancelling them."""


@attrs.frozen
class RunningRelay:
    """The ``aegis relay serve`` process named by ``D/relay.json``, alive."""

    pid: int
    port: int


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _is_relay_process(pid: int) -> bool:
    """Guard against a recycled pid: the process must be an ``aegis relay serve``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust relay.json
    return b"relay" in argv and b"serve" in argv


def running_relay(data_dir: Path) -> RunningRelay | None:
    """The relay serving from ``data_dir`` now, or None (nothing to take over)."""
    try:
        info = json.loads((data_dir / "relay.json").read_text())
        pid, port = int(info["pid"]), int(info["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid == os.getpid() or not _alive(pid) or not _is_relay_process(pid):
        return None
    return RunningRelay(pid=pid, port=port)


async def take_over(old: RunningRelay, data_dir: Path, *, timeout: float) -> float:
    """Signal the running relay to hand over (:data:`HAND_OVER_SIGNAL`) and wait until it
    has closed its store; returns seconds.

    The old relay removes ``relay.json`` only after its store is closed (every heartbeat
    flushed, runs handed over), so that, or its exit, is the signal that this relay may
    open the store: two writers never overlap."""
    started = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.kill(old.pid, HAND_OVER_SIGNAL)
    info = data_dir / "relay.json"
    while _alive(old.pid):
        try:
            named = json.loads(info.read_text()).get("pid")
        except (OSError, ValueError):
            named = None
        if named != old.pid:
            break
        if time.monotonic() - started > timeout:
            raise StartupError(
                f"--take-over: the relay running on {data_dir} (pid {old.pid}) did not stop "
                f"within {timeout:g}s; nothing was changed here (stop it, then start again)"
            )
        await asyncio.sleep(0.05)
    return time.monotonic() - started
