"""The fleet selector: which daemons an operator means by ``--target``.

One parser, used by the CLI (``--target``), the admin API (``FleetRunSpec.selector``,
``ListHostsRequest.selector``) and ``fleet preview``, so a selector means the same thing
wherever it is typed.

Grammar
-------

A selector is one or more *terms* separated by whitespace (space, tab, CR, LF); leading and
trailing whitespace is ignored. A daemon is selected when **every** term holds::

    selector  := term (ws+ term)*
    term      := "all"
               | "node="   name ("," name)*          node id is one of these
               | "os="     name                      os equals, ignoring case
               | "arch="   name                      arch equals, ignoring case
               | "tools="  name ("," name)*          daemon allows every listed tool
               | "tags="   name                      daemon has this tag
               | "tags="   op "(" name ("," name)* ")"
               | "labels=" name                      daemon has this label key
               | "labels=" name "=" name             label key has exactly this value
               | "group="  group                     daemon is a member of a saved group
    op        := "AnyOf" | "AllOf" | "NoneOf"        at least one / every / none of the tags
    name      := one or more of  A-Z a-z 0-9 - . _ : / @ +
    group     := a-z or 0-9, then up to 63 of  a-z 0-9 - . _

Exact rules, in the order an operator meets them:

* Keys are lower case and case-sensitive; operators are spelled ``AnyOf``, ``AllOf``,
  ``NoneOf``. An unknown key or operator is an error that suggests the nearest valid one
  (``tagz`` -> ``tags``, ``anyof`` -> ``AnyOf``).
* ``all`` matches every daemon and must stand alone: ``all os=linux`` is an error, because
  an operator who wrote both meant one of them and we cannot tell which.
* Inside the parentheses of an operator, whitespace around names and commas is tolerated:
  ``tags=AnyOf(a, b)`` is ``tags=AnyOf(a,b)``. Shells pass either as one argument when
  quoted; the canonical form has none. Whitespace anywhere else inside a term ends it.
* ``tags=x`` without parentheses is the single tag ``x``, even when ``x`` is spelled like an
  operator (``tags=AnyOf`` selects the tag ``AnyOf``); a name followed by ``(`` is always an
  operator call.
* ``os`` and ``arch`` values are compared ignoring case (the selector stores them lower
  case); node ids, tools, tags and labels are compared exactly.
* Selection ignores status and tenant. Scoping to the operator's tenants is the caller's
  job (filter the snapshots first); turning matches into targets or skips by status is
  :mod:`aegis_edge_core.fleet.resolve`'s.
* Repeated keys are ANDed like any other terms: ``tags=a tags=b`` is ``tags=AllOf(a,b)``
  in effect, and ``node=a node=b`` matches nothing.
* The empty selector (or only whitespace) is an error: write ``all`` to mean everything.
  So is a selector longer than :data:`MAX_SELECTOR_LENGTH` characters.
* ``group=web`` names one saved group (:mod:`aegis_edge_core.fleet.groups`); its members
  are the daemons of the group's tenant its own selector matches, plus its pinned nodes.
  Group names are lower case (:data:`GROUP_NAME_CHARACTERS`), one per term; like every
  other term it is ANDed, so ``group=web os=linux`` is the group's Linux members. The
  parser knows groups only when the caller passes them (``parse_selector(text,
  groups=...)``): then an unknown name is an error at its column. Without them the term is
  only checked for spelling, and :meth:`Selector.matcher` binds it later; ``matches`` of a
  selector that names a group is a caller bug (:class:`~aegis_edge_core.errors.LocalProtocolError`).

Canonical form
--------------

A :class:`Selector` is stored canonically: values inside a term sorted and de-duplicated,
``AnyOf``/``AllOf`` of a single tag folded into ``tags=x``, terms sorted (by key in the
grammar's order, then by text) and de-duplicated. ``str(selector)`` prints that form,
``parse_selector(str(s)) == s`` for every selector, and two selectors that differ only in
spelling (order, duplicates, spaces in parentheses, ``OS`` case) compare equal.

Errors
------

Every refusal is a :class:`~aegis_edge_core.fleet.errors.SelectorError` whose ``column``
(1-based, in characters) points at the first character that cannot be right: the start of
an unknown key, the comma of an empty list item, or one past the end when the input stops
too early (an unclosed parenthesis). Nothing else is ever raised for a ``str`` argument.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, ClassVar, Final, TypeAlias

import attrs

from aegis_edge_core.errors import LocalProtocolError
from aegis_edge_core.fleet.errors import SelectorError
from aegis_edge_core.fleet.snapshot import DaemonSnapshot

if TYPE_CHECKING:
    from aegis_edge_core.fleet.groups import Group

__all__ = [
    "GROUP_NAME_CHARACTERS",
    "MAX_GROUP_NAME_LENGTH",
    "MAX_SELECTOR_LENGTH",
    "NAME_CHARACTERS",
    "SELECTOR_KEYS",
    "AllTerm",
    "ArchTerm",
    "GroupTerm",
    "LabelTerm",
    "NodeTerm",
    "OsTerm",
    "Selector",
    "TagOp",
    "TagsTerm",
    "Term",
    "ToolsTerm",
    "group_name_problem",
    "parse_selector",
]

MAX_SELECTOR_LENGTH: Final = 4096
"""Longer selectors are refused: no operator types one, and the API must bound its input."""

NAME_CHARACTERS: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._:/@+"
)
"""Characters allowed in node ids, OS and arch names, tools, tags, label keys and values."""

SELECTOR_KEYS: Final = ("node", "os", "arch", "tools", "tags", "labels", "group")
"""The keys of ``key=value`` terms, in canonical order (``all`` sorts before them)."""

GROUP_NAME_CHARACTERS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")
"""Characters allowed in a group name; the first must be a letter or digit."""

MAX_GROUP_NAME_LENGTH: Final = 64
"""Longer group names are refused: a name is typed, and it is a key in the store."""

_GROUP_NAME_HINT: Final = "group names are 1-64 of a-z 0-9 - . _, starting with a letter or digit"


def group_name_problem(name: str) -> tuple[int, str, str] | None:
    """What is wrong with ``name`` as a group name: ``(index, message, hint)``, or None.

    ``index`` is the 0-based position of the first character that cannot be right (0 for
    an empty name, :data:`MAX_GROUP_NAME_LENGTH` for one that is too long). One rule, used
    by the selector parser (``group=``) and by :class:`~aegis_edge_core.fleet.groups.Group`.
    Lower case only, so that ``Web`` and ``web`` can never be two groups an operator
    confuses.
    """
    hint = _GROUP_NAME_HINT
    if not name:
        return 0, "empty group name", hint
    if len(name) > MAX_GROUP_NAME_LENGTH:
        return MAX_GROUP_NAME_LENGTH, f"group name longer than {MAX_GROUP_NAME_LENGTH}", hint
    for index, char in enumerate(name):
        if char not in GROUP_NAME_CHARACTERS:
            if char.lower() in GROUP_NAME_CHARACTERS:
                return (
                    index,
                    f"group names are lower case, got {char!r}",
                    (f"write {name.lower()!r}"),
                )
            return index, f"{char!r} is not allowed in a group name", hint
    if name[0] in "-._":
        return 0, f"a group name cannot start with {name[0]!r}", hint
    return None


_WHITESPACE: Final = frozenset(" \t\r\n")


def _check_name(what: str, name: str) -> None:
    if not name or not NAME_CHARACTERS.issuperset(name):
        raise ValueError(f"invalid {what} {name!r}: use letters, digits and - . _ : / @ +")


def _canonical_names(values: Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        raise TypeError(f"expected a collection of names, got the string {values!r}")
    return tuple(sorted(set(values)))


def _names_validator(
    what: str,
) -> Callable[[object, attrs.Attribute[tuple[str, ...]], tuple[str, ...]], None]:
    def check(
        _inst: object, _attr: attrs.Attribute[tuple[str, ...]], values: tuple[str, ...]
    ) -> None:
        if not values:
            raise ValueError(f"at least one {what} is required")
        for value in values:
            _check_name(what, value)

    return check


def _name_validator(what: str) -> Callable[[object, attrs.Attribute[str], str], None]:
    def check(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
        _check_name(what, value)

    return check


def _lower(value: str) -> str:
    return value.lower()


# --- terms ---------------------------------------------------------------------------------
#
# Each term knows three things: its sort rank (its key's place in the grammar), how to print
# itself canonically, and how to build a predicate over snapshots. Predicates are closures
# built once per Selector, because resolution calls them once per daemon of the fleet.


@attrs.frozen(kw_only=True)
class AllTerm:
    """``all``: every daemon."""

    rank: ClassVar[int] = 0

    def __str__(self) -> str:
        return "all"

    def predicate(self) -> Callable[[DaemonSnapshot], bool]:
        return lambda _snapshot: True


@attrs.frozen(kw_only=True)
class NodeTerm:
    """``node=a,b``: the daemon's node id is one of ``node_ids``."""

    rank: ClassVar[int] = 1
    node_ids: tuple[str, ...] = attrs.field(
        converter=_canonical_names, validator=_names_validator("node id")
    )

    def __str__(self) -> str:
        return "node=" + ",".join(self.node_ids)

    def predicate(self) -> Callable[[DaemonSnapshot], bool]:
        wanted = frozenset(self.node_ids)
        return lambda snapshot: snapshot.node_id in wanted


