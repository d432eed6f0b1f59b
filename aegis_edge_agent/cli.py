"""Host-side commands: ``aegis edge enroll|daemon|status|logout|keys rotate|service``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import signal
import time
from pathlib import Path
from typing import Any

from aegis_edge_cli import CliError, CommandTree, add_output_flag, print_json, print_table
from aegis_edge_core import hoststate as hs
from aegis_edge_core.identity.errors import default_hint

__all__ = ["register"]


def _state_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        default=None,
        help=f"state directory (default {hs.DEFAULT_STATE_DIR})",
    )


def register(tree: CommandTree) -> None:
    p = tree.command("edge enroll", _enroll, help="enroll this host with an enrollment token")
    p.add_argument("token", help="the enrollment token (aegis edge tokens issue --tenant T)")
    _state_flag(p)
    p.add_argument(
        "--allow-tool",
        action="append",
        default=[],
        metavar="NAME",
        help="allow a tool beyond the defaults (repeatable); cmd.run is off unless listed",
    )
    p.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="K=V",
        help="a label for fleet selectors (repeatable)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing enrollment")
    p.add_argument(
        "--ca-cert",
        type=Path,
        default=None,
        help="the relay CA (PEM) if the relay does not present it; must match the pin",
    )

    p = tree.command("edge daemon", _daemon, help="run the edge daemon in the foreground")
    _state_flag(p)

    p = tree.command(
        "edge wait",
        _wait,
        help="wait until this host's daemon is connected to the relay (for `daemon &`)",
    )
    _state_flag(p)
    p.add_argument(
        "--timeout", default="30s", metavar="DURATION", help="give up after this long (30s)"
    )

    p = tree.command("edge status", _status, help="local view of this host's enrollment")
    _state_flag(p)
    add_output_flag(p)

    p = tree.command(
        "edge logout", _logout, help="stop the daemon and delete node.token and node.key"
    )
    _state_flag(p)

    p = tree.command(
        "edge keys rotate",
        _rotate,
        help="rotate this host's node key (the relay must be reachable)",
    )
    _state_flag(p)

    for action in ("install", "uninstall"):
        p = tree.command(
            f"edge service {action}",
            _service,
            help=f"{action} the daemon as a user service (systemd, launchd or NSSM)",
        )
        _state_flag(p)
        p.set_defaults(service_action=action)
    for action, help_ in (
        ("status", "is the daemon's service running? (systemctl --user status, launchctl, nssm)"),
        ("restart", "restart the daemon's service (after an update or a config change)"),
        ("logs", "the daemon's service logs (journalctl --user, or the log files)"),
    ):
        p = tree.command(f"edge service {action}", _service_control, help=help_)
        _state_flag(p)
        p.set_defaults(service_action=action)
        if action == "logs":
            p.add_argument("--lines", "-n", type=int, metavar="N", help="only the last N lines")
            p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")


def _state(args: argparse.Namespace) -> Any:
    from aegis_edge_agent.statedir import StateDir

    return StateDir(args.state_dir)


def _enroll(args: argparse.Namespace) -> int:
    from aegis_edge_agent.enroll import enroll, parse_labels

    state = _state(args)
    node = enroll(
        args.token,
        state,
        allow_tools=args.allow_tool,
        labels=parse_labels(args.label),
        force=args.force,
        ca_cert=args.ca_cert,
    )
    print(f"enrolled node {node.node_id} (tenant {node.tenant_id}) with relay {node.relay}")
    print(f"state directory: {state.path}")
    print("next: aegis edge daemon   (or: aegis edge service install)")
    return 0


def _daemon(args: argparse.Namespace) -> int:
    from aegis_edge_agent.daemon import run_daemon

    return run_daemon(_state(args))


def _iso(ts: float | None) -> str | None:
    if not ts:
        return None
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).isoformat(timespec="seconds")


def local_status(state: Any) -> dict[str, Any]:
    from aegis_edge_agent.daemon import pid_alive

    if not state.node_json_path.exists():
        raise CliError(
            f"this host is not enrolled (no {hs.NODE_JSON} in {state.path}); "
            "run: aegis edge enroll <token>"
        )
    node = state.load_node()
    out: dict[str, Any] = {
        "node_id": node.node_id,
        "tenant_id": node.tenant_id,
        "relay": node.relay,
        "state_dir": str(state.path),
        "key_thumbprint": node.key_thumbprint,
        "credentials": "present",
        "token_expires_at": None,
    }
    try:
        out["key_thumbprint"] = state.load_key().thumbprint
    except FileNotFoundError:
        pass
    except Exception as err:  # report, don't fail: status must work on a broken host
        out["credentials"] = f"node.key unreadable: {err}"
    if not state.key_path.exists() or not state.token_path.exists():
        out["credentials"] = "logged out (node.key/node.token deleted)"
    claims = state.token_claims()
    if claims is not None:
        out["token_expires_at"] = _iso(claims.expires_at)
    status = None
    try:
        status = state.load_status()
    except hs.HostStateError as err:
        out["status_error"] = str(err)
    running = bool(status and pid_alive(status.pid))
    out["daemon_running"] = running
    out["pid"] = status.pid if status else None
    if status is None:
        out["connection_state"] = "never started"
    elif running:
        out["connection_state"] = status.state.value
    else:
        out["connection_state"] = f"not running (last: {status.state.value})"
    out["last_heartbeat_acked_at"] = _iso(status.last_heartbeat_acked_at) if status else None
    out["connected_since"] = _iso(status.connected_since) if status else None
    out["last_error"] = (status.last_error or None) if status else None
    out["pending_results"] = status.pending_results if status else 0
    out["status_updated_at"] = _iso(status.updated_at) if status else None
    return out


def _status(args: argparse.Namespace) -> int:
    info = local_status(_state(args))
    if args.output == "json":
        print_json(info)
    else:
        rows = [(k, "" if v is None else v) for k, v in info.items()]
        print_table(["field", "value"], rows)
    return 0


def _wait(args: argparse.Namespace) -> int:
    from aegis_edge_agent.daemon import pid_alive
    from aegis_edge_core.fleet.errors import FleetSpecError
    from aegis_edge_core.fleet.spec import parse_duration

    try:
        timeout = parse_duration(args.timeout, field="timeout")
    except FleetSpecError as err:
        raise CliError(f"--timeout: {err}") from None
    state = _state(args)
    if not state.node_json_path.exists():
        raise CliError(
            f"this host is not enrolled (no {hs.NODE_JSON} in {state.path})",
            hint="run: aegis edge enroll <token>",
        )
    deadline = time.monotonic() + timeout
    # A daemon started just before us may not have written status.json yet: that is only
    # a failure once the timeout has passed.
    problem = "no daemon has recorded its state yet (is `aegis edge daemon` running?)"
    while time.monotonic() < deadline:
        try:
            status = state.load_status()
        except hs.HostStateError:
            status = None
        if status is not None and pid_alive(status.pid):
            if status.state is hs.ConnectionState.CONNECTED:
                node = state.load_node()
                print(f"connected to {node.relay} as {node.node_id}")
                return 0
            problem = f"the daemon is {status.state.value}" + (
                f" ({status.last_error})" if status.last_error else ""
            )
        elif status is not None and status.updated_at > 0:
            last = f"; last error: {status.last_error}" if status.last_error else ""
            if status.state is hs.ConnectionState.REVOKED:
                raise CliError("the relay revoked this node", hint=default_hint("revoked"))
            problem = f"the daemon (pid {status.pid}) is not running{last}"
        time.sleep(0.1)
    raise CliError(
        f"not connected after {timeout:g}s: {problem}",
        hint="`aegis edge status` shows the daemon's last error",
    )


def _is_daemon_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # cannot tell (not Linux): trust status.json
    return b"daemon" in cmdline


def stop_running_daemon(state: Any, *, timeout: float = 15.0) -> int | None:
    """SIGTERM the daemon recorded in status.json, if it runs; returns its pid."""
    from aegis_edge_agent.daemon import pid_alive

    try:
        status = state.load_status()
    except hs.HostStateError:
        return None
    if status is None or status.pid == os.getpid() or not pid_alive(status.pid):
        return None
    if not _is_daemon_process(status.pid):
        return None
    os.kill(status.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(status.pid):
        time.sleep(0.05)
    pid: int = status.pid
    return pid


def _logout(args: argparse.Namespace) -> int:
    state = _state(args)
    if not state.path.exists():
        raise CliError(f"nothing to log out: {state.path} does not exist")
    node_id = ""
    with contextlib.suppress(Exception):  # best effort, for the message only
        node_id = state.load_node().node_id
    pid = stop_running_daemon(state)
    if pid is not None:
        print(f"stopped the running daemon (pid {pid})")
    removed = state.remove_credentials()
    state.file(hs.NODE_KEY_NEXT).unlink(missing_ok=True)
    if removed:
        print(f"deleted {', '.join(removed)} from {state.path}")
    else:
        print(f"no credentials in {state.path}; already logged out")
    who = f" {node_id}" if node_id else ""
    print(
        f"the relay keeps node{who}'s record (Disconnected, unless already revoked); "
        f"to revoke it: aegis edge keys revoke-remote{who or ' <node-id>'}"
    )
    return 0


def _rotate(args: argparse.Namespace) -> int:
    from aegis_edge_agent.daemon import control_rotate

    state = _state(args)
    thumbprint: str = asyncio.run(control_rotate(state))
    print(f"rotated the node key; new key thumbprint {thumbprint}")
    print("a running daemon is dropped by the relay and reconnects with the new key")
    return 0


def _service_control(args: argparse.Namespace) -> int:
    """Run the service manager's command for the action, or print it if it is not here."""
    import shlex
    import shutil
    import subprocess

    from aegis_edge_agent import service

    try:
        cmd = service.control_command(
            platform=service.host_platform(),
            action=args.service_action,
            state_dir=_state(args).path,
            uid=os.getuid() if hasattr(os, "getuid") else 0,
            lines=getattr(args, "lines", None),
            follow=getattr(args, "follow", False),
        )
    except ValueError as err:
        raise CliError(str(err)) from None
    if shutil.which(cmd[0]) is None:
        raise CliError(
            f"{cmd[0]} is not on PATH, so `service {args.service_action}` cannot run it here",
            hint=f"the command is: {shlex.join(cmd)}",
        )
    # The manager's own output and exit status are the answer (status exits 3 when stopped).
    return subprocess.call(list(cmd))


