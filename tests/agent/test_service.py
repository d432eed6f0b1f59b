from __future__ import annotations

import plistlib
import shutil
import subprocess
from pathlib import Path

import pytest

from aegis_edge_agent import service

PY = "/opt/my env/bin/python3"


def test_systemd_unit_contents():
    unit = service.systemd_unit(python=PY, state_dir="/home/u/.aegis/edge")
    assert (
        'ExecStart="/opt/my env/bin/python3" -m aegis_edge_cli edge daemon '
        "--state-dir /home/u/.aegis/edge\n" in unit
    )
    assert "Restart=on-failure\n" in unit and "WantedBy=default.target" in unit
    assert "RestartPreventExitStatus=3" in unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path):
    import sys

    unit = tmp_path / "aegis-edge.service"
    unit.write_text(service.systemd_unit(python=sys.executable, state_dir=str(tmp_path)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--user", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Only complaints about *our* unit count (the sandbox may lack a user manager).
    ours = [line for line in proc.stderr.splitlines() if "aegis-edge.service" in line]
    assert not ours, proc.stderr


def test_launchd_plist_parses():
    text = service.launchd_plist(
        python=PY, state_dir="/Users/u/.aegis/edge", log_dir="/Users/u/.aegis/edge/logs"
    )
    plist = plistlib.loads(text.encode())
    assert plist["Label"] == "io.aegis.edge"
    assert plist["ProgramArguments"] == [
        PY,
        "-m",
        "aegis_edge_cli",
        "edge",
        "daemon",
        "--state-dir",
        "/Users/u/.aegis/edge",
    ]
    assert plist["StandardOutPath"] == "/Users/u/.aegis/edge/logs/aegis-edge.out.log"
    assert plist["StandardErrorPath"] == "/Users/u/.aegis/edge/logs/aegis-edge.err.log"
    assert plist["KeepAlive"] == {"SuccessfulExit": False}


def test_nssm_script():
    text = service.nssm_script(
        python=r"C:\Python311\python.exe",
        state_dir=r"C:\Users\u\.aegis\edge",
        log_dir=r"C:\Users\u\.aegis\edge\logs",
    )
    assert "nssm' install aegis-edge 'C:\\Python311\\python.exe'" in text
    assert "-m aegis_edge_cli edge daemon --state-dir C:\\Users\\u\\.aegis\\edge" in text
    assert r"AppStdout 'C:\Users\u\.aegis\edge\logs\aegis-edge.out.log'" in text
    assert r"AppStderr 'C:\Users\u\.aegis\edge\logs\aegis-edge.err.log'" in text
    assert text.endswith("\r\n")


def test_plan_install_paths():
    home = Path("/home/u")
    p = service.plan_install(platform="linux", python=PY, state_dir=home / ".aegis/edge", home=home)
    assert p.path == home / ".config/systemd/user/aegis-edge.service"
    assert ("systemctl", "--user", "enable", "--now", "aegis-edge.service") in p.commands
    m = service.plan_install(
        platform="darwin", python=PY, state_dir=home / ".aegis/edge", home=home
    )
    assert m.path == home / "Library/LaunchAgents/io.aegis.edge.plist"
    w = service.plan_install(platform="win32", python=PY, state_dir=home / ".aegis/edge", home=home)
    assert w.platform == "windows" and "nssm" in w.content
    with pytest.raises(ValueError):
        service.plan_install(platform="plan9", python=PY, state_dir=home, home=home)


def test_install_uninstall_cli(tmp_path, monkeypatch, capsys):
    from aegis_edge_agent import cli

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(service, "systemctl_user_works", lambda: False)
    import argparse

    args = argparse.Namespace(state_dir=str(tmp_path / "edge"), service_action="install")
    assert cli._service(args) == 0
    unit = tmp_path / ".config/systemd/user/aegis-edge.service"
    assert "ExecStart=" in unit.read_text()
    assert "systemctl --user enable --now aegis-edge.service" in capsys.readouterr().out
    args.service_action = "uninstall"
    assert cli._service(args) == 0
    assert not unit.exists()


# --- status | restart | logs, and NSSM uninstall, against fake service managers -------------
#
# Each fake is a real executable on PATH that records its argv and exits as a manager would;
# the CLI runs it as a subprocess, so what is asserted is the command line that ran.


def _fake_tools(tmp_path: Path, *names: str, exit_code: int = 0) -> tuple[Path, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "argv.log"
    for name in names:
        tool = bin_dir / name
        tool.write_text(
            "#!/bin/sh\n"
            f'printf "%s" "${{0##*/}}" >> "{record}"\n'
            f'for a in "$@"; do printf " %s" "$a" >> "{record}"; done\n'
            f'echo >> "{record}"\n'
            f"exit {exit_code}\n"
        )
        tool.chmod(0o755)
    return bin_dir, record


def _control(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    platform: str,
    action: str,
    path: str,
    **extra: object,
) -> int:
    import argparse

    from aegis_edge_agent import cli

    monkeypatch.setenv("PATH", path)
    monkeypatch.setattr(service, "host_platform", lambda: platform)
    args = argparse.Namespace(
        state_dir=str(tmp_path / "edge"), service_action=action, lines=None, follow=False
    )
    vars(args).update(extra)
    return cli._service_control(args)


@pytest.mark.parametrize(
    ("platform", "action", "extra", "expected"),
    [
        ("linux", "status", {}, "systemctl --user status aegis-edge.service"),
        ("linux", "restart", {}, "systemctl --user restart aegis-edge.service"),
        ("linux", "logs", {}, "journalctl --user -u aegis-edge.service"),
        (
            "linux",
            "logs",
            {"lines": 50, "follow": True},
            "journalctl --user -u aegis-edge.service -n 50 -f",
        ),
        ("darwin", "status", {}, "launchctl print gui/{uid}/io.aegis.edge"),
        ("darwin", "restart", {}, "launchctl kickstart -k gui/{uid}/io.aegis.edge"),
        (
            "darwin",
            "logs",
            {},
            "tail -n 100 {state}/logs/aegis-edge.out.log {state}/logs/aegis-edge.err.log",
        ),
        ("win32", "status", {}, "nssm status aegis-edge"),
        ("win32", "restart", {}, "nssm restart aegis-edge"),
    ],
)
def test_service_control_runs_the_managers_command(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    platform: str,
    action: str,
    extra: dict[str, object],
    expected: str,
) -> None:
    import os

    bin_dir, record = _fake_tools(tmp_path, "systemctl", "journalctl", "launchctl", "tail", "nssm")
    code = _control(monkeypatch, tmp_path, platform, action, str(bin_dir), **extra)
    assert code == 0
    want = expected.format(uid=os.getuid(), state=tmp_path / "edge")
    assert record.read_text().splitlines() == [want]


def test_service_status_passes_the_managers_exit_code_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `systemctl status` exits 3 for a stopped unit; scripts may rely on it.
    bin_dir, record = _fake_tools(tmp_path, "systemctl", exit_code=3)
    assert _control(monkeypatch, tmp_path, "linux", "status", str(bin_dir)) == 3
    assert record.read_text() == "systemctl --user status aegis-edge.service\n"


def test_service_control_without_the_manager_prints_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aegis_edge_cli import CliError, render_error

    empty = tmp_path / "empty-bin"
    empty.mkdir()
    with pytest.raises(CliError) as info:
        _control(monkeypatch, tmp_path, "linux", "restart", str(empty))
    assert render_error(info.value) == (
        "aegis: systemctl is not on PATH, so `service restart` cannot run it here; "
        "the command is: systemctl --user restart aegis-edge.service"
    )


def test_nssm_uninstall_removes_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from aegis_edge_agent import cli

    bin_dir, record = _fake_tools(tmp_path, "nssm")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(service, "host_platform", lambda: "win32")
    state = tmp_path / "edge"
    state.mkdir()
    (state / "install-service.ps1").write_text("# written by install\r\n")
    args = argparse.Namespace(state_dir=str(state), service_action="uninstall")
    assert cli._service(args) == 0
    assert record.read_text().splitlines() == [
        "nssm stop aegis-edge",
        "nssm remove aegis-edge confirm",
    ]
    assert not (state / "install-service.ps1").exists()
    assert "removed the NSSM service aegis-edge" in capsys.readouterr().out


def test_nssm_uninstall_without_nssm_says_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from aegis_edge_agent import cli

    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(service, "host_platform", lambda: "win32")
    args = argparse.Namespace(state_dir=str(tmp_path / "edge"), service_action="uninstall")
    assert cli._service(args) == 0
    out = capsys.readouterr().out
    assert "nssm stop aegis-edge\n" in out and "nssm remove aegis-edge confirm\n" in out
