"""``aegis relay demo``: the main job, end to end, on this machine.

It plays an operator and five host owners, each step a real ``aegis`` command in its own
process, printed before it runs so it can be replayed by hand:

1. a relay on its embedded SQLite default, in a temporary directory, TLS on loopback;
2. five daemons enrolled with tenant-bound tokens, ``cmd.run`` allowed, tagged;
3. the hosts table, as ``aegis edge ls`` shows it;
4. the seed's rolling update (``--mode rolling=2 --on-error stop-after=1 --deadline``),
   where one host fails and halts the run, the rest skipped ``halted``;
5. a key revoked (``aegis edge keys revoke-remote``), the stream cut, the host Revoked;
6. where ``/metrics`` is, and what it says now;

and the console's URL with a one-time login link (a random code the relay keeps for ten
minutes and one use, never a token: see :mod:`aegis_edge_relay.http.console`).

Ctrl-C, SIGTERM or SIGHUP at any point stops the daemons and the relay (SIGTERM, then
SIGKILL) and removes the temporary directory, unless ``--keep`` asked to keep it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aegis_edge_cli import CliError, CommandTree

__all__ = ["register"]

_HOSTS = ("web-1", "web-2", "web-3", "web-4", "db-1")
_TENANT = "acme"
_AEGIS = [sys.executable, "-m", "aegis_edge_cli"]


class _Demo:
    def __init__(self, root: Path, *, quiet: bool) -> None:
        self.root = root
        self.quiet = quiet
        self.relay_dir = root / "relay"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = dict(os.environ, GRPC_VERBOSITY="ERROR")

    # -- output

    def say(self, text: str) -> None:
        print(f"\n== {text}", flush=True)

    def show(self, argv: Sequence[str]) -> None:
        print("$ aegis " + shlex.join(argv), flush=True)

    # -- processes

    def aegis(
        self, *argv: str, check: bool = True, show: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        if show:
            self.show(argv)
        done = subprocess.run(
            [*_AEGIS, *argv],
            capture_output=True,
            text=True,
            env=env or self.env,
            timeout=180,
            check=False,
        )
        if show and not self.quiet:
            sys.stdout.write(done.stdout)
        if show and done.stderr.strip():
            sys.stdout.write(done.stderr)
        sys.stdout.flush()
        if check and done.returncode != 0:
            shown = shlex.join("<token>" if a.startswith("eyJ") else a for a in argv)
            raise CliError(f"demo step failed: aegis {shown}: {done.stderr.strip()}")
        return done

    def spawn(self, argv: Sequence[str], log: Path, env: dict[str, str]) -> None:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*_AEGIS, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.procs.append(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    # -- steps

    def start_relay(self) -> dict[str, Any]:
        self.say("1. A relay on its embedded SQLite default, TLS on loopback")
        argv = [
            "relay", "serve", "--data-dir", str(self.relay_dir),
            "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
            "--heartbeat-interval", "2s", "--stale-threshold", "6s",
        ]  # fmt: skip
        self.show(argv)
        self.relay_dir.mkdir(parents=True)
        self.spawn(argv, self.root / "relay.log", self.env)
        info_file = self.relay_dir / "relay.json"
        deadline = time.monotonic() + 30
        while not info_file.exists():
            if self.procs[0].poll() is not None or time.monotonic() > deadline:
                log = (self.root / "relay.log").read_text(errors="replace")[-2000:]
                raise CliError(f"the relay did not start; its log ends with:\n{log}")
            time.sleep(0.1)
        info: dict[str, Any] = json.loads(info_file.read_text())
        print(f"relay listening on {info['listen']} (TLS), metrics at {info['metrics']}")
        print(f"CA: {info['ca_cert']}; admin operator token: {info['operator_token']}")
        # Operator commands find the relay the documented way: environment variables.
        self.env["AEGIS_RELAY"] = info["listen"]
        self.env["AEGIS_CA_CERT"] = info["ca_cert"]
        self.env["AEGIS_OPERATOR_TOKEN"] = Path(info["operator_token"]).read_text().strip()
        self.console(info)
        print("export AEGIS_RELAY AEGIS_CA_CERT AEGIS_OPERATOR_TOKEN  # set for the steps below")
        return info

    def console(self, info: dict[str, Any]) -> None:
        """Print the console's URL and a fresh one-time login link for the admin token."""
        request = urllib.request.Request(  # noqa: S310 - our loopback relay
            f"{info['http']}/console/login-links",
            method="POST",
            headers={"Authorization": f"Bearer {self.env['AEGIS_OPERATOR_TOKEN']}"},
        )
        context = ssl.create_default_context(cafile=str(info["ca_cert"]))
        with urllib.request.urlopen(request, timeout=10, context=context) as resp:  # noqa: S310
            link = json.loads(resp.read())["url"]
        print(f"console: {info['http']}/ (the browser must trust {info['ca_cert']})")
        print(f"  log in once, within 10 minutes: {link}")
        print(f"  or paste an operator token, e.g. the one in {info['operator_token']}")

    def export_line(self, info: dict[str, Any]) -> str:
        """The operator's environment as one shell line (this prints the admin token)."""
        values = {
            "AEGIS_RELAY": str(info["listen"]),
            "AEGIS_CA_CERT": str(Path(info["ca_cert"]).resolve()),
            "AEGIS_OPERATOR_TOKEN": self.env["AEGIS_OPERATOR_TOKEN"],
        }
        return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in values.items())

    def enroll_hosts(self) -> dict[str, str]:
        self.say(f"2. Five hosts enroll in tenant {_TENANT!r} and start their daemons")
        node_ids: dict[str, str] = {}
        for host in _HOSTS:
            token = self.aegis("edge", "tokens", "issue", "--tenant", _TENANT, show=False)
            state = self.root / "hosts" / host
            role = host.split("-")[0]
            print(
                f"$ aegis edge enroll <token> --state-dir {state} --allow-tool cmd.run "
                f"--label role={role}"
            )
            # Five "hosts" share this machine: each reports its own name (HOSTNAME column).
            host_env = dict(self.env, AEGIS_HOSTNAME=host)
            self.aegis(
                "edge", "enroll", token.stdout.strip(), "--state-dir", str(state),
                "--allow-tool", "cmd.run", "--label", f"role={role}", show=False, env=host_env,
            )  # fmt: skip
            node_ids[host] = json.loads(
                self.aegis(
                    "edge", "status", "--state-dir", str(state), "--output", "json", show=False
                ).stdout
            )["node_id"]
            # Each host gets a HOME of its own, named after it: a command's environment is
            # the daemon's minimal base (PATH, HOME, LANG), so that is how the upgrade script
            # finds out which host it runs on.
            home = self.root / "homes" / host
            home.mkdir(parents=True, exist_ok=True)
            env = dict(host_env, HOME=str(home))
            self.spawn(
                ["edge", "daemon", "--state-dir", str(state)], self.root / f"{host}.log", env
            )
        print("$ aegis edge daemon --state-dir ...   # one per host, in the background")
        deadline = time.monotonic() + 60
        while True:
            hosts = json.loads(
                self.aegis("edge", "ls", "--connected", "--output", "json", show=False).stdout
            )
            if len(hosts) >= len(_HOSTS):
                break
            if time.monotonic() > deadline:
                raise CliError(
                    f"only {len(hosts)} of {len(_HOSTS)} daemons connected in 60 s;"
                    f" see the logs in {self.root}"
                )
            time.sleep(0.3)
        for host, node_id in node_ids.items():
            if host.startswith("web"):
                self.aegis("edge", "tag", "add", node_id, "managed-fleet", show=False)
        print("$ aegis edge tag add <node-id> managed-fleet   # for the four web hosts")
        return node_ids

    def hosts_table(self) -> None:
        self.say("3. The hosts, as an operator sees them")
        self.aegis("edge", "ls")

    def rolling_update(self, node_ids: dict[str, str]) -> int:
        self.say("4. The seed's fleet-wide update: rolling=2, stop after the first failure")
        # Targets go out in node-id order: break the first one's upgrade, so the halt
        # leaves hosts that never started.
        failing = min((h for h in node_ids if h.startswith("web")), key=node_ids.__getitem__)
        print(f"(the upgrade script is broken on {failing})")
        script = (
            'if [ "${HOME##*/}" = "' + failing + '" ]; then '
            'echo "upgrade failed on ${HOME##*/}" >&2; exit 3; fi; '
            'sleep 1; echo "upgraded ${HOME##*/}"'
        )
        done = self.aegis(
            "edge", "fleet", "run", "--target", "tags=managed-fleet", "--tool", "cmd.run",
            "--arg", f"cmd={script}", "--mode", "rolling=2", "--on-error", "stop-after=1",
            "--deadline", "120s", check=False,
        )  # fmt: skip
        print(f"(exit code {done.returncode}: non-zero because the run did not complete)")
        return done.returncode

    def revoke(self, node_id: str, host: str) -> None:
        self.say(f"5. {host}'s key is suspected leaked: revoke it from the relay")
        self.aegis("edge", "keys", "revoke-remote", node_id)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            hosts = json.loads(self.aegis("edge", "ls", "--output", "json", show=False).stdout)
            if any(h["node_id"] == node_id and h["status"] == "Revoked" for h in hosts):
                break
            time.sleep(0.2)
        self.aegis("edge", "ls")

    def metrics(self, info: dict[str, Any]) -> None:
        self.say("6. Prometheus metrics")
        url = str(info["metrics"])
        print(f"$ curl --cacert {info['ca_cert']} {url}")
        # HTTPS with the relay's CA as the only root, as a scraper would pin it
        context = ssl.create_default_context(cafile=str(info["ca_cert"]))
        with urllib.request.urlopen(url, timeout=10, context=context) as resp:  # noqa: S310
            text = resp.read().decode()
        for line in text.splitlines():
            if line.startswith("aegis_edge_") and not line.startswith(
                ("aegis_edge_command_duration_seconds_bucket", "aegis_edge_stream_protocol")
            ):
                print("  " + line)


