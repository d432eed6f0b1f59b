"""Tool policy: which tool calls a host runs, decided by its owner and only narrowed by a relay.

Theory of operation
-------------------
The host owner writes the policy (``tools.allow`` and ``tools.cmd_run.{allow, allow_env,
allow_cwd}`` in ``aegis-config.yaml``, or ``aegis edge enroll --allow-tool``). Every incoming
tool call is put to :meth:`ToolPolicy.evaluate`, which answers a :class:`Decision` naming the
*rule* that decided -- a config key, and the entry within it -- and, for an allowed
``cmd.run``, the :class:`ExecPlan` the daemon must run. A denied call runs nothing.

The policy is matched against **what will actually run**, not against the text of the call.
The core cannot look at the filesystem, so the caller passes a :class:`HostPaths` resolver:
``program(word)`` resolves a bare name through the *daemon's own* ``PATH`` (never the
caller's) or takes an absolute path as it is, and answers the symlink-free real path of an
existing executable file; ``directory(path)`` answers the real path of an existing directory.

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
   order; the first match decides. A pattern is shell-like words: a PROGRAM, then ARGUMENT
   patterns, optionally several simple commands joined by the operators ``&&``, ``||``, ``;``
   or ``|`` written literally (``/opt/aegis/upgrade.sh && systemctl --user restart
   aegis-edge.service``).

   * PROGRAM is a bare name without wildcards (``uptime``: resolved through the daemon's
     ``PATH``) or an absolute path pattern (``/usr/bin/*``: its literal directory prefix is
     resolved, the rest matched against where the program really lives). The call's program
     is resolved the same way and the two real paths are compared.
   * Wildcards (``*``, ``?``, ``[...]``) never cross ``/`` and never match an empty, ``.`` or
     ``..`` segment: words are matched segment by segment, and differing segment counts do
     not match.
   * Arguments are matched word by word, one pattern word per argument. A pattern that names
     only a program allows no arguments; a lone trailing ``*`` word allows any further
     arguments (zero or more).
   * The shell form (``cmd``) may contain only words, quotes and the four operators: ``$``,
     backquote, ``<``, ``>``, ``(``, ``)``, newlines and a lone ``&`` are refused anywhere,
     and a program word may not carry ``=`` (an assignment) or a wildcard. An operator is
     allowed only where the pattern spells it out. What runs is ``/bin/sh -c`` of the matched
     words re-quoted, each program replaced by its resolved path -- so ``PATH``, builtins,
     globbing and expansion cannot make the shell run anything but what matched.
4. **cmd.run env** against ``tools.cmd_run.allow_env`` (names or globs; default none). Names
   that change what runs (:data:`RISKY_ENV_NAMES`, :data:`RISKY_ENV_PREFIXES`) are allowed only
   by an entry naming them exactly, never by a glob.
5. **cmd.run cwd** against ``tools.cmd_run.allow_cwd`` (absolute path patterns; default none):
   the call's ``cwd`` is resolved to its real path and matched like a program path.
6. **Restrictions** (:class:`ToolRestriction`, e.g. pushed by the relay): each one is another
   set of allowlists the call must *also* pass, with the same matcher. A restriction can only
   deny more, never allow more -- :meth:`ToolPolicy.narrow` adds one -- which is how "a relay
   can never widen what the host owner allowed" holds by construction.

A denial's reason names the rule and the part refused -- the program (by its resolved path),
argument N, env NAME, the cwd -- and never repeats the command text, which may hold secrets
and ends up in the relay's history and logs.

The child's environment is not the daemon's: :func:`child_environment` builds it from
:data:`BASE_ENV_NAMES` of the daemon's environment plus what the policy allowed.

Everything here is pure: no clock, no files of its own; the same inputs and the same answers
from :class:`HostPaths` always give the same decision.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Protocol

import attrs

from aegis_edge_core.errors import ConfigError

__all__ = [
    "BASE_ENV_NAMES",
    "BUILTIN_TOOLS",
    "CMD_RUN",
    "DEFAULT_ALLOWED_TOOLS",
    "REFUSED_SHELL_CHARACTERS",
    "RISKY_ENV_NAMES",
    "RISKY_ENV_PREFIXES",
    "SHELL",
    "SHELL_OPERATORS",
    "Decision",
    "ExecPlan",
    "HostPaths",
    "ShellCommand",
    "ToolPolicy",
    "ToolRestriction",
    "child_environment",
    "is_risky_env",
    "split_shell",
]

CMD_RUN = "cmd.run"
"""The one built-in tool that runs arbitrary programs; off until the host owner enables it."""

BUILTIN_TOOLS: tuple[str, ...] = ("cmd.run", "sys.info", "edge.ping", "keys.rotate")
"""Tools every daemon ships; more plug in through the ``aegis_edge.tools`` entry points."""

DEFAULT_ALLOWED_TOOLS: tuple[str, ...] = ("sys.info", "edge.ping", "keys.rotate")
"""What a host allows when its owner says nothing: everything built in except ``cmd.run``."""

SHELL = "/bin/sh"
"""The shell that runs the ``cmd`` form."""

SHELL_OPERATORS: tuple[str, ...] = ("&&", "||", ";", "|")
"""The only shell operators a ``cmd`` may contain, and only where a pattern spells them out."""

REFUSED_SHELL_CHARACTERS = frozenset("$`<>()\n\r")
"""Refused anywhere in a ``cmd`` (quoted or not) once an allow list applies: expansion,
substitution, redirection, subshells and line breaks. A lone ``&`` is refused as well."""

BASE_ENV_NAMES: tuple[str, ...] = ("PATH", "HOME", "LANG")
"""What a child inherits from the daemon's environment; everything else must be allowed."""

