"""Tool policy: defaults, cmd.run patterns, named rules, and narrowing that never widens."""

from __future__ import annotations

import re
import shlex

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis_edge_core.errors import ConfigError
from aegis_edge_core.policy import (
    DEFAULT_ALLOWED_TOOLS,
    Decision,
    ExecPlan,
    ShellCommand,
    ToolPolicy,
    ToolRestriction,
    child_environment,
    is_risky_env,
    split_shell,
)
from tests.core.fake_paths import PATHS, PROGRAMS, fake_paths

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
    assert not p.evaluate("cmd.run", {"cmd": "ls"}, paths=PATHS).allowed
    p = ToolPolicy(allow=["acme.*", "cmd.run"])
    assert p.evaluate("acme.deploy").allowed
    assert p.evaluate("cmd.run", {"cmd": "ls"}, paths=PATHS).allowed


def test_enabled_cmd_run_without_patterns_allows_any_command() -> None:
    p = ToolPolicy(allow=["cmd.run"])
    d = p.evaluate("cmd.run", {"cmd": "rm -rf /tmp/x; echo done"}, paths=PATHS)
    assert d.allowed
    assert d.rule == "tools.cmd_run.allow"
    assert "unset" in d.reason
    assert (
        not ToolPolicy(allow=["cmd.run"], cmd_run_allow=[])
        .evaluate("cmd.run", {"cmd": "ls"}, paths=PATHS)
        .allowed
    )


CMD_POLICY = ToolPolicy(
    allow=["cmd.run"], cmd_run_allow=["uptime", "ls *", "/usr/bin/*", UPGRADE, "echo [!x]"]
)


