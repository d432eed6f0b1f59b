"""Daemon config: parsing, precedence, expansion, clear errors, and render round trips."""

from __future__ import annotations

import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis_edge_core.config import (
    DEFAULT_CONFIG,
    MAX_CONFIG_BYTES,
    CmdRunConfig,
    ConfigFileError,
    DaemonConfig,
    LoggingConfig,
    ObservabilityConfig,
    OtlpConfig,
    ToolsConfig,
    merge_config,
    parse_config,
    parse_duration,
    parse_label,
    parse_relay_settings,
    render_config,
)
from aegis_edge_core.errors import ConfigError
from tests.core.fake_paths import PATHS

SEED_EXAMPLE = """\
relay: relay.example.com:443
labels:
  env: prod
  role: db
tools:
  allow: [sys.info, edge.ping, keys.rotate, cmd.run]
  max_concurrent: 8
  cmd_run:
    allow: ["/opt/aegis/upgrade.sh *", uptime]
    output_cap_bytes: 65536
    default_timeout: 2m
logging:
  level: debug
observability:
  otlp:
    endpoint: otel.example.com:4317
    insecure: false
    headers:
      x-tenant-id: ${tenant_id}
      x-node: node/${node_id}
"""


def parse(text: str) -> DaemonConfig:
    return parse_config(textwrap.dedent(text), source="/state/aegis-config.yaml")


def error(text: str) -> ConfigFileError:
    with pytest.raises(ConfigFileError) as info:
        parse(text)
    assert isinstance(info.value, ConfigError)
    return info.value


def test_empty_file_is_the_defaults() -> None:
    assert parse("") == DEFAULT_CONFIG
    assert parse("# only a comment\n") == DEFAULT_CONFIG
    assert parse("logging:\n# level: debug\n") == DEFAULT_CONFIG  # an emptied section
    d = DEFAULT_CONFIG
    assert d.tools.allow == ("sys.info", "edge.ping", "keys.rotate")
    assert d.tools.max_concurrent == 4
    assert d.tools.cmd_run.output_cap_bytes == 1024 * 1024
    assert d.tools.cmd_run.allow is None
    assert d.heartbeat.interval == 30.0
    assert (d.logging.level, d.logging.format) == ("info", "json")
    assert d.observability.otlp == OtlpConfig(endpoint=None, insecure=False, headers={})
    assert not d.policy().evaluate("cmd.run", {"cmd": "ls"}, paths=PATHS).allowed


def test_parses_every_key() -> None:
    cfg = parse(SEED_EXAMPLE)
    assert cfg.relay == "relay.example.com:443"
    assert dict(cfg.labels) == {"env": "prod", "role": "db"}
    assert cfg.tools.allow[-1] == "cmd.run"
    assert cfg.tools.max_concurrent == 8
    assert cfg.tools.cmd_run == CmdRunConfig(
        allow=("/opt/aegis/upgrade.sh *", "uptime"), output_cap_bytes=65536, default_timeout=120.0
    )
    assert cfg.logging == LoggingConfig(level="debug", format="json")
    assert cfg.observability.otlp.headers["x-tenant-id"] == "${tenant_id}"
    assert cfg.policy().evaluate("cmd.run", {"cmd": "uptime"}, paths=PATHS).allowed


def test_tenant_and_node_expansion() -> None:
    cfg = parse(SEED_EXAMPLE).expand(tenant_id="acme", node_id="n-42")
    assert dict(cfg.observability.otlp.headers) == {"x-tenant-id": "acme", "x-node": "node/n-42"}
    cfg = parse(
        """
        observability:
          otlp:
            endpoint: ${tenant_id}.otel.example.com:4317
            headers: {literal: "$${not_a_var}"}
        """
    ).expand(tenant_id="acme", node_id="n")
    assert cfg.observability.otlp.endpoint == "acme.otel.example.com:4317"
    assert cfg.observability.otlp.headers["literal"] == "${not_a_var}"


