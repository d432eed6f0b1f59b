"""Cluster identity on the real PostgreSQL: three relay processes over one fresh database.

Relay A creates cluster ``c1``; B and C join it with A's join bundle. Every relay signs
with its own key and verifies the others' tokens by ``kid``; one CA pin covers all three;
an enrollment token is redeemed once across them; daemons whose relay is killed land on
the others with what they had in flight kept; a key rotated at one relay and a token
refreshed at one relay hold at the others, and the old key is refused everywhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from aegis_edge_agent.statedir import StateDir
from aegis_edge_agent.tls import fetch_pinned_ca
from aegis_edge_core.identity import RelaySigningKey, TokenIssuer, new_jti, peek_enrollment_token
from aegis_edge_core.identity.keys import load_node_key
from aegis_edge_core.identity.tokens import UNKNOWN_KEY_MESSAGE, peek_kid
from aegis_edge_core.session import Refused, SessionAccepted
from aegis_edge_core.wire import admin_pb2, common_pb2
from tests.agent.harness import DaemonProcess, cli
from tests.pg import fresh_database
from tests.relay.daemon_driver import REPO, DaemonDriver, RelayProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CLUSTER = "c1"


class Cluster:
    def __init__(self, url: str, relays: list[RelayProcess]) -> None:
        self.url = url
        self.relays = relays

    def count(self, sql: str, *params: object) -> int:
        with psycopg.connect(self.url) as conn:
            row = conn.execute(sql.encode(), params).fetchone()
        assert row is not None
        return int(row[0])

    async def enrollment_token(self, relay: RelayProcess, tenant: str = "acme") -> str:
        async with relay.channel() as channel:
            resp = await relay.admin(channel).IssueEnrollmentToken(
                admin_pb2.IssueEnrollmentTokenRequest(tenant_id=tenant), metadata=relay.auth()
            )
        return str(resp.token)

    async def hosts(self, relay: RelayProcess, token: str | None = None) -> list[admin_pb2.Host]:
        async with relay.channel() as channel:
            resp = await relay.admin(channel).ListHosts(
                admin_pb2.ListHostsRequest(), metadata=relay.auth(token)
            )
        return list(resp.hosts)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with fresh_database() as url:
        relays: list[RelayProcess] = []
        try:
            relays.append(RelayProcess.start(tmp_path / "a", "--cluster", CLUSTER, store_url=url))
            bundle = tmp_path / "bundle.json"
            cli("relay", "join-bundle", "--data-dir", str(tmp_path / "a"), "--out", str(bundle))
            assert bundle.stat().st_mode & 0o777 == 0o600
            # the bundle names the store without its password, so the store URL comes from
            # the environment (AEGIS_STORE_URL) as it would from --store
            for name in ("b", "c"):
                relays.append(
                    RelayProcess.start(tmp_path / name, "--join-bundle", str(bundle), store_url=url)
                )
            yield Cluster(url, relays)
        finally:
            for relay in relays:
                relay.stop()


async def _one_ca_and_every_relays_tokens_are_honoured_everywhere(cluster: Cluster) -> None:
    a, b, c = cluster.relays
    assert a.ca_pem == b.ca_pem == c.ca_pem
    ids = {r.info["relay_id"] for r in cluster.relays}
    assert len(ids) == 3 and {r.info["cluster"] for r in cluster.relays} == {CLUSTER}
    assert cluster.count("SELECT count(*) FROM relay_keys") == 3

    # an operator token issued by relay A is accepted by relay C
    assert await cluster.hosts(c, token=a.admin_token) == []

    # B's enrollment token lists every relay, and its one CA pin holds at each of them
    token = await cluster.enrollment_token(b)
    claims = peek_enrollment_token(token)
    assert claims.relay_endpoint == b.address
    assert sorted(claims.relay_endpoints) == sorted(r.address for r in cluster.relays)
    for relay in cluster.relays:
        assert fetch_pinned_ca(relay.address, claims.ca_pin, timeout=10) == a.ca_pem

    # a node enrolled at A (with B's token) attests at B and at C
    async with a.channel() as channel:
        daemon = DaemonDriver(channel)
        await daemon.enroll(token)
        key, node_token = daemon.key, daemon.token
        await daemon.close()
    for relay in (b, c):
        async with relay.channel() as channel:
            moved = DaemonDriver(channel, key=key)
            moved.node_id, moved.tenant_id, moved.token = daemon.node_id, "acme", node_token
            assert isinstance(await moved.connect(), SessionAccepted)
            await moved.close()


async def _an_enrollment_token_is_redeemed_once_across_three_relays(
    cluster: Cluster,
) -> None:
    token = await cluster.enrollment_token(cluster.relays[0], tenant="race")
    jti = peek_enrollment_token(token).jti

    async def redeem(relay: RelayProcess) -> str:
        async with relay.channel() as channel:
            try:
                await DaemonDriver(channel).enroll(token)
            except grpc.aio.AioRpcError as err:
                return f"refused: {err.details()}"
            return "enrolled"

    for _round in range(3):  # the same token, three relays at once, more than once
        answers = await asyncio.gather(*(redeem(r) for r in cluster.relays))
        if _round == 0:
            assert sorted(answers)[0] == "enrolled", answers
            assert answers.count("enrolled") == 1, answers
        else:
            assert answers.count("enrolled") == 0, answers
        assert all("already" in a for a in answers if a != "enrolled"), answers
    assert cluster.count("SELECT count(*) FROM nodes WHERE tenant_id = 'race'") == 1
    assert cluster.count("SELECT count(*) FROM enrollment_tokens WHERE jti = %s", jti) == 1


async def _a_token_signed_by_an_unpublished_key_is_refused_and_writes_nothing(
    cluster: Cluster,
) -> None:
    a, _b, c = cluster.relays
    stranger = TokenIssuer(signing_key=RelaySigningKey.from_seed(os.urandom(32)))
    now = time.time()
    forged_operator = stranger.issue_operator_token(
        subject="mallory", role="admin", tenants="*", now=now, jti=new_jti(os.urandom(16))
    ).token
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await cluster.hosts(c, token=forged_operator)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert UNKNOWN_KEY_MESSAGE in (info.value.details() or "")

    real = peek_enrollment_token(await cluster.enrollment_token(a, tenant="forged"))
    forged_enrollment = stranger.issue_enrollment_token(
        tenant_id="forged",
        relay_endpoint=c.address,
        ca_pin=real.ca_pin,
        now=now,
        jti=new_jti(os.urandom(16)),
    )
    async with c.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await DaemonDriver(channel).enroll(forged_enrollment.token)
    assert UNKNOWN_KEY_MESSAGE in (info.value.details() or "")
    trailing = dict(info.value.trailing_metadata() or ())
    assert trailing.get("aegis-refusal-reason") == "bad_signature"
    jti = forged_enrollment.claims.jti
    assert cluster.count("SELECT count(*) FROM nodes") == 0
    assert cluster.count("SELECT count(*) FROM enrollment_tokens WHERE jti = %s", jti) == 0
    assert cluster.count("SELECT count(*) FROM relay_keys") == 3


def test_a_relay_with_a_foreign_ca_or_no_shared_store_refuses_to_start(
    cluster: Cluster, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError) as info:
        RelayProcess.start(tmp_path / "d", "--cluster", CLUSTER, store_url=cluster.url)
    lines = [ln for ln in str(info.value).splitlines() if "CA is not cluster" in ln]
    assert lines and "--join-bundle" in lines[0], str(info.value)
    assert cluster.count("SELECT count(*) FROM clusters") == 1

    env = {k: v for k, v in os.environ.items() if k != "AEGIS_STORE_URL"}
    proc = subprocess.run(
        [sys.executable, "-m", "aegis_edge_cli", "relay", "serve", "--data-dir",
         str(tmp_path / "e"), "--listen", "127.0.0.1:0", "--cluster", CLUSTER],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "needs a PostgreSQL store" in proc.stderr, proc.stderr


def test_a_daemon_whose_relay_is_killed_lands_on_another(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.relays[0]
    token = asyncio.run(cluster.enrollment_token(a))
    state = tmp_path / "host"
    cli("edge", "enroll", token, "--state-dir", str(state))
    node = json.loads((state / "node.json").read_text())
    assert node["relay"] == a.address and len(node["relays"]) == 3
    # as a host enrolled before the cluster grew (or by an older agent) would have it:
    # one endpoint; the relay's Accepted tells it the others
    del node["relays"]
    (state / "node.json").write_text(json.dumps(node))
    daemon = DaemonProcess.start(state)
    try:
        first = daemon.wait_event("connected", timeout=30)
        assert first["relay"] == a.address
        learned = json.loads((state / "node.json").read_text())["relays"]
        assert sorted(learned) == sorted(r.address for r in cluster.relays)
        a.proc.kill()  # kill -9: no Drain, the stream just breaks
        a.proc.wait(10)
        second = daemon.wait_event("connected", count=2, timeout=30)
        assert second["relay"] != a.address
        # within one backoff step: the very next dial went to another relay, not to A
        assert len(daemon.events("connecting")) == 2, daemon.events("connecting")
        assert daemon.events("connect_failed") == []
        assert len(daemon.events("reconnect_backoff")) == 1
        holder = next(r for r in cluster.relays if r.address == second["relay"])

        async def status() -> int:
            hosts = await cluster.hosts(holder)
            return next(h.status for h in hosts if h.node_id == node["node_id"])

        assert asyncio.run(status()) == common_pb2.DAEMON_STATUS_CONNECTED
    finally:
        daemon.stop()


def test_one_ca_and_every_relays_tokens_are_honoured_everywhere(cluster: Cluster) -> None:
    asyncio.run(_one_ca_and_every_relays_tokens_are_honoured_everywhere(cluster))


def test_an_enrollment_token_is_redeemed_once_across_three_relays(cluster: Cluster) -> None:
    asyncio.run(_an_enrollment_token_is_redeemed_once_across_three_relays(cluster))


def test_a_token_signed_by_an_unpublished_key_is_refused_and_writes_nothing(
    cluster: Cluster,
) -> None:
    asyncio.run(_a_token_signed_by_an_unpublished_key_is_refused_and_writes_nothing(cluster))


MOVERS = 6
"""Daemon processes held by the relay that is killed with commands in flight."""

OK = common_pb2.TARGET_OUTCOME_OK
EDGE_DISCONNECTED = common_pb2.TARGET_OUTCOME_EDGE_DISCONNECTED


def _enroll_at(cluster: Cluster, relay: RelayProcess, state: Path) -> dict[str, object]:
    token = asyncio.run(cluster.enrollment_token(relay))
    cli("edge", "enroll", token, "--state-dir", str(state), "--allow-tool", "cmd.run")
    node: dict[str, object] = json.loads((state / "node.json").read_text())
    assert node["relay"] == relay.address
    return node


def test_a_relay_killed_with_commands_in_flight_its_daemons_move_and_nothing_is_lost(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Daemon processes held by B run a fleet command started on A; B is killed mid-command.
    Each daemon is Connected to A or C after one backoff step, and its command ends
    ``edge_disconnected`` or as a late ``ok`` (its result delivered through the new relay):
    never lost, never run twice."""
    a, b, c = cluster.relays
    hosts: list[tuple[str, Path]] = []
    for i in range(MOVERS):
        node = _enroll_at(cluster, b, tmp_path / f"h{i}")
        cwd = tmp_path / f"h{i}-cwd"
        cwd.mkdir()
        hosts.append((str(node["node_id"]), cwd))
    daemons = [DaemonProcess.start(tmp_path / f"h{i}", cwd=cwd) for i, (_, cwd) in enumerate(hosts)]
    try:
        for d in daemons:
            assert d.wait_event("connected", timeout=60)["relay"] == b.address
        ids = {node_id for node_id, _ in hosts}

        async def scenario() -> admin_pb2.FleetRun:
            async with a.channel() as channel:
                admin = a.admin(channel)

                async def a_sees_all() -> bool:
                    listed = await admin.ListHosts(
                        admin_pb2.ListHostsRequest(), metadata=a.auth(), timeout=10
                    )
                    connected = common_pb2.DAEMON_STATUS_CONNECTED
                    return {h.node_id for h in listed.hosts if h.status == connected} == ids

                await wait_until(a_sees_all, timeout=30, what="A shows B's daemons Connected")
                call = admin.StartFleetRun(
                    admin_pb2.FleetRunSpec(
                        selector="all",
                        tool="cmd.run",
                        args_json=json.dumps({"cmd": "echo ran >> marker; sleep 4"}),
                        deadline_secs=90,
                        tenant_id="acme",
                    ),
                    metadata=a.auth(),
                    timeout=120,
                )
                events = aiter(call)
                await anext(events)  # started
                # every command is running on its daemon when B goes
                await wait_until(
                    lambda: all((cwd / "marker").exists() for _, cwd in hosts),
                    timeout=30,
                    what="every daemon running its command",
                )
                b.proc.kill()  # kill -9: no drain, no lease dropped, rows left behind
                b.proc.wait(10)
                last = None
                async for event in events:
                    last = event
                assert last is not None and last.HasField("finished"), last
                return last.finished

        run = asyncio.run(scenario())
        for d in daemons:
            moved = d.wait_event("connected", count=2, timeout=30)
            assert moved["relay"] in (a.address, c.address)
            # the next dial after the break went to a live relay: one backoff step
            assert len(d.events("connecting")) == 2, d.events("connecting")
            assert len(d.events("reconnect_backoff")) == 1
        outcomes = {t.node_id: t.outcome for t in run.targets}
        assert set(outcomes) == ids
        assert set(outcomes.values()) <= {OK, EDGE_DISCONNECTED}, run
        print("after kill -9 of the holder:", dict(run.counts))
        for _, cwd in hosts:
            assert (cwd / "marker").read_text() == "ran\n"  # run once, not redelivered

        async def history() -> dict[str, list[int]]:
            async with c.channel() as channel:
                out = {}
                for node_id in ids:
                    got = await c.admin(channel).GetHost(
                        admin_pb2.GetHostRequest(node_id=node_id), metadata=c.auth(), timeout=10
                    )
                    out[node_id] = [h.outcome for h in got.history]
                return out

        # a late ok may land after the run's end: the history row ends as one or the other
        rows = asyncio.run(history())
        assert all(len(r) == 1 and r[0] in (OK, EDGE_DISCONNECTED) for r in rows.values()), rows
        for node_id, r in rows.items():
            if outcomes[node_id] == OK:
                assert r == [OK], (node_id, r)
    finally:
        for d in daemons:
            d.stop()


