"""Saved groups: the group=NAME selector term, its errors, and membership = selector + pinned."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from aegis_edge_core.errors import LocalProtocolError
from aegis_edge_core.fleet import (
    DaemonSnapshot,
    FleetRun,
    FleetSpec,
    Group,
    GroupError,
    Selector,
    SelectorError,
    SkipReason,
    index_groups,
    parse_selector,
    resolve_targets,
)
from aegis_edge_core.fleet.groups import MAX_PINNED, check_group_name, check_group_selector
from aegis_edge_core.fleet.selector import (
    GROUP_NAME_CHARACTERS,
    GroupTerm,
    OsTerm,
    TagOp,
    TagsTerm,
    Term,
)

from .helpers import snap
from .test_selector import selectors, small_terms

WEB = Group(name="web", tenant_id="tenant-a", selector="tags=web", pinned=["pin-1", "gone"])
INDEX = index_groups([WEB, Group(name="db", tenant_id="tenant-a", selector="tags=db")])

# --- names and definitions ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["web", "a", "0", "web-eu.1_b", "x" * 64])
def test_valid_group_names(name: str) -> None:
    assert check_group_name(name) == name
    assert str(parse_selector(f"group={name}")) == f"group={name}"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "empty group name"),
        ("Web", "lower case, got 'W' (write 'web')"),
        ("-web", "cannot start with '-'"),
        (".web", "cannot start with '.'"),
        ("we b", "' ' is not allowed"),
        ("web:1", "':' is not allowed"),
        ("x" * 65, "longer than 64"),
    ],
)
def test_invalid_group_names_say_what_is_wrong(name: str, message: str) -> None:
    with pytest.raises(GroupError) as caught:
        check_group_name(name)
    assert message in str(caught.value)
    assert caught.value.field == "name"
    with pytest.raises(GroupError):
        Group(name=name, tenant_id="t", selector="all")


def test_groups_do_not_nest() -> None:
    with pytest.raises(GroupError) as caught:
        Group(name="outer", tenant_id="t", selector="os=linux group=web")
    assert caught.value.field == "selector"
    assert "cannot name another group (group=web)" in str(caught.value)
    with pytest.raises(GroupError):
        check_group_selector(Selector(terms=[GroupTerm(name="web")]))
    # A bad selector is still a SelectorError with its column.
    with pytest.raises(SelectorError) as bad:
        Group(name="g", tenant_id="t", selector="os=linux tagz=x")
    assert bad.value.column == 10


def test_definition_rules() -> None:
    g = Group(name="g", tenant_id="t", selector="tags=AnyOf(b,a)", pinned=["n2", "n1", "n2"])
    assert g.pinned == ("n1", "n2")
    assert str(g.selector) == "tags=AnyOf(a,b)"
    assert g.to_dict() == {
        "name": "g",
        "tenant_id": "t",
        "selector": "tags=AnyOf(a,b)",
        "pinned": ["n1", "n2"],
    }
    with pytest.raises(GroupError, match="needs a tenant"):
        Group(name="g", tenant_id="", selector="all")
    with pytest.raises(GroupError, match="invalid pinned node id"):
        Group(name="g", tenant_id="t", selector="all", pinned=["has space"])
    with pytest.raises(GroupError, match="at most"):
        Group(name="g", tenant_id="t", selector="all", pinned=[f"n{i}" for i in range(1001)])
    most = [f"n{i}" for i in range(MAX_PINNED)]
    assert len(Group(name="g", tenant_id="t", selector="all", pinned=most).pinned) == MAX_PINNED
    with pytest.raises(TypeError):
        Group(name="g", tenant_id="t", selector="all", pinned="n1")


# --- the selector term -------------------------------------------------------------------------


def test_group_term_is_canonical_and_round_trips() -> None:
    sel = parse_selector("tags=prod group=web os=linux")
    assert str(sel) == "os=linux tags=prod group=web"
    assert sel.group_names == ("web",)
    assert parse_selector(str(sel)) == sel
    assert Selector(terms=[GroupTerm(name="web"), OsTerm(os="Linux")]) == parse_selector(
        "os=linux group=web"
    )


@pytest.mark.parametrize(
    ("text", "column", "message"),
    [
        ("group=", 7, "expected a group name, got end of input"),
        ("group", 6, "'group' needs a value"),
        ("os=linux group=Web", 16, "group names are lower case"),
        ("group=w@b", 8, "'@' is not allowed in a group name"),
        ("group=_web", 7, "cannot start with '_'"),
        ("group=web,db", 10, "'group' takes one group name"),
        ("group=web(x)", 10, "unexpected '(' in group= term"),
        ("groop=web", 1, "unknown key 'groop' (did you mean 'group'?)"),
        ("tags=x  group=nope", 15, "unknown group 'nope'"),
        ("group=wbe", 7, "unknown group 'wbe' (did you mean 'group=web'?)"),
    ],
)
def test_group_term_errors_point_at_the_column(text: str, column: int, message: str) -> None:
    with pytest.raises(SelectorError) as caught:
        parse_selector(text, groups=INDEX)
    assert caught.value.column == column
    assert caught.value.source == text
    assert message in str(caught.value)


def test_without_groups_only_the_spelling_is_checked() -> None:
    assert parse_selector("group=anything").group_names == ("anything",)


def test_an_ambiguous_name_says_to_name_the_tenant() -> None:
    both = index_groups([WEB, Group(name="web", tenant_id="tenant-b", selector="all")])
    assert "web" not in both
    assert both.ambiguous == {"web": ("tenant-a", "tenant-b")}
    with pytest.raises(SelectorError) as caught:
        parse_selector("os=linux group=web", groups=both)
    assert caught.value.column == 16
    assert "more than one tenant (tenant-a, tenant-b)" in str(caught.value)
    assert "--tenant" in str(caught.value)
    with pytest.raises(GroupError, match="given twice"):
        index_groups([WEB, WEB])


def test_matches_of_a_group_selector_is_a_caller_bug() -> None:
    sel = parse_selector("group=web")
    with pytest.raises(LocalProtocolError):
        sel.matches(snap("a"))
    assert sel.matcher(INDEX)(snap("a", tags={"web"}))


def test_matcher_refuses_an_unknown_group_at_its_canonical_column() -> None:
    with pytest.raises(SelectorError) as caught:
        parse_selector("group=zz os=linux").matcher(INDEX)
    # canonical text: "os=linux group=zz"
    assert caught.value.source == "os=linux group=zz"
    assert caught.value.column == 16


# --- resolution: members = selector or pinned, within the group's tenant ----------------------


def test_resolution_of_a_group() -> None:
    fleet = [
        snap("a", tags={"web"}),
        snap("b", tags={"web"}, status="Unhealthy"),
        snap("pin-1", status="Disconnected"),
        snap("other", tags={"db"}),
        snap("b-web", tags={"web"}, tenant_id="tenant-b"),  # another tenant's: never a member
    ]
    res = resolve_targets(fleet, "group=web", "cmd.run", groups=INDEX)
    assert res.targets == ("a",)
    assert [s.to_dict() for s in res.skipped] == [
        {"node_id": "b", "reason": "unhealthy"},
        {"node_id": "gone", "reason": "not_found"},
        {"node_id": "pin-1", "reason": "disconnected"},
    ]
    assert res.considered == 5 and res.matched == 4
    # ANDed with other terms like any term; a missing pin is still reported.
    narrowed = resolve_targets(fleet, "group=web tags=NoneOf(web)", "cmd.run", groups=INDEX)
    assert narrowed.targets == ()
    assert {s.node_id: s.reason for s in narrowed.skipped} == {
        "pin-1": SkipReason.DISCONNECTED,
        "gone": SkipReason.NOT_FOUND,
    }


def test_a_group_run_plans_and_records_not_found() -> None:
    fleet = [snap("a", tags={"web"})]
    spec = FleetSpec(selector="group=web", tool="cmd.run")
    res = resolve_targets(fleet, spec.selector, spec.tool, groups=INDEX)
    run = FleetRun(spec, res, fleet_command_id="f-1")
    run.start(0.0)
    record = run.record()
    assert record.selector == "group=web"
    assert [s.reason for s in record.skipped] == [SkipReason.NOT_FOUND, SkipReason.NOT_FOUND]
    assert type(record).from_dict(record.to_dict()) == record


ids = st.sampled_from(["a", "b", "c", "d"])
fleets = st.lists(
    st.builds(
        lambda node_id, tenant, status, tags, os: DaemonSnapshot(
            node_id=node_id,
            tenant_id=tenant,
            status=status,
            os=os,
            tools={"t"},
            tags=tags,
        ),
        ids,
        st.sampled_from(["ta", "tb"]),
        st.sampled_from(["Connected", "Disconnected", "Revoked"]),
        st.frozensets(st.sampled_from(["a", "b", "c"])),
        st.sampled_from(["linux", "darwin"]),
    ),
    max_size=4,
    unique_by=lambda s: s.node_id,
)


@settings(max_examples=300, deadline=None)
@given(
    fleets,
    st.lists(small_terms, min_size=1, max_size=3),
    st.frozensets(st.sampled_from(["a", "b", "c", "d", "e", "f"])),
    st.sampled_from(["ta", "tb"]),
    st.none() | small_terms,
)
def test_resolution_is_selector_union_pinned(
    fleet: list[DaemonSnapshot],
    terms: list[Term],
    pinned: frozenset[str],
    tenant: str,
    extra: Term | None,
) -> None:
    group = Group(name="g", tenant_id=tenant, selector=Selector(terms=terms), pinned=pinned)
    outer = Selector(terms=[GroupTerm(name="g"), *([extra] if extra is not None else [])])
    res = resolve_targets(fleet, outer, "t", groups=index_groups([group]))
    # The longhand meaning, independent of the compiled predicates:
    members = {
        s.node_id
        for s in fleet
        if s.tenant_id == tenant
        and (group.selector.matches(s) or s.node_id in pinned)
        and (extra is None or Selector(terms=[extra]).matches(s))
    }
    present = {s.node_id for s in fleet}
    found = set(res.targets) | {s.node_id for s in res.skipped if s.reason != "not_found"}
    assert found == members
    assert {s.node_id for s in res.skipped if s.reason == "not_found"} == pinned - present
    connected = {s.node_id for s in fleet if s.status == "Connected"}
    assert set(res.targets) == members & connected
    assert res.considered == len(fleet)


@settings(max_examples=300, deadline=None)
@given(selectors, st.text(alphabet=sorted(GROUP_NAME_CHARACTERS), min_size=1, max_size=8))
def test_an_unknown_group_after_any_selector_points_at_its_name(
    selector: Selector, name: str
) -> None:
    assume(check_group_name_ok(name))
    prefix = "" if str(selector) == "all" else str(selector) + " "
    text = prefix + f"group={name}"
    with pytest.raises(SelectorError) as caught:
        parse_selector(text, groups={})
    assert caught.value.column == len(prefix) + len("group=") + 1
    assert f"unknown group {name!r}" in str(caught.value)


def check_group_name_ok(name: str) -> bool:
    try:
        check_group_name(name)
    except GroupError:
        return False
    return True


@settings(max_examples=200, deadline=None)
@given(selectors, st.text(alphabet=sorted(GROUP_NAME_CHARACTERS), min_size=1, max_size=8))
def test_selectors_with_a_group_round_trip(selector: Selector, name: str) -> None:
    assume(check_group_name_ok(name) and str(selector) != "all")
    with_group = Selector(terms=[*selector.terms, GroupTerm(name=name)])
    assert parse_selector(str(with_group)) == with_group
    assert with_group.group_names == (name,)
    assert str(with_group).endswith(f"group={name}")  # groups sort last


def test_tags_term_still_parses_beside_a_group() -> None:
    sel = parse_selector("tags=AnyOf(a,b) group=web", groups=INDEX)
    assert sel.terms[0] == TagsTerm(op=TagOp.ANY_OF, tags=["a", "b"])
