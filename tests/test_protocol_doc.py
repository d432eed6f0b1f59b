"""docs/protocol.md: its generator puts comments where they belong, it and the test vectors
are current, and its state tables and refusal reasons are the code's."""

from __future__ import annotations

import enum
import importlib.util
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from aegis_edge_core import refusals, session, tools_spec
from aegis_edge_core.handshake import FEATURES
from aegis_edge_core.wire import common_pb2

ROOT = Path(__file__).resolve().parents[1]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_protocol_doc", ROOT / "scripts" / "gen_protocol_doc.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generator()

PROTO = """\
// The file's introduction.
syntax = "proto3";

service Things {
  // Hosts

  rpc ListThings(A) returns (B);
  rpc GetThing(A) returns (B);  // answers one thing
  // Makes a thing.
  rpc MakeThing(A) returns (B);

  // Other things

  rpc Other(A) returns (B);
}

// What a thing is.
message A {
  string name = 1;  // the thing's name
  // Seconds since the epoch.
  double at = 2;
  oneof body {
    B b = 3;  // in the oneof
  }
  map<string, string> labels = 4;
}
"""


def test_section_comments_head_rpcs_and_describe_none(tmp_path: Path) -> None:
    proto = tmp_path / "things.proto"
    proto.write_text(PROTO)
    notes = GEN._proto_comments(proto)
    assert "rpc ListThings" not in notes
    assert notes["section ListThings"] == "Hosts"
    assert notes["section GetThing"] == "Hosts"
    assert notes["rpc GetThing"] == "answers one thing"
    assert notes["rpc MakeThing"] == "Makes a thing."
    assert notes["section Other"] == "Other things"
    assert "rpc Other" not in notes
    assert notes["message A"] == "What a thing is."
    assert notes["field A.name"] == "the thing's name"
    assert notes["field A.at"] == "Seconds since the epoch."
    assert notes["field A.b"] == "in the oneof"
    assert "field A.labels" not in notes


def test_admin_sections_are_headings_in_the_reference() -> None:
    reference = GEN.render_reference()
    assert "| `ListHosts` | `ListHostsRequest` | `ListHostsResponse` |  |" in reference
    assert "| **Hosts** | | | |" in reference
    assert "| **Fleet runs** | | | |" in reference
    assert "`ListHosts`: Hosts" not in reference
    assert "| `StartFleetRun` | `FleetRunSpec` | `stream FleetRunEvent` | Starts a run" in reference


@pytest.mark.parametrize("script", ["gen_vectors.py", "gen_protocol_doc.py"])
def test_generated_files_are_current(script: str) -> None:
    # The vectors first in the gate too: protocol.md's examples are rendered from them.
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


SPEC = (ROOT / "docs" / "protocol.md").read_text()


def _legal_table(heading: str) -> dict[str, set[str]]:
    """The 'legal ... messages' table under ``heading``: state name -> message kinds."""
    section = SPEC.split(heading, 1)[1].split("\n### ", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        kinds = set(re.findall(r"`(\w+)`", cells[1]))
        for state in re.findall(r"`(\w+)`", cells[0]):
            table[state] = kinds
    return table


@pytest.mark.parametrize(
    ("heading", "receive", "states"),
    [
        ("### 10.1 The daemon's end", session._DAEMON_RECEIVE, session.DaemonState),
        ("### 10.2 The relay's end", session._RELAY_RECEIVE, session.RelayState),
    ],
)
def test_the_legal_message_tables_are_the_sessions(
    heading: str, receive: Mapping[tuple[Any, str], Any], states: type[enum.Enum]
) -> None:
    documented = _legal_table(heading)
    assert documented, f"no table under {heading}"
    for state in states:
        legal = {kind for (s, kind) in receive if s is state}
        assert documented.get(state.name, set()) == legal, state.name


def test_every_refusal_reason_is_specified() -> None:
    section = SPEC.split("### 11.1 Reasons", 1)[1].split("### 11.2", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", section, re.MULTILINE))
    reasons = {
        value.name.removeprefix("REFUSAL_REASON_").lower()
        for value in common_pb2.RefusalReason.DESCRIPTOR.values
        if value.number
    }
    assert documented == reasons


def _section(heading: str) -> str:
    return SPEC.split(heading, 1)[1].split("\n### ", 1)[0]


def _value_rows(section: str, column: str) -> dict[str, str]:
    """Rows of the table headed ``column``: each spelling in the first cell -> the one
    value of the second; rows whose second cell is prose (the catch-all) are left out."""
    table = section.split(f"| {column} |", 1)[1].split("\n\n", 1)[0]
    rows: dict[str, str] = {}
    for line in table.splitlines()[2:]:
        first, second = (c.strip() for c in line.strip().strip("|").split("|"))
        value = re.fullmatch(r"`([^`]+)`", second)
        if value is None:
            continue
        for spelling in re.findall(r"`([^`]+)`", first):
            rows[spelling] = value.group(1)
    return rows


def _sent(*, os: str = "Linux", arch: str = "x86_64") -> common_pb2.Capabilities:
    # What the agent's enroll and daemon send: tools_spec.capabilities of platform.system()
    # and platform.machine().
    return tools_spec.capabilities(
        os=os, arch=arch, tools=[], labels={}, hostname="h", agent_version="1"
    )


def test_the_os_and_arch_tables_are_what_the_daemon_sends() -> None:
    section = _section("### 9.2 Capabilities")
    oses = _value_rows(section, "`Capabilities.os`")
    arches = _value_rows(section, "`Capabilities.arch`")
    assert {"Linux", "Darwin", "Windows"} <= set(oses)
    for reported, value in oses.items():
        assert _sent(os=reported).os == value, reported
    for reported, value in arches.items():
        assert _sent(arch=reported).arch == value, reported
    # every alias the daemon knows is in the table, and so is every value it maps to
    assert set(tools_spec.ARCH_ALIASES) <= set(arches)
    assert set(tools_spec.ARCH_ALIASES.values()) <= set(arches)
    # the catch-all rows: lower-cased as reported, "unknown" when empty
    assert _sent(os="FreeBSD").os == "freebsd"
    assert _sent(arch="armv7l").arch == "armv7l"
    assert (_sent(os="").os, _sent(arch="").arch) == ("unknown", "unknown")


def test_the_status_code_table_is_refusal_status() -> None:
    documented: dict[str, str] = {}
    for line in _section("### 11.2 Status codes").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and re.fullmatch(r"`[A-Z_]+`", cells[0]):
            for reason in re.findall(r"`(\w+)`", cells[1]):
                documented[reason] = cells[0].strip("`")
    assert documented == dict(refusals.REFUSAL_STATUS)
    # "(and any reason not listed)" in the PERMISSION_DENIED row
    assert refusals.status_code_for("unspecified") == "PERMISSION_DENIED"


def test_statuses_named_with_a_reason_in_the_prose_are_the_tables() -> None:
    # "ends ... with `DEADLINE_EXCEEDED`, reason `handshake_timeout`" and the like, anywhere
    prose = " ".join(SPEC.split())
    pairs = re.findall(r"`([A-Z_]{5,})`,? \(?reason `(\w+)`", prose)
    assert len(pairs) >= 5, pairs
    for code, reason in pairs:
        assert reason in refusals.REFUSAL_STATUS, reason
        assert refusals.REFUSAL_STATUS[reason] == code, (code, reason)


def test_the_feature_table_is_the_codes() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text()
    table = text.split("Features defined for v1:", 1)[1].split("\n\n", 2)[1]
    rows = table.splitlines()[2:]
    assert {row.split("|")[1].strip().strip("`") for row in rows} == FEATURES
