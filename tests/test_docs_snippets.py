"""Every ```python block of docs/embedding.md runs, and every ``aegis`` command in the docs
parses with the real command tree, so the guides cannot rot.

The blocks form one tutorial: each runs in the namespace the blocks before it built (as a
reader pasting them into one session would), and a block's ``assert`` lines are its
expected output. Blocks fenced as anything but ``python`` (``text``, ``sh``, ``yaml``) are
not run. A failure names the block's first line in the Markdown file.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import shlex
import sys
import textwrap
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
DOC = DOCS / "embedding.md"
# The pages this suite owns; security.md, benchmarks.md and protocol.md have their own.
CLI_PAGES = ("operator-guide.md", "embedding.md", "architecture.md", "README.md")
_FENCE = re.compile(r"^[ \t]*```(\w*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the first code line, code) for every ```python block."""
    blocks = []
    for match in _FENCE.finditer(text):
        if match.group(1) == "python":
            line = text.count("\n", 0, match.start(2)) + 1
            blocks.append((line, textwrap.dedent(match.group(2))))
    return blocks


BLOCKS = python_blocks(DOC.read_text())


def test_the_guide_has_checked_snippets() -> None:
    assert len(BLOCKS) >= 12
    # The extractor sees every fence: an unterminated one would swallow the rest silently.
    fences = [line for line in DOC.read_text().splitlines() if line.lstrip().startswith("```")]
    assert len(fences) % 2 == 0


_namespaces: dict[int, dict[str, Any]] = {}
_executed: set[tuple[str, int]] = set()


def _trace(frame: FrameType, event: str, arg: object) -> Any:
    """Record which lines of the snippets ran (an ``except`` body may be skipped silently)."""
    if not frame.f_code.co_filename.startswith(str(DOC)):
        return None
    if event == "line":
        _executed.add((frame.f_code.co_filename, frame.f_lineno))
    return _trace


def _namespace_after(index: int) -> dict[str, Any]:
    """The namespace once blocks 0..index ran; each prefix runs once per session."""
    if index in _namespaces:
        return _namespaces[index]
    base = {"__name__": "docs_embedding"} if index == 0 else dict(_namespace_after(index - 1))
    line, code = BLOCKS[index]
    previous = sys.gettrace()
    sys.settrace(_trace)
    try:
        exec(compile(code, f"{DOC}:{line}", "exec"), base)  # running our own docs
    finally:
        sys.settrace(previous)
    _namespaces[index] = base
    return base


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"line{ln}" for ln, _ in BLOCKS])
def test_snippet_runs(index: int) -> None:
    for earlier in range(index):
        if earlier not in _namespaces:
            try:
                _namespace_after(earlier)
            except Exception as err:
                pytest.fail(f"an earlier block (line {BLOCKS[earlier][0]}) fails: {err!r}")
    _namespace_after(index)


def test_every_assert_in_the_guide_ran() -> None:
    """An ``assert`` under ``except`` proves nothing if the call did not raise."""
    for index in range(len(BLOCKS)):
        _namespace_after(index)
    skipped = [
        f"{DOC.name}:{line + offset - 1}: {text.strip()}"
        for line, code in BLOCKS
        for offset, text in enumerate(code.splitlines(), start=1)
        if text.strip().startswith("assert ") and (f"{DOC}:{line}", offset) not in _executed
    ]
    assert not skipped, "\n".join(skipped)


# --------------------------------------------------------------------------- CLI commands


def shell_commands(text: str) -> list[list[str]]:
    """argv (after ``aegis``) of every ``aegis`` command in the ```sh blocks of ``text``."""
    commands = []
    for match in _FENCE.finditer(text):
        if match.group(1) != "sh":
            continue
        for line in match.group(2).replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for stop in ("|", "&&", ";", ">", "&"):
                if stop in words:
                    words = words[: words.index(stop)]
            if "aegis" in words:
                commands.append(words[words.index("aegis") + 1 :])
    return commands


def inline_commands(text: str) -> list[list[str]]:
    """argv of every `aegis edge ...` / `aegis relay ...` code span in the prose."""
    spans = re.findall(r"(?<!`)`(aegis (?:edge|relay)\b[^`]*)`", text)
    return [shlex.split(span)[1:] for span in spans if "..." not in span]


@functools.cache
def _cli() -> argparse.ArgumentParser:
    from aegis_edge_cli import build

    return build().parser


def _parse(argv: list[str]) -> int:
    parser = _cli()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            parser.parse_args(argv)
        except SystemExit as exit_:
            return int(exit_.code or 0)
    return 0


@pytest.mark.parametrize("page", CLI_PAGES)
def test_every_cli_command_in_the_docs_exists(page: str) -> None:
    path = DOCS / page
    if not path.exists():
        pytest.skip(f"{page} not written yet")
    text = path.read_text()
    bad = ["aegis " + shlex.join(argv) for argv in shell_commands(text) if _parse(argv) != 0]
    # Prose mentions may leave out required flags: only the command path must exist.
    bad += [
        "aegis " + shlex.join(argv)
        for argv in inline_commands(text)
        if _parse([*argv, "--help"]) != 0
    ]
    assert not bad, f"{page}: commands the CLI refuses:\n" + "\n".join(bad)


def test_the_cli_check_catches_a_wrong_command() -> None:
    assert _parse(["edge", "fleet", "run", "--target", "all", "--tool", "edge.ping"]) == 0
    assert _parse(["edge", "fleet", "run", "--target", "all"]) != 0  # --tool is required
    assert _parse(["edge", "fleet", "rollout", "--help"]) != 0
    assert shell_commands("```sh\nFOO=1 aegis edge ls --connected | jq . # hi\n```\n") == [
        ["edge", "ls", "--connected"]
    ]
