"""The whole unblock story in a real browser: headless Chromium (driven by Selenium) against a
running ``domainpolicy console`` (a subprocess on a free loopback port) and a real SQLite store.

A tenant is blocked by relayed spam (RelayPolicy calls on the SQLite store); its admin signs in,
sees the evidence and the chart, completes the checklist and requests the unblock (a wrong block
code first); support signs in, finds the request in the queue and approves it; the tenant's next
relayed message is accepted.  Screenshots of the main pages are taken on the way (set
``DOMAINPOLICY_SCREENSHOTS=docs/images`` to refresh the ones the documentation shows).

Needs Debian's ``chromium`` and ``chromium-driver``: when the driver is missing the test fails
saying so -- it is never skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from console_support import ONPREM_IP, PASSWORD
from domainpolicy import InboundConnector, RelayRequest, SQLiteStore
from domainpolicy._config import load_config

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
SCREENSHOTS = (
    "console-login",
    "console-tenant-blocked",
    "console-request-refused",
    "console-tenant-requested",
    "console-history",
    "console-queue",
    "console-tenant-approved",
)

CONFIG = """
[store]
url = "sqlite:state.db"

[policy]
message_limit = 8
domain_limit = 5
window_seconds = 3600
bucket_seconds = 60

[tenants.contoso]
domains = ["contoso.com"]

[tenants.fabrikam]
domains = ["fabrikam.com"]

