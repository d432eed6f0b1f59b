"""Start a throwaway PostgreSQL server for the tests (or reuse the one already running) and
print its URL.

The Debian ``postgresql`` package's binaries, ``initdb --auth=trust`` into ``--dir`` as an
unprivileged user (``postgres`` when we are root: the server refuses to run as root),
listening on 127.0.0.1:``--port`` and on a unix socket inside ``--dir``. Durability is off
(fsync, synchronous_commit): the data is thrown away, and the suite should not wait on
a disk it shares with four other engineers. ``.ci/run`` exports the printed URL as
``AEGIS_TEST_POSTGRES_URL``; the store fault tests start private instances with ``--dir``
and ``--port`` of their own, and restart them with ``--stop``.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_DIR = Path(tempfile.gettempdir()) / f"aegis-pg-test-{os.geteuid()}"
DEFAULT_PORT = 54329


def bindir() -> Path:
    """The server binaries: ``pg_config --bindir`` (the client package's, often without
    ``initdb``) first, else the newest ``/usr/lib/postgresql/*/bin``."""
    found = shutil.which("pg_config")
    if found:
        out = subprocess.run([found, "--bindir"], capture_output=True, text=True, check=False)
        candidate = Path(out.stdout.strip())
        if (candidate / "initdb").exists():
            return candidate
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
    )
    for candidate in reversed(versions):
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    raise SystemExit(
        "pg_test_server: no PostgreSQL server binaries (initdb) found; "
        "install them with: apt-get install -y postgresql"
    )


def _as_owner(argv: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; the Debian package makes a `postgres` user.
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _chown(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def url(port: int) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def running(bin_: Path, port: int) -> bool:
    out = subprocess.run(
        [str(bin_ / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)], check=False
    )
    return out.returncode == 0


def start(data: Path, port: int) -> str:
    bin_ = bindir()
    if running(bin_, port):
        return url(port)
    data.mkdir(parents=True, exist_ok=True)
    _chown(data)
    pgdata, sockets = data / "data", data / "sock"
    sockets.mkdir(exist_ok=True)
    _chown(sockets)
    if not (pgdata / "PG_VERSION").exists():
        subprocess.run(
            _as_owner(
                [
                    str(bin_ / "initdb"),
                    "-D",
                    str(pgdata),
                    "--auth=trust",
                    "--username=postgres",
                    "--encoding=UTF8",
                    "--no-instructions",
                ]
            ),
            check=True,
            stdout=subprocess.DEVNULL,
        )
    options = " ".join(
        [
            "-c listen_addresses=127.0.0.1",
            f"-p {port}",
            f"-k {sockets}",
            "-c max_connections=300",
            "-c fsync=off",
            "-c synchronous_commit=off",
            "-c full_page_writes=off",
        ]
    )
    subprocess.run(
        _as_owner(
            [
                str(bin_ / "pg_ctl"),
                "-D",
                str(pgdata),
                "-l",
                str(data / "server.log"),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ]
        ),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return url(port)


def stop(data: Path) -> None:
    pgdata = data / "data"
    if (pgdata / "postmaster.pid").exists():
        subprocess.run(
            _as_owner([str(bindir() / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop"]),
            check=False,
            stdout=subprocess.DEVNULL,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="server directory")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (127.0.0.1)")
    parser.add_argument("--stop", action="store_true", help="stop the server in --dir")
    args = parser.parse_args()
    if args.stop:
        stop(args.dir)
        return 0
    print(start(args.dir, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
