"""The daemon's configuration: ``aegis-config.yaml``, relay-pushed settings, and how they merge.

Theory of operation
-------------------
A daemon's effective configuration is three layers, later ones winning key by key::

    defaults  <  the local aegis-config.yaml  <  settings the relay pushes

with one exception, **tool permissions** (``tools.allow``, ``tools.cmd_run.allow``,
``tools.cmd_run.allow_env``, ``tools.cmd_run.allow_cwd``): the host
owner's local policy always wins. What the relay sends for those keys becomes a
:class:`~aegis_edge_core.policy.ToolRestriction` layered on top of the local policy, so it can
only narrow what the owner allowed, never widen it. Two more keys belong to the host alone and a
relay may not send them: ``relay`` (the endpoint the host chose to dial; a relay must not
redirect it) and ``labels`` (the owner describes the host; operators use tags). Conversely
``heartbeat`` is the relay's alone: the relay tells each daemon its interval when it accepts the
stream, so a local file that sets it is refused.

The core never reads files: :func:`parse_config` takes the file's *text* and a ``source`` name
for messages, and :func:`render_config` returns text for the caller to write (``aegis edge
enroll`` writes the first config with it; the result parses back to the same value).

Keys (dotted paths; every other key is refused with the nearest valid key suggested)::

    relay                              endpoint the daemon dials, e.g. relay.example.com:443
    labels                             map of str -> str describing the host
    tools.allow                        tool names or globs; default sys.info, edge.ping, keys.rotate
    tools.max_concurrent               positive int, default 4
    tools.cmd_run.allow                command patterns; unset = any command once cmd.run is allowed
    tools.cmd_run.allow_env            env variable names or globs a call may set; default none
    tools.cmd_run.allow_cwd            absolute path patterns a call's cwd may be; default none
    tools.cmd_run.output_cap_bytes     positive int, default 1 MiB
    tools.cmd_run.default_timeout      seconds (number, or "30s", "5m", "1h", "500ms"), default 300
    heartbeat.interval                 seconds; relay-pushed only, default 30
    logging.level                      debug | info | warning | error | critical, default info
    logging.format                     json | text, default json
    observability.otlp.endpoint        collector host:port or URL; unset = no OTLP export
    observability.otlp.insecure        bool, default false
    observability.otlp.headers         map of str -> str

``observability.otlp.endpoint`` and the values of ``observability.otlp.headers`` may contain
``${tenant_id}`` and ``${node_id}``; :meth:`DaemonConfig.expand` substitutes them once the daemon
knows its identity. Any other ``${name}`` is refused at parse time, naming the key; write
``$${`` for a literal ``${``.

Errors are :class:`ConfigFileError` (a :class:`~aegis_edge_core.errors.ConfigError`) whose
message reads ``source:line:column: dotted.key: expected ..., got ...``. Bad YAML names the line
and column from the parser's mark; a key set twice in one mapping is refused rather than
silently taking the last value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import attrs

from aegis_edge_core.capability_limits import CapabilityError, check_labels
from aegis_edge_core.errors import ConfigError
from aegis_edge_core.policy import DEFAULT_ALLOWED_TOOLS, ToolPolicy, ToolRestriction

# PyYAML (~1 MB resident) is imported where YAML text is parsed or written, so that a daemon
# with no aegis-config.yaml never loads it.
if TYPE_CHECKING:
    import yaml

__all__ = [
    "CONFIG_FILENAME",
    "DEFAULT_CONFIG",
    "EXPANSION_VARIABLES",
    "MAX_CONFIG_BYTES",
    "CmdRunConfig",
    "ConfigFileError",
    "DaemonConfig",
    "HeartbeatConfig",
    "LoggingConfig",
    "ObservabilityConfig",
    "OtlpConfig",
    "RelaySettings",
    "ToolsConfig",
    "merge_config",
    "parse_config",
    "parse_duration",
    "parse_label",
    "parse_relay_settings",
    "render_config",
]

CONFIG_FILENAME: Final = "aegis-config.yaml"
"""The config file's name inside the daemon's state directory."""

MAX_CONFIG_BYTES: Final = 1024 * 1024
"""Config text larger than this is refused before parsing."""

EXPANSION_VARIABLES: Final = ("tenant_id", "node_id")
"""The ``${...}`` names :meth:`DaemonConfig.expand` knows."""

LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS: Final = ("json", "text")


class ConfigFileError(ConfigError):
    """A config error located in its source: ``source:line:column: path: message``.

    ``line`` and ``column`` are 1-based, or ``None`` when the value did not come from text
    (e.g. relay settings given as a mapping). ``detail`` is the message without location.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str,
        path: str = "",
        hint: str = "",
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        super().__init__(message, path=path, hint=hint)
        self.detail = message
        self.source = source
        self.line = line
        self.column = column
        where = source if line is None else f"{source}:{line}:{column}"
        self.message = f"{where}: {self.message}"
        self.args = (self.message,)


