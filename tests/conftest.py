"""Fixtures every test directory may use: the relay store under test, on both stores; and
how ``pytest -n N --dist loadscope`` (pytest-xdist) shares the suite (tests/schedule.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pg import store_for

STORES = ("sqlite", "postgresql")


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """``""`` (SQLite in the data dir) or the URL of a fresh PostgreSQL database."""
    with store_for(request.param) as url:
        yield url


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    if config.getoption("dist") != "loadscope":
        return None
    from tests.schedule import ModuleAndStoreScheduling

    return ModuleAndStoreScheduling(config, log)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: its order is the schedule's
        from tests.schedule import heavy_first

        heavy_first(items)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    """Add a worker's fault tally to the controller's (tests/faults/conftest.py)."""
    from tests.faults.conftest import TALLY

    TALLY.add(getattr(node, "workeroutput", {}).get("fault_tally"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.faults.conftest import TALLY

    if not TALLY.tests_ran:
        return
    terminalreporter.write_sep("-", "fault suite")
    for note in TALLY.notes:
        terminalreporter.write_line(note)
    terminalreporter.write_line(TALLY.line())
