"""Saved groups end to end: the real ``aegis edge groups`` CLI against a real relay process,
with scripted daemons on real TLS streams, across two tenants.

Create, ls, show, fleet preview and fleet run by ``group=``, rm; the refusals (nesting,
another tenant's pin, a viewer's create and rm, an unknown or ambiguous group) and that
each left nothing behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from aegis_edge_core.session import SessionAccepted
from aegis_edge_core.wire import admin_pb2
from tests.faults.helpers import enrolled
from tests.relay.daemon_driver import REPO, DaemonDriver, RelayProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

A, B = "grp-a", "grp-b"


class Cli:
    """``python -m aegis_edge_cli`` as an operator holding one token."""

    def __init__(self, relay: RelayProcess, token: str) -> None:
        self.env = dict(
            os.environ,
            AEGIS_RELAY=relay.address,
            AEGIS_CA_CERT=str(relay.info["ca_cert"]),
            AEGIS_OPERATOR_TOKEN=token,
            GRPC_VERBOSITY="ERROR",
        )

    async def run(self, *args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aegis_edge_cli",
            *args,
            cwd=REPO,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def ok(self, *args: str) -> str:
        code, out, err = await self.run(*args)
        assert code == 0, f"aegis {' '.join(args)} -> {code}\n{out}\n{err}"
        return out

    async def json(self, *args: str) -> Any:
        return json.loads(await self.ok(*args, "--output", "json"))

    async def fails(self, *args: str) -> str:
        """Run a command that must fail: non-zero, nothing on stdout, the error on stderr."""
        code, out, err = await self.run(*args)
        assert code != 0, f"aegis {' '.join(args)} succeeded:\n{out}"
        assert out == "" and err.startswith("aegis: "), (out, err)
        return err


def test_groups_end_to_end(tmp_path: Path) -> None:
    relay = RelayProcess.start(tmp_path / "relay")
    try:
        asyncio.run(_scenario(relay))
    finally:
        assert relay.stop() == 0
    text = (tmp_path / "relay" / "stderr.log").read_text()
    events = [json.loads(line).get("event") for line in text.splitlines() if line.startswith("{")]
    assert events.count("group.created") == 2 and events.count("group.deleted") == 2
    assert "eyJ" not in text  # no token in the logs


async def _scenario(relay: RelayProcess) -> None:
    a_op = Cli(relay, relay.operator_token(A, "operator"))
    a_viewer = Cli(relay, relay.operator_token(A, "viewer"))
    b_op = Cli(relay, relay.operator_token(B, "operator"))
    root = Cli(relay, relay.admin_token)
    async with relay.channel() as channel:
        admin = relay.admin(channel)
        web1, web2, pinned, offline = [
            await enrolled(relay, channel, A, tools=["edge.ping"]) for _ in range(4)
        ]
        b_web = await enrolled(relay, channel, B, tools=["edge.ping"])
        online: list[DaemonDriver] = [web1, web2, pinned, b_web]
        for d in online:
            assert isinstance(await d.connect(), SessionAccepted)
        for d in (web1, web2, b_web):
            await admin.AddTags(
                admin_pb2.TagsRequest(node_id=d.node_id, tags=["web"]), metadata=relay.auth()
            )

        # --- create: members = tags=web of tenant A, plus the pinned nodes, any status
        created = await a_op.json(
            "edge", "groups", "create", "web", "--target", "tags=web",
            "--pin", pinned.node_id, "--pin", offline.node_id,
        )  # fmt: skip
        assert created["tenant_id"] == A and created["selector"] == "tags=web"
        assert created["pinned"] == sorted([pinned.node_id, offline.node_id])
        assert created["members"] == sorted(d.node_id for d in (web1, web2, pinned, offline))
        assert b_web.node_id not in created["members"]  # B's tags=web daemon: never A's member

        err = await a_op.fails("edge", "groups", "create", "web", "--target", "all")
        assert "ALREADY_EXISTS" not in err and "already exists in tenant 'grp-a'" in err
        err = await a_op.fails("edge", "groups", "create", "Web", "--target", "all")
        assert "lower case" in err
        err = await a_op.fails("edge", "groups", "create", "nested", "--target", "group=web")
        assert "cannot name another group" in err
        # The relay refuses nesting too, for a client that skips the CLI's check.
        with pytest.raises(grpc.aio.AioRpcError) as nested:
            await admin.CreateGroup(
                admin_pb2.CreateGroupRequest(name="nested", tenant_id=A, selector="group=web"),
                metadata=relay.auth(),
            )
        assert nested.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cannot name another group" in (nested.value.details() or "")
        err = await a_op.fails(
            "edge", "groups", "create", "pin-b", "--target", "all", "--pin", b_web.node_id
        )
        assert f"aegis: pinned daemon '{b_web.node_id}' not found in tenant 'grp-a'" in err
        err = await a_viewer.fails("edge", "groups", "create", "v", "--target", "all")
        assert "PERMISSION_DENIED" not in err and "operator role" in err
        # B has a web group of its own.
        await b_op.ok("edge", "groups", "create", "web", "--target", "all")

        # --- ls and show: each tenant sees its own
        listed = await a_viewer.json("edge", "groups", "ls")
        assert [(g["tenant_id"], g["name"]) for g in listed] == [(A, "web")]  # nothing written
        assert [(g["tenant_id"], g["name"]) for g in await b_op.json("edge", "groups", "ls")] == [
            (B, "web")
        ]
        table = await a_viewer.ok("edge", "groups", "ls")
        assert "web" in table and "tags=web" in table
        shown = await a_viewer.json("edge", "groups", "show", "web")
        assert shown["members"] == created["members"] and shown["missing"] == []
        detail = await a_viewer.ok("edge", "groups", "show", "web")
        assert "Members now:" in detail and pinned.node_id in detail
        hosts = await a_viewer.json("edge", "ls", "--target", "group=web")
        assert sorted(h["node_id"] for h in hosts) == created["members"]

        # --- preview and run by group
        preview = await a_op.json(
            "edge", "fleet", "preview", "--target", "group=web", "--tool", "edge.ping"
        )
        assert preview["targets"] == sorted(d.node_id for d in (web1, web2, pinned))
        assert preview["skipped"] == [{"node_id": offline.node_id, "reason": "disconnected"}]
        err = await a_op.fails(
            "edge", "fleet", "preview", "--target", "os=linux group=wbe", "--tool", "edge.ping"
        )
        assert "selector column 16: unknown group 'wbe'" in err and "group=web" in err
        assert len(err.splitlines()) == 1  # one line, as every relay refusal

        before = {d.node_id: len(d.commands) for d in online}
        run = await a_op.json(
            "edge", "fleet", "run", "--target", "group=web", "--tool", "edge.ping"
        )
        assert run["outcome"] == "completed"
        assert run["selector"] == "group=web"
        assert sorted(t["node_id"] for t in run["targets"]) == preview["targets"]
        assert run["skipped"] == preview["skipped"]
        assert {d.node_id: len(d.commands) - before[d.node_id] for d in online} == {
            web1.node_id: 1,
            web2.node_id: 1,
            pinned.node_id: 1,
            b_web.node_id: 0,
        }

        # --- an all-tenants token: web is ambiguous until the tenant is named
        err = await root.fails(
            "edge", "fleet", "preview", "--target", "group=web", "--tool", "edge.ping"
        )
        assert "more than one tenant (grp-a, grp-b)" in err and "--tenant" in err
        err = await root.fails("edge", "groups", "show", "web")
        assert "exists in tenants grp-a, grp-b" in err
        as_b = await root.json(
            "edge", "fleet", "preview", "--target", "group=web", "--tool", "edge.ping",
            "--tenant", B,
        )  # fmt: skip
        assert as_b["targets"] == [b_web.node_id]

        # --- rm: a viewer cannot; B's rm leaves A's web alone
        err = await a_viewer.fails("edge", "groups", "rm", "web")
        assert "PERMISSION_DENIED" not in err and "operator role" in err
        assert [g["name"] for g in await a_viewer.json("edge", "groups", "ls")] == ["web"]
        assert "removed group web from tenant grp-b" in await b_op.ok("edge", "groups", "rm", "web")
        assert [g["tenant_id"] for g in await root.json("edge", "groups", "ls")] == [A]
        # Now unambiguous: the all-tenants token resolves A's web without --tenant.
        only_a = await root.json(
            "edge", "fleet", "preview", "--target", "group=web", "--tool", "edge.ping"
        )
        assert only_a["targets"] == preview["targets"]
        await a_op.ok("edge", "groups", "rm", "web")
        err = await a_viewer.fails("edge", "groups", "show", "web")
        assert "aegis: group 'web' not found" in err
        assert await a_viewer.json("edge", "groups", "ls") == []
        err = await a_op.fails(
            "edge", "fleet", "run", "--target", "group=web", "--tool", "edge.ping"
        )
        assert "unknown group 'web'" in err

        for d in online:
            await d.close()
