"""Operator CLI against a real grpc.aio Admin server with TLS on loopback.

The server is a test servicer with canned answers that records each request and its
metadata, so these tests check what goes on the wire, how the token travels, how gRPC
errors become one line on stderr, the exit codes and what lands on stdout.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import ipaddress
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import aegis_edge_cli
from aegis_edge_cli import CommandTree
from aegis_edge_core.wire import admin_pb2, admin_pb2_grpc, common_pb2
from aegis_edge_relay import operator as operator_cli

TOKEN = "operator-token-123"
NOW = dt.datetime.now(tz=dt.UTC).timestamp()


# --- TLS material -----------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(tz=dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_leaf(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(tz=dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("aegis-relay"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


# --- the fake Admin service -------------------------------------------------------------------


def _host(node_id: str, tenant: str, status: int, tags: list[str]) -> admin_pb2.Host:
    return admin_pb2.Host(
        node_id=node_id,
        tenant_id=tenant,
        status=status,
        last_heartbeat_at=NOW - 12 if status != common_pb2.DAEMON_STATUS_REVOKED else 0.0,
        enrolled_at=NOW - 86400,
        capabilities=common_pb2.Capabilities(
            os="linux", arch="x86_64", tools=["cmd.run", "sys.info"], labels={"zone": "a"},
            tags=tags,
        ),
    )  # fmt: skip


HOSTS = [
    _host("node-b", "acme", common_pb2.DAEMON_STATUS_UNHEALTHY, ["prod"]),
    _host("node-a", "acme", common_pb2.DAEMON_STATUS_CONNECTED, ["prod", "managed-fleet"]),
    _host("node-c", "globex", common_pb2.DAEMON_STATUS_REVOKED, []),
]


def _target(node: str, outcome: int, exit_code: int | None = None) -> admin_pb2.TargetResult:
    res = admin_pb2.TargetResult(
        node_id=node, command_id=f"cmd-{node}", dispatched_at=NOW - 3, finished_at=NOW - 1
    )
    res.outcome = outcome
    if exit_code is not None:
        res.exit_code = exit_code
        res.has_exit_code = True
    return res


class FakeAdmin(admin_pb2_grpc.AdminServicer):
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, dict[str, str]]] = []

    def _record(self, method: str, request: Any, context: Any) -> None:
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.calls.append((method, request, md))

    async def _auth(self, method: str, request: Any, context: Any) -> None:
        self._record(method, request, context)
        md = self.calls[-1][2]
        if md.get("authorization") != f"Bearer {TOKEN}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "operator token refused: bad")

    async def ListHosts(self, request: Any, context: Any) -> admin_pb2.ListHostsResponse:
        await self._auth("ListHosts", request, context)
        hosts = [
            h
            for h in HOSTS
            if (not request.connected_only or h.status == common_pb2.DAEMON_STATUS_CONNECTED)
            and (not request.tenant_id or h.tenant_id == request.tenant_id)
        ]
        return admin_pb2.ListHostsResponse(hosts=hosts)

    async def GetHost(self, request: Any, context: Any) -> admin_pb2.Host:
        await self._auth("GetHost", request, context)
        for h in HOSTS:
            if h.node_id == request.node_id:
                out = admin_pb2.Host()
                out.CopyFrom(h)
                out.history.append(
                    admin_pb2.CommandRecord(
                        command_id="c9", tool="cmd.run", outcome=common_pb2.TARGET_OUTCOME_OK,
                        exit_code=0, has_exit_code=True, dispatched_at=NOW - 30,
                        finished_at=NOW - 29, fleet_command_id="fleet-7",
                    )
                )  # fmt: skip
                return out
        await context.abort(grpc.StatusCode.NOT_FOUND, f"no daemon {request.node_id!r}")
        raise AssertionError

    async def AddTags(self, request: Any, context: Any) -> admin_pb2.Host:
        await self._auth("AddTags", request, context)
        h = _host(request.node_id, "acme", common_pb2.DAEMON_STATUS_CONNECTED, ["prod"])
        h.capabilities.tags.extend(request.tags)
        return h

    async def RemoveTags(self, request: Any, context: Any) -> admin_pb2.Host:
        await self._auth("RemoveTags", request, context)
        return _host(request.node_id, "acme", common_pb2.DAEMON_STATUS_CONNECTED, [])

    async def RevokeNode(self, request: Any, context: Any) -> admin_pb2.Host:
        await self._auth("RevokeNode", request, context)
        if request.node_id == "viewer-denied":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "role viewer may not revoke")
        h = _host(request.node_id, "acme", common_pb2.DAEMON_STATUS_REVOKED, [])
        h.revoked_reason = request.reason
        return h

    async def IssueEnrollmentToken(
        self, request: Any, context: Any
    ) -> admin_pb2.IssueEnrollmentTokenResponse:
        await self._auth("IssueEnrollmentToken", request, context)
        return admin_pb2.IssueEnrollmentTokenResponse(
            token=f"enroll.{request.tenant_id}.jwt", expires_at=NOW + 900
        )

    async def DeleteTenant(self, request: Any, context: Any) -> admin_pb2.DeleteTenantResponse:
        await self._auth("DeleteTenant", request, context)
        return admin_pb2.DeleteTenantResponse(revoked_daemons=2)

    async def PreviewFleetRun(self, request: Any, context: Any) -> admin_pb2.FleetPreview:
        await self._auth("PreviewFleetRun", request, context)
        return admin_pb2.FleetPreview(
            targets=["node-a"],
            skipped=[admin_pb2.SkippedTarget(node_id="node-b", reason="unhealthy")],
            matched=2,
            selector=request.selector,
        )

    def _run(self, request: Any, outcome: int, targets: list[Any]) -> admin_pb2.FleetRun:
        spec = admin_pb2.FleetRunSpec()
        spec.CopyFrom(request)
        return admin_pb2.FleetRun(
            fleet_command_id="fleet-42",
            spec=spec,
            outcome=outcome,
            created_at=NOW - 5,
            targets=targets,
            skipped=[admin_pb2.SkippedTarget(node_id="node-b", reason="unhealthy")],
        )

    async def StartFleetRun(
        self, request: Any, context: Any
    ) -> AsyncIterator[admin_pb2.FleetRunEvent]:
        await self._auth("StartFleetRun", request, context)
        if request.tool == "bad.selector":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "selector column 1: unknown key 'x'"
            )
        pending = [admin_pb2.TargetResult(node_id=n) for n in ("node-a", "node-d")]
        yield admin_pb2.FleetRunEvent(
            started=self._run(request, common_pb2.RUN_OUTCOME_RUNNING, pending)
        )
        if request.tool == "vanish":
            return
        halted = request.tool == "fails"
        results = [
            _target("node-a", common_pb2.TARGET_OUTCOME_OK, 0),
            _target(
                "node-d",
                common_pb2.TARGET_OUTCOME_ERROR if halted else common_pb2.TARGET_OUTCOME_OK,
                2 if halted else 0,
            ),
        ]
        for res in results:
            yield admin_pb2.FleetRunEvent(dispatched=admin_pb2.TargetResult(node_id=res.node_id))
        for res in results:
            yield admin_pb2.FleetRunEvent(target_finished=res)
        outcome = common_pb2.RUN_OUTCOME_HALTED if halted else common_pb2.RUN_OUTCOME_COMPLETED
        final = self._run(request, outcome, results)
        final.finished_at = NOW
        if halted:
            final.halt_reason = "stop-after=1 reached"
        yield admin_pb2.FleetRunEvent(finished=final)

    async def WatchFleetRun(
        self, request: Any, context: Any
    ) -> AsyncIterator[admin_pb2.FleetRunEvent]:
        await self._auth("WatchFleetRun", request, context)
        if request.fleet_command_id != "fleet-42":
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no fleet run {request.fleet_command_id!r}"
            )
        spec = admin_pb2.FleetRunSpec(selector="all", tool="edge.ping")
        result = _target("node-a", common_pb2.TARGET_OUTCOME_DENIED)
        yield admin_pb2.FleetRunEvent(
            started=self._run(spec, common_pb2.RUN_OUTCOME_RUNNING, [result])
        )
        yield admin_pb2.FleetRunEvent(target_finished=result)
        yield admin_pb2.FleetRunEvent(
            finished=self._run(spec, common_pb2.RUN_OUTCOME_COMPLETED_WITH_ERRORS, [result])
        )

    async def ListFleetRuns(self, request: Any, context: Any) -> admin_pb2.ListFleetRunsResponse:
        await self._auth("ListFleetRuns", request, context)
        spec = admin_pb2.FleetRunSpec(selector="all", tool="edge.ping", mode="sequential")
        runs = [
            self._run(spec, common_pb2.RUN_OUTCOME_COMPLETED, []),
            self._run(spec, common_pb2.RUN_OUTCOME_HALTED, []),
        ]
        runs[1].fleet_command_id = "fleet-41"
        return admin_pb2.ListFleetRunsResponse(runs=runs[: request.limit or None])

    async def GetFleetRun(self, request: Any, context: Any) -> admin_pb2.FleetRun:
        await self._auth("GetFleetRun", request, context)
        if request.fleet_command_id != "fleet-42":
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no fleet run {request.fleet_command_id!r}"
            )
        spec = admin_pb2.FleetRunSpec(
            selector="tags=prod", tool="cmd.run", args_json='{"cmd":"id"}'
        )
        return self._run(
            spec,
            common_pb2.RUN_OUTCOME_COMPLETED_WITH_ERRORS,
            [
                _target("node-a", common_pb2.TARGET_OUTCOME_OK, 0),
                _target("node-d", common_pb2.TARGET_OUTCOME_TIMEOUT),
            ],
        )

    async def CancelFleetRun(self, request: Any, context: Any) -> admin_pb2.FleetRun:
        await self._auth("CancelFleetRun", request, context)
        run = self._run(admin_pb2.FleetRunSpec(), common_pb2.RUN_OUTCOME_CANCELLED, [])
        run.fleet_command_id = request.fleet_command_id
        return run


class ServerThread:
    """A grpc.aio server on its own event loop in a background thread."""

    def __init__(self, servicer: FakeAdmin, key_pem: bytes, cert_pem: bytes) -> None:
        self.servicer = servicer
        self.creds = grpc.ssl_server_credentials([(key_pem, cert_pem)])
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: Any = None
        self.port = 0

    async def _start(self) -> int:
        self.server = grpc.aio.server()
        admin_pb2_grpc.add_AdminServicer_to_server(self.servicer, self.server)
        port = self.server.add_secure_port("127.0.0.1:0", self.creds)
        await self.server.start()
        return int(port)

    def start(self) -> None:
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("tls")
    ca_key, ca_cert = _make_ca("aegis test CA")
    key_pem, cert_pem = _make_leaf(ca_key, ca_cert)
    ca_path = base / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _, other_ca = _make_ca("some other CA")
    other_path = base / "other-ca.pem"
    other_path.write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
    return {"ca": ca_path, "other_ca": other_path, "key": key_pem, "cert": cert_pem}


@pytest.fixture(scope="module")
def server(tls: dict[str, Any]) -> Iterator[ServerThread]:
    srv = ServerThread(FakeAdmin(), tls["key"], tls["cert"])
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def admin(server: ServerThread) -> FakeAdmin:
    server.servicer.calls.clear()
    return server.servicer


@pytest.fixture
def env(
    monkeypatch: pytest.MonkeyPatch, server: ServerThread, tls: dict[str, Any]
) -> dict[str, str]:
    values = {
        "AEGIS_RELAY": f"127.0.0.1:{server.port}",
        "AEGIS_CA_CERT": str(tls["ca"]),
        "AEGIS_OPERATOR_TOKEN": TOKEN,
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


@pytest.fixture(autouse=True)
def _only_our_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    def build(argv: object = None) -> CommandTree:  # main passes the command line
        tree = CommandTree()
        operator_cli.register(tree)
        return tree

    monkeypatch.setattr(aegis_edge_cli, "build", build)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = aegis_edge_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- hosts ------------------------------------------------------------------------------------


def test_ls_json_sends_the_token_and_prints_hosts(
    capsys: pytest.CaptureFixture[str], admin: FakeAdmin, env: dict[str, str]
) -> None:
    code, out, err = run(capsys, "edge", "ls", "--output", "json")
    assert (code, err) == (0, "")
    hosts = json.loads(out)
    assert [h["node_id"] for h in hosts] == ["node-a", "node-b", "node-c"]
    assert [h["status"] for h in hosts] == ["Connected", "Unhealthy", "Revoked"]
    assert hosts[0]["last_heartbeat_at"].endswith("Z")
    assert hosts[2]["last_heartbeat_at"] is None
    assert set(hosts[0]["capabilities"]) >= {"os", "arch", "tools", "labels", "tags"}
    assert hosts[0]["capabilities"]["tags"] == ["managed-fleet", "prod"]
    method, request, md = admin.calls[-1]
    assert method == "ListHosts"
    assert md["authorization"] == f"Bearer {TOKEN}"
    assert not request.connected_only


def test_ls_connected_filters_and_table(
    capsys: pytest.CaptureFixture[str], admin: FakeAdmin, env: dict[str, str]
) -> None:
    code, out, _ = run(capsys, "edge", "ls", "--connected", "--tenant", "acme", "--target", "all")
    assert code == 0
    _, request, _ = admin.calls[-1]
    assert request.connected_only
    assert request.tenant_id == "acme"
    assert request.selector == "all"
    for col in ("NODE", "TENANT", "STATUS", "LAST HEARTBEAT", "OS/ARCH", "TAGS"):
        assert col in out
    assert "node-a" in out
    assert "node-b" not in out
    assert "ago" in out
    assert "linux/x86_64" in out


def test_ls_bad_selector_never_reaches_the_relay(
    capsys: pytest.CaptureFixture[str], admin: FakeAdmin, env: dict[str, str]
) -> None:
    code, out, err = run(capsys, "edge", "ls", "--target", "tags=AnyOf(a,")
    assert code != 0
    assert out == ""
    assert err.startswith("aegis: --target: selector column")
    assert "^" in err
    assert admin.calls == []


def test_token_from_flag_file(
    capsys: pytest.CaptureFixture[str],
    admin: FakeAdmin,
    env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AEGIS_OPERATOR_TOKEN")
    token_file = tmp_path / "operator.token"
    token_file.write_text(TOKEN + "\n")
    code, _, err = run(capsys, "edge", "ls", "-o", "json", "--token", f"@{token_file}")
    assert (code, err) == (0, "")
    assert admin.calls[-1][2]["authorization"] == f"Bearer {TOKEN}"


def test_show_includes_history(
    capsys: pytest.CaptureFixture[str], admin: FakeAdmin, env: dict[str, str]
) -> None:
    code, out, _ = run(capsys, "edge", "show", "node-a", "--output", "json", "--history", "5")
    assert code == 0
    host = json.loads(out)
    assert host["node_id"] == "node-a"
    assert host["history"][0]["tool"] == "cmd.run"
    assert host["history"][0]["fleet_command_id"] == "fleet-7"
    assert admin.calls[-1][1].history_limit == 5

    code, out, _ = run(capsys, "edge", "show", "node-a")
    assert code == 0
    assert "Status:" in out
    assert "Connected" in out
    assert "Command history" in out
    assert "fleet-7" in out


def test_show_unknown_node_is_one_line_not_found(
    capsys: pytest.CaptureFixture[str], admin: FakeAdmin, env: dict[str, str]
) -> None:
    code, out, err = run(capsys, "edge", "show", "ghost")
    assert code == 1
    assert out == ""
    assert err == "aegis: no daemon 'ghost'\n"


def test_tag_add_and_rm(
    capsys: pytest.CaptureFixture[str], admin: FakeAdmin, env: dict[str, str]
) -> None:
    code, out, _ = run(capsys, "edge", "tag", "add", "node-a", "canary", "eu")
    assert code == 0
    method, request, _ = admin.calls[-1]
    assert (method, request.node_id, list(request.tags)) == ("AddTags", "node-a", ["canary", "eu"])
    assert out.strip() == "node-a: tags canary, eu, prod"
    code, out, _ = run(capsys, "edge", "tag", "rm", "node-a", "prod")
    assert code == 0
    assert admin.calls[-1][0] == "RemoveTags"
    assert "(none)" in out


def test_tag_refuses_bad_tags_locally(
    capsys: pytest.CaptureFixture[str], admin: FakeAdmin, env: dict[str, str]
) -> None:
    code, _, err = run(capsys, "edge", "tag", "add", "node-a", "a,b")
    assert code == 1
    assert "invalid tag 'a,b'" in err
    assert admin.calls == []


def test_revoke_remote(
    capsys: pytest.CaptureFixture[str], admin: FakeAdmin, env: dict[str, str]
) -> None:
    code, out, _ = run(capsys, "edge", "keys", "revoke-remote", "node-a", "--reason", "key leak")
    assert code == 0
    _, request, _ = admin.calls[-1]
    assert (request.node_id, request.reason) == ("node-a", "key leak")
    assert out.strip() == "revoked node-a: status Revoked (key leak)"


def test_permission_denied_is_one_line(
    capsys: pytest.CaptureFixture[str], admin: FakeAdmin, env: dict[str, str]
) -> None:
    code, _, err = run(capsys, "edge", "keys", "revoke-remote", "viewer-denied")
    assert code == 1
    assert err == "aegis: role viewer may not revoke\n"


# --- tenants and tokens -----------------------------------------------------------------------


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_tenants_delete_refuses_without_a_tty_or_yes(
    capsys: pytest.CaptureFixture[str],
    admin: FakeAdmin,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("acme\n"))
    code, _, err = run(capsys, "edge", "tenants", "delete", "acme")
    assert code == 1
    assert "stdin is not a terminal; pass --yes" in err
    assert len(err.strip().splitlines()) == 1
    assert admin.calls == []


def test_tenants_delete_with_yes(
    capsys: pytest.CaptureFixture[str], admin: FakeAdmin, env: dict[str, str]
) -> None:
    code, out, _ = run(capsys, "edge", "tenants", "delete", "acme", "--yes")
    assert code == 0
    assert admin.calls[-1][1].tenant_id == "acme"
    assert out.strip() == "deleted tenant acme; revoked 2 daemons"


def test_tenants_delete_confirms_on_a_tty(
    capsys: pytest.CaptureFixture[str],
    admin: FakeAdmin,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sys.stdin", _Tty("wrong\n"))
    code, _, err = run(capsys, "edge", "tenants", "delete", "acme")
    assert code == 1
    assert "confirmation did not match" in err
    assert admin.calls == []

    monkeypatch.setattr("sys.stdin", _Tty("acme\n"))
    code, _, err = run(capsys, "edge", "tenants", "delete", "acme")
    assert code == 0
    assert "Type the tenant id" in err
    assert admin.calls[-1][0] == "DeleteTenant"


def test_tokens_issue_prints_the_token_alone(
    capsys: pytest.CaptureFixture[str], admin: FakeAdmin, env: dict[str, str]
) -> None:
    code, out, err = run(capsys, "edge", "tokens", "issue", "--tenant", "acme", "--ttl", "15m")
    assert (code, err) == (0, "")
    assert out == "enroll.acme.jwt\n"
    _, request, _ = admin.calls[-1]
    assert request.tenant_id == "acme"
    assert request.ttl_secs == 900.0


# --- fleet ------------------------------------------------------------------------------------


def test_fleet_preview(
    capsys: pytest.CaptureFixture[str], admin: FakeAdmin, env: dict[str, str]
) -> None:
    code, out, _ = run(
        capsys,
        "edge",
        "fleet",
        "preview",
        "--target",
        "tags=prod",
        "--tool",
        "cmd.run",
        "-o",
        "json",
    )
    assert code == 0
    assert json.loads(out) == {
        "selector": "tags=prod",
        "matched": 2,
        "targets": ["node-a"],
        "skipped": [{"node_id": "node-b", "reason": "unhealthy"}],
    }
    code, out, _ = run(capsys, "edge", "fleet", "preview", "--target", "tags=prod", "--tool", "x")
    assert code == 0
    assert "1 target(s), 1 skipped" in out
    assert "unhealthy" in out


def test_fleet_run_seed_upgrade_json(
    capsys: pytest.CaptureFixture[str], admin: FakeAdmin, env: dict[str, str]
) -> None:
    cmd = "/opt/aegis/upgrade.sh && systemctl --user restart aegis-edge.service"
    code, out, err = run(
        capsys, "edge", "fleet", "run", "--target", "tags=managed-fleet", "--tool", "cmd.run",
        "--arg", f"cmd={cmd}", "--mode", "rolling=5", "--on-error", "stop-after=1",
        "--deadline", "120s", "--output", "json",
    )  # fmt: skip
    assert (code, err) == (0, "")
    method, spec, md = admin.calls[-1]
    assert method == "StartFleetRun"
    assert md["authorization"] == f"Bearer {TOKEN}"
    assert json.loads(spec.args_json) == {"cmd": cmd}
    assert (spec.mode, spec.on_error, spec.deadline_secs) == ("rolling=5", "stop-after=1", 120.0)
    body = json.loads(out)
    assert body["fleet_command_id"] == "fleet-42"
    assert body["outcome"] == "completed"
    assert [(t["node_id"], t["outcome"], t["exit_code"]) for t in body["targets"]] == [
        ("node-a", "ok", 0),
        ("node-d", "ok", 0),
    ]
    assert body["skipped"] == [{"node_id": "node-b", "reason": "unhealthy"}]


def test_fleet_run_halted_exits_non_zero_with_one_line(
    capsys: pytest.CaptureFixture[str], admin: FakeAdmin, env: dict[str, str]
) -> None:
    code, out, err = run(capsys, "edge", "fleet", "run", "--target", "all", "--tool", "fails")
    assert code != 0
    assert "NODE" in out
    assert "OUTCOME" in out
    assert "fleet run fleet-42: halted" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0] == (
        "aegis: fleet run fleet-42 halted: 1 error, 1 ok; 1 skipped (stop-after=1 reached)"
    )

    code, out, err = run(
        capsys, "edge", "fleet", "run", "--target", "all", "--tool", "fails", "-o", "json"
    )
    assert code != 0
    assert json.loads(out)["outcome"] == "halted"
    assert "halted" in err


def test_fleet_run_stream_that_ends_early(
    capsys: pytest.CaptureFixture[str], admin: FakeAdmin, env: dict[str, str]
) -> None:
    code, _, err = run(capsys, "edge", "fleet", "run", "--target", "all", "--tool", "vanish")
    assert code != 0
    assert "closed the event stream before fleet run fleet-42 finished" in err


def test_fleet_run_invalid_argument_from_the_relay(
    capsys: pytest.CaptureFixture[str], admin: FakeAdmin, env: dict[str, str]
) -> None:
    code, _, err = run(capsys, "edge", "fleet", "run", "--target", "all", "--tool", "bad.selector")
    assert code == 1
    assert err == "aegis: selector column 1: unknown key 'x'\n"


def test_fleet_run_with_live_progress_on_a_terminal(
    capsys: pytest.CaptureFixture[str],
    admin: FakeAdmin,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    code, out, _ = run(capsys, "edge", "fleet", "run", "--target", "all", "--tool", "edge.ping")
    assert code == 0
    assert "fleet run fleet-42: completed: 2 ok; 1 skipped" in out


def test_fleet_keys_rotate_is_a_run_of_keys_rotate(
    capsys: pytest.CaptureFixture[str], admin: FakeAdmin, env: dict[str, str]
) -> None:
    code, out, _ = run(
        capsys, "edge", "fleet", "keys", "rotate",
        "--target", "tags=AnyOf(potentially-affected,prod)",
        "--mode", "rolling=10", "--on-error", "continue", "-o", "json",
    )  # fmt: skip
    assert code == 0
    _, spec, _ = admin.calls[-1]
    assert spec.tool == "keys.rotate"
    assert spec.selector == "tags=AnyOf(potentially-affected,prod)"
    assert (spec.mode, spec.on_error) == ("rolling=10", "continue")
    assert json.loads(out)["outcome"] == "completed"


def test_fleet_bad_mode_never_reaches_the_relay(
    capsys: pytest.CaptureFixture[str], admin: FakeAdmin, env: dict[str, str]
) -> None:
    code, _, err = run(
        capsys, "edge", "fleet", "run", "--target", "all", "--tool", "x", "--mode", "rolling=0"
    )
    assert code == 1
    assert err.startswith("aegis: --mode")
    assert admin.calls == []


def test_fleet_runs_show_cancel(
    capsys: pytest.CaptureFixture[str], admin: FakeAdmin, env: dict[str, str]
) -> None:
    code, out, _ = run(capsys, "edge", "fleet", "runs", "--limit", "1", "-o", "json")
    assert code == 0
    runs = json.loads(out)
    assert [r["fleet_command_id"] for r in runs] == ["fleet-42"]
    assert admin.calls[-1][1].limit == 1

    code, out, _ = run(capsys, "edge", "fleet", "runs")
    assert code == 0
    assert "fleet-41" in out
    assert "halted" in out

    code, out, _ = run(capsys, "edge", "fleet", "show", "fleet-42", "-o", "json")
    assert code == 0
    shown = json.loads(out)
    assert shown["outcome"] == "completed_with_errors"
    assert shown["spec"]["args"] == {"cmd": "id"}
    assert [t["outcome"] for t in shown["targets"]] == ["ok", "timeout"]

    code, out, _ = run(capsys, "edge", "fleet", "show", "fleet-42")
    assert code == 0
    assert "completed_with_errors: 1 ok, 1 timeout; 1 skipped" in out

    code, _, err = run(capsys, "edge", "fleet", "show", "nope")
    assert (code, err) == (1, "aegis: no fleet run 'nope'\n")

    code, out, _ = run(capsys, "edge", "fleet", "cancel", "fleet-42")
    assert code == 0
    assert out.strip() == "fleet run fleet-42: cancelled"


# --- connection failures ----------------------------------------------------------------------


def test_wrong_token_is_unauthenticated(
    capsys: pytest.CaptureFixture[str],
    admin: FakeAdmin,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AEGIS_OPERATOR_TOKEN", "wrong")
    code, out, err = run(capsys, "edge", "ls")
    assert code == 1
    assert out == ""
    assert err == ("aegis: operator token refused: bad\n")


def test_missing_settings_name_flag_and_env(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("AEGIS_RELAY", "AEGIS_CA_CERT", "AEGIS_OPERATOR_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    code, _, err = run(capsys, "edge", "ls")
    assert code == 1
    assert err == (
        "aegis: no relay address: pass --relay HOST:PORT or set AEGIS_RELAY "
        "(or --relay-data-dir D for a local relay)\n"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_relay(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = f"127.0.0.1:{_free_port()}"
    monkeypatch.setenv("AEGIS_RELAY", relay)
    code, out, err = run(capsys, "edge", "ls")
    assert code == 1
    assert out == ""
    assert err.startswith(f"aegis: cannot reach the relay at {relay}: ")
    assert err.endswith("; is `aegis relay serve` running?\n")
    assert len(err.splitlines()) == 1


def test_untrusted_relay_certificate(
    capsys: pytest.CaptureFixture[str],
    admin: FakeAdmin,
    env: dict[str, str],
    tls: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AEGIS_CA_CERT", str(tls["other_ca"]))
    code, _, err = run(capsys, "edge", "fleet", "runs")
    assert code == 1
    assert err.startswith("aegis: cannot reach the relay at 127.0.0.1:")
    assert len(err.splitlines()) == 1
    assert admin.calls == []


def test_fleet_watch_follows_a_run_and_exits_like_run(
    capsys: pytest.CaptureFixture[str], admin: FakeAdmin, env: dict[str, str]
) -> None:
    code, out, err = run(capsys, "edge", "fleet", "watch", "fleet-42", "-o", "json")
    assert code == 1
    body = json.loads(out)
    assert body["outcome"] == "completed_with_errors"
    assert body["targets"][0]["outcome"] == "denied"
    assert err == ("aegis: fleet run fleet-42 completed_with_errors: 1 denied; 1 skipped\n")
    assert admin.calls[-1][0] == "WatchFleetRun"
    assert admin.calls[-1][1].fleet_command_id == "fleet-42"


def test_tls_server_name_override(
    capsys: pytest.CaptureFixture[str],
    admin: FakeAdmin,
    env: dict[str, str],
    server: ServerThread,
) -> None:
    code, _, err = run(capsys, "edge", "fleet", "runs", "--tls-server-name", "localhost")
    assert (code, err) == (0, "")
    code, _, err = run(capsys, "edge", "fleet", "runs", "--tls-server-name", "relay.example.com")
    assert code == 1
    assert err.startswith(f"aegis: cannot reach the relay at 127.0.0.1:{server.port}: ")


def test_relay_data_dir_reads_relay_json(
    capsys: pytest.CaptureFixture[str],
    admin: FakeAdmin,
    server: ServerThread,
    tls: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "operator.token").write_text(TOKEN + "\n")
    info = {
        "version": 1,
        "listen": f"0.0.0.0:{server.port}",
        "host": "0.0.0.0",
        "port": server.port,
        "tls": True,
        "ca_cert": str(tls["ca"]),
        "operator_token": str(tmp_path / "operator.token"),
    }
    (tmp_path / "relay.json").write_text(json.dumps(info))
    # A flag beats stale environment settings.
    monkeypatch.setenv("AEGIS_RELAY", "127.0.0.1:1")
    monkeypatch.setenv("AEGIS_OPERATOR_TOKEN", "stale")
    code, out, err = run(capsys, "edge", "ls", "-o", "json", "--relay-data-dir", str(tmp_path))
    assert (code, err) == (0, "")
    assert len(json.loads(out)) == 3
    assert admin.calls[-1][2]["authorization"] == f"Bearer {TOKEN}"
