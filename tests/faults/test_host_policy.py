"""An operator who may dispatch ``cmd.run`` tries to walk around the host owner's policy.

A real relay and a real daemon process. The owner allowed ``cmd.run`` only for the programs
in one tools directory (a temp dir standing in for ``/opt/tools``), ``uptime``, any
non-risky environment variable (``allow_env: ["*"]``) and one working directory. Each
attack of issue 13 is dispatched through the relay and must end ``denied`` with its marker
file never created; the refusal stored in the relay's history (and the daemon's log) must
not repeat the command text. Controls show the daemon does run what is allowed, and that
each payload really works when the policy is not in the way.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from aegis_edge_core.wire import admin_pb2, common_pb2
from tests.agent.harness import DaemonProcess, EnrolledHost, RelayProcess, enroll_host
from tests.faults.conftest import Tally

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(240)]

OK = common_pb2.TARGET_OUTCOME_OK
DENIED = common_pb2.TARGET_OUTCOME_DENIED
DAEMON_ONLY = "AEGIS_TEST_DAEMON_ONLY"


def _exe(path: Path, body: str) -> Path:
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@attrs.frozen
class Host:
    relay: RelayProcess
    node: EnrolledHost
    daemon: DaemonProcess
    root: Path
    tools: Path
    work: Path
    secret: Path

    def run(self, args: dict[str, Any]) -> admin_pb2.FleetRun:
        return self.relay.run(self.node.node_id, "cmd.run", args)

    def history(self, command_id: str) -> admin_pb2.CommandRecord:
        stub, md = self.relay.admin()
        host = stub.GetHost(
            admin_pb2.GetHostRequest(node_id=self.node.node_id, history_limit=1000),
            metadata=md,
            timeout=10,
        )
        (record,) = [r for r in host.history if r.command_id == command_id]
        return record


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    root = Path(os.path.realpath(tmp_path_factory.mktemp("policy")))
    tools, work, secret, evilbin = (root / d for d in ("tools", "work", "secret", "evilbin"))
    for d in (tools, work, secret, evilbin):
        d.mkdir()
    _exe(tools / "script.sh", "#!/bin/bash\nenv\n")
    _exe(tools / "touch_here.sh", "#!/bin/sh\ntouch ./HERE\n")
    (tools / "evil").symlink_to(shutil.which("touch") or "/usr/bin/touch")
    (work / "link").symlink_to(secret)
    _exe(evilbin / "uptime", f"#!/bin/sh\ntouch {root / 'planted-uptime-ran'}\n")
    relay = RelayProcess.start(root / "relay")
    try:
        node = enroll_host(relay, root / "edge", tenant="policy", allow_tools=["cmd.run"])
        cfg = node.state_dir / "aegis-config.yaml"
        policy = (
            "tools:\n"
            "  cmd_run:\n"
            f"    allow: {json.dumps([f'{tools}/*', f'{tools}/* *', 'uptime'])}\n"
            '    allow_env: ["*"]\n'
            f"    allow_cwd: {json.dumps([str(work)])}\n"
        )
        cfg.write_text(cfg.read_text().replace("tools:\n", policy, 1))
        daemon = DaemonProcess.start(node.state_dir, env={DAEMON_ONLY: "daemon-secret"})
        try:
            daemon.wait_event("connected")
            yield Host(relay, node, daemon, root, tools, work, secret)
        finally:
            daemon.stop()
    finally:
        relay.stop()


def _up(tools: Path) -> str:
    """``tools/../../..`` back to ``/``."""
    return f"{tools}/" + "../" * (len(tools.parts) - 1)


def _denied_without_trace(
    host: Host, tally: Tally, what: str, args: dict[str, Any], marker: Path
) -> admin_pb2.TargetResult:
    """Dispatch an attack; it must be denied, create nothing and leave its text nowhere."""
    assert not marker.exists()
    (target,) = host.run(args).targets
    record = host.history(target.command_id)
    text = args["cmd"] if "cmd" in args else shlex.join(args["argv"])
    secrets = [text, str(marker), *args.get("env", {}).values()]
    stored = [target.error_message, record.error_message]
    logged = [
        line for line in host.daemon.output.lines + host.relay.output.lines if str(marker) in line
    ]
    ok = (
        target.outcome == DENIED
        and record.outcome == DENIED
        and not marker.exists()
        and not any(s in m for s in secrets for m in stored)
        and not logged
    )
    tally.refused(ok, f"cmd.run policy bypass: {what}")
    assert target.outcome == DENIED, (what, target)
    assert record.outcome == DENIED
    assert not marker.exists(), f"{what}: the marker was created"
    for m in stored:
        assert "denied by host policy" in m
        for s in secrets:
            assert s not in m, f"{what}: the refusal repeats {s!r}: {m}"
    assert not logged, logged
    return target


def test_controls_allowed_calls_run_with_a_minimal_environment(host: Host) -> None:
    (t,) = host.run({"argv": [str(host.tools / "script.sh")], "env": {"APP_MODE": "on"}}).targets
    assert t.outcome == OK, t.error_message
    env = dict(line.split("=", 1) for line in t.stdout_tail.decode().splitlines() if "=" in line)
    assert env["APP_MODE"] == "on"
    assert DAEMON_ONLY not in env  # the daemon's own environment is not inherited
    assert "AEGIS_EDGE_COMMAND_ID" in env  # the daemon's child marker is
    assert set(env) <= {
        "PATH",
        "HOME",
        "LANG",
        "APP_MODE",
        "AEGIS_EDGE_COMMAND_ID",
        "PWD",
        "SHLVL",
        "_",
        "OLDPWD",
    }  # fmt: skip  (bash adds the last four)
    assert host.run({"argv": ["uptime"]}).targets[0].outcome == OK
    assert host.run({"cmd": "uptime"}).targets[0].outcome == OK
    (t,) = host.run({"argv": [str(host.tools / "touch_here.sh")], "cwd": str(host.work)}).targets
    assert t.outcome == OK and (host.work / "HERE").exists()


def test_path_traversal_through_a_wildcard(host: Host, tally: Tally) -> None:
    marker = host.root / "traversal-argv"
    argv = [f"{_up(host.tools)}bin/sh", "-c", f"touch {marker}"]
    t = _denied_without_trace(host, tally, "argv ../../bin/sh", {"argv": argv}, marker)
    assert "matches no pattern" in t.error_message  # refused on the program itself
    marker = host.root / "traversal-cmd"
    cmd = f"{_up(host.tools)}usr/bin/touch {marker}"
    t = _denied_without_trace(host, tally, "cmd ../../usr/bin/touch", {"cmd": cmd}, marker)
    assert "matches no pattern" in t.error_message


def test_symlink_in_the_allowed_directory_pointing_out(host: Host, tally: Tally) -> None:
    evil = host.tools / "evil"
    marker = host.root / "symlink-argv"
    _denied_without_trace(
        host, tally, "symlink out (argv)", {"argv": [str(evil), str(marker)]}, marker
    )
    marker = host.root / "symlink-cmd"
    _denied_without_trace(host, tally, "symlink out (cmd)", {"cmd": f"{evil} {marker}"}, marker)


def test_bash_env_through_an_allowed_bash_script(host: Host, tally: Tally) -> None:
    marker = host.root / "bash-env"
    script = str(host.tools / "script.sh")
    payload = {"BASH_ENV": f"$(touch {marker})"}
    # The payload works when nothing stands in its way ...
    subprocess.run([script], env=payload, capture_output=True, check=True, timeout=30)
    assert marker.exists()
    marker.unlink()
    # ... and a glob in allow_env does not admit it.
    t = _denied_without_trace(host, tally, "BASH_ENV", {"argv": [script], "env": payload}, marker)
    assert "env BASH_ENV is not allowed" in t.error_message


def test_path_pointing_at_a_planted_program(host: Host, tally: Tally) -> None:
    marker = host.root / "planted-uptime-ran"
    env = {"PATH": str(host.root / "evilbin")}
    for what, args in (("argv", {"argv": ["uptime"]}), ("cmd", {"cmd": "uptime"})):
        t = _denied_without_trace(host, tally, f"PATH ({what})", {**args, "env": env}, marker)
        assert "env PATH is not allowed" in t.error_message


def test_ld_preload(host: Host, tally: Tally) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the preload library")
    marker = host.root / "ld-preload"
    src = host.root / "evil.c"
    src.write_text(
        "#include <fcntl.h>\n#include <unistd.h>\n"
        "__attribute__((constructor)) static void planted(void) {\n"
        f'  int fd = open("{marker}", O_CREAT | O_WRONLY, 0600); if (fd >= 0) close(fd);\n'
        "}\n"
    )
    lib = host.root / "evil.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, timeout=60)
    subprocess.run(
        ["uptime"], env={"LD_PRELOAD": str(lib)}, capture_output=True, check=True, timeout=30
    )
    assert marker.exists()  # the library runs code when it is preloaded
    marker.unlink()
    args = {"argv": ["uptime"], "env": {"LD_PRELOAD": str(lib)}}
    t = _denied_without_trace(host, tally, "LD_PRELOAD", args, marker)
    assert "env LD_PRELOAD is not allowed" in t.error_message


def test_cwd_outside_the_allowed_one(host: Host, tally: Tally) -> None:
    marker = host.secret / "HERE"
    script = str(host.tools / "touch_here.sh")
    for what, cwd in (
        ("cwd elsewhere", host.secret),
        ("cwd ../ out of the allowed one", f"{host.work}/../{host.secret.name}"),
        ("cwd through a symlink", host.work / "link"),
    ):
        args = {"argv": [script], "cwd": str(cwd)}
        t = _denied_without_trace(host, tally, what, args, marker)
        assert "tools.cmd_run.allow_cwd" in t.error_message