@attrs.frozen(kw_only=True)
class OsTerm:
    """``os=linux``: the daemon's OS, ignoring case."""

    rank: ClassVar[int] = 2
    os: str = attrs.field(converter=_lower, validator=_name_validator("os"))

    def __str__(self) -> str:
        return f"os={self.os}"

    def predicate(self) -> Callable[[DaemonSnapshot], bool]:
        wanted = self.os
        return lambda snapshot: snapshot.os.lower() == wanted


@attrs.frozen(kw_only=True)
class ArchTerm:
    """``arch=x86_64``: the daemon's architecture, ignoring case."""

    rank: ClassVar[int] = 3
    arch: str = attrs.field(converter=_lower, validator=_name_validator("arch"))

    def __str__(self) -> str:
        return f"arch={self.arch}"

    def predicate(self) -> Callable[[DaemonSnapshot], bool]:
        wanted = self.arch
        return lambda snapshot: snapshot.arch.lower() == wanted


@attrs.frozen(kw_only=True)
class ToolsTerm:
    """``tools=a,b``: the daemon allows every one of ``tools``."""

    rank: ClassVar[int] = 4
    tools: tuple[str, ...] = attrs.field(
        converter=_canonical_names, validator=_names_validator("tool")
    )

    def __str__(self) -> str:
        return "tools=" + ",".join(self.tools)

    def predicate(self) -> Callable[[DaemonSnapshot], bool]:
        wanted = frozenset(self.tools)
        return lambda snapshot: wanted <= snapshot.tools