def test_unknown_variable_names_the_key() -> None:
    err = error(
        """
        observability:
          otlp:
            headers:
              x-tenant-id: ${tenant}
        """
    )
    assert err.path == "observability.otlp.headers.x-tenant-id"
    assert "unknown variable ${tenant}" in str(err)
    assert "${tenant_id}" in err.hint
    assert (err.line, err.column) == (5, 20)
    # Configs built in code are checked when expanded.
    cfg = DaemonConfig(
        observability=ObservabilityConfig(otlp=OtlpConfig(endpoint="${region}.otel:4317"))
    )
    with pytest.raises(ConfigError) as info:
        cfg.expand(tenant_id="t", node_id="n")
    assert info.value.path == "observability.otlp.endpoint"
    assert "unterminated" in str(error("observability: {otlp: {endpoint: 'a${tenant_id'}}"))


def test_bad_type_error_names_path_value_and_expectation() -> None:
    err = error(
        """
        tools:
          max_concurrent: four
        """
    )
    assert "tools.max_concurrent: expected a positive integer, got 'four'" in str(err)
    assert str(err).startswith("/state/aegis-config.yaml:3:19: ")
    assert err.path == "tools.max_concurrent"
    assert err.source == "/state/aegis-config.yaml"


@pytest.mark.parametrize(
    ("text", "path", "needle"),
    [
        ("tools: {max_concurrent: 0}", "tools.max_concurrent", "positive integer, got 0"),
        ("tools: {max_concurrent: true}", "tools.max_concurrent", "got true"),
        ("tools: {allow: sys.info}", "tools.allow", "expected a list of strings"),
        ("tools: {allow: [sys.info, 3]}", "tools.allow[1]", "non-empty string, got 3"),
        ("tools: {allow: ['no spaces']}", "tools.allow[0]", "tool name"),
        ("tools: {cmd_run: {allow: ['[z-a]']}}", "tools.cmd_run.allow[0]", "invalid pattern"),
        ("tools: {cmd_run: {output_cap_bytes: 1.5}}", "tools.cmd_run.output_cap_bytes", "1.5"),
        ("tools: {cmd_run: {default_timeout: soon}}", "tools.cmd_run.default_timeout", "duration"),
        ("tools: {cmd_run: {default_timeout: -5}}", "tools.cmd_run.default_timeout", "-5"),
        ("tools: [a]", "tools", "expected a mapping at tools"),
        ("labels: {v: 2}", "labels.v", "expected a string, got 2"),
        ("labels: {'a b': x}", "labels.a b", "label name"),
        ("labels: [a]", "labels", "mapping"),
        ("logging: {level: loud}", "logging.level", "debug, info, warning, error, critical"),
        ("logging: {format: xml}", "logging.format", "json, text"),
        ("observability: {otlp: {insecure: 'no'}}", "observability.otlp.insecure", "true or false"),
        ("observability: {otlp: {endpoint: 'a b'}}", "observability.otlp.endpoint", "endpoint"),
        ("relay: 443", "relay", "endpoint"),
        ("relay: ''", "relay", "endpoint"),
        ("1: x", "1", "keys must be strings"),
    ],
)
def test_bad_values(text: str, path: str, needle: str) -> None:
    err = error(text)
    assert err.path == path
    assert needle in str(err)
    assert err.line == 1


def test_bad_yaml_names_source_line_and_column() -> None:
    err = error(
        """
        tools:
          allow: [sys.info, edge.ping
          max_concurrent: 3
        """
    )
    assert str(err).startswith("/state/aegis-config.yaml:4:")
    assert "invalid YAML" in str(err)
    assert err.path == ""
    assert err.line == 4
    err = error("a: b\n\t- c\n")
    assert err.line == 2
    err = error("tools: {}\n---\nlogging: {}\n")
    assert "invalid YAML" in str(err)
    assert err.line == 2


def test_top_level_must_be_a_mapping() -> None:
    assert "expected a mapping at the top level, got a list" in str(error("- a\n- b\n"))
    assert "got 'hello'" in str(error("hello\n"))


