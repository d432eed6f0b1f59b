"""The console in real headless Chromium (Debian's, driven by Playwright) against a real
relay and real daemons: log in, pills in text, live status without a reload, CSRF, tenant
scoping, the host page (tags, history, a revoke that cuts the daemon off), a run started
from the CLI filling in on its page, and axe-core on every page (no serious or critical
violations). Screenshots land in the test's directory (and ``AEGIS_SCREENSHOTS``)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests import https
from tests.agent.harness import (
    CLI,
    DaemonProcess,
    EnrolledHost,
    RelayProcess,
    cli,
    enroll_host,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CHROMIUM = "/usr/bin/chromium"
INSTALL = "apt-get install -y chromium && pip install playwright"
AXE = Path(__file__).parent.parent / "vendor" / "axe-core" / "axe.min.js"

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
            hosts[name] = enroll_host(relay, root / name, tenant=tenant, allow_tools=["cmd.run"])
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
                "root": root,
            }
            browser.close()
    finally:
        for daemon in daemons.values():
            daemon.proc.send_signal(signal.SIGCONT)
            daemon.stop()
        relay.stop()


def _new_page(world: dict[str, Any]) -> Page:
    # bypass_csp: axe-core is injected as an inline script, which the console's CSP forbids
    page: Page = world["browser"].new_context(bypass_csp=True).new_page()
    return page


def _axe(page: Page) -> None:
    """axe-core's checks of the page as shown: no serious or critical violation."""
    page.add_script_tag(path=str(AXE))
    found = page.evaluate(
        """async () => (await axe.run()).violations
            .filter((v) => v.impact === "serious" || v.impact === "critical")
            .map((v) => `${v.impact} ${v.id}: ${v.help} at ${v.nodes.map((n) => n.target)}`)"""
    )
    assert found == [], "\n".join(found)


def _log_in(world: dict[str, Any], token: str) -> Page:
    page = _new_page(world)
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
    _axe(page)

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
    page = _new_page(world)
    page.goto(world["relay"].info["http"] + "/login")
    _axe(page)
    page.get_by_label("Operator token").fill("not-a-token")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("operator token refused")
    _axe(page)


def test_a_viewer_sees_the_host_page_but_may_not_change_it(world: dict[str, Any]) -> None:
    relay: RelayProcess = world["relay"]
    web = world["hosts"]["web-1"]
    viewer = cli(
        "relay", "operator-token", "--data-dir", str(relay.data_dir),
        "--tenant", "acme", "--role", "viewer",
    ).stdout.strip()  # fmt: skip
    page = _log_in(world, viewer)
    page.get_by_role("link", name=web.node_id).click()
    expect(page.locator("#host-status")).to_contain_text("Connected")
    page.get_by_label("New tag").fill("mine")
    page.get_by_role("button", name="Add tag").click()
    expect(page.locator("#tag-error")).to_contain_text(
        "AddTags needs the operator role; this token has viewer"
    )
    assert "mine" not in relay.host(web.node_id).capabilities.tags


