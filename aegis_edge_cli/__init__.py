"""The ``aegis`` command: a thin root that the agent and the relay fill through entry points.

Neither server package imports the other (DESIGN.md), so the command tree is assembled at
start-up from the entry-point group ``aegis.cli``: each entry point is a callable taking a
:class:`CommandTree` and adding its commands under ``aegis edge`` or ``aegis relay``. The
agent contributes the host-side commands, the relay the ``relay`` and operator-side ones.

Every command answers with exit code 0 on success; on failure it raises :class:`CliError`
(or any :class:`aegis_edge_core.errors.AegisError`) and the root prints one clear line on
stderr and exits non-zero. Tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import entry_points
from typing import Any, NoReturn

from aegis_edge_core.errors import AegisError

__all__ = [
    "CliError",
    "CommandTree",
    "Handler",
    "add_output_flag",
    "main",
    "print_json",
    "print_table",
]

Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """A failure to report as one line on stderr; ``exit_code`` is the process status."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; one line that names the command is clearer.
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class CommandTree:
    """The ``aegis edge`` and ``aegis relay`` groups that entry points add commands to."""

    def __init__(self) -> None:
        self.parser = _Parser(
            prog="aegis",
            description="aegis-edge: edge daemons, their relay and the operator tools.",
        )
        self._top = self.parser.add_subparsers(dest="group", metavar="{edge,relay}")
        self._top.required = True
        self._groups: dict[str, argparse._SubParsersAction[_Parser]] = {}
        self._nested: dict[tuple[str, ...], argparse._SubParsersAction[_Parser]] = {}
        self._commands: set[tuple[str, ...]] = set()
        for name, help_ in (
            ("edge", "enroll and run a daemon; operate the fleet"),
            ("relay", "run and administer the reference relay"),
        ):
            group = self._top.add_parser(name, help=help_)
            sub = group.add_subparsers(dest=f"{name}_command", metavar="COMMAND")
            sub.required = True
            self._groups[name] = sub
            self._nested[(name,)] = sub

    def command(self, path: str, handler: Handler, *, help: str) -> argparse.ArgumentParser:
        """Add a command such as ``"edge fleet run"``; returns its parser for arguments."""
        words = path.split()
        if len(words) < 2 or words[0] not in self._groups:
            raise ValueError(f"command path must start with 'edge' or 'relay': {path!r}")
        parent = self._nested[(words[0],)]
        for depth in range(1, len(words) - 1):
            key = tuple(words[: depth + 1])
            if key not in self._nested:
                group = parent.add_parser(words[depth], help=f"{words[depth]} commands")
                sub = group.add_subparsers(dest="_".join(key), metavar="COMMAND")
                sub.required = True
                self._nested[key] = sub
            parent = self._nested[key]
        parser = parent.add_parser(words[-1], help=help, description=help)
        parser.set_defaults(_handler=handler)
        self._commands.add(tuple(words))
        return parser

    def has_command(self, argv: Sequence[str]) -> bool:
        """Whether ``argv`` starts with the words of a command added so far."""
        words: list[str] = []
        for arg in argv:
            if arg.startswith("-"):
                break
            words.append(arg)
            if tuple(words) in self._commands:
                return True
        return False


def add_output_flag(parser: argparse.ArgumentParser) -> None:
    """Every read command takes ``--output table|json`` (DESIGN.md, CLI contract)."""
    parser.add_argument(
        "--output",
        "-o",
        choices=("table", "json"),
        default="table",
        help="table for people (default), json for scripts",
    )


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def print_table(
    columns: Sequence[str], rows: Iterable[Sequence[object]], *, title: str | None = None
) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_edge=False, header_style="bold")
    for col in columns:
        # Fold rather than cut with an ellipsis: operators copy node ids out of tables.
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    # Piped output has no terminal width; rich would assume 80 columns and squeeze.
    width = None if sys.stdout.isatty() else 240
    Console(soft_wrap=True, width=width).print(table)


def build(argv: Sequence[str] | None = None) -> CommandTree:
    """The command tree from every ``aegis.cli`` entry point.

    Given the command line, stop loading entry points once one of them has added the
    command it names: running ``aegis edge daemon`` then imports neither the relay nor the
    operator commands (a long-running daemon would carry them for nothing). Help for a
    group, or a command no entry point loaded so far has, loads them all.
    """
    tree = CommandTree()
    for ep in sorted(entry_points(group="aegis.cli"), key=lambda e: e.name):
        ep.load()(tree)
        if argv is not None and tree.has_command(argv):
            break
    return tree


def main(argv: Sequence[str] | None = None) -> int:
    tree = build(sys.argv[1:] if argv is None else argv)
    args = tree.parser.parse_args(argv)
    handler: Handler = args._handler
    try:
        return handler(args)
    except CliError as err:
        print(f"aegis: {err}", file=sys.stderr)
        return err.exit_code
    except AegisError as err:
        print(f"aegis: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aegis: interrupted", file=sys.stderr)
        return 130
