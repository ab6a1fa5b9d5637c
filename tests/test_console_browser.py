"""The support console in a real browser, end to end.

RabbitMQ (a vhost of its own), the CS-Cart store emulator, the real shipment-lodged consumer
and ``cscart-fm console`` as its own process; headless Chromium (Debian's packages, driven
by Selenium through Debian's chromedriver) logs in, filters the dead letters, opens one,
and — once the test fixed the cause in the store — replays it and sees it resolved. Every
step leaves a screenshot in ``artifacts/screenshots/`` (CI keeps them).

Without chromium, chromedriver or selenium this skips saying what is missing; under
``CI=true`` it fails instead (``.ci/run`` installs them).
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from .conftest import need
from .support.broker import declare, depth, publish_json, shipment_event, wait_for
from .support.console_browser import Screenshots, chromium, missing
from .support.console_helpers import PASSWORDS, write_users
from .support.pipeline import (
    API_KEY,
    API_USER,
    cli_env,
    client_doc,
    consumer,
    make_services,
    start_cli,
    write_clients_file,
)

pytestmark = [pytest.mark.broker, pytest.mark.browser, pytest.mark.timeout(120)]

DLQ = "cscart.shipment-lodged.dlq"
ORDER = 1000300


def test_support_logs_in_filters_replays_and_sees_it_resolved(
    broker_url: str, tmp_path: Path
) -> None:
    lacking = missing()
    need(f"a browser for the console test ({lacking} missing)", lacking is None)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from cscart_emulator import StoreEmulator

    state_url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    declare(broker_url)
    shots = Screenshots("console")
    emu = StoreEmulator(api_user=API_USER, api_key=API_KEY)
    emu.add_product("Test001", 100)
    with emu:
        clients = [client_doc(emu.url)]
        services = make_services(broker_url, state_url, clients)
        console_process = None
        try:
            with consumer(services, "shipment-lodged"):
                # FM lodges a shipment for an order the store does not have (yet): not-found.
                publish_json(
                    broker_url,
                    shipment_event("FM-SHP-300", order_no=f"CS{ORDER}", cart_order_id=ORDER),
                    "shipment.lodged",
                )
                # And one for a client nobody configured: unknown-client (filtered out below).
                publish_json(
                    broker_url, shipment_event("FM-SHP-999", client_id="NOPE"), "shipment.lodged"
                )
                wait_for(lambda: depth(broker_url, DLQ) == 2, timeout=30)

                env = cli_env(
                    broker_url,
                    state_url,
                    write_clients_file(tmp_path / "clients.yaml", clients),
                    CSCART_FM_CONSOLE_USERS=str(write_users(tmp_path / "users.yaml")),
                )
                log_file = tmp_path / "console.log"
                console_process = start_cli(["console", "--port", "0"], env, log_file)
                found = wait_for(
                    lambda: re.search(
                        r"console on (http://127\.0\.0\.1:\d+)/", log_file.read_text()
                    ),
                    timeout=30,
                )
                base = found.group(1)

                with chromium() as browser:
                    wait = WebDriverWait(browser, 30, poll_frequency=0.2)

                    # 1. Not logged in: the console sends the browser to its login page.
                    browser.get(base + "/letters")
                    assert browser.current_url.startswith(base + "/login")
                    browser.find_element(By.ID, "username").send_keys("olivia")
                    browser.find_element(By.ID, "password").send_keys(PASSWORDS["olivia"])
                    shots.take(browser, "login")
                    browser.find_element(By.ID, "login").click()
                    wait.until(lambda b: b.find_elements(By.ID, "filters"))
                    assert "olivia (operator)" in browser.find_element(By.ID, "who").text

                    # 2. Both dead letters were collected from the broker and are listed.
                    assert depth(broker_url, DLQ) == 0
                    rows = browser.find_elements(By.CSS_SELECTOR, "#letters tbody tr")
                    assert len(rows) == 2, browser.page_source
                    shots.take(browser, "dead letters")

                    # 3. Filter: client ACME, error type not-found.
                    browser.find_element(By.ID, "f-client").send_keys("ACME")
                    Select(browser.find_element(By.ID, "f-type")).select_by_value("not-found")
                    browser.find_element(By.ID, "apply-filters").click()
                    wait.until(lambda b: "type=not-found" in b.current_url)
                    rows = browser.find_elements(By.CSS_SELECTOR, "#letters tbody tr")
                    assert len(rows) == 1
                    assert "not-found" in rows[0].text and "ACME" in rows[0].text
                    shots.take(browser, "filtered")

                    # 4. Open it: what happened and what to do, in plain words.
                    rows[0].find_element(By.TAG_NAME, "a").click()
                    wait.until(lambda b: b.find_elements(By.ID, "what-happened"))
                    what = browser.find_element(By.ID, "what-happened").text
                    assert "shipment-lodged consumer could not process" in what
                    assert "not in the store" in what
                    assert "replay" in browser.find_element(By.ID, "action").text
                    assert browser.find_element(By.ID, "status").text.lower() == "open"
                    shots.take(browser, "dead letter")

                    # 5. Support had the order created in the store: the cause is fixed.
                    emu.add_order(
                        order_id=ORDER, products=[{"product_code": "Test001", "amount": 2}]
                    )

                    # 6. Replay; the page waits for the consumer and shows it resolved.
                    browser.find_element(By.ID, "replay").click()
                    wait.until(lambda b: "the broker took it" in b.page_source)
                    shots.take(browser, "replayed")
                    wait.until(lambda b: "status status-resolved" in b.page_source)
                    assert browser.find_element(By.ID, "resolved").is_displayed()
                    shots.take(browser, "resolved")

                    # 7. The action is in the audit log: who, when, what.
                    browser.get(base + "/audit")
                    replay_row = browser.find_element(By.CSS_SELECTOR, "tr.audit-replay")
                    assert (
                        "olivia" in replay_row.text and "confirmed by the broker" in replay_row.text
                    )
                    shots.take(browser, "audit log")

                    # 8. The overview: per client, nothing open for ACME any more.
                    browser.find_element(By.LINK_TEXT, "Overview").click()
                    acme = browser.find_element(By.ID, "client-ACME").text
                    assert "Last" not in acme and acme.split()[-1] == "0", acme
                    assert (
                        "not in the clients file" in browser.find_element(By.ID, "client-NOPE").text
                    )
                    shots.take(browser, "overview")

                wait_for(lambda: len(emu.shipments_for(ORDER)) == 1, timeout=10)
        finally:
            if console_process is not None:
                console_process.send_signal(signal.SIGTERM)
                assert console_process.wait(timeout=30) == 0
            services.close()
    assert [path.name for path in shots.taken] == [
        "console-01-login.png",
        "console-02-dead-letters.png",
        "console-03-filtered.png",
        "console-04-dead-letter.png",
        "console-05-replayed.png",
        "console-06-resolved.png",
        "console-07-audit-log.png",
        "console-08-overview.png",
    ]
    assert all(path.stat().st_size > 1000 for path in shots.taken)
    assert emu.errors == []
