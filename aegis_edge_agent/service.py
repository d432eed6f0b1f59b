"""``aegis edge service install|uninstall|status|restart|logs``: the daemon under the OS
service manager.

Linux: a systemd *user* unit (logs in the journal: ``journalctl --user -u aegis-edge``).
macOS: a launchd agent ``io.aegis.edge`` (logs in ``~/.aegis/edge/logs``).
Windows: an NSSM service ``aegis-edge`` (logs in ``%USERPROFILE%\\.aegis\\edge\\logs``).

The unit contents and the service manager's command for each action are pure functions of
their inputs, so they are tested on every OS. ``status``, ``restart`` and ``logs`` run that
command when its program is on PATH and otherwise print it, so a host owner on a machine
where the CLI cannot drive the manager (no user systemd in a container, say) still learns
what to type.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path, PureWindowsPath
from xml.sax.saxutils import escape

import attrs

__all__ = [
    "CONTROL_ACTIONS",
    "LAUNCHD_LABEL",
    "SERVICE_NAME",
    "InstallPlan",
    "control_command",
    "host_platform",
    "launchd_plist",
    "nssm_script",
    "plan_install",
    "systemd_unit",
]

SERVICE_NAME = "aegis-edge"
LAUNCHD_LABEL = "io.aegis.edge"


def daemon_argv(python: str, state_dir: str) -> list[str]:
    return [python, "-m", "aegis_edge_cli", "edge", "daemon", "--state-dir", state_dir]


def _systemd_quote(arg: str) -> str:
    if arg and all(c.isalnum() or c in "/._-+=:,@" for c in arg):
        return arg
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def systemd_unit(*, python: str, state_dir: str) -> str:
    """The systemd user unit (``~/.config/systemd/user/aegis-edge.service``)."""
    exec_start = " ".join(_systemd_quote(a) for a in daemon_argv(python, state_dir))
    return (
        "[Unit]\n"
        "Description=aegis-edge daemon (outbound stream to the aegis relay)\n"
        "Documentation=https://github.com/aegis-edge/aegis-edge\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStart={exec_start}\n"
        "Restart=on-failure\n"
        "RestartSec=5\n"
        "# Exit status 3: this node was revoked. Restarting cannot help; re-enroll.\n"
        "RestartPreventExitStatus=3\n"
        "KillMode=mixed\n"
        "TimeoutStopSec=20\n"
        "Environment=PYTHONUNBUFFERED=1\n"
        "UMask=0077\n"
        "\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


def launchd_plist(*, python: str, state_dir: str, log_dir: str) -> str:
    """The launchd agent (``~/Library/LaunchAgents/io.aegis.edge.plist``)."""
    args = "\n".join(f"    <string>{escape(a)}</string>" for a in daemon_argv(python, state_dir))
    out_log = escape(f"{log_dir}/aegis-edge.out.log")
    err_log = escape(f"{log_dir}/aegis-edge.err.log")
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" '
        '"http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n'
        '<plist version="1.0">\n'
        "<dict>\n"
        "  <key>Label</key>\n"
        f"  <string>{LAUNCHD_LABEL}</string>\n"
        "  <key>ProgramArguments</key>\n"
        "  <array>\n"
        f"{args}\n"
        "  </array>\n"
        "  <key>RunAtLoad</key>\n"
        "  <true/>\n"
        "  <key>KeepAlive</key>\n"
        "  <dict>\n"
        "    <key>SuccessfulExit</key>\n"
        "    <false/>\n"
        "  </dict>\n"
        "  <key>ThrottleInterval</key>\n"
        "  <integer>5</integer>\n"
        "  <key>StandardOutPath</key>\n"
        f"  <string>{out_log}</string>\n"
        "  <key>StandardErrorPath</key>\n"
        f"  <string>{err_log}</string>\n"
        "  <key>EnvironmentVariables</key>\n"
        "  <dict>\n"
        "    <key>PYTHONUNBUFFERED</key>\n"
        "    <string>1</string>\n"
        "  </dict>\n"
        "</dict>\n"
        "</plist>\n"
    )


def _ps_quote(arg: str) -> str:
    return "'" + arg.replace("'", "''") + "'"


def nssm_script(*, python: str, state_dir: str, log_dir: str, nssm: str = "nssm") -> str:
    """A PowerShell script that registers the NSSM service ``aegis-edge``."""
    app_args = subprocess.list2cmdline(daemon_argv(python, state_dir)[1:])
    out_log = str(PureWindowsPath(log_dir) / "aegis-edge.out.log")
    err_log = str(PureWindowsPath(log_dir) / "aegis-edge.err.log")
    n = _ps_quote(nssm)
    lines = [
        "# aegis-edge: register the daemon as a Windows service with NSSM.",
        "$ErrorActionPreference = 'Stop'",
        f"New-Item -ItemType Directory -Force -Path {_ps_quote(log_dir)} | Out-Null",
        f"& {n} install {SERVICE_NAME} {_ps_quote(python)} {_ps_quote(app_args)}",
        f"& {n} set {SERVICE_NAME} DisplayName 'aegis-edge daemon'",
        f"& {n} set {SERVICE_NAME} AppStdout {_ps_quote(out_log)}",
        f"& {n} set {SERVICE_NAME} AppStderr {_ps_quote(err_log)}",
        f"& {n} set {SERVICE_NAME} AppRotateFiles 1",
        f"& {n} set {SERVICE_NAME} AppRotateBytes 10485760",
        f"& {n} set {SERVICE_NAME} AppExit Default Restart",
        f"& {n} set {SERVICE_NAME} AppExit 3 Exit",
        f"& {n} set {SERVICE_NAME} Start SERVICE_AUTO_START",
        f"& {n} start {SERVICE_NAME}",
    ]
    return "\r\n".join(lines) + "\r\n"


def nssm_uninstall_script(nssm: str = "nssm") -> str:
    n = _ps_quote(nssm)
    return f"& {n} stop {SERVICE_NAME}\r\n& {n} remove {SERVICE_NAME} confirm\r\n"


@attrs.frozen(kw_only=True)
class InstallPlan:
    platform: str
    path: Path
    content: str
    commands: tuple[tuple[str, ...], ...]
    uninstall_commands: tuple[tuple[str, ...], ...]
    log_hint: str


def plan_install(*, platform: str, python: str, state_dir: Path, home: Path) -> InstallPlan:
    """Where the unit goes, what it says, and which commands activate it."""
    if platform.startswith("linux"):
        path = home / ".config" / "systemd" / "user" / f"{SERVICE_NAME}.service"
        unit = f"{SERVICE_NAME}.service"
        return InstallPlan(
            platform="linux",
            path=path,
            content=systemd_unit(python=python, state_dir=str(state_dir)),
            commands=(
                ("systemctl", "--user", "daemon-reload"),
                ("systemctl", "--user", "enable", "--now", unit),
            ),
            uninstall_commands=(
                ("systemctl", "--user", "disable", "--now", unit),
                ("systemctl", "--user", "daemon-reload"),
            ),
            log_hint=f"journalctl --user -u {unit}",
        )
    if platform == "darwin":
        path = home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
        mac_logs = state_dir / "logs"
        return InstallPlan(
            platform="darwin",
            path=path,
            content=launchd_plist(python=python, state_dir=str(state_dir), log_dir=str(mac_logs)),
            commands=(("launchctl", "load", "-w", str(path)),),
            uninstall_commands=(("launchctl", "unload", "-w", str(path)),),
            log_hint=f"{mac_logs}/aegis-edge.{{out,err}}.log",
        )
    if platform in ("win32", "cygwin", "windows"):
        log_dir = str(PureWindowsPath(str(state_dir)) / "logs")
        path = state_dir / "install-service.ps1"
        return InstallPlan(
            platform="windows",
            path=path,
            content=nssm_script(python=python, state_dir=str(state_dir), log_dir=log_dir),
            commands=(("powershell", "-ExecutionPolicy", "Bypass", "-File", str(path)),),
            uninstall_commands=(
                ("nssm", "stop", SERVICE_NAME),
                ("nssm", "remove", SERVICE_NAME, "confirm"),
            ),
            log_hint=f"{log_dir}\\aegis-edge.{{out,err}}.log",
        )
    raise ValueError(f"no service manager support for platform {platform!r}")


CONTROL_ACTIONS = ("status", "restart", "logs")


def control_command(
    *,
    platform: str,
    action: str,
    state_dir: Path,
    uid: int,
    lines: int | None = None,
    follow: bool = False,
) -> tuple[str, ...]:
    """The service manager's command for ``status``, ``restart`` or ``logs``.

    ``lines`` and ``follow`` shape ``logs`` (the last N lines; keep following); without
    them it is the platform's plain command (``journalctl --user -u aegis-edge.service``).
    """
    if action not in CONTROL_ACTIONS:
        raise ValueError(f"unknown service action {action!r}; one of {', '.join(CONTROL_ACTIONS)}")
    if platform.startswith("linux"):
        unit = f"{SERVICE_NAME}.service"
        if action != "logs":
            return ("systemctl", "--user", action, unit)
        extra = (*(("-n", str(lines)) if lines else ()), *(("-f",) if follow else ()))
        return ("journalctl", "--user", "-u", unit, *extra)
    if platform == "darwin":
        target = f"gui/{uid}/{LAUNCHD_LABEL}"
        if action == "status":
            return ("launchctl", "print", target)
        if action == "restart":
            return ("launchctl", "kickstart", "-k", target)
        logs = state_dir / "logs"
        return (
            "tail",
            "-n",
            str(lines or 100),
            *(("-F",) if follow else ()),
            str(logs / "aegis-edge.out.log"),
            str(logs / "aegis-edge.err.log"),
        )
    if platform in ("win32", "cygwin", "windows"):
        if action != "logs":
            return ("nssm", action, SERVICE_NAME)
        win_logs = PureWindowsPath(str(state_dir)) / "logs"
        files = ",".join(_ps_quote(str(win_logs / f"aegis-edge.{k}.log")) for k in ("out", "err"))
        wait = " -Wait" if follow else ""
        return (
            "powershell",
            "-NoProfile",
            "-Command",
            f"Get-Content -Tail {lines or 100}{wait} {files}",
        )
    raise ValueError(f"no service manager support for platform {platform!r}")


def host_platform() -> str:
    """``sys.platform``, behind a function the tests can replace."""
    return sys.platform


def systemctl_user_works() -> bool:
    if shutil.which("systemctl") is None:
        return False
    try:
        proc = subprocess.run(
            ["systemctl", "--user", "show-environment"],
            capture_output=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def run_commands(commands: Sequence[Sequence[str]]) -> list[str]:
    """Run each command; returns error lines (empty on success)."""
    errors = []
    for cmd in commands:
        try:
            proc = subprocess.run(
                list(cmd), capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            errors.append(f"{shlex.join(cmd)}: {err}")
            continue
        if proc.returncode != 0:
            errors.append(f"{shlex.join(cmd)}: {proc.stderr.strip() or proc.returncode}")
    return errors


def current_python() -> str:
    return sys.executable
