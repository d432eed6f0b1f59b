"""Saved groups: a name for "these daemons" that operators reuse as ``--target group=web``.

Theory of operation
-------------------

A :class:`Group` belongs to one tenant and has a name, a selector and a list of pinned
node ids. Its **members** are::

    members(group) = { d in fleet | d.tenant_id == group.tenant_id
                                    and (group.selector matches d or d.node_id in pinned) }

so a group is the union of "whatever matches now" and "these hosts, whatever their tags".
Membership ignores status, as every selector does: a pinned daemon that is Disconnected
is a member and :func:`~aegis_edge_core.fleet.resolve.resolve_targets` skips it
``disconnected``, exactly as if the selector had matched it. The tenant condition is part
of membership, not left to the caller, so a group of tenant A can never take in a daemon
of tenant B, even when an operator who sees both tenants resolves it.

A pinned node id that is not in the fleet the caller passes (the daemon is gone, or the
caller's snapshots do not include it) cannot be matched against anything; resolution
reports it as skipped ``not_found`` rather than dropping it, because an operator who
pinned a host expects to hear about it.

Rules checked on construction (:class:`GroupError` names the field and the fix):

========================  =================================================================
field                     rule
========================  =================================================================
``name``                  1-64 of ``a-z 0-9 - . _``, starting with a letter or digit
                          (:func:`~aegis_edge_core.fleet.selector.group_name_problem`)
``tenant_id``             not empty
``selector``              a valid selector that names **no** group: groups do not nest,
                          so a definition never depends on another one and there is no
                          cycle to detect
``pinned``                node ids (selector name characters), at most
                          :data:`MAX_PINNED` of them; stored sorted and de-duplicated
========================  =================================================================

Several tenants may each have a group of the same name. :func:`index_groups` builds the
mapping a selector is resolved against from the groups in a caller's scope; a name that
more than one tenant defines is left out and recorded as ambiguous, so ``group=web`` is an
error at its column that says to name the tenant instead of picking one silently.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Final

import attrs

from aegis_edge_core.errors import AegisError
from aegis_edge_core.fleet.selector import (
    NAME_CHARACTERS,
    Selector,
    group_name_problem,
    parse_selector,
)
from aegis_edge_core.fleet.snapshot import DaemonSnapshot

__all__ = [
    "MAX_PINNED",
    "Group",
    "GroupError",
    "GroupIndex",
    "check_group_name",
    "check_group_selector",
    "index_groups",
]

MAX_PINNED: Final = 1000
"""More pinned nodes than this is a selector's job (tag them)."""