# -- value checks, shared by the parser and the attrs validators ------------------------------


def _got(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return repr(value)


def _positive_int(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"expected a positive integer, got {_got(value)}", path=path)
    return value


_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*")
_UNIT_SECS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object, path: str = "") -> float:
    """Seconds from a number or a string such as ``"30s"``, ``"5m"``, ``"1.5h"``, ``"500ms"``.

    Raises :class:`ConfigError` naming ``path`` unless the result is positive and finite.
    """
    secs: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        secs = float(value)
    elif isinstance(value, str):
        m = _DURATION.fullmatch(value)
        if m:
            secs = float(m.group(1)) * _UNIT_SECS[m.group(2)]
    if secs is None or not math.isfinite(secs) or secs <= 0:
        raise ConfigError(
            f"expected a positive duration in seconds (e.g. 30 or '30s'), got {_got(value)}",
            path=path,
        )
    return secs


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"expected true or false, got {_got(value)}", path=path)
    return value


def _endpoint(value: object, path: str) -> str:
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
        raise ConfigError(
            f"expected an endpoint such as 'host:443', got {_got(value)}",
            path=path,
        )
    return value


def _choice(options: tuple[str, ...]) -> Callable[[object, str], str]:
    def check(value: object, path: str) -> str:
        if isinstance(value, str) and value.lower() in options:
            return value.lower()
        raise ConfigError(f"expected one of {', '.join(options)}, got {_got(value)}", path=path)

    return check


def _str_list(value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f"expected a list of strings, got {_got(value)}", path=path)
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"expected a non-empty string, got {_got(item)}", path=f"{path}[{i}]")
    return tuple(dict.fromkeys(value))


_LABEL_KEY = re.compile(r"[A-Za-z0-9_./-]+")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


def _str_map(key_re: re.Pattern[str], key_kind: str) -> Callable[[object, str], Mapping[str, str]]:
    def check(value: object, path: str) -> Mapping[str, str]:
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping of strings, got {_got(value)}", path=path)
        out: dict[str, str] = {}
        for k, v in value.items():
            if not isinstance(k, str) or not key_re.fullmatch(k):
                raise ConfigError(f"expected a {key_kind}, got {_got(k)}", path=f"{path}.{k}")
            if not isinstance(v, str):
                raise ConfigError(
                    f"expected a string, got {_got(v)}",
                    path=f"{path}.{k}",
                    hint="quote values that YAML would read as numbers or booleans",
                )
            out[k] = v
        return MappingProxyType(out)

    return check


_label_map = _str_map(_LABEL_KEY, "label name (letters, digits, '_', '.', '/', '-')")


def _labels(value: object, path: str) -> Mapping[str, str]:
    """Label names and values, within the bounds a capability snapshot may carry (the
    relay refuses a larger one, so the host owner hears about it here, by key)."""
    labels = _label_map(value, path)
    try:
        check_labels(labels, field=path)
    except CapabilityError as err:
        raise ConfigError(err.detail, path=err.field, hint=err.hint) from None
    return labels


_headers = _str_map(_HEADER_NAME, "header name")

_VAR = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")


