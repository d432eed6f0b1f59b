"""Tool policy: which tool calls a host runs, decided by its owner and only narrowed by a relay.

Theory of operation
-------------------
The host owner writes the policy (``tools.allow`` and ``tools.cmd_run.allow`` in
``aegis-config.yaml``, or ``aegis edge enroll --allow-tool``). Every incoming tool call is put
to :meth:`ToolPolicy.evaluate`, which answers a :class:`Decision` naming the *rule* that
decided -- a config key, and the entry within it -- so a ``denied`` answer and the daemon's log
can say exactly why. A denied call runs nothing.

Evaluation is a fixed pipeline; the first layer that denies wins:

1. **Tool name** against ``tools.allow``. Entries are tool names or ``fnmatch`` globs
   (``acme.*``) matched case-sensitively. ``cmd.run`` is special: it runs arbitrary programs, so
   only the literal entry ``cmd.run`` enables it -- a glob such as ``*`` never does. By default
   ``sys.info``, ``edge.ping`` and ``keys.rotate`` are allowed and ``cmd.run`` is not.
2. **cmd.run arguments**. A call must carry exactly one of ``cmd`` (a string for
   ``/bin/sh -c``) or ``argv`` (a non-empty list of strings, run without a shell); anything else
   is denied by rule ``cmd.run.args``.
3. **cmd.run command** against ``tools.cmd_run.allow``, if that list is set (unset means the
   owner enabled ``cmd.run`` for any command; an empty list allows none). Patterns are tried in
   order; the first match decides. Each pattern is a glob (``*``, ``?``, ``[...]``) with one
   twist for safety: **wildcards never match shell metacharacters** ``; & | < > ` $ ( )`` or a
   newline. So ``ls *`` allows ``ls -la /tmp`` but not ``ls; rm -rf /``; to allow a compound
   command, write its operators literally (``/opt/aegis/upgrade.sh && systemctl --user restart
   aegis-edge.service``). A pattern is matched two ways:

   * **whole command**: against the ``cmd`` string (surrounding whitespace stripped), or for
     ``argv`` against ``shlex.join(argv)`` -- the same text a shell user would type, so one
     pattern means the same in both forms;
   * **program** (only for patterns without whitespace, e.g. ``uptime`` or ``/usr/bin/*``):
     against ``argv[0]`` as written (no ``PATH`` lookup), allowing any arguments. For the
     ``cmd`` form this applies only when the string contains no metacharacter at all and
     ``argv[0]`` is its first ``shlex`` word -- otherwise the shell could run something after
     the program.
4. **Restrictions** (:class:`ToolRestriction`, e.g. pushed by the relay): each one is another
   allowlist the call must *also* pass. A restriction can only deny more, never allow more --
   :meth:`ToolPolicy.narrow` adds one -- which is how "a relay can never widen what the host
   owner allowed" holds by construction.

Everything is pure: no clock, no files; the same inputs always give the same decision.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from aegis_edge_core.errors import ConfigError

__all__ = [
    "BUILTIN_TOOLS",
    "CMD_RUN",
    "DEFAULT_ALLOWED_TOOLS",
    "SHELL_METACHARACTERS",
    "Decision",
    "ToolPolicy",
    "ToolRestriction",
    "command_text",
]

CMD_RUN = "cmd.run"
"""The one built-in tool that runs arbitrary programs; off until the host owner enables it."""

BUILTIN_TOOLS: tuple[str, ...] = ("cmd.run", "sys.info", "edge.ping", "keys.rotate")
"""Tools every daemon ships; more plug in through the ``aegis_edge.tools`` entry points."""

DEFAULT_ALLOWED_TOOLS: tuple[str, ...] = ("sys.info", "edge.ping", "keys.rotate")
"""What a host allows when its owner says nothing: everything built in except ``cmd.run``."""

SHELL_METACHARACTERS = frozenset(";&|<>`$()\n\r")
"""Characters that let ``/bin/sh`` run more than one simple command; wildcards skip them."""

_META_CLASS = "".join(re.escape(c) for c in sorted(SHELL_METACHARACTERS))
_NOT_META = f"[^{_META_CLASS}]"
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+")


@attrs.frozen(kw_only=True)
class Decision:
    """The answer for one tool call: allowed or not, the rule that decided, and why.

    ``rule`` is a config key, optionally with the deciding entry: ``"tools.allow: sys.info"``,
    ``"tools.cmd_run.allow: ls *"``, ``"tools.allow"`` (nothing matched), ``"cmd.run.args"``,
    or the same under a restriction's prefix (``"relay.tools.allow"``).
    """

    allowed: bool
    rule: str
    reason: str


def _translate(pattern: str) -> str:
    """Glob to regex, like :func:`fnmatch.translate` but wildcards skip metacharacters."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            while i < n and pattern[i] == "*":
                i += 1
            out.append(f"{_NOT_META}*")
        elif c == "?":
            out.append(_NOT_META)
        elif c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            j = pattern.find("]", j)
            if j < 0:
                out.append(re.escape(c))  # an unclosed '[' is literal, as in fnmatch
                continue
            body, i = pattern[i:j], j + 1
            negate = body.startswith("!")
            if negate:
                body = body[1:]
            chars = "".join(ch if ch == "-" else re.escape(ch) for ch in body)
            # A negated class is still a wildcard: it must not reach metacharacters either.
            out.append(f"[^{chars}{_META_CLASS}]" if negate else f"[{chars}]")
        else:
            out.append(re.escape(c))
    return "".join(out)


