"""The policy over a real file tree: the agent's resolver (DaemonPaths), symlinks and ``..``.

The property test generates program patterns and the paths a caller might name (``..``,
``.``, ``//``, symlinks in and out of the pattern's directory) and checks the one promise
that matters: a program whose real path is outside the pattern's directory never matches.
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from aegis_edge_agent.tools import DaemonPaths
from aegis_edge_core.policy import ToolPolicy


def _exe(path: Path, body: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/{allowed/{a, b, sub/c, link_in -> a, link_out -> ../outside/x, dirlink ->
    ../outside, plain (not executable)}, outside/{x, a}, alias -> allowed, bin/ls}"""
    root = Path(os.path.realpath(tmp_path_factory.mktemp("tree")))
    allowed, outside = root / "allowed", root / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    for p in (allowed / "a", allowed / "b", allowed / "sub" / "c", outside / "x", outside / "a"):
        _exe(p)
    (allowed / "plain").write_text("not a program\n")
    (allowed / "link_in").symlink_to("a")
    (allowed / "link_out").symlink_to("../outside/x")
    (allowed / "dirlink").symlink_to("../outside")
    (root / "alias").symlink_to("allowed")
    (root / "bin").mkdir()
    _exe(root / "bin" / "ls")
    return root


def test_daemon_paths_resolves_on_the_daemons_path(tree: Path) -> None:
    paths = DaemonPaths(f"relative/dir:{tree / 'bin'}:{tree / 'allowed'}")
    assert paths.search_path == f"{tree / 'bin'}:{tree / 'allowed'}"  # relative entries dropped
    assert paths.program("ls") == str(tree / "bin" / "ls")
    assert paths.program("link_out") == str(tree / "outside" / "x")  # symlinks resolved
    assert paths.program(str(tree / "alias" / "sub" / ".." / "a")) == str(tree / "allowed" / "a")
    assert paths.program("plain") is None  # not executable
    assert paths.program(str(tree / "allowed" / "sub")) is None  # a directory
    assert paths.program("nope") is None
    assert paths.program("allowed/a") is None  # relative paths are never resolved
    assert paths.directory(str(tree / "allowed" / "dirlink")) == str(tree / "outside")
    assert paths.directory(str(tree / "allowed" / "a")) is None
    assert paths.directory("allowed") is None
    assert DaemonPaths().search_path  # the daemon's own PATH by default


def test_path_is_the_daemons_not_the_callers(tree: Path) -> None:
    paths = DaemonPaths(str(tree / "bin"))
    policy = ToolPolicy(
        allow=["cmd.run"], cmd_run_allow=["ls *"], cmd_run_allow_env=["PATH"]
    )  # even with PATH allowed by name, the program is looked up on the daemon's PATH
    d = policy.evaluate(
        "cmd.run", {"argv": ["ls"], "env": {"PATH": str(tree / "outside")}}, paths=paths
    )
    assert d.allowed and d.plan is not None
    assert d.plan.executable == str(tree / "bin" / "ls")


SEGMENTS = ["allowed", "outside", "alias", "..", ".", "", "a", "b", "sub", "c", "x",
            "link_in", "link_out", "dirlink", "plain"]  # fmt: skip
# Mostly short walks that often land on a program; the long ones bring .., . and //.
SHORT_WALKS = st.tuples(
    st.lists(st.sampled_from(["..", ".", "", "sub", "alias", "allowed"]), max_size=2),
    st.sampled_from(["a", "b", "x", "link_in", "link_out", "sub/c"]),
).map(lambda t: [*t[0], t[1]])
GLOBS = ["*", "*", "*", "?", "[ab]", "a", "*/*", "s*/c", "x", "link_*", "[!a]", "*/c"]


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    base=st.sampled_from(["allowed", "alias", "outside", "allowed/sub"]),
    glob=st.sampled_from(GLOBS),
    tail=st.one_of(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6), *[SHORT_WALKS] * 3),
    start=st.sampled_from(["", "allowed", "alias", "outside", "allowed/sub", *["base"] * 5]),
    shell=st.booleans(),
)
def test_a_program_outside_the_patterns_directory_never_matches(
    tree: Path, base: str, glob: str, tail: list[str], start: str, shell: bool
) -> None:
    start = base if start == "base" else start
    paths = DaemonPaths(str(tree / "bin"))
    pattern = f"{tree}/{base}/{glob}"
    policy = ToolPolicy(allow=["cmd.run"], cmd_run_allow=[pattern])
    word = "/".join([str(tree / start) if start else str(tree), *tail])
    args = {"cmd": shlex.quote(word)} if shell else {"argv": [word]}
    d = policy.evaluate("cmd.run", args, paths=paths)
    event("allowed" if d.allowed else "denied")
    real = os.path.realpath(word)
    directory = os.path.realpath(tree / base)
    if d.allowed:
        assert real.startswith(directory + "/"), (pattern, word, real)
        # and it is exactly as many segments below as the glob has
        assert real[len(directory) + 1 :].count("/") == glob.count("/")
        assert d.plan is not None
        assert (d.plan.executable or shlex.split(d.plan.argv[2])[0]) == real
    elif (
        glob == "*"
        and os.path.dirname(real) == directory
        and os.path.isfile(real)
        and os.access(real, os.X_OK)
    ):
        raise AssertionError(f"{word} is {real}, a program directly in {directory}: must match")


@pytest.mark.parametrize(
    ("word", "allowed"),
    [
        ("allowed/a", True),
        ("alias/a", True),  # the same file through a symlinked directory
        ("allowed/sub/../b", True),
        ("allowed/./a", True),
        ("allowed//a", True),  # normalised like the kernel does
        ("allowed/link_in", True),  # a symlink to a program inside
        ("allowed/link_out", False),  # a symlink to a program outside
        ("allowed/dirlink/x", False),
        ("allowed/../outside/x", False),
        ("allowed/../outside/a", False),  # same name, other directory
        ("allowed/sub/c", False),  # * does not cross /
        ("allowed/plain", False),  # not executable
    ],
)
def test_known_paths(tree: Path, word: str, allowed: bool) -> None:
    policy = ToolPolicy(allow=["cmd.run"], cmd_run_allow=[f"{tree}/allowed/* *"])
    for args in ({"argv": [f"{tree}/{word}", "-x"]}, {"cmd": f"{tree}/{word} -x"}):
        assert policy.evaluate("cmd.run", args, paths=DaemonPaths("/usr/bin")).allowed is allowed