def test_a_run_started_from_the_cli_fills_in_on_its_page(world: dict[str, Any]) -> None:
    relay: RelayProcess = world["relay"]
    web, db = world["hosts"]["web-1"], world["hosts"]["db-1"]
    page = _log_in(world, relay.operator_token)
    page.get_by_role("link", name="Fleet runs").click()
    expect(page.get_by_role("heading", name="Fleet runs")).to_be_visible()
    # one target at a time, each taking a while: the page sees the run in the middle
    run = subprocess.Popen(
        [
            *CLI, "edge", "fleet", "run", "--target", f"node={web.node_id},{db.node_id}",
            "--tool", "cmd.run", "--arg", "cmd=sleep 3; echo console-run-done",
            "--mode", "sequential", "--no-follow", "--relay-data-dir", str(relay.data_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        link = page.locator("#runs tbody a").first
        expect(link).to_be_visible(timeout=15_000)
        link.click()
        targets = page.locator("#targets tbody tr")
        # the first target runs while the second waits: the page shows the run half done
        expect(page.locator('#targets tr[data-outcome="running"]')).to_have_count(1, timeout=15_000)
        expect(page.locator("#run-summary")).to_contain_text("running")
        _shot(world, page, "console-run-running")
        _axe(page)
        expect(page.locator('#targets tr[data-outcome="ok"]')).to_have_count(2, timeout=30_000)
        expect(targets).to_have_count(2)
        expect(page.locator("#run-summary")).to_contain_text("finished: completed")
        expect(page.locator("#targets")).to_contain_text("console-run-")
        _shot(world, page, "console-run-finished")
        assert run.wait(timeout=30) == 0, run.stderr.read() if run.stderr else ""
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    page.get_by_role("link", name="Fleet runs").click()
    expect(page.locator("#runs tbody tr").first).to_contain_text("completed")
    _axe(page)


def test_revoke_from_the_host_page_cuts_the_daemon_off(world: dict[str, Any]) -> None:
    relay: RelayProcess = world["relay"]
    host = enroll_host(relay, world["root"] / "victim", tenant="acme", allow_tools=["cmd.run"])
    daemon = DaemonProcess.start(host.state_dir)
    try:
        daemon.wait_event("connected")
        relay.run(host.node_id, "cmd.run", args={"cmd": "echo history-line"})
        page = _log_in(world, relay.operator_token)
        page.get_by_role("link", name=host.node_id).click()
        expect(page.locator("#host-status")).to_contain_text("Connected")
        caps = page.locator("#caps")
        expect(caps).to_contain_text("cmd.run")
        expect(caps).to_contain_text("acme")
        history = page.locator("#history tbody tr").first
        expect(history).to_contain_text("cmd.run")
        expect(history).to_contain_text("ok")
        expect(history).to_contain_text("history-line")
        expect(history.locator("td").nth(3)).to_have_text("0")

        page.get_by_label("New tag").fill("canary")
        page.get_by_role("button", name="Add tag").click()
        expect(page.locator("#tags")).to_contain_text("canary")
        assert "canary" in relay.host(host.node_id).capabilities.tags
        page.get_by_label("New tag").fill("bad tag")
        page.get_by_role("button", name="Add tag").click()
        expect(page.locator("#tag-error")).to_contain_text("invalid tag 'bad tag'")
        page.get_by_role("button", name="Remove tag canary").click()
        expect(page.locator("#tags")).not_to_contain_text("canary")
        _axe(page)

        page.get_by_role("button", name="Revoke this host…").click()
        dialog = page.get_by_role("dialog")
        expect(dialog).to_contain_text(f"node {host.node_id}, tenant acme")
        _shot(world, page, "console-host-revoke")
        _axe(page)
        dialog.get_by_label("Reason (kept with the host)").fill("laptop lost")
        confirm = dialog.get_by_role("button", name="Revoke ")
        expect(confirm).to_have_text(f"Revoke {caps_hostname(relay, host)}")
        confirm.click()
        expect(page.locator("#host-status")).to_contain_text("Revoked")
        expect(page.locator("#host-status")).to_contain_text("laptop lost")

        # The daemon itself: its stream is cut (it exits, saying why) and it cannot attest
        # again with its key.
        assert daemon.wait_exit() == 3
        assert daemon.status()["state"] == "revoked"
        again = DaemonProcess.start(host.state_dir)
        assert again.wait_exit() == 3
        assert "revoked" in "\n".join(again.output.lines)
        wait_until(lambda: relay.host(host.node_id).connected_since == 0, 10, what="stream gone")
    finally:
        daemon.stop()


def caps_hostname(relay: RelayProcess, host: EnrolledHost) -> str:
    return relay.host(host.node_id).capabilities.hostname or host.node_id


def test_a_one_time_login_link_logs_in_once(world: dict[str, Any]) -> None:
    relay: RelayProcess = world["relay"]
    base = relay.info["http"]
    status, _headers, body = https.request(
        relay.info, "/console/login-links", token=relay.operator_token, method="POST"
    )
    assert status == 201
    link = json.loads(body)["url"]
    assert link.startswith(base + "/login/once/") and "eyJ" not in link  # no token in it
    page = _new_page(world)
    page.goto(link)
    expect(page.get_by_role("heading", name="Edge Hosts")).to_be_visible()
    again = _new_page(world)
    again.goto(link)
    expect(again.get_by_role("alert")).to_contain_text("this login link was used already")
    assert https.request(relay.info, "/console/login-links", method="POST")[0] == 401
