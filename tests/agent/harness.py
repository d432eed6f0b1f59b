"""Real relay and daemon processes on loopback, for integration tests (reusable).

    relay = RelayProcess.start(tmp_path / "relay", heartbeat_interval="1s")
    node = enroll_host(relay, tmp_path / "edge", tenant="acme", allow_tools=["cmd.run"])
    daemon = DaemonProcess.start(node.state_dir)
    daemon.wait_event("connected")
    run = relay.run(node.node_id, "cmd.run", {"cmd": "echo hi"})  # a finished FleetRun
    relay.stop(); daemon.stop()

Everything polls with bounded timeouts; nothing sleeps a fixed time.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import grpc

from aegis_edge_core.wire import admin_pb2, admin_pb2_grpc
from tests.relay.daemon_driver import STARTUP_TIMEOUT

PY = sys.executable
CLI = [PY, "-m", "aegis_edge_cli"]


def wait_until(
    pred: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class _Lines:
    """Collects a process's output lines in a background thread."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        self._t = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._t.start()

    def _pump(self, stream: Any) -> None:
        for raw in iter(stream.readline, ""):
            self.lines.append(raw.rstrip("\n"))
        stream.close()

    def events(self) -> Iterator[dict[str, Any]]:
        for line in list(self.lines):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                yield obj


