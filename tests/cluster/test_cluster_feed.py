"""Issue 18's last gaps, on the real PostgreSQL with two relays of one cluster (A creates it,
B joins with A's bundle), shared by the module's tests:

* cluster sync by change feed: an idle sync reads no rows, however many nodes there are,
  and every change (a tag, an enrollment, a stream that ends) still reaches the other relay;
* console sessions and login links in the store: log in at A, browse at B, log out at B
  and the session is gone at A too; the database holds neither cookie, code nor token;
* ``aegis edge keys rotate`` walks the endpoint list: with the first relay down it
  rotates through another.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest

from aegis_edge_agent.statedir import StateDir
from aegis_edge_core.wire import admin_pb2, common_pb2
from tests import https
from tests.agent.harness import cli
from tests.cluster.conftest import STALE
from tests.pg import fresh_database
from tests.relay.daemon_driver import DaemonDriver, RelayProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CLUSTER = "feed"
CONNECTED = common_pb2.DAEMON_STATUS_CONNECTED
DISCONNECTED = common_pb2.DAEMON_STATUS_DISCONNECTED
FLAGS = ("--stale-threshold", f"{STALE:g}s", "--heartbeat-interval", "0.5s")


class Pair:
    def __init__(self, url: str, root: Path, relays: list[RelayProcess]) -> None:
        self.url = url
        self.root = root
        self.a, self.b = relays
        self.bundle = root / "bundle.json"

    def join(self, name: str) -> RelayProcess:
        """One more relay of the cluster (the caller stops it)."""
        return RelayProcess.start(
            self.root / name, *FLAGS, "--join-bundle", str(self.bundle), store_url=self.url
        )


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("feed")
    with fresh_database() as url:
        relays: list[RelayProcess] = []
        try:
            relays.append(
                RelayProcess.start(root / "a", *FLAGS, "--cluster", CLUSTER, store_url=url)
            )
            bundle = root / "bundle.json"
            cli("relay", "join-bundle", "--data-dir", str(root / "a"), "--out", str(bundle))
            relays.append(
                RelayProcess.start(root / "b", *FLAGS, "--join-bundle", str(bundle), store_url=url)
            )
            yield Pair(url, root, relays)
        finally:
            for relay in relays:
                relay.stop()


def _syncs(relay: RelayProcess) -> dict[str, float]:
    """The relay's cluster-sync counters: {"feed": syncs, "feed_rows": rows, "full": ...}."""
    text = relay.scrape()
    out: dict[str, float] = {}
    for name, key in (
        ("aegis_edge_cluster_syncs_total", ""),
        ("aegis_edge_cluster_sync_rows_total", "_rows"),
    ):
        for read in ("feed", "full"):
            found = re.search(rf'^{name}{{read="{read}"}} (\S+)$', text, re.MULTILINE)
            out[read + key] = float(found.group(1)) if found else 0.0
    return out


async def _hosts(relay: RelayProcess, channel: Any) -> dict[str, admin_pb2.Host]:
    listed = await relay.admin(channel).ListHosts(
        admin_pb2.ListHostsRequest(), metadata=relay.auth(), timeout=10
    )
    return {h.node_id: h for h in listed.hosts}


async def _enroll(relay: RelayProcess, channel: Any) -> DaemonDriver:
    resp = await relay.admin(channel).IssueEnrollmentToken(
        admin_pb2.IssueEnrollmentTokenRequest(tenant_id="acme"), metadata=relay.auth()
    )
    daemon = DaemonDriver(channel)
    await daemon.enroll(resp.token)
    return daemon


def test_an_idle_sync_reads_no_rows_and_every_change_still_reaches_the_other_relay(
    pair: Pair,
) -> None:
    a, b = pair.a, pair.b

    async def scenario() -> None:
        async with a.channel() as ca, b.channel() as cb:
            enrolled = [await _enroll(a, ca) for _ in range(20)]
            live: list[DaemonDriver] = []
            for i, first in enumerate(enrolled[:4]):
                daemon = first
                if i % 2:  # held by B: the same key and token, attested there
                    daemon = DaemonDriver(cb, key=first.key)
                    daemon.node_id, daemon.tenant_id = first.node_id, "acme"
                    daemon.token = first.token
                await daemon.connect()
                daemon.start_heartbeats(0.3)
                live.append(daemon)
            connected = {d.node_id for d in live}
            fleet = {d.node_id for d in enrolled}

            async def both_show_the_fleet() -> bool:
                for relay, channel in ((a, ca), (b, cb)):
                    hosts = await _hosts(relay, channel)
                    if not fleet <= set(hosts):
                        return False
                    for node_id in fleet:
                        want = CONNECTED if node_id in connected else DISCONNECTED
                        if hosts[node_id].status != want:
                            return False
                return True

            await wait_until(both_show_the_fleet, timeout=20, what="A and B show the fleet")

            # idle: heartbeats flow, nothing changes; a full read would be 20 nodes + 4 holders
            before = {r.address: _syncs(r) for r in (a, b)}
            await asyncio.sleep(3.0)
            for relay in (a, b):
                after = _syncs(relay)
                syncs = after["feed"] - before[relay.address]["feed"]
                rows = after["feed_rows"] - before[relay.address]["feed_rows"]
                print(f"{relay.address}: {syncs:g} idle syncs read {rows:g} rows")
                assert syncs >= 3, after
                assert rows < 24, (syncs, rows)  # not even one full read over all of them
                assert after["full"] >= 1  # the start's full read

            # changes still come through: a tag set at A on a node B holds, a node enrolled
            # at A, a stream at B that ends (its holder row released)
            far = live[1]
            await a.admin(ca).AddTags(
                admin_pb2.TagsRequest(node_id=far.node_id, tags=["fed"]), metadata=a.auth()
            )
            late = await _enroll(a, ca)
            ended = live[3]
            await ended.close()

            async def b_and_a_saw_it() -> bool:
                at_b = await _hosts(b, cb)
                at_a = await _hosts(a, ca)
                return (
                    "fed" in at_b[far.node_id].capabilities.tags
                    and late.node_id in at_b
                    and at_a[ended.node_id].status == DISCONNECTED
                )

            await wait_until(b_and_a_saw_it, timeout=15, what="the changes at the other relay")
            for daemon in (*live[:3], *enrolled[4:], late):
                await daemon.close()

    asyncio.run(scenario())


