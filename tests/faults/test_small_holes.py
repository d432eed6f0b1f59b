"""Issue 13's smaller holes, against a real relay process (and real daemon processes).

* A rotated-out key is on the key revocation list: it cannot enroll again as a new node
  (by ``aegis edge keys rotate`` on the host, or by the ``keys.rotate`` tool) and the old
  token it signed for cannot attest.
* Token refresh is rate-limited per node, and the previous token is revoked once the daemon
  acknowledges the new one.
* Capability snapshots are bounded at enrollment and on the stream.
* The relay's database and the host's ``node.json``/``status.json`` are private files.

Each case asserts what did not happen -- no node row, no stored snapshot, no extra token --
not only the refusal's wording.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from aegis_edge_core.errors import LocalProtocolError
from aegis_edge_core.identity import (
    NodeKey,
    load_node_key,
    peek_enrollment_token,
    peek_node_token,
)
from aegis_edge_core.identity.enrollment import sign_enrollment
from aegis_edge_core.session import (
    Event,
    HeartbeatAcked,
    Refused,
    SessionAccepted,
    TokenRefreshed,
)
from aegis_edge_core.wire import (
    common_pb2,
    enrollment_pb2,
    enrollment_pb2_grpc,
    stream_pb2,
    stream_pb2_grpc,
)
from tests.agent.harness import DaemonProcess, RelayProcess, cli, enroll_host, wait_until
from tests.faults.conftest import Tally
from tests.faults.helpers import metric_sum
from tests.https import scrape
from tests.relay.daemon_driver import DaemonDriver
from tests.relay.daemon_driver import wait_until as wait_until_async

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(180)]

OK = common_pb2.TARGET_OUTCOME_OK


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    r = RelayProcess.start(tmp_path_factory.mktemp("relay"))
    yield r
    r.stop()


def _db_rows(relay: RelayProcess, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Read the relay's real store file (read-only, beside the running relay)."""
    db = sqlite3.connect(f"file:{relay.data_dir / 'relay.db'}?mode=ro", uri=True)
    try:
        return list(db.execute(sql, params))
    finally:
        db.close()


def _enroll_by_hand(
    relay: RelayProcess, key: NodeKey, tenant: str
) -> tuple[grpc.StatusCode | None, str]:
    """Redeem a fresh enrollment token with ``key``, request built field by field."""
    token = relay.enrollment_token(tenant)
    claims = peek_enrollment_token(token)
    request = enrollment_pb2.EnrollRequest(
        enrollment_token=token,
        public_key=key.public_key.raw,
        proof=sign_enrollment(key, token_jti=claims.jti),
        capabilities=common_pb2.Capabilities(os="linux", arch="x86_64"),
        host_time=time.time(),
    )
    creds = grpc.ssl_channel_credentials(root_certificates=relay.ca_pem)
    with grpc.secure_channel(relay.endpoint, creds) as channel:
        try:
            enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(request, timeout=10)
        except grpc.RpcError as err:
            return err.code(), err.details() or ""  # type: ignore[attr-defined]
    return None, "accepted"


def _assert_rotated_out_key_is_dead(
    relay: RelayProcess, old_dir: Path, old_key: NodeKey, tenant: str, tally: Tally
) -> None:
    thumb = old_key.thumbprint
    assert _db_rows(relay, "SELECT kind FROM revocations WHERE kind = 'key' AND id = ?", thumb)
    nodes_before = _db_rows(relay, "SELECT node_id FROM nodes WHERE tenant_id = ?", tenant)

    code, details = _enroll_by_hand(relay, old_key, tenant)
    tally.refused(code is not None, f"rotated-out key enrolled as a new node ({tenant})")
    assert code == grpc.StatusCode.PERMISSION_DENIED, (code, details)
    assert "revoked" in details
    # nothing was written: no node row for the old key, no extra row in the tenant, and the
    # token it tried stays unredeemed-by-this-key
    assert not _db_rows(relay, "SELECT 1 FROM nodes WHERE key_thumbprint = ?", thumb)
    assert _db_rows(relay, "SELECT node_id FROM nodes WHERE tenant_id = ?", tenant) == nodes_before

    # the old key with its old token cannot attest either (a control session is the
    # cheapest real attestation: `aegis edge keys rotate` on the old copy)
    refused = cli("edge", "keys", "rotate", "--state-dir", str(old_dir), check=False)
    tally.refused(refused.returncode != 0, f"rotated-out key attested ({tenant})")
    assert refused.returncode != 0 and "(revoked)" in refused.stderr, refused.stderr


