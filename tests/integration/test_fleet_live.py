"""Live output, stored arguments, secret arguments and rerun: real relay, real daemons, the
real CLI, on loopback.

Nothing here waits a fixed time: the commands block on a gate file the test creates, so
"a line arrived while the command was still running" is a fact, not a race.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from aegis_edge_core.wire import admin_pb2, common_pb2
from tests.agent.harness import CLI, DaemonProcess, RelayProcess, cli, enroll_host, wait_until
from tests.pg import dump

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SECRET = "hunter2-d0c5-7e11-s3cr3t"


@pytest.fixture(scope="module")
def relay(
    tmp_path_factory: pytest.TempPathFactory,
    relay_store_url: str,  # one relay per store
) -> Iterator[RelayProcess]:
    r = RelayProcess.start(tmp_path_factory.mktemp("relay"))
    yield r
    r.stop()


@pytest.fixture
def daemons() -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(state_dir: Path, cwd: Path | None = None) -> DaemonProcess:
        d = DaemonProcess.start(state_dir, cwd=cwd)
        started.append(d)
        d.wait_event("connected")
        return d

    yield start
    for d in started:
        d.stop()


def conn(relay: RelayProcess) -> list[str]:
    return ["--relay-data-dir", str(relay.data_dir)]


class Proc:
    """A CLI process whose stdout lines can be awaited one by one."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def expect(self, pred: Callable[[str], bool], what: str, timeout: float = 30.0) -> str:
        seen = [line for line in self.lines if pred(line)]
        if seen:
            return seen[0]
        while True:
            try:
                line = self._q.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line {what}; got {self.lines}") from None
            if line is None:
                raise AssertionError(f"stdout ended before {what}; got {self.lines}")
            self.lines.append(line)
            if pred(line):
                return line

    def finish(self, timeout: float = 60.0) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        while (line := self._q.get(timeout=5)) is not None:
            self.lines.append(line)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()


def _run(relay: RelayProcess, run_id: str) -> admin_pb2.FleetRun:
    stub, md = relay.admin()
    return stub.GetFleetRun(  # type: ignore[no-any-return]
        admin_pb2.GetFleetRunRequest(fleet_command_id=run_id), metadata=md, timeout=10
    )


def _newest_run(relay: RelayProcess) -> str:
    stub, md = relay.admin()
    runs = stub.ListFleetRuns(admin_pb2.ListFleetRunsRequest(limit=1), metadata=md, timeout=10)
    return str(runs.runs[0].fleet_command_id) if runs.runs else ""