def _service(args: argparse.Namespace) -> int:
    from aegis_edge_agent import service

    state = _state(args)
    plan = service.plan_install(
        platform=service.host_platform(),
        python=service.current_python(),
        state_dir=state.path,
        home=Path.home(),
    )
    if args.service_action == "install":
        if plan.platform == "darwin":
            (state.path / hs.LOGS_DIR).mkdir(parents=True, exist_ok=True)
        plan.path.parent.mkdir(parents=True, exist_ok=True)
        from aegis_edge_agent.statedir import atomic_write

        atomic_write(plan.path, plan.content, mode=0o644)
        print(f"wrote {plan.path}")
        can_run = plan.platform != "linux" or service.systemctl_user_works()
        if can_run and plan.platform != "windows":
            errors = service.run_commands(plan.commands)
            if errors:
                raise CliError("; ".join(errors))
            print(f"service enabled and started; logs: {plan.log_hint}")
        else:
            import shlex

            print("activate it with:")
            for cmd in plan.commands:
                print("  " + shlex.join(cmd))
            print(f"logs: {plan.log_hint}")
        return 0
    # uninstall
    if plan.platform == "linux" and service.systemctl_user_works() and plan.path.exists():
        service.run_commands(plan.uninstall_commands[:1])
    elif plan.platform == "darwin" and plan.path.exists():
        service.run_commands(plan.uninstall_commands)
    elif plan.platform == "windows":
        import shlex
        import shutil

        if shutil.which("nssm") is None:
            print("nssm is not on PATH; remove the service with:")
            for cmd in plan.uninstall_commands:
                print("  " + shlex.join(cmd))
        else:
            stop, remove = plan.uninstall_commands
            service.run_commands([stop])  # fails harmlessly when it is already stopped
            errors = service.run_commands([remove])
            if errors:
                raise CliError("; ".join(errors))
            print(f"removed the NSSM service {service.SERVICE_NAME}")
    if plan.path.exists():
        plan.path.unlink()
        print(f"removed {plan.path}")
    else:
        print(f"no service unit at {plan.path}")
    if plan.platform == "linux" and service.systemctl_user_works():
        service.run_commands(plan.uninstall_commands[1:])
    return 0