class TagOp(enum.Enum):
    """How a ``tags=`` term combines its tags."""

    HAS = "has"  # tags=x
    ANY_OF = "AnyOf"
    ALL_OF = "AllOf"
    NONE_OF = "NoneOf"


_TAG_OPS_BY_NAME: Final = {op.value: op for op in TagOp if op is not TagOp.HAS}

# How each operator decides, given the term's tags `w` and the daemon's tags `t`. For
# a single tag, AnyOf and AllOf both mean "has it", so the canonical form folds them into
# HAS and `tags=AnyOf(x)` equals `tags=x`.
_TAG_PREDICATES: Final[dict[TagOp, Callable[[frozenset[str], frozenset[str]], bool]]] = {
    TagOp.HAS: lambda w, t: w <= t,
    TagOp.ANY_OF: lambda w, t: not w.isdisjoint(t),
    TagOp.ALL_OF: lambda w, t: w <= t,
    TagOp.NONE_OF: lambda w, t: w.isdisjoint(t),
}


@attrs.frozen(kw_only=True)
class TagsTerm:
    """``tags=x``, ``tags=AnyOf(a,b)``, ``tags=AllOf(a,b)``, ``tags=NoneOf(a,b)``."""

    rank: ClassVar[int] = 5
    op: TagOp = attrs.field(validator=attrs.validators.instance_of(TagOp))
    tags: tuple[str, ...] = attrs.field(
        converter=_canonical_names, validator=_names_validator("tag")
    )

    def __attrs_post_init__(self) -> None:
        if len(self.tags) == 1 and self.op in (TagOp.ANY_OF, TagOp.ALL_OF):
            object.__setattr__(self, "op", TagOp.HAS)
        if self.op is TagOp.HAS and len(self.tags) != 1:
            raise ValueError("TagOp.HAS takes exactly one tag; use ALL_OF for several")

    def __str__(self) -> str:
        if self.op is TagOp.HAS:
            return f"tags={self.tags[0]}"
        return f"tags={self.op.value}({','.join(self.tags)})"

    def predicate(self) -> Callable[[DaemonSnapshot], bool]:
        wanted = frozenset(self.tags)
        if self.op is TagOp.HAS:
            (tag,) = self.tags
            return lambda snapshot: tag in snapshot.tags
        decide = _TAG_PREDICATES[self.op]
        return lambda snapshot: decide(wanted, snapshot.tags)


