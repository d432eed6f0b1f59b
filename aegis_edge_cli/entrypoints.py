"""Entry points of one group, read the way ``importlib.metadata`` finds them, without it.

The ``aegis`` root assembles its commands, and the daemon finds its tool plugins, through
entry points. ``importlib.metadata`` brings ``email``, ``zipfile``, ``csv``, ``tempfile``
and more along (about 2 MB a long-running daemon would hold for one look at a few text
files), so the plain case is read here: ``*.dist-info`` and ``*.egg-info`` directories on
``sys.path``, the first distribution of a name winning, as ``importlib.metadata`` does.
Anything that reader does not cover (a zip or an egg on the path, a meta-path finder that
brings its own distributions) goes to ``importlib.metadata`` itself.
"""

from __future__ import annotations

import os
import re
import sys
from importlib import import_module
from importlib.machinery import PathFinder
from typing import Any, NamedTuple

__all__ = ["EntryPoint", "entry_points"]

# importlib.metadata's EntryPoint.pattern: "module", "module:attr.sub", extras ignored.
_VALUE = re.compile(r"(?P<module>[\w.]+)\s*(:\s*(?P<attr>[\w.]+)\s*)?((?P<extras>\[.*\])\s*)?$")


class EntryPoint(NamedTuple):
    name: str
    value: str
    group: str

    def load(self) -> Any:
        """The object the entry point names, imported (``importlib.metadata``'s rules)."""
        match = _VALUE.match(self.value)
        if match is None:
            raise ValueError(f"entry point {self.name!r}: malformed value {self.value!r}")
        obj: Any = import_module(match.group("module"))
        for attr in filter(None, (match.group("attr") or "").split(".")):
            obj = getattr(obj, attr)
        return obj


class _Unsupported(Exception):
    """A place the plain reader does not cover; ``importlib.metadata`` does."""


def entry_points(group: str) -> list[EntryPoint]:
    """Every entry point in ``group``, in ``importlib.metadata.entry_points`` order."""
    try:
        return _read(group)
    except _Unsupported:
        from importlib.metadata import entry_points as metadata_entry_points

        return [
            EntryPoint(ep.name, ep.value, ep.group) for ep in metadata_entry_points(group=group)
        ]


def _read(group: str) -> list[EntryPoint]:
    if any(
        finder is not PathFinder and hasattr(finder, "find_distributions")
        for finder in sys.meta_path
    ):
        raise _Unsupported
    seen: set[str] = set()
    found: list[EntryPoint] = []
    for item in sys.path:
        entry = os.fspath(item) if isinstance(item, os.PathLike) else item
        if not isinstance(entry, str):
            continue
        if entry.lower().endswith(".egg"):
            raise _Unsupported
        try:
            children = os.listdir(entry or ".")
        except NotADirectoryError:
            raise _Unsupported from None  # a zip file on the path
        except OSError:
            continue  # missing, or a path hook's marker: nothing to find there
        for child in children:
            low = child.lower()
            if not low.endswith((".dist-info", ".egg-info")):
                continue
            # importlib.metadata's normalised name, from the directory's name alone.
            name = re.sub(r"[-_.]+", "_", low.rpartition(".")[0].partition("-")[0])
            if name in seen:
                continue
            seen.add(name)
            try:
                with open(os.path.join(entry or ".", child, "entry_points.txt"), "rb") as f:
                    text = f.read().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue  # as if it had none: one broken distribution must not stop `aegis`
            found.extend(_parse(text, group))
    return found


def _parse(text: str, group: str) -> list[EntryPoint]:
    """The ``group`` section of an ``entry_points.txt`` (INI-like, ``#`` comments)."""
    section: str | None = None
    out: list[EntryPoint] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line.strip("[]")
        elif section == group and "=" in line:
            name, value = line.split("=", 1)
            out.append(EntryPoint(name.strip(), value.strip(), group))
    return out