def _expand(text: str, values: Mapping[str, str] | None, path: str) -> str:
    """Substitute ``${name}``; with ``values=None`` only check the names."""

    def sub(m: re.Match[str]) -> str:
        matched = m.group(0)
        if matched == "$${":
            return "${"
        if matched == "${":
            raise ConfigError(f"unterminated '${{' in {text!r}", path=path, hint="write '$${'")
        name = m.group(1)
        if name not in EXPANSION_VARIABLES:
            known = ", ".join(f"${{{v}}}" for v in EXPANSION_VARIABLES)
            raise ConfigError(
                f"unknown variable ${{{name}}} in {text!r}",
                path=path,
                hint=f"known variables: {known}; write '$${{' for a literal '${{'",
            )
        return matched if values is None else values[name]

    return _VAR.sub(sub, text)


def _expandable_endpoint(value: object, path: str) -> str:
    text = _endpoint(value, path)
    _expand(text, None, path)
    return text


def _expandable_headers(value: object, path: str) -> Mapping[str, str]:
    headers = _headers(value, path)
    for k, v in headers.items():
        _expand(v, None, f"{path}.{k}")
    return headers


def _tool_list(value: object, path: str) -> tuple[str, ...]:
    names = _str_list(value, path)
    # The policy module owns what a tool name looks like; its errors already name the path.
    ToolRestriction(source="tools", allow=names)
    return names


def _pattern_list(value: object, path: str) -> tuple[str, ...]:
    patterns = _str_list(value, path)
    ToolRestriction(source="tools", cmd_run_allow=patterns)
    return patterns


def _env_list(value: object, path: str) -> tuple[str, ...]:
    names = _str_list(value, path)
    ToolRestriction(source="tools", cmd_run_allow_env=names)
    return names


def _cwd_list(value: object, path: str) -> tuple[str, ...]:
    patterns = _str_list(value, path)
    ToolRestriction(source="tools", cmd_run_allow_cwd=patterns)
    return patterns


def _validator(
    check: Callable[[object, str], object], path: str, *, nullable: bool = False
) -> Callable[[Any, Any, Any], None]:
    def validate(_inst: object, _attr: object, value: object) -> None:
        if value is None and nullable:
            return
        check(value, path)

    return validate


