"""schemathesis against a real relay's ``/api/v1``, from its own OpenAPI document, with a
real operator token: no answer is a 5xx, and every answer (status, content type, headers,
body) is what the document says."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from aegis_edge_relay.http.openapi import committed_document
from tests.agent.harness import DaemonProcess, RelayProcess, enroll_host

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

schema = schemathesis.openapi.from_dict(json.loads(committed_document()))

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def relay(
    tmp_path_factory: pytest.TempPathFactory,
    relay_store_url: str,  # one relay per store
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("schemathesis")
    proc = RelayProcess.start(root / "relay")
    daemons = []
    try:
        # Real hosts, so lists and hosts have something to answer; no tool beyond the
        # defaults is allowed, so nothing generated runs anything that matters.
        for name, tenant in (("h1", "acme"), ("h2", "beta")):
            host = enroll_host(proc, root / name, tenant=tenant)
            daemons.append(DaemonProcess.start(host.state_dir))
        for daemon in daemons:
            daemon.wait_event("connected")
        yield {
            "base_url": proc.info["http"],
            "ca": str(Path(proc.info["ca_cert"])),
            "token": proc.operator_token,
        }
    finally:
        for daemon in daemons:
            daemon.stop()
        proc.stop()


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_api_conforms_to_its_document(case: Any, relay: dict[str, Any]) -> None:
    case.call_and_validate(
        base_url=relay["base_url"],
        headers={"Authorization": f"Bearer {relay['token']}"},
        verify=relay["ca"],
        timeout=30,
        checks=CHECKS,
    )