class GroupError(AegisError):
    """A group definition is invalid; ``field`` is ``name``, ``tenant_id``, ``selector``
    or ``pinned``, so an API server can name the request field."""

    field: str

    def __init__(self, message: str, *, field: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.field = field


def check_group_name(name: str) -> str:
    """Return ``name`` if it is a valid group name; raise :class:`GroupError` otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"group name must be a str, not {type(name).__name__}")
    problem = group_name_problem(name)
    if problem is not None:
        index, message, hint = problem
        where = f" at character {index + 1}" if name else ""
        raise GroupError(f"invalid group name {name!r}{where}: {message}", field="name", hint=hint)
    return name


def check_group_selector(selector: Selector | str) -> Selector:
    """Parse ``selector`` (if a string) and refuse one that names a group.

    A :class:`~aegis_edge_core.fleet.errors.SelectorError` (bad syntax) passes through
    with its column; a nested ``group=`` term is a :class:`GroupError` naming it.
    """
    parsed = parse_selector(selector) if isinstance(selector, str) else selector
    if not isinstance(parsed, Selector):
        raise TypeError(f"selector must be a Selector or str, not {type(selector).__name__}")
    nested = parsed.group_names
    if nested:
        raise GroupError(
            f"a group's selector cannot name another group (group={nested[0]})",
            field="selector",
            hint="groups do not nest: copy that group's selector, or pin its nodes",
        )
    return parsed


def _name(value: str) -> str:
    return check_group_name(value)


def _tenant(value: str) -> str:
    if not isinstance(value, str) or not value:
        raise GroupError("a group needs a tenant", field="tenant_id")
    return value


def _pinned(values: Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        raise TypeError(f"pinned is a collection of node ids, not the string {values!r}")
    ids = tuple(sorted(set(values)))
    if len(ids) > MAX_PINNED:
        raise GroupError(
            f"{len(ids)} pinned nodes; a group pins at most {MAX_PINNED}",
            field="pinned",
            hint="tag the hosts and select the tag instead",
        )
    for node_id in ids:
        if not isinstance(node_id, str) or not node_id or not NAME_CHARACTERS.issuperset(node_id):
            raise GroupError(
                f"invalid pinned node id {node_id!r}",
                field="pinned",
                hint="node ids use letters, digits and - . _ : / @ +",
            )
    return ids


@attrs.frozen(kw_only=True)
class Group:
    """A saved group: see the module docstring for membership and the rules.

    ``selector`` accepts the text (parsed) or a :class:`Selector`; ``pinned`` any
    collection of node ids (stored sorted, de-duplicated).
    """

    name: str = attrs.field(converter=_name)
    tenant_id: str = attrs.field(converter=_tenant)
    selector: Selector = attrs.field(converter=check_group_selector)
    pinned: tuple[str, ...] = attrs.field(default=(), converter=_pinned)
    # Built once: resolution asks holds() once per daemon of the fleet.
    _pinned_set: frozenset[str] = attrs.field(init=False, eq=False, repr=False, hash=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_pinned_set", frozenset(self.pinned))

    def holds(self, snapshot: DaemonSnapshot) -> bool:
        """Whether ``snapshot`` is a member (status is not looked at)."""
        if snapshot.tenant_id != self.tenant_id:
            return False
        return snapshot.node_id in self._pinned_set or self.selector.matches(snapshot)

    def members(self, snapshots: Iterable[DaemonSnapshot]) -> tuple[str, ...]:
        """Node ids of the members among ``snapshots``, sorted."""
        return tuple(sorted(s.node_id for s in snapshots if self.holds(s)))

    def missing(self, snapshots: Iterable[DaemonSnapshot]) -> tuple[str, ...]:
        """Pinned node ids that are not among ``snapshots`` (reported as ``not_found``)."""
        present = {s.node_id for s in snapshots}
        return tuple(node_id for node_id in self.pinned if node_id not in present)

    def to_dict(self) -> dict[str, object]:
        """The JSON shape of ``groups show --output json`` (without members)."""
        return {
            "name": self.name,
            "tenant_id": self.tenant_id,
            "selector": str(self.selector),
            "pinned": list(self.pinned),
        }


@attrs.frozen
class GroupIndex(Mapping[str, Group]):
    """The groups a caller may name, by name; built by :func:`index_groups`.

    A read-only mapping of the names that exactly one tenant in scope defines.
    ``ambiguous`` maps each name that several tenants define to those tenants, sorted;
    such a name is not a key, and the selector parser says to name the tenant.
    """

    _by_name: Mapping[str, Group]
    ambiguous: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)

    def __getitem__(self, name: str) -> Group:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)


def index_groups(groups: Iterable[Group]) -> GroupIndex:
    """Index ``groups`` (those of the tenants in the caller's scope) by name.

    Two groups with the same name and tenant are a caller bug (the store's key is
    (tenant, name)) and raise :class:`GroupError`.
    """
    by_name: dict[str, list[Group]] = {}
    for group in groups:
        same = by_name.setdefault(group.name, [])
        if any(other.tenant_id == group.tenant_id for other in same):
            raise GroupError(
                f"group {group.name!r} of tenant {group.tenant_id!r} given twice",
                field="name",
                hint="pass each (tenant, name) once",
            )
        same.append(group)
    unique = {name: found[0] for name, found in by_name.items() if len(found) == 1}
    ambiguous = {
        name: tuple(sorted(g.tenant_id for g in found))
        for name, found in by_name.items()
        if len(found) > 1
    }
    return GroupIndex(unique, ambiguous)