def test_unknown_keys_suggest_the_nearest() -> None:
    err = error("tools:\n  alow: [sys.info]\n")
    assert err.path == "tools.alow"
    assert "unknown key" in str(err)
    assert err.hint == "did you mean 'tools.allow'?"
    assert (err.line, err.column) == (2, 3)
    assert error("max_concurrent: 3\n").hint == "did you mean 'tools.max_concurrent'?"
    assert error("observabilty: {}\n").hint == "did you mean 'observability'?"
    assert (
        error("tools: {cmd_run: {timeout: 5}}").hint
        == "did you mean 'tools.cmd_run.default_timeout'?"
    )
    assert "valid top-level keys" in error("zzzzzz: 1\n").hint


def test_duplicate_keys_are_refused() -> None:
    err = error("tools:\n  allow: [a]\n  allow: [b]\n")
    assert err.path == "tools.allow"
    assert "twice" in str(err)
    assert err.line == 3


def test_heartbeat_is_relay_only() -> None:
    err = error("heartbeat:\n  interval: 10\n")
    assert err.path == "heartbeat.interval"
    assert "relay" in str(err)
    relay = parse_relay_settings({"heartbeat": {"interval": "15s"}})
    assert merge_config(DEFAULT_CONFIG, relay).heartbeat.interval == 15.0


def test_precedence_defaults_local_relay() -> None:
    local = parse(
        """
        logging: {level: warning}
        tools: {max_concurrent: 2}
        observability: {otlp: {endpoint: local:4317}}
        """
    )
    relay = parse_relay_settings(
        {"logging": {"level": "error"}, "observability": {"otlp": {"insecure": True}}}
    )
    merged = merge_config(local, relay)
    assert merged.logging.level == "error"  # relay beats local
    assert merged.logging.format == "json"  # default: nobody set it
    assert merged.tools.max_concurrent == 2  # local beats default
    assert merged.observability.otlp.endpoint == "local:4317"
    assert merged.observability.otlp.insecure is True
    assert merge_config(local, None) is local
    # Merging the local config with a newer push replaces the earlier push.
    newer = parse_relay_settings({"logging": {"level": "debug"}})
    assert merge_config(local, newer).logging.level == "debug"


def test_relay_can_narrow_but_never_widen_tool_permissions() -> None:
    local = parse(
        """
        tools:
          allow: [sys.info, edge.ping, cmd.run]
          cmd_run: {allow: ["ls *", uptime]}
        """
    )
    widen = parse_relay_settings(
        "tools:\n  allow: [sys.info, edge.ping, keys.rotate, cmd.run, acme.*]\n"
        "  cmd_run: {allow: ['/usr/bin/* *', 'rm *'], allow_env: ['*'], allow_cwd: ['/']}\n"
    )
    merged = merge_config(local, widen)
    assert merged.tools.allow == local.tools.allow  # local lists are kept as written
    policy = merged.policy()
    assert not policy.evaluate("keys.rotate").allowed
    assert not policy.evaluate("acme.deploy").allowed
    assert not policy.evaluate("cmd.run", {"cmd": "rm -rf /"}, paths=PATHS).allowed
    assert policy.evaluate("cmd.run", {"cmd": "ls -l"}, paths=PATHS).allowed
    narrow = parse_relay_settings(
        {"tools": {"allow": ["sys.info", "cmd.run"], "cmd_run": {"allow": ["uptime"]}}}
    )
    policy = merge_config(local, narrow).policy()
    d = policy.evaluate("edge.ping")
    assert (d.allowed, d.rule) == (False, "relay.tools.allow")
    d = policy.evaluate("cmd.run", {"cmd": "ls -l"}, paths=PATHS)
    assert (d.allowed, d.rule) == (False, "relay.tools.cmd_run.allow")
    assert policy.evaluate("cmd.run", {"cmd": "uptime"}, paths=PATHS).allowed
    # A relay enabling cmd.run on a host that never allowed it changes nothing.
    policy = merge_config(DEFAULT_CONFIG, widen).policy()
    assert not policy.evaluate("cmd.run", {"cmd": "ls"}, paths=PATHS).allowed


