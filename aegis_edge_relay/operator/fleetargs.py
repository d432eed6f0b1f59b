"""The fleet commands' arguments: flags, and the ``FleetRunSpec`` they make.

Selector, mode, on-error and deadline are checked here with the core's parsers before any
call, so a typo points at its column without a round trip (the relay checks again).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any, Final

from aegis_edge_cli import CliError
from aegis_edge_core.fleet.errors import FleetSpecError, SelectorError
from aegis_edge_core.fleet.selector import parse_selector
from aegis_edge_core.fleet.spec import parse_mode, parse_on_error
from aegis_edge_core.wire import admin_pb2
from aegis_edge_relay.operator.common import nonneg_int, parse_duration_secs

__all__ = [
    "FOLLOW_AUTO_LIMIT",
    "add_fleet_policy_flags",
    "add_follow_flags",
    "add_secret_arg_flag",
    "add_target_flag",
    "add_tool_args",
    "build_fleet_spec",
    "parse_arg_pairs",
    "parse_secret_args",
    "validate_mode",
    "validate_on_error",
    "validate_selector",
]

FOLLOW_AUTO_LIMIT: Final = 20
"""On a terminal, ``fleet run|watch|rerun`` print live output by default for runs of at most
this many targets; ``--follow`` forces it for any size, ``--no-follow`` turns it off."""


def parse_arg_pairs(pairs: Sequence[str], json_pairs: Sequence[str] = ()) -> dict[str, Any]:
    """``--arg k=v`` (string value, split on the first ``=`` only) and ``--arg-json k=<json>``.

    ``--arg cmd="a && b=c"`` gives ``{"cmd": "a && b=c"}``. A key given twice is an error.
    """
    out: dict[str, Any] = {}

    def put(flag: str, item: str, value_of: Callable[[str], Any]) -> None:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CliError(f"{flag} {item!r}: expected KEY=VALUE")
        if key in out:
            raise CliError(f"{flag} {item!r}: argument {key!r} given twice")
        out[key] = value_of(raw)

    def as_json(raw: str) -> Any:
        try:
            return json.loads(raw)
        except ValueError as err:
            raise CliError(f"--arg-json: value is not valid JSON ({err}): {raw!r}") from None

    for item in pairs:
        put("--arg", item, str)
    for item in json_pairs:
        put("--arg-json", item, as_json)
    return out


def parse_secret_args(pairs: Sequence[str]) -> dict[str, str]:
    """``--secret-arg k=v``: like ``--arg``, but the error never echoes the value."""
    out: dict[str, str] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CliError("--secret-arg: expected KEY=VALUE (the value is not shown here)")
        if key in out:
            raise CliError(f"--secret-arg {key}=...: argument {key!r} given twice")
        out[key] = value
    return out


def validate_selector(text: str) -> None:
    """Check ``--target`` with the core's selector parser (the relay checks it again).

    The error keeps the core's column and draws a caret under it on a second line.
    """
    if not text.strip():
        raise CliError("--target: the selector is empty (write 'all' to mean every daemon)")
    try:
        parse_selector(text)
    except SelectorError as err:
        raise CliError(f"--target: {err.render()}") from None


def validate_mode(text: str) -> None:
    try:
        parse_mode(text)
    except FleetSpecError as err:
        raise CliError(f"--mode: {err}") from None


def validate_on_error(text: str) -> None:
    try:
        parse_on_error(text)
    except FleetSpecError as err:
        raise CliError(f"--on-error: {err}") from None


def build_fleet_spec(
    args: argparse.Namespace, *, tool: str | None = None
) -> admin_pb2.FleetRunSpec:
    """The ``FleetRunSpec`` for ``fleet preview|run|keys rotate``, validated locally first."""
    selector: str = args.target
    validate_selector(selector)
    tool_name = tool if tool is not None else args.tool
    if not tool_name:
        raise CliError("--tool: a tool name is required (e.g. cmd.run, sys.info, edge.ping)")
    mode: str = getattr(args, "mode", None) or "all"
    on_error: str = getattr(args, "on_error", None) or "continue"
    validate_mode(mode)
    validate_on_error(on_error)
    deadline_secs = 0.0
    deadline: str | None = getattr(args, "deadline", None)
    if deadline:
        deadline_secs = parse_duration_secs(deadline, flag="--deadline")
    tool_args: dict[str, Any] = {}
    args_json: str | None = getattr(args, "args_json", None)
    if args_json:
        try:
            loaded = json.loads(args_json)
        except ValueError as err:
            raise CliError(f"--args-json: not valid JSON ({err})") from None
        if not isinstance(loaded, dict):
            raise CliError("--args-json: expected a JSON object of tool arguments")
        tool_args.update(loaded)
    extra = parse_arg_pairs(getattr(args, "arg", None) or (), getattr(args, "arg_json", None) or ())
    for key in extra:
        if key in tool_args:
            raise CliError(f"--arg {key}=...: argument {key!r} is also in --args-json")
    tool_args.update(extra)
    secrets = parse_secret_args(getattr(args, "secret_arg", None) or ())
    for key in secrets:
        if key in tool_args:
            raise CliError(
                f"--secret-arg {key}=...: argument {key!r} is also given as a plain argument"
            )
    canary: int = getattr(args, "canary", None) or 0
    if canary < 0:
        raise CliError("--canary: must be zero or more")
    return admin_pb2.FleetRunSpec(
        selector=selector,
        tool=tool_name,
        args_json=json.dumps(tool_args, sort_keys=True) if tool_args else "",
        mode=mode,
        on_error=on_error,
        deadline_secs=deadline_secs,
        canary=canary,
        tenant_id=getattr(args, "tenant", None) or "",
        secret_args_json=json.dumps(secrets, sort_keys=True) if secrets else "",
    )


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


def add_fleet_policy_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        default="all",
        help="all (default), sequential, rolling=N (at most N in flight) or rolling=N%%",
    )
    parser.add_argument(
        "--on-error",
        default="continue",
        help="continue (default), fail-fast or stop-after=N",
    )
    parser.add_argument(
        "--deadline", metavar="DURATION", help="bound on the whole run, e.g. 120s or 10m"
    )
    parser.add_argument(
        "--canary",
        type=nonneg_int,
        default=0,
        metavar="K",
        help="run on K targets first and go on only if they all succeed",
    )
    parser.add_argument("--tenant", metavar="TENANT", help="only daemons of this tenant")


def add_target_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        required=True,
        metavar="SELECTOR",
        help="which daemons, e.g. all, tags=prod, 'tags=AnyOf(a,b) os=linux'",
    )


def add_tool_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a string tool argument, split on the first '=' (repeatable)",
    )
    parser.add_argument(
        "--arg-json",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help='a tool argument as JSON, e.g. argv=\'["ls","-l"]\' (repeatable)',
    )
    parser.add_argument(
        "--args-json", metavar="JSON", help="every tool argument as one JSON object"
    )
    add_secret_arg_flag(parser)


def add_secret_arg_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--secret-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a string tool argument that is sent to the daemons but never stored, logged "
        "or shown (<secret>); a rerun asks for it again (repeatable)",
    )


def add_follow_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--follow",
        dest="follow",
        action="store_true",
        default=None,
        help="print each target's output lines as they arrive, prefixed by host "
        f"(default on a terminal for runs of up to {FOLLOW_AUTO_LIMIT} targets)",
    )
    group.add_argument(
        "--no-follow", dest="follow", action="store_false", help="do not print live output"
    )