def _frozen_map(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


def _as_tuple(value: Iterable[str], path: str) -> tuple[str, ...]:
    if isinstance(value, str):
        # Iterating would split it into characters: almost certainly a missing list.
        raise ConfigError(f"expected a list of strings, got {value!r}", path=path)
    return tuple(dict.fromkeys(value))  # duplicates dropped, as the parser does


# attrs converters must be named functions for mypy's attrs plugin, hence one per field.
def _conv_tools_allow(value: Iterable[str]) -> tuple[str, ...]:
    return _as_tuple(value, "tools.allow")


def _conv_cmd_run_allow(value: Iterable[str] | None) -> tuple[str, ...] | None:
    return None if value is None else _as_tuple(value, "tools.cmd_run.allow")


def _conv_allow_env(value: Iterable[str]) -> tuple[str, ...]:
    return _as_tuple(value, "tools.cmd_run.allow_env")


def _conv_allow_cwd(value: Iterable[str]) -> tuple[str, ...]:
    return _as_tuple(value, "tools.cmd_run.allow_cwd")


def _conv_default_timeout(value: float | str) -> float:
    return parse_duration(value, "tools.cmd_run.default_timeout")


def _conv_heartbeat_interval(value: float | str) -> float:
    return parse_duration(value, "heartbeat.interval")


# -- the model ---------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class CmdRunConfig:
    """``tools.cmd_run``: which commands ``cmd.run`` may run, and its limits."""

    allow: tuple[str, ...] | None = attrs.field(
        default=None,
        converter=_conv_cmd_run_allow,
        validator=_validator(_pattern_list, "tools.cmd_run.allow", nullable=True),
    )
    allow_env: tuple[str, ...] = attrs.field(
        default=(),
        converter=_conv_allow_env,
        validator=_validator(_env_list, "tools.cmd_run.allow_env"),
    )
    allow_cwd: tuple[str, ...] = attrs.field(
        default=(),
        converter=_conv_allow_cwd,
        validator=_validator(_cwd_list, "tools.cmd_run.allow_cwd"),
    )
    output_cap_bytes: int = attrs.field(
        default=1024 * 1024,
        validator=_validator(_positive_int, "tools.cmd_run.output_cap_bytes"),
    )
    default_timeout: float = attrs.field(
        default=300.0,
        converter=_conv_default_timeout,
    )


@attrs.frozen(kw_only=True)
class ToolsConfig:
    """``tools``: the host owner's tool policy and concurrency bound."""

    allow: tuple[str, ...] = attrs.field(
        default=DEFAULT_ALLOWED_TOOLS,
        converter=_conv_tools_allow,
        validator=_validator(_tool_list, "tools.allow"),
    )
    max_concurrent: int = attrs.field(
        default=4, validator=_validator(_positive_int, "tools.max_concurrent")
    )
    cmd_run: CmdRunConfig = attrs.field(factory=CmdRunConfig)


@attrs.frozen(kw_only=True)
class HeartbeatConfig:
    """``heartbeat``: set by the relay when it accepts the stream, never in the local file."""

    interval: float = attrs.field(default=30.0, converter=_conv_heartbeat_interval)


@attrs.frozen(kw_only=True)
class LoggingConfig:
    """``logging``: level and line format of the daemon's logs (JSON lines by default)."""

    level: str = attrs.field(
        default="info", validator=_validator(_choice(LOG_LEVELS), "logging.level")
    )
    format: str = attrs.field(
        default="json", validator=_validator(_choice(LOG_FORMATS), "logging.format")
    )


@attrs.frozen(kw_only=True)
class OtlpConfig:
    """``observability.otlp``: where to export traces and logs; unset endpoint = no export.

    ``${tenant_id}``/``${node_id}`` in the endpoint and header values are checked by the
    parser and substituted by :meth:`DaemonConfig.expand` (which refuses unknown names).
    Render the unexpanded config: an expanded value may hold a literal ``${``.
    """

    endpoint: str | None = attrs.field(
        default=None,
        validator=_validator(_endpoint, "observability.otlp.endpoint", nullable=True),
    )
    insecure: bool = attrs.field(
        default=False, validator=_validator(_bool, "observability.otlp.insecure")
    )
    headers: Mapping[str, str] = attrs.field(
        factory=dict,
        converter=_frozen_map,
        validator=_validator(_headers, "observability.otlp.headers"),
    )


@attrs.frozen(kw_only=True)
class ObservabilityConfig:
    """``observability``: telemetry export."""

    otlp: OtlpConfig = attrs.field(factory=OtlpConfig)


@attrs.frozen(kw_only=True)
class DaemonConfig:
    """The daemon's merged configuration. Build it with :func:`parse_config` and
    :func:`merge_config`, or directly (every field is validated on construction).

    ``restriction`` holds the relay's narrowing of the tool policy (set by
    :func:`merge_config`); :meth:`policy` applies it.
    """

    relay: str | None = attrs.field(
        default=None, validator=_validator(_endpoint, "relay", nullable=True)
    )
    labels: Mapping[str, str] = attrs.field(
        factory=dict, converter=_frozen_map, validator=_validator(_labels, "labels")
    )
    tools: ToolsConfig = attrs.field(factory=ToolsConfig)
    heartbeat: HeartbeatConfig = attrs.field(factory=HeartbeatConfig)
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)
    observability: ObservabilityConfig = attrs.field(factory=ObservabilityConfig)
    restriction: ToolRestriction | None = None

    def policy(self) -> ToolPolicy:
        """The effective tool policy: the host owner's, narrowed by the relay's restriction."""
        cmd_run = self.tools.cmd_run
        local = ToolPolicy(
            allow=self.tools.allow,
            cmd_run_allow=cmd_run.allow,
            cmd_run_allow_env=cmd_run.allow_env,
            cmd_run_allow_cwd=cmd_run.allow_cwd,
        )
        return local.narrow(self.restriction)

    def expand(self, *, tenant_id: str, node_id: str) -> DaemonConfig:
        """Substitute ``${tenant_id}`` and ``${node_id}`` in the OTLP endpoint and headers."""
        values = {"tenant_id": tenant_id, "node_id": node_id}
        otlp = self.observability.otlp
        endpoint = otlp.endpoint
        if endpoint is not None:
            endpoint = _expand(endpoint, values, "observability.otlp.endpoint")
        headers = {
            k: _expand(v, values, f"observability.otlp.headers.{k}")
            for k, v in otlp.headers.items()
        }
        new_otlp = attrs.evolve(otlp, endpoint=endpoint, headers=headers)
        return attrs.evolve(self, observability=attrs.evolve(self.observability, otlp=new_otlp))

    @classmethod
    def for_enrollment(
        cls,
        *,
        relay: str,
        allow_tools: Iterable[str] = (),
        labels: Mapping[str, str] | None = None,
    ) -> DaemonConfig:
        """The first config ``aegis edge enroll`` writes: defaults plus the owner's flags.

        ``allow_tools`` are added to the default allowed tools (``--allow-tool cmd.run``
        enables ``cmd.run`` for any command; narrow it later with ``tools.cmd_run.allow``).
        """
        allow = tuple(dict.fromkeys((*DEFAULT_ALLOWED_TOOLS, *allow_tools)))
        return cls(relay=relay, labels=dict(labels or {}), tools=ToolsConfig(allow=allow))