@pytest.mark.parametrize("key", ["relay", "labels"])
def test_relay_may_not_set_host_owned_keys(key: str) -> None:
    value: object = "r:1" if key == "relay" else {"a": "b"}
    with pytest.raises(ConfigFileError) as info:
        parse_relay_settings({key: value}, source="relay push")
    assert info.value.path == key
    assert str(info.value).startswith("relay push: ")
    assert "host owner" in str(info.value)


def test_relay_settings_errors() -> None:
    with pytest.raises(ConfigFileError) as info:
        parse_relay_settings("logging:\n  level: loud\n", source="push")
    assert str(info.value).startswith("push:2:10: logging.level:")
    with pytest.raises(ConfigFileError, match="unknown key"):
        parse_relay_settings({"loging": {}})
    assert parse_relay_settings(None).overrides == {}


def test_render_for_enrollment_round_trips() -> None:
    cfg = DaemonConfig.for_enrollment(
        relay="relay.example.com:443",
        allow_tools=["cmd.run"],
        labels=dict([parse_label("env=prod")]),
    )
    text = render_config(cfg)
    assert text.startswith("# aegis-config.yaml")
    assert "cmd.run" in text
    assert "heartbeat" not in text
    assert parse_config(text) == cfg
    assert parse_config(render_config(cfg, include_defaults=True)) == cfg
    assert parse_config(render_config(parse(SEED_EXAMPLE))) == parse(SEED_EXAMPLE)
    assert cfg.policy().evaluate("cmd.run", {"cmd": "anything"}, paths=PATHS).allowed


def test_parse_label_and_duration() -> None:
    assert parse_label("k=v=w") == ("k", "v=w")
    assert parse_label("k=") == ("k", "")
    with pytest.raises(ConfigError, match="k=v"):
        parse_label("novalue")
    with pytest.raises(ConfigError):
        parse_label("bad key=v")
    assert [parse_duration(v) for v in (5, 2.5, "30s", "5m", "1.5h", "500ms", " 7 ")] == [
        5.0,
        2.5,
        30.0,
        300.0,
        5400.0,
        0.5,
        7.0,
    ]
    for bad in ("0s", "", "5d", True, None, float("inf"), [1]):
        with pytest.raises(ConfigError):
            parse_duration(bad, "x")


def test_oversized_and_non_text_input() -> None:
    with pytest.raises(ConfigFileError, match="limit"):
        parse_config("#" * (MAX_CONFIG_BYTES + 1), source="big.yaml")
    with pytest.raises(TypeError):
        parse_config(b"relay: x", source="bytes.yaml")  # type: ignore[arg-type]


def test_alias_bombs_stay_cheap() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
    )
    err = error(bomb)
    assert "unknown key" in str(err)


def test_models_validate_when_built_in_code() -> None:
    with pytest.raises(ConfigError) as info:
        ToolsConfig(max_concurrent=-1)
    assert info.value.path == "tools.max_concurrent"
    with pytest.raises(ConfigError) as info:
        ToolsConfig(allow="cmd.run")
    assert info.value.path == "tools.allow"
    with pytest.raises(ConfigError) as info:
        OtlpConfig(headers={"x": 1})  # type: ignore[dict-item]
    assert info.value.path == "observability.otlp.headers.x"
    with pytest.raises(ConfigError):
        LoggingConfig(level="LOUD")
    with pytest.raises(ConfigError):
        DaemonConfig(relay="has space:1")


