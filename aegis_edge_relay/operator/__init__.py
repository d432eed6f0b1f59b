"""The operator side: the Admin API's Python client and the ``aegis edge`` operator commands.

It imports nothing of the relay server (an import-linter contract keeps it so): it talks to
a relay only over the Admin API, like any other client.

* :mod:`.client` -- :class:`AdminClient`, the SDK for automation: one method per Admin RPC,
  connection (:mod:`.connection`) from arguments, environment or a relay data directory,
  errors (:mod:`.errors`) as :class:`AdminError` subclasses carrying the relay's sentence.
* :mod:`.jsonrepr` -- the one JSON representation of Admin messages (``--output json``, and
  the HTTP API after it).
* :mod:`.render` -- tables, detail views, relative times, the live progress and output.
* the commands by area -- :mod:`.hosts` (``ls``, ``show``, ``tag``), :mod:`.keys`
  (``keys revoke-remote``), :mod:`.tenants`, :mod:`.tokens`, :mod:`.fleet` (with its
  arguments in :mod:`.fleetargs`) and :mod:`.groups`, sharing :mod:`.common`.

:func:`register` adds every command to the ``aegis`` tree. Every command finds the relay
through ``--relay HOST:PORT``, ``--ca-cert PATH`` and ``--token TOKEN|@FILE`` (or
``--relay-data-dir DIR``) or the environment (``AEGIS_RELAY``, ``AEGIS_CA_CERT``,
``AEGIS_OPERATOR_TOKEN``). A failure is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import os

from aegis_edge_cli import CommandTree
from aegis_edge_relay.operator import fleet, groups, hosts, keys, tenants, tokens
from aegis_edge_relay.operator.client import (
    ENV_CA_CERT,
    ENV_RELAY,
    ENV_RELAY_DATA_DIR,
    ENV_TOKEN,
    AdminClient,
    AdminError,
    Connection,
)
from aegis_edge_relay.operator.common import parse_duration_secs, resolve_connection
from aegis_edge_relay.operator.fleetargs import (
    build_fleet_spec,
    parse_arg_pairs,
    validate_mode,
    validate_on_error,
    validate_selector,
)
from aegis_edge_relay.operator.jsonrepr import (
    command_record_to_dict,
    fleet_preview_to_dict,
    fleet_run_to_dict,
    group_to_dict,
    host_to_dict,
    iso_time,
    result_value,
    run_outcome_name,
    status_name,
    target_outcome_name,
    target_result_to_dict,
)
from aegis_edge_relay.operator.render import (
    HOST_COLUMNS,
    RESULT_WIDTH,
    TARGET_COLUMNS,
    LiveOutput,
    compact_result,
    fleet_run_summary,
    format_duration,
    host_row,
    last_output_line,
    relative_time,
    target_row,
)

__all__ = [
    "ENV_CA_CERT",
    "ENV_RELAY",
    "ENV_RELAY_DATA_DIR",
    "ENV_TOKEN",
    "HOST_COLUMNS",
    "RESULT_WIDTH",
    "TARGET_COLUMNS",
    "AdminClient",
    "AdminError",
    "Connection",
    "LiveOutput",
    "build_fleet_spec",
    "command_record_to_dict",
    "compact_result",
    "fleet_preview_to_dict",
    "fleet_run_summary",
    "fleet_run_to_dict",
    "format_duration",
    "group_to_dict",
    "host_row",
    "host_to_dict",
    "iso_time",
    "last_output_line",
    "parse_arg_pairs",
    "parse_duration_secs",
    "register",
    "relative_time",
    "resolve_connection",
    "result_value",
    "run_outcome_name",
    "status_name",
    "target_outcome_name",
    "target_result_to_dict",
    "target_row",
    "validate_mode",
    "validate_on_error",
    "validate_selector",
]

_LiveOutput = LiveOutput  # its name in operator_cli, which the live-output tests still use


def register(tree: CommandTree) -> None:
    """Add the operator-side ``aegis edge`` commands to ``tree``."""
    # gRPC's C core reads its log level when grpc is first imported and would print a failed
    # TLS handshake on stderr at INFO, above our one-line error. Errors only, unless the
    # operator set GRPC_VERBOSITY. (Only effective if nothing imported grpc before.)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    for area in (hosts, keys, tenants, tokens, fleet, groups):
        area.register(tree)
