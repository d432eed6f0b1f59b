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