class Browser:
    """HTTPS to a relay's console with no redirects followed (the cookie is the point)."""

    def __init__(self, relay: RelayProcess) -> None:
        self.relay = relay
        self.base = urllib.parse.urlsplit(str(relay.info["http"]))

    def send(
        self,
        method: str,
        path: str,
        *,
        cookie: str = "",
        form: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPSConnection(
            self.base.hostname or "", self.base.port, context=https.ssl_context(self.relay.info)
        )
        sent = dict(headers or {})
        body = None
        if cookie:
            sent["Cookie"] = f"aegis_session={cookie}"
        if form is not None:
            body = urllib.parse.urlencode(form)
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=body, headers=sent)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read().decode()
        finally:
            conn.close()


def _cookie(headers: Mapping[str, str]) -> str:
    found = re.search(r"aegis_session=([^;]+)", headers.get("Set-Cookie", ""))
    assert found, headers
    return found.group(1)


def _csrf(page: str) -> str:
    found = re.search(r'<meta name="csrf-token" content="([^"]+)"', page)
    assert found, page[:300]
    return found.group(1)


def test_a_console_session_opened_at_one_relay_holds_at_the_other_until_logout(
    pair: Pair,
) -> None:
    at_a, at_b = Browser(pair.a), Browser(pair.b)
    token = pair.a.admin_token
    status, headers, _ = at_a.send("POST", "/login", form={"token": token})
    assert status == 303, status
    sid = _cookie(headers)

    status, _, page = at_b.send("GET", "/", cookie=sid)
    assert status == 200 and "Edge Hosts" in page
    csrf = _csrf(page)
    assert at_a.send("GET", "/", cookie=sid)[0] == 200
    status, _, body = at_b.send("GET", "/api/v1/hosts", cookie=sid)
    assert status == 200 and "hosts" in json.loads(body)
    # a change at B with the session and no CSRF token is refused before it runs
    assert at_b.send("POST", "/logout", cookie=sid)[0] == 403

    # a one-time link made at B logs in once, at A
    status, _, body = https.request(pair.b.info, "/console/login-links", token=token, method="POST")
    assert status == 201
    path = urllib.parse.urlsplit(json.loads(body)["url"]).path
    status, headers, _ = at_a.send("GET", path)
    assert status == 303 and at_b.send("GET", "/", cookie=_cookie(headers))[0] == 200
    assert at_b.send("GET", path)[0] == 401  # used

    # the database knows the sessions only by hash, the token only sealed
    with psycopg.connect(pair.url) as conn:
        rows = conn.execute("SELECT * FROM console_sessions").fetchall()
    dump = repr(rows)
    assert len(rows) == 2
    for secret in (sid, path.rsplit("/", 1)[1], token, csrf):
        assert secret not in dump

    # logout at B ends the session at A
    status, _, _ = at_b.send("POST", "/logout", cookie=sid, headers={"X-CSRF-Token": csrf})
    assert status == 303
    status, headers, _ = at_a.send("GET", "/", cookie=sid)
    assert status == 303 and headers["Location"] == "/login"
    assert at_a.send("GET", "/api/v1/hosts", cookie=sid)[0] == 401


def test_keys_rotate_on_the_host_goes_to_the_next_relay_when_the_first_is_down(
    pair: Pair,
) -> None:
    c = pair.join("c")
    state = pair.root / "host"
    try:

        async def token_at_c() -> str:
            async with c.channel() as channel:
                resp = await c.admin(channel).IssueEnrollmentToken(
                    admin_pb2.IssueEnrollmentTokenRequest(tenant_id="acme"), metadata=c.auth()
                )
            return str(resp.token)

        cli("edge", "enroll", asyncio.run(token_at_c()), "--state-dir", str(state))
    finally:
        c.stop()
    node = json.loads((state / "node.json").read_text())
    assert node["relay"] == c.address  # the first endpoint, and it is down
    assert {pair.a.address, pair.b.address} <= set(node["relays"])
    old = StateDir(state).load_key().thumbprint

    started = time.monotonic()
    out = cli("edge", "keys", "rotate", "--state-dir", str(state), timeout=60)
    print(f"rotated past the down relay in {time.monotonic() - started:.2f} s")
    assert "rotated" in out.stdout
    new = StateDir(state).load_key().thumbprint
    assert new != old

    async def thumbprint_at(relay: RelayProcess) -> str:
        async with relay.channel() as channel:
            host = await relay.admin(channel).GetHost(
                admin_pb2.GetHostRequest(node_id=node["node_id"]), metadata=relay.auth()
            )
        return str(host.key_thumbprint)

    async def both_know_the_new_key() -> bool:
        return all([await thumbprint_at(relay) == new for relay in (pair.a, pair.b)])

    asyncio.run(wait_until(both_know_the_new_key, timeout=15, what="the new key at A and B"))
    assert not (state / "node.key.next").exists()