def test_host_rotation_retires_the_old_key(
    relay: RelayProcess, tmp_path: Path, tally: Tally
) -> None:
    h = enroll_host(relay, tmp_path / "h", tenant="rot-host")
    old = tmp_path / "old"
    shutil.copytree(h.state_dir, old)
    old_key = load_node_key((old / "node.key").read_bytes(), source="old node.key")
    out = cli("edge", "keys", "rotate", "--state-dir", str(h.state_dir))
    assert "rotated" in out.stdout
    assert relay.host(h.node_id).key_thumbprint != old_key.thumbprint
    _assert_rotated_out_key_is_dead(relay, old, old_key, "rot-host", tally)


def test_keys_rotate_tool_retires_the_old_key(
    relay: RelayProcess, tmp_path: Path, tally: Tally
) -> None:
    h = enroll_host(relay, tmp_path / "h", tenant="rot-tool")
    old = tmp_path / "old"
    shutil.copytree(h.state_dir, old)
    old_key = load_node_key((old / "node.key").read_bytes(), source="old node.key")
    d = DaemonProcess.start(h.state_dir)
    try:
        d.wait_event("connected")
        run = relay.run(h.node_id, "keys.rotate")
        assert run.targets[0].outcome == OK, run
        wait_until(
            lambda: relay.host(h.node_id).key_thumbprint != old_key.thumbprint, what="new key"
        )
        _assert_rotated_out_key_is_dead(relay, old, old_key, "rot-tool", tally)
        # the daemon itself carries on with its new key
        assert relay.run(h.node_id, "edge.ping").targets[0].outcome == OK
    finally:
        d.stop()


# --------------------------------------------------------------------------- file modes


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_relay_store_files_are_private(tmp_path: Path, tally: Tally) -> None:
    data = tmp_path / "relay"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)  # whatever the umask: a loose directory the relay must tighten
    r = RelayProcess.start(data)
    try:
        h = enroll_host(r, tmp_path / "h", tenant="modes")  # a real write: WAL in use
        assert r.host(h.node_id).node_id == h.node_id
        assert _mode(data) == 0o700
        for name in ("relay.db", "relay.db-wal", "relay.db-shm"):
            assert (data / name).exists(), name
            assert _mode(data / name) == 0o600, (name, oct(_mode(data / name)))
        assert any('"file.mode_tightened"' in line and str(data) in line for line in r.output.lines)
    finally:
        r.stop()

    # a store an older relay left world-readable is tightened at start, and says so
    for name in ("relay.db", "relay.db-wal", "relay.db-shm"):
        if (data / name).exists():
            os.chmod(data / name, 0o644)
    r = RelayProcess.start(data)
    try:
        tally.refused(_mode(data / "relay.db") == 0o600, "relay.db left 0644 at start")
        for name in ("relay.db", "relay.db-wal", "relay.db-shm"):
            if (data / name).exists():
                assert _mode(data / name) == 0o600, name
        tightened = [
            line
            for line in r.output.lines
            if '"file.mode_tightened"' in line and "relay.db" in line and '"0644"' in line
        ]
        assert tightened, "\n".join(r.output.lines[-20:])
    finally:
        r.stop()


def test_host_state_files_are_private(relay: RelayProcess, tmp_path: Path, tally: Tally) -> None:
    h = enroll_host(relay, tmp_path / "h", tenant="modes")
    sd = h.state_dir
    assert _mode(sd) == 0o700
    assert _mode(sd / "node.json") == 0o600
    d = DaemonProcess.start(sd)
    try:
        d.wait_event("connected")
        wait_until((sd / "status.json").exists, what="status.json")
        assert _mode(sd / "status.json") == 0o600
    finally:
        d.stop()
    assert _mode(sd / "status.json") == 0o600  # rewritten at stop, still private

    # state an older version wrote 0644 is tightened when the daemon starts, and logged
    os.chmod(sd / "node.json", 0o644)
    os.chmod(sd / "status.json", 0o644)
    os.chmod(sd, 0o755)
    d = DaemonProcess.start(sd)
    try:
        d.wait_event("connected")
        tightened = {e["file"]: e["old_mode"] for e in d.events("file_mode_tightened")}
        assert tightened.get("node.json") == "0644" and tightened.get(".") == "0755", tightened
        tally.refused(_mode(sd / "node.json") == 0o600, "node.json left 0644 by the daemon")
        assert _mode(sd / "status.json") == 0o600 and _mode(sd) == 0o700
    finally:
        d.stop()