@attrs.frozen(kw_only=True)
class LabelTerm:
    """``labels=k`` (the key is present) or ``labels=k=v`` (the key has exactly value v)."""

    rank: ClassVar[int] = 6
    key: str = attrs.field(validator=_name_validator("label key"))
    value: str | None = attrs.field(default=None)

    @value.validator
    def _check_value(self, _attr: attrs.Attribute[str | None], value: str | None) -> None:
        if value is not None:
            _check_name("label value", value)

    def __str__(self) -> str:
        if self.value is None:
            return f"labels={self.key}"
        return f"labels={self.key}={self.value}"

    def predicate(self) -> Callable[[DaemonSnapshot], bool]:
        key, value = self.key, self.value
        if value is None:
            return lambda snapshot: key in snapshot.labels
        return lambda snapshot: snapshot.labels.get(key) == value


def _check_group_name(_inst: object, _attr: attrs.Attribute[str], name: str) -> None:
    problem = group_name_problem(name)
    if problem is not None:
        _index, message, hint = problem
        raise ValueError(f"invalid group name {name!r}: {message} ({hint})")


@attrs.frozen(kw_only=True)
class GroupTerm:
    """``group=web``: the daemon is a member of the saved group ``name``.

    The term is only a name; what it matches depends on the group's definition, which the
    caller passes to :meth:`Selector.matcher`.
    """

    rank: ClassVar[int] = 7
    name: str = attrs.field(validator=_check_group_name)

    def __str__(self) -> str:
        return f"group={self.name}"

    def predicate(self) -> Callable[[DaemonSnapshot], bool]:
        name = self.name

        def unbound(_snapshot: DaemonSnapshot) -> bool:
            raise LocalProtocolError(
                f"the selector names group {name!r}, which has no definition here",
                hint="match with selector.matcher(groups), passing the groups in scope",
            )

        return unbound


Term: TypeAlias = (
    AllTerm | NodeTerm | OsTerm | ArchTerm | ToolsTerm | TagsTerm | LabelTerm | GroupTerm
)
"""One ``key=value`` condition (or ``all``) of a selector."""


def _term_sort_key(term: Term) -> tuple[int, str]:
    return (term.rank, str(term))


def _canonical_terms(terms: Iterable[Term]) -> tuple[Term, ...]:
    return tuple(sorted(set(terms), key=_term_sort_key))


def _check_terms(
    _inst: object, _attr: attrs.Attribute[tuple[Term, ...]], terms: tuple[Term, ...]
) -> None:
    if not terms:
        raise ValueError("a selector needs at least one term; use AllTerm() for every daemon")
    if len(terms) > 1 and any(isinstance(term, AllTerm) for term in terms):
        raise ValueError("AllTerm() cannot be combined with other terms")


def _all_hold(
    checks: tuple[Callable[[DaemonSnapshot], bool], ...],
) -> Callable[[DaemonSnapshot], bool]:
    # One term is the common case; calling its predicate directly saves a loop per daemon.
    if len(checks) == 1:
        return checks[0]

    def every(snapshot: DaemonSnapshot) -> bool:
        # A plain loop: all() over a generator costs a frame per daemon, and this runs
        # once per daemon of the fleet.
        for check in checks:  # noqa: SIM110
            if not check(snapshot):
                return False
        return True

    return every


