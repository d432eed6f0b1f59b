"""The shipped Prometheus rules: the seed's four alerts and the relay-outage alert, valid,
and unit-tested with promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ALERTS_DIR = Path(__file__).resolve().parent.parent / "docs" / "alerts"
RULES = ALERTS_DIR / "aegis-edge.rules.yml"
RULE_TESTS = ALERTS_DIR / "aegis-edge.rules.test.yml"

# The playbook's conditions ("Health metrics worth alerting on"), as they must appear.
SEED_CONDITIONS = {
    "AegisEdgeDaemonUnhealthy": 'aegis_edge_daemons_total{status="Unhealthy"} > 0',
    "AegisEdgeHighDispatchFailureRate": (
        'rate(aegis_edge_commands_dispatched_total{outcome!="ok"}[5m]) > 0.05'
    ),
    "AegisEdgeHeartbeatStarvation": "rate(aegis_edge_heartbeats_total[5m])",
    "AegisEdgeFleetRunsHalting": 'rate(aegis_edge_fleet_runs_total{outcome="halted"}[1h]) > 0',
}
# The case none of those can see: the relay itself down (no scrape, no series).
RELAY_OUTAGE = {
    "AegisEdgeRelayDown": 'up{job="aegis-relay"} == 0 or absent(up{job="aegis-relay"})',
}
ALL_CONDITIONS = {**SEED_CONDITIONS, **RELAY_OUTAGE}


def _promtool() -> str:
    found = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
    )
    if found is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: apt install prometheus)")
    return found


def _rules() -> dict[str, dict[str, object]]:
    doc = yaml.safe_load(RULES.read_text())
    return {rule["alert"]: rule for group in doc["groups"] for rule in group["rules"]}


def test_the_seed_alerts_and_the_relay_outage_are_there_with_their_conditions() -> None:
    rules = _rules()
    assert set(rules) == set(ALL_CONDITIONS)
    for name, condition in ALL_CONDITIONS.items():
        assert condition in " ".join(str(rules[name]["expr"]).split()), name
    assert rules["AegisEdgeDaemonUnhealthy"]["for"] == "5m"


def test_every_alert_has_summary_description_runbook_and_severity() -> None:
    for name, rule in _rules().items():
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        for key in ("summary", "description", "runbook"):
            assert str(annotations.get(key, "")).strip(), f"{name} lacks {key}"
        labels = rule["labels"]
        assert isinstance(labels, dict)
        assert labels["severity"] in {"warning", "critical"}


def test_every_alert_has_promtool_tests_firing_and_quiet() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == set(ALL_CONDITIONS)
    assert quiet == set(ALL_CONDITIONS)


def test_promtool_check_rules() -> None:
    promtool = _promtool()
    proc = subprocess.run(
        [promtool, "check", "rules", str(RULES)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(ALL_CONDITIONS)} rules found" in proc.stdout + proc.stderr


def test_promtool_test_rules() -> None:
    promtool = _promtool()
    proc = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ALERTS_DIR,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
