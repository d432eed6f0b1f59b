"""The console: log in with an operator token; Edge Hosts, one host, fleet runs, one run.

Login exchanges an operator token for a session cookie (``HttpOnly; Secure;
SameSite=Strict``) that ends when the token expires, or at logout. The cookie stands for the
token on the console's pages, ``/console/events`` and ``/api/v1``: every call still goes to
the Admin servicer with the token, so what a session may see and change is exactly what the
token may. A change (any method but GET/HEAD) made with the cookie must also carry the
session's CSRF token (``X-CSRF-Token`` header or ``csrf_token`` form field), or it is
refused with 403 before anything runs; bearer-token calls carry no ambient credential and
need none.

``/console/events`` is a Server-Sent Events stream of one page of the hosts the session
sees (the API's host page: the hosts, counts by status, the next cursor), sent when it
changes; the page renders it without a reload. Only the page's hosts are built each second,
not every host (see ``ListHostsRequest.limit``). ``/console/runs/{id}/events`` relays the
Admin ``WatchFleetRun`` stream: the run once, then each target as it is dispatched and as
it ends, then the finished run, so the run page fills in target by target.

A one-time login link: ``POST /console/login-links`` with ``Authorization: Bearer
<operator token>`` answers ``{"url": ".../login/once/<code>", "expires_at": ...}``. The code
is random, good for one use within ``LINK_TTL`` seconds, and opens a session standing for
the token that asked for it (``aegis relay demo`` prints one). The URL never holds the
token, so it may be printed; a used or stale link is refused.

Sessions and links live in the store, so every relay over it honours them (a load balancer
may send a browser to any relay; a logout at one ends the session at all). The store never
holds the cookie or the code: a row is found by the SHA-256 of the secret, and the operator
token in it is sealed (AES-GCM) under a key derived from the secret, so the database alone
gives neither a way in nor the token.

The host, runs and run pages are static shells whose script reads the JSON API with the
session cookie; every change they make (tags, revoke) is an API call carrying the CSRF token.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import hmac
import html
import json
import secrets
import time
from collections.abc import Callable
from importlib import resources
from typing import Any, Final

import attrs
import grpc
from aiohttp import web
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aegis_edge_core.wire import admin_pb2
from aegis_edge_core.wire.admin_pb2_grpc import AdminServicer
from aegis_edge_relay.http import representation as rep
from aegis_edge_relay.http.context import Aborted, HttpContext
from aegis_edge_relay.http.paging import host_page, list_hosts_request
from aegis_edge_relay.http.params import BadRequest
from aegis_edge_relay.http.problems import problem
from aegis_edge_relay.store import ConsoleSecret, StoreUnavailable, StoreWorker

__all__ = ["COOKIE", "Sessions", "TokenCheck", "add_console"]

COOKIE: Final = "aegis_session"
EVENTS_PAGE: Final = 100
"""Hosts per page of the live table (counts cover every host)."""
EVENTS_INTERVAL: Final = 1.0
"""Seconds between looks at the hosts; a change reaches the page within about this."""

LINK_TTL: Final = 600.0
"""How long a one-time login link stays good (seconds)."""

TokenCheck = Callable[[str], float]
"""Verify an operator token; its expiry (epoch seconds), or raise ValueError with why not."""

_SAFE: Final = frozenset({"GET", "HEAD", "OPTIONS"})

_PAGES: Final = {
    # file: (title, the script's page, the path parameters it reads)
    "index.html": ("Edge Hosts", "hosts", ()),
    "host.html": ("Host {{node_id}}", "host", ("node_id",)),
    "runs.html": ("Fleet runs", "runs", ()),
    "run.html": ("Fleet run {{run_id}}", "run", ("run_id",)),
}


_CURRENT: Final[contextvars.ContextVar[Session | None]] = contextvars.ContextVar(
    "aegis_console_session", default=None
)
"""The session of the request being handled (set by the console's middleware)."""

SEAL_NONCE: Final = bytes(12)
"""Every sealing key is derived from one fresh secret and seals one token once, so a fixed
nonce never repeats under a key."""


@attrs.define
class Session:
    token: str = attrs.field(repr=False)
    csrf: str = attrs.field(repr=False)
    expires_at: float


def _derived(secret: str, purpose: bytes) -> bytes:
    return hashlib.sha256(b"aegis-console/" + purpose + b"\0" + secret.encode()).digest()


def _secret_hash(secret: str) -> str:
    """The secret's name in the store (its SHA-256, labelled): never the secret itself."""
    return _derived(secret, b"id").hex()


def _csrf(sid: str) -> str:
    """The session's CSRF token: derived from the cookie, so nothing more is stored, and a
    page that cannot read the cookie cannot make it."""
    return base64.urlsafe_b64encode(_derived(sid, b"csrf")).decode().rstrip("=")


def _seal(secret: str, token: str) -> bytes:
    return AESGCM(_derived(secret, b"seal")).encrypt(SEAL_NONCE, token.encode(), None)


def _unseal(secret: str, sealed: bytes) -> str | None:
    try:
        return AESGCM(_derived(secret, b"seal")).decrypt(SEAL_NONCE, sealed, None).decode()
    except (InvalidTag, UnicodeDecodeError):
        return None


class Sessions:
    """Session id -> operator token, and one-time login links, in the store (shared by
    every relay over it). Each request with the cookie costs one store read, done once by
    :meth:`load` before the handlers look (:meth:`get`)."""

    def __init__(self, db: StoreWorker, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    async def open(self, token: str, expires_at: float) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        row = ConsoleSecret(kind="session", sealed=_seal(sid, token), expires_at=expires_at)
        await self._db.call(
            self._db.store.put_console_secret, _secret_hash(sid), row, self._clock()
        )
        return sid, Session(token=token, csrf=_csrf(sid), expires_at=expires_at)

    async def find(self, sid: str) -> Session | None:
        """The live session of the cookie ``sid`` (None: unknown, logged out or expired --
        a session ends when its token does)."""
        if not sid:
            return None
        row = await self._db.call(
            self._db.store.get_console_secret, _secret_hash(sid), "session", self._clock()
        )
        token = _unseal(sid, row.sealed) if row is not None else None
        if row is None or token is None:
            return None
        return Session(token=token, csrf=_csrf(sid), expires_at=row.expires_at)

    async def load(self, request: web.Request) -> contextvars.Token[Session | None]:
        """Look the request's session up, for :meth:`get` while the request is handled (the
        caller resets the returned token when it is done)."""
        return _CURRENT.set(await self.find(request.cookies.get(COOKIE, "")))

    @staticmethod
    def get(_request: web.Request) -> Session | None:
        """The request's session, as :meth:`load` found it (one request is one task)."""
        return _CURRENT.get()

    async def still_open(self, request: web.Request) -> bool:
        """Whether the request's session is still live now (a logout at any relay ends it)."""
        return await self.find(request.cookies.get(COOKIE, "")) is not None

    async def close(self, request: web.Request) -> None:
        sid = request.cookies.get(COOKIE, "")
        if sid:
            await self._db.call(
                self._db.store.take_console_secret, _secret_hash(sid), "session", self._clock()
            )

    async def new_link(self, token: str) -> tuple[str, float]:
        """A one-time login code for ``token``; returns it and when it goes stale."""
        now = self._clock()
        code = secrets.token_hex(24)  # hex: never mistaken for (or logged as) a JWT
        row = ConsoleSecret(kind="link", sealed=_seal(code, token), expires_at=now + LINK_TTL)
        await self._db.call(self._db.store.put_console_secret, _secret_hash(code), row, now)
        return code, now + LINK_TTL

    async def redeem_link(self, code: str) -> str | None:
        """The token of a good, unused code; the code is spent either way."""
        row = await self._db.call(
            self._db.store.take_console_secret, _secret_hash(code), "link", self._clock()
        )
        return _unseal(code, row.sealed) if row is not None else None


def _asset(name: str) -> bytes:
    return resources.files("aegis_edge_relay.http").joinpath("console", name).read_bytes()


def _bearer(request: web.Request) -> str:
    scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
    return given.strip() if scheme.lower() == "bearer" else ""


def add_console(
    app: web.Application, admin: AdminServicer, check_token: TokenCheck, sessions: Sessions
) -> Callable[[web.Request], str]:
    """Add the console's routes and CSRF guard to ``app``; returns the credentials hook
    (bearer header, else the session's token) for the API."""
    layout = _asset("layout.html").decode()
    # Each page's <main> in the one layout (header, navigation, CSRF token); its path
    # parameters become data attributes of <body> for the script.
    pages = {"login.html": _asset("login.html").decode()}
    for name, (title, kind, params) in _PAGES.items():
        data = "".join(f' data-{key.replace("_", "-")}="{{{{{key}}}}}"' for key in params)
        pages[name] = (
            layout.replace("{{main}}", _asset(name).decode())
            .replace("{{title}}", title)
            .replace("{{page}}", kind)
            .replace("{{data}}", data)
        )
    assets = {
        "console.js": ("application/javascript", _asset("console.js")),
        "console.css": ("text/css", _asset("console.css")),
    }

    def credentials(request: web.Request) -> str:
        bearer = _bearer(request)
        if bearer:
            return bearer
        session = sessions.get(request)
        return session.token if session is not None else ""

    @web.middleware
    async def session_loader(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            loaded = await sessions.load(request)
            try:
                return await handler(request)  # type: ignore[no-any-return]
            finally:
                _CURRENT.reset(loaded)
        except StoreUnavailable as err:  # sessions live in the store: no store, no console
            return problem(grpc.StatusCode.UNAVAILABLE, str(err))

    @web.middleware
    async def csrf_guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method not in _SAFE and request.path != "/login" and not _bearer(request):
            session = sessions.get(request)
            if session is not None:
                given = request.headers.get("X-CSRF-Token", "")
                if not given and request.content_type == "application/x-www-form-urlencoded":
                    given = str((await request.post()).get("csrf_token", ""))
                if not hmac.compare_digest(given.encode(), session.csrf.encode()):
                    return problem(
                        grpc.StatusCode.PERMISSION_DENIED,
                        "refused: a change from the console must carry the session's CSRF "
                        "token (X-CSRF-Token); reload the page",
                    )
        return await handler(request)  # type: ignore[no-any-return]

    def page(name: str, **values: str) -> web.Response:
        text = pages[name]
        for key, value in values.items():
            text = text.replace("{{" + key + "}}", html.escape(value))
        return web.Response(
            text=text,
            content_type="text/html",
            headers={
                "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-store",
            },
        )

    def shell(name: str) -> Callable[[web.Request], Any]:
        async def show(request: web.Request) -> web.StreamResponse:
            session = sessions.get(request)
            if session is None:
                raise web.HTTPSeeOther("/login")
            return page(name, csrf=session.csrf, **request.match_info)

        return show

    async def login_form(_request: web.Request) -> web.Response:
        return page("login.html", error="")

    async def login(request: web.Request) -> web.StreamResponse:
        token = str((await request.post()).get("token", "")).strip()
        try:
            if not token:
                raise ValueError("paste an operator token (aegis relay operator-token prints one)")
            expires_at = check_token(token)
        except ValueError as err:
            response = page("login.html", error=str(err))
            response.set_status(401)
            return response
        raise await logged_in(token, expires_at)

    async def logged_in(token: str, expires_at: float) -> web.HTTPSeeOther:
        sid, _session = await sessions.open(token, expires_at)
        response = web.HTTPSeeOther("/")
        response.set_cookie(
            COOKIE,
            sid,
            httponly=True,
            secure=True,
            samesite="Strict",
            path="/",
            max_age=max(1, int(expires_at - time.time())),
        )
        return response

    async def new_login_link(request: web.Request) -> web.Response:
        token = _bearer(request)
        try:
            if not token:
                raise ValueError(
                    "send 'Authorization: Bearer <operator token>': the link logs in as it"
                )
            check_token(token)
        except ValueError as err:
            return problem(grpc.StatusCode.UNAUTHENTICATED, str(err))
        code, expires_at = await sessions.new_link(token)
        url = f"{request.scheme}://{request.host}/login/once/{code}"
        return web.json_response({"url": url, "expires_at": expires_at}, status=201)

    async def redeem_login_link(request: web.Request) -> web.StreamResponse:
        token = await sessions.redeem_link(request.match_info["code"])
        try:
            if token is None:
                raise ValueError(
                    "this login link was used already or is older than "
                    f"{LINK_TTL / 60:.0f} minutes; log in with an operator token"
                )
            expires_at = check_token(token)  # revoked or expired since the link was made
        except ValueError as err:
            response = page("login.html", error=str(err))
            response.set_status(401)
            return response
        raise await logged_in(token, expires_at)

    async def logout(request: web.Request) -> web.StreamResponse:
        await sessions.close(request)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(COOKIE, path="/")
        raise response

    async def asset(request: web.Request) -> web.Response:
        found = assets.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        content_type, body = found
        return web.Response(body=body, content_type=content_type)

    async def event_stream(request: web.Request) -> tuple[Session, web.StreamResponse] | None:
        session = sessions.get(request)
        if session is None:
            return None
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await response.prepare(request)
        return session, response

    async def events(request: web.Request) -> web.StreamResponse:
        opened = await event_stream(request)
        if opened is None:
            return problem(grpc.StatusCode.UNAUTHENTICATED, "not logged in (or the token expired)")
        session, response = opened
        values: dict[str, Any] = {"limit": EVENTS_PAGE}
        for key in ("selector", "after"):
            if request.query.get(key):
                values[key] = request.query[key]
        last = ""
        while True:
            try:
                if not await sessions.still_open(request):
                    break
            except StoreUnavailable as err:  # the page's EventSource comes back by itself
                await response.write(_event("problem", {"detail": str(err)}))
                return response
            try:
                context: Any = HttpContext(token=session.token, peer="console")
                listed = await admin.ListHosts(  # type: ignore[misc]
                    list_hosts_request(values), context
                )
            except (Aborted, BadRequest) as err:
                detail = err.details if isinstance(err, Aborted) else str(err)
                await response.write(_event("problem", {"detail": detail}))
                return response
            data = json.dumps(host_page(listed, values), sort_keys=True)
            if data != last:
                await response.write(_event("hosts", data))
                last = data
            await asyncio.sleep(EVENTS_INTERVAL)
        await response.write(_event("logout", {}))
        return response

    async def run_events(request: web.Request) -> web.StreamResponse:
        opened = await event_stream(request)
        if opened is None:
            return problem(grpc.StatusCode.UNAUTHENTICATED, "not logged in (or the token expired)")
        session, response = opened
        context: Any = HttpContext(token=session.token, peer="console")
        watch: Any = admin.WatchFleetRun(
            admin_pb2.GetFleetRunRequest(
                fleet_command_id=request.match_info["run_id"], batch_events=True
            ),
            context,
        )
        try:
            async for event in watch:
                await response.write(_run_event(event))
        except Aborted as err:
            await response.write(_event("problem", {"detail": err.details}))
        finally:
            await watch.aclose()
        return response

    app.middlewares.append(session_loader)
    app.middlewares.append(csrf_guard)
    app.router.add_get("/", shell("index.html"))
    app.router.add_get("/hosts/{node_id}", shell("host.html"))
    app.router.add_get("/runs", shell("runs.html"))
    app.router.add_get("/runs/{run_id}", shell("run.html"))
    app.router.add_get("/console/runs/{run_id}/events", run_events)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_post("/console/login-links", new_login_link)
    app.router.add_get("/login/once/{code}", redeem_login_link)
    app.router.add_get("/assets/{name}", asset)
    app.router.add_get("/console/events", events)
    return credentials


def _run_event(event: admin_pb2.FleetRunEvent) -> bytes:
    """The whole run when it starts and ends; one target row in between (a 10k-target run
    is sent once, not once per target)."""
    kind = event.WhichOneof("body")
    if kind in ("started", "finished"):
        return _event("run", rep.fleet_run(getattr(event, kind)))
    if kind in ("dispatched", "target_finished"):
        return _event("target", rep.target(getattr(event, kind)))
    if kind in ("targets_dispatched", "targets_finished"):
        # batched by the relay; the page still takes one row per event
        return b"".join(_event("target", rep.target(t)) for t in getattr(event, kind).targets)
    return b": output is not shown here\n\n"  # a comment line keeps the stream alive


def _event(name: str, data: Any) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    return f"event: {name}\ndata: {text}\n\n".encode()