def _stop(proc: subprocess.Popen[str], timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


@attrs.define
class RelayProcess:
    data_dir: Path
    proc: subprocess.Popen[str]
    info: dict[str, Any]
    output: _Lines
    extra: tuple[str, ...] = ()

    @classmethod
    def start(
        cls,
        data_dir: Path,
        *,
        listen: str = "127.0.0.1:0",
        heartbeat_interval: str = "1s",
        stale_threshold: str = "3s",
        extra: Sequence[str] = (),
        timeout: float = STARTUP_TIMEOUT,
    ) -> RelayProcess:
        data_dir.mkdir(parents=True, exist_ok=True)
        relay_json = data_dir / "relay.json"
        relay_json.unlink(missing_ok=True)
        proc = subprocess.Popen(
            [
                *CLI,
                "relay",
                "serve",
                "--data-dir",
                str(data_dir),
                "--listen",
                listen,
                "--metrics-listen",
                "127.0.0.1:0",
                "--heartbeat-interval",
                heartbeat_interval,
                "--stale-threshold",
                stale_threshold,
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        out = _Lines(proc.stdout)

        def ready() -> dict[str, Any] | None:
            if proc.poll() is not None:
                raise RuntimeError("relay exited:\n" + "\n".join(out.lines))
            try:
                info: dict[str, Any] = json.loads(relay_json.read_text())
            except (OSError, ValueError):
                return None
            return info if info.get("pid") == proc.pid else None

        info = wait_until(ready, timeout, what="relay.json")
        return cls(data_dir=data_dir, proc=proc, info=info, output=out, extra=tuple(extra))

    @property
    def endpoint(self) -> str:
        return str(self.info["relay_endpoint"])

    @property
    def ca_pem(self) -> bytes:
        return Path(self.info["ca_cert"]).read_bytes()

    @property
    def operator_token(self) -> str:
        return Path(self.info["operator_token"]).read_text().strip()

    def restart(self, **kwargs: Any) -> RelayProcess:
        """Stop and start again on the same address (daemons dial what they enrolled with)."""
        self.stop()
        return RelayProcess.start(self.data_dir, listen=self.endpoint, extra=self.extra, **kwargs)

    def stop(self) -> int:
        return _stop(self.proc)

    # -- admin API

    def admin(self) -> tuple[admin_pb2_grpc.AdminStub, list[tuple[str, str]]]:
        channel = grpc.secure_channel(
            self.endpoint, grpc.ssl_channel_credentials(root_certificates=self.ca_pem)
        )
        return admin_pb2_grpc.AdminStub(channel), [
            ("authorization", f"Bearer {self.operator_token}")
        ]

    def enrollment_token(self, tenant: str) -> str:
        stub, md = self.admin()
        resp = stub.IssueEnrollmentToken(
            admin_pb2.IssueEnrollmentTokenRequest(tenant_id=tenant), metadata=md, timeout=10
        )
        return str(resp.token)

    def host(self, node_id: str) -> admin_pb2.Host:
        stub, md = self.admin()
        return stub.GetHost(admin_pb2.GetHostRequest(node_id=node_id), metadata=md, timeout=10)

    def start_run(
        self,
        node_id: str,
        tool: str,
        args: dict[str, Any] | None = None,
        *,
        deadline_secs: float = 0.0,
    ) -> Iterator[admin_pb2.FleetRunEvent]:
        stub, md = self.admin()
        spec = admin_pb2.FleetRunSpec(
            selector=f"node={node_id}",
            tool=tool,
            args_json=json.dumps(args or {}),
            mode="all",
            on_error="continue",
            deadline_secs=deadline_secs,
        )
        return stub.StartFleetRun(spec, metadata=md, timeout=120)  # type: ignore[no-any-return]

    def run(
        self,
        node_id: str,
        tool: str,
        args: dict[str, Any] | None = None,
        *,
        deadline_secs: float = 0.0,
    ) -> admin_pb2.FleetRun:
        """Start a fleet run on one node and return the finished run."""
        for event in self.start_run(node_id, tool, args, deadline_secs=deadline_secs):
            if event.WhichOneof("body") == "finished":
                return event.finished
        raise AssertionError("fleet run stream ended without a finished event")

    def cancel_run(self, fleet_command_id: str) -> admin_pb2.FleetRun:
        stub, md = self.admin()
        return stub.CancelFleetRun(
            admin_pb2.GetFleetRunRequest(fleet_command_id=fleet_command_id),
            metadata=md,
            timeout=10,
        )

    def revoke(self, node_id: str) -> None:
        stub, md = self.admin()
        stub.RevokeNode(
            admin_pb2.RevokeNodeRequest(node_id=node_id, reason="test"), metadata=md, timeout=10
        )


@attrs.define
class EnrolledHost:
    state_dir: Path
    node_id: str
    tenant_id: str


def cli(*args: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"aegis {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def enroll_host(
    relay: RelayProcess,
    state_dir: Path,
    *,
    tenant: str = "acme",
    allow_tools: Sequence[str] = (),
    labels: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> EnrolledHost:
    token = relay.enrollment_token(tenant)
    args = ["edge", "enroll", token, "--state-dir", str(state_dir), *extra]
    for t in allow_tools:
        args += ["--allow-tool", t]
    for label in labels:
        args += ["--label", label]
    proc = cli(*args, check=False)
    if proc.returncode != 0 and "did not present the pinned CA" in proc.stderr:
        # The relay serves only its leaf certificate: hand the CA over out of band (the pin
        # in the token is still checked against it).
        proc = cli(*args, "--ca-cert", str(relay.info["ca_cert"]), check=False)
    if proc.returncode != 0:
        raise AssertionError(f"enroll failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    node = json.loads((state_dir / "node.json").read_text())
    return EnrolledHost(state_dir=state_dir, node_id=node["node_id"], tenant_id=node["tenant_id"])


@attrs.define
class DaemonProcess:
    state_dir: Path
    proc: subprocess.Popen[str]
    output: _Lines

    @classmethod
    def start(
        cls, state_dir: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> DaemonProcess:
        proc = subprocess.Popen(
            [*CLI, "edge", "daemon", "--state-dir", str(state_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        return cls(state_dir=state_dir, proc=proc, output=_Lines(proc.stderr))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.output.events() if name is None or e.get("event") == name]

    def wait_event(
        self,
        name: str,
        *,
        count: int = 1,
        timeout: float = 20.0,
        pred: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            hits = [e for e in self.events(name) if pred is None or pred(e)]
            if len(hits) >= count:
                return hits[count - 1]
            if self.proc.poll() is not None and len(hits) < count:
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) before {name}:\n"
                    + "\n".join(self.output.lines[-30:])
                )
            return None

        try:
            return wait_until(found, timeout, what=f"daemon event {name!r}")  # type: ignore[no-any-return]
        except TimeoutError:
            raise TimeoutError(
                f"no {name!r} event; daemon log:\n" + "\n".join(self.output.lines[-30:])
            ) from None

    def status(self) -> dict[str, Any]:
        return json.loads((self.state_dir / "status.json").read_text())  # type: ignore[no-any-return]

    def stop(self) -> int:
        return _stop(self.proc)

    def wait_exit(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout=timeout)


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True
