"""The README's two commands: the main job runs, and CI runs the test command verbatim."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section, re.S)


def test_readme_gives_exactly_two_commands_and_ci_runs_the_second() -> None:
    main_job, tests = _commands()
    assert main_job.endswith("aegis relay demo")
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_main_job_runs_end_to_end() -> None:
    # The first command is `pip install . && aegis relay demo`; the suite already runs in
    # an environment with the project installed, so this runs the second half.
    done = subprocess.run(
        [sys.executable, "-m", "aegis_edge_cli", "relay", "demo"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "skipped: halted" in out
    assert "Revoked" in out
    assert 'aegis_edge_fleet_runs_total{outcome="halted"} 1.0' in out
    assert "/metrics" in out
    assert "eyJ" not in out + done.stderr, "a token was printed"
    workdir = Path(re.search(r"demo in (\S+) ", out).group(1))  # type: ignore[union-attr]
    assert not workdir.exists(), "the demo left its directory (and maybe processes) behind"
