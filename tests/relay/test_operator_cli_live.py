"""The operator CLI's side of live output, secret arguments and rerun (no server)."""

from __future__ import annotations

import argparse
import json

import pytest

from aegis_edge_cli import CliError, CommandTree
from aegis_edge_core.wire import admin_pb2
from aegis_edge_relay import operator as oc


def _parse(*argv: str) -> argparse.Namespace:
    tree = CommandTree()
    oc.register(tree)
    return tree.parser.parse_args(list(argv))


def test_secret_args_go_apart_and_never_into_errors() -> None:
    args = _parse(
        "edge", "fleet", "run", "--target", "all", "--tool", "cmd.run",
        "--arg", "cwd=/srv", "--secret-arg", "cmd=deploy --token s3cr3t",
    )  # fmt: skip
    spec = oc.build_fleet_spec(args)
    assert json.loads(spec.args_json) == {"cwd": "/srv"}
    assert json.loads(spec.secret_args_json) == {"cmd": "deploy --token s3cr3t"}
    for bad, match in (
        (["--secret-arg", "novalue-s3cr3t"], "expected KEY=VALUE"),
        (["--secret-arg", "k=s3cr3t", "--secret-arg", "k=s3cr3t2"], "'k' given twice"),
        (["--arg", "k=v", "--secret-arg", "k=s3cr3t"], "also given as a plain argument"),
    ):
        args = _parse("edge", "fleet", "run", "--target", "all", "--tool", "cmd.run", *bad)
        with pytest.raises(CliError, match=match) as info:
            oc.build_fleet_spec(args)
        assert "s3cr3t" not in str(info.value)


def test_run_dict_shows_secret_names_only_and_rerun_of() -> None:
    run = admin_pb2.FleetRun(
        fleet_command_id="f-2",
        rerun_of="f-1",
        spec=admin_pb2.FleetRunSpec(
            tool="cmd.run", args_json='{"cwd": "/srv"}', secret_keys=["cmd"]
        ),
    )
    d = oc.fleet_run_to_dict(run)
    assert d["rerun_of"] == "f-1"
    assert d["spec"]["args"] == {"cmd": "<secret>", "cwd": "/srv"}
    assert d["spec"]["secret_args"] == ["cmd"]
    assert oc.fleet_run_to_dict(admin_pb2.FleetRun(fleet_command_id="f-3"))["rerun_of"] is None


def test_rerun_and_follow_flags() -> None:
    args = _parse("edge", "fleet", "rerun", "f-1", "--only", "failed", "--secret-arg", "k=v")
    assert (args.only, args.secret_arg, args.follow) == ("failed", ["k=v"], None)
    assert _parse("edge", "fleet", "run", "--target", "all", "--tool", "x", "--follow").follow
    assert _parse("edge", "fleet", "watch", "f-1", "--no-follow").follow is False
    with pytest.raises(SystemExit):
        _parse("edge", "fleet", "rerun", "f-1", "--only", "broken")
    with pytest.raises(SystemExit):
        _parse("edge", "fleet", "watch", "f-1", "--follow", "--no-follow")


def test_live_output_prefixes_lines_and_shows_drops(capsys: pytest.CaptureFixture[str]) -> None:
    printer = oc._LiveOutput(json_mode=False)
    chunk = admin_pb2.TargetOutput(node_id="n-1", host="web-1", stdout=b"one\ntw")
    printer.output(chunk)  # not enabled yet (before `started`): nothing
    printer.enabled = True
    printer.output(chunk)
    printer.output(admin_pb2.TargetOutput(node_id="n-1", host="web-1", dropped_bytes=99))
    printer.output(admin_pb2.TargetOutput(node_id="n-2", stderr=b"oops\n"))
    printer.target_done("n-1")
    out, err = capsys.readouterr()
    assert out.splitlines() == ["web-1: one", "web-1: tw", "web-1: [99 bytes of output dropped]"]
    assert err.splitlines() == ["n-2: oops"]
