"""The fleet vocabularies on the wire: result outcomes, stored outcomes, statuses, the cap."""

from __future__ import annotations

import json

from aegis_edge_core.fleet import DaemonStatus, TargetOutcome
from aegis_edge_core.fleet.snapshot import MAX_TAG_LENGTH, valid_tag
from aegis_edge_core.fleet.wire_values import (
    PROTO_OUTCOME,
    PROTO_RUN_OUTCOME,
    PROTO_STATUS,
    RESULT_CAP,
    capped_result,
    outcome_of,
    stored_outcome_proto,
)
from aegis_edge_core.wire import common_pb2, stream_pb2


def test_a_result_s_outcome_wins_over_its_error_kind() -> None:
    result = stream_pb2.CommandResult(
        outcome=common_pb2.TARGET_OUTCOME_DENIED, error_kind=stream_pb2.ERROR_KIND_TIMEOUT
    )
    assert outcome_of(result) is TargetOutcome.DENIED


def test_an_older_daemon_s_error_kind_still_names_the_outcome() -> None:
    assert outcome_of(stream_pb2.CommandResult(error_kind=stream_pb2.ERROR_KIND_OK)) is (
        TargetOutcome.OK
    )
    timeout = stream_pb2.CommandResult(error_kind=stream_pb2.ERROR_KIND_TIMEOUT)
    assert outcome_of(timeout) is TargetOutcome.TIMEOUT


def test_a_result_that_says_nothing_known_is_an_error() -> None:
    assert outcome_of(stream_pb2.CommandResult(error_kind=999)) is TargetOutcome.ERROR  # type: ignore[arg-type]


def test_every_vocabulary_member_has_a_wire_value_and_back() -> None:
    assert set(PROTO_OUTCOME) == set(TargetOutcome)
    assert set(PROTO_STATUS) == set(DaemonStatus)
    assert set(PROTO_RUN_OUTCOME) >= {"running", "completed", "halted", "cancelled"}
    for outcome in TargetOutcome:
        assert stored_outcome_proto(outcome.value) == PROTO_OUTCOME[outcome]


def test_a_stored_outcome_this_version_does_not_know_is_unset() -> None:
    assert stored_outcome_proto("") == common_pb2.TARGET_OUTCOME_UNSPECIFIED
    assert stored_outcome_proto(None) == common_pb2.TARGET_OUTCOME_UNSPECIFIED
    assert stored_outcome_proto("exploded") == common_pb2.TARGET_OUTCOME_UNSPECIFIED


def test_a_result_over_the_cap_is_replaced_by_a_note_of_its_size() -> None:
    small = json.dumps({"ok": True})
    assert capped_result(small) == small
    exact = "x" * RESULT_CAP
    assert capped_result(exact) == exact
    big = "é" * RESULT_CAP  # two bytes each: the cap counts bytes, not characters
    note = json.loads(capped_result(big))
    assert note == {"result_too_large": {"bytes": 2 * RESULT_CAP, "limit": RESULT_CAP}}


def test_tags_a_selector_can_spell_are_valid() -> None:
    assert valid_tag("managed-fleet")
    assert valid_tag("x" * MAX_TAG_LENGTH)
    for bad in ("", "x" * (MAX_TAG_LENGTH + 1), "a b", "a,b", "AnyOf(a)", "k=v", "tab\t", "\x00"):
        assert not valid_tag(bad), bad
