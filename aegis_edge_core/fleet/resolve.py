"""Target resolution: from a selector and the fleet as it is now, who runs the tool.

Theory of operation
-------------------

Resolution is a pure function of three inputs: the daemon snapshots the caller passes in
(already scoped to the tenants the operator may touch -- the core has no notion of who is
asking), a :class:`~aegis_edge_core.fleet.selector.Selector`, and the tool name. Every
snapshot the selector matches ends up in exactly one of two places:

* ``targets`` -- the daemon is ``Connected`` and advertises the tool; or
* ``skipped`` -- with exactly one :class:`~aegis_edge_core.fleet.outcomes.SkipReason`,
  decided by the first row of this table that applies:

  ========================  ====================
  when the daemon's ...     skip reason
  ========================  ====================
  status is Revoked         ``revoked``
  status is Disconnected    ``disconnected``
  status is Unhealthy       ``unhealthy``
  tools lack the tool       ``tool_unavailable``
  ========================  ====================

  Status comes first because it is the more fundamental fact: a revoked daemon that lacks
  the tool is skipped for being revoked.

Snapshots the selector does not match are only counted (``considered``). Both lists are
sorted by node id, so the same fleet and selector always give the same plan, and a canary
is always the same first few hosts.

A selector that names saved groups (``group=web``) is resolved against the ``groups`` the
caller passes (:mod:`aegis_edge_core.fleet.groups`; an unknown name is a
:class:`~aegis_edge_core.fleet.errors.SelectorError`). One more row then applies: a node
pinned by a named group that is not among the snapshots at all is skipped ``not_found``
-- there is no snapshot to match the other terms against, and dropping it would hide
that a host the operator pinned is gone. Such skips are counted in ``matched`` but not in
``considered`` (they were never examined).

"Nothing matched is never silent": a resolution with no targets is a legal value
(``fleet preview`` prints it), but :meth:`Resolution.require_targets` -- which the planner
calls before it will start -- raises :class:`~aegis_edge_core.fleet.errors.NoTargets`,
whose message names the selector and how many daemons matched but were skipped, by reason.

Two *matched* snapshots with the same node id are a bug in the caller (its store returned a
daemon twice) and raise :class:`~aegis_edge_core.errors.LocalProtocolError`: running a tool
twice on one host because of it would be worse than refusing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final

import attrs

from aegis_edge_core.errors import LocalProtocolError
from aegis_edge_core.fleet.errors import NoTargets
from aegis_edge_core.fleet.outcomes import DaemonStatus, SkipReason
from aegis_edge_core.fleet.selector import Selector, parse_selector
from aegis_edge_core.fleet.snapshot import DaemonSnapshot

if TYPE_CHECKING:
    from aegis_edge_core.fleet.groups import Group

__all__ = ["Resolution", "Skipped", "resolve_targets"]


@attrs.frozen(kw_only=True)
class Skipped:
    """A matched daemon that will not run the tool, and why."""

    node_id: str = attrs.field(validator=attrs.validators.instance_of(str))
    reason: SkipReason = attrs.field(converter=SkipReason)

    def to_dict(self) -> dict[str, str]:
        """``{"node_id": ..., "reason": ...}``, the CLI's JSON shape for a skip."""
        return {"node_id": self.node_id, "reason": self.reason.value}


def _tool_set(tools: Iterable[str]) -> frozenset[str]:
    if isinstance(tools, str):
        raise TypeError(f"expected a collection of tool names, got the string {tools!r}")
    return frozenset(tools)


def _sorted_ids(node_ids: Iterable[str]) -> tuple[str, ...]:
    if isinstance(node_ids, str):
        raise TypeError(f"expected a collection of node ids, got the string {node_ids!r}")
    return tuple(sorted(node_ids))


def _sorted_skips(skipped: Iterable[Skipped]) -> tuple[Skipped, ...]:
    return tuple(sorted(skipped, key=lambda skip: skip.node_id))


def _default_considered(resolution: Resolution) -> int:
    return len(resolution.targets) + len(resolution.skipped)


# Which statuses keep a matched daemon from being a target; Connected is the only one that
# does not. Order of the checks is the docstring's table: status first, then the tool.
_STATUS_SKIPS: Final[Mapping[DaemonStatus, SkipReason | None]] = {
    DaemonStatus.CONNECTED: None,
    DaemonStatus.UNHEALTHY: SkipReason.UNHEALTHY,
    DaemonStatus.DISCONNECTED: SkipReason.DISCONNECTED,
    DaemonStatus.REVOKED: SkipReason.REVOKED,
}