@pytest.mark.parametrize(
    ("args", "allowed", "rule"),
    [
        ({"cmd": "uptime"}, True, "tools.cmd_run.allow: uptime"),
        # A program-only pattern allows no arguments (it used to allow any).
        ({"cmd": "  uptime -p  "}, False, "tools.cmd_run.allow"),
        ({"argv": ["uptime", "-p"]}, False, "tools.cmd_run.allow"),
        # The program that runs is compared, not the text: /bin/uptime is the same file.
        ({"argv": ["/bin/uptime"]}, True, "tools.cmd_run.allow: uptime"),
        ({"cmd": "/usr/bin/uptime"}, True, "tools.cmd_run.allow: uptime"),
        ({"cmd": "ls"}, True, "tools.cmd_run.allow: ls *"),  # a trailing * is zero or more
        ({"cmd": "ls -la /tmp"}, True, "tools.cmd_run.allow: ls *"),
        ({"argv": ["ls", "-la", "/my dir"]}, True, "tools.cmd_run.allow: ls *"),
        ({"cmd": "ls 'a;b'"}, True, "tools.cmd_run.allow: ls *"),  # a quoted ';' is a word
        ({"cmd": "ls; rm -rf /"}, False, "tools.cmd_run.allow"),
        ({"cmd": "ls $(rm -rf /)"}, False, "tools.cmd_run.allow"),
        ({"cmd": "ls '$(rm -rf /)'"}, False, "tools.cmd_run.allow"),  # refused even quoted
        ({"cmd": "ls `id`"}, False, "tools.cmd_run.allow"),
        ({"cmd": "ls | sh"}, False, "tools.cmd_run.allow"),
        ({"cmd": "ls\nrm -rf /"}, False, "tools.cmd_run.allow"),
        ({"cmd": "ls\rrm -rf /"}, False, "tools.cmd_run.allow"),
        ({"cmd": "ls > /etc/passwd"}, False, "tools.cmd_run.allow"),
        ({"cmd": "ls < /etc/shadow"}, False, "tools.cmd_run.allow"),
        ({"cmd": "ls & rm -rf /"}, False, "tools.cmd_run.allow"),
        ({"cmd": "(ls)"}, False, "tools.cmd_run.allow"),
        ({"cmd": "PATH=/tmp ls"}, False, "tools.cmd_run.allow"),
        ({"cmd": "l? -l"}, False, "tools.cmd_run.allow"),
        ({"cmd": "uptime && reboot"}, False, "tools.cmd_run.allow"),
        ({"cmd": "/usr/bin/id"}, True, "tools.cmd_run.allow: /usr/bin/*"),
        ({"cmd": "/bin/id"}, True, "tools.cmd_run.allow: /usr/bin/*"),
        ({"cmd": "/usr/bin/id -u"}, False, "tools.cmd_run.allow"),  # no arguments allowed
        ({"argv": ["/usr/bin/env", "a;b"]}, False, "tools.cmd_run.allow"),
        ({"cmd": UPGRADE}, True, f"tools.cmd_run.allow: {UPGRADE}"),
        ({"cmd": UPGRADE.replace("&&", "||")}, False, "tools.cmd_run.allow"),
        ({"cmd": UPGRADE + "; reboot"}, False, "tools.cmd_run.allow"),
        ({"argv": UPGRADE.split()}, False, "tools.cmd_run.allow"),  # argv has no operators
        ({"cmd": "echo a"}, True, "tools.cmd_run.allow: echo [!x]"),
        ({"cmd": "echo x"}, False, "tools.cmd_run.allow"),
        ({"cmd": "echo ;"}, False, "tools.cmd_run.allow"),
        ({"cmd": "reboot"}, False, "tools.cmd_run.allow"),
        ({"argv": ["./uptime"]}, False, "tools.cmd_run.allow"),
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
    d = CMD_POLICY.evaluate("cmd.run", args, paths=PATHS)
    assert (d.allowed, d.rule) == (allowed, rule), d.reason
    assert d.reason
    assert (d.plan is not None) == allowed


def test_cmd_run_needs_the_hosts_resolver() -> None:
    with pytest.raises(TypeError, match="paths="):
        CMD_POLICY.evaluate("cmd.run", {"cmd": "uptime"})
    assert ToolPolicy().evaluate("sys.info").allowed  # other tools do not


def test_denial_names_the_part_refused() -> None:
    def reason(args: dict[str, object], policy: ToolPolicy = CMD_POLICY) -> str:
        d = policy.evaluate("cmd.run", args, paths=PATHS)
        assert not d.allowed
        return d.reason

    assert reason({"cmd": "uptime -p"}) == (
        "program /usr/bin/uptime matches 'uptime' but it allows no arguments (end it with"
        " ' *' for any)"
    )
    assert reason({"cmd": "echo x"}) == (
        "program /usr/bin/echo matches 'echo [!x]' but argument 1 does not match"
    )
    assert reason({"cmd": "reboot now"}) == "the program is not found on the daemon's PATH"
    assert reason({"argv": ["/opt/x"]}) == "the program is not an executable file on this host"
    assert reason({"cmd": "/opt/aegis/upgrade.sh --now"}) == (
        "the program /opt/aegis/upgrade.sh matches no pattern in tools.cmd_run.allow"
    )
    assert "these 2 programs (/usr/bin/ls, /usr/bin/rm)" in reason({"cmd": "ls; rm -rf /"})
    assert reason({"cmd": "ls $HOME"}).startswith("the shell form is refused: '$' at column 4")
    assert "a lone '&' at column 4" in reason({"cmd": "ls & x"})
    assert "'=': variable assignments" in reason({"cmd": "A=1 ls"})
    empty = ToolPolicy(allow=["cmd.run"], cmd_run_allow=[])
    assert reason({"cmd": "ls"}, empty) == "tools.cmd_run.allow is empty: no command may run"


SECRET = "hunter2-s3cret"


@pytest.mark.parametrize(
    "args",
    [
        {"cmd": f"uptime {SECRET}"},
        {"cmd": f"reboot {SECRET}"},
        {"cmd": f"ls; curl -d {SECRET} x"},
        {"cmd": f"echo $({SECRET})"},
        {"cmd": f"echo '{SECRET}"},
        {"cmd": f"{SECRET}=1 ls"},
        {"argv": [f"/opt/{SECRET}"]},
        {"argv": ["ls", SECRET], "env": {"TOKEN": SECRET}},
        {"argv": ["ls"], "env": {"LD_PRELOAD": SECRET}},
        {"argv": ["ls"], "cwd": f"/srv/{SECRET}"},
        {"argv": [SECRET, 3]},
        {"cmd": 3, "argv": [SECRET]},
    ],
)
def test_denials_never_repeat_the_command_text(args: dict[str, object]) -> None:
    d = CMD_POLICY.evaluate("cmd.run", args, paths=PATHS)
    assert not d.allowed
    assert SECRET not in d.reason and SECRET not in d.rule


def test_exec_plan_runs_what_matched() -> None:
    plan = CMD_POLICY.evaluate("cmd.run", {"cmd": "ls -la 'my dir'  *.txt"}, paths=PATHS).plan
    # The program is the resolved file, every word re-quoted: no PATH lookup, no globbing.
    assert plan == ExecPlan(argv=("/bin/sh", "-c", "/usr/bin/ls -la 'my dir' '*.txt'"))
    plan = CMD_POLICY.evaluate("cmd.run", {"cmd": UPGRADE}, paths=PATHS).plan
    assert plan is not None
    assert plan.argv[2] == (
        "/opt/aegis/upgrade.sh && /usr/bin/systemctl --user restart aegis-edge.service"
    )
    plan = CMD_POLICY.evaluate("cmd.run", {"argv": ["ls", "-l"]}, paths=PATHS).plan
    assert plan == ExecPlan(argv=("ls", "-l"), executable="/usr/bin/ls")
    # No allow list anywhere: the owner allowed any command; it runs as written.
    anything = ToolPolicy(allow=["cmd.run"])
    plan = anything.evaluate("cmd.run", {"cmd": "echo $HOME > /tmp/x"}, paths=PATHS).plan
    assert plan == ExecPlan(argv=("/bin/sh", "-c", "echo $HOME > /tmp/x"))
    # A restriction's list applies the same rules, and the resolved plan, to such a host.
    narrowed = anything.narrow(ToolRestriction(cmd_run_allow=["ls *"]))
    assert not narrowed.evaluate("cmd.run", {"cmd": "echo $HOME"}, paths=PATHS).allowed
    plan = narrowed.evaluate("cmd.run", {"cmd": "ls"}, paths=PATHS).plan
    assert plan == ExecPlan(argv=("/bin/sh", "-c", "/usr/bin/ls"))


@pytest.mark.parametrize(
    ("pattern", "arguments", "allowed"),
    [
        ("cat /var/log/*", ["/var/log/syslog"], True),
        ("cat /var/log/*", ["/var/log/../../etc/shadow"], False),  # * never crosses /
        ("cat /var/log/*", ["/var/log/.."], False),  # nor matches ..
        ("cat /var/log/*", ["/var/log/."], False),
        ("cat /var/log/*", ["/var/log/"], False),  # nor an empty segment
        ("cat /var/log/*", ["/var/log//x"], False),
        ("cat /var/log/*", ["/var/log/a/b"], False),
        ("cat /var/log/*.log", ["/var/log/..log"], True),  # a name, not a .. segment
        ("cat /var/log/*", [], False),  # one pattern word, one argument
        ("cat /var/log/*", ["/var/log/a", "/var/log/b"], False),
        ("cat /var/log/* *", ["/var/log/a", "/etc/b", "-n"], True),  # trailing * is the rest
        ("cat /var/log/* *", ["/var/log/a"], True),
        ("cat -n *", ["-n", "../../x"], True),
        ("cat ..", [".."], True),  # literal segments are the owner's words
        ("cat [ab]", ["a"], True),
        ("cat [!ab]", ["."], False),
        ("cat '*'", ["x"], True),  # quoting groups words; it does not escape wildcards
        ("cat [*]", ["x"], False),  # a class does
        ("cat [*]", ["*"], True),
    ],
)
def test_argument_matching(pattern: str, arguments: list[str], allowed: bool) -> None:
    policy = ToolPolicy(allow=["cmd.run"], cmd_run_allow=[pattern])
    for args in ({"argv": ["cat", *arguments]}, {"cmd": shlex.join(["cat", *arguments])}):
        assert policy.evaluate("cmd.run", args, paths=PATHS_CAT).allowed is allowed, args


PATHS_CAT = fake_paths(["cat"])


def test_program_patterns_resolve_on_the_host() -> None:
    # merged /usr: the literal prefix /bin resolves to /usr/bin, so /bin/* covers /usr/bin/id
    p = ToolPolicy(allow=["cmd.run"], cmd_run_allow=["/bin/*"])
    assert (
        p.evaluate("cmd.run", {"argv": ["id"]}, paths=PATHS).rule == "tools.cmd_run.allow: /bin/*"
    )
    assert p.evaluate("cmd.run", {"argv": ["/usr/bin/id"]}, paths=PATHS).allowed
    # a symlink in the allowed directory pointing elsewhere is judged by its target
    link = fake_paths(extra={"/usr/bin/evil": "/tmp/evil/sh"})
    assert not p.evaluate("cmd.run", {"argv": ["/usr/bin/evil"]}, paths=link).allowed
    # a pattern whose directory does not exist on the host matches nothing
    q = ToolPolicy(allow=["cmd.run"], cmd_run_allow=["/nowhere/*", "gone"])
    d = q.evaluate("cmd.run", {"argv": ["id"]}, paths=PATHS)
    assert (d.allowed, d.reason) == (False, "the program /usr/bin/id matches no pattern in"
                                     " tools.cmd_run.allow")  # fmt: skip


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("[z-a]", "invalid pattern"),
        ("up*", "bare name with a wildcard"),
        ("./run.sh", "relative path"),
        ("bin/run.sh", "relative path"),
        ("/opt/../bin/*", "'..' segments"),
        ("/opt//x", "empty"),
        ("/opt/x/", "empty"),
        ("ls $HOME", "'$' at column 4"),
        ("ls > x", "'>'"),
        ("ls & x", "lone '&'"),
        ("&& ls", "no command before it"),
        ("ls &&", "no command after"),
        ("A=1 ls", "'='"),
        ("ls 'x", "unterminated single quote"),
        ("/opt/[z-a]/x *", "not a valid wildcard"),
    ],
)
def test_bad_patterns_are_config_errors(pattern: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        ToolPolicy(cmd_run_allow=["ok", pattern])
    assert info.value.path == "tools.cmd_run.allow[1]"
    assert "Matching rules" in info.value.hint


def test_split_shell() -> None:
    sc = split_shell(' ls  -l \'a b\' "c\\"d" e\\ f &&id||x;y|z ')
    assert sc == ShellCommand(
        commands=(("ls", "-l", "a b", 'c"d', "e f"), ("id",), ("x",), ("y",), ("z",)),
        operators=("&&", "||", ";", "|"),
    )
    assert split_shell("echo '&&' \\;").commands == (("echo", "&&", ";"),)
    assert split_shell("echo ''").commands == (("echo", ""),)
    for bad in ("", "  ", "ls;", ";ls", "ls &", "ls |& x", "x\\", 'a "b', "a;;b"):
        with pytest.raises(ValueError):
            split_shell(bad)


ENV_POLICY = ToolPolicy(
    allow=["cmd.run"],
    cmd_run_allow=["ls *"],
    cmd_run_allow_env=["APP_*", "LANG", "PYTHONPATH", "*_MODE"],
    cmd_run_allow_cwd=["/srv/app", "/srv/jobs/*"],
)
ENV_PATHS = fake_paths(
    directories={
        "/srv/app": "/srv/app",
        "/srv/jobs/a": "/srv/jobs/a",
        "/srv/jobs": "/srv/jobs",
        "/srv/jobs/link": "/etc",
        "/srv/app/../../etc": "/etc",
        "/srv/jobs/a/b": "/srv/jobs/a/b",
    }
)


@pytest.mark.parametrize(
    ("extra", "rule"),
    [
        ({"env": {"APP_COLOR": "red", "LANG": "C"}}, None),
        ({"env": {"PYTHONPATH": "/x"}}, None),  # named exactly: the owner's choice
        ({"env": {"TOKEN": "x"}}, "tools.cmd_run.allow_env"),
        ({"env": {"PATH": "/tmp/evil"}}, "tools.cmd_run.allow_env"),
        ({"env": {"LD_PRELOAD_MODE": "x"}}, "tools.cmd_run.allow_env"),  # glob, risky prefix
        ({"env": {"BASH_ENV_MODE": "x"}}, None),  # not the risky name itself
        ({"cwd": "/srv/app"}, None),
        ({"cwd": "/srv/jobs/a"}, None),
        ({"cwd": "/srv/jobs"}, "tools.cmd_run.allow_cwd"),
        ({"cwd": "/srv/jobs/a/b"}, "tools.cmd_run.allow_cwd"),
        ({"cwd": "/srv/jobs/link"}, "tools.cmd_run.allow_cwd"),  # a symlink out
        ({"cwd": "/srv/app/../../etc"}, "tools.cmd_run.allow_cwd"),
        ({"cwd": "/srv/nope"}, "tools.cmd_run.allow_cwd"),
        ({"cwd": "srv/app"}, "tools.cmd_run.allow_cwd"),
    ],
)
def test_env_and_cwd_are_policy(extra: dict[str, object], rule: str | None) -> None:
    d = ENV_POLICY.evaluate("cmd.run", {"argv": ["ls"], **extra}, paths=ENV_PATHS)
    assert d.allowed is (rule is None), d.reason
    if rule is not None:
        assert d.rule == rule
    else:
        assert d.plan is not None
        assert dict(d.plan.env) == extra.get("env", {})
        assert d.plan.cwd == extra.get("cwd")


@pytest.mark.parametrize(
    "name", ["PATH", "LD_PRELOAD", "LD_LIBRARY_PATH", "BASH_ENV", "ENV", "PYTHONSTARTUP",
             "PERL5OPT", "RUBYOPT", "NODE_OPTIONS", "IFS", "GIT_SSH_COMMAND", "BASH_FUNC_ls%%",
             "GCONV_PATH", "DYLD_INSERT_LIBRARIES", "SHELLOPTS", "PS4"],
)  # fmt: skip
def test_risky_env_needs_its_exact_name(name: str) -> None:
    assert is_risky_env(name)
    globbed = ToolPolicy(allow=["cmd.run"], cmd_run_allow_env=["*"])
    d = globbed.evaluate("cmd.run", {"argv": ["ls"], "env": {name: "x"}}, paths=PATHS)
    assert (d.allowed, d.rule) == (False, "tools.cmd_run.allow_env")
    assert d.reason == (
        f"env {name} is not allowed by tools.cmd_run.allow_env (it changes what runs: only an"
        " entry naming it exactly allows it)"
    )
    if "%" not in name:
        exact = ToolPolicy(allow=["cmd.run"], cmd_run_allow_env=[name])
        assert exact.evaluate("cmd.run", {"argv": ["ls"], "env": {name: "x"}}, paths=PATHS).allowed


def test_env_and_cwd_default_to_none_even_for_any_command() -> None:
    p = ToolPolicy(allow=["cmd.run"])  # cmd.run for any command
    assert p.evaluate("cmd.run", {"cmd": "ls"}, paths=PATHS).allowed
    d = p.evaluate("cmd.run", {"cmd": "ls", "env": {"A": "1"}}, paths=PATHS)
    assert (d.allowed, d.reason) == (False, "env A is not allowed by tools.cmd_run.allow_env")
    d = p.evaluate("cmd.run", {"cmd": "ls", "cwd": "/usr"}, paths=PATHS)
    assert (d.allowed, d.reason) == (False, "cwd /usr is not allowed by tools.cmd_run.allow_cwd")
    with pytest.raises(ConfigError) as info:
        ToolPolicy(cmd_run_allow_env=["OK", "NOT-OK"])
    assert info.value.path == "tools.cmd_run.allow_env[1]"
    with pytest.raises(ConfigError, match="absolute") as info:
        ToolPolicy(cmd_run_allow_cwd=["srv"])
    assert info.value.path == "tools.cmd_run.allow_cwd[0]"


def test_child_environment_is_a_minimal_base_plus_what_was_allowed() -> None:
    daemon = {"PATH": "/usr/bin", "HOME": "/home/d", "LANG": "C.UTF-8", "AWS_SECRET": "x",
              "LD_PRELOAD": "/evil.so", "BASH_ENV": "/evil"}  # fmt: skip
    env = child_environment(daemon, {"APP": "1", "LANG": "de_DE"}, extra={"MARK": "c1"})
    assert env == {"PATH": "/usr/bin", "HOME": "/home/d", "LANG": "de_DE", "APP": "1", "MARK": "c1"}
    assert child_environment({}, {}) == {}
    assert child_environment(daemon, {"MARK": "forged"}, extra={"MARK": "c1"})["MARK"] == "c1"


def test_relay_restriction_narrows_and_names_its_rule() -> None:
    local = ToolPolicy(allow=["sys.info", "edge.ping", "cmd.run"], cmd_run_allow=["ls *", "uptime"])
    relay = ToolRestriction(allow=["sys.info", "cmd.run"], cmd_run_allow=["uptime"])
    p = local.narrow(relay)
    assert p.evaluate("sys.info").allowed
    d = p.evaluate("edge.ping")
    assert (d.allowed, d.rule) == (False, "relay.tools.allow")
    d = p.evaluate("cmd.run", {"cmd": "ls -la"}, paths=PATHS)
    assert (d.allowed, d.rule) == (False, "relay.tools.cmd_run.allow")
    d = p.evaluate("cmd.run", {"cmd": "uptime"}, paths=PATHS)
    assert (d.allowed, d.rule) == (True, "tools.cmd_run.allow: uptime")  # local rule decides
    assert p.narrow(None) == p
    assert not p.allows_tool("edge.ping")


def test_relay_cannot_widen() -> None:
    local = ToolPolicy()  # cmd.run off
    p = local.narrow(ToolRestriction(allow=["cmd.run", "acme.*"], cmd_run_allow=["/usr/bin/* *"]))
    d = p.evaluate("cmd.run", {"cmd": "ls"}, paths=PATHS)
    assert (d.allowed, d.rule) == (False, "tools.allow")
    assert not p.evaluate("acme.deploy").allowed
    # A restriction that leaves a list unset does not restrict it.
    assert ToolPolicy().narrow(ToolRestriction()).evaluate("sys.info").allowed
    # Nor can it widen env or cwd: the owner's default of none stands.
    p = ToolPolicy(allow=["cmd.run"]).narrow(
        ToolRestriction(cmd_run_allow_env=["*", "PATH"], cmd_run_allow_cwd=["/", "/*"])
    )
    d = p.evaluate("cmd.run", {"cmd": "ls", "env": {"PATH": "/tmp"}}, paths=PATHS)
    assert (d.allowed, d.rule) == (False, "tools.cmd_run.allow_env")
    d = p.evaluate("cmd.run", {"cmd": "ls", "cwd": "/usr"}, paths=PATHS)
    assert (d.allowed, d.rule) == (False, "tools.cmd_run.allow_cwd")


def test_relay_restriction_narrows_env_and_cwd() -> None:
    local = ToolPolicy(
        allow=["cmd.run"], cmd_run_allow_env=["APP_*"], cmd_run_allow_cwd=["/usr", "/usr/*"]
    )
    p = local.narrow(ToolRestriction(cmd_run_allow_env=["APP_A"], cmd_run_allow_cwd=["/usr"]))
    assert p.evaluate("cmd.run", {"cmd": "ls", "env": {"APP_A": "1"}, "cwd": "/usr"}, paths=PATHS)
    d = p.evaluate("cmd.run", {"cmd": "ls", "env": {"APP_B": "1"}}, paths=PATHS)
    assert (d.allowed, d.rule) == (False, "relay.tools.cmd_run.allow_env")
    d = p.evaluate("cmd.run", {"cmd": "ls", "cwd": "/usr/bin"}, paths=PATHS)
    assert (d.allowed, d.rule) == (False, "relay.tools.cmd_run.allow_cwd")


def test_bad_entries_raise_config_errors_naming_the_path() -> None:
    with pytest.raises(ConfigError) as info:
        ToolPolicy(cmd_run_allow=["ok", "/bin/[z-a]"])
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
patterns = st.sampled_from(
    ["/usr/bin/* *", "ls *", "uptime", "echo ?", "/usr/bin/*", "ls; id *", "/bin/[a-z]* *", "x"]
)
commands: st.SearchStrategy[dict[str, object]] = st.one_of(
    st.fixed_dictionaries(
        {"cmd": st.sampled_from(["ls", "ls -l", "ls; id", "uptime", "echo a", "ls $x"])}
    ),
    st.fixed_dictionaries(
        {"argv": st.lists(st.sampled_from(["ls", "/usr/bin/id", "-l", "a;b", "x"]), min_size=1)},
        optional={
            "env": st.dictionaries(st.sampled_from(["APP", "PATH", "LD_PRELOAD"]), st.just("1")),
            "cwd": st.sampled_from(["/usr", "/usr/bin", "/nope"]),
        },
    ),
    st.just({}),
)
env_lists = st.lists(st.sampled_from(["APP", "*", "PATH", "LD_*"]))
cwd_lists = st.lists(st.sampled_from(["/usr", "/usr/*", "/"]))
tool_lists = st.lists(st.sampled_from(["sys.info", "edge.ping", "cmd.run", "acme.*", "*", "a.b"]))


@settings(max_examples=200, deadline=None)
@given(
    local_allow=tool_lists,
    local_cmds=st.none() | st.lists(patterns),
    relay_allow=st.none() | tool_lists,
    relay_cmds=st.none() | st.lists(patterns),
    local_env=env_lists,
    relay_env=st.none() | env_lists,
    local_cwd=cwd_lists,
    relay_cwd=st.none() | cwd_lists,
    tool=tool_names,
    args=commands,
)
def test_narrowing_never_widens(
    local_allow: list[str],
    local_cmds: list[str] | None,
    relay_allow: list[str] | None,
    relay_cmds: list[str] | None,
    local_env: list[str],
    relay_env: list[str] | None,
    local_cwd: list[str],
    relay_cwd: list[str] | None,
    tool: str,
    args: dict[str, object],
) -> None:
    local = ToolPolicy(
        allow=local_allow,
        cmd_run_allow=local_cmds,
        cmd_run_allow_env=local_env,
        cmd_run_allow_cwd=local_cwd,
    )
    restriction = ToolRestriction(
        allow=relay_allow,
        cmd_run_allow=relay_cmds,
        cmd_run_allow_env=relay_env,
        cmd_run_allow_cwd=relay_cwd,
    )
    narrowed = local.narrow(restriction).evaluate(tool, args, paths=PATHS)
    alone = local.evaluate(tool, args, paths=PATHS)
    if narrowed.allowed:
        assert alone.allowed
        # The local rule is the one named. The plan is the same unless only the restriction
        # had a command list: then it is the resolved one (run what the restriction matched).
        assert (narrowed.rule, narrowed.reason) == (alone.rule, alone.reason)
        if local_cmds is not None or relay_cmds is None:
            assert narrowed == alone
    if not alone.allowed:
        assert narrowed == alone
    # Deterministic.
    assert local.narrow(restriction).evaluate(tool, args, paths=PATHS) == narrowed


GUIDE_PATHS = fake_paths(
    [*PROGRAMS, "cat"],
    extra={"/opt/tools/backup.sh": "/opt/tools/backup.sh"},
    directories={"/opt/tools": "/opt/tools"},
)


@pytest.mark.parametrize(
    ("pattern", "allows", "refuses"),
    [  # the table in docs/operator-guide.md, "Matching rules for cmd.run"
        ("uptime", ["uptime", "/usr/bin/uptime"], ["uptime -p"]),
        ("uptime *", ["uptime", "uptime -p"], []),
        ("ls *", ["ls", "ls -la /tmp"], ["ls; rm -rf /", "ls $(id)"]),
        ("cat /var/log/*", ["cat /var/log/syslog"],
         ["cat /var/log/../../etc/shadow", "cat /var/log/a b"]),
        ("/opt/tools/* *", ["/opt/tools/backup.sh --full"], ["/opt/tools/../../bin/sh -c x"]),
        ("systemctl --user restart *", ["systemctl --user restart aegis-edge.service"],
         ["systemctl restart x"]),
    ],
)  # fmt: skip
def test_operator_guide_examples(pattern: str, allows: list[str], refuses: list[str]) -> None:
    traversal = {"/opt/tools/../../bin/sh": "/usr/bin/sh"}
    paths = attrs.evolve(GUIDE_PATHS, programs={**GUIDE_PATHS.programs, **traversal})
    policy = ToolPolicy(allow=["cmd.run"], cmd_run_allow=[pattern])
    for cmd in allows:
        assert policy.evaluate("cmd.run", {"cmd": cmd}, paths=paths).allowed, cmd
    for cmd in refuses:
        assert not policy.evaluate("cmd.run", {"cmd": cmd}, paths=paths).allowed, cmd