[[connectors]]
name = "contoso-onprem"
tenant = "contoso"
sender_ip_ranges = ["198.51.100.0/24"]
"""


def chromedriver() -> str:
    """The path of ``chromedriver``.

    Raises:
        RuntimeError: it is not installed.
    """
    found = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
    )
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None or browser is None:
        raise RuntimeError(
            "chromium and chromedriver are not installed: the console's browser test needs a "
            "real headless Chromium. Install the Debian packages: "
            "sudo apt-get install -y chromium chromium-driver"
        )
    return found


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return env


def _cli(*args: str, stdin: str = "") -> None:
    subprocess.run(
        [sys.executable, "-m", "domainpolicy", *args],
        input=stdin,
        text=True,
        check=True,
        env=_env(),
        capture_output=True,
        timeout=60,
    )


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A blocked tenant in a SQLite store, two accounts, and the console serving them."""
    config_path = tmp_path / "tenants.toml"
    config_path.write_text(CONFIG, encoding="utf-8")
    config = load_config(config_path)
    with SQLiteStore(tmp_path / "state.db") as store:
        policy = config.build_policy(store=store)
        policy.connector_created(
            InboundConnector(
                "<b>new</b>-connector", "contoso", sender_ip_ranges=["203.0.113.0/24"]
            ),
            when=time.time() - 600,
        )
        for n in range(12):
            policy.evaluate(RelayRequest(f"spam{n}@forged{n % 6}.example", client_ip=ONPREM_IP))
        assert policy.status("contoso").state.value == "blocked"
    for name, role, tenant in (("alice", "tenant-admin", "contoso"), ("sam", "support", None)):
        extra = ["--tenant", tenant] if tenant else []
        _cli(
            "console", "user", "add", name, "--role", role, *extra, "--password-stdin",
            "--config", str(config_path), stdin=PASSWORD + "\n",
        )  # fmt: skip
    server = subprocess.Popen(
        [sys.executable, "-m", "domainpolicy", "console", "--config", str(config_path),
         "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )  # fmt: skip
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), (line, server.stderr)
        yield {"url": line.split()[-1], "config": config_path, "tmp": tmp_path}
    finally:
        server.terminate()
        try:
            server.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    driver_path = chromedriver()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1100,1400",
    ):
        options.add_argument(flag)
    binary = shutil.which("chromium")
    if binary:
        options.binary_location = binary
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_unblock_story_in_a_browser(world: dict[str, Any], browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.ui import WebDriverWait

    url: str = world["url"]
    shots = Path(os.environ.get("DOMAINPOLICY_SCREENSHOTS") or world["tmp"])
    shots.mkdir(parents=True, exist_ok=True)
    taken: list[str] = []

    def shot(name: str) -> None:
        assert name in SCREENSHOTS
        browser.save_screenshot(str(shots / f"{name}.png"))
        taken.append(name)

    def sign_in(name: str) -> None:
        browser.get(f"{url}/login")
        browser.find_element(By.ID, "name").send_keys(name)
        browser.find_element(By.ID, "password").send_keys(PASSWORD)
        if name == "alice":
            shot("console-login")
        submit(browser.find_element(By.ID, "sign-in"))

    def submit(element: Any) -> None:
        """Click a submit button and wait for the page it loads."""
        page = browser.find_element(By.TAG_NAME, "html")
        element.click()
        WebDriverWait(browser, 30).until(staleness_of(page))

    def click(text: str) -> None:
        submit(browser.find_element(By.XPATH, f"//button[normalize-space()='{text}']"))

    def body() -> str:
        text: str = browser.find_element(By.TAG_NAME, "body").text
        return text

    # The tenant's admin: evidence, chart, checklist.
    sign_in("alice")
    assert browser.current_url.endswith("/t/contoso")
    assert "blocked" in body()
    assert "limit 8" in body()
    assert "limit 5" in body()
    assert browser.find_elements(By.CSS_SELECTOR, "#chart svg rect.bar")
    assert "<b>new</b>-connector" in body()  # shown as text, not markup
    assert not browser.find_elements(By.CSS_SELECTOR, "#checklist b")
    shot("console-tenant-blocked")

    click("Register")  # the first offending domain becomes an accepted domain
    assert "Register an accepted domain: done." in body()
    while browser.find_elements(By.XPATH, "//button[normalize-space()='Not ours']"):
        click("Not ours")
    click("Reviewed: removed")
    browser.find_element(By.ID, "attest-note").send_keys("Server rebuilt, relay locked down.")
    submit(browser.find_element(By.ID, "attest"))
    assert "Every step is done" in body()

    browser.find_element(By.ID, "code").send_keys("5.7.705")
    browser.find_element(By.ID, "unblock-evidence").send_keys("Rebuilt and verified.")
    submit(browser.find_element(By.ID, "request-unblock"))
    assert "block code does not match" in body()
    assert "Nothing was changed" in body()
    shot("console-request-refused")
    code = browser.find_element(By.ID, "code")
    code.clear()
    code.send_keys("5.7.750")
    evidence = browser.find_element(By.ID, "unblock-evidence")
    evidence.clear()
    evidence.send_keys("Rebuilt and verified; see ticket 42.")
    submit(browser.find_element(By.ID, "request-unblock"))
    assert "unblock_requested" in body()
    shot("console-tenant-requested")
    submit(browser.find_element(By.LINK_TEXT, "History (audit trail)"))
    assert "request_unblock" in body()
    assert "alice" in body()
    shot("console-history")
    # Another tenant's page is not found for her.
    browser.get(f"{url}/t/fabrikam")
    assert "no such tenant" in body()
    browser.get(f"{url}/t/contoso")
    click("Sign out")

    # Support: the queue, then approve.
    sign_in("sam")
    assert browser.current_url.endswith("/support")
    assert "contoso" in body()
    assert "ticket 42" in body()
    shot("console-queue")
    submit(browser.find_element(By.LINK_TEXT, "contoso"))
    browser.find_element(By.ID, "approve-reason").send_keys("Verified with the tenant.")
    submit(browser.find_element(By.ID, "approve"))
    assert "Approve the unblock: done." in body()
    assert "active" in body()
    shot("console-tenant-approved")
    assert sorted(taken) == sorted(SCREENSHOTS)

    # The tenant's next relayed message (an unregistered domain) is accepted again.
    config = load_config(world["config"])
    with SQLiteStore(world["tmp"] / "state.db") as store:
        policy = config.build_policy(store=store)
        decision = policy.evaluate(RelayRequest("news@newsletter.example", client_ip=ONPREM_IP))
        assert decision.accepted, decision
        actors = {r.actor for r in policy.status("contoso", history=None).history}
        assert {"alice", "sam"} <= actors


def test_docs_show_each_screenshot() -> None:
    """docs/console.md shows one committed screenshot of each page the browser test takes."""
    page = (ROOT / "docs" / "console.md").read_text(encoding="utf-8")
    for name in SCREENSHOTS:
        assert (ROOT / "docs" / "images" / f"{name}.png").is_file(), name
        assert f"](images/{name}.png)" in page, name
