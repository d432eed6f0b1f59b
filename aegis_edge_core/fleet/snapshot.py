"""What the scheduler knows about one daemon when it resolves a selector.

A :class:`DaemonSnapshot` is a plain value the relay builds from its store (status from the
health machine, capabilities from the daemon's last hello, tags from operators). Selectors
match on it and target resolution reads its status; nothing here looks anything up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Final

import attrs

from aegis_edge_core.fleet.outcomes import DaemonStatus

__all__ = ["MAX_TAG_LENGTH", "DaemonSnapshot", "valid_tag"]

MAX_TAG_LENGTH: Final = 64


def valid_tag(tag: str) -> bool:
    """May operators put ``tag`` on a daemon? 1-64 printable characters, none of them a
    space or one of ``,()=`` (which a selector's ``tags=AnyOf(a,b)`` could not spell)."""
    return (
        0 < len(tag) <= MAX_TAG_LENGTH
        and tag.isprintable()
        and not any(c.isspace() or c in ",()=" for c in tag)
    )


def _frozen_strs(values: Iterable[str]) -> frozenset[str]:
    # A bare str is an iterable of one-letter strings; accepting it would turn
    # tags="prod" into {"p", "r", "o", "d"} without a word.
    if isinstance(values, str):
        raise TypeError(f"expected a collection of strings, got the string {values!r}")
    return frozenset(values)


def _frozen_labels(labels: Mapping[str, str]) -> Mapping[str, str]:
    # Copy, then wrap: the caller keeps no handle that could mutate the snapshot.
    return MappingProxyType(dict(labels))


def _check_labels(_inst: object, _attr: object, labels: Mapping[str, str]) -> None:
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"labels must map str to str, got {key!r}: {value!r}")


_strs = attrs.validators.deep_iterable(attrs.validators.instance_of(str))


@attrs.frozen(kw_only=True)
class DaemonSnapshot:
    """One daemon as the relay sees it at resolution time.

    ``status`` accepts the seed's strings (``"Connected"``, ``"Unhealthy"``,
    ``"Disconnected"``, ``"Revoked"``) or :class:`DaemonStatus` members and stores the
    member. ``os`` and ``arch`` are as the daemon reported them (``"linux"``,
    ``"x86_64"``); selectors compare them case-insensitively. ``tools`` are the tools the
    host's policy allows, ``labels`` the host owner's ``k=v`` pairs, ``tags`` the
    operator-owned tags. Collections are frozen on construction; ``labels`` is a read-only
    mapping, which is why a snapshot compares by value but is not hashable by it.
    """

    node_id: str = attrs.field(
        validator=attrs.validators.and_(
            attrs.validators.instance_of(str), attrs.validators.min_len(1)
        )
    )
    tenant_id: str = attrs.field(validator=attrs.validators.instance_of(str))
    status: DaemonStatus = attrs.field(converter=DaemonStatus)
    os: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    arch: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    tools: frozenset[str] = attrs.field(
        default=frozenset(), converter=_frozen_strs, validator=_strs
    )
    labels: Mapping[str, str] = attrs.field(
        factory=dict, converter=_frozen_labels, validator=_check_labels, hash=False
    )
    tags: frozenset[str] = attrs.field(default=frozenset(), converter=_frozen_strs, validator=_strs)