DEFAULT_CONFIG: Final = DaemonConfig()
"""The configuration of a daemon whose file says nothing."""


# -- the schema the parser walks ---------------------------------------------------------------


@attrs.frozen
class _Leaf:
    check: Callable[[object, str], object]
    nullable: bool = False
    local: bool = True  # may appear in aegis-config.yaml
    relay: bool = True  # may be pushed by the relay


_Schema = Mapping[str, "_Leaf | _Schema"]

_SCHEMA: _Schema = {
    "relay": _Leaf(_endpoint, nullable=True, relay=False),
    "labels": _Leaf(_labels, relay=False),
    "tools": {
        "allow": _Leaf(_tool_list),
        "max_concurrent": _Leaf(_positive_int),
        "cmd_run": {
            "allow": _Leaf(_pattern_list, nullable=True),
            "allow_env": _Leaf(_env_list),
            "allow_cwd": _Leaf(_cwd_list),
            "output_cap_bytes": _Leaf(_positive_int),
            "default_timeout": _Leaf(parse_duration),
        },
    },
    "heartbeat": {"interval": _Leaf(parse_duration, local=False)},
    "logging": {"level": _Leaf(_choice(LOG_LEVELS)), "format": _Leaf(_choice(LOG_FORMATS))},
    "observability": {
        "otlp": {
            "endpoint": _Leaf(_expandable_endpoint, nullable=True),
            "insecure": _Leaf(_bool),
            "headers": _Leaf(_expandable_headers),
        }
    },
}

_PERMISSION_KEYS = frozenset(
    {"tools.allow", "tools.cmd_run.allow", "tools.cmd_run.allow_env", "tools.cmd_run.allow_cwd"}
)


def _all_paths(schema: _Schema, prefix: str = "") -> list[str]:
    out = []
    for key, sub in schema.items():
        path = f"{prefix}{key}"
        out.append(path)
        if not isinstance(sub, _Leaf):
            out.extend(_all_paths(sub, f"{path}."))
    return out


_ALL_PATHS = _all_paths(_SCHEMA)


def _suggest(path: str, key: str, siblings: Iterable[str]) -> str:
    """A 'did you mean' hint: nearest sibling first, else nearest key anywhere."""
    import difflib  # only for a mistyped key: a daemon reading a good file never needs it

    near = difflib.get_close_matches(key, list(siblings), n=1, cutoff=0.6)
    if near:
        parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
        return f"did you mean {parent + near[0]!r}?"
    near = difflib.get_close_matches(path, _ALL_PATHS, n=1, cutoff=0.6)
    if not near:
        near = [p for p in _ALL_PATHS if p.rsplit(".", 1)[-1] == key][:1]
    if near:
        return f"did you mean {near[0]!r}?"
    top = ", ".join(_SCHEMA)
    return f"valid top-level keys: {top}"


