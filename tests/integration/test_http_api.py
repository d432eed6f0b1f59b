"""``/api/v1`` on a real relay with real daemons: the same answers, sentences and
authorization as the gRPC Admin API, through the HTTP server's one adapter."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web

from aegis_edge_core.wire import admin_pb2
from aegis_edge_relay.http.openapi import build_document, committed_document, render
from aegis_edge_relay.http.routes import API_PREFIX, ROUTES
from aegis_edge_relay.operator.jsonrepr import fleet_run_to_dict, host_to_dict
from tests import https
from tests.agent.harness import (
    DaemonProcess,
    EnrolledHost,
    RelayProcess,
    cli,
    enroll_host,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


class Api:
    def __init__(self, relay: RelayProcess, token: str) -> None:
        self.relay = relay
        self.token = token

    def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        status, headers, raw = https.request(
            self.relay.info,
            API_PREFIX + path,
            method=method,
            body=body,
            token=self.token if token is None else token,
        )
        return status, headers, json.loads(raw) if raw else None

    def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        got, _, answer = self.call(method, path, body)
        assert got == status, (got, answer)
        return answer


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    relay_store_url: str,  # one relay per store
) -> Iterator[tuple[RelayProcess, list[EnrolledHost]]]:
    root = tmp_path_factory.mktemp("http-api")
    relay = RelayProcess.start(root / "relay")
    daemons: list[DaemonProcess] = []
    try:
        hosts = [
            enroll_host(relay, root / "a1", tenant="acme", allow_tools=["cmd.run"]),
            enroll_host(relay, root / "a2", tenant="acme", allow_tools=["cmd.run"]),
            enroll_host(relay, root / "b1", tenant="beta", allow_tools=["cmd.run"]),
        ]
        for host in hosts:
            daemons.append(DaemonProcess.start(host.state_dir))
        for daemon in daemons:
            daemon.wait_event("connected")
        yield relay, hosts
    finally:
        for daemon in daemons:
            daemon.stop()
        relay.stop()


def operator_token(relay: RelayProcess, tenant: str, role: str = "operator") -> str:
    out = cli(
        "relay",
        "operator-token",
        "--data-dir",
        str(relay.data_dir),
        "--tenant",
        tenant,
        "--role",
        role,
    )
    return out.stdout.strip()


def _steady(host: dict[str, Any]) -> dict[str, Any]:
    # the heartbeat moves between two reads
    return {k: v for k, v in host.items() if k != "last_heartbeat_at"}


def grpc_error(relay: RelayProcess, rpc: str, request: Any) -> grpc.RpcError:
    stub, md = relay.admin()
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, rpc)(request, metadata=md, timeout=10)
    return err.value


def test_hosts_answer_what_the_cli_prints(fleet: tuple[RelayProcess, list[EnrolledHost]]) -> None:
    relay, hosts = fleet
    api = Api(relay, relay.operator_token)
    stub, md = relay.admin()
    via_grpc = stub.ListHosts(admin_pb2.ListHostsRequest(), metadata=md, timeout=10)
    want = [
        _steady(host_to_dict(h))
        for h in sorted(via_grpc.hosts, key=lambda h: (h.tenant_id, h.node_id))
    ]
    page = api.ok("GET", "/hosts")
    assert [_steady(h) for h in page["hosts"]] == want
    assert page["next_cursor"] is None
    assert {h["node_id"] for h in page["hosts"]} == {h.node_id for h in hosts}

    # pages of one, in the same order, until the cursor runs out
    seen, after = [], ""
    statuses = Counter(h["status"] for h in want)
    while True:
        page = api.ok("GET", "/hosts?limit=1" + (f"&after={after}" if after else ""))
        seen += [h["node_id"] for h in page["hosts"]]
        # every page counts every matching host, not only its own
        assert (page["matched"], page["status_counts"]) == (len(want), dict(statuses))
        if page["next_cursor"] is None:
            break
        after = page["next_cursor"]
    assert seen == [h["node_id"] for h in want]

    # the relay builds the page: the gRPC answer holds only it
    first = stub.ListHosts(admin_pb2.ListHostsRequest(limit=1), metadata=md, timeout=10)
    assert [h.node_id for h in first.hosts] == [want[0]["node_id"]]
    assert (first.more, first.matched) == (len(want) > 1, len(want))

    acme = api.ok("GET", "/hosts?tenant=acme&connected=true")["hosts"]
    assert sorted(h["node_id"] for h in acme) == sorted(h.node_id for h in hosts[:2])

    one = api.ok("GET", f"/hosts/{hosts[0].node_id}?history=5")
    grpc_host = stub.GetHost(
        admin_pb2.GetHostRequest(node_id=hosts[0].node_id, history_limit=5), metadata=md, timeout=10
    )
    assert _steady(one) == _steady(host_to_dict(grpc_host, with_history=True))


def test_errors_carry_the_relays_sentence(fleet: tuple[RelayProcess, list[EnrolledHost]]) -> None:
    relay, hosts = fleet
    api = Api(relay, relay.operator_token)
    status, headers, body = api.call("GET", "/hosts?selector=tags%3D(")
    err = grpc_error(relay, "ListHosts", admin_pb2.ListHostsRequest(selector="tags=("))
    assert status == 400
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["detail"] == err.details()
    assert body["status"] == 400 and body["type"] == "urn:aegis-edge:problem:invalid_argument"

    status, _, body = api.call("GET", "/hosts/no-such-node")
    err = grpc_error(relay, "GetHost", admin_pb2.GetHostRequest(node_id="no-such-node"))
    assert (status, body["detail"]) == (404, err.details())

    status, headers, body = api.call("GET", "/hosts", token="")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert body["detail"].startswith("no operator token")
    status, _, body = api.call("GET", "/hosts", token="not-a-token")
    assert status == 401 and body["detail"].startswith("operator token refused")

    viewer = operator_token(relay, "acme", role="viewer")
    status, _, body = api.call("POST", f"/hosts/{hosts[0].node_id}/tags", {"tags": ["x"]}, viewer)
    assert status == 403, body

    for bad, why in (
        ({"tags": "prod"}, "body field 'tags' must be a list of strings"),
        ({"tag": ["prod"]}, "unknown body field 'tag' (known: tags)"),
        ({}, "body field 'tags' is required"),
    ):
        status, _, body = api.call("POST", f"/hosts/{hosts[0].node_id}/tags", bad)
        assert (status, body["detail"]) == (400, why)
    status, _, body = api.call("GET", "/hosts?limit=0")
    assert (status, body["detail"]) == (
        400,
        "query field 'limit' must be between 1 and 1000, not 0",
    )
    status, _, body = api.call("PUT", "/hosts")
    assert status == 405 and body["status"] == 405
    status, _, body = api.call("GET", "/nothing-here")
    assert status == 404 and body["type"] == "urn:aegis-edge:problem:not_found"


def test_tags_runs_groups_tokens(fleet: tuple[RelayProcess, list[EnrolledHost]]) -> None:
    relay, hosts = fleet
    api = Api(relay, operator_token(relay, "acme"))
    node = hosts[0].node_id

    tagged = api.ok("POST", f"/hosts/{node}/tags", {"tags": ["web", "prod"]})
    assert tagged["capabilities"]["tags"] == ["prod", "web"]
    assert api.ok("DELETE", f"/hosts/{node}/tags/web")["capabilities"]["tags"] == ["prod"]

    preview = api.ok("POST", "/fleet/preview", {"selector": "tags=prod", "tool": "cmd.run"})
    assert preview["targets"] == [node]

    status, headers, started = api.call(
        "POST",
        "/fleet/runs",
        {"selector": "tags=prod", "tool": "cmd.run", "args": {"cmd": "echo hello"}},
    )
    assert status == 202, started
    run_id = started["fleet_command_id"]
    assert headers["Location"] == f"{API_PREFIX}/fleet/runs/{run_id}"

    def finished() -> dict[str, Any] | None:
        run = api.ok("GET", f"/fleet/runs/{run_id}")
        return run if run["outcome"] != "running" else None

    run = wait_until(finished, 60, 0.2, "the run to finish")
    assert run["outcome"] == "completed"
    assert run["targets"][0]["stdout_tail"] == "hello\n"
    stub, md = relay.admin()
    assert run == fleet_run_to_dict(
        stub.GetFleetRun(
            admin_pb2.GetFleetRunRequest(fleet_command_id=run_id), metadata=md, timeout=10
        )
    )
    listed = api.ok("GET", "/fleet/runs?limit=5")["runs"]
    assert listed[0]["fleet_command_id"] == run_id and "targets" not in listed[0]

    status, _, body = api.call("POST", f"/fleet/runs/{run_id}/cancel")
    err = grpc_error(relay, "CancelFleetRun", admin_pb2.GetFleetRunRequest(fleet_command_id=run_id))
    assert (status, body["detail"]) == (409, err.details())

    status, _, rerun = api.call("POST", f"/fleet/runs/{run_id}/rerun", {"only": "all"})
    assert status == 202 and rerun["rerun_of"] == run_id
    wait_until(
        lambda: api.ok("GET", f"/fleet/runs/{rerun['fleet_command_id']}")["outcome"] != "running",
        60,
        0.2,
        "the rerun to finish",
    )

    group = api.ok("POST", "/groups", {"name": "web", "selector": "tags=prod"}, status=201)
    assert (group["tenant_id"], group["members"]) == ("acme", [node])
    assert [g["name"] for g in api.ok("GET", "/groups")["groups"]] == ["web"]
    assert api.ok("GET", "/groups/web")["members"] == [node]
    assert api.ok("DELETE", "/groups/web")["name"] == "web"
    assert api.call("GET", "/groups/web")[0] == 404

    token = api.ok("POST", "/tenants/acme/enrollment-tokens", {"ttl_secs": 60}, status=201)
    assert token["token"].startswith("eyJ") and token["expires_at"].endswith("Z")


def test_revoke_and_tenant_delete(tmp_path: Path) -> None:
    relay = RelayProcess.start(tmp_path / "relay")
    try:
        host = enroll_host(relay, tmp_path / "edge", tenant="gone")
        daemon = DaemonProcess.start(host.state_dir)
        daemon.wait_event("connected")
        api = Api(relay, relay.operator_token)
        revoked = api.ok("POST", f"/hosts/{host.node_id}/revoke", {"reason": "lost laptop"})
        assert (revoked["status"], revoked["revoked_reason"]) == ("Revoked", "lost laptop")
        assert daemon.wait_exit() != 0  # cut off: it may not come back
        assert api.ok("DELETE", "/tenants/gone") == {"tenant_id": "gone", "revoked_daemons": 0}
        status, _, body = api.call("POST", "/tenants/gone/enrollment-tokens", {})
        assert (status, body["detail"]) == (
            409,
            "tenant 'gone' was deleted and takes no new daemons",
        )
    finally:
        relay.stop()


def test_openapi_document_is_the_committed_one_and_covers_every_route(
    fleet: tuple[RelayProcess, list[EnrolledHost]],
) -> None:
    relay, _ = fleet
    status, _, served = https.request(relay.info, f"{API_PREFIX}/openapi.json")
    assert status == 200
    assert served == committed_document()
    assert committed_document().decode() == render(build_document()), (
        "aegis_edge_relay/http/openapi.json is stale: run python scripts/gen_openapi.py"
    )
    document = json.loads(served)
    assert document["openapi"].startswith("3.1")
    # every route the app serves under /api/v1 has its operation in the document
    from aegis_edge_relay.http.app import make_app

    app = make_app(registry=None, ready=None, admin=None)  # type: ignore[arg-type]
    served_ops = {
        (r.method.lower(), r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None
        and r.resource.canonical.startswith(API_PREFIX)
        and r.method != "HEAD"
    }
    documented = {(m, p) for p, ops in document["paths"].items() for m in ops}
    assert served_ops == documented
    assert {r.operation_id for r in ROUTES} <= {
        op["operationId"] for ops in document["paths"].values() for op in ops.values()
    }
    assert isinstance(app, web.Application)