# --------------------------------------------------------------------------- capabilities

TWO_MB = 2 * 1024 * 1024


def _aio_channel(relay: RelayProcess) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=relay.ca_pem)
    return grpc.aio.secure_channel(relay.endpoint, creds)


def _metric(relay: RelayProcess, name: str, **labels: str) -> float:
    return metric_sum(scrape(relay.info, timeout=5), name, **labels)


def test_oversize_capabilities_refused_at_enrollment(
    relay: RelayProcess, tmp_path: Path, tally: Tally
) -> None:
    tenant = "caps-enroll"
    key = NodeKey.from_seed(os.urandom(32))
    creds = grpc.ssl_channel_credentials(root_certificates=relay.ca_pem)
    cases = {
        "2 MB label value": common_pb2.Capabilities(os="linux", labels={"big": "x" * TWO_MB}),
        "2 MB of labels": common_pb2.Capabilities(
            os="linux", labels={f"k{i}": "v" * 200 for i in range(TWO_MB // 200)}
        ),
        "300 tools": common_pb2.Capabilities(os="linux", tools=[f"t{i}" for i in range(300)]),
        "2 MB hostname": common_pb2.Capabilities(os="linux", hostname="h" * TWO_MB),
    }
    expected = {
        "2 MB label value": ("capabilities.labels.big", "256"),
        "2 MB of labels": ("capabilities.labels", "128"),
        "300 tools": ("capabilities.tools", "256"),
        "2 MB hostname": ("capabilities.hostname", "256"),
    }
    for label, caps in cases.items():
        token = relay.enrollment_token(tenant)
        jti = peek_enrollment_token(token).jti
        request = enrollment_pb2.EnrollRequest(
            enrollment_token=token,
            public_key=key.public_key.raw,
            proof=sign_enrollment(key, token_jti=jti),
            capabilities=caps,
            host_time=time.time(),
        )
        with grpc.secure_channel(relay.endpoint, creds) as channel:
            stub = enrollment_pb2_grpc.EnrollmentStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.Enroll(request, timeout=20)
            code, details = err.value.code(), err.value.details() or ""  # type: ignore[attr-defined]
            tally.refused(code == grpc.StatusCode.INVALID_ARGUMENT, f"enrolled with {label}")
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (label, code, details)
            field, limit = expected[label]
            assert field in details and f"limit is {limit}" in details, (label, details)
            # nothing stored, and the token was not spent: the same request with a sane
            # snapshot redeems it
            assert not _db_rows(relay, "SELECT 1 FROM nodes WHERE tenant_id = ?", tenant)
            assert not _db_rows(relay, "SELECT 1 FROM enrollment_tokens WHERE jti = ?", jti)
    request.capabilities.CopyFrom(common_pb2.Capabilities(os="linux", labels={"site": "lab"}))
    with grpc.secure_channel(relay.endpoint, creds) as channel:
        stub = enrollment_pb2_grpc.EnrollmentStub(channel)
        resp = stub.Enroll(request, timeout=20)
    assert resp.node_id
    rows = _db_rows(relay, "SELECT capabilities FROM nodes WHERE tenant_id = ?", tenant)
    assert len(rows) == 1 and len(rows[0][0]) < 1024


def test_enroll_label_too_long_refused_on_the_host(
    relay: RelayProcess, tmp_path: Path, tally: Tally
) -> None:
    tenant = "caps-cli"
    token = relay.enrollment_token(tenant)
    state = tmp_path / "h"
    proc = cli("edge", "enroll", token, "--state-dir", str(state), "--label",
               "site=" + "x" * 300, check=False)  # fmt: skip
    tally.refused(proc.returncode != 0, "enroll --label with a 300-char value")
    assert proc.returncode != 0
    err_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err_lines) == 1, proc.stderr
    assert "labels.site" in err_lines[0] and "256" in err_lines[0], err_lines
    assert not (state / "node.json").exists() and not (state / "node.key").exists()
    # the token never left the host: the relay holds no node and no redemption for it
    assert not _db_rows(relay, "SELECT 1 FROM nodes WHERE tenant_id = ?", tenant)
    jti = peek_enrollment_token(token).jti
    assert not _db_rows(relay, "SELECT 1 FROM enrollment_tokens WHERE jti = ?", jti)


def test_oversize_capabilities_on_the_stream_close_it(relay: RelayProcess, tally: Tally) -> None:
    async def scenario() -> None:
        async with _aio_channel(relay) as channel:
            daemon = DaemonDriver(channel, labels={"site": "lab"})
            await daemon.enroll(relay.enrollment_token("caps-stream"))
            row = "SELECT capabilities FROM nodes WHERE node_id = ?"
            stored = _db_rows(relay, row, daemon.node_id)
            assert isinstance(await daemon.connect(), SessionAccepted)
            before = _metric(relay, "aegis_edge_stream_protocol_errors_total", reason="oversized")

            # a CapabilityUpdate of 2 MB, written past the daemon session's own check
            big = stream_pb2.DaemonMessage()
            big.capabilities.capabilities.os = "linux"
            big.capabilities.capabilities.labels["site"] = "x" * TWO_MB
            await daemon._call.write(big)
            await asyncio.wait_for(daemon.stream_done.wait(), 10)
            tally.refused(
                daemon.closed_status == grpc.StatusCode.RESOURCE_EXHAUSTED,
                "2 MB CapabilityUpdate on the stream",
            )
            assert daemon.closed_status == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "capabilities.labels.site" in daemon.closed_details
            assert _db_rows(relay, row, daemon.node_id) == stored
            after = _metric(relay, "aegis_edge_stream_protocol_errors_total", reason="oversized")
            assert after == before + 1

            # a hello carrying one is refused before attestation; the row stays as it was
            daemon.capabilities.labels["site"] = "x" * TWO_MB
            with pytest.raises(LocalProtocolError):
                await daemon.connect()  # the core's daemon session refuses to send it
            await daemon.close()
            hello = stream_pb2.DaemonMessage()
            hello.hello.protocol_version = 1
            hello.hello.node_id = daemon.node_id
            hello.hello.node_token = daemon.token
            hello.hello.capabilities.tools.extend(f"t{i}" for i in range(100_000))
            call = stream_pb2_grpc.EdgeStreamStub(channel).Connect()
            await call.write(hello)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            tally.refused(
                err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, "hello with 100k tools"
            )
            assert "capabilities.tools" in (err.value.details() or "")
            assert _db_rows(relay, row, daemon.node_id) == stored
            host = relay.host(daemon.node_id)
            assert dict(host.capabilities.labels) == {"site": "lab"}

    asyncio.run(scenario())


# --------------------------------------------------------------------------- token refresh


async def _probe(channel: grpc.aio.Channel, daemon: DaemonDriver, token: str) -> Event:
    """Attest as ``daemon`` with ``token`` on a control session (leaves its stream alone)."""
    probe = DaemonDriver(channel, key=daemon.key)
    probe.node_id, probe.token, probe.ack_tokens = daemon.node_id, token, False
    try:
        return await probe.connect(control=True)
    finally:
        await probe.close()


async def _processed(daemon: DaemonDriver) -> None:
    """Everything sent before now has been handled by the relay (it answers in order)."""
    acks = len(daemon.saw(HeartbeatAcked))
    await daemon.heartbeat()
    await wait_until_async(lambda: len(daemon.saw(HeartbeatAcked)) > acks, what="heartbeat ack")


def _revoked_tokens(relay: RelayProcess) -> dict[str, float]:
    rows = _db_rows(relay, "SELECT id, prune_after FROM revocations WHERE kind = 'token'")
    return {jti: prune for jti, prune in rows}


def test_refreshed_token_revokes_the_old_one_once_acked(relay: RelayProcess, tally: Tally) -> None:
    async def scenario() -> None:
        async with _aio_channel(relay) as channel:
            daemon = DaemonDriver(channel)
            await daemon.enroll(relay.enrollment_token("refresh-ack"))
            first = daemon.token
            first_claims = peek_node_token(first)
            assert isinstance(await daemon.connect(), SessionAccepted)

            # sent but not acknowledged (a daemon too old to ack, or one that crashed
            # before its write landed): the old token must keep working
            daemon.ack_tokens = False
            await daemon.request_token_refresh()
            await wait_until_async(lambda: daemon.token != first, what="fresh token")
            second = daemon.token
            await _processed(daemon)
            assert first_claims.jti not in _revoked_tokens(relay)
            assert isinstance(await _probe(channel, daemon, first), SessionAccepted)

            # the ack: a heartbeat naming the stored token's jti
            assert daemon.session is not None
            daemon.session.heartbeat(time.time(), token_jti=peek_node_token(second).jti)
            await daemon._flush()
            await _processed(daemon)
            revoked = _revoked_tokens(relay)
            assert revoked.get(first_claims.jti) == pytest.approx(
                first_claims.expires_at + 3600
            )  # an hour past exp, as every revocation
            refused = await _probe(channel, daemon, first)
            tally.refused(isinstance(refused, Refused), "superseded token attested after ack")
            assert isinstance(refused, Refused) and refused.reason == "revoked", refused
            assert isinstance(await _probe(channel, daemon, second), SessionAccepted)

            # the driver acks by itself from here on, as the agent does
            daemon.ack_tokens = True
            await daemon.request_token_refresh()
            await wait_until_async(lambda: daemon.token != second, what="third token")
            await _processed(daemon)
            assert peek_node_token(second).jti in _revoked_tokens(relay)
            assert peek_node_token(daemon.token).jti not in _revoked_tokens(relay)
            assert not daemon.stream_done.is_set()
            await daemon.close()

    asyncio.run(scenario())


def test_refresh_requests_in_a_tight_loop_are_limited(relay: RelayProcess, tally: Tally) -> None:
    async def scenario() -> None:
        async with _aio_channel(relay) as channel:
            daemon = DaemonDriver(channel)
            await daemon.enroll(relay.enrollment_token("refresh-loop"))
            enrolled_jti = peek_node_token(daemon.token).jti
            assert isinstance(await daemon.connect(), SessionAccepted)
            name = "aegis_edge_token_refreshes_total"
            issued0 = _metric(relay, name, result="issued")
            limited0 = _metric(relay, name, result="rate_limited")
            for _ in range(50):
                await daemon.request_token_refresh()
            await _processed(daemon)

            tokens = [e.node_token for e in daemon.saw(TokenRefreshed)]  # type: ignore[attr-defined]
            # the default limit is 6 an hour per node (a 7th could refill if the test ran
            # ten minutes; it never should)
            tally.refused(len(tokens) <= 7, "unbounded token refreshes")
            assert 6 <= len(tokens) <= 7, len(tokens)

            def counted() -> float:
                issued = _metric(relay, name, result="issued") - issued0
                return issued + _metric(relay, name, result="rate_limited") - limited0

            # The counters are read over /metrics, which may trail the stream on a busy box.
            await wait_until_async(lambda: counted() == 50, what="50 refreshes counted")
            assert _metric(relay, name, result="issued") - issued0 == len(tokens)
            # the stream stays up, and each token it was handed but replaced is revoked
            assert not daemon.stream_done.is_set()
            revoked = _revoked_tokens(relay)
            jtis = [peek_node_token(t).jti for t in tokens]
            assert enrolled_jti in revoked and all(j in revoked for j in jtis[:-1])
            assert jtis[-1] not in revoked
            row = _db_rows(relay, "SELECT token_jti FROM nodes WHERE node_id = ?", daemon.node_id)
            assert row == [(jtis[-1],)]
            lines = [
                line
                for line in relay.output.lines
                if '"token.refresh_limited"' in line and daemon.node_id in line
            ]
            assert len(lines) == 1, lines  # one line per stream, not one per request
            await daemon.close()

    asyncio.run(scenario())
