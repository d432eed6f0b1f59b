"""The README's two commands: the main job runs, and CI runs the test command verbatim."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def _by_hand_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## By hand", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```sh\n(.+?)\n```", section, re.S)
    return block


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_by_hand_block_runs_verbatim_in_a_fresh_shell(tmp_path: Path) -> None:
    block = _by_hand_block()
    ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", block)]
    if not all(_port_free(p) for p in set(ports)):
        pytest.skip(f"the README's ports {sorted(set(ports))} are taken on this machine")
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    # A fresh shell: nothing of ours in the environment but PATH to the installed `aegis`.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AEGIS_", "GRPC_"))}
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    proc = subprocess.Popen(
        ["bash", "-c", block],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the block's `&` jobs share this group: we stop them all
    )
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
    logs = "".join(
        f"\n--- {name}\n{(work / name).read_text(errors='replace')[-3000:]}"
        for name in ("relay.log", "daemon.log")
        if (work / name).exists()
    )
    assert proc.returncode == 0, out + err + logs
    assert "aegis:" not in err, err  # no command of the block failed on the way
    assert (home / ".aegis" / "edge" / "node.json").exists()  # the fresh HOME was used
    ls_lines = [line for line in out.splitlines() if line.strip().startswith("n-")]
    assert ls_lines and "Connected" in ls_lines[0], out
    assert "Disconnected" not in out and "never" not in ls_lines[0], out
    run_id = re.search(r"fleet run (f-\S+): completed: 1 ok$", out, re.M)
    assert run_id, out
    assert "uname -a" not in err
    assert re.search(r"Linux", out), out  # the host's `uname -a` came back in the table


def _pids_mentioning(text: str) -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            pids.add(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_sigterm_to_a_kept_running_demo_leaves_no_process_behind() -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "aegis_edge_cli", "relay", "demo", "--keep-running"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            if line.startswith("export AEGIS_RELAY="):
                break
        else:
            raise AssertionError(
                "the demo ended before it printed the export line:\n" + "".join(lines)
            )
        root = re.search(r"demo in (\S+) ", lines[0]).group(1)  # type: ignore[union-attr]
        export = lines[-1].strip()

        # The line pastes into a shell as it is, and is all an operator command needs.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AEGIS_")}
        ls = subprocess.run(
            ["bash", "-c", f"{export}\n{shlex.quote(sys.executable)} -m aegis_edge_cli edge ls"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert ls.returncode == 0, ls.stderr
        for name in ("web-1", "web-2", "web-3", "web-4", "db-1"):
            assert name in ls.stdout  # the HOSTNAME column tells the demo's hosts apart

        children = _pids_mentioning(root) - {demo.pid}
        assert len(children) >= 5, children  # the relay and the daemons still running
        demo.send_signal(signal.SIGTERM)
        rest, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 143, "".join(lines) + rest
    assert "SIGTERM: stopping the daemons and the relay." in rest
    left = [pid for pid in children if _alive(pid)]
    assert not left, f"processes left behind: {left}"
    shutil.rmtree(root, ignore_errors=True)  # --keep-running keeps the directory
