"""Small pure pieces: authz decisions, durations, metric catalogue, TLS material, logs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from cryptography import x509

from aegis_edge_core import metrics_catalogue as cat
from aegis_edge_core.authz import (
    REQUIRED_ROLES,
    AuthzError,
    Principal,
    Role,
    authorize,
    parse_role,
    require_visible,
    scope_tenants,
)
from aegis_edge_relay import jsonlog
from aegis_edge_relay.durations import parse_duration, parse_hostport
from aegis_edge_relay.metrics import RelayMetrics
from aegis_edge_relay.tls import ensure_tls


def test_roles_are_ordered_and_enforced() -> None:
    viewer = Principal(subject="v", role=Role.VIEWER, tenants=["a"])
    op = Principal(subject="o", role=Role.OPERATOR, tenants=["a"])
    admin = Principal(subject="x", role=Role.ADMIN)
    authorize(viewer, "ListHosts")
    with pytest.raises(AuthzError) as err:
        authorize(viewer, "AddTags")
    assert err.value.grpc_status == "PERMISSION_DENIED"
    authorize(op, "StartFleetRun")
    with pytest.raises(AuthzError):
        authorize(op, "DeleteTenant")
    for rpc in REQUIRED_ROLES:
        authorize(admin, rpc)
    with pytest.raises(AuthzError):
        authorize(op, "SomeFutureRpc")  # unknown RPCs need admin
    assert parse_role("Admin") is Role.ADMIN
    with pytest.raises(AuthzError):
        parse_role("root")


def test_tenant_scoping() -> None:
    p = Principal(subject="o", role=Role.OPERATOR, tenants=["a"])
    assert scope_tenants(p) == frozenset({"a"})
    assert scope_tenants(p, "a") == frozenset({"a"})
    with pytest.raises(AuthzError) as err:
        scope_tenants(p, "b")
    assert err.value.grpc_status == "PERMISSION_DENIED"
    with pytest.raises(AuthzError) as err:
        require_visible(p, "b", "daemon n-1")
    assert err.value.grpc_status == "NOT_FOUND"
    assert str(err.value) == "daemon n-1 not found"
    everyone = Principal(subject="x", role=Role.ADMIN)
    assert scope_tenants(everyone) is None
    # a name that cannot be a tenant id is refused before any store sees it, even for a
    # token that sees every tenant (schemathesis sent a NUL, which PostgreSQL refuses)
    for bad in ("a\x00b", "*", "x" * 65, " a"):
        for who in (everyone, p):
            with pytest.raises(AuthzError, match="tenant id") as err:
                scope_tenants(who, bad)
            assert err.value.grpc_status == "INVALID_ARGUMENT"
    with pytest.raises(TypeError):
        Principal(subject="x", role=Role.ADMIN, tenants="a")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "secs"),
    [("30s", 30.0), ("1.5s", 1.5), ("500ms", 0.5), ("2m", 120.0), ("90", 90.0), ("1h", 3600.0)],
)
def test_durations(text: str, secs: float) -> None:
    assert parse_duration(text) == pytest.approx(secs)


@pytest.mark.parametrize("bad", ["", "abc", "-1s", "0s", "5 parsecs"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_hostport() -> None:
    assert parse_hostport("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_hostport("[::1]:7443") == ("::1", 7443)
    for bad in ("nohost", ":80", "h:99999", "h:x"):
        with pytest.raises(ValueError):
            parse_hostport(bad)


def test_catalogue_matches_seed() -> None:
    assert [(m.name, m.kind.value, m.labels) for m in cat.CATALOGUE] == [
        ("aegis_edge_daemons_total", "gauge", ("status", "tenant")),
        ("aegis_edge_stream_seconds_total", "counter", ()),
        ("aegis_edge_heartbeats_total", "counter", ("tenant",)),
        ("aegis_edge_commands_dispatched_total", "counter", ("tool", "outcome")),
        ("aegis_edge_command_duration_seconds", "histogram", ("tool",)),
        ("aegis_edge_fleet_runs_total", "counter", ("outcome",)),
        ("aegis_edge_fleet_targets_skipped_total", "counter", ("reason",)),
    ]
    assert cat.HEARTBEATS.declared_name == "aegis_edge_heartbeats"
    assert cat.DAEMONS.declared_name == "aegis_edge_daemons_total"
    assert cat.by_name("aegis_edge_fleet_runs_total") is cat.FLEET_RUNS


def test_daemon_gauge_tracks_moves() -> None:
    m = RelayMetrics()
    m.set_daemon_counts([("a", "Connected"), ("a", "Revoked")])
    m.daemon_moved("a", "Connected", "Unhealthy")
    m.daemon_moved("b", None, "Disconnected")
    text = m.render().decode()
    assert 'aegis_edge_daemons_total{status="Unhealthy",tenant="a"} 1.0' in text
    assert 'aegis_edge_daemons_total{status="Connected",tenant="a"} 0.0' in text
    assert 'aegis_edge_daemons_total{status="Revoked",tenant="a"} 1.0' in text
    assert 'aegis_edge_daemons_total{status="Disconnected",tenant="b"} 1.0' in text


def test_tls_material(tmp_path: Path) -> None:
    tls = ensure_tls(tmp_path, "relay.example")
    cert = x509.load_pem_x509_certificate(tls.cert_chain)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(v) for v in san.get_values_for_type(x509.DNSName)}
    ips = {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    assert {"relay.example", "localhost"} <= names and {"127.0.0.1", "::1"} <= ips
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
    again = ensure_tls(tmp_path, "relay.example")
    assert again.ca_cert == tls.ca_cert and again.cert_chain == tls.cert_chain
    other = ensure_tls(tmp_path, "10.0.0.5")  # new listen host: new server cert, same CA
    assert other.ca_cert == tls.ca_cert and other.cert_chain != tls.cert_chain


def test_json_logs_drop_secrets() -> None:
    out = io.StringIO()
    jsonlog.configure(stream=out)
    try:
        jsonlog.log(
            "info", "x", node_id="n1", node_token="eyJ...", key_thumbprint="abc", signature=b"s"
        )
    finally:
        jsonlog.configure()
    rec = json.loads(out.getvalue())
    assert rec["event"] == "x" and rec["node_id"] == "n1" and rec["key_thumbprint"] == "abc"
    assert "node_token" not in rec and "signature" not in rec
    assert {"timestamp", "level"} <= set(rec)
