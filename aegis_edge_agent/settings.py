"""The daemon's view of ``aegis-config.yaml``: the core's config model, read from disk.

Parsing, validation and ``${tenant_id}`` expansion are the core's
(:mod:`aegis_edge_core.config`); this adapter reads the file and hands the daemon the
handful of values it uses as one small frozen object.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

from aegis_edge_core.config import DaemonConfig, parse_config, render_config
from aegis_edge_core.errors import ConfigError
from aegis_edge_core.policy import ToolPolicy

__all__ = ["AgentSettings", "OtlpSettings", "load_settings", "render_settings"]


@attrs.frozen(kw_only=True)
class OtlpSettings:
    endpoint: str
    insecure: bool = False
    headers: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class AgentSettings:
    config: DaemonConfig = attrs.field(factory=DaemonConfig)

    @property
    def policy(self) -> ToolPolicy:
        return self.config.policy()

    @property
    def max_concurrent(self) -> int:
        return self.config.tools.max_concurrent

    @property
    def output_cap_bytes(self) -> int:
        return self.config.tools.cmd_run.output_cap_bytes

    @property
    def default_timeout_secs(self) -> float:
        return self.config.tools.cmd_run.default_timeout

    @property
    def labels(self) -> Mapping[str, str]:
        return self.config.labels

    @property
    def otlp(self) -> OtlpSettings | None:
        otlp = self.config.observability.otlp
        if not otlp.endpoint:
            return None
        return OtlpSettings(
            endpoint=otlp.endpoint, insecure=otlp.insecure, headers=dict(otlp.headers)
        )


def load_settings(path: Path, *, variables: Mapping[str, str] | None = None) -> AgentSettings:
    """Read ``aegis-config.yaml`` (missing means all defaults); raises ConfigError."""
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return AgentSettings()
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {err.start})",
            hint="fix or restore the file; aegis edge enroll --force writes a fresh one",
        ) from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    cfg = parse_config(text, source=str(path))
    if variables:
        cfg = cfg.expand(
            tenant_id=variables.get("tenant_id", ""), node_id=variables.get("node_id", "")
        )
    return AgentSettings(config=cfg)


def render_settings(*, relay: str, allow: Sequence[str], labels: Mapping[str, str]) -> str:
    """The ``aegis-config.yaml`` that ``aegis edge enroll`` writes."""
    cfg = DaemonConfig.for_enrollment(relay=relay, allow_tools=allow, labels=labels)
    return render_config(cfg) + (
        "# To ship logs and traces to a collector:\n"
        "# observability:\n"
        "#   otlp:\n"
        "#     endpoint: otel.example.com:4317\n"
        "#     insecure: false\n"
        "#     headers:\n"
        "#       x-tenant-id: ${tenant_id}\n"
    )