@attrs.frozen(kw_only=True)
class Selector:
    """A parsed selector: the conjunction of its ``terms``, stored canonically.

    Build one with :func:`parse_selector`; constructing it from terms directly is fine too
    and yields the same canonical value. ``str()`` is the canonical text, ``matches()``
    the predicate.
    """

    terms: tuple[Term, ...] = attrs.field(converter=_canonical_terms, validator=_check_terms)
    _matches: Callable[[DaemonSnapshot], bool] = attrs.field(
        init=False, eq=False, repr=False, hash=False
    )

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_matches", _all_hold(tuple(t.predicate() for t in self.terms)))

    def __str__(self) -> str:
        return " ".join(str(term) for term in self.terms)

    @property
    def matches(self) -> Callable[[DaemonSnapshot], bool]:
        """``matches(snapshot) -> bool``: whether every term holds for the daemon.

        A property returning the compiled predicate, so ``filter(sel.matches, snapshots)``
        costs one call per daemon and no attribute lookups. For a selector that names a
        group use :meth:`matcher` instead: the group term alone cannot decide.
        """
        return self._matches

    @property
    def group_names(self) -> tuple[str, ...]:
        """The names of the groups the ``group=`` terms name, sorted."""
        return tuple(term.name for term in self.terms if isinstance(term, GroupTerm))

    def matcher(
        self, groups: Mapping[str, Group] | None = None
    ) -> Callable[[DaemonSnapshot], bool]:
        """The predicate with every ``group=`` term bound to its definition in ``groups``.

        Raises :class:`~aegis_edge_core.fleet.errors.SelectorError` for a group that
        ``groups`` lacks, with the column of its term in ``str(self)`` (the canonical
        text; parse the operator's text with ``parse_selector(text, groups=...)`` to get
        the column in what they typed). A selector without group terms returns
        :attr:`matches` and ignores ``groups``.
        """
        if not self.group_names:
            return self._matches
        known = groups if groups is not None else {}
        checks: list[Callable[[DaemonSnapshot], bool]] = []
        column = 1
        for term in self.terms:
            if isinstance(term, GroupTerm):
                group = known.get(term.name)
                if group is None:
                    text = str(self)
                    raise _unknown_group(text, column + len("group=") - 1, term.name, known)
                checks.append(group.holds)
            else:
                checks.append(term.predicate())
            column += len(str(term)) + 1
        return _all_hold(tuple(checks))


# --- parser --------------------------------------------------------------------------------


def _suggestion(word: str, choices: Iterable[str]) -> str | None:
    options = list(choices)
    lowered = {choice.lower(): choice for choice in options}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[close[0]] if close else None


def _describe(text: str, index: int) -> str:
    if index >= len(text):
        return "end of input"
    char = text[index]
    if char in _WHITESPACE:
        return "a space" if char == " " else f"whitespace {char!r}"
    return repr(char)


def _unknown_group(text: str, index: int, name: str, groups: Mapping[str, Group]) -> SelectorError:
    """The error for ``group=<name>`` when ``groups`` has no such group.

    A name that several tenants in scope define is ambiguous rather than unknown: the
    caller (:func:`~aegis_edge_core.fleet.groups.index_groups`) left it out and recorded
    the tenants, and the fix is to name one.
    """
    from aegis_edge_core.fleet.groups import GroupIndex

    if isinstance(groups, GroupIndex) and name in groups.ambiguous:
        tenants = ", ".join(groups.ambiguous[name])
        return SelectorError(
            f"group {name!r} is defined in more than one tenant ({tenants})",
            column=index + 1,
            source=text,
            hint="name the tenant (--tenant) so the group is unambiguous",
        )
    near = _suggestion(name, groups)
    hint = f"did you mean 'group={near}'?" if near else "'aegis edge groups ls' lists the groups"
    return SelectorError(f"unknown group {name!r}", column=index + 1, source=text, hint=hint)


