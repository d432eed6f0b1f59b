"""The selector grammar: parsing, canonical form, matching, and errors that point."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis_edge_core.errors import AegisError
from aegis_edge_core.fleet import DaemonSnapshot, Selector, SelectorError, parse_selector
from aegis_edge_core.fleet.selector import (
    MAX_SELECTOR_LENGTH,
    NAME_CHARACTERS,
    AllTerm,
    ArchTerm,
    LabelTerm,
    NodeTerm,
    OsTerm,
    TagOp,
    TagsTerm,
    Term,
    ToolsTerm,
)

from .helpers import snap

# --- parsing and canonical form ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("all", "all"),
        ("  all\t", "all"),
        ("node=b,a,b", "node=a,b"),
        ("os=Linux", "os=linux"),
        ("arch=X86_64", "arch=x86_64"),
        ("tools=keys.rotate,cmd.run", "tools=cmd.run,keys.rotate"),
        ("tags=managed-fleet", "tags=managed-fleet"),
        ("tags=AnyOf(potentially-affected,prod)", "tags=AnyOf(potentially-affected,prod)"),
        ("tags=AnyOf( prod , potentially-affected )", "tags=AnyOf(potentially-affected,prod)"),
        ("tags=AllOf(b,a)", "tags=AllOf(a,b)"),
        ("tags=NoneOf(x)", "tags=NoneOf(x)"),
        ("tags=AnyOf(x)", "tags=x"),
        ("tags=AllOf(x,x)", "tags=x"),
        ("tags=AnyOf", "tags=AnyOf"),  # a tag that happens to be spelled like an operator
        ("labels=region=eu-west-1", "labels=region=eu-west-1"),
        ("labels=gpu", "labels=gpu"),
        ("tags=ns:team/a_b.c@x+y", "tags=ns:team/a_b.c@x+y"),
        # Terms sort by key in the grammar's order, then by text; duplicates collapse.
        ("tags=prod os=linux node=n1 tags=prod", "node=n1 os=linux tags=prod"),
        ("labels=a tools=x arch=arm64 tags=b", "arch=arm64 tools=x tags=b labels=a"),
        ("tags=b\ntags=a", "tags=a tags=b"),
    ],
)
def test_canonical_form(text: str, canonical: str) -> None:
    selector = parse_selector(text)
    assert str(selector) == canonical
    assert parse_selector(canonical) == selector


def test_equal_spellings_compare_equal_and_hash_alike() -> None:
    a = parse_selector("tags=AnyOf(b, a) os=Linux")
    b = parse_selector("os=linux tags=AnyOf(a,b)")
    assert a == b
    assert hash(a) == hash(b)
    assert {a: 1}[b] == 1


def test_direct_construction_is_canonical_too() -> None:
    built = Selector(terms=[TagsTerm(op=TagOp.ANY_OF, tags=["prod", "b"]), OsTerm(os="Linux")])
    assert built == parse_selector("os=linux tags=AnyOf(b,prod)")
    with pytest.raises(ValueError):
        Selector(terms=[])
    with pytest.raises(ValueError):
        Selector(terms=[AllTerm(), OsTerm(os="linux")])
    with pytest.raises(ValueError):
        NodeTerm(node_ids=["has space"])
    with pytest.raises(TypeError):
        NodeTerm(node_ids="abc")


# --- matching --------------------------------------------------------------------------------

WEB = snap(
    "web-1",
    os="Linux",
    arch="x86_64",
    tools={"cmd.run", "sys.info"},
    tags={"prod", "potentially-affected"},
    labels={"region": "eu", "gpu": ""},
)
DB = snap("db-1", os="darwin", arch="aarch64", tools={"sys.info"}, tags={"staging"}, labels={})


@pytest.mark.parametrize(
    ("text", "web", "db"),
    [
        ("all", True, True),
        ("node=web-1", True, False),
        ("node=web-1,db-1", True, True),
        ("os=linux", True, False),
        ("os=LINUX", True, False),
        ("arch=aarch64", False, True),
        ("tools=sys.info", True, True),
        ("tools=cmd.run,sys.info", True, False),
        ("tags=prod", True, False),
        ("tags=AnyOf(potentially-affected,prod)", True, False),
        ("tags=AnyOf(staging,prod)", True, True),
        ("tags=AllOf(prod,staging)", False, False),
        ("tags=AllOf(prod,potentially-affected)", True, False),
        ("tags=NoneOf(prod)", False, True),
        ("tags=NoneOf(nope)", True, True),
        ("labels=region", True, False),
        ("labels=gpu", True, False),  # present with an empty value still counts
        ("labels=region=eu", True, False),
        ("labels=region=us", False, False),
        ("os=linux tags=prod", True, False),
        ("os=linux tags=staging", False, False),
        ("tags=prod tags=staging", False, False),
        ("node=web-1 node=db-1", False, False),
    ],
)
def test_matches(text: str, web: bool, db: bool) -> None:
    selector = parse_selector(text)
    assert selector.matches(WEB) is web
    assert selector.matches(DB) is db


def test_matching_ignores_status_and_tenant() -> None:
    revoked = snap("r", status="Revoked", tenant_id="other", tags={"prod"})
    assert parse_selector("tags=prod").matches(revoked)


# --- errors that point at the column --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "column", "message"),
    [
        ("os=linux tagz=prod", 10, "selector column 10: unknown key 'tagz' (did you mean 'tags'?)"),
        ("tag=prod", 1, "selector column 1: unknown key 'tag' (did you mean 'tags'?)"),
        ("Tags=prod", 1, "selector column 1: unknown key 'Tags' (did you mean 'tags'?)"),
        ("label=k", 1, "selector column 1: unknown key 'label' (did you mean 'labels'?)"),
        ("nodes=a", 1, "selector column 1: unknown key 'nodes' (did you mean 'node'?)"),
        ("hostname=a", 1, "unknown key 'hostname' (valid keys are node, os, arch, tools, tags"),
        ("", 1, "selector column 1: empty selector (use 'all' to target every daemon)"),
        ("   ", 4, "empty selector"),
        ("prod", 1, "expected key=value, got 'prod' (to select a tag, write tags=prod)"),
        ("al", 1, "did you mean 'all'?"),
        ("all=yes", 4, "'all' takes no value"),
        ("all os=linux", 1, "'all' cannot be combined with other terms"),
        ("os=linux all", 10, "'all' cannot be combined with other terms"),
        ("tags", 5, "'tags' needs a value"),
        ("tags=", 6, "expected a tag, got end of input"),
        ("tags= prod", 6, "expected a tag, got a space"),
        ("=prod", 1, "expected a key before '='"),
        ("tags=anyof(a,b)", 6, "unknown tag operator 'anyof' (did you mean 'AnyOf'?)"),
        ("tags=SomeOf(a,b)", 6, "unknown tag operator 'SomeOf'"),
        ("tags=AnyOf(a,b", 15, "unclosed '(' opened at column 11 (add ')')"),
        ("tags=AnyOf()", 12, "AnyOf() needs at least one tag"),
        ("tags=AnyOf(a,,b)", 14, "expected a tag, got ','"),
        ("tags=AnyOf(a b)", 14, "expected ',' or ')', got 'b'"),
        ("tags=AnyOf(a,b)x", 16, "unexpected 'x' in tags= term"),
        ("tags=a,b", 7, "unexpected ',' in tags= term"),
        ("AnyOf(a,b)", 6, "operators go in a tags= term"),
        ("node=a,,b", 8, "expected a node id, got ','"),
        ("node=a,", 8, "expected a node id, got end of input"),
        ("os=linux,darwin", 9, "'os' takes one value"),
        ("labels=k=", 10, "expected a label value, got end of input"),
        ("labels=a=1,b=2", 11, "write one label per term"),
        ("labels=a=b=c", 11, "a label value cannot contain '='"),
        ("tags=caf\u00e9", 9, "unexpected '\u00e9' in tags= term"),
        ("os=linux\x00", 9, "unexpected '\\x00'"),
        ("(", 1, "expected a term, got '('"),
    ],
)
def test_errors_point_at_the_column(text: str, column: int, message: str) -> None:
    with pytest.raises(SelectorError) as caught:
        parse_selector(text)
    err = caught.value
    assert err.column == column
    assert err.source == text
    assert message in str(err)
    assert isinstance(err, AegisError)


def test_render_draws_a_caret_under_the_column() -> None:
    with pytest.raises(SelectorError) as caught:
        parse_selector("os=linux\ttagz=prod")
    assert caught.value.render() == (
        "selector column 10: unknown key 'tagz' (did you mean 'tags'?)\n"
        "  os=linux tagz=prod\n"
        "           ^"
    )
    assert caught.value.caret(indent="") == "os=linux tagz=prod\n         ^"


def test_oversized_selector_is_refused() -> None:
    text = "tags=" + "a" * MAX_SELECTOR_LENGTH
    with pytest.raises(SelectorError) as caught:
        parse_selector(text)
    assert caught.value.column == MAX_SELECTOR_LENGTH + 1
    assert "longer than" in str(caught.value)


def test_non_string_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        parse_selector(None)  # type: ignore[arg-type]


# --- properties --------------------------------------------------------------------------------

GRAMMAR_ALPHABET = "allnodesarchtoolstagslabelsAnyOfAllOfNoneOf=,() \t-._:/@+x1\u00e9\x00"


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=60), st.text(alphabet=GRAMMAR_ALPHABET, max_size=60)))
def test_arbitrary_text_raises_only_selector_error(text: str) -> None:
    try:
        selector = parse_selector(text)
    except SelectorError as err:
        assert 1 <= err.column <= len(text) + 1
        assert err.source == text
    else:
        assert parse_selector(str(selector)) == selector


names = st.text(alphabet=sorted(NAME_CHARACTERS), min_size=1, max_size=8)
name_lists = st.lists(names, min_size=1, max_size=4)


def _terms() -> st.SearchStrategy[Term]:
    return st.one_of(
        name_lists.map(lambda ids: NodeTerm(node_ids=ids)),
        names.map(lambda os: OsTerm(os=os)),
        names.map(lambda arch: ArchTerm(arch=arch)),
        name_lists.map(lambda tools: ToolsTerm(tools=tools)),
        names.map(lambda tag: TagsTerm(op=TagOp.HAS, tags=[tag])),
        st.builds(
            lambda op, tags: TagsTerm(op=op, tags=tags),
            st.sampled_from([TagOp.ANY_OF, TagOp.ALL_OF, TagOp.NONE_OF]),
            name_lists,
        ),
        st.builds(lambda k, v: LabelTerm(key=k, value=v), names, st.none() | names),
    )


selectors = st.one_of(
    st.just(Selector(terms=[AllTerm()])),
    st.lists(_terms(), min_size=1, max_size=5).map(lambda terms: Selector(terms=terms)),
)


@settings(max_examples=300, deadline=None)
@given(selectors)
def test_str_round_trips(selector: Selector) -> None:
    assert parse_selector(str(selector)) == selector
    assert str(parse_selector(str(selector))) == str(selector)


@settings(max_examples=200, deadline=None)
@given(selectors, st.randoms(use_true_random=False))
def test_spelling_does_not_change_the_value(selector: Selector, rnd: random.Random) -> None:
    # Shuffle terms and insert spaces inside parentheses: still the same selector.
    parts = [str(term) for term in selector.terms]
    rnd.shuffle(parts)
    spelled = "  ".join(
        part.replace(",", " , ").replace("(", "( ") if "(" in part else part for part in parts
    )
    assert parse_selector(spelled) == selector


snapshots = st.builds(
    lambda node_id, os, tools, tags, labels: DaemonSnapshot(
        node_id=node_id,
        tenant_id="t",
        status="Connected",
        os=os,
        arch="x86_64",
        tools=tools,
        tags=tags,
        labels=labels,
    ),
    st.sampled_from(["a", "b", "c"]),
    st.sampled_from(["linux", "Linux", "darwin"]),
    st.frozensets(st.sampled_from(["a", "b", "c"])),
    st.frozensets(st.sampled_from(["a", "b", "c"])),
    st.dictionaries(st.sampled_from(["a", "b"]), st.sampled_from(["a", "b"])),
)
small_names = st.sampled_from(["a", "b", "c"])
small_terms = st.one_of(
    st.lists(small_names, min_size=1, max_size=3).map(lambda ids: NodeTerm(node_ids=ids)),
    st.sampled_from(["linux", "darwin"]).map(lambda os: OsTerm(os=os)),
    st.lists(small_names, min_size=1, max_size=3).map(lambda tools: ToolsTerm(tools=tools)),
    small_names.map(lambda tag: TagsTerm(op=TagOp.HAS, tags=[tag])),
    st.builds(
        lambda op, tags: TagsTerm(op=op, tags=tags),
        st.sampled_from([TagOp.ANY_OF, TagOp.ALL_OF, TagOp.NONE_OF]),
        st.lists(small_names, min_size=1, max_size=3),
    ),
    st.builds(lambda k, v: LabelTerm(key=k, value=v), small_names, st.none() | small_names),
)


def _reference(term: Term, s: DaemonSnapshot) -> bool:
    """The grammar's meaning written out longhand, independent of the compiled predicates."""
    if isinstance(term, AllTerm):
        return True
    if isinstance(term, NodeTerm):
        return any(s.node_id == n for n in term.node_ids)
    if isinstance(term, OsTerm):
        return s.os.casefold() == term.os.casefold()
    if isinstance(term, ArchTerm):
        return s.arch.casefold() == term.arch.casefold()
    if isinstance(term, ToolsTerm):
        return all(tool in s.tools for tool in term.tools)
    if isinstance(term, TagsTerm):
        have = [tag in s.tags for tag in term.tags]
        if term.op is TagOp.ANY_OF:
            return any(have)
        if term.op is TagOp.NONE_OF:
            return not any(have)
        return all(have)
    assert isinstance(term, LabelTerm)
    if term.value is None:
        return term.key in s.labels
    return term.key in s.labels and s.labels[term.key] == term.value


@settings(max_examples=300, deadline=None)
@given(st.lists(small_terms, min_size=1, max_size=4), snapshots)
def test_matches_agrees_with_the_longhand_meaning(terms: list[Term], s: DaemonSnapshot) -> None:
    selector = Selector(terms=terms)
    assert selector.matches(s) == all(_reference(term, s) for term in terms)