async def _attests(relay: RelayProcess, key_pem: bytes, node_id: str, token: str) -> object:
    async with relay.channel() as channel:
        driver = DaemonDriver(channel, key=load_node_key(key_pem, source="test"))
        driver.node_id, driver.tenant_id, driver.token = node_id, "acme", token
        answer = await driver.connect()
        await driver.close()
    return answer


def test_a_key_rotated_at_one_relay_attests_at_another_and_the_old_key_nowhere(
    cluster: Cluster, tmp_path: Path
) -> None:
    a, b, c = cluster.relays
    state = tmp_path / "host"
    node = _enroll_at(cluster, b, state)
    node_id = str(node["node_id"])
    old_key, old_token = StateDir(state).load_key(), StateDir(state).load_token()
    old_pem = (state / "node.key").read_bytes()
    daemon = DaemonProcess.start(state)
    try:
        assert daemon.wait_event("connected", timeout=30)["relay"] == b.address
        out = cli("edge", "keys", "rotate", "--state-dir", str(state))
        assert "rotated" in out.stdout
        # B drains the daemon's old-key stream; it comes back with the new key from disk
        daemon.wait_event("connected", count=2, timeout=30)
    finally:
        daemon.stop()
    new = StateDir(state)
    new_pem, new_token = (state / "node.key").read_bytes(), new.load_token()
    assert new.load_key().thumbprint != old_key.thumbprint
    hosts = asyncio.run(cluster.hosts(a))
    assert next(h for h in hosts if h.node_id == node_id).key_thumbprint == (
        new.load_key().thumbprint
    )
    assert isinstance(asyncio.run(_attests(c, new_pem, node_id, new_token)), SessionAccepted)
    for relay in cluster.relays:
        for token in (old_token, new_token):
            refused = asyncio.run(_attests(relay, old_pem, node_id, token))
            assert isinstance(refused, Refused), (relay.address, refused)


