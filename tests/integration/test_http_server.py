"""The relay's one HTTP server on a real relay: HTTPS with the relay's certificate,
``/healthz``, ``/readyz``, ``/metrics``; plain HTTP only with ``--insecure``."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests import https
from tests.relay.daemon_driver import RelayProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_https_health_ready_and_metrics(tmp_path: Path) -> None:
    relay = RelayProcess.start(tmp_path / "relay", "--http-listen", "127.0.0.1:0")
    try:
        info = relay.info
        assert info["http"] == f"https://127.0.0.1:{info['metrics_port']}"
        assert info["metrics"] == info["http"] + "/metrics"
        status, _, body = https.request(info, "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        status, _, body = https.request(info, "/readyz")
        assert (status, json.loads(body)) == (200, {"status": "ready"})
        assert "# TYPE aegis_edge_daemons_total gauge" in https.scrape(info)
        # OpenMetrics when the scraper asks for it, as prometheus_client's own server does
        status, headers, body = https.request(
            info, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert status == 200
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        assert body.rstrip().endswith(b"# EOF")
        # only the relay's CA is trusted: the system roots do not know it
        with pytest.raises(urllib.error.URLError) as refused:
            urllib.request.urlopen(
                info["metrics"], timeout=10, context=ssl.create_default_context()
            )
        assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)
    finally:
        assert relay.stop() == 0


def test_insecure_relay_serves_plain_http(tmp_path: Path) -> None:
    relay = RelayProcess.start(tmp_path / "relay", "--insecure")
    try:
        assert relay.info["http"].startswith("http://127.0.0.1:")
        with urllib.request.urlopen(relay.info["http"] + "/readyz", timeout=10) as resp:
            assert json.loads(resp.read()) == {"status": "ready"}
    finally:
        relay.stop()
