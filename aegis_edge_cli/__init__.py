"""The ``aegis`` command: a thin root that the agent and the relay fill through entry points.

Neither server package imports the other (DESIGN.md), so the command tree is assembled at
start-up from the entry-point group ``aegis.cli``: each entry point is a callable taking a
:class:`CommandTree` and adding its commands under ``aegis edge`` or ``aegis relay``. The
agent contributes the host-side commands, the relay the ``relay`` and operator-side ones.

Every command answers with exit code 0 on success; on failure it raises :class:`CliError`
(or any :class:`aegis_edge_core.errors.AegisError`) and the root prints one clear line on
stderr and exits non-zero. That line is rendered here and nowhere else
(:func:`render_error`): the sentence says what failed, the hint what to do, and a layer
that only passes an error on adds neither a prefix nor a second hint. Tracebacks are for
bugs only; a reader that closes the pipe early (``aegis edge show ... | head``) is not one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

from aegis_edge_cli.entrypoints import entry_points
from aegis_edge_core.errors import AegisError

__all__ = [
    "CliError",
    "CommandTree",
    "Handler",
    "add_output_flag",
    "main",
    "print_json",
    "print_table",
    "render_error",
    "suggest",
]

Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """A failure to report as one line on stderr; ``exit_code`` is the process status.

    ``message`` says what failed; ``hint``, if any, what to do about it.
    """

    def __init__(self, message: str, *, hint: str = "", exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


def render_error(err: BaseException) -> str:
    """The one line ``aegis`` prints for a failed command (without the newline)."""
    if isinstance(err, CliError | AegisError):
        message, hint = err.message, err.hint
    else:
        message, hint = str(err), ""
    return f"aegis: {message}; {hint}" if hint else f"aegis: {message}"


def suggest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    import difflib  # only for a mistyped command or flag: a running daemon never needs it

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)$")

# What each group of commands is for, in `aegis edge --help`. The groups are made by
# whichever entry point adds a command under them first, so their help lives here.
GROUP_HELP: dict[tuple[str, ...], str] = {
    ("edge", "keys"): "rotate this host's key; revoke a daemon's key from the relay",
    ("edge", "tag"): "add or remove the operator tags fleet selectors match (tags=...)",
    ("edge", "tokens"): "issue single-use enrollment tokens for a tenant",
    ("edge", "tenants"): "delete a tenant, revoking every daemon bound to it",
    (
        "edge",
        "fleet",
    ): "preview, run, follow, watch, rerun, list and cancel tool runs across the fleet",
    ("edge", "groups"): "save named target selectors with pinned hosts (group=NAME)",
    ("edge", "fleet", "keys"): "rotate daemon keys across the fleet",
    ("edge", "service"): "install, inspect, restart or remove the daemon's OS service",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; one line that names the command is clearer.
        match = _INVALID_CHOICE.search(message)
        if match:
            choices = re.findall(r"'([^']*)'", match.group(2))
            message += suggest(match.group(1), choices)
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def unrecognized(self, extras: Sequence[str]) -> NoReturn:
        """Refuse ``extras`` this command does not take, suggesting the flag meant."""
        options = [opt for action in self._actions for opt in action.option_strings]
        flag = next((e.split("=", 1)[0] for e in extras if e.startswith("--")), "")
        hint = suggest(flag, options) if flag else ""
        self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")


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
                help_ = GROUP_HELP.get(key, f"{words[depth]} commands")
                group = parent.add_parser(words[depth], help=help_, description=help_)
                sub = group.add_subparsers(dest="_".join(key), metavar="COMMAND")
                sub.required = True
                self._nested[key] = sub
            parent = self._nested[key]
        parser = parent.add_parser(words[-1], help=help, description=help)
        parser.set_defaults(_handler=handler, _parser=parser)
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
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`| head`): what we had to say is unwanted, not an error.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by it


def _main(argv: Sequence[str] | None) -> int:
    tree = build(sys.argv[1:] if argv is None else argv)
    args, extras = tree.parser.parse_known_args(argv)
    if extras:
        parser: _Parser = getattr(args, "_parser", tree.parser)
        parser.unrecognized(extras)
    handler: Handler = args._handler
    try:
        return handler(args)
    except CliError as err:
        print(render_error(err), file=sys.stderr)
        return err.exit_code
    except AegisError as err:
        print(render_error(err), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aegis: interrupted", file=sys.stderr)
        return 130
