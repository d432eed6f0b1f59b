"""Target resolution: every matched daemon is a target or skipped with one reason."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis_edge_core.errors import LocalProtocolError
from aegis_edge_core.fleet import (
    FleetSpecError,
    NoTargets,
    Resolution,
    SelectorError,
    Skipped,
    SkipReason,
    parse_selector,
    resolve_targets,
)
from aegis_edge_core.fleet.outcomes import DaemonStatus

from .helpers import snap

FLEET = [
    snap("n5", tags={"prod"}),
    snap("n1", tags={"prod"}),
    snap("n3", tags={"prod"}, status="Unhealthy"),
    snap("n2", tags={"prod"}, status="Disconnected"),
    snap("n4", tags={"prod"}, status="Revoked", tools=()),
    snap("n6", tags={"prod"}, tools={"sys.info"}),
    snap("n7", tags={"staging"}),
]


def test_targets_and_skips_sorted_by_node_id_with_one_reason_each() -> None:
    resolution = resolve_targets(FLEET, "tags=prod", "cmd.run")
    assert resolution.targets == ("n1", "n5")
    assert resolution.skipped == (
        Skipped(node_id="n2", reason="disconnected"),
        Skipped(node_id="n3", reason="unhealthy"),
        # Revoked *and* lacking the tool: status wins.
        Skipped(node_id="n4", reason="revoked"),
        Skipped(node_id="n6", reason="tool_unavailable"),
    )
    assert resolution.matched == 6
    assert resolution.considered == 7
    assert not resolution.empty
    assert resolution.skipped_by_reason() == {
        SkipReason.DISCONNECTED: 1,
        SkipReason.UNHEALTHY: 1,
        SkipReason.REVOKED: 1,
        SkipReason.TOOL_UNAVAILABLE: 1,
    }
    assert resolution.require_targets() is resolution


def test_input_order_does_not_change_the_plan() -> None:
    assert resolve_targets(FLEET, "all", "cmd.run") == resolve_targets(
        list(reversed(FLEET)), "all", "cmd.run"
    )


def test_preview_json_shape() -> None:
    data = resolve_targets(FLEET, "tags=prod os=linux", "cmd.run").to_dict()
    assert data["selector"] == "os=linux tags=prod"
    assert data["targets"] == ["n1", "n5"]
    assert data["skipped"] == [
        {"node_id": "n2", "reason": "disconnected"},
        {"node_id": "n3", "reason": "unhealthy"},
        {"node_id": "n4", "reason": "revoked"},
        {"node_id": "n6", "reason": "tool_unavailable"},
    ]
    assert (data["matched"], data["considered"]) == (6, 7)


def test_nothing_matched_is_never_silent() -> None:
    resolution = resolve_targets(FLEET, "tags=nope", "cmd.run")
    assert resolution.empty and resolution.matched == 0
    with pytest.raises(NoTargets) as caught:
        resolution.require_targets()
    assert str(caught.value) == (
        "selector 'tags=nope' matched no daemon (7 considered) "
        "(check the tags and labels with 'aegis edge ls', or target 'all')"
    )
    assert isinstance(caught.value, FleetSpecError)
    assert caught.value.resolution is resolution


def test_everything_skipped_names_the_reasons() -> None:
    resolution = resolve_targets(FLEET, "node=n2,n3,n6", "cmd.run")
    with pytest.raises(NoTargets) as caught:
        resolution.require_targets()
    assert caught.value.message == (
        "selector 'node=n2,n3,n6' matched 3 daemons but every one was skipped "
        "(1 disconnected, 1 unhealthy, 1 tool_unavailable)"
    )


def test_a_tool_no_matched_daemon_offers_is_named_with_what_they_offer() -> None:
    resolution = resolve_targets(FLEET, "node=n1,n6", "cmd.rnu")
    assert resolution.offered_tools == {"cmd.run", "edge.ping", "keys.rotate", "sys.info"}
    with pytest.raises(NoTargets) as caught:
        resolution.require_targets()
    assert caught.value.message == (
        "no daemon that selector 'node=n1,n6' matches offers a tool named 'cmd.rnu'"
    )
    assert caught.value.hint == (
        "they offer cmd.run, edge.ping, keys.rotate, sys.info; did you mean cmd.run?"
    )


def test_a_tool_only_offline_daemons_offer_keeps_the_skip_reasons() -> None:
    # n2 offers cmd.run but is Disconnected: the tool exists, the host is the problem.
    resolution = resolve_targets(FLEET, "node=n2,n6", "cmd.run")
    with pytest.raises(NoTargets) as caught:
        resolution.require_targets()
    assert caught.value.message == (
        "selector 'node=n2,n6' matched 2 daemons but every one was skipped "
        "(1 disconnected, 1 tool_unavailable)"
    )


def test_selector_errors_come_through() -> None:
    with pytest.raises(SelectorError):
        resolve_targets(FLEET, "tagz=prod", "cmd.run")


def test_duplicate_matched_node_is_a_caller_bug() -> None:
    with pytest.raises(LocalProtocolError, match="appears twice"):
        resolve_targets([snap("a"), snap("a")], "all", "cmd.run")
    # Duplicates the selector does not match are not looked at.
    resolve_targets([snap("a", tags={"x"}), snap("b"), snap("b")], "tags=x", "cmd.run")


def test_resolution_invariants_checked_on_construction() -> None:
    selector = parse_selector("all")
    with pytest.raises(ValueError):
        Resolution(selector=selector, tool="t", targets=["a", "a"], skipped=[])
    with pytest.raises(ValueError):
        Resolution(
            selector=selector,
            tool="t",
            targets=["a"],
            skipped=[Skipped(node_id="a", reason="revoked")],
        )
    with pytest.raises(ValueError):
        Resolution(selector=selector, tool="t", targets=["a"], skipped=[], considered=0)
    with pytest.raises(ValueError):
        Skipped(node_id="a", reason="bored")


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(list(DaemonStatus)),
            st.booleans(),  # has the tool
            st.booleans(),  # has the tag
        ),
        max_size=30,
    )
)
def test_every_matched_daemon_lands_exactly_once(
    fleet: list[tuple[DaemonStatus, bool, bool]],
) -> None:
    snapshots = [
        snap(
            f"n{i:03d}",
            status=status,
            tools={"cmd.run"} if has_tool else set(),
            tags={"t"} if tagged else set(),
        )
        for i, (status, has_tool, tagged) in enumerate(fleet)
    ]
    resolution = resolve_targets(snapshots, "tags=t", "cmd.run")
    matched = {s.node_id for s in snapshots if "t" in s.tags}
    placed = list(resolution.targets) + [skip.node_id for skip in resolution.skipped]
    assert sorted(placed) == sorted(matched)
    assert resolution.targets == tuple(sorted(resolution.targets))
    for s in snapshots:
        if s.node_id in resolution.targets:
            assert s.status is DaemonStatus.CONNECTED and "cmd.run" in s.tools
