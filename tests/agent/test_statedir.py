from __future__ import annotations

import os
import stat
import time

import pytest

from aegis_edge_agent import enroll as enroll_mod
from aegis_edge_agent.statedir import StateDir, atomic_write
from aegis_edge_core import hoststate as hs
from aegis_edge_core.identity import NodeKey, RelaySigningKey, TokenIssuer
from aegis_edge_core.identity.errors import KeyFileError


def _mode(p):
    return stat.S_IMODE(p.stat().st_mode)


def test_atomic_write_mode_and_no_temp_left(tmp_path):
    target = tmp_path / "node.key"
    atomic_write(target, b"secret", mode=0o600)
    assert target.read_bytes() == b"secret" and _mode(target) == 0o600
    atomic_write(target, b"again", mode=0o600)
    assert target.read_bytes() == b"again"
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]


def test_atomic_write_failure_leaves_old_file(tmp_path, monkeypatch):
    target = tmp_path / "node.token"
    atomic_write(target, "old", mode=0o600)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, "new", mode=0o600)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["node.token"]


def test_ensure_tightens_dir_mode(tmp_path):
    d = tmp_path / "edge"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    sd = StateDir(d)
    sd.ensure()
    assert _mode(d) == 0o700
    sd.write(hs.NODE_KEY, b"x")
    sd.write(hs.CA_PEM, b"y")
    assert _mode(d / hs.NODE_KEY) == 0o600 and _mode(d / hs.CA_PEM) == 0o644


def test_corrupt_node_key_names_the_file(tmp_path):
    sd = StateDir(tmp_path)
    sd.write(hs.NODE_KEY, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(KeyFileError) as info:
        sd.load_key()
    assert str(tmp_path / "node.key") in str(info.value)
    assert "re-enroll" in str(info.value)


def test_missing_and_loose_key(tmp_path):
    sd = StateDir(tmp_path)
    with pytest.raises(hs.HostStateError, match=r"node key is missing.*enroll"):
        sd.load_key()
    key = NodeKey.from_seed(b"\x01" * 32)
    sd.write(hs.NODE_KEY, key.to_pem())
    assert sd.load_key().thumbprint == key.thumbprint
    os.chmod(sd.key_path, 0o644)
    with pytest.raises(hs.HostStateError, match="chmod 600"):
        sd.load_key()


def test_spool_and_children(tmp_path):
    from aegis_edge_core.wire import stream_pb2

    sd = StateDir(tmp_path)
    sd.write_spool([stream_pb2.CommandResult(command_id="a")])
    assert _mode(tmp_path / hs.RESULT_SPOOL) == 0o600
    assert [r.command_id for r in sd.load_spool()[0]] == ["a"]
    sd.write_spool([])
    assert not (tmp_path / hs.RESULT_SPOOL).exists()
    sd.write_children([hs.ChildProcess(pgid=5, command_id="c", started_at=1, daemon_pid=2)])
    assert sd.load_children()[0].pgid == 5


def _enrollment_token() -> str:
    issuer = TokenIssuer(signing_key=RelaySigningKey.from_seed(b"\x02" * 32))
    return issuer.issue_enrollment_token(
        tenant_id="t1",
        relay_endpoint="127.0.0.1:1",
        ca_pin="0" * 64,
        now=time.time(),
        jti="j" * 22,
    ).token


def test_enroll_refuses_to_clobber(tmp_path):
    sd = StateDir(tmp_path)
    sd.write(hs.NODE_KEY, b"existing")
    with pytest.raises(enroll_mod.EnrollError, match=r"already holds an enrollment.*--force"):
        enroll_mod.enroll(_enrollment_token(), sd)
    assert (tmp_path / hs.NODE_KEY).read_bytes() == b"existing"


def test_enroll_bad_token_and_labels(tmp_path):
    from aegis_edge_core.errors import AegisError

    with pytest.raises(AegisError):
        enroll_mod.enroll("not-a-token", StateDir(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    with pytest.raises(AegisError):
        enroll_mod.parse_labels(["novalue"])
    assert enroll_mod.parse_labels(["env=prod"]) == {"env": "prod"}


def test_enroll_unreachable_relay_writes_nothing(tmp_path):
    from aegis_edge_core.errors import AegisError

    with pytest.raises(AegisError, match="cannot reach the relay"):
        enroll_mod.enroll(_enrollment_token(), StateDir(tmp_path / "edge"), timeout=2)
    assert not (tmp_path / "edge").exists()
