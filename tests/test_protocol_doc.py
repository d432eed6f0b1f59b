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

from aegis_edge_core import session
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
    for value in common_pb2.RefusalReason.DESCRIPTOR.values:
        if value.number:
            assert value.name.removeprefix("REFUSAL_REASON_").lower() in documented, value.name
