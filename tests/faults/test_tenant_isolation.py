"""Tenant isolation over every Admin RPC, generated from the service descriptor.

The attacker holds an *admin* token scoped to tenant A (the strongest token short of
all-tenants). For every RPC of ``aegis.edge.v1.Admin`` there is a case that tries to reach
tenant B's daemons or runs through it; each attempt must be refused (NOT_FOUND for B's
objects, PERMISSION_DENIED for naming B) or come back without B's data, and B's state must
be unchanged afterwards. A new RPC without a case here fails ``test_every_rpc_has_a_case``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
import grpc
import pytest

from aegis_edge_core.session import SessionAccepted
from aegis_edge_core.wire import admin_pb2, common_pb2, stream_pb2
from tests.faults.conftest import Tally
from tests.faults.helpers import enrolled
from tests.relay.daemon_driver import DaemonDriver, RelayProcess, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(120)]

ADMIN_RPCS = sorted(admin_pb2.DESCRIPTOR.services_by_name["Admin"].methods_by_name)
A, B = "iso-a", "iso-b"
DENIED = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED}


@attrs.define
class World:
    admin: Any
    attacker: tuple[tuple[str, str], ...]
    root: tuple[tuple[str, str], ...]
    a: DaemonDriver
    b: DaemonDriver
    b_done_run: str
    b_live_run: str


Case = Callable[[World], Awaitable[list[tuple[str, bool]]]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES[name] = fn
        return fn

    return register


async def refused(call: Awaitable[Any], codes: set[grpc.StatusCode] = DENIED) -> bool:
    try:
        result = call
        if hasattr(result, "__aiter__"):
            async for _ in result:  # type: ignore[attr-defined]
                pass
        else:
            await result
    except grpc.aio.AioRpcError as err:
        return err.code() in codes
    return False


@case("ListHosts")
async def _list_hosts(w: World) -> list[tuple[str, bool]]:
    listed = await w.admin.ListHosts(admin_pb2.ListHostsRequest(), metadata=w.attacker)
    by_sel = await w.admin.ListHosts(
        admin_pb2.ListHostsRequest(selector=f"node={w.b.node_id}"), metadata=w.attacker
    )
    ids = {h.node_id for h in listed.hosts} | {h.node_id for h in by_sel.hosts}
    return [
        ("list all", w.b.node_id not in ids and {h.tenant_id for h in listed.hosts} <= {A}),
        (
            "list tenant B",
            await refused(
                w.admin.ListHosts(admin_pb2.ListHostsRequest(tenant_id=B), metadata=w.attacker)
            ),
        ),
    ]


@case("GetHost")
async def _get_host(w: World) -> list[tuple[str, bool]]:
    req = admin_pb2.GetHostRequest(node_id=w.b.node_id)
    return [("show", await refused(w.admin.GetHost(req, metadata=w.attacker)))]


@case("AddTags")
async def _add_tags(w: World) -> list[tuple[str, bool]]:
    req = admin_pb2.TagsRequest(node_id=w.b.node_id, tags=["pwned"])
    return [("tag add", await refused(w.admin.AddTags(req, metadata=w.attacker)))]


@case("RemoveTags")
async def _remove_tags(w: World) -> list[tuple[str, bool]]:
    req = admin_pb2.TagsRequest(node_id=w.b.node_id, tags=["b-owned"])
    return [("tag rm", await refused(w.admin.RemoveTags(req, metadata=w.attacker)))]


@case("RevokeNode")
async def _revoke(w: World) -> list[tuple[str, bool]]:
    req = admin_pb2.RevokeNodeRequest(node_id=w.b.node_id)
    return [("revoke", await refused(w.admin.RevokeNode(req, metadata=w.attacker)))]


@case("IssueEnrollmentToken")
async def _issue(w: World) -> list[tuple[str, bool]]:
    req = admin_pb2.IssueEnrollmentTokenRequest(tenant_id=B)
    return [("token for B", await refused(w.admin.IssueEnrollmentToken(req, metadata=w.attacker)))]


@case("DeleteTenant")
async def _delete(w: World) -> list[tuple[str, bool]]:
    req = admin_pb2.DeleteTenantRequest(tenant_id=B)
    return [("delete B", await refused(w.admin.DeleteTenant(req, metadata=w.attacker)))]


@case("PreviewFleetRun")
async def _preview(w: World) -> list[tuple[str, bool]]:
    out = []
    for selector in ("all", f"node={w.b.node_id}", "tags=b-owned"):
        p = await w.admin.PreviewFleetRun(
            admin_pb2.FleetRunSpec(selector=selector, tool="edge.ping"), metadata=w.attacker
        )
        seen = set(p.targets) | {s.node_id for s in p.skipped}
        out.append((f"preview {selector}", w.b.node_id not in seen))
    spec = admin_pb2.FleetRunSpec(selector="all", tool="edge.ping", tenant_id=B)
    out.append(
        ("preview tenant B", await refused(w.admin.PreviewFleetRun(spec, metadata=w.attacker)))
    )
    # group=web is A's web (B has one too): B's pinned daemon never shows up.
    p = await w.admin.PreviewFleetRun(
        admin_pb2.FleetRunSpec(selector="group=web", tool="edge.ping"), metadata=w.attacker
    )
    seen = set(p.targets) | {s.node_id for s in p.skipped}
    out.append(("preview group=web is A's", seen == {w.a.node_id}))
    only_b = admin_pb2.FleetRunSpec(selector="group=b-only", tool="edge.ping")
    out.append(
        (
            "preview B's group",
            await refused(
                w.admin.PreviewFleetRun(only_b, metadata=w.attacker),
                {grpc.StatusCode.INVALID_ARGUMENT},
            ),
        )
    )
    return out


@case("StartFleetRun")
async def _start(w: World) -> list[tuple[str, bool]]:
    before = len(w.b.commands)
    out = [
        (
            "run on B's node",
            await refused(
                w.admin.StartFleetRun(
                    admin_pb2.FleetRunSpec(selector=f"node={w.b.node_id}", tool="edge.ping"),
                    metadata=w.attacker,
                ),
                {grpc.StatusCode.FAILED_PRECONDITION},
            ),
        ),
        (
            "run in tenant B",
            await refused(
                w.admin.StartFleetRun(
                    admin_pb2.FleetRunSpec(selector="all", tool="edge.ping", tenant_id=B),
                    metadata=w.attacker,
                )
            ),
        ),
    ]
    out.append(
        (
            "run on B's group",
            await refused(
                w.admin.StartFleetRun(
                    admin_pb2.FleetRunSpec(selector="group=b-only", tool="edge.ping"),
                    metadata=w.attacker,
                ),
                {grpc.StatusCode.INVALID_ARGUMENT},
            ),
        )
    )
    # "all" and A's group=web run on A's daemon only
    for selector in ("all", "group=web"):
        async for _ in w.admin.StartFleetRun(
            admin_pb2.FleetRunSpec(selector=selector, tool="edge.ping"), metadata=w.attacker
        ):
            pass
    out.append(("B's daemon got no command", len(w.b.commands) == before))
    return out


@case("WatchFleetRun")
async def _watch(w: World) -> list[tuple[str, bool]]:
    return [
        (
            f"watch {run}",
            await refused(
                w.admin.WatchFleetRun(
                    admin_pb2.GetFleetRunRequest(fleet_command_id=run), metadata=w.attacker
                )
            ),
        )
        for run in (w.b_done_run, w.b_live_run)
    ]


@case("GetFleetRun")
async def _get_run(w: World) -> list[tuple[str, bool]]:
    return [
        (
            f"show {run}",
            await refused(
                w.admin.GetFleetRun(
                    admin_pb2.GetFleetRunRequest(fleet_command_id=run), metadata=w.attacker
                )
            ),
        )
        for run in (w.b_done_run, w.b_live_run)
    ]


@case("CancelFleetRun")
async def _cancel(w: World) -> list[tuple[str, bool]]:
    return [
        (
            f"cancel {run}",
            await refused(
                w.admin.CancelFleetRun(
                    admin_pb2.GetFleetRunRequest(fleet_command_id=run), metadata=w.attacker
                )
            ),
        )
        for run in (w.b_done_run, w.b_live_run)
    ]


@case("RerunFleetRun")
async def _rerun(w: World) -> list[tuple[str, bool]]:
    before = len(w.b.commands)
    out = [
        (
            f"rerun {run} --only {only}",
            await refused(
                w.admin.RerunFleetRun(
                    admin_pb2.RerunFleetRunRequest(fleet_command_id=run, only=only),
                    metadata=w.attacker,
                )
            ),
        )
        for run in (w.b_done_run, w.b_live_run)
        for only in ("all", "failed")
    ]
    out.append(("B's daemon got no rerun command", len(w.b.commands) == before))
    return out


@case("ListFleetRuns")
async def _list_runs(w: World) -> list[tuple[str, bool]]:
    runs = await w.admin.ListFleetRuns(admin_pb2.ListFleetRunsRequest(), metadata=w.attacker)
    ids = {r.fleet_command_id for r in runs.runs}
    return [
        ("list runs", not ids & {w.b_done_run, w.b_live_run}),
        (
            "list runs of B",
            await refused(
                w.admin.ListFleetRuns(
                    admin_pb2.ListFleetRunsRequest(tenant_id=B), metadata=w.attacker
                )
            ),
        ),
    ]


async def b_groups(w: World) -> list[tuple[str, str, tuple[str, ...]]]:
    listed = await w.admin.ListGroups(admin_pb2.ListGroupsRequest(tenant_id=B), metadata=w.root)
    return [(g.name, g.selector, tuple(g.pinned)) for g in listed.groups]


@case("CreateGroup")
async def _create_group(w: World) -> list[tuple[str, bool]]:
    before = await b_groups(w)
    pin_b = admin_pb2.CreateGroupRequest(name="pin-b", selector="all", pinned=[w.b.node_id])
    in_b = admin_pb2.CreateGroupRequest(name="pwn", tenant_id=B, selector="all")
    out = [
        ("create in tenant B", await refused(w.admin.CreateGroup(in_b, metadata=w.attacker))),
        ("pin B's daemon", await refused(w.admin.CreateGroup(pin_b, metadata=w.attacker))),
    ]
    mine = await w.admin.ListGroups(admin_pb2.ListGroupsRequest(), metadata=w.attacker)
    out.append(("no group was written", {g.name for g in mine.groups} == {"web"}))
    out.append(("B's groups unchanged", await b_groups(w) == before))
    return out


@case("ListGroups")
async def _list_groups(w: World) -> list[tuple[str, bool]]:
    listed = await w.admin.ListGroups(admin_pb2.ListGroupsRequest(), metadata=w.attacker)
    return [
        ("list", [(g.tenant_id, g.name) for g in listed.groups] == [(A, "web")]),
        (
            "list tenant B",
            await refused(
                w.admin.ListGroups(admin_pb2.ListGroupsRequest(tenant_id=B), metadata=w.attacker)
            ),
        ),
    ]


@case("GetGroup")
async def _get_group(w: World) -> list[tuple[str, bool]]:
    web = await w.admin.GetGroup(admin_pb2.GetGroupRequest(name="web"), metadata=w.attacker)
    return [
        ("show web is A's", web.tenant_id == A and list(web.members) == [w.a.node_id]),
        (
            "show B's group",
            await refused(
                w.admin.GetGroup(admin_pb2.GetGroupRequest(name="b-only"), metadata=w.attacker)
            ),
        ),
        (
            "show web of B",
            await refused(
                w.admin.GetGroup(
                    admin_pb2.GetGroupRequest(name="web", tenant_id=B), metadata=w.attacker
                )
            ),
        ),
    ]


@case("DeleteGroup")
async def _delete_group(w: World) -> list[tuple[str, bool]]:
    before = await b_groups(w)
    out = [
        (
            f"rm {name} {tenant or '(no tenant)'}",
            await refused(
                w.admin.DeleteGroup(
                    admin_pb2.GetGroupRequest(name=name, tenant_id=tenant), metadata=w.attacker
                )
            ),
        )
        for name, tenant in (("b-only", ""), ("web", B), ("b-only", B))
    ]
    out.append(("B's groups unchanged", await b_groups(w) == before and len(before) == 2))
    return out


@pytest.mark.parametrize("rpc", ADMIN_RPCS)
def test_every_rpc_has_a_case(rpc: str) -> None:
    assert rpc in CASES, f"Admin.{rpc} has no tenant-isolation case in {__file__}"


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    proc = RelayProcess.start(tmp_path_factory.mktemp("relay"))
    yield proc
    assert proc.stop() == 0


def test_tenant_a_cannot_touch_tenant_b(relay: RelayProcess, tally: Tally) -> None:
    attacker = relay.auth(relay.operator_token(A, "admin"))

    async def scenario() -> None:
        async with relay.channel() as channel:
            admin = relay.admin(channel)
            a = await enrolled(relay, channel, A, tools=["edge.ping"])
            b = await enrolled(relay, channel, B, tools=["edge.ping"])
            for d in (a, b):
                assert isinstance(await d.connect(), SessionAccepted)
            root = relay.auth()
            await admin.AddTags(
                admin_pb2.TagsRequest(node_id=b.node_id, tags=["b-owned"]), metadata=root
            )
            async for ev in admin.StartFleetRun(
                admin_pb2.FleetRunSpec(selector="all", tool="edge.ping", tenant_id=B), metadata=root
            ):
                if ev.WhichOneof("body") == "finished":
                    done_run = ev.finished.fleet_command_id
            hold = asyncio.Event()

            async def slow(_cmd: stream_pb2.CommandInvocation) -> tuple[str, int]:
                await hold.wait()
                return ("ok", 0)

            b.command_handler = slow
            live = admin.StartFleetRun(
                admin_pb2.FleetRunSpec(selector="all", tool="edge.ping", tenant_id=B), metadata=root
            )
            live_run = (await live.read()).started.fleet_command_id
            await wait_until(lambda: len(b.commands) == 2, what="B's live run dispatched")
            for tenant, name, selector, pinned in (
                (A, "web", "tags=none-such", [a.node_id]),
                (B, "web", "all", [b.node_id]),
                (B, "b-only", "all", [b.node_id]),
            ):
                await admin.CreateGroup(
                    admin_pb2.CreateGroupRequest(
                        name=name, tenant_id=tenant, selector=selector, pinned=pinned
                    ),
                    metadata=root,
                )
            world = World(admin, attacker, root, a, b, done_run, live_run)
            before = await admin.GetHost(admin_pb2.GetHostRequest(node_id=b.node_id), metadata=root)

            for rpc in ADMIN_RPCS:
                for label, ok in await CASES[rpc](world):
                    tally.refused(ok, f"{rpc}: {label}")
                    assert ok, f"tenant A got through Admin.{rpc}: {label}"

            after = await admin.GetHost(admin_pb2.GetHostRequest(node_id=b.node_id), metadata=root)
            assert after.status == common_pb2.DAEMON_STATUS_CONNECTED
            assert list(after.capabilities.tags) == list(before.capabilities.tags) == ["b-owned"]
            assert after.key_thumbprint == before.key_thumbprint
            running = await admin.GetFleetRun(
                admin_pb2.GetFleetRunRequest(fleet_command_id=live_run), metadata=root
            )
            assert running.outcome == common_pb2.RUN_OUTCOME_RUNNING
            hold.set()
            while (await live.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                pass
            for d in (a, b):
                await d.close()

    asyncio.run(scenario())
