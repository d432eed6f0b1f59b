"""Batched result acks keep "a result is forgotten only once stored": the relay is killed
after storing results and before its ack reaches the daemon.

A TCP proxy between daemon and relay (real bytes, TLS end to end through it) holds back
what the relay sends, so the relay's ResultAck is written but never arrives; the run
finishes at the relay (the results are stored), the relay is killed with ``kill -9``, and
the daemon's spool still holds every result. Restarted on its port, the relay takes the
spooled results again (late, sent together: one stored batch, one ack) and the spool
empties; each result is in the host's history once, as the daemon reported it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import pytest

from aegis_edge_agent.statedir import StateDir
from aegis_edge_core.wire import admin_pb2, common_pb2
from tests.agent.harness import DaemonProcess, RelayProcess, enroll_host, wait_until
from tests.faults.conftest import Tally

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(120)]

OK = common_pb2.TARGET_OUTCOME_OK


class HoldingProxy:
    """Forwards 127.0.0.1:port to ``upstream``; while ``hold`` is set, bytes from the relay
    are dropped on the floor (as if the relay died before they left it)."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.hold = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            self.conns += [down, up]
            threading.Thread(target=self._pipe, args=(down, up, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, down, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_relay: bool) -> None:
        try:
            while data := src.recv(65536):
                if not (from_relay and self.hold.is_set()):
                    dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def cut(self) -> None:
        for s in self.conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.conns.clear()

    def close(self) -> None:
        self.listener.close()
        self.cut()


def test_relay_killed_between_store_and_batched_ack(tmp_path: Path, tally: Tally) -> None:
    relay = RelayProcess.start(tmp_path / "relay")
    proxy = HoldingProxy(relay.endpoint)
    daemon: DaemonProcess | None = None
    try:
        host = enroll_host(relay, tmp_path / "edge", allow_tools=("cmd.run",))
        for name in ("node.json", "aegis-config.yaml"):  # the host dials the proxy
            path = host.state_dir / name
            path.write_text(path.read_text().replace(relay.endpoint, proxy.address))
        daemon = DaemonProcess.start(host.state_dir)
        assert "result-ack-batch" in daemon.wait_event("connected")["features"]

        runs: list[admin_pb2.FleetRun] = []

        def start(i: int) -> None:
            runs.append(relay.run(host.node_id, "cmd.run", {"cmd": f"sleep 1.5; echo r{i}"}))

        threads = [threading.Thread(target=start, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        daemon.wait_event("command_received", count=3)
        proxy.hold.set()  # from here on, nothing the relay says reaches the daemon
        for t in threads:
            t.join(timeout=30)
        assert len(runs) == 3 and all(r.targets[0].outcome == OK for r in runs)
        stored = {r.targets[0].command_id for r in runs}
        state = StateDir(host.state_dir)
        spooled = {r.command_id for r in state.load_spool()[0]}
        assert spooled == stored, "acks were held back: the daemon must keep every result"

        relay.proc.kill()  # stored, acked on the relay's side, the ack never delivered
        relay.proc.wait(timeout=10)
        tally.fault()
        proxy.cut()
        proxy.hold.clear()
        relay = relay.restart()
        wait_until(lambda: not state.load_spool()[0], timeout=30, what="spool emptied")
        stub, md = relay.admin()
        history = stub.GetHost(
            admin_pb2.GetHostRequest(node_id=host.node_id), metadata=md, timeout=10
        ).history
        mine = [h for h in history if h.command_id in stored]
        assert sorted(h.command_id for h in mine) == sorted(stored)
        assert all(h.outcome == OK for h in mine)
        assert {bytes(h.stdout_tail).strip() for h in mine} == {b"r0", b"r1", b"r2"}
        tally.lost(0, "results stored before the kill, acks never delivered")
    finally:
        if daemon is not None:
            daemon.stop()
        relay.stop()
        proxy.close()