names = st.sampled_from(["sys.info", "edge.ping", "keys.rotate", "cmd.run", "acme.deploy", "x-y_z"])
texts = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=0, max_size=12
).filter(lambda s: "${" not in s and "$$" not in s)
label_keys = st.from_regex(r"[A-Za-z0-9_./-]{1,10}", fullmatch=True)
header_keys = st.from_regex(r"[a-z0-9-]{1,10}", fullmatch=True)
endpoints = st.from_regex(r"[a-z0-9.]{1,12}:[0-9]{2,5}", fullmatch=True)
configs = st.builds(
    DaemonConfig,
    relay=st.none() | endpoints,
    labels=st.dictionaries(label_keys, texts, max_size=4),
    tools=st.builds(
        ToolsConfig,
        allow=st.lists(names, unique=True, max_size=5),
        max_concurrent=st.integers(1, 64),
        cmd_run=st.builds(
            CmdRunConfig,
            allow=st.none()
            | st.lists(st.sampled_from(["ls *", "uptime", "a && b", "/usr/bin/[ab]?"])),
            allow_env=st.lists(st.sampled_from(["APP_MODE", "APP_*", "PATH", "LC_?"])),
            allow_cwd=st.lists(st.sampled_from(["/srv/app", "/srv/*", "/"])),
            output_cap_bytes=st.integers(1, 2**40),
            default_timeout=st.floats(min_value=0.001, max_value=1e6),
        ),
    ),
    logging=st.builds(
        LoggingConfig,
        level=st.sampled_from(["debug", "info", "warning", "error", "critical"]),
        format=st.sampled_from(["json", "text"]),
    ),
    observability=st.builds(
        ObservabilityConfig,
        otlp=st.builds(
            OtlpConfig,
            endpoint=st.none() | endpoints,
            insecure=st.booleans(),
            headers=st.dictionaries(
                header_keys, texts | st.just("${tenant_id}") | st.just("n=${node_id}"), max_size=3
            ),
        ),
    ),
)


@settings(max_examples=120, deadline=None)
@given(cfg=configs, include_defaults=st.booleans())
def test_render_parse_round_trip(cfg: DaemonConfig, include_defaults: bool) -> None:
    assert parse_config(render_config(cfg, include_defaults=include_defaults)) == cfg


def test_allow_env_and_allow_cwd() -> None:
    cfg = parse(
        """
        tools:
          allow: [cmd.run]
          cmd_run:
            allow_env: [APP_MODE, "LC_*"]
            allow_cwd: [/srv/app, "/srv/jobs/*"]
        """
    )
    assert cfg.tools.cmd_run.allow_env == ("APP_MODE", "LC_*")
    assert cfg.tools.cmd_run.allow_cwd == ("/srv/app", "/srv/jobs/*")
    assert DEFAULT_CONFIG.tools.cmd_run.allow_env == DEFAULT_CONFIG.tools.cmd_run.allow_cwd == ()
    assert parse_config(render_config(cfg)) == cfg
    policy = cfg.policy()
    assert policy.evaluate("cmd.run", {"cmd": "ls", "env": {"LC_ALL": "C"}}, paths=PATHS).allowed
    d = policy.evaluate("cmd.run", {"cmd": "ls", "env": {"TOKEN": "x"}}, paths=PATHS)
    assert (d.allowed, d.rule) == (False, "tools.cmd_run.allow_env")
    # A relay's lists narrow them, and are refused when malformed like the local ones.
    pushed = parse_relay_settings({"tools": {"cmd_run": {"allow_env": ["APP_MODE"]}}})
    d = (
        merge_config(cfg, pushed)
        .policy()
        .evaluate("cmd.run", {"cmd": "ls", "env": {"LC_ALL": "C"}}, paths=PATHS)
    )
    assert (d.allowed, d.rule) == (False, "relay.tools.cmd_run.allow_env")
    assert error("tools: {cmd_run: {allow_env: [BAD-NAME]}}").path == "tools.cmd_run.allow_env[0]"
    err = error("tools: {cmd_run: {allow_cwd: [srv/app]}}")
    assert err.path == "tools.cmd_run.allow_cwd[0]" and "absolute" in str(err)
    err = error("tools: {cmd_run: {allow: ['up*']}}")
    assert err.path == "tools.cmd_run.allow[0]" and "bare name with a wildcard" in str(err)
    with pytest.raises(ConfigFileError):
        parse_relay_settings({"tools": {"cmd_run": {"allow_cwd": ["../x"]}}})
