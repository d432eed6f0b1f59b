"""The Edge Hosts console in real headless Chromium (Debian's, driven by Playwright) against
a real relay and real daemons: log in, pills in text, live status without a reload, CSRF,
tenant scoping. Screenshots land in the test's directory (and ``AEGIS_SCREENSHOTS``)."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.agent.harness import DaemonProcess, EnrolledHost, RelayProcess, cli, enroll_host

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CHROMIUM = "/usr/bin/chromium"
INSTALL = "apt-get install -y chromium && pip install playwright"

try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None


def _require_browser() -> None:
    missing = sync_playwright is None or not Path(CHROMIUM).exists()
    if missing and os.environ.get("CI"):
        pytest.fail(f"CI must run the browser tests: {INSTALL}")
    if missing:
        pytest.skip(f"no Chromium/Playwright here: {INSTALL}")


def _spki_pin(cert_pem: bytes) -> str:
    """The relay certificate's key, the one certificate Chromium is told to accept."""
    key = x509.load_pem_x509_certificate(cert_pem).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    relay_store_url: str,  # one relay per store
) -> Iterator[dict[str, Any]]:
    _require_browser()
    root = tmp_path_factory.mktemp("console")
    relay = RelayProcess.start(root / "relay", heartbeat_interval="1s", stale_threshold="3s")
    daemons: dict[str, DaemonProcess] = {}
    try:
        hosts: dict[str, EnrolledHost] = {}
        for name, tenant in (("web-1", "acme"), ("db-1", "beta")):
            hosts[name] = enroll_host(relay, root / name, tenant=tenant)
            daemons[name] = DaemonProcess.start(hosts[name].state_dir)
        for daemon in daemons.values():
            daemon.wait_event("connected")
        acme = cli(
            "relay", "operator-token", "--data-dir", str(relay.data_dir), "--tenant", "acme"
        ).stdout.strip()
        pin = _spki_pin((relay.data_dir / "server.pem").read_bytes())
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=["--no-sandbox", f"--ignore-certificate-errors-spki-list={pin}"],
            )
            yield {
                "relay": relay,
                "hosts": hosts,
                "daemons": daemons,
                "browser": browser,
                "acme_token": acme,
                "shots": root,
            }
            browser.close()
    finally:
        for daemon in daemons.values():
            daemon.proc.send_signal(signal.SIGCONT)
            daemon.stop()
        relay.stop()


def _log_in(world: dict[str, Any], token: str) -> Page:
    page: Page = world["browser"].new_context().new_page()
    page.goto(world["relay"].info["http"] + "/")
    expect(page).to_have_url(world["relay"].info["http"] + "/login")
    page.get_by_label("Operator token").fill(token)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Edge Hosts")).to_be_visible()
    return page


def _shot(world: dict[str, Any], page: Page, name: str) -> None:
    page.screenshot(path=str(world["shots"] / f"{name}.png"), full_page=True)
    extra = os.environ.get("AEGIS_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(world["shots"] / f"{name}.png", Path(extra) / f"{name}.png")


def _row(page: Page, host: EnrolledHost) -> Any:
    return page.locator(f'tr[data-node-id="{host.node_id}"]')


def test_login_pills_and_live_status(world: dict[str, Any]) -> None:
    page = _log_in(world, world["relay"].operator_token)
    cookie = next(c for c in page.context.cookies() if c["name"] == "aegis_session")
    assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"]) == (True, True, "Strict")
    web, db = world["hosts"]["web-1"], world["hosts"]["db-1"]
    for host in (web, db):
        expect(_row(page, host).get_by_text("Connected", exact=True)).to_be_visible()
    expect(page.locator("#summary")).to_have_text("2 hosts: 2 Connected")
    _shot(world, page, "console-hosts")

    page.evaluate("window.notReloaded = true")
    world["daemons"]["web-1"].proc.send_signal(signal.SIGSTOP)
    expect(_row(page, web).get_by_text("Unhealthy", exact=True)).to_be_visible(timeout=15_000)
    expect(page.locator("#summary")).to_have_text("2 hosts: 1 Connected, 1 Unhealthy")
    _shot(world, page, "console-hosts-unhealthy")
    world["daemons"]["web-1"].proc.send_signal(signal.SIGCONT)
    expect(_row(page, web).get_by_text("Connected", exact=True)).to_be_visible(timeout=15_000)
    assert page.evaluate("window.notReloaded") is True, "the page was reloaded"


def test_a_change_without_the_csrf_token_is_refused(world: dict[str, Any]) -> None:
    page = _log_in(world, world["relay"].operator_token)
    post = """async (csrf) => {
        const headers = {"Content-Type": "application/json"};
        if (csrf) headers["X-CSRF-Token"] = csrf;
        const r = await fetch("/api/v1/tenants/acme/enrollment-tokens",
                              {method: "POST", headers, body: "{}"});
        return [r.status, (await r.json()).detail || ""];
    }"""
    status, detail = page.evaluate(post, "")
    assert status == 403 and "CSRF" in detail
    csrf = page.locator('meta[name="csrf-token"]').get_attribute("content")
    assert page.evaluate(post, csrf)[0] == 201


def test_a_tenant_scoped_login_sees_only_its_tenant(world: dict[str, Any]) -> None:
    page = _log_in(world, world["acme_token"])
    expect(page.locator("#summary")).to_have_text("1 host: 1 Connected")
    expect(_row(page, world["hosts"]["web-1"])).to_be_visible()
    expect(_row(page, world["hosts"]["db-1"])).to_have_count(0)
    assert "beta" not in page.locator("#hosts").inner_text()


def test_selector_errors_point_at_the_column(world: dict[str, Any]) -> None:
    page = _log_in(world, world["relay"].operator_token)
    page.get_by_label("Selector").fill("tags=(")
    page.get_by_role("button", name="Filter").click()
    error = page.get_by_role("alert")
    expect(error).to_contain_text("selector column 6")
    expect(error).to_contain_text("tags=(\n     ^")
    page.get_by_label("Selector").fill(f"node={world['hosts']['db-1'].node_id}")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#summary")).to_have_text("1 host: 1 Connected")


def test_login_with_a_bad_token_says_why(world: dict[str, Any]) -> None:
    page: Page = world["browser"].new_context().new_page()
    page.goto(world["relay"].info["http"] + "/login")
    page.get_by_label("Operator token").fill("not-a-token")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("operator token refused")
