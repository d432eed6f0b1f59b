"""Every ```python block of docs/embedding.md runs, so the embedder guide cannot rot.

The blocks form one tutorial: each runs in the namespace the blocks before it built (as a
reader pasting them into one session would), and a block's ``assert`` lines are its
expected output. Blocks fenced as anything but ``python`` (``text``, ``sh``, ``yaml``) are
not run. A failure names the block's first line in the Markdown file.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "embedding.md"
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the first code line, code) for every ```python block."""
    blocks = []
    for match in _FENCE.finditer(text):
        if match.group(1) == "python":
            line = text.count("\n", 0, match.start(2)) + 1
            blocks.append((line, match.group(2)))
    return blocks


BLOCKS = python_blocks(DOC.read_text())


def test_the_guide_has_checked_snippets() -> None:
    assert len(BLOCKS) >= 12
    # The extractor sees every fence: an unterminated one would swallow the rest silently.
    fences = [line for line in DOC.read_text().splitlines() if line.startswith("```")]
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