class _Parser:
    """A hand-written scanner: the grammar is small and every error needs its column."""

    def __init__(self, text: str, groups: Mapping[str, Group] | None = None) -> None:
        self.text = text
        self.pos = 0
        self.groups = groups

    def fail(self, message: str, index: int, hint: str = "") -> SelectorError:
        return SelectorError(message, column=index + 1, source=self.text, hint=hint)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def at_term_end(self) -> bool:
        return self.pos >= len(self.text) or self.text[self.pos] in _WHITESPACE

    def skip_whitespace(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
            self.pos += 1

    def word(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in NAME_CHARACTERS:
            self.pos += 1
        return self.text[start : self.pos]

    def name(self, what: str) -> str:
        start = self.pos
        name = self.word()
        if not name:
            raise self.fail(
                f"expected a {what}, got {_describe(self.text, start)}",
                start,
                "names use letters, digits and - . _ : / @ +",
            )
        return name

    def name_list(self, what: str) -> tuple[str, ...]:
        names = [self.name(what)]
        while self.peek() == ",":
            self.pos += 1
            names.append(self.name(what))
        return tuple(names)

    def end_of_term(self, key: str) -> None:
        if self.at_term_end():
            return
        char = self.text[self.pos]
        hint = ""
        if char == "," and key in ("os", "arch"):
            hint = f"'{key}' takes one value; run once per {key}, or select on tags"
        elif char == "," and key == "labels":
            hint = "write one label per term: labels=a=1 labels=b=2"
        elif char == "=" and key == "labels":
            hint = "a label value cannot contain '='"
        elif char in "()":
            hint = "parentheses follow AnyOf, AllOf or NoneOf in a tags= term"
        raise self.fail(f"unexpected {char!r} in {key}= term", self.pos, hint)

    def parse(self) -> Selector:
        text = self.text
        if len(text) > MAX_SELECTOR_LENGTH:
            raise self.fail(
                f"selector is longer than {MAX_SELECTOR_LENGTH} characters", MAX_SELECTOR_LENGTH
            )
        terms: list[tuple[Term, int]] = []
        self.skip_whitespace()
        if self.pos >= len(text):
            raise self.fail("empty selector", self.pos, "use 'all' to target every daemon")
        while self.pos < len(text):
            start = self.pos
            terms.append((self.term(), start))
            self.skip_whitespace()
        everything = [start for term, start in terms if isinstance(term, AllTerm)]
        if everything and len(terms) > 1:
            raise self.fail(
                "'all' cannot be combined with other terms",
                everything[0],
                "drop 'all' to select by the other terms, or use 'all' alone",
            )
        return Selector(terms=[term for term, _ in terms])

    def term(self) -> Term:
        start = self.pos
        key = self.word()
        if self.peek() != "=":
            if key == "all" and self.at_term_end():
                return AllTerm()
            if not key:
                raise self.fail(
                    f"expected a term, got {_describe(self.text, start)}",
                    start,
                    "terms are all, node=, os=, arch=, tools=, tags=, labels= and group=",
                )
            if key in SELECTOR_KEYS:
                raise self.fail(
                    f"'{key}' needs a value",
                    self.pos,
                    f"write {key}=<value>, e.g. {_EXAMPLES[key]}",
                )
            if not self.at_term_end():
                char = self.text[self.pos]
                hint = ""
                if char == "(":
                    hint = "operators go in a tags= term, e.g. tags=AnyOf(a,b)"
                raise self.fail(f"unexpected {char!r}", self.pos, hint)
            near = _suggestion(key, ("all", *SELECTOR_KEYS))
            if near is not None and near != key:
                hint = f"did you mean '{near}'?" if near == "all" else f"did you mean '{near}=...'?"
            else:
                hint = f"to select a tag, write tags={key}"
            raise self.fail(f"expected key=value, got {key!r}", start, hint)
        if not key:
            raise self.fail("expected a key before '='", start, _VALID_KEYS_HINT)
        if key == "all":
            raise self.fail("'all' takes no value", self.pos, "write 'all' alone")
        if key not in SELECTOR_KEYS:
            near = _suggestion(key, SELECTOR_KEYS)
            hint = f"did you mean '{near}'?" if near is not None else _VALID_KEYS_HINT
            raise self.fail(f"unknown key {key!r}", start, hint)
        self.pos += 1  # the '='
        parsed = _VALUE_PARSERS[key](self)
        self.end_of_term(key)
        return parsed

    def node_value(self) -> Term:
        return NodeTerm(node_ids=self.name_list("node id"))

    def group_value(self) -> Term:
        start = self.pos
        name = self.word()
        if not name:
            raise self.fail(
                f"expected a group name, got {_describe(self.text, start)}",
                start,
                _GROUP_NAME_HINT,
            )
        problem = group_name_problem(name)
        if problem is not None:
            index, message, hint = problem
            raise self.fail(message, start + index, hint)
        if self.peek() == ",":
            raise self.fail(
                "'group' takes one group name",
                self.pos,
                "terms are ANDed: to run on two groups, run once per group",
            )
        if self.groups is not None and name not in self.groups:
            raise _unknown_group(self.text, start, name, self.groups)
        return GroupTerm(name=name)

    def os_value(self) -> Term:
        return OsTerm(os=self.name("os name"))

    def arch_value(self) -> Term:
        return ArchTerm(arch=self.name("architecture"))

    def tools_value(self) -> Term:
        return ToolsTerm(tools=self.name_list("tool name"))

    def labels_value(self) -> Term:
        key = self.name("label key")
        if self.peek() != "=":
            return LabelTerm(key=key)
        self.pos += 1
        if self.at_term_end():
            raise self.fail(
                f"expected a label value, got {_describe(self.text, self.pos)}",
                self.pos,
                f"write labels={key} to select on the key alone",
            )
        return LabelTerm(key=key, value=self.name("label value"))

    def tags_value(self) -> Term:
        start = self.pos
        name = self.name("tag")
        if self.peek() != "(":
            return TagsTerm(op=TagOp.HAS, tags=(name,))
        op = _TAG_OPS_BY_NAME.get(name)
        if op is None:
            near = _suggestion(name, _TAG_OPS_BY_NAME)
            hint = f"did you mean '{near}'?" if near else "operators are AnyOf, AllOf and NoneOf"
            raise self.fail(f"unknown tag operator {name!r}", start, hint)
        opened = self.pos
        self.pos += 1
        tags: list[str] = []
        self.skip_whitespace()
        if self.peek() == ")":
            raise self.fail(f"{name}() needs at least one tag", self.pos)
        while True:
            self.skip_whitespace()
            tags.append(self.name("tag"))
            self.skip_whitespace()
            char = self.peek()
            if char == ",":
                self.pos += 1
                continue
            if char == ")":
                self.pos += 1
                return TagsTerm(op=op, tags=tags)
            if not char:
                raise self.fail(f"unclosed '(' opened at column {opened + 1}", self.pos, "add ')'")
            raise self.fail(f"expected ',' or ')', got {char!r}", self.pos)


_VALID_KEYS_HINT: Final = "valid keys are " + ", ".join(SELECTOR_KEYS) + " (and 'all' alone)"

_EXAMPLES: Final = {
    "node": "node=<id>,<id>",
    "os": "os=linux",
    "arch": "arch=x86_64",
    "tools": "tools=cmd.run",
    "tags": "tags=prod or tags=AnyOf(a,b)",
    "labels": "labels=region=eu or labels=region",
    "group": "group=web",
}

# key -> how its value is read. Every key of SELECTOR_KEYS has exactly one entry.
_VALUE_PARSERS: Final[dict[str, Callable[[_Parser], Term]]] = {
    "node": _Parser.node_value,
    "os": _Parser.os_value,
    "arch": _Parser.arch_value,
    "tools": _Parser.tools_value,
    "tags": _Parser.tags_value,
    "labels": _Parser.labels_value,
    "group": _Parser.group_value,
}


def parse_selector(text: str, *, groups: Mapping[str, Group] | None = None) -> Selector:
    """Parse ``text`` (see the module docstring for the grammar) into a :class:`Selector`.

    Raises :class:`~aegis_edge_core.fleet.errors.SelectorError`, and nothing else, for any
    string that is not a valid selector. With ``groups`` (the groups in the caller's scope,
    by name), a ``group=`` term naming none of them is an error at the name's column too.
    """
    if not isinstance(text, str):
        raise TypeError(f"selector must be a str, not {type(text).__name__}")
    return _Parser(text, groups).parse()
