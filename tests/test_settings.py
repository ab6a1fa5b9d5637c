"""The clients file: every kind of mistake is refused at start, naming the client and field."""

from __future__ import annotations

import os
import textwrap
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from cscart_fm.core.clients import SECRETS_DIR_ENV, load_clients
from cscart_fm.core.errors import SettingsError, UnknownClient

GOOD = """
clients:
  - client_id: ACME
    store_url: https://shop.acme.example/
    api_user: admin@acme.example
    api_key: ${ACME_CSCART_API_KEY}
    user_id: 1
    orders:
      statuses: [P, Complete]
      start_date: 22/11/2026
      timezone: Australia/Sydney
      prefix: CS
      countries: [au, NZ]
    tracking:
      update_tracking_number: true
      update_tracking_url: true
      shipped_status: C
      partially_shipped_status: null
    stock:
      update_stock: true
      quantity: available
      negative_as_zero: true
"""

ENV = {"ACME_CSCART_API_KEY": "k3y-from-env-0123456789"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "clients.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def refuse(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(SettingsError) as info:
        load_clients(write(tmp_path, text), ENV if env is None else env)
    return str(info.value)


def test_the_contract_example_loads(tmp_path: Path) -> None:
    clients = load_clients(write(tmp_path, GOOD), ENV)
    acme = clients.require("ACME")
    assert acme.store_url == "https://shop.acme.example"
    assert acme.api_key.get_secret_value() == ENV["ACME_CSCART_API_KEY"]
    assert "k3y" not in repr(acme) and "k3y" not in str(acme.model_dump())
    assert acme.orders.countries == ["AU", "NZ"]
    assert acme.orders.start_datetime == datetime(2026, 11, 22, tzinfo=ZoneInfo("Australia/Sydney"))
    assert acme.tracking.shipped_status == "C"
    assert acme.tracking.partially_shipped_status is None
    assert acme.stock.quantity == "available"
    assert acme.orders.test_skus == ["Test001", "Test002", "Test003"]


def test_api_key_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "ACME"
    secret.write_text("key-in-a-secret-volume\n")
    text = GOOD.replace("api_key: ${ACME_CSCART_API_KEY}", f"api_key_file: {secret}")
    acme = load_clients(write(tmp_path, text), {SECRETS_DIR_ENV: str(tmp_path)}).require("ACME")
    assert acme.api_key.get_secret_value() == "key-in-a-secret-volume"


def test_unknown_client_is_the_typed_error(tmp_path: Path) -> None:
    clients = load_clients(write(tmp_path, GOOD), ENV)
    with pytest.raises(UnknownClient, match="'NOPE' is not in the clients file"):
        clients.require("NOPE")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("start_date: 22/11/2026", "start_date: 2026-11-22"), "orders.start_date: expected a date as dd/MM/yyyy"),
        (("start_date: 22/11/2026", "start_date: 31/02/2026"), "orders.start_date: not a real date"),
        (("start_date: 22/11/2026", "start_date: 11/22/2026"), "orders.start_date"),
        (("quantity: available", "quantity: soh"), "stock.quantity: Input should be 'on_hand' or 'available'"),
        (("timezone: Australia/Sydney", "timezone: Sydney"), "orders.timezone: unknown time zone (use an IANA name"),
        (("countries: [au, NZ]", "countries: [Australia]"), "orders.countries: item 1 is not an ISO"),
        (("user_id: 1", "user_id: zero"), "user_id: Input should be a valid integer"),
        (("store_url: https://shop.acme.example/", "store_url: https://admin:pw@shop.acme.example"), "store_url: must not contain credentials"),
        (("store_url: https://shop.acme.example/", "store_url: shop.acme.example"), "store_url: expected an http(s) URL"),
        (("api_user: admin@acme.example", "api_user: admin"), "api_user: expected the e-mail"),
        (("shipped_status: C", "shiped_status: C"), "tracking.shiped_status: Extra inputs are not permitted"),
        (("api_key: ${ACME_CSCART_API_KEY}", "api_key: plain-text-key"), "api_key: must be ${ENV_NAME}"),
        (("api_key: ${ACME_CSCART_API_KEY}", "api_key: ${MISSING_KEY}"), "api_key: environment variable MISSING_KEY is not set"),
        (("api_key: ${ACME_CSCART_API_KEY}", "api_key_file: /etc/cscart-fm/secrets/NOPE"), "api_key_file: cannot read it (No such file or directory)"),
        (("    api_key: ${ACME_CSCART_API_KEY}\n", ""), "api_key: missing"),
        (("    user_id: 1\n", ""), "user_id: Field required"),
        (("statuses: [P, Complete]", "statuses: []"), "orders.statuses: List should have at least 1 item"),
    ],
)
def test_each_mistake_is_refused_naming_client_and_field(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    old, new = change
    assert old in GOOD
    message = refuse(tmp_path, GOOD.replace(old, new))
    assert f"client ACME: {expected}" in message


def test_every_mistake_is_listed_at_once_and_nothing_is_half_applied(tmp_path: Path) -> None:
    text = GOOD + textwrap.indent(
        textwrap.dedent(
            """
            - client_id: BETA
              store_url: https://beta.example
              api_user: ops@beta.example
              api_key: ${BETA_KEY}
              user_id: 7
              orders: {start_date: 1/13/2026}
              stock: {quantity: soh}
            """
        ),
        "  ",
    ).replace("  \n", "\n")
    message = refuse(tmp_path, text, {**ENV, "BETA_KEY": "x" * 12})
    assert "client BETA: orders.start_date" in message
    assert "client BETA: stock.quantity" in message
    assert "ACME" not in message  # the good client is not blamed


def test_duplicate_client_ids_are_refused(tmp_path: Path) -> None:
    body = GOOD.split("clients:\n", 1)[1]
    message = refuse(tmp_path, "clients:\n" + body + body)
    assert "client ACME: client_id: used by another client" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("clients: [\n", "not valid YAML at line"),
        ("something: else\n", "expected a top-level 'clients:' list"),
        ("clients:\n  - just-a-string\n", "clients[0]: expected a mapping"),
    ],
)
def test_a_broken_file_is_refused(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in refuse(tmp_path, text)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read it"):
        load_clients(tmp_path / "nope.yaml", ENV)


def test_no_secret_in_any_error_message(tmp_path: Path) -> None:
    text = GOOD.replace("user_id: 1", "user_id: -1")
    message = refuse(tmp_path, text)
    assert ENV["ACME_CSCART_API_KEY"] not in message


# --- a hostile or careless clients file (loopback-only, no value ever echoed) ------------------


def test_a_value_is_never_echoed_in_a_mistake(tmp_path: Path) -> None:
    text = (
        GOOD.replace("store_url: https://shop.acme.example/", "store_url: ftp://admin:hunter2@x")
        .replace("start_date: 22/11/2026", "start_date: s3cr3t-date")
        .replace("timezone: Australia/Sydney", "timezone: s3cr3t-zone")
        .replace("countries: [au, NZ]", "countries: [s3cr3t-country]")
    )
    message = refuse(tmp_path, text)
    assert "client ACME: store_url: expected an http(s) URL" in message
    for value in ("hunter2", "s3cr3t"):
        assert value not in message


def test_env_references_are_read_in_api_key_only(tmp_path: Path) -> None:
    """``store_url: ${KEY}`` once printed the key in its mistake: only api_key expands."""
    text = GOOD.replace("store_url: https://shop.acme.example/", "store_url: ${ACME_CSCART_API_KEY}")
    message = refuse(tmp_path, text)
    assert "client ACME: store_url: expected an http(s) URL" in message
    assert ENV["ACME_CSCART_API_KEY"] not in message
    text = GOOD.replace("prefix: CS", "prefix: ${ACME_CSCART_API_KEY}")
    acme = load_clients(write(tmp_path, text), ENV).require("ACME")
    assert acme.orders.prefix == "${ACME_CSCART_API_KEY}"  # plain text, not the key


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/proc/self/environ", "api_key_file: not inside the secrets directory"),
        ("/dev/zero", "api_key_file: not inside the secrets directory"),
        ("/etc/passwd", "api_key_file: not inside the secrets directory"),
    ],
)
def test_api_key_file_is_read_only_inside_the_secrets_directory(
    tmp_path: Path, target: str, expected: str
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    text = GOOD.replace("api_key: ${ACME_CSCART_API_KEY}", f"api_key_file: {target}")
    message = refuse(tmp_path, text, {SECRETS_DIR_ENV: str(secrets)})
    assert f"client ACME: {expected}" in message
    # A link inside the directory to somewhere else is resolved, and refused the same way.
    (secrets / "ACME").symlink_to(target)
    text = GOOD.replace("api_key: ${ACME_CSCART_API_KEY}", f"api_key_file: {secrets / 'ACME'}")
    assert f"client ACME: {expected}" in refuse(tmp_path, text, {SECRETS_DIR_ENV: str(secrets)})


def test_api_key_file_must_be_a_small_regular_file(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    (secrets / "dir").mkdir(parents=True)
    (secrets / "big").write_bytes(b"k" * 5000)
    os.mkfifo(secrets / "fifo")  # would block a read forever
    env = {SECRETS_DIR_ENV: str(secrets)}
    for name, expected in [
        ("dir", "not a regular file"),
        ("fifo", "not a regular file"),
        ("big", "larger than 4096 bytes"),
    ]:
        text = GOOD.replace("api_key: ${ACME_CSCART_API_KEY}", f"api_key_file: {secrets / name}")
        assert f"client ACME: api_key_file: {expected}" in refuse(tmp_path, text, env)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    """590 bytes of anchors expand to billions of items with a plain YAML loader."""
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for index in range(1, 9):
        name, previous = chr(ord("a") + index), chr(ord("a") + index - 1)
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    lines.append("clients: []")
    bomb = "\n".join(lines) + "\n"
    assert len(bomb) < 700
    started = time.monotonic()
    message = refuse(tmp_path, bomb)
    assert time.monotonic() - started < 5  # refused, not expanded
    assert "not valid YAML at line 1: anchors and aliases (&, *) are not allowed" in message


def test_a_repeated_key_is_refused(tmp_path: Path) -> None:
    text = GOOD.replace("prefix: CS", "prefix: CS\n      prefix: XX")
    message = refuse(tmp_path, text)
    assert "not valid YAML at line" in message
    assert "a key is given twice in one mapping" in message


def test_an_oversized_file_is_refused_unread(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "#" + "x" * (1024 * 1024) + "\n")
    with pytest.raises(SettingsError, match="larger than 1024 KiB"):
        load_clients(path, ENV)


def test_a_client_id_that_is_not_plain_is_not_printed(tmp_path: Path) -> None:
    text = GOOD.replace("client_id: ACME", 'client_id: "AC\\x1b]0;pwned\\x07ME"').replace(
        "user_id: 1", "user_id: -1"
    )
    message = refuse(tmp_path, text)
    assert "client #1: user_id" in message
    assert "\x1b" not in message
