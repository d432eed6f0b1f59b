"""Shared pieces of the fault suite: the tally every test feeds, and its summary line.

Every test in ``tests/faults`` is marked ``@pytest.mark.faults`` (``nox -s faults`` runs
them alone). Each one records what it tried in the session-wide :class:`Tally` (the
``tally`` fixture): faults injected (processes killed, stopped, disks filled, locks held),
bad inputs tried (frames, tokens, files, admin calls across tenants), and the two figures
that must stay zero -- bad inputs that were *accepted* and data that was *lost*. The
suite ends with one line (tests/conftest.py prints it, adding up the workers' tallies under
pytest-xdist)::

    faults injected: N, bad inputs tried: M, accepted when it should refuse: 0, data lost: 0
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import pytest


@attrs.define
class Tally:
    faults_injected: int = 0
    bad_inputs: int = 0
    accepted: int = 0
    data_lost: int = 0
    tests_ran: int = 0
    notes: list[str] = attrs.field(factory=list)

    def fault(self, n: int = 1) -> None:
        self.faults_injected += n

    def bad(self, n: int = 1) -> None:
        self.bad_inputs += n

    def refused(self, ok: bool, what: str) -> bool:
        """Record one bad input; ``ok`` is whether it was refused as it should be."""
        self.bad_inputs += 1
        if not ok:
            self.accepted += 1
            self.notes.append(f"accepted: {what}")
        return ok

    def lost(self, n: int, what: str) -> None:
        if n:
            self.data_lost += n
            self.notes.append(f"lost: {what}")

    def add(self, other: dict[str, Any] | None) -> None:
        """Fold in another process's tally (``attrs.asdict`` of one)."""
        if not other:
            return
        self.faults_injected += other["faults_injected"]
        self.bad_inputs += other["bad_inputs"]
        self.accepted += other["accepted"]
        self.data_lost += other["data_lost"]
        self.tests_ran += other["tests_ran"]
        self.notes.extend(other["notes"])

    def line(self) -> str:
        return (
            f"faults injected: {self.faults_injected}, bad inputs tried: {self.bad_inputs}, "
            f"accepted when it should refuse: {self.accepted}, data lost: {self.data_lost}"
        )


TALLY = Tally()


@pytest.fixture(scope="session")
def tally() -> Tally:
    return TALLY


@pytest.fixture(autouse=True)
def _count_faults_test() -> Iterator[None]:
    TALLY.tests_ran += 1
    yield


def pytest_sessionfinish(session: pytest.Session) -> None:
    # an xdist worker hands its tally to the controller, which prints the summary line
    # (tests/conftest.py: under xdist this conftest is never loaded there)
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["fault_tally"] = attrs.asdict(TALLY)
