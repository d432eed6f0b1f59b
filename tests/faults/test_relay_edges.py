"""The relay's outer edges, on real processes: a busy listen port is one line on stderr,
and ``/metrics`` can require a bearer token (warning at start when it is open beyond
loopback without one).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aegis_edge_relay.server import StartupError, _is_loopback, load_metrics_token
from tests import https
from tests.agent.harness import CLI, RelayProcess, enroll_host
from tests.faults.conftest import Tally

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(120)]

TOKEN = "9f2c1e7b4d3a8e6f0b5c2d1a7e4f3b6c"


def serve_expecting_failure(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "relay", "serve", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_busy_listen_port_is_one_line(tmp_path: Path, tally: Tally) -> None:
    first = RelayProcess.start(tmp_path / "first")
    tally.fault()
    try:
        taken = first.endpoint
        proc = serve_expecting_failure(
            tmp_path / "second", "--listen", taken, "--metrics-listen", "127.0.0.1:0"
        )
    finally:
        first.stop()
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert lines == [
        f"aegis: cannot listen on {taken}: address already in use "
        "(another relay running? pick another --listen)"
    ], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "second" / "relay.json").exists()


def test_busy_metrics_port_is_one_line(tmp_path: Path, tally: Tally) -> None:
    first = RelayProcess.start(tmp_path / "first")
    tally.fault()
    try:
        taken = f"127.0.0.1:{first.info['metrics_port']}"
        proc = serve_expecting_failure(
            tmp_path / "second", "--listen", "127.0.0.1:0", "--metrics-listen", taken
        )
        # the first relay still serves: the second touched nothing of it
        assert https.request(first.info, "/metrics")[0] == 200
    finally:
        first.stop()
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == [
        f"aegis: cannot listen on {taken}: address already in use "
        "(another relay running? pick another --http-listen)"
    ], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "second" / "relay.json").exists()


def _get(info: dict[str, Any], path: str, token: str | None) -> tuple[int, dict[str, str], str]:
    status, headers, body = https.request(info, path, token=token)
    return status, headers, body.decode()


def test_metrics_bearer_token(tmp_path: Path, tally: Tally) -> None:
    token_file = tmp_path / "metrics.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    relay = RelayProcess.start(tmp_path / "relay", extra=["--metrics-token-file", str(token_file)])
    try:
        enroll_host(relay, tmp_path / "edge", tenant="tenant-nobody-may-see")
        info = relay.info
        refused = [
            _get(info, "/metrics", None),
            _get(info, "/metrics", TOKEN[:-1] + "0"),
            _get(info, "/metrics", TOKEN + "0"),
            _get(info, "/metrics", ""),
            _get(info, "/metrics?name[]=aegis_edge_daemons_total", None),
        ]
        # the scheme word is case-insensitive (RFC 9110); the token is not
        lower = {"Authorization": f"bearer {TOKEN}"}
        assert https.request(info, "/metrics", headers=lower)[0] == 200
        status, headers, body = _get(info, "/metrics", TOKEN)
        events = list(relay.output.events())
    finally:
        relay.stop()
    for code, hdrs, text in refused:
        leaked = "aegis_edge_" in text or "tenant-nobody-may-see" in text
        tally.refused(code == 401 and not leaked, f"/metrics request answered {code}")
        assert code == 401 and not leaked, (code, text[:200])
        assert hdrs["WWW-Authenticate"] == 'Bearer realm="aegis-relay-metrics"'
    assert status == 200
    # prometheus_client's own output, text format 0.0.4 unless the scraper asks otherwise
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    names = {f.name for f in text_string_to_metric_families(body)}
    assert {"aegis_edge_daemons_total", "aegis_edge_attestation_refusals"} <= names
    assert 'tenant="tenant-nobody-may-see"' in body
    assert TOKEN not in "\n".join(relay.output.lines)  # the token never reaches the log
    assert not [e for e in events if e.get("event") == "metrics.unauthenticated"]


def test_metrics_warning_beyond_loopback(tmp_path: Path) -> None:
    """Bound on every interface without a token: one warning line; on loopback: none."""
    open_relay = RelayProcess.start(tmp_path / "open", extra=["--metrics-listen", "0.0.0.0:0"])
    open_relay.stop()
    local = RelayProcess.start(tmp_path / "local")
    local.stop()
    warnings = [
        e for e in open_relay.output.events() if e.get("event") == "metrics.unauthenticated"
    ]
    assert len(warnings) == 1, open_relay.output.lines
    assert warnings[0]["level"] == "warning"
    assert "--metrics-token-file" in warnings[0]["detail"]
    assert not [e for e in local.output.events() if e.get("event") == "metrics.unauthenticated"]


def test_loopback_and_token_file_rules(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "127.3.4.5", "::1", "localhost"):
        assert _is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.0.2.1", "relay.example.com", ""):
        assert not _is_loopback(host), host
    good = tmp_path / "good"
    good.write_text(f"  {TOKEN}\n")
    assert load_metrics_token(good) == TOKEN.encode()
    for name, content in (("empty", b"\n"), ("spaced", b"a b\n"), ("binary", b"\xff\xfe")):
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(StartupError, match=f"--metrics-token-file {bad}"):
            load_metrics_token(bad)
    with pytest.raises(StartupError, match="cannot read it"):
        load_metrics_token(tmp_path / "missing")


def test_bad_token_file_is_one_line(tmp_path: Path, tally: Tally) -> None:
    empty = tmp_path / "empty.token"
    empty.write_text("")
    proc = serve_expecting_failure(
        tmp_path / "relay",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--metrics-token-file",
        str(empty),
    )
    tally.refused(proc.returncode != 0, "an empty --metrics-token-file")
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == [
        f"aegis: --metrics-token-file {empty}: the file is empty; put one token on one line "
        "(e.g. the output of 'openssl rand -hex 32')"
    ], proc.stderr
    assert not (tmp_path / "relay" / "relay.json").exists()
    assert not (tmp_path / "relay" / "ca.pem").exists()  # refused before making anything