def _walk(
    data: object, schema: _Schema, prefix: str, *, layer: str, out: dict[str, object]
) -> None:
    """Validate ``data`` against ``schema``; record every set leaf as ``out[path] = value``."""
    if data is None:
        return  # an empty section (all children commented out) is an empty mapping
    if not isinstance(data, Mapping):
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(
            f"expected a mapping at {where}, got {_got(data)}", path=prefix.rstrip(".")
        )
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"keys must be strings, got {_got(key)}", path=f"{prefix}{key}".rstrip(".")
            )
        path = f"{prefix}{key}"
        sub = schema.get(key)
        if sub is None:
            raise ConfigError("unknown key", path=path, hint=_suggest(path, key, schema))
        if not isinstance(sub, _Leaf):
            _walk(value, sub, f"{path}.", layer=layer, out=out)
            continue
        if layer == "local" and not sub.local:
            raise ConfigError(
                "is set by the relay when it accepts the daemon, not in the local file",
                path=path,
                hint="remove it; the relay's --heartbeat-interval decides",
            )
        if layer == "relay" and not sub.relay:
            raise ConfigError(
                "belongs to the host owner; a relay may not set it",
                path=path,
                hint="only the local aegis-config.yaml sets it",
            )
        if value is None and sub.nullable:
            out[path] = None
        else:
            out[path] = sub.check(value, path)


# -- locating errors in the YAML text -----------------------------------------------------------


def _marks(node: yaml.Node | None) -> tuple[dict[str, yaml.Mark], dict[str, yaml.Mark]]:
    """Map dotted paths to the start marks of their value and key nodes.

    Raises :class:`ConfigError` for a key set twice in one mapping. Visits each node once so a
    document built from aliases ("billion laughs") stays linear.
    """
    import yaml

    values: dict[str, yaml.Mark] = {}
    keys: dict[str, yaml.Mark] = {}
    seen: set[int] = set()

    def visit(n: yaml.Node, prefix: str) -> None:
        if id(n) in seen:
            return
        seen.add(id(n))
        if isinstance(n, yaml.MappingNode):
            here: set[str] = set()
            for knode, vnode in n.value:
                if not isinstance(knode, yaml.ScalarNode):
                    continue
                path = f"{prefix}{knode.value}"
                if knode.value in here:
                    line, col = knode.start_mark.line + 1, knode.start_mark.column + 1
                    raise _Located(
                        ConfigError("key is set twice in the same mapping", path=path),
                        line,
                        col,
                    )
                here.add(knode.value)
                keys[path] = knode.start_mark
                values[path] = vnode.start_mark
                visit(vnode, f"{path}.")
        elif isinstance(n, yaml.SequenceNode):
            base = prefix.rstrip(".")
            for i, item in enumerate(n.value):
                values[f"{base}[{i}]"] = item.start_mark

    if node is not None:
        visit(node, "")
    return values, keys


class _Located(Exception):
    def __init__(self, error: ConfigError, line: int, column: int) -> None:
        super().__init__(error.message)
        self.error, self.line, self.column = error, line, column


def _detail(error: ConfigError) -> str:
    if error.path and error.message.startswith(f"{error.path}: "):
        return error.message[len(error.path) + 2 :]
    return error.message


def _locate(
    error: ConfigError, source: str, values: Mapping[str, yaml.Mark], keys: Mapping[str, yaml.Mark]
) -> ConfigFileError:
    mark = None
    unknown = _detail(error) == "unknown key"
    path = error.path
    while path and mark is None:
        mark = (keys if unknown else values).get(path) or values.get(path) or keys.get(path)
        path = path.rsplit(".", 1)[0] if "." in path else ""
    return ConfigFileError(
        _detail(error),
        source=source,
        path=error.path,
        hint=error.hint,
        line=None if mark is None else mark.line + 1,
        column=None if mark is None else mark.column + 1,
    )