def _compile(pattern: str, path: str) -> re.Pattern[str]:
    try:
        return re.compile(_translate(pattern), re.DOTALL)
    except re.error as exc:
        raise ConfigError(f"invalid pattern {pattern!r}: {exc}", path=path) from None


def _to_names(value: Iterable[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        # A bare string would iterate as characters: almost certainly a mistake.
        raise ConfigError(f"expected a list of strings, got the string {value!r}")
    return tuple(dict.fromkeys(value))


def _check_entries(kind: str) -> Any:
    def check(inst: Any, _attr: object, value: tuple[str, ...] | None) -> None:
        if value is None:
            return
        for i, entry in enumerate(value):
            path = f"{inst.source}.{kind}[{i}]"
            if not isinstance(entry, str) or not entry.strip():
                raise ConfigError(f"expected a non-empty string, got {entry!r}", path=path)
            if kind == "allow" and not _TOOL_NAME.fullmatch(entry):
                raise ConfigError(
                    f"expected a tool name such as 'sys.info', got {entry!r}",
                    path=path,
                    hint="tool names use letters, digits, '.', '_' and '-'; globs are allowed",
                )

    return check


def command_text(args: Mapping[str, object]) -> tuple[str, list[str] | None]:
    """The text a ``cmd.run`` call is matched against, and its ``argv`` if one is known.

    Raises :class:`ValueError` with a reason when the arguments are malformed. ``argv`` is
    ``None`` for a ``cmd`` string that the shell could expand into more than one command or
    that ``shlex`` cannot split; such a call can only be allowed by a whole-command pattern.
    """
    has_cmd, has_argv = "cmd" in args, "argv" in args
    if has_cmd == has_argv:
        raise ValueError("cmd.run needs exactly one of 'cmd' (a shell string) or 'argv' (a list)")
    if has_cmd:
        cmd = args["cmd"]
        if not isinstance(cmd, str) or not cmd.strip():
            raise ValueError(f"'cmd' must be a non-empty string, got {cmd!r}")
        text = cmd.strip()
        if SHELL_METACHARACTERS.intersection(text):
            return text, None
        try:
            words = shlex.split(text)
        except ValueError:
            return text, None
        return text, words or None
    argv = args["argv"]
    if (
        isinstance(argv, str | bytes)
        or not isinstance(argv, list | tuple)
        or not argv
        or not all(isinstance(a, str) for a in argv)
        or not argv[0]
    ):
        raise ValueError(f"'argv' must be a non-empty list of strings, got {argv!r}")
    words = [str(a) for a in argv]
    return shlex.join(words), words


@attrs.frozen(kw_only=True)
class _Layer:
    """What a policy and a restriction share: two allowlists and a rule prefix."""

    source: str = attrs.field(default="tools")
    allow: tuple[str, ...] | None = attrs.field(
        default=DEFAULT_ALLOWED_TOOLS, converter=_to_names, validator=_check_entries("allow")
    )
    cmd_run_allow: tuple[str, ...] | None = attrs.field(
        default=None, converter=_to_names, validator=_check_entries("cmd_run.allow")
    )
    _compiled: tuple[tuple[str, re.Pattern[str], bool], ...] = attrs.field(
        init=False, repr=False, eq=False
    )

    def __attrs_post_init__(self) -> None:
        compiled = tuple(
            (p, _compile(p, f"{self.source}.cmd_run.allow[{i}]"), not any(c.isspace() for c in p))
            for i, p in enumerate(self.cmd_run_allow or ())
        )
        object.__setattr__(self, "_compiled", compiled)

    def _literal_cmd_run_required(self) -> bool:
        return True

    def _check_tool(self, tool: str) -> Decision:
        key = f"{self.source}.allow"
        if self.allow is None:
            return Decision(allowed=True, rule=key, reason=f"{key} is unset: any tool")
        for entry in self.allow:
            if entry == tool:
                return Decision(allowed=True, rule=f"{key}: {entry}", reason=f"{tool} is listed")
        if tool == CMD_RUN and self._literal_cmd_run_required():
            return Decision(
                allowed=False,
                rule=key,
                reason=f"cmd.run is off: it must be listed by name in {key} (globs never enable"
                " it)",
            )
        for entry in self.allow:
            if fnmatch.fnmatchcase(tool, entry):
                return Decision(
                    allowed=True, rule=f"{key}: {entry}", reason=f"{tool} matches {entry!r}"
                )
        return Decision(allowed=False, rule=key, reason=f"tool {tool!r} is not in {key}")

    def _check_command(self, text: str, argv: list[str] | None) -> Decision:
        key = f"{self.source}.cmd_run.allow"
        if self.cmd_run_allow is None:
            return Decision(allowed=True, rule=key, reason=f"{key} is unset: any command")
        for pattern, regex, program in self._compiled:
            if regex.fullmatch(text):
                return Decision(
                    allowed=True,
                    rule=f"{key}: {pattern}",
                    reason=f"command {text!r} matches {pattern!r}",
                )
            if program and argv is not None and regex.fullmatch(argv[0]):
                return Decision(
                    allowed=True,
                    rule=f"{key}: {pattern}",
                    reason=f"program {argv[0]!r} matches {pattern!r}",
                )
        reason = f"no pattern in {key} matches {text!r}"
        if argv is None and SHELL_METACHARACTERS.intersection(text):
            reason += " (it contains shell metacharacters: only a whole-command pattern that"
            reason += " spells them out can allow it)"
        return Decision(allowed=False, rule=key, reason=reason)

    def _check(self, tool: str, command: tuple[str, list[str] | None] | None) -> Decision:
        decision = self._check_tool(tool)
        if not decision.allowed or command is None:
            return decision
        return self._check_command(*command)


@attrs.frozen(kw_only=True)
class ToolRestriction(_Layer):
    """A narrowing layer, e.g. settings pushed by the relay: calls must pass it as well.

    ``allow=None`` / ``cmd_run_allow=None`` mean "no restriction" on that list. Rules it
    decides are prefixed with ``source`` (default ``relay.tools``).
    """

    source: str = attrs.field(default="relay.tools")
    allow: tuple[str, ...] | None = attrs.field(
        default=None, converter=_to_names, validator=_check_entries("allow")
    )

    def _literal_cmd_run_required(self) -> bool:
        # A restriction cannot widen anything, so a glob in it may cover cmd.run.
        return False


def _to_restrictions(value: Iterable[ToolRestriction]) -> tuple[ToolRestriction, ...]:
    out = tuple(value)
    for r in out:
        if not isinstance(r, ToolRestriction):
            raise TypeError(f"expected a ToolRestriction, got {type(r).__name__}")
    return out


@attrs.frozen(kw_only=True)
class ToolPolicy(_Layer):
    """The host owner's tool policy, plus any restrictions layered on top.

    ``allow`` lists tool names or globs (default :data:`DEFAULT_ALLOWED_TOOLS`; ``cmd.run``
    only by name). ``cmd_run_allow`` lists command patterns; ``None`` (the default) means any
    command once ``cmd.run`` is allowed, ``()`` means none.
    """

    allow: tuple[str, ...] = attrs.field(
        default=DEFAULT_ALLOWED_TOOLS, converter=_to_names, validator=_check_entries("allow")
    )
    restrictions: tuple[ToolRestriction, ...] = attrs.field(default=(), converter=_to_restrictions)

    def narrow(self, *restrictions: ToolRestriction | None) -> ToolPolicy:
        """This policy with more restrictions; ``None`` entries are skipped.

        The result allows a call only if this policy *and* every restriction allow it, so it
        can never allow something this policy denies.
        """
        extra = tuple(r for r in restrictions if r is not None)
        return attrs.evolve(self, restrictions=self.restrictions + extra)

    def allows_tool(self, tool: str) -> bool:
        """Whether ``tool`` passes every layer's name check (e.g. to advertise capabilities).

        For ``cmd.run`` this says it is enabled, not that any particular command is allowed.
        """
        return all(layer._check_tool(tool).allowed for layer in (self, *self.restrictions))

    def evaluate(self, tool: str, args: Mapping[str, object] | None = None) -> Decision:
        """Decide one call of ``tool`` with ``args``; see the module docstring for the order."""
        if not isinstance(tool, str) or not tool:
            return Decision(allowed=False, rule="tool", reason=f"invalid tool name {tool!r}")
        command: tuple[str, list[str] | None] | None = None
        decision = self._check_tool(tool)
        if not decision.allowed:
            return decision
        if tool == CMD_RUN:
            try:
                command = command_text(args or {})
            except ValueError as exc:
                return Decision(allowed=False, rule="cmd.run.args", reason=str(exc))
            decision = self._check_command(*command)
            if not decision.allowed:
                return decision
        for restriction in self.restrictions:
            narrowed = restriction._check(tool, command)
            if not narrowed.allowed:
                return narrowed
        return decision
