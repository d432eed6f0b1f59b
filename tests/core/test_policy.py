"""Tool policy: defaults, cmd.run patterns, named rules, and narrowing that never widens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis_edge_core.errors import ConfigError
from aegis_edge_core.policy import (
    DEFAULT_ALLOWED_TOOLS,
    Decision,
    ToolPolicy,
    ToolRestriction,
    command_text,
)

UPGRADE = "/opt/aegis/upgrade.sh && systemctl --user restart aegis-edge.service"


def test_default_allows_builtins_but_not_cmd_run() -> None:
    p = ToolPolicy()
    assert p.allow == DEFAULT_ALLOWED_TOOLS == ("sys.info", "edge.ping", "keys.rotate")
    for tool in ("sys.info", "edge.ping", "keys.rotate"):
        d = p.evaluate(tool, {})
        assert d == Decision(allowed=True, rule=f"tools.allow: {tool}", reason=f"{tool} is listed")
    d = p.evaluate("cmd.run", {"cmd": "uptime"})
    assert not d.allowed
    assert d.rule == "tools.allow"
    assert "cmd.run is off" in d.reason
    assert not p.allows_tool("cmd.run")


def test_unknown_tool_denied_naming_the_key() -> None:
    d = ToolPolicy().evaluate("acme.deploy", {})
    assert d == Decision(
        allowed=False, rule="tools.allow", reason="tool 'acme.deploy' is not in tools.allow"
    )
    assert not ToolPolicy().evaluate("", {}).allowed


def test_globs_allow_plugins_but_never_enable_cmd_run() -> None:
    p = ToolPolicy(allow=["*"])
    assert p.evaluate("acme.deploy", {}).rule == "tools.allow: *"
    assert not p.evaluate("cmd.run", {"cmd": "ls"}).allowed
    p = ToolPolicy(allow=["acme.*", "cmd.run"])
    assert p.evaluate("acme.deploy").allowed
    assert p.evaluate("cmd.run", {"cmd": "ls"}).allowed


def test_enabled_cmd_run_without_patterns_allows_any_command() -> None:
    p = ToolPolicy(allow=["cmd.run"])
    d = p.evaluate("cmd.run", {"cmd": "rm -rf /tmp/x; echo done"})
    assert d.allowed
    assert d.rule == "tools.cmd_run.allow"
    assert "unset" in d.reason
    assert (
        not ToolPolicy(allow=["cmd.run"], cmd_run_allow=[])
        .evaluate("cmd.run", {"cmd": "ls"})
        .allowed
    )


CMD_POLICY = ToolPolicy(
    allow=["cmd.run"], cmd_run_allow=["uptime", "ls *", "/usr/bin/*", UPGRADE, "echo [!x]"]
)


@pytest.mark.parametrize(
    ("args", "allowed", "rule"),
    [
        ({"cmd": "uptime"}, True, "tools.cmd_run.allow: uptime"),
        ({"cmd": "  uptime -p  "}, True, "tools.cmd_run.allow: uptime"),  # program pattern
        ({"argv": ["uptime", "-p"]}, True, "tools.cmd_run.allow: uptime"),
        ({"argv": ["/bin/uptime"]}, False, "tools.cmd_run.allow"),  # no PATH lookup
        ({"cmd": "ls -la /tmp"}, True, "tools.cmd_run.allow: ls *"),
        ({"argv": ["ls", "-la", "/my dir"]}, True, "tools.cmd_run.allow: ls *"),
        ({"cmd": "ls; rm -rf /"}, False, "tools.cmd_run.allow"),
        ({"cmd": "ls $(rm -rf /)"}, False, "tools.cmd_run.allow"),
        ({"cmd": "ls `id`"}, False, "tools.cmd_run.allow"),
        ({"cmd": "ls | sh"}, False, "tools.cmd_run.allow"),
        ({"cmd": "ls\nrm -rf /"}, False, "tools.cmd_run.allow"),
        ({"cmd": "ls > /etc/passwd"}, False, "tools.cmd_run.allow"),
        ({"cmd": "uptime && reboot"}, False, "tools.cmd_run.allow"),
        ({"cmd": "/usr/bin/id -u"}, True, "tools.cmd_run.allow: /usr/bin/*"),
        ({"argv": ["/usr/bin/env", "a;b"]}, True, "tools.cmd_run.allow: /usr/bin/*"),  # no shell
        ({"cmd": UPGRADE}, True, f"tools.cmd_run.allow: {UPGRADE}"),
        ({"cmd": UPGRADE + "; reboot"}, False, "tools.cmd_run.allow"),
        ({"cmd": "echo a"}, True, "tools.cmd_run.allow: echo [!x]"),
        ({"cmd": "echo ;"}, False, "tools.cmd_run.allow"),  # negated class skips metachars
        ({"cmd": "reboot"}, False, "tools.cmd_run.allow"),
        ({}, False, "cmd.run.args"),
        ({"cmd": "ls", "argv": ["ls"]}, False, "cmd.run.args"),
        ({"cmd": ""}, False, "cmd.run.args"),
        ({"cmd": 3}, False, "cmd.run.args"),
        ({"argv": "ls -la"}, False, "cmd.run.args"),
        ({"argv": []}, False, "cmd.run.args"),
        ({"argv": ["ls", 3]}, False, "cmd.run.args"),
    ],
)
def test_cmd_run_patterns(args: dict[str, object], allowed: bool, rule: str) -> None:
    d = CMD_POLICY.evaluate("cmd.run", args)
    assert (d.allowed, d.rule) == (allowed, rule), d.reason
    assert d.reason


def test_denial_explains_metacharacters() -> None:
    d = CMD_POLICY.evaluate("cmd.run", {"cmd": "uptime; reboot"})
    assert "metacharacters" in d.reason


def test_command_text() -> None:
    assert command_text({"cmd": " ls -l "}) == ("ls -l", ["ls", "-l"])
    assert command_text({"cmd": "ls | wc"}) == ("ls | wc", None)
    assert command_text({"cmd": "echo 'unterminated"}) == ("echo 'unterminated", None)
    assert command_text({"argv": ["echo", "a b"]}) == ("echo 'a b'", ["echo", "a b"])
    with pytest.raises(ValueError, match="exactly one"):
        command_text({})


def test_relay_restriction_narrows_and_names_its_rule() -> None:
    local = ToolPolicy(allow=["sys.info", "edge.ping", "cmd.run"], cmd_run_allow=["ls *", "uptime"])
    relay = ToolRestriction(allow=["sys.info", "cmd.run"], cmd_run_allow=["uptime"])
    p = local.narrow(relay)
    assert p.evaluate("sys.info").allowed
    d = p.evaluate("edge.ping")
    assert (d.allowed, d.rule) == (False, "relay.tools.allow")
    d = p.evaluate("cmd.run", {"cmd": "ls -la"})
    assert (d.allowed, d.rule) == (False, "relay.tools.cmd_run.allow")
    d = p.evaluate("cmd.run", {"cmd": "uptime"})
    assert (d.allowed, d.rule) == (True, "tools.cmd_run.allow: uptime")  # local rule decides
    assert p.narrow(None) == p
    assert not p.allows_tool("edge.ping")


def test_relay_cannot_widen() -> None:
    local = ToolPolicy()  # cmd.run off
    p = local.narrow(ToolRestriction(allow=["cmd.run", "acme.*"], cmd_run_allow=["*"]))
    d = p.evaluate("cmd.run", {"cmd": "ls"})
    assert (d.allowed, d.rule) == (False, "tools.allow")
    assert not p.evaluate("acme.deploy").allowed
    # A restriction that leaves a list unset does not restrict it.
    assert ToolPolicy().narrow(ToolRestriction()).evaluate("sys.info").allowed


def test_bad_entries_raise_config_errors_naming_the_path() -> None:
    with pytest.raises(ConfigError) as info:
        ToolPolicy(cmd_run_allow=["ok", "[z-a]"])
    assert info.value.path == "tools.cmd_run.allow[1]"
    with pytest.raises(ConfigError) as info:
        ToolPolicy(allow=["sys.info", "bad name"])
    assert info.value.path == "tools.allow[1]"
    with pytest.raises(ConfigError) as info:
        ToolRestriction(cmd_run_allow=[""])
    assert info.value.path == "relay.tools.cmd_run.allow[0]"
    with pytest.raises(ConfigError, match="string"):
        ToolPolicy(allow="sys.info")
    with pytest.raises(TypeError):
        ToolPolicy().narrow(ToolPolicy())  # type: ignore[arg-type]


tool_names = st.sampled_from(["sys.info", "edge.ping", "keys.rotate", "cmd.run", "acme.x", "a.b"])
patterns = st.sampled_from(["*", "ls *", "uptime", "echo ?", "/usr/bin/*", "ls; *", "[a-z]*", "x"])
commands: st.SearchStrategy[dict[str, object]] = st.one_of(
    st.fixed_dictionaries({"cmd": st.sampled_from(["ls", "ls -l", "ls; id", "uptime", "echo a"])}),
    st.fixed_dictionaries(
        {"argv": st.lists(st.sampled_from(["ls", "/usr/bin/id", "-l", "a;b", "x"]), min_size=1)}
    ),
    st.just({}),
)
tool_lists = st.lists(st.sampled_from(["sys.info", "edge.ping", "cmd.run", "acme.*", "*", "a.b"]))


@settings(max_examples=200, deadline=None)
@given(
    local_allow=tool_lists,
    local_cmds=st.none() | st.lists(patterns),
    relay_allow=st.none() | tool_lists,
    relay_cmds=st.none() | st.lists(patterns),
    tool=tool_names,
    args=commands,
)
def test_narrowing_never_widens(
    local_allow: list[str],
    local_cmds: list[str] | None,
    relay_allow: list[str] | None,
    relay_cmds: list[str] | None,
    tool: str,
    args: dict[str, object],
) -> None:
    local = ToolPolicy(allow=local_allow, cmd_run_allow=local_cmds)
    restriction = ToolRestriction(allow=relay_allow, cmd_run_allow=relay_cmds)
    narrowed = local.narrow(restriction).evaluate(tool, args)
    alone = local.evaluate(tool, args)
    if narrowed.allowed:
        assert alone.allowed
        assert narrowed == alone  # the local rule is the one named
    if not alone.allowed:
        assert narrowed == alone
    # Deterministic.
    assert local.narrow(restriction).evaluate(tool, args) == narrowed
