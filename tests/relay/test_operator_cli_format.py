"""Operator CLI, without a server: formatting, enum names, argument parsing, connection."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from aegis_edge_cli import CliError, CommandTree
from aegis_edge_core.wire import admin_pb2, common_pb2
from aegis_edge_relay import operator as oc

NOW = 1_750_000_000.0


def _tree() -> CommandTree:
    tree = CommandTree()
    oc.register(tree)
    return tree


def _parse(*argv: str) -> argparse.Namespace:
    return _tree().parser.parse_args(list(argv))


def _host(**kw: object) -> admin_pb2.Host:
    host = admin_pb2.Host(
        node_id="node-a",
        tenant_id="acme",
        status=common_pb2.DAEMON_STATUS_CONNECTED,
        last_heartbeat_at=NOW - 12,
        enrolled_at=NOW - 86400,
        connected_since=NOW - 3600,
        key_thumbprint="thumb",
        capabilities=common_pb2.Capabilities(
            os="linux",
            arch="x86_64",
            tools=["sys.info", "cmd.run"],
            labels={"zone": "eu-1", "rack": "r2"},
            tags=["prod", "managed-fleet"],
            hostname="web-1",
            agent_version="0.1.0",
        ),
    )
    for key, value in kw.items():
        setattr(host, key, value)
    return host


# --- enums ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (common_pb2.DAEMON_STATUS_CONNECTED, "Connected"),
        (common_pb2.DAEMON_STATUS_UNHEALTHY, "Unhealthy"),
        (common_pb2.DAEMON_STATUS_DISCONNECTED, "Disconnected"),
        (common_pb2.DAEMON_STATUS_REVOKED, "Revoked"),
        (common_pb2.DAEMON_STATUS_UNSPECIFIED, "Unknown"),
        (99, "Unknown"),
    ],
)
def test_status_names(value: int, name: str) -> None:
    assert oc.status_name(value) == name


def test_target_outcome_names_cover_the_seed_vocabulary() -> None:
    names = {
        oc.target_outcome_name(v)
        for v in common_pb2.TargetOutcome.values()
        if v != common_pb2.TARGET_OUTCOME_UNSPECIFIED
    }
    assert names == {
        "ok",
        "error",
        "timeout",
        "cancelled",
        "denied",
        "edge_disconnected",
        "not_started",
    }
    assert oc.target_outcome_name(0) == "pending"
    assert oc.target_outcome_name(0, dispatched=True) == "running"
    assert oc.target_outcome_name(42, dispatched=True) == "running"


def test_run_outcome_names() -> None:
    names = {oc.run_outcome_name(v) for v in common_pb2.RunOutcome.values()}
    assert names == {
        "unknown",
        "running",
        "completed",
        "completed_with_errors",
        "halted",
        "deadline_exceeded",
        "cancelled",
    }


def test_enum_names_match_the_core_vocabulary() -> None:
    from aegis_edge_core.fleet import outcomes

    assert {oc.status_name(v) for v in (1, 2, 3, 4)} == {s.value for s in outcomes.DaemonStatus}
    assert {oc.target_outcome_name(v) for v in range(1, 8)} == {
        o.value for o in outcomes.TargetOutcome
    }
    assert {oc.run_outcome_name(v) for v in range(2, 7)} == {o.value for o in outcomes.RunOutcome}


# --- times ------------------------------------------------------------------------------------


def test_iso_time() -> None:
    assert oc.iso_time(0) is None
    assert oc.iso_time(float("nan")) is None
    assert oc.iso_time(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"


@pytest.mark.parametrize(
    ("ago", "text"),
    [
        (0, "0s ago"),
        (12, "12s ago"),
        (59.9, "59s ago"),
        (60, "1m ago"),
        (3599, "59m ago"),
        (7200, "2h ago"),
        (86400 * 3 + 5, "3d ago"),
        (-2, "just now"),
        (-600, "in 10m"),
    ],
)
def test_relative_time(ago: float, text: str) -> None:
    assert oc.relative_time(NOW - ago, NOW) == text


def test_relative_time_never() -> None:
    assert oc.relative_time(0, NOW) == "never"


@pytest.mark.parametrize(
    ("secs", "text"), [(0.85, "850ms"), (12.34, "12.3s"), (245, "4m05s"), (7380, "2h03m")]
)
def test_format_duration(secs: float, text: str) -> None:
    assert oc.format_duration(secs) == text


@pytest.mark.parametrize(
    ("text", "secs"),
    [
        ("120s", 120.0),
        ("15m", 900.0),
        ("1.5h", 5400.0),
        ("1h30m", 5400.0),
        ("90", 90.0),
        ("0.5", 0.5),
    ],
)
def test_parse_duration(text: str, secs: float) -> None:
    assert oc.parse_duration_secs(text, flag="--deadline") == pytest.approx(secs)


@pytest.mark.parametrize("text", ["", "soon", "-5s", "0s", "10 parsecs", "1e9s", "2d"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(CliError, match="--deadline"):
        oc.parse_duration_secs(text, flag="--deadline")


# --- hosts ------------------------------------------------------------------------------------


def test_host_to_dict_has_the_contract_fields() -> None:
    d = oc.host_to_dict(_host())
    assert d["node_id"] == "node-a"
    assert d["tenant_id"] == "acme"
    assert d["status"] == "Connected"
    assert d["last_heartbeat_at"] == oc.iso_time(NOW - 12)
    assert d["capabilities"] == {
        "os": "linux",
        "arch": "x86_64",
        "tools": ["cmd.run", "sys.info"],
        "labels": {"rack": "r2", "zone": "eu-1"},
        "tags": ["managed-fleet", "prod"],
        "hostname": "web-1",
        "agent_version": "0.1.0",
    }
    assert "history" not in d
    json.dumps(d)  # plain JSON values only


def test_host_never_heartbeated_is_null() -> None:
    d = oc.host_to_dict(_host(last_heartbeat_at=0.0, status=common_pb2.DAEMON_STATUS_REVOKED))
    assert d["last_heartbeat_at"] is None
    assert d["status"] == "Revoked"


def test_host_history_in_show_json() -> None:
    host = _host()
    host.history.append(
        admin_pb2.CommandRecord(
            command_id="c1",
            fleet_command_id="f1",
            tool="cmd.run",
            outcome=common_pb2.TARGET_OUTCOME_ERROR,
            exit_code=3,
            has_exit_code=True,
            dispatched_at=NOW - 5,
            finished_at=NOW - 4,
            error_message="exit status 3",
        )
    )
    host.history.append(admin_pb2.CommandRecord(command_id="c0", tool="sys.info"))
    hist = oc.host_to_dict(host, with_history=True)["history"]
    assert hist[0]["outcome"] == "error"
    assert hist[0]["exit_code"] == 3
    assert hist[0]["fleet_command_id"] == "f1"
    assert hist[1]["exit_code"] is None
    assert hist[1]["outcome"] == "pending"
    assert hist[1]["fleet_command_id"] is None


def test_host_row() -> None:
    row = oc.host_row(_host(), NOW)
    assert row == [
        "node-a",
        "web-1",
        "acme",
        "Connected",
        "12s ago",
        "linux/x86_64",
        "managed-fleet,prod",
    ]
    assert len(row) == len(oc.HOST_COLUMNS)
    bare = admin_pb2.Host(node_id="n", tenant_id="t")
    assert oc.host_row(bare, NOW) == ["n", "-", "t", "Unknown", "never", "-", "-"]


def test_host_row_says_when_a_connected_host_attested_before_its_first_heartbeat() -> None:
    fresh = _host(last_heartbeat_at=0.0, connected_since=NOW - 3)
    assert oc.host_row(fresh, NOW)[4] == "attested 3s ago"
    gone = _host(
        last_heartbeat_at=0.0, connected_since=NOW - 3, status=common_pb2.DAEMON_STATUS_DISCONNECTED
    )
    assert oc.host_row(gone, NOW)[4] == "never"


# --- fleet runs -------------------------------------------------------------------------------


def _run(outcome: int = common_pb2.RUN_OUTCOME_HALTED) -> admin_pb2.FleetRun:
    return admin_pb2.FleetRun(
        fleet_command_id="fleet-1",
        spec=admin_pb2.FleetRunSpec(
            selector="tags=prod", tool="cmd.run", args_json='{"cmd": "true"}', mode="rolling=5"
        ),
        outcome=outcome,
        created_at=NOW - 60,
        finished_at=NOW,
        created_by="admin",
        halt_reason="stop-after=1 reached",
        targets=[
            admin_pb2.TargetResult(
                node_id="a",
                command_id="c-a",
                outcome=common_pb2.TARGET_OUTCOME_OK,
                exit_code=0,
                has_exit_code=True,
                dispatched_at=NOW - 50,
                finished_at=NOW - 49,
                stdout_tail=b"hello\n",
            ),
            admin_pb2.TargetResult(
                node_id="b",
                command_id="c-b",
                outcome=common_pb2.TARGET_OUTCOME_ERROR,
                exit_code=1,
                has_exit_code=True,
                error_message="exit status 1\nmore",
                dispatched_at=NOW - 50,
                finished_at=NOW - 40,
                stderr_tail=b"\xffboom",
            ),
            admin_pb2.TargetResult(
                node_id="c", outcome=common_pb2.TARGET_OUTCOME_NOT_STARTED, skip_reason="halted"
            ),
        ],
        skipped=[admin_pb2.SkippedTarget(node_id="d", reason="disconnected")],
    )


def test_fleet_run_to_dict() -> None:
    d = oc.fleet_run_to_dict(_run())
    assert d["fleet_command_id"] == "fleet-1"
    assert d["outcome"] == "halted"
    assert d["spec"]["args"] == {"cmd": "true"}
    assert d["spec"]["mode"] == "rolling=5"
    assert d["spec"]["on_error"] == "continue"
    assert [t["node_id"] for t in d["targets"]] == ["a", "b", "c"]
    assert d["targets"][0]["exit_code"] == 0
    assert d["targets"][0]["outcome"] == "ok"
    assert d["targets"][0]["stdout_tail"] == "hello\n"
    assert d["targets"][0]["duration_secs"] == pytest.approx(1.0)
    assert d["targets"][1]["stderr_tail"] == "\ufffdboom"
    assert d["targets"][2]["outcome"] == "not_started"
    assert d["targets"][2]["exit_code"] is None
    assert d["targets"][2]["skip_reason"] == "halted"
    assert d["skipped"] == [{"node_id": "d", "reason": "disconnected"}]
    assert d["counts"] == {"error": 1, "not_started": 1, "ok": 1}
    json.dumps(d)


def test_fleet_run_summary() -> None:
    assert oc.fleet_run_summary(_run()) == "halted: 1 error, 1 not_started, 1 ok; 1 skipped"
    empty = admin_pb2.FleetRun(outcome=common_pb2.RUN_OUTCOME_COMPLETED)
    assert oc.fleet_run_summary(empty) == "completed: no targets"


def test_target_row() -> None:
    rows = [oc.target_row(t) for t in _run().targets]
    assert rows[0] == ["a", "ok", "0", "1.0s", "hello", ""]
    assert rows[1][:4] == ["b", "error", "1", "10.0s"] and rows[1][5] == "exit status 1"
    assert rows[2] == ["c", "not_started", "-", "-", "", "skipped: halted"]


def test_results_in_json_and_tables() -> None:
    info = {"os": "linux", "hostname": "web-1", "load": [0.5, 0.25], "agent_version": "1.0"}
    res = admin_pb2.TargetResult(
        node_id="a",
        outcome=common_pb2.TARGET_OUTCOME_OK,
        dispatched_at=NOW - 2,
        finished_at=NOW - 1,
        result_json=json.dumps(info, indent=2),
    )
    assert oc.target_result_to_dict(res)["result"] == info
    assert oc.target_result_to_dict(admin_pb2.TargetResult(node_id="b"))["result"] is None
    # Not JSON after all: kept as the string it is, never dropped.
    assert oc.result_value("not json") == "not json"
    compact = oc.compact_result(res.result_json)
    assert compact == json.dumps(info, separators=(",", ":"))
    cell = oc.compact_result(res.result_json, oc.RESULT_WIDTH)
    assert len(cell) == oc.RESULT_WIDTH and cell.endswith("…") and compact.startswith(cell[:-1])
    row = oc.target_row(res, with_result=True)
    assert row[5] == cell and len(row) == len(oc.TARGET_COLUMNS) + 1
    rec = admin_pb2.CommandRecord(command_id="c", tool="sys.info", result_json='{"a":1}')
    assert oc.command_record_to_dict(rec)["result"] == {"a": 1}


def test_deadline_ended_target_in_json() -> None:
    res = admin_pb2.TargetResult(
        node_id="a", outcome=common_pb2.TARGET_OUTCOME_TIMEOUT, ended_by="deadline"
    )
    assert oc.target_result_to_dict(res)["ended_by"] == "deadline"
    assert oc.target_result_to_dict(admin_pb2.TargetResult(node_id="b"))["ended_by"] is None


def test_a_listed_run_without_targets_omits_the_key_and_keeps_counts() -> None:
    run = _run()
    del run.targets[:]
    run.targets_omitted = True
    run.counts["ok"] = 1
    run.counts["error"] = 2
    d = oc.fleet_run_to_dict(run)
    assert "targets" not in d
    assert d["counts"] == {"error": 2, "ok": 1}
    assert oc.fleet_run_summary(run).startswith("halted: 2 error, 1 ok")
    # A full run's list is complete, even when empty.
    assert oc.fleet_run_to_dict(admin_pb2.FleetRun())["targets"] == []


def test_last_output_line_prefers_stdout_and_caps_width() -> None:
    res = admin_pb2.TargetResult(stdout_tail=b"one\ntwo\n\n", stderr_tail=b"warn\n")
    assert oc.last_output_line(res) == "two"
    assert oc.last_output_line(admin_pb2.TargetResult(stderr_tail=b"boom\n")) == "boom"
    assert oc.last_output_line(admin_pb2.TargetResult(stdout_tail=b"x" * 100)) == "x" * 59 + "…"


def test_preview_to_dict() -> None:
    preview = admin_pb2.FleetPreview(
        targets=["a", "b"],
        skipped=[admin_pb2.SkippedTarget(node_id="c", reason="tool_unavailable")],
        matched=3,
        selector="tags=prod",
    )
    assert oc.fleet_preview_to_dict(preview) == {
        "selector": "tags=prod",
        "matched": 3,
        "targets": ["a", "b"],
        "skipped": [{"node_id": "c", "reason": "tool_unavailable"}],
    }


# --- fleet arguments --------------------------------------------------------------------------


def test_arg_splits_on_the_first_equals_only() -> None:
    cmd = "/opt/aegis/upgrade.sh && systemctl --user restart aegis-edge.service"
    assert oc.parse_arg_pairs([f"cmd={cmd}"]) == {"cmd": cmd}
    assert oc.parse_arg_pairs(["env=A=B=C", "empty="]) == {"env": "A=B=C", "empty": ""}


def test_arg_json_values() -> None:
    got = oc.parse_arg_pairs(["cwd=/tmp"], ['argv=["ls", "-l"]', "timeout=30"])
    assert got == {"cwd": "/tmp", "argv": ["ls", "-l"], "timeout": 30}


@pytest.mark.parametrize(
    ("pairs", "json_pairs", "match"),
    [
        (["novalue"], [], "KEY=VALUE"),
        (["=x"], [], "KEY=VALUE"),
        (["a=1", "a=2"], [], "given twice"),
        ([], ["a={"], "not valid JSON"),
        (["a=1"], ["a=2"], "given twice"),
    ],
)
def test_arg_errors(pairs: list[str], json_pairs: list[str], match: str) -> None:
    with pytest.raises(CliError, match=match):
        oc.parse_arg_pairs(pairs, json_pairs)


def test_seed_fleet_run_command_line_builds_the_spec() -> None:
    args = _parse(
        "edge",
        "fleet",
        "run",
        "--target",
        "tags=managed-fleet",
        "--tool",
        "cmd.run",
        "--arg",
        "cmd=/opt/aegis/upgrade.sh && systemctl --user restart aegis-edge.service",
        "--mode",
        "rolling=5",
        "--on-error",
        "stop-after=1",
        "--deadline",
        "120s",
    )
    spec = oc.build_fleet_spec(args)
    assert spec.selector == "tags=managed-fleet"
    assert spec.tool == "cmd.run"
    assert json.loads(spec.args_json) == {
        "cmd": "/opt/aegis/upgrade.sh && systemctl --user restart aegis-edge.service"
    }
    assert spec.mode == "rolling=5"
    assert spec.on_error == "stop-after=1"
    assert spec.deadline_secs == 120.0
    assert spec.canary == 0
    assert spec.tenant_id == ""


def test_seed_fleet_keys_rotate_command_line() -> None:
    args = _parse(
        "edge",
        "fleet",
        "keys",
        "rotate",
        "--target",
        "tags=AnyOf(potentially-affected,prod)",
        "--mode",
        "rolling=10",
        "--on-error",
        "continue",
    )
    spec = oc.build_fleet_spec(args, tool="keys.rotate")
    assert spec.tool == "keys.rotate"
    assert spec.selector == "tags=AnyOf(potentially-affected,prod)"
    assert spec.mode == "rolling=10"
    assert spec.args_json == ""
    assert spec.deadline_secs == 0


def test_args_json_merges_with_arg() -> None:
    args = _parse(
        "edge", "fleet", "run", "--target", "all", "--tool", "cmd.run",
        "--args-json", '{"cwd": "/tmp"}', "--arg", "cmd=ls", "--canary", "2",
        "--tenant", "acme",
    )  # fmt: skip
    spec = oc.build_fleet_spec(args)
    assert json.loads(spec.args_json) == {"cwd": "/tmp", "cmd": "ls"}
    assert spec.canary == 2
    assert spec.tenant_id == "acme"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--mode", "rolling=0"], "--mode"),
        (["--mode", "parallel"], "--mode"),
        (["--mode", "rolling=150%"], "--mode"),
        (["--on-error", "stop-after=0"], "--on-error"),
        (["--on-error", "ignore"], "--on-error"),
        (["--deadline", "soon"], "--deadline"),
        (["--args-json", "[1, 2]"], "--args-json"),
        (["--args-json", "{"], "--args-json"),
    ],
)
def test_fleet_flags_are_validated_locally(extra: list[str], match: str) -> None:
    args = _parse("edge", "fleet", "run", "--target", "all", "--tool", "edge.ping", *extra)
    with pytest.raises(CliError, match=match):
        oc.build_fleet_spec(args)


@pytest.mark.parametrize("mode", ["all", "sequential", "rolling=1", "rolling=10%", "rolling=100%"])
def test_good_modes(mode: str) -> None:
    oc.validate_mode(mode)


@pytest.mark.parametrize("policy", ["continue", "fail-fast", "stop-after=3"])
def test_good_on_error(policy: str) -> None:
    oc.validate_on_error(policy)


def test_bad_selector_points_at_the_column() -> None:
    with pytest.raises(CliError) as info:
        oc.validate_selector("tags=prod tagz=x")
    text = str(info.value)
    assert text.startswith("--target: selector column 11")
    lines = text.splitlines()
    assert lines[-1].index("^") == lines[-2].index("tagz")


def test_empty_selector() -> None:
    with pytest.raises(CliError, match="write 'all'"):
        oc.validate_selector("  ")


def test_argparse_refuses_negative_canary_and_limit() -> None:
    with pytest.raises(SystemExit):
        _parse("edge", "fleet", "run", "--target", "all", "--tool", "x", "--canary", "-1")
    with pytest.raises(SystemExit):
        _parse("edge", "fleet", "runs", "--limit", "x")


def test_registered_commands() -> None:
    tree = _tree()
    for argv in (
        ["edge", "ls"],
        ["edge", "show", "n"],
        ["edge", "tag", "add", "n", "t"],
        ["edge", "tag", "rm", "n", "t", "u"],
        ["edge", "keys", "revoke-remote", "n", "--reason", "leak"],
        ["edge", "tenants", "delete", "acme", "--yes"],
        ["edge", "tokens", "issue", "--tenant", "acme", "--ttl", "15m"],
        ["edge", "fleet", "preview", "--target", "all", "--tool", "edge.ping"],
        ["edge", "fleet", "run", "--target", "all", "--tool", "edge.ping"],
        ["edge", "fleet", "runs", "--limit", "5", "-o", "json"],
        ["edge", "fleet", "show", "f1"],
        ["edge", "fleet", "cancel", "f1"],
        ["edge", "fleet", "watch", "f1", "--tls-server-name", "relay.internal"],
        ["edge", "fleet", "keys", "rotate", "--target", "all"],
    ):
        args = tree.parser.parse_args(argv)
        assert callable(args._handler), argv


# --- connection settings ----------------------------------------------------------------------


def _conn_args(**kw: str | None) -> argparse.Namespace:
    return argparse.Namespace(**{"relay": None, "ca_cert": None, "token": None, **kw})


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    return path


def test_connection_from_flags(ca_file: Path) -> None:
    conn = oc.resolve_connection(
        _conn_args(relay="127.0.0.1:7443", ca_cert=str(ca_file), token="tok"), environ={}
    )
    assert conn.relay == "127.0.0.1:7443"
    assert conn.ca_pem.startswith(b"-----BEGIN CERTIFICATE-----")
    assert conn.metadata == (("authorization", "Bearer tok"),)


def test_connection_from_env_and_token_file(ca_file: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "operator.token"
    token_file.write_text("  tok-from-file\n")
    env = {
        oc.ENV_RELAY: "relay.example.com:443",
        oc.ENV_CA_CERT: str(ca_file),
        oc.ENV_TOKEN: f"@{token_file}",
    }
    conn = oc.resolve_connection(_conn_args(), environ=env)
    assert conn.relay == "relay.example.com:443"
    assert conn.token == "tok-from-file"


def test_flags_win_over_env(ca_file: Path) -> None:
    env = {oc.ENV_RELAY: "a:1", oc.ENV_CA_CERT: "/nope", oc.ENV_TOKEN: "env"}
    conn = oc.resolve_connection(
        _conn_args(relay="b:2", ca_cert=str(ca_file), token="flag"), environ=env
    )
    assert (conn.relay, conn.token) == ("b:2", "flag")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({}, r"no relay address: pass --relay HOST:PORT or set AEGIS_RELAY"),
        ({"relay": "r:1"}, r"no CA certificate: pass --ca-cert PATH or set AEGIS_CA_CERT"),
        ({"relay": "r:1", "ca_cert": "CA"}, r"no operator token: .*--token.*AEGIS_OPERATOR_TOKEN"),
        ({"relay": "nohost", "ca_cert": "CA", "token": "t"}, r"--relay: expected HOST:PORT"),
        ({"relay": "h:99999", "ca_cert": "CA", "token": "t"}, r"--relay: expected HOST:PORT"),
        ({"relay": "h:1", "ca_cert": "/does/not/exist", "token": "t"}, r"--ca-cert: cannot read"),
        ({"relay": "h:1", "ca_cert": "CA", "token": "@/does/not/exist"}, r"--token: cannot read"),
        ({"relay": "h:1", "ca_cert": "CA", "token": "a b"}, r"--token: .*whitespace"),
    ],
)
def test_connection_errors_name_the_flag(ca_file: Path, kw: dict[str, str], match: str) -> None:
    kw = {k: (str(ca_file) if v == "CA" else v) for k, v in kw.items()}
    with pytest.raises(CliError, match=match):
        oc.resolve_connection(_conn_args(**kw), environ={})


def test_ca_that_is_not_pem(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("hello")
    with pytest.raises(CliError, match="not a PEM certificate"):
        oc.resolve_connection(_conn_args(relay="h:1", ca_cert=str(bad), token="t"), environ={})


def test_empty_token_file(ca_file: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    with pytest.raises(CliError, match=r"token file .*empty\.token.* is empty"):
        oc.resolve_connection(
            _conn_args(relay="h:1", ca_cert=str(ca_file), token=f"@{empty}"), environ={}
        )


def test_relay_data_dir_fills_gaps_from_env_but_flags_win(ca_file: Path, tmp_path: Path) -> None:
    (tmp_path / "operator.token").write_text("dir-token\n")
    info = {"host": "::", "port": 7443, "tls": True, "ca_cert": str(ca_file)}
    info["operator_token"] = str(tmp_path / "operator.token")
    (tmp_path / "relay.json").write_text(json.dumps(info))
    env = {oc.ENV_RELAY_DATA_DIR: str(tmp_path), oc.ENV_RELAY: "prod:443"}
    conn = oc.resolve_connection(_conn_args(), environ=env)
    assert (conn.relay, conn.token, conn.insecure) == ("prod:443", "dir-token", False)
    conn = oc.resolve_connection(_conn_args(relay_data_dir=str(tmp_path)), environ=env)
    assert conn.relay == "127.0.0.1:7443"
    conn = oc.resolve_connection(
        _conn_args(relay_data_dir=str(tmp_path), token="flag"), environ=env
    )
    assert conn.token == "flag"


def test_plaintext_relay_from_data_dir_or_flag(tmp_path: Path) -> None:
    info = {"host": "127.0.0.1", "port": 7000, "tls": False, "ca_cert": ""}
    (tmp_path / "relay.json").write_text(json.dumps(info))
    conn = oc.resolve_connection(_conn_args(relay_data_dir=str(tmp_path), token="t"), environ={})
    assert conn.insecure
    assert conn.ca_pem == b""
    args = argparse.Namespace(relay="h:1", ca_cert=None, token="t", insecure=True)
    assert oc.resolve_connection(args, environ={}).insecure


def test_missing_relay_json(tmp_path: Path) -> None:
    with pytest.raises(CliError, match=r"--relay-data-dir: cannot read .*relay\.json"):
        oc.resolve_connection(_conn_args(relay_data_dir=str(tmp_path)), environ={})


def test_group_to_dict_and_the_groups_commands_parse() -> None:
    group = admin_pb2.Group(
        name="web", tenant_id="acme", selector="tags=web", pinned=["n-1"], created_at=NOW,
        created_by="alice", members=["n-1", "n-2"], missing=["n-9"],
    )  # fmt: skip
    assert oc.group_to_dict(group) == {
        "name": "web",
        "tenant_id": "acme",
        "selector": "tags=web",
        "pinned": ["n-1"],
        "created_at": oc.iso_time(NOW),
        "created_by": "alice",
    }
    full = oc.group_to_dict(group, with_members=True)
    assert full["members"] == ["n-1", "n-2"] and full["missing"] == ["n-9"]
    args = _parse(
        "edge", "groups", "create", "web", "--target", "tags=web", "--pin", "a", "--pin", "b"
    )
    assert (args.name, args.target, args.pin) == ("web", "tags=web", ["a", "b"])
    assert (
        _parse("edge", "groups", "show", "web", "--tenant", "acme", "-o", "json").output == "json"
    )
    with pytest.raises(SystemExit):
        _parse("edge", "groups", "create", "web")  # --target is required


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("create", "Web", "--target", "all"), "lower case"),
        (("create", "web", "--target", "tagz=x"), "selector column 1"),
        (("create", "web", "--target", "os=linux group=db"), "cannot name another group"),
        (("show", "_web"), "cannot start with '_'"),
        (("rm", "w b"), "' ' is not allowed"),
    ],
)
def test_groups_commands_refuse_bad_input_before_calling_the_relay(
    argv: tuple[str, ...], message: str
) -> None:
    args = _parse("edge", "groups", *argv, "--relay", "127.0.0.1:1", "--insecure", "--token", "t")
    with pytest.raises(CliError) as caught:
        args._handler(args)
    assert message in str(caught.value)
