"""Seed: "Health metrics worth alerting on" -- the four alerts, over metrics a relay exports.

promtool's own checks and unit tests of the rules run in tests/test_alert_rules.py; here the
rules are held against the seed's table and a live relay's /metrics.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from .conftest import Playbook

RULES = Path(__file__).resolve().parents[2] / "docs" / "alerts" / "aegis-edge.rules.yml"

SEED_ALERTS = {
    "AegisEdgeDaemonUnhealthy": 'aegis_edge_daemons_total{status="Unhealthy"} > 0',
    "AegisEdgeHighDispatchFailureRate": (
        'rate(aegis_edge_commands_dispatched_total{outcome!="ok"}[5m]) > 0.05'
    ),
    "AegisEdgeHeartbeatStarvation": "aegis_edge_heartbeats_total",
    "AegisEdgeFleetRunsHalting": 'rate(aegis_edge_fleet_runs_total{outcome="halted"}[1h]) > 0',
}


def test_the_four_alerts_use_metrics_the_relay_exports(playbook: Playbook) -> None:
    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    # Plus the one the seed's table cannot express on relay metrics: the relay itself down.
    assert set(rules) == {*SEED_ALERTS, "AegisEdgeRelayDown"}
    for name, expr in SEED_ALERTS.items():
        assert expr in rules[name]["expr"], name
        assert rules[name]["annotations"]["runbook"]
    assert rules["AegisEdgeDaemonUnhealthy"]["for"] == "5m"

    playbook.host("watched")
    exported = set(re.findall(r"^# TYPE (\w+) ", playbook.metrics(), re.M))
    for rule in rules.values():
        for metric in re.findall(r"aegis_edge_\w+", rule["expr"]):
            assert metric in exported, f"{rule['alert']} uses {metric}, not exported"


def test_capacity_planning_relay_raises_its_file_limit(playbook: Playbook) -> None:
    # Seed, "Capacity planning": the relay is connection-limit-bound; `ulimit -n` is the
    # biggest knob, so the relay lifts its soft limit to the hard one itself.
    limits = Path(f"/proc/{playbook.relay.proc.pid}/limits").read_text()
    line = next(ln for ln in limits.splitlines() if ln.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard, line
