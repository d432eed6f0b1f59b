"""How ``pytest -n N --dist loadscope`` shares the suite between workers (tests/conftest.py
installs it).

A work unit is a test module, as with xdist's own ``loadfile``, so a module's module-scoped
relay serves its tests in the same order as in a serial run. Two things differ:

- an integration module is two units, its SQLite half and its PostgreSQL half (its relays are
  module-scoped per store, so each half starts its own anyway), and they may run at once;
- the units that start processes go first, the in-process ones after, so the run ends on
  short units instead of one worker finishing a long module alone.
"""

from __future__ import annotations

import re

import pytest
from xdist.remote import Producer
from xdist.scheduler import LoadScopeScheduling

from tests.conftest import STORES

HEAVY = ("tests/integration/", "tests/cluster/", "tests/faults/", "tests/playbook/")
"""Directories whose modules start relays, daemons or PostgreSQL servers."""

SPLIT_BY_STORE = "tests/integration/"
"""Where every module runs once per store (tests/integration/conftest.py)."""


def heavy_first(items: list[pytest.Item]) -> None:
    """The process-starting modules first; a stable sort keeps each module's tests together
    and in pytest's order."""
    items.sort(key=lambda item: 0 if item.nodeid.startswith(HEAVY) else 1)


def store_of(nodeid: str) -> str:
    """The store in a test id (``test_x[postgresql]``, ``test_y[sqlite-3]``,
    ``test_z[GET /api][sqlite]``), or ``""``."""
    _, _, params = nodeid.partition("[")
    return next((p for p in re.split(r"[][-]", params) if p in STORES), "")


class ModuleAndStoreScheduling(LoadScopeScheduling):
    def __init__(self, config: pytest.Config, log: Producer | None = None) -> None:
        super().__init__(config, log)
        # units go out in collection order, which the workers put heavy-first
        # (``heavy_first``), not sorted by how many tests each holds
        config.option.loadscopereorder = False

    def _split_scope(self, nodeid: str) -> str:
        path = nodeid.partition("::")[0]
        if path.startswith(SPLIT_BY_STORE) and (store := store_of(nodeid)):
            return f"{path}[{store}]"
        return path