def _load_yaml(text: str, source: str) -> tuple[object, dict[str, yaml.Mark], dict[str, yaml.Mark]]:
    if not isinstance(text, str):
        raise TypeError(f"parse the config from text (str), got {type(text).__name__}")
    import yaml

    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigFileError(
            f"config is {len(text)} characters; the limit is {MAX_CONFIG_BYTES}", source=source
        )
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        values, keys = _marks(node)
        data = loader.construct_document(node) if node is not None else None
    except _Located as exc:
        raise ConfigFileError(
            _detail(exc.error), source=source, path=exc.error.path, line=exc.line, column=exc.column
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "cannot parse"
        if exc.context and exc.problem:
            problem = f"{problem} ({exc.context})"
        raise ConfigFileError(
            f"invalid YAML: {problem}",
            source=source,
            hint="check indentation, colons and quoting near that position",
            line=None if mark is None else mark.line + 1,
            column=None if mark is None else mark.column + 1,
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"invalid YAML: {exc}", source=source) from None
    finally:
        loader.dispose()
    return data, values, keys


# -- building, merging, rendering --------------------------------------------------------------


def _to_tree(cfg: DaemonConfig) -> dict[str, object]:
    """Every leaf of ``cfg`` by dotted path (the relay restriction excluded)."""
    return {
        "relay": cfg.relay,
        "labels": dict(cfg.labels),
        "tools.allow": cfg.tools.allow,
        "tools.max_concurrent": cfg.tools.max_concurrent,
        "tools.cmd_run.allow": cfg.tools.cmd_run.allow,
        "tools.cmd_run.allow_env": cfg.tools.cmd_run.allow_env,
        "tools.cmd_run.allow_cwd": cfg.tools.cmd_run.allow_cwd,
        "tools.cmd_run.output_cap_bytes": cfg.tools.cmd_run.output_cap_bytes,
        "tools.cmd_run.default_timeout": cfg.tools.cmd_run.default_timeout,
        "heartbeat.interval": cfg.heartbeat.interval,
        "logging.level": cfg.logging.level,
        "logging.format": cfg.logging.format,
        "observability.otlp.endpoint": cfg.observability.otlp.endpoint,
        "observability.otlp.insecure": cfg.observability.otlp.insecure,
        "observability.otlp.headers": dict(cfg.observability.otlp.headers),
    }


def _build(flat: Mapping[str, Any], restriction: ToolRestriction | None) -> DaemonConfig:
    return DaemonConfig(
        relay=flat["relay"],
        labels=flat["labels"],
        tools=ToolsConfig(
            allow=flat["tools.allow"],
            max_concurrent=flat["tools.max_concurrent"],
            cmd_run=CmdRunConfig(
                allow=flat["tools.cmd_run.allow"],
                allow_env=flat["tools.cmd_run.allow_env"],
                allow_cwd=flat["tools.cmd_run.allow_cwd"],
                output_cap_bytes=flat["tools.cmd_run.output_cap_bytes"],
                default_timeout=flat["tools.cmd_run.default_timeout"],
            ),
        ),
        heartbeat=HeartbeatConfig(interval=flat["heartbeat.interval"]),
        logging=LoggingConfig(level=flat["logging.level"], format=flat["logging.format"]),
        observability=ObservabilityConfig(
            otlp=OtlpConfig(
                endpoint=flat["observability.otlp.endpoint"],
                insecure=flat["observability.otlp.insecure"],
                headers=flat["observability.otlp.headers"],
            )
        ),
        restriction=restriction,
    )


def parse_config(text: str, *, source: str = CONFIG_FILENAME) -> DaemonConfig:
    """Parse the text of an ``aegis-config.yaml`` over the defaults.

    ``source`` names the text in error messages (usually the file's path). An empty file is
    the defaults. Raises :class:`ConfigFileError`.
    """
    data, values, keys = _load_yaml(text, source)
    overlay: dict[str, object] = {}
    try:
        _walk(data, _SCHEMA, "", layer="local", out=overlay)
    except ConfigError as exc:
        raise _locate(exc, source, values, keys) from None
    return _build({**_to_tree(DEFAULT_CONFIG), **overlay}, None)


def _frozen_overrides(value: Mapping[str, object]) -> Mapping[str, object]:
    return MappingProxyType(dict(value))


@attrs.frozen(kw_only=True)
class RelaySettings:
    """Validated settings a relay pushed: plain overrides plus a tool-policy restriction.

    ``overrides`` maps dotted keys to values (e.g. ``{"logging.level": "debug"}``).
    """

    overrides: Mapping[str, object] = attrs.field(factory=dict, converter=_frozen_overrides)
    restriction: ToolRestriction | None = None


def parse_relay_settings(
    data: Mapping[str, object] | str | None, *, source: str = "relay settings"
) -> RelaySettings:
    """Validate what a relay pushed: a nested mapping in the file's shape, or YAML/JSON text.

    The permission keys (``tools.allow``, ``tools.cmd_run.allow``, ``allow_env``,
    ``allow_cwd``) become a restriction; ``relay`` and ``labels``
    are refused (host-owned). Raises :class:`ConfigFileError` naming ``source``.
    """
    values: Mapping[str, yaml.Mark] = {}
    keys: Mapping[str, yaml.Mark] = {}
    tree: object = data
    if isinstance(data, str):
        tree, values, keys = _load_yaml(data, source)
    flat: dict[str, object] = {}
    try:
        _walk(tree, _SCHEMA, "", layer="relay", out=flat)
    except ConfigError as exc:
        raise _locate(exc, source, values, keys) from None
    allow = flat.pop("tools.allow", None)
    cmd_run_allow = flat.pop("tools.cmd_run.allow", None)
    allow_env = flat.pop("tools.cmd_run.allow_env", None)
    allow_cwd = flat.pop("tools.cmd_run.allow_cwd", None)
    restriction = None
    if any(v is not None for v in (allow, cmd_run_allow, allow_env, allow_cwd)):
        restriction = ToolRestriction(
            source="relay.tools",
            allow=allow,  # type: ignore[arg-type]
            cmd_run_allow=cmd_run_allow,  # type: ignore[arg-type]
            cmd_run_allow_env=allow_env,  # type: ignore[arg-type]
            cmd_run_allow_cwd=allow_cwd,  # type: ignore[arg-type]
        )
    return RelaySettings(overrides=flat, restriction=restriction)


def merge_config(local: DaemonConfig, relay: RelaySettings | None = None) -> DaemonConfig:
    """Layer the relay's settings over the local config (itself over the defaults).

    Plain keys: the relay wins. Tool permissions: the local policy wins and the relay's lists
    only narrow it (see :meth:`DaemonConfig.policy`). Merge the *local* config with the latest
    push each time; merging onto an already merged config would replace its restriction.
    """
    if relay is None:
        return local
    flat = {**_to_tree(local), **relay.overrides}
    return _build(flat, relay.restriction)


def parse_label(text: str) -> tuple[str, str]:
    """Split a ``--label k=v`` argument, validating the name; raises :class:`ConfigError`."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"expected k=v, got {text!r}", path="labels")
    _labels({key: value}, "labels")
    return key, value


def render_config(cfg: DaemonConfig, *, include_defaults: bool = False) -> str:
    """YAML text for ``cfg``'s host-owned keys; :func:`parse_config` reads it back equal.

    Relay-owned parts (``heartbeat``, the relay's restriction) are not written. Keys equal to
    their default are left out unless ``include_defaults``, so later releases can change
    defaults; ``relay``, ``labels`` and ``tools.allow`` are always written because the owner
    should see what the host allows.
    """
    tree = _to_tree(cfg)
    defaults = _to_tree(DEFAULT_CONFIG)
    always = {"relay", "labels", "tools.allow"}
    nested: dict[str, Any] = {}
    for path, value in tree.items():
        if path == "heartbeat.interval" or value is None:
            continue
        if not include_defaults and path not in always and value == defaults[path]:
            continue
        if path == "labels" and not value:
            continue
        node = nested
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    import yaml

    body = yaml.safe_dump(nested, sort_keys=False, default_flow_style=False, allow_unicode=True)
    header = (
        f"# {CONFIG_FILENAME}: the host owner's settings for this aegis-edge daemon.\n"
        "# tools.allow decides which tools may run here; a relay can narrow it, never widen it.\n"
        "# cmd.run is off unless listed; restrict it with tools.cmd_run.allow patterns.\n"
    )
    return header + body