@attrs.frozen(kw_only=True)
class Resolution:
    """The outcome of resolving a selector for a tool over a fleet.

    ``targets`` are node ids, sorted; ``skipped`` is sorted by node id; the two never share
    a node id. ``considered`` is how many snapshots were examined (matched or not).
    Construct directly to rebuild one from storage; the invariants are checked.
    """

    selector: Selector = attrs.field(validator=attrs.validators.instance_of(Selector))
    tool: str = attrs.field(validator=attrs.validators.instance_of(str))
    targets: tuple[str, ...] = attrs.field(converter=_sorted_ids)
    skipped: tuple[Skipped, ...] = attrs.field(converter=_sorted_skips)
    considered: int = attrs.field(
        default=attrs.Factory(_default_considered, takes_self=True),
        validator=attrs.validators.instance_of(int),
    )
    offered_tools: frozenset[str] = attrs.field(converter=_tool_set, factory=frozenset)
    """Every tool some matched daemon offers, whatever its status: what to suggest when
    ``tool`` is none of them (a typo such as ``cmd.rnu``)."""

    def __attrs_post_init__(self) -> None:
        ids = set(self.targets)
        if len(ids) != len(self.targets):
            raise ValueError("a node id appears twice among the targets")
        skipped_ids = {skip.node_id for skip in self.skipped}
        if len(skipped_ids) != len(self.skipped):
            raise ValueError("a node id appears twice among the skipped")
        if not ids.isdisjoint(skipped_ids):
            raise ValueError("a node id is both a target and skipped")
        examined = self.matched - sum(s.reason is SkipReason.NOT_FOUND for s in self.skipped)
        if self.considered < examined:
            raise ValueError(f"considered ({self.considered}) < matched ({examined})")

    @property
    def matched(self) -> int:
        """How many daemons the selector matched: targets plus skipped."""
        return len(self.targets) + len(self.skipped)

    @property
    def empty(self) -> bool:
        """True when there is nothing to run on (nothing matched, or all were skipped)."""
        return not self.targets

    def skipped_by_reason(self) -> dict[SkipReason, int]:
        """Skip counts per reason, in :class:`SkipReason` order, reasons with none left out."""
        counts = Counter(skip.reason for skip in self.skipped)
        return {reason: counts[reason] for reason in SkipReason if counts[reason]}

    def require_targets(self) -> Resolution:
        """Return ``self``, or raise :class:`NoTargets` if there is nothing to run on."""
        if not self.targets:
            raise NoTargets(self)
        return self

    def to_dict(self) -> dict[str, object]:
        """The JSON shape of ``fleet preview --output json``."""
        return {
            "selector": str(self.selector),
            "tool": self.tool,
            "considered": self.considered,
            "matched": self.matched,
            "targets": list(self.targets),
            "skipped": [skip.to_dict() for skip in self.skipped],
        }


def resolve_targets(
    snapshots: Iterable[DaemonSnapshot],
    selector: Selector | str,
    tool: str,
    *,
    groups: Mapping[str, Group] | None = None,
) -> Resolution:
    """Split the daemons ``selector`` matches into targets and skips for running ``tool``.

    ``selector`` may be a string, parsed with
    :func:`~aegis_edge_core.fleet.selector.parse_selector` (so a
    :class:`~aegis_edge_core.fleet.errors.SelectorError` can come out). ``groups`` are the
    saved groups in the caller's scope by name (see
    :func:`~aegis_edge_core.fleet.groups.index_groups`), needed only when the selector
    names one. See the module docstring for the exact rules.
    """
    if isinstance(selector, str):
        selector = parse_selector(selector, groups=groups)
    matches = selector.matcher(groups)
    pinned: set[str] = set()
    for name in selector.group_names:
        assert groups is not None  # matcher() raised otherwise
        pinned.update(groups[name].pinned)
    status_skips = _STATUS_SKIPS
    targets: list[str] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    offered: set[str] = set()
    considered = 0
    if pinned:
        # Which pinned nodes are absent needs a second look at the snapshots; only a
        # selector with a pinning group pays for it, not the 10k-daemon hot path.
        snapshots = list(snapshots)
        pinned.difference_update(s.node_id for s in snapshots)
    for snapshot in snapshots:
        considered += 1
        if not matches(snapshot):
            continue
        node_id = snapshot.node_id
        if node_id in seen:
            raise LocalProtocolError(
                f"node {node_id!r} appears twice in the snapshots",
                hint="pass each daemon once; the store returned a duplicate",
            )
        seen.add(node_id)
        offered.update(snapshot.tools)
        reason = status_skips[snapshot.status]
        if reason is None and tool not in snapshot.tools:
            reason = SkipReason.TOOL_UNAVAILABLE
        if reason is None:
            targets.append(node_id)
        else:
            skipped.append(Skipped(node_id=node_id, reason=reason))
    skipped.extend(Skipped(node_id=node_id, reason=SkipReason.NOT_FOUND) for node_id in pinned)
    return Resolution(
        selector=selector,
        tool=tool,
        targets=targets,
        skipped=skipped,
        considered=considered,
        offered_tools=offered,
    )
