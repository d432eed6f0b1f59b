"""Corrupt or truncated host state files and malformed CLI input: the daemon and the CLI
name the file (or the argument) and the fix on one line and exit non-zero -- never a
traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.agent.harness import CLI, RelayProcess, enroll_host
from tests.faults.conftest import Tally

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    r = RelayProcess.start(tmp_path_factory.mktemp("relay"))
    yield r
    r.stop()


@pytest.fixture(scope="module")
def enrolled_dir(relay: RelayProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("hosts") / "base"
    enroll_host(relay, base, tenant="files", allow_tools=["cmd.run"])
    return base


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xffnot what you think\n" * 3)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _text(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text)


CORRUPTIONS: list[tuple[str, str, Callable[[Path], None]]] = [
    ("node.key", "truncated", _truncate),
    ("node.key", "garbage", _garbage),
    ("node.key", "empty", _empty),
    ("node.token", "truncated", _truncate),
    ("node.token", "garbage", _garbage),
    ("node.token", "empty", _empty),
    ("node.json", "truncated", _truncate),
    ("node.json", "garbage", _garbage),
    ("aegis-config.yaml", "unclosed flow", _text("tools: [cmd.run\n")),
    ("aegis-config.yaml", "tab indentation", _text("tools:\n\tallow: x\n")),
    ("aegis-config.yaml", "wrong type", _text("tools: 5\n")),
    ("aegis-config.yaml", "not a mapping", _text("- a\n- b\n")),
    ("aegis-config.yaml", "garbage", _garbage),
]


def _run(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return None


def _one_clear_line(proc: subprocess.CompletedProcess[str], name: str) -> list[str]:
    problems = []
    if proc.returncode == 0:
        problems.append("exit 0")
    if "Traceback" in proc.stderr or "Traceback" in proc.stdout:
        problems.append("traceback")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if not any(name in line for line in lines):
        problems.append(f"{name!r} not named")
    return problems


@pytest.mark.parametrize(
    ("name", "how", "corrupt"), CORRUPTIONS, ids=[f"{n}-{h}" for n, h, _ in CORRUPTIONS]
)
def test_corrupt_state_file(
    enrolled_dir: Path,
    tmp_path: Path,
    tally: Tally,
    name: str,
    how: str,
    corrupt: Callable[[Path], None],
) -> None:
    state = tmp_path / "edge"
    shutil.copytree(enrolled_dir, state)
    os.chmod(state, 0o700)
    corrupt(state / name)
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    problems: dict[str, list[str]] = {}
    for command in (("edge", "daemon"), ("edge", "status")):
        proc = _run(*command, "--state-dir", str(state))
        if proc is None:
            problems[" ".join(command)] = ["kept running on a corrupt file"]
            continue
        if command[1] == "status" and proc.returncode == 0:
            # the local view may still show what it can read; never a traceback
            if "Traceback" in proc.stderr + proc.stdout:
                problems["edge status"] = ["traceback", proc.stderr[-300:]]
            continue
        found = _one_clear_line(proc, name)
        tally.refused(proc.returncode != 0, f"{' '.join(command)} with {how} {name}")
        if found:
            problems[" ".join(command)] = [*found, proc.stderr[-300:]]
    assert not problems, problems
    # nothing was rewritten or half-written by the refusal
    after = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file() and p.name in before}
    assert after[name] == before[name]


BAD_CLI = [
    ("fleet", "preview", "--target", "tags=AnyOf(a,b", "--tool", "cmd.run"),
    ("fleet", "preview", "--target", "os=linux oops", "--tool", "cmd.run"),
    ("fleet", "preview", "--target", "tags=SomeOf(a)", "--tool", "cmd.run"),
    ("fleet", "preview", "--target", "", "--tool", "cmd.run"),
    ("fleet", "run", "--target", "all", "--tool", "cmd.run", "--mode", "rolling=abc"),
    ("fleet", "run", "--target", "all", "--tool", "cmd.run", "--mode", "rolling=0"),
    ("fleet", "run", "--target", "all", "--tool", "cmd.run", "--on-error", "stop-after=x"),
    ("fleet", "run", "--target", "all", "--tool", "cmd.run", "--deadline", "12parsecs"),
    ("fleet", "run", "--target", "all", "--tool", "cmd.run", "--arg", "novalue"),
    ("ls", "--output", "yaml"),
]


@pytest.mark.parametrize("args", BAD_CLI, ids=[" ".join(a[:4]) for a in BAD_CLI])
def test_malformed_cli_input(relay: RelayProcess, tally: Tally, args: tuple[str, ...]) -> None:
    env = dict(
        os.environ,
        AEGIS_RELAY=relay.endpoint,
        AEGIS_CA_CERT=str(relay.info["ca_cert"]),
        AEGIS_OPERATOR_TOKEN=relay.operator_token,
    )
    proc = subprocess.run(
        [*CLI, "edge", *args], capture_output=True, text=True, timeout=30, env=env, check=False
    )
    tally.refused(proc.returncode != 0, f"aegis edge {' '.join(args)}")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert 1 <= len(lines) <= 4, proc.stderr  # argparse adds a usage line; selectors a caret