RISKY_ENV_NAMES = frozenset(
    {
        # the shell and what it runs
        "PATH", "IFS", "ENV", "BASH_ENV", "SHELLOPTS", "BASHOPTS", "PS4", "PROMPT_COMMAND",
        "CDPATH", "GLOBIGNORE", "HOME", "SHELL",
        # the dynamic loader and libc (glibc's own list of variables it drops for setuid)
        "GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH",
        "MALLOC_TRACE", "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS", "TMPDIR",
        "TZDIR",
        # interpreters that load code named by a variable
        "PERLLIB", "NODE_OPTIONS", "NODE_PATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS",
        "JDK_JAVA_OPTIONS", "CLASSPATH", "LUA_INIT", "LUA_PATH", "LUA_CPATH", "TCLLIBPATH",
        "PHPRC", "PHP_INI_SCAN_DIR", "OPENSSL_CONF", "OPENSSL_ENGINES",
        # programs that run another program named by a variable
        "EDITOR", "VISUAL", "PAGER", "MANPAGER", "LESSOPEN", "LESSCLOSE", "SSH_ASKPASS",
        "SUDO_ASKPASS", "BROWSER",
    }
)  # fmt: skip
"""Variable names that change *what runs*; only an exact ``allow_env`` entry admits them."""

RISKY_ENV_PREFIXES: tuple[str, ...] = (
    "LD_",
    "DYLD_",
    "PYTHON",
    "PERL5",
    "RUBY",
    "BASH_FUNC_",
    "GIT_",
    "LUA_INIT",
)
"""Name prefixes treated like :data:`RISKY_ENV_NAMES` (``LD_PRELOAD``, ``PYTHONPATH``, ...)."""

Resolve = Callable[[str], "str | None"]

_WILDCARDS = frozenset("*?[")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+")
_ENV_PATTERN = re.compile(r"[A-Za-z0-9_*?\[\]!]+")
_CHAR_NAMES = {"\n": "a newline", "\r": "a carriage return", "`": "a backquote"}


def is_risky_env(name: str) -> bool:
    """Whether ``name`` changes what runs (or is no valid variable name at all)."""
    return (
        not _IDENTIFIER.fullmatch(name)
        or name in RISKY_ENV_NAMES
        or name.startswith(RISKY_ENV_PREFIXES)
    )