class _Terminated(Exception):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C, so the relay and daemons stop too."""


def _on_terminate(signum: int, _frame: object) -> None:
    raise _Terminated(signal.Signals(signum).name)


def _run(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="aegis-demo-"))
    demo = _Demo(root, quiet=False)
    print(f"aegis-edge demo in {root} (Ctrl-C stops everything)")
    # The relay and daemons run in sessions of their own (a Ctrl-C reaches only us, and we
    # stop them in order), so a SIGTERM to the demo must be turned into that same stop.
    previous = {sig: signal.signal(sig, _on_terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        info = demo.start_relay()
        node_ids = demo.enroll_hosts()
        demo.hosts_table()
        demo.rolling_update(node_ids)
        demo.revoke(node_ids["db-1"], "db-1")
        demo.metrics(info)
        if args.keep_running:
            print("\nEverything keeps running. In another shell, paste:\n")
            print(demo.export_line(info))
            print("\nthen try `aegis edge ls` or `aegis edge fleet run ...`. Ctrl-C stops it all.")
            demo.console(info)
            while all(p.poll() is None for p in demo.procs[:1]):
                time.sleep(0.5)
        print("\nDemo done: stopping the daemons and the relay.")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the daemons and the relay.", file=sys.stderr)
        return 130
    except _Terminated as err:
        print(f"\n{err}: stopping the daemons and the relay.", file=sys.stderr)
        return 143
    finally:
        # No second signal may cut the clean-up short.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        demo.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if args.keep or args.keep_running:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def register(tree: CommandTree) -> None:
    p = tree.command(
        "relay demo",
        _run,
        help="run a relay and five daemons on loopback and walk through a fleet run",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="leave relay and daemons running at the end until Ctrl-C",
    )
