"""The operator playbook (docs/operator-guide.md), section by section.

Each test module is named after a section of the seed and runs that section's commands,
as written there, against a real relay process and real daemon processes on loopback.
Operator commands find the relay the documented way: AEGIS_RELAY, AEGIS_CA_CERT and
AEGIS_OPERATOR_TOKEN in the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import https
from tests.agent.harness import (
    DaemonProcess,
    EnrolledHost,
    RelayProcess,
    enroll_host,
    wait_until,
)

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "aegis_edge_cli"]


class Playbook:
    """One relay, the operator's environment, and the hosts a test enrolls."""

    def __init__(self, relay: RelayProcess, tmp: Path) -> None:
        self.relay = relay
        self.tmp = tmp
        self.daemons: list[DaemonProcess] = []
        self.env = dict(
            os.environ,
            AEGIS_RELAY=relay.endpoint,
            AEGIS_CA_CERT=str(relay.info["ca_cert"]),
            AEGIS_OPERATOR_TOKEN=relay.operator_token,
            GRPC_VERBOSITY="ERROR",
        )

    def aegis(
        self, *args: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ``aegis ARGS`` as the operator or host owner would."""
        done = subprocess.run(
            [*CLI, *args],
            capture_output=True,
            text=True,
            env=env or self.env,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"aegis {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
            )
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.aegis(*args, "--output", "json").stdout)

    def host(
        self,
        name: str,
        *,
        tenant: str = "acme",
        allow_tools: tuple[str, ...] = ("cmd.run",),
        labels: tuple[str, ...] = (),
        start: bool = True,
        env: dict[str, str] | None = None,
    ) -> tuple[EnrolledHost, DaemonProcess | None]:
        enrolled = enroll_host(
            self.relay, self.tmp / name, tenant=tenant, allow_tools=allow_tools, labels=labels
        )
        daemon = self.start(enrolled, env=env) if start else None
        return enrolled, daemon

    def start(self, enrolled: EnrolledHost, env: dict[str, str] | None = None) -> DaemonProcess:
        daemon = DaemonProcess.start(enrolled.state_dir, env=env)
        self.daemons.append(daemon)
        daemon.wait_event("connected")
        return daemon

    def status_of(self, node_id: str) -> str:
        hosts = self.json("edge", "ls")
        return next(h["status"] for h in hosts if h["node_id"] == node_id)

    def wait_status(self, node_id: str, status: str, timeout: float = 20) -> None:
        wait_until(lambda: self.status_of(node_id) == status, timeout, 0.2, f"{node_id} {status}")

    def metrics(self) -> str:
        return https.scrape(self.relay.info)

    def stop_all(self) -> None:
        for d in self.daemons:
            if d.proc.poll() is None:
                d.stop()


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    r = RelayProcess.start(tmp_path_factory.mktemp("relay"))
    yield r
    r.stop()


@pytest.fixture
def playbook(relay: RelayProcess, tmp_path: Path) -> Iterator[Playbook]:
    pb = Playbook(relay, tmp_path)
    yield pb
    pb.stop_all()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, or None if absent."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head == name and not labels:
            return float(value)
        if head.startswith(name + "{"):
            got = dict(part.split("=", 1) for part in head[len(name) + 1 : -1].split(",") if part)
            if all(got.get(k) == f'"{v}"' for k, v in labels.items()):
                return float(value)
    return None