def test_follow_and_watch_print_host_prefixed_lines_live(
    relay: RelayProcess, daemons: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    web = enroll_host(relay, tmp_path / "web", allow_tools=["cmd.run"], labels=["hostname=web-1"])
    plain = enroll_host(relay, tmp_path / "plain", allow_tools=["cmd.run"])
    daemons(web.state_dir)
    daemons(plain.state_dir)
    gate = tmp_path / "gate"
    cmd = (
        f"echo first line; while [ ! -e {gate} ]; do echo tick; sleep 0.2; done; "
        "echo second line; echo on-stderr >&2"
    )
    before = _newest_run(relay)
    run = Proc(
        "edge", "fleet", "run", "--target", f"node={web.node_id},{plain.node_id}",
        "--tool", "cmd.run", "--arg", f"cmd={cmd}", "--follow", *conn(relay),
    )  # fmt: skip
    # Both hosts' first lines arrive while their commands are blocked on the gate.
    run.expect(lambda line: line == "web-1: first line", "from web-1")
    run.expect(lambda line: line == f"{plain.node_id}: first line", "from the unlabelled host")
    run_id = wait_until(lambda: (_newest_run(relay) or None) != before and _newest_run(relay))
    assert _run(relay, run_id).outcome == common_pb2.RUN_OUTCOME_RUNNING
    assert not gate.exists()
    # A running run cannot be rerun: its outcomes are not final.
    stub, md = relay.admin()
    with pytest.raises(grpc.RpcError) as err:
        for _ in stub.RerunFleetRun(
            admin_pb2.RerunFleetRunRequest(fleet_command_id=run_id), metadata=md, timeout=10
        ):
            pass
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert "still running" in err.value.details()  # type: ignore[attr-defined]

    # A second operator attaches to the running run and sees its output from then on.
    watch = Proc("edge", "fleet", "watch", run_id, "--follow", *conn(relay))
    watch.expect(lambda line: line == "web-1: tick", "tick in the watcher")
    gate.touch()

    for proc in (run, watch):
        proc.expect(lambda line: line == "web-1: second line", "after the gate")
        code, err = proc.finish()
        assert code == 0, err
        assert "web-1: on-stderr" in err  # the command's stderr goes to ours
        assert proc.lines[-1] == f"fleet run {run_id}: completed: 2 ok"
    # Lines of one host stay in order; nothing but whole lines is printed with a prefix.
    web_lines = [ln for ln in run.lines if ln.startswith("web-1: ")]
    assert web_lines[0] == "web-1: first line" and web_lines[-1] == "web-1: second line"
    assert set(web_lines[1:-1]) == {"web-1: tick"}

    # --no-follow prints the table and the verdict only.
    quiet = cli(
        "edge", "fleet", "run", "--target", f"node={web.node_id}", "--tool", "cmd.run",
        "--arg", "cmd=echo hidden-live-line", "--no-follow", *conn(relay),
    )  # fmt: skip
    assert "web-1: hidden-live-line" not in quiet.stdout

    # watch on a finished run: its final summary, at once.
    done = cli("edge", "fleet", "watch", run_id, "--follow", *conn(relay))
    assert done.stdout.splitlines()[-1] == f"fleet run {run_id}: completed: 2 ok"
    assert "web-1: " not in done.stdout


def test_a_flood_is_bounded_and_every_dropped_byte_is_counted(
    relay: RelayProcess, daemons: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    host = enroll_host(relay, tmp_path / "loud", allow_tools=["cmd.run"])
    daemons(host.state_dir)
    total = 600_000  # under the daemon's 1 MiB stream cap: the relay gets all of it
    stub, md = relay.admin()
    spec = admin_pb2.FleetRunSpec(
        selector=f"node={host.node_id}",
        tool="cmd.run",
        args_json=json.dumps({"cmd": f"yes | head -c {total}"}),
        follow_output=True,
    )
    received = dropped = pieces = 0
    order: list[str] = []
    for event in stub.StartFleetRun(spec, metadata=md, timeout=120):
        kind = event.WhichOneof("body")
        order.append(kind)
        if kind == "output":
            assert event.output.node_id == host.node_id and event.output.host == host.node_id
            received += len(event.output.stdout) + len(event.output.stderr)
            dropped += event.output.dropped_bytes
            pieces += 1
        if kind == "finished":
            assert event.finished.targets[0].outcome == common_pb2.TARGET_OUTCOME_OK
            break
    assert received + dropped == total  # nothing vanished without a count
    assert dropped > total // 2 and received < total // 4
    assert order.index("target_finished") > max(i for i, k in enumerate(order) if k == "output")
    # An operator who does not follow gets no output events at all.
    spec.follow_output = False
    kinds = {e.WhichOneof("body") for e in stub.StartFleetRun(spec, metadata=md, timeout=120)}
    assert "output" not in kinds

    # The CLI shows the gap as a marker line and prints a bounded number of lines.
    flood = cli(
        "edge", "fleet", "run", "--target", f"node={host.node_id}", "--tool", "cmd.run",
        "--arg", f"cmd=yes | head -c {total}", "--follow", *conn(relay), timeout=60,
    )  # fmt: skip
    markers = [ln for ln in flood.stdout.splitlines() if "bytes of output dropped]" in ln]
    assert markers and markers[0].startswith(f"{host.node_id}: [")
    counted = sum(int(m.split("[", 1)[1].split()[0]) for m in markers)
    prefix = f"{host.node_id}: "
    printed = [ln[len(prefix) :] for ln in flood.stdout.splitlines() if ln.startswith(prefix)]
    printed = [ln for ln in printed if not ln.endswith("bytes of output dropped]")]
    assert set(printed) == {"y"}
    # Each printed line is its bytes plus a newline; a partial line cut by a gap (or by the
    # end) is printed whole and has none: at most one per marker, plus one.
    assert total <= sum(len(ln) + 1 for ln in printed) + counted <= total + len(markers) + 1
    assert len(printed) < total // 8


def _files_hold(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_secret_args_and_rerun_of_the_failed_subset(
    relay: RelayProcess, daemons: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    hosts = []
    procs = []
    for name in ("r1", "r2", "r3"):
        h = enroll_host(relay, tmp_path / name, allow_tools=["cmd.run"])
        cwd = tmp_path / f"{name}-cwd"
        cwd.mkdir()
        procs.append(daemons(h.state_dir, cwd=cwd))
        hosts.append((h, cwd))
    ids = sorted(h.node_id for h, _ in hosts)
    failing = {h.node_id for h, cwd in hosts[1:]}
    for _, cwd in hosts[1:]:
        (cwd / "fail-here").touch()
    # The secret is the whole command line (say, one carrying a credential).
    secret_cmd = f"test ! -e fail-here # {SECRET}"
    first = cli(
        "edge", "fleet", "run", "--target", "node=" + ",".join(ids), "--tool", "cmd.run",
        "--secret-arg", f"cmd={secret_cmd}", "--arg-json", "timeout=30",
        "--mode", "rolling=2", "--deadline", "60s", "-o", "json", *conn(relay), check=False,
    )  # fmt: skip
    assert first.returncode != 0  # completed_with_errors
    old = json.loads(first.stdout)
    old_id = old["fleet_command_id"]
    assert old["outcome"] == "completed_with_errors"
    assert {t["node_id"] for t in old["targets"] if t["outcome"] != "ok"} == failing
    assert old["spec"]["args"] == {"cmd": "<secret>", "timeout": 30}
    assert old["spec"]["secret_args"] == ["cmd"]

    shown = cli("edge", "fleet", "show", old_id, *conn(relay)).stdout
    assert 'Arguments:  {"cmd": "<secret>", "timeout": 30}' in shown

    # A rerun without the secret is refused, naming it, and starts nothing.
    refused = cli("edge", "fleet", "rerun", old_id, "--only", "failed", *conn(relay), check=False)
    assert refused.returncode != 0
    assert "missing: cmd" in refused.stderr and "--secret-arg cmd=..." in refused.stderr
    assert _newest_run(relay) == old_id

    for _, cwd in hosts[1:]:
        (cwd / "fail-here").unlink()
    again = cli(
        "edge", "fleet", "rerun", old_id, "--only", "failed", "--secret-arg",
        f"cmd={secret_cmd}", "-o", "json", *conn(relay),
    )  # fmt: skip
    new = json.loads(again.stdout)
    assert new["outcome"] == "completed" and new["rerun_of"] == old_id
    assert {t["node_id"] for t in new["targets"]} == failing  # exactly the failed subset
    assert all(t["outcome"] == "ok" for t in new["targets"])
    for key in ("tool", "mode", "on_error", "deadline_secs", "args", "secret_args"):
        assert new["spec"][key] == old["spec"][key], key
    assert new["spec"]["selector"] == "node=" + ",".join(sorted(failing))

    new_shown = cli("edge", "fleet", "show", new["fleet_command_id"], *conn(relay)).stdout
    assert f"Rerun of:   {old_id}" in new_shown
    listing = cli("edge", "fleet", "runs", "-o", "json", *conn(relay)).stdout
    assert json.loads(listing)[0]["rerun_of"] == old_id

    # Nothing to rerun is refused, not started.
    none_left = cli(
        "edge", "fleet", "rerun", new["fleet_command_id"], "--only", "failed",
        "--secret-arg", f"cmd={secret_cmd}", *conn(relay), check=False,
    )  # fmt: skip
    assert none_left.returncode != 0 and "nothing to rerun" in none_left.stderr
    # A finished run watched: its summary, and the exit status of its outcome.
    watched = cli("edge", "fleet", "watch", old_id, *conn(relay), check=False)
    assert watched.returncode != 0
    assert watched.stdout.splitlines()[-1].startswith(f"fleet run {old_id}: completed_with_errors")

    # The secret reached the daemons (the command ran) and nothing else.
    outputs: list[Any] = [first, shown, refused, again, new_shown, listing, none_left, watched]
    for out in outputs:
        text = out if isinstance(out, str) else out.stdout + out.stderr
        assert SECRET not in text
    assert _files_hold(relay.data_dir, SECRET.encode()) == []  # relay.db, its WAL, logs
    if os.environ.get("AEGIS_STORE_URL"):
        assert SECRET.encode() not in dump(os.environ["AEGIS_STORE_URL"])  # nor PostgreSQL
    assert not any(SECRET in line for line in relay.output.lines)
    for proc in procs:
        assert not any(SECRET in line for line in proc.output.lines)
    assert not any(_files_hold(h.state_dir, SECRET.encode()) for h, _ in hosts)
