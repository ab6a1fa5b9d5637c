"""What support sees is safe: no API key (even one a store echoed into an error), no shopper's
address in a header, no terminal escape from a client id or a body, however the data came."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cscart_fm.cli.output import terminal_text
from cscart_fm.cli.wiring import open_state
from cscart_fm.core.observability import mask_email
from cscart_fm.support.dead_letters.masking import mask_payload

from .support.broker import shipment_event
from .support.console_helpers import login, make_console, served, store_letter
from .support.dlq_handlers import cli, logging_restored
from .support.pipeline import API_KEY, KEY_ENV, client_doc, write_clients_file

SHOPPER = "bob.secret@localhost"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with logging_restored():
        yield


@pytest.fixture
def state_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.sqlite'}"


def env(state_url: str, clients: Path | None) -> dict[str, str]:
    return {
        "CSCART_FM_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//",
        "CSCART_FM_STATE_URL": state_url,
        "CSCART_FM_CLIENTS": str(clients) if clients else "/nonexistent/clients.yaml",
        KEY_ENV: API_KEY,
    }


def leaky_letter(state_url: str, **headers: Any) -> int:
    """A dead letter whose headers carry the API key, as a store echoing the Authorization
    header once put it in ``cscart-last-reason``, and a shopper's e-mail."""
    store = open_state(state_url)
    try:
        return store_letter(
            store,
            shipment_event("S1", client_id="ACME"),
            **{"cscart-last-reason": f"store said: bad key {API_KEY}", "x-shopper": SHOPPER,
               **headers},
        )
    finally:
        store.close()


def test_dlq_show_never_prints_the_api_key(state_url: str, tmp_path: Path) -> None:
    letter = leaky_letter(state_url)
    clients = write_clients_file(tmp_path / "clients.yaml", [client_doc("http://127.0.0.1:9")])
    shown = cli(env(state_url, clients), "dlq", "show", str(letter), "--json", "--no-collect")
    assert shown.exit_code == 0, shown.output
    details = json.loads(shown.stdout)
    assert API_KEY not in shown.stdout
    assert details["headers"]["cscart-last-reason"] == "store said: bad key ***"
    assert details["headers"]["x-shopper"] == mask_email(SHOPPER) == "b***@localhost"
    revealed = cli(env(state_url, clients), "dlq", "show", str(letter), "--json", "--reveal",
                   "--no-collect")
    assert API_KEY not in revealed.stdout  # a key is never revealed
    assert SHOPPER in revealed.stdout  # personal data is, when asked (and audited)

    # Without the clients file the keys are unknown: the headers are not shown at all.
    blind = cli(env(state_url, None), "dlq", "show", str(letter), "--json", "--no-collect")
    assert blind.exit_code == 0, blind.output
    assert API_KEY not in blind.stdout
    assert list(json.loads(blind.stdout)["headers"]) == ["(hidden)"]


def test_the_console_without_its_clients_file_hides_the_headers(
    state_url: str, tmp_path: Path
) -> None:
    letter = leaky_letter(state_url)
    store = open_state(state_url)
    try:
        with served(make_console(store, tmp_path, clients=None)) as base:
            page = login(base, "victor").get(f"{base}/letters/{letter}", timeout=10).text
    finally:
        store.close()
    assert API_KEY not in page
    assert SHOPPER not in page
    assert "the clients file could not be read" in page


def test_terminal_escapes_are_printed_as_text(state_url: str) -> None:
    """A client id setting the window title and clearing the screen reached the terminal."""
    hostile = "ACME\x1b]0;pwned\x07\x1b[2J\u202e"
    store = open_state(state_url)
    try:
        letter = store_letter(store, shipment_event("S2", client_id=hostile),
                              **{"cscart-client-id": hostile, "schema": "x\x1b[31m"})
    finally:
        store.close()
    for args in (["list"], ["show", str(letter)], ["list", "--json"]):
        result = cli(env(state_url, None), "dlq", *args, "--no-collect")
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.stdout and "\x07" not in result.stdout
        assert "\u202e" not in result.stdout
    assert terminal_text(hostile) == "ACME\\x1b]0;pwned\\x07\\x1b[2J\\u202e"
    assert terminal_text("line 1\n\tline 2 é") == "line 1\n\tline 2 é"


def test_masking_catches_the_variants() -> None:
    body = {
        "Customer": {"Name": "Bob Secret", "Email": SHOPPER},
        "shipTo": {"address1": "1 Hidden St", "country": "AU"},
        "Notes": "gate code 1234",
        "lines": [{"sku": "Test001", "quantity": 2}],
        "giftMessage": {"to": "Alice", "text": "happy birthday"},  # not in the contract
        "contact": "jöhn.dœ@exämple.com",
    }
    masked = mask_payload(body)
    assert masked["Customer"] == {"Name": "B*** S***", "Email": "b***@localhost"}
    assert masked["shipTo"] == {"address1": "***", "country": "AU"}
    assert masked["Notes"] == "***"
    assert masked["lines"] == body["lines"]
    assert masked["giftMessage"] == {"to": "***", "text": "***"}
    assert masked["contact"] == "j***@exämple.com"