def test_a_token_refreshed_at_one_relay_holds_at_the_others(cluster: Cluster) -> None:
    async def scenario() -> None:
        a, b, c = cluster.relays
        token = await cluster.enrollment_token(a)
        async with a.channel() as channel:
            daemon = DaemonDriver(channel)
            await daemon.enroll(token)
            key, first = daemon.key, daemon.token
            await daemon.close()
        assert peek_kid(first) == a.info["relay_id"]
        async with b.channel() as channel:
            moved = DaemonDriver(channel, key=key)
            moved.node_id, moved.tenant_id, moved.token = daemon.node_id, "acme", first
            assert isinstance(await moved.connect(), SessionAccepted)
            await moved.request_token_refresh()
            await wait_until(lambda: moved.token != first, timeout=10, what="a fresh token")
            refreshed = moved.token
            await moved.close()
        # B signed it with its own key; A and C verify it by that kid
        assert peek_kid(refreshed) == b.info["relay_id"]
        for relay in (a, c):
            async with relay.channel() as channel:
                again = DaemonDriver(channel, key=key)
                again.node_id, again.tenant_id, again.token = daemon.node_id, "acme", refreshed
                assert isinstance(await again.connect(), SessionAccepted), relay.address
                await again.close()

    asyncio.run(scenario())


def test_a_stopped_relay_drains_its_daemons_to_the_others_at_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    """SIGTERM (not kill -9) of A: its Drain names B or C for each daemon (round-robin), and
    each daemon is Connected there on its first dial, while A stays down."""
    a, b, c = cluster.relays
    states = [tmp_path / f"d{i}" for i in range(2)]
    for state in states:
        _enroll_at(cluster, a, state)
    daemons = [DaemonProcess.start(state) for state in states]
    try:
        for d in daemons:
            assert d.wait_event("connected", timeout=60)["relay"] == a.address
        a.proc.send_signal(signal.SIGTERM)
        landed = []
        for d in daemons:
            second = d.wait_event("connected", count=2, timeout=30)
            [drain] = d.events("drain")
            assert drain["relay"] in (b.address, c.address)
            assert second["relay"] == drain["relay"]  # where the Drain said
            assert len(d.events("connecting")) == 2  # straight there: no walk, no failure
            assert d.events("connect_failed") == []
            landed.append(second["relay"])
        assert sorted(landed) == sorted([b.address, c.address])  # one to each
        assert a.proc.wait(15) == 0  # and A is gone, not back
    finally:
        for d in daemons:
            d.stop()
