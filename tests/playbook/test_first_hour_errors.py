"""The first hour's error messages, each against a real relay: the exact line a person reads.

Each message says what failed and, once, what to do -- chosen by what failed (an operator
token is not fixed by re-enrolling a host), with no gRPC status name in front and no layer
repeating another's prefix.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import pytest

from aegis_edge_core.identity.tokens import TENANT_ID_RULE
from aegis_edge_core.wire import admin_pb2

from .conftest import CLI, Playbook

OPERATOR_TOKEN_ADVICE = (
    "use the admin token the relay wrote to <data-dir>/operator.token, or ask an admin for "
    "one (aegis relay operator-token --data-dir D --tenant T)"
)


def _fails(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0, done.stdout
    assert done.stdout == "", done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr


def test_a_garbage_operator_token_says_how_to_get_an_operator_token(playbook: Playbook) -> None:
    env = dict(playbook.env, AEGIS_OPERATOR_TOKEN="garbage")
    err = _fails(playbook.aegis("edge", "ls", env=env, check=False))
    assert err == (
        "aegis: operator token refused: token is not a JWT (expected three dot-separated "
        f"parts); that is not an operator token; {OPERATOR_TOKEN_ADVICE}\n"
    )
    assert "enroll" not in err


def test_an_empty_enrollment_token_says_it_is_empty(playbook: Playbook, tmp_path: Path) -> None:
    err = _fails(
        playbook.aegis("edge", "enroll", "", "--state-dir", str(tmp_path / "h"), check=False)
    )
    assert err == (
        "aegis: the enrollment token is empty; pass the token "
        "`aegis edge tokens issue --tenant T` printed (was it empty?)\n"
    )
    assert not (tmp_path / "h").exists()  # nothing half-written


def test_a_replayed_enrollment_says_so_once(playbook: Playbook, tmp_path: Path) -> None:
    token = playbook.aegis("edge", "tokens", "issue", "--tenant", "acme").stdout.strip()
    playbook.aegis("edge", "enroll", token, "--state-dir", str(tmp_path / "first"))
    err = _fails(
        playbook.aegis(
            "edge", "enroll", token, "--state-dir", str(tmp_path / "second"), check=False
        )
    )
    assert err == (
        "aegis: this enrollment token was already used; "
        "issue a fresh one with `aegis edge tokens issue`\n"
    )
    assert not (tmp_path / "second" / "node.json").exists()


def test_no_grpc_status_name_leads_a_message(playbook: Playbook) -> None:
    err = _fails(playbook.aegis("edge", "show", "n-nope", check=False))
    assert err == "aegis: daemon 'n-nope' not found\n"


def test_an_unknown_tool_is_named_with_the_tools_that_exist(playbook: Playbook) -> None:
    host, _ = playbook.host("typo")
    err = _fails(
        playbook.aegis(
            "edge", "fleet", "run", "--target", f"node={host.node_id}", "--tool", "cmd.rnu",
            check=False,
        )
    )  # fmt: skip
    assert err == (
        f"aegis: no daemon that selector 'node={host.node_id}' matches offers a tool named "
        "'cmd.rnu' (they offer cmd.run, edge.ping, keys.rotate, sys.info; "
        "did you mean cmd.run?)\n"
    )
    # Refused before anything was dispatched: the run never existed.
    assert playbook.json("edge", "show", host.node_id)["history"] == []


def test_a_wrong_flag_gets_did_you_mean(playbook: Playbook) -> None:
    done = playbook.aegis("edge", "ls", "--tagret", "all", check=False)
    assert done.returncode == 2
    assert done.stderr == (
        "aegis edge ls: error: unrecognized arguments: --tagret all "
        "(did you mean '--target'?) (see 'aegis edge ls --help')\n"
    )
    done = playbook.aegis("edge", "fleet", "rnu", check=False)
    assert done.returncode == 2
    assert "invalid choice: 'rnu'" in done.stderr
    assert done.stderr.endswith("(did you mean 'run'?) (see 'aegis edge fleet --help')\n")


def test_a_tenant_id_outside_the_charset_is_refused_with_the_rule(playbook: Playbook) -> None:
    err = _fails(playbook.aegis("edge", "tokens", "issue", "--tenant", "bad tenant!", check=False))
    assert err == f"aegis: --tenant: tenant id 'bad tenant!' is not allowed; {TENANT_ID_RULE}\n"
    # The relay holds the same rule for callers that skip the CLI: no token comes back.
    stub, metadata = playbook.relay.admin()
    with pytest.raises(grpc.RpcError) as info:
        stub.IssueEnrollmentToken(
            admin_pb2.IssueEnrollmentTokenRequest(tenant_id="bad tenant!"),
            metadata=metadata,
            timeout=10,
        )
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert TENANT_ID_RULE in (info.value.details() or "")


def test_group_help_says_what_each_group_does(playbook: Playbook) -> None:
    out = playbook.aegis("edge", "--help").stdout
    assert " commands\n" not in out
    assert "issue single-use enrollment tokens for a tenant" in out
    assert "add or remove the operator tags fleet selectors match" in out


def test_a_reader_that_closes_the_pipe_early_gets_no_traceback(playbook: Playbook) -> None:
    host, _ = playbook.host("piped")
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` having exited: the first write gets EPIPE
    try:
        done = subprocess.run(
            [*CLI, "edge", "show", host.node_id],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=playbook.env,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == 141