def child_environment(
    daemon_environ: Mapping[str, str],
    allowed: Mapping[str, str],
    *,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment a ``cmd.run`` child gets: never the daemon's whole environment.

    :data:`BASE_ENV_NAMES` are copied from ``daemon_environ`` (the daemon's own ``PATH``, so a
    child's lookups agree with the policy's), then ``allowed`` (the call's ``env`` once the
    policy passed it: :attr:`ExecPlan.env`), then ``extra`` -- the daemon's own markers, which
    no call can override.
    """
    env = {k: daemon_environ[k] for k in BASE_ENV_NAMES if k in daemon_environ}
    env.update(allowed)
    env.update(extra or {})
    return env


class HostPaths(Protocol):
    """What the policy needs to know about the host's files; the agent answers from disk.

    Both answers are real paths (absolute, normalised, every symlink resolved) or ``None``.
    """

    def program(self, word: str) -> str | None:
        """Resolve a program: a bare name through the daemon's own ``PATH``, an absolute path
        as it is; ``None`` unless the result is an existing executable regular file."""
        ...

    def directory(self, path: str) -> str | None:
        """The real path of the existing directory ``path`` (absolute), else ``None``."""
        ...


# -- shell words ---------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ShellCommand:
    """A ``cmd`` string split the way the policy reads it: simple commands and operators.

    ``commands[i]`` is one simple command's words (program first); ``operators[i]`` joins
    ``commands[i]`` and ``commands[i + 1]``.
    """

    commands: tuple[tuple[str, ...], ...]
    operators: tuple[str, ...]


def split_shell(text: str) -> ShellCommand:
    """Split shell text into simple commands and operators, or raise :class:`ValueError`.

    Words are separated by blanks and may be quoted (``'...'``, ``"..."`` with ``\\"`` and
    ``\\\\``, or a backslash before one character); quoting only groups -- nothing inside is
    expanded, because :data:`REFUSED_SHELL_CHARACTERS` are refused everywhere, quoted or not.
    A quoted operator is an ordinary word. The error names a column, never the text.
    """
    for i, c in enumerate(text):
        if c in REFUSED_SHELL_CHARACTERS:
            what = _CHAR_NAMES.get(c, repr(c))
            raise ValueError(
                f"{what} at column {i + 1}: expansion, substitution, redirection and subshells"
                " are never allowed"
            )
    commands: list[tuple[str, ...]] = []
    operators: list[str] = []
    words: list[str] = []
    word: list[str] = []
    in_word = False
    i, n = 0, len(text)

    def end_word() -> None:
        nonlocal in_word
        if in_word:
            words.append("".join(word))
            word.clear()
            in_word = False

    while i < n:
        c = text[i]
        if c in " \t":
            end_word()
            i += 1
        elif c == "'":
            j = text.find("'", i + 1)
            if j < 0:
                raise ValueError(f"unterminated single quote at column {i + 1}")
            word.append(text[i + 1 : j])
            in_word, i = True, j + 1
        elif c == '"':
            start, i = i, i + 1
            while True:
                if i >= n:
                    raise ValueError(f"unterminated double quote at column {start + 1}")
                c = text[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n and text[i + 1] in '"\\':
                    c, i = text[i + 1], i + 1
                word.append(c)
                i += 1
            in_word = True
        elif c == "\\":
            if i + 1 >= n:
                raise ValueError(f"a backslash at column {i + 1} escapes nothing")
            word.append(text[i + 1])
            in_word, i = True, i + 2
        elif c in "&|;":
            end_word()
            op = text[i : i + 2] if text[i : i + 2] in ("&&", "||") else c
            if op == "&":
                raise ValueError(f"a lone '&' at column {i + 1}: background jobs are not allowed")
            if not words:
                raise ValueError(f"{op!r} at column {i + 1} has no command before it")
            commands.append(tuple(words))
            words = []
            operators.append(op)
            i += len(op)
        else:
            word.append(c)
            in_word, i = True, i + 1
    end_word()
    if not words:
        raise ValueError("no command after the last operator" if operators else "no command")
    commands.append(tuple(words))
    return ShellCommand(commands=tuple(commands), operators=tuple(operators))


# -- globs, one path segment at a time -------------------------------------------------------------


def _translate(segment: str) -> str:
    """One segment's glob to a regex (no ``/`` in it, so no wildcard can cross one)."""
    out: list[str] = []
    i, n = 0, len(segment)
    while i < n:
        c = segment[i]
        i += 1
        if c == "*":
            while i < n and segment[i] == "*":
                i += 1
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i
            if j < n and segment[j] == "!":
                j += 1
            if j < n and segment[j] == "]":
                j += 1
            j = segment.find("]", j)
            if j < 0:
                out.append(re.escape(c))  # an unclosed '[' is literal, as in fnmatch
                continue
            body, i = segment[i:j], j + 1
            negate = body.startswith("!")
            if negate:
                body = body[1:]
            chars = "".join(ch if ch == "-" else re.escape(ch) for ch in body)
            out.append(f"[^{chars}]" if negate else f"[{chars}]")
        else:
            out.append(re.escape(c))
    return "".join(out)


@attrs.frozen
class _Glob:
    """A word pattern matched segment by segment: literal segments by equality, wildcard
    segments by regex but never against an empty, ``.`` or ``..`` segment."""

    text: str
    segments: tuple[str | re.Pattern[str], ...]

    @classmethod
    def compile(cls, text: str) -> _Glob:
        segments: list[str | re.Pattern[str]] = []
        for seg in text.split("/"):
            if _WILDCARDS.isdisjoint(seg):
                segments.append(seg)
                continue
            try:
                segments.append(re.compile(_translate(seg), re.DOTALL))
            except re.error as exc:
                raise ValueError(f"{seg!r} is not a valid wildcard ({exc})") from None
        return cls(text, tuple(segments))

    def matches(self, value: str) -> bool:
        parts = value.split("/")
        if len(parts) != len(self.segments):
            return False
        for seg, part in zip(self.segments, parts, strict=True):
            if isinstance(seg, str):
                if seg != part:
                    return False
            elif part in ("", ".", "..") or not seg.fullmatch(part):
                return False
        return True


@attrs.frozen
class _PathPattern:
    """An absolute path pattern: the literal directory prefix before the first wildcard
    segment is resolved on the host, the rest matched against the candidate's real path."""

    text: str
    prefix: str
    rest: _Glob | None  # None: no wildcard, the whole path is literal

    @classmethod
    def compile(cls, text: str) -> _PathPattern:
        if not text.startswith("/"):
            raise ValueError("a path must be absolute (start with '/')")
        segments = text.split("/")[1:]
        if text == "/":
            segments = []
        for seg in segments:
            if seg in ("", ".", ".."):
                raise ValueError(
                    "a path may not contain empty, '.' or '..' segments: write it normalised"
                )
        wild = [i for i, seg in enumerate(segments) if not _WILDCARDS.isdisjoint(seg)]
        if not wild:
            return cls(text, text, None)
        first = wild[0]
        prefix = "/" + "/".join(segments[:first])
        return cls(text, prefix, _Glob.compile("/".join(segments[first:])))

    def matches(self, real: str, *, whole: Resolve, prefix: Resolve) -> bool:
        """Whether the real path ``real`` matches: ``whole`` resolves a literal pattern,
        ``prefix`` the directory before the first wildcard."""
        if self.rest is None:
            return whole(self.text) == real
        base = prefix(self.prefix)
        if base is None:
            return False
        lead = base if base.endswith("/") else base + "/"
        return real.startswith(lead) and self.rest.matches(real[len(lead) :])


@attrs.frozen
class _CommandPattern:
    program: str | _PathPattern  # a bare name, or an absolute path pattern
    args: tuple[_Glob, ...]
    any_more: bool  # a lone trailing '*': any further arguments

    def program_matches(self, real: str, paths: HostPaths) -> bool:
        if isinstance(self.program, str):
            return paths.program(self.program) == real
        return self.program.matches(real, whole=paths.program, prefix=paths.directory)

    def first_bad_argument(self, args: tuple[str, ...]) -> int | None:
        """1-based index of the first argument this pattern refuses, or None if all pass."""
        for i, arg in enumerate(args):
            if i >= len(self.args):
                return None if self.any_more else i + 1
            if not self.args[i].matches(arg):
                return i + 1
        if len(args) < len(self.args):
            return len(args) + 1  # a required argument is missing
        return None


@attrs.frozen
class _Pattern:
    text: str
    commands: tuple[_CommandPattern, ...]
    operators: tuple[str, ...]


def _compile_pattern(text: str) -> _Pattern:
    shell = split_shell(text.strip())
    commands = []
    for words in shell.commands:
        program, *rest = words
        if "=" in program:
            raise ValueError("a program may not contain '=' (environment goes in allow_env)")
        if program.startswith("/"):
            prog: str | _PathPattern = _PathPattern.compile(program)
        elif "/" in program:
            raise ValueError(
                f"program {program!r} is a relative path: write an absolute path or a bare name"
            )
        elif not _WILDCARDS.isdisjoint(program):
            raise ValueError(
                f"program {program!r} is a bare name with a wildcard: bare names are looked up"
                " on the daemon's PATH one by one, so write the name, or an absolute path"
                " pattern such as /usr/bin/*"
            )
        else:
            prog = program
        any_more = bool(rest) and rest[-1] == "*"
        if any_more:
            rest = rest[:-1]
        commands.append(_CommandPattern(prog, tuple(_Glob.compile(w) for w in rest), any_more))
    return _Pattern(text, tuple(commands), shell.operators)


# -- the call as the policy sees it ----------------------------------------------------------------


def _frozen_env(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


@attrs.frozen(kw_only=True)
class ExecPlan:
    """What the daemon runs for an allowed ``cmd.run``: exactly this, nothing re-resolved.

    ``argv`` is passed as the child's argv; ``executable`` is the file to exec (``None``: the
    usual lookup of ``argv[0]``, only when no allow list applied). For the shell form ``argv``
    is ``("/bin/sh", "-c", script)``. ``cwd`` is the resolved working directory (``None``: the
    daemon's). ``env`` holds the call's variables the policy allowed; build the child's whole
    environment with :func:`child_environment`.
    """

    argv: tuple[str, ...]
    executable: str | None = None
    cwd: str | None = None
    env: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_env)


@attrs.frozen(kw_only=True)
class Decision:
    """The answer for one tool call: allowed or not, the rule that decided, and why.

    ``rule`` is a config key, optionally with the deciding entry: ``"tools.allow: sys.info"``,
    ``"tools.cmd_run.allow: ls *"``, ``"tools.allow"`` (nothing matched), ``"cmd.run.args"``,
    ``"tools.cmd_run.allow_env"``, or the same under a restriction's prefix
    (``"relay.tools.allow"``). ``plan`` is set for an allowed ``cmd.run`` only.
    """

    allowed: bool
    rule: str
    reason: str
    plan: ExecPlan | None = None


class _Denied(Exception):
    def __init__(self, rule: str, reason: str) -> None:
        super().__init__(reason)
        self.decision = Decision(allowed=False, rule=rule, reason=reason)


class _Call:
    """One ``cmd.run`` call, split and (lazily) resolved once for every layer."""

    def __init__(self, args: Mapping[str, object], paths: HostPaths) -> None:
        self.paths = paths
        has_cmd, has_argv = "cmd" in args, "argv" in args
        if has_cmd == has_argv:
            raise ValueError(
                "cmd.run needs exactly one of 'cmd' (a shell string) or 'argv' (a list)"
            )
        self.cmd: str | None = None
        self.argv: tuple[str, ...] | None = None
        if has_cmd:
            cmd = args["cmd"]
            if not isinstance(cmd, str) or not cmd.strip():
                raise ValueError(f"'cmd' must be a non-empty string, got {_kind(cmd)}")
            self.cmd = cmd
        else:
            argv = args["argv"]
            if (
                isinstance(argv, str | bytes)
                or not isinstance(argv, list | tuple)
                or not argv
                or not all(isinstance(a, str) for a in argv)
                or not argv[0]
            ):
                raise ValueError(f"'argv' must be a non-empty list of strings, got {_kind(argv)}")
            self.argv = tuple(str(a) for a in argv)
        env = args.get("env", {})
        if not isinstance(env, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ValueError(f"'env' must be an object of strings, got {_kind(env)}")
        self.env: Mapping[str, str] = env
        cwd = args.get("cwd")
        if cwd is not None and not isinstance(cwd, str):
            raise ValueError(f"'cwd' must be a string, got {_kind(cwd)}")
        self.cwd: str | None = cwd
        self._shell: ShellCommand | str | None = None
        self._programs: dict[str, str | None] = {}
        self._cwd: str | None = None

    def commands(self, rule: str) -> ShellCommand:
        """The simple commands, or deny by ``rule`` when the shell form is not admissible."""
        if self.argv is not None:
            return ShellCommand(commands=(self.argv,), operators=())
        if self._shell is None:
            assert self.cmd is not None
            try:
                shell = split_shell(self.cmd)
                many = len(shell.commands) > 1
                for n, words in enumerate(shell.commands, 1):
                    where = f"the program of command {n}" if many else "the program"
                    if "=" in words[0]:
                        raise ValueError(
                            f"{where} contains '=': variable assignments are not allowed"
                            " (pass env instead)"
                        )
                    if not _WILDCARDS.isdisjoint(words[0]):
                        raise ValueError(f"{where} contains a wildcard")
                self._shell = shell
            except ValueError as exc:
                self._shell = str(exc)
        if isinstance(self._shell, str):
            raise _Denied(rule, f"the shell form is refused: {self._shell}")
        return self._shell

    def program(self, word: str, rule: str, where: str = "") -> str:
        """The real path of the program ``word`` names, or deny by ``rule``."""
        if word not in self._programs:
            if "/" in word and not word.startswith("/"):
                self._programs[word] = None
            else:
                self._programs[word] = self.paths.program(word)
        real = self._programs[word]
        if real is not None:
            return real
        if "/" in word and not word.startswith("/"):
            why = "is a relative path: name it by bare name or absolute path"
        elif "/" in word:
            why = "is not an executable file on this host"
        else:
            why = "is not found on the daemon's PATH"
        raise _Denied(rule, f"the program{where} {why}")

    def resolved_cwd(self, rule: str) -> str:
        assert self.cwd is not None
        if not self.cwd.startswith("/"):
            raise _Denied(rule, "cwd must be an absolute path")
        if self._cwd is None:
            self._cwd = self.paths.directory(self.cwd)
        if self._cwd is None:
            raise _Denied(rule, "cwd is not an existing directory on this host")
        return self._cwd

    def plan(self, resolved: bool) -> ExecPlan:
        cwd = self._cwd if self.cwd is not None else None
        if not resolved:
            argv = self.argv if self.argv is not None else (SHELL, "-c", self.cmd or "")
            return ExecPlan(argv=argv, cwd=cwd, env=self.env)
        shell = self.commands("")
        if self.argv is not None:
            return ExecPlan(
                argv=self.argv,
                executable=self._programs[self.argv[0]],
                cwd=cwd,
                env=self.env,
            )
        parts: list[str] = []
        for i, words in enumerate(shell.commands):
            if i:
                parts.append(shell.operators[i - 1])
            real = self._programs[words[0]]
            assert real is not None
            parts.append(shlex.join((real, *words[1:])))
        return ExecPlan(argv=(SHELL, "-c", " ".join(parts)), cwd=cwd, env=self.env)


def _kind(value: object) -> str:
    """A value's kind for an error, never its content (it may be a secret)."""
    if isinstance(value, list | tuple):
        return f"a list of {len(value)}"
    return f"a {type(value).__name__}"


# -- the layers -----------------------------------------------------------------------------------


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
            if kind == "cmd_run.allow_env" and not _ENV_PATTERN.fullmatch(entry):
                raise ConfigError(
                    f"expected a variable name such as 'APP_MODE', got {entry!r}",
                    path=path,
                    hint="names use letters, digits and '_'; globs (APP_*) are allowed",
                )

    return check


def _compiled(source: str, kind: str, entries: tuple[str, ...] | None, compile: Any) -> Any:
    out = []
    for i, entry in enumerate(entries or ()):
        try:
            out.append(compile(entry))
        except ValueError as exc:
            raise ConfigError(
                f"invalid pattern {entry!r}: {exc}",
                path=f"{source}.{kind}[{i}]",
                hint="see 'Matching rules' in docs/operator-guide.md",
            ) from None
    return tuple(out)


@attrs.frozen(kw_only=True)
class _Layer:
    """What a policy and a restriction share: the allowlists and a rule prefix."""

    source: str = attrs.field(default="tools")
    allow: tuple[str, ...] | None = attrs.field(
        default=DEFAULT_ALLOWED_TOOLS, converter=_to_names, validator=_check_entries("allow")
    )
    cmd_run_allow: tuple[str, ...] | None = attrs.field(
        default=None, converter=_to_names, validator=_check_entries("cmd_run.allow")
    )
    cmd_run_allow_env: tuple[str, ...] | None = attrs.field(
        default=None, converter=_to_names, validator=_check_entries("cmd_run.allow_env")
    )
    cmd_run_allow_cwd: tuple[str, ...] | None = attrs.field(
        default=None, converter=_to_names, validator=_check_entries("cmd_run.allow_cwd")
    )
    _patterns: tuple[_Pattern, ...] = attrs.field(init=False, repr=False, eq=False)
    _cwds: tuple[_PathPattern, ...] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        patterns = _compiled(self.source, "cmd_run.allow", self.cmd_run_allow, _compile_pattern)
        cwds = _compiled(
            self.source, "cmd_run.allow_cwd", self.cmd_run_allow_cwd, _PathPattern.compile
        )
        object.__setattr__(self, "_patterns", patterns)
        object.__setattr__(self, "_cwds", cwds)

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

    def _check_command(self, call: _Call) -> Decision:
        key = f"{self.source}.cmd_run.allow"
        if self.cmd_run_allow is None:
            return Decision(allowed=True, rule=key, reason=f"{key} is unset: any command")
        if not self._patterns:
            raise _Denied(key, f"{key} is empty: no command may run")
        shell = call.commands(key)
        many = len(shell.commands) > 1
        reals = [
            call.program(words[0], key, f" of command {n}" if many else "")
            for n, words in enumerate(shell.commands, 1)
        ]
        best_score, best_why = (-1, 0, 0), ""
        for pattern in self._patterns:
            score, why = self._match(pattern, shell, reals, call.paths)
            if why is None:
                return Decision(
                    allowed=True,
                    rule=f"{key}: {pattern.text}",
                    reason=f"program {', '.join(reals)} and its arguments match {pattern.text!r}",
                )
            if score > best_score:
                best_score, best_why = score, why
        if best_score[0] < 0:
            if many:
                best_why = (
                    f"no pattern in {key} has these {len(reals)} programs ({', '.join(reals)})"
                    " joined by these operators"
                )
            else:
                best_why = f"the program {reals[0]} matches no pattern in {key}"
        return Decision(allowed=False, rule=key, reason=best_why)

    @staticmethod
    def _match(
        pattern: _Pattern, shell: ShellCommand, reals: list[str], paths: HostPaths
    ) -> tuple[tuple[int, int, int], str | None]:
        """(how close it came, why it failed) -- ``None`` for why means it matched.

        Closeness orders the reasons a denial gives: commands passed, then arguments passed,
        then a literal program over a wildcard one."""
        if len(pattern.commands) != len(shell.commands) or pattern.operators != shell.operators:
            return (-1, 0, 0), "operators differ"
        many = len(shell.commands) > 1
        for n, (cp, words, real) in enumerate(
            zip(pattern.commands, shell.commands, reals, strict=True), 1
        ):
            if not cp.program_matches(real, paths):
                return (-1, 0, 0), "program differs"
            args = words[1:]
            bad = cp.first_bad_argument(args)
            if bad is not None:
                where = f" of command {n}" if many else ""
                if bad > len(args):
                    what = f"argument {bad}{where} is missing"
                elif bad > len(cp.args):
                    count = f"only {len(cp.args)}" if cp.args else "no"
                    what = f"it allows {count} arguments{where} (end it with ' *' for any)"
                else:
                    what = f"argument {bad}{where} does not match"
                literal = isinstance(cp.program, str) or cp.program.rest is None
                score = (n - 1, bad, int(literal))
                return score, f"program {real} matches {pattern.text!r} but {what}"
        return (len(shell.commands), 0, 0), None

    def _check_env(self, call: _Call) -> None:
        key = f"{self.source}.cmd_run.allow_env"
        if self.cmd_run_allow_env is None:
            return
        for name in sorted(call.env):
            entries = self.cmd_run_allow_env
            if name in entries:
                continue
            globbed = any(fnmatch.fnmatchcase(name, e) for e in entries)
            if globbed and not is_risky_env(name):
                continue
            reason = f"env {name} is not allowed by {key}"
            if globbed:
                reason += " (it changes what runs: only an entry naming it exactly allows it)"
            raise _Denied(key, reason)

    def _check_cwd(self, call: _Call) -> None:
        key = f"{self.source}.cmd_run.allow_cwd"
        if self.cmd_run_allow_cwd is None or call.cwd is None:
            return
        real = call.resolved_cwd(key)
        directory = call.paths.directory
        for pattern in self._cwds:
            if pattern.matches(real, whole=directory, prefix=directory):
                return
        raise _Denied(key, f"cwd {real} is not allowed by {key}")

    def _check(self, tool: str, call: _Call | None) -> Decision:
        decision = self._check_tool(tool)
        if not decision.allowed or call is None:
            return decision
        try:
            decision = self._check_command(call)
            if decision.allowed:
                self._check_env(call)
                self._check_cwd(call)
        except _Denied as denied:
            return denied.decision
        return decision


@attrs.frozen(kw_only=True)
class ToolRestriction(_Layer):
    """A narrowing layer, e.g. settings pushed by the relay: calls must pass it as well.

    ``None`` for any list means "no restriction" on it. Rules it decides are prefixed with
    ``source`` (default ``relay.tools``).
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


def _to_entries(value: Iterable[str] | None) -> tuple[str, ...]:
    names = _to_names(value)
    return () if names is None else names


@attrs.frozen(kw_only=True)
class ToolPolicy(_Layer):
    """The host owner's tool policy, plus any restrictions layered on top.

    ``allow`` lists tool names or globs (default :data:`DEFAULT_ALLOWED_TOOLS`; ``cmd.run``
    only by name). ``cmd_run_allow`` lists command patterns; ``None`` (the default) means any
    command once ``cmd.run`` is allowed, ``()`` means none. ``cmd_run_allow_env`` (variable
    names or globs) and ``cmd_run_allow_cwd`` (path patterns) default to none allowed.
    """

    allow: tuple[str, ...] = attrs.field(
        default=DEFAULT_ALLOWED_TOOLS, converter=_to_names, validator=_check_entries("allow")
    )
    cmd_run_allow_env: tuple[str, ...] = attrs.field(
        default=(), converter=_to_entries, validator=_check_entries("cmd_run.allow_env")
    )
    cmd_run_allow_cwd: tuple[str, ...] = attrs.field(
        default=(), converter=_to_entries, validator=_check_entries("cmd_run.allow_cwd")
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

    def evaluate(
        self,
        tool: str,
        args: Mapping[str, object] | None = None,
        *,
        paths: HostPaths | None = None,
    ) -> Decision:
        """Decide one call of ``tool`` with ``args``; see the module docstring for the order.

        ``cmd.run`` needs ``paths``, the host's :class:`HostPaths`; an allowed ``cmd.run``
        answers with :attr:`Decision.plan`, which is what the daemon must run.
        """
        if not isinstance(tool, str) or not tool:
            return Decision(allowed=False, rule="tool", reason=f"invalid tool name {tool!r}")
        decision = self._check_tool(tool)
        if not decision.allowed:
            return decision
        call: _Call | None = None
        if tool == CMD_RUN:
            if paths is None:
                raise TypeError("evaluating cmd.run needs paths=, the host's HostPaths resolver")
            try:
                call = _Call(args or {}, paths)
            except ValueError as exc:
                return Decision(allowed=False, rule="cmd.run.args", reason=str(exc))
            decision = self._check(tool, call)
            if not decision.allowed:
                return decision
        for restriction in self.restrictions:
            narrowed = restriction._check(tool, call)
            if not narrowed.allowed:
                return narrowed
        if call is None:
            return decision
        resolved = any(layer.cmd_run_allow is not None for layer in (self, *self.restrictions))
        return attrs.evolve(decision, plan=call.plan(resolved))
