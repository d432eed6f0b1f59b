"""``jsonrepr`` agrees with protobuf's own JSON mapping wherever its rules leave a field alone.

The representation is built from the descriptors (for speed) on the base that
``json_format.MessageToDict(preserving_proto_field_name=True,
always_print_fields_with_no_presence=True)`` gives. Here every Admin API message, filled
field by field, is shown both ways: the keys must be MessageToDict's (less the hidden and
``has_*`` ones, ``*_json`` renamed, plus the derived ones), and every plain value the same.
"""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from aegis_edge_core.wire import admin_pb2, common_pb2
from aegis_edge_relay.operator.jsonrepr import message_to_dict

HIDDEN = {
    "Host": {"history"},
    "Group": {"members", "missing"},
    "FleetRunSpec": {"secret_args_json", "secret_keys", "follow_output"},
    "FleetRun": {"targets_omitted"},
}
DERIVED = {
    "TargetResult": {"duration_secs"},
    "FleetRun": {"tool", "selector"},
    "FleetRunSpec": {"secret_args"},
}
RULED = {("FleetRun", "counts"), ("FleetRunSpec", "mode"), ("FleetRunSpec", "on_error")}
"""Fields shown by a rule of their own, not as MessageToDict shows them."""

T = 1733456789.25


def _fill(message: Message, depth: int = 0) -> Message:
    """Every field set to a value that is not its default (nested messages to depth 2)."""
    for field in message.DESCRIPTOR.fields:
        name = field.name
        target = getattr(message, name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            target["k"] = 3 if value_field.type == FieldDescriptor.TYPE_UINT32 else "v"
        elif field.message_type is not None:
            if depth < 2:
                child = target.add() if field.is_repeated else target
                _fill(child, depth + 1)
        elif field.is_repeated:
            target.extend(["b-" + name, "a-" + name])
        elif field.type == FieldDescriptor.TYPE_STRING:
            setattr(message, name, f"x-{name}")
        elif field.type == FieldDescriptor.TYPE_BYTES:
            setattr(message, name, b"line\n")
        elif field.type == FieldDescriptor.TYPE_BOOL:
            setattr(message, name, name != "targets_omitted")
        elif field.type == FieldDescriptor.TYPE_ENUM:
            setattr(message, name, 1)
        elif field.type == FieldDescriptor.TYPE_DOUBLE:
            setattr(message, name, T)
        else:
            setattr(message, name, 3)
    return message


def _agree(message: Message, out: dict[str, Any], raw: dict[str, Any]) -> None:
    descriptor: Descriptor = message.DESCRIPTOR
    kind = descriptor.name
    hidden = HIDDEN.get(kind, set())
    expected = {
        key.removesuffix("_json")
        for key in raw
        if key not in hidden and not (key.startswith("has_") and key[4:] in raw)
    } | DERIVED.get(kind, set())
    assert set(out) == expected, kind
    for key, value in raw.items():
        field = descriptor.fields_by_name[key]
        if key not in out or (kind, key) in RULED:
            continue
        shown = out[key]
        if field.message_type is not None and not field.message_type.GetOptions().map_entry:
            children = getattr(message, key)
            if field.is_repeated:
                for child, child_out, child_raw in zip(children, shown, value, strict=True):
                    _agree(child, child_out, child_raw)
            else:
                _agree(children, shown, value)
        elif field.type == FieldDescriptor.TYPE_ENUM:
            prefix = field.enum_type.values_by_number[0].name.removesuffix("UNSPECIFIED")
            assert shown.lower() == value.removeprefix(prefix).lower(), (kind, key)
        elif field.type == FieldDescriptor.TYPE_BYTES:
            assert shown == "line\n", (kind, key)
        elif field.type == FieldDescriptor.TYPE_DOUBLE and isinstance(shown, str):
            assert shown == "2024-12-06T03:46:29.250Z", (kind, key)  # a time
        elif field.is_repeated and not isinstance(value, dict):
            assert sorted(shown) == sorted(value), (kind, key)
        else:
            assert shown == value, (kind, key)


MESSAGES = [
    *(getattr(admin_pb2, name) for name in admin_pb2.DESCRIPTOR.message_types_by_name),
    common_pb2.Capabilities,
]


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda cls: cls.DESCRIPTOR.name)
def test_every_admin_message_agrees_with_message_to_dict(cls: type[Message]) -> None:
    message = _fill(cls())
    raw = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _agree(message, message_to_dict(message), raw)


def test_an_empty_message_shows_every_key_unset() -> None:
    shown = message_to_dict(admin_pb2.TargetResult())
    assert shown["outcome"] == "pending"
    assert shown["exit_code"] is None and shown["result"] is None
    assert shown["stdout_tail"] is None and shown["dispatched_at"] is None
    assert message_to_dict(admin_pb2.FleetRun())["spec"]["args"] == {}
