"""Tenant isolation over every ``/api/v1`` operation, generated from the OpenAPI document.

As ``test_tenant_isolation.py`` does for the gRPC descriptor: the attacker holds an *admin*
token scoped to tenant A; for every operation of the committed document there is a case
that tries to reach tenant B's hosts, runs, groups or the tenant itself through it. Each
attempt must be refused (404 for B's objects, 403 for naming B, or the refusal the case
names) or come back without any of B's data, and B's state (its host, tags, command
history, runs and groups) must be unchanged afterwards. A new operation without a case
fails ``test_every_operation_has_a_case``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest

from aegis_edge_relay.http.openapi import committed_document
from aegis_edge_relay.http.routes import API_PREFIX
from tests import https
from tests.agent.harness import DaemonProcess, RelayProcess, cli, enroll_host, wait_until
from tests.faults.conftest import Tally

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(240)]

DOCUMENT = json.loads(committed_document())
OPERATIONS = sorted(
    f"{method.upper()} {path}" for path, ops in DOCUMENT["paths"].items() for method in ops
)
A, B = "api-iso-a", "api-iso-b"
DENIED = (403, 404)


@attrs.define
class World:
    relay: RelayProcess
    attacker: str
    root: str
    a_node: str
    b_node: str
    b_done_run: str
    b_live_run: str

    def call(self, method: str, path: str, body: Any = None, *, token: str = "") -> Any:
        status, _, raw = https.request(
            self.relay.info,
            API_PREFIX + path,
            method=method,
            body=body,
            token=token or self.attacker,
        )
        return status, json.loads(raw) if raw else None

    def secrets_of_b(self) -> tuple[str, ...]:
        return (self.b_node, B, self.b_done_run, self.b_live_run, "b-owned", "b-only")

    def clean(self, answer: Any, asked: str = "") -> bool:
        """An answer that names nothing of B (beyond what the request itself said)."""
        text = json.dumps(answer)
        return not any(s in text for s in self.secrets_of_b() if s not in asked)

    def refused(
        self, method: str, path: str, body: Any = None, codes: tuple[int, ...] = DENIED
    ) -> bool:
        status, _ = self.call(method, path, body)
        return status in codes

    def allowed_clean(self, method: str, path: str, body: Any = None, status: int = 200) -> bool:
        got, answer = self.call(method, path, body)
        return got == status and self.clean(answer, asked=path + json.dumps(body))


Checks = list[tuple[str, bool]]
CASES: dict[str, Callable[[World], Checks]] = {}


def case(operation: str) -> Callable[[Callable[[World], Checks]], Callable[[World], Checks]]:
    def register(fn: Callable[[World], Checks]) -> Callable[[World], Checks]:
        CASES[operation] = fn
        return fn

    return register


P = API_PREFIX


@case(f"GET {P}/hosts")
def _list_hosts(w: World) -> Checks:
    _, listed = w.call("GET", "/hosts")
    return [
        ("list all", {h["tenant_id"] for h in listed["hosts"]} == {A} and w.clean(listed)),
        ("select B's node", w.allowed_clean("GET", f"/hosts?selector=node%3D{w.b_node}")),
        ("list tenant B", w.refused("GET", f"/hosts?tenant={B}")),
    ]


@case(f"GET {P}/hosts/{{node_id}}")
def _get_host(w: World) -> Checks:
    return [("show B's host", w.refused("GET", f"/hosts/{w.b_node}"))]


@case(f"POST {P}/hosts/{{node_id}}/tags")
def _add_tags(w: World) -> Checks:
    return [("tag B's host", w.refused("POST", f"/hosts/{w.b_node}/tags", {"tags": ["pwned"]}))]


@case(f"DELETE {P}/hosts/{{node_id}}/tags/{{tag}}")
def _remove_tag(w: World) -> Checks:
    return [("untag B's host", w.refused("DELETE", f"/hosts/{w.b_node}/tags/b-owned"))]


@case(f"POST {P}/hosts/{{node_id}}/revoke")
def _revoke(w: World) -> Checks:
    return [("revoke B's host", w.refused("POST", f"/hosts/{w.b_node}/revoke", {}))]


@case(f"DELETE {P}/tenants/{{tenant_id}}")
def _delete_tenant(w: World) -> Checks:
    return [("delete tenant B", w.refused("DELETE", f"/tenants/{B}"))]


@case(f"POST {P}/tenants/{{tenant_id}}/enrollment-tokens")
def _issue(w: World) -> Checks:
    return [("enrollment token for B", w.refused("POST", f"/tenants/{B}/enrollment-tokens", {}))]


@case(f"POST {P}/fleet/preview")
def _preview(w: World) -> Checks:
    out = [
        (
            f"preview {selector}",
            w.allowed_clean("POST", "/fleet/preview", {"selector": selector, "tool": "cmd.run"}),
        )
        for selector in ("all", "tags=b-owned")
    ]
    out.append(
        (
            "preview in tenant B",
            w.refused(
                "POST", "/fleet/preview", {"selector": "all", "tool": "cmd.run", "tenant_id": B}
            ),
        )
    )
    out.append(
        (
            "preview B's group",
            w.refused(
                "POST", "/fleet/preview", {"selector": "group=b-only", "tool": "cmd.run"}, (400,)
            ),
        )
    )
    return out


@case(f"POST {P}/fleet/runs")
def _start(w: World) -> Checks:
    spec = {"tool": "cmd.run", "args": {"cmd": "echo pwned"}}
    out = [
        (
            "run on B's node",
            w.refused("POST", "/fleet/runs", {**spec, "selector": f"node={w.b_node}"}, (409,)),
        ),
        (
            "run in tenant B",
            w.refused("POST", "/fleet/runs", {**spec, "selector": "all", "tenant_id": B}),
        ),
        (
            "run on B's group",
            w.refused("POST", "/fleet/runs", {**spec, "selector": "group=b-only"}, (400,)),
        ),
    ]
    status, run = w.call("POST", "/fleet/runs", {**spec, "selector": "all"})
    out.append(("run on all is A's alone", status == 202 and w.clean(run)))
    if status == 202:
        done = wait_until(
            lambda: (
                (r := w.call("GET", f"/fleet/runs/{run['fleet_command_id']}")[1])["outcome"]
                != "running"
                and r
            ),
            60,
            0.2,
            "A's run",
        )
        out.append(
            (
                "A's run touched A alone",
                [t["node_id"] for t in done["targets"]] == [w.a_node] and w.clean(done),
            )
        )
    return out


@case(f"GET {P}/fleet/runs")
def _list_runs(w: World) -> Checks:
    return [
        ("list runs", w.allowed_clean("GET", "/fleet/runs?limit=500")),
        ("list runs of B", w.refused("GET", f"/fleet/runs?tenant={B}")),
    ]


@case(f"GET {P}/fleet/runs/{{fleet_command_id}}")
def _get_run(w: World) -> Checks:
    return [
        (f"show {r}", w.refused("GET", f"/fleet/runs/{r}")) for r in (w.b_done_run, w.b_live_run)
    ]


@case(f"POST {P}/fleet/runs/{{fleet_command_id}}/cancel")
def _cancel(w: World) -> Checks:
    return [
        (f"cancel {r}", w.refused("POST", f"/fleet/runs/{r}/cancel"))
        for r in (w.b_done_run, w.b_live_run)
    ]


@case(f"POST {P}/fleet/runs/{{fleet_command_id}}/rerun")
def _rerun(w: World) -> Checks:
    return [
        (f"rerun {r} --only {only}", w.refused("POST", f"/fleet/runs/{r}/rerun", {"only": only}))
        for r in (w.b_done_run, w.b_live_run)
        for only in ("all", "failed")
    ]


@case(f"GET {P}/groups")
def _list_groups(w: World) -> Checks:
    _, listed = w.call("GET", "/groups")
    return [
        ("list", [(g["tenant_id"], g["name"]) for g in listed["groups"]] == [(A, "web")]),
        ("list tenant B", w.refused("GET", f"/groups?tenant={B}")),
    ]


@case(f"POST {P}/groups")
def _create_group(w: World) -> Checks:
    return [
        (
            "create in tenant B",
            w.refused("POST", "/groups", {"name": "pwn", "selector": "all", "tenant_id": B}),
        ),
        (
            "pin B's host",
            w.refused(
                "POST", "/groups", {"name": "pin-b", "selector": "all", "pinned": [w.b_node]}
            ),
        ),
    ]


@case(f"GET {P}/groups/{{name}}")
def _get_group(w: World) -> Checks:
    _, web = w.call("GET", "/groups/web")
    return [
        ("show web is A's", web["tenant_id"] == A and web["members"] == [w.a_node]),
        ("show B's group", w.refused("GET", "/groups/b-only")),
        ("show web of B", w.refused("GET", f"/groups/web?tenant={B}")),
    ]


@case(f"DELETE {P}/groups/{{name}}")
def _delete_group(w: World) -> Checks:
    return [
        ("rm B's group", w.refused("DELETE", "/groups/b-only")),
        ("rm web of B", w.refused("DELETE", f"/groups/web?tenant={B}")),
        ("rm b-only of B", w.refused("DELETE", f"/groups/b-only?tenant={B}")),
    ]


@case(f"GET {P}/openapi.json")
def _openapi(w: World) -> Checks:
    return [("the document names no tenant", w.allowed_clean("GET", "/openapi.json"))]


@pytest.mark.parametrize("operation", OPERATIONS)
def test_every_operation_has_a_case(operation: str) -> None:
    assert operation in CASES, f"{operation} has no tenant-isolation case in {__file__}"


def test_every_case_is_an_operation() -> None:
    assert sorted(set(CASES) - set(OPERATIONS)) == [], "cases for operations the API lost"


def b_state(w: World) -> dict[str, Any]:
    """Everything of B an attack could change, read with the all-tenants token."""
    _, host = w.call("GET", f"/hosts/{w.b_node}?history=100", token=w.root)
    _, groups = w.call("GET", f"/groups?tenant={B}", token=w.root)
    runs = {
        r: w.call("GET", f"/fleet/runs/{r}", token=w.root)[1] for r in (w.b_done_run, w.b_live_run)
    }
    host.pop("last_heartbeat_at")
    for run in runs.values():  # a running target's tail may grow
        for target in run.get("targets", []):
            target.pop("stdout_tail", None)
    return {"host": host, "groups": groups, "runs": runs}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root_dir = tmp_path_factory.mktemp("api-isolation")
    relay = RelayProcess.start(root_dir / "relay")
    daemons = []
    try:
        a = enroll_host(relay, root_dir / "a", tenant=A, allow_tools=["cmd.run"])
        b = enroll_host(relay, root_dir / "b", tenant=B, allow_tools=["cmd.run"])
        daemons = [DaemonProcess.start(a.state_dir), DaemonProcess.start(b.state_dir)]
        for daemon in daemons:
            daemon.wait_event("connected")
        attacker = cli(
            "relay",
            "operator-token",
            "--data-dir",
            str(relay.data_dir),
            "--tenant",
            A,
            "--role",
            "admin",
        ).stdout.strip()
        w = World(relay, attacker, relay.operator_token, a.node_id, b.node_id, "", "")
        assert (
            w.call("POST", f"/hosts/{b.node_id}/tags", {"tags": ["b-owned"]}, token=w.root)[0]
            == 200
        )

        def run_on_b(cmd: str) -> str:
            status, run = w.call(
                "POST",
                "/fleet/runs",
                {"selector": "all", "tool": "cmd.run", "args": {"cmd": cmd}, "tenant_id": B},
                token=w.root,
            )
            assert status == 202, run
            return str(run["fleet_command_id"])

        w.b_done_run = run_on_b("echo b-secret")
        wait_until(
            lambda: (
                w.call("GET", f"/fleet/runs/{w.b_done_run}", token=w.root)[1]["outcome"]
                == "completed"
            ),
            60,
            0.2,
            "B's first run",
        )
        w.b_live_run = run_on_b("sleep 120")
        for tenant, name, selector, pinned in (
            (A, "web", "tags=none-such", [a.node_id]),
            (B, "web", "all", [b.node_id]),
            (B, "b-only", "all", [b.node_id]),
        ):
            status, group = w.call(
                "POST",
                "/groups",
                {"name": name, "tenant_id": tenant, "selector": selector, "pinned": pinned},
                token=w.root,
            )
            assert status == 201, group
        yield w
        w.call("POST", f"/fleet/runs/{w.b_live_run}/cancel", token=w.root)
    finally:
        for daemon in daemons:
            daemon.stop()
        relay.stop()


def test_tenant_a_cannot_touch_tenant_b_over_http(world: World, tally: Tally) -> None:
    before = b_state(world)
    assert before["host"]["status"] == "Connected"
    assert before["runs"][world.b_live_run]["outcome"] == "running"
    for operation in OPERATIONS:
        for label, ok in CASES[operation](world):
            tally.refused(ok, f"{operation}: {label}")
            assert ok, f"tenant A got through {operation}: {label}"
    after = b_state(world)
    assert after == before, "tenant B's state changed"
    assert [g["name"] for g in after["groups"]["groups"]] == ["b-only", "web"]
