"""The built-in tools' JSON Schemas: shipped, valid draft 2020-12, and in agreement with
the typed argument checks (what one refuses, the other refuses)."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from aegis_edge_core import tools_spec as ts


@pytest.mark.parametrize("tool", ts.BUILTIN_TOOLS)
@pytest.mark.parametrize("part", ["args", "result"])
def test_every_builtin_tool_ships_both_schemas(tool: str, part: ts.SchemaPart) -> None:
    schema = ts.tool_schema(tool, part)
    assert schema is not None
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"urn:aegis-edge:tool:{tool}:{part}"


def test_plugin_tools_have_no_schema_and_pass_through() -> None:
    assert ts.tool_schema("acme.deploy", "args") is None
    assert ts.validate_args("acme.deploy", {"anything": [1, 2]}) == {"anything": [1, 2]}
    ts.validate_result("acme.deploy", "not even json?")  # not ours to judge


def _schema_ok(tool: str, args: dict[str, Any]) -> bool:
    schema = ts.tool_schema(tool, "args")
    assert schema is not None
    return jsonschema.Draft202012Validator(schema).is_valid(args)


GOOD = [
    ("cmd.run", {"cmd": "echo hi"}),
    ("cmd.run", {"argv": ["/bin/echo", "hi", ""], "cwd": "/tmp", "timeout": 5}),
    ("cmd.run", {"cmd": "x", "timeout": "30s", "env": {"LANG": "C"}}),
    ("cmd.run", {"cmd": "x", "timeout": " 250ms "}),
    ("cmd.run", {"cmd": "x", "timeout": 0.5}),
    ("edge.ping", {}),
    ("edge.ping", {"echo": "x" * 1024}),
    ("sys.info", {}),
    ("keys.rotate", {}),
]

BAD = [
    ("cmd.run", {}, ""),
    ("cmd.run", {"cmd": "x", "argv": ["x"]}, ""),
    ("cmd.run", {"cmd": ""}, "cmd"),
    ("cmd.run", {"cmd": "   "}, "cmd"),
    ("cmd.run", {"cmd": "a\x00b"}, "cmd"),
    ("cmd.run", {"argv": []}, "argv"),
    ("cmd.run", {"argv": [""]}, "argv"),
    ("cmd.run", {"argv": ["ls", 3]}, "argv"),
    ("cmd.run", {"argv": ["ls", "a\x00"]}, "argv"),
    ("cmd.run", {"cmd": "x", "cwd": ""}, "cwd"),
    ("cmd.run", {"cmd": "x", "timeout": -1}, "timeout"),
    ("cmd.run", {"cmd": "x", "timeout": True}, "timeout"),
    ("cmd.run", {"cmd": "x", "timeout": "soon"}, "timeout"),
    ("cmd.run", {"cmd": "x", "env": {"A=B": "c"}}, "env"),
    ("cmd.run", {"cmd": "x", "env": {"A": 1}}, "env"),
    ("cmd.run", {"cmd": "x", "bogus": 1}, ""),
    ("edge.ping", {"echo": 5}, "echo"),
    ("edge.ping", {"echo": "x" * 1025}, "echo"),
    ("edge.ping", {"other": 1}, ""),
    ("sys.info", {"x": 1}, ""),
    ("keys.rotate", {"force": True}, ""),
]


@pytest.mark.parametrize(("tool", "args"), GOOD)
def test_good_arguments_pass_both_checks(tool: str, args: dict[str, Any]) -> None:
    assert _schema_ok(tool, args)
    ts.validate_args(tool, args)


@pytest.mark.parametrize(("tool", "args", "field"), BAD)
def test_bad_arguments_fail_both_checks_naming_the_field(
    tool: str, args: dict[str, Any], field: str
) -> None:
    assert not _schema_ok(tool, args)
    with pytest.raises(ts.ToolArgumentError) as info:
        ts.validate_args(tool, args)
    assert info.value.field == field
    assert str(info.value).startswith(tool)


def test_the_schema_refuses_what_the_typed_check_would_let_through() -> None:
    # float() reads "1e3" and "1_000"; the contract's duration grammar does not
    for timeout in ("1e3", "1_000"):
        with pytest.raises(ts.ToolArgumentError, match="schema") as info:
            ts.validate_args("cmd.run", {"cmd": "x", "timeout": timeout})
        assert info.value.field == "timeout"
        assert timeout not in str(info.value)  # an argument may be secret: never quoted


def test_results_are_checked_against_the_result_schema() -> None:
    ts.validate_result("edge.ping", '{"pong": true, "echo": "", "t": 1.5}')
    ts.validate_result("cmd.run", "")
    ts.validate_result("keys.rotate", '{"key_thumbprint": "' + "A" * 43 + '"}')
    for tool, text in (
        ("edge.ping", '{"pong": false, "echo": "", "t": 1}'),
        ("cmd.run", '{"exit_code": 0}'),
        ("keys.rotate", '{"key_thumbprint": "short"}'),
        ("sys.info", "{}"),
        ("sys.info", "[1"),
    ):
        with pytest.raises(ts.ToolArgumentError):
            ts.validate_result(tool, text)
