"""``AdminClient``, the Python SDK of the Admin API, against a real relay on loopback.

The CLI's tests cover what the commands print; these cover what a script sees: typed
answers, one method per RPC, and refusals as ``AdminError`` subclasses that carry the
relay's sentence and status code.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from aegis_edge_core.wire import admin_pb2
from aegis_edge_relay.operator.client import (
    AdminAlreadyExists,
    AdminClient,
    AdminError,
    AdminFailedPrecondition,
    AdminInvalidArgument,
    AdminNotFound,
    AdminPermissionDenied,
    AdminSettingsError,
    AdminUnauthenticated,
    AdminUnavailable,
    Connection,
)
from tests.relay.daemon_driver import RelayProcess


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def test_one_method_per_admin_rpc() -> None:
    service = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
    missing = [
        m.name for m in service.methods if not callable(getattr(AdminClient, _snake(m.name), None))
    ]
    assert not missing, f"AdminClient lacks {missing}"
    assert len(service.methods) == 18


def test_settings_errors_name_the_setting_and_never_the_token(tmp_path: Path) -> None:
    with pytest.raises(AdminSettingsError, match="no relay address") as info:
        Connection.resolve(environ={})
    assert (info.value.setting, info.value.code) == ("relay", None)
    with pytest.raises(AdminSettingsError, match="cannot read the relay description") as info:
        Connection.resolve(data_dir=str(tmp_path), environ={})
    assert info.value.setting == "data_dir"
    local = Connection.resolve("127.0.0.1:1", token="s3cr3t", insecure=True, environ={})
    with AdminClient(local) as admin:
        assert "s3cr3t" not in repr(admin) + repr(admin.connection)
        assert admin.connection.metadata == (("authorization", "Bearer s3cr3t"),)


def test_a_relay_that_is_not_there_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with (
        AdminClient(Connection.resolve(f"127.0.0.1:{port}", token="t", insecure=True)) as admin,
        pytest.raises(
            AdminUnavailable, match=f"cannot reach the relay at 127.0.0.1:{port}"
        ) as info,
    ):
        admin.list_hosts()
    assert info.value.code is grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    proc = RelayProcess.start(tmp_path_factory.mktemp("relay"))
    yield proc
    assert proc.stop() == 0


@pytest.fixture
def admin(relay: RelayProcess) -> Iterator[AdminClient]:
    with AdminClient(Connection.resolve(data_dir=str(relay.data_dir), environ={})) as client:
        yield client


@pytest.mark.integration
def test_a_client_without_arguments_reads_the_environment(
    relay: RelayProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AEGIS_RELAY", relay.address)
    monkeypatch.setenv("AEGIS_CA_CERT", str(relay.data_dir / "ca.pem"))
    monkeypatch.setenv("AEGIS_OPERATOR_TOKEN", relay.admin_token)
    with AdminClient() as admin:
        issued = admin.issue_enrollment_token("acme", ttl_secs=60)
    assert issued.token.startswith("eyJ")
    assert issued.expires_at > 0


@pytest.mark.integration
def test_typed_answers_and_refusals(admin: AdminClient) -> None:
    assert admin.list_hosts() == []
    assert admin.list_fleet_runs(limit=5) == []

    with pytest.raises(AdminNotFound) as not_found:
        admin.get_host("n-missing")
    assert not_found.value.code is grpc.StatusCode.NOT_FOUND
    assert str(not_found.value) == not_found.value.details  # the relay's sentence, whole
    assert "n-missing" in str(not_found.value)

    spec = admin_pb2.FleetRunSpec(selector="tagz=x", tool="edge.ping")
    with pytest.raises(AdminInvalidArgument, match="tagz"):
        admin.preview_fleet_run(spec)
    nobody = admin_pb2.FleetRunSpec(selector="tags=nowhere", tool="edge.ping")
    assert admin.preview_fleet_run(nobody).matched == 0
    with pytest.raises(AdminFailedPrecondition, match="tags=nowhere"):
        list(admin.start_fleet_run(nobody))  # a stream's refusal comes with its first event
    with pytest.raises(AdminNotFound):
        next(admin.watch_fleet_run("f-missing"))


@pytest.mark.integration
def test_groups_round_trip(admin: AdminClient) -> None:
    with pytest.raises(AdminNotFound, match="n-9"):  # a pinned node must be enrolled
        admin.create_group("web", selector="tags=web", tenant_id="acme", pinned=["n-9"])
    group = admin.create_group("web", selector="tags=web", tenant_id="acme")
    assert (group.name, group.tenant_id, list(group.members)) == ("web", "acme", [])
    with pytest.raises(AdminAlreadyExists):
        admin.create_group("web", selector="tags=web", tenant_id="acme")
    assert [g.name for g in admin.list_groups(tenant_id="acme")] == ["web"]
    assert admin.get_group("web").selector == "tags=web"
    assert admin.delete_group("web", tenant_id="acme").name == "web"
    with pytest.raises(AdminNotFound):
        admin.get_group("web", tenant_id="acme")


@pytest.mark.integration
def test_role_and_token_refusals(relay: RelayProcess) -> None:
    viewer = relay.operator_token("acme", role="viewer")
    with (
        AdminClient(Connection.resolve(data_dir=str(relay.data_dir), token=viewer)) as admin,
        pytest.raises(AdminPermissionDenied) as denied,
    ):
        admin.issue_enrollment_token("acme")
    assert denied.value.code is grpc.StatusCode.PERMISSION_DENIED
    with (
        AdminClient(Connection.resolve(data_dir=str(relay.data_dir), token="bad")) as admin,
        pytest.raises(AdminUnauthenticated),
    ):
        admin.list_hosts()
    assert issubclass(AdminUnauthenticated, AdminError)
