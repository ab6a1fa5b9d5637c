"""The console as an attacker and a careless operator found it: no redirect off the console
however the path is spelled, a Secure cookie and HSTS unless it serves loopback only, no
Python version in its answers, and HEAD answered like GET."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from cscart_fm.cli.console import _is_public
from cscart_fm.cli.wiring import open_state
from cscart_fm.core.state import StateStore
from cscart_fm.support.console.auth import (
    Accounts,
    LoginThrottle,
    PasswordHash,
    User,
    dummy_like,
    hash_password,
)
from cscart_fm.support.console.http import safe_next

from .support.console_helpers import PASSWORDS, make_console, served


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    opened = open_state(f"sqlite:///{tmp_path / 'state.sqlite'}")
    yield opened
    opened.close()


@pytest.mark.parametrize(
    "target",
    [
        "/\t/evil.example",  # GET /login?next=/%09/evil.example: a browser reads //evil.example
        "/\n/evil.example",
        "/ /evil.example",
        "//evil.example",
        "/\\evil.example",
        "/\\/evil.example",
        "https://evil.example/",
        "/é/../..",
        "/a\x00b",
    ],
)
def test_login_never_redirects_off_the_console(target: str) -> None:
    assert safe_next(target) == "/"


def test_login_keeps_a_plain_path() -> None:
    assert safe_next("/letters?client=ACME&status=open") == "/letters?client=ACME&status=open"
    assert safe_next("/letters/12") == "/letters/12"


def test_the_tab_redirect_over_http(store: StateStore, tmp_path: Path) -> None:
    with served(make_console(store, tmp_path)) as base:
        http = requests.Session()
        page = http.get(f"{base}/login", params={"next": "/\t/evil.example"}, timeout=10)
        token = page.text.split('name="login_token" value="')[1].split('"')[0]
        answer = http.post(
            f"{base}/login",
            data={"username": "olivia", "password": PASSWORDS["olivia"], "login_token": token,
                  "next": "/\t/evil.example"},
            headers={"Origin": base}, allow_redirects=False, timeout=30,
        )
    assert answer.status_code == 303
    assert answer.headers["Location"] == "/"


def test_headers_name_no_python_and_head_answers_like_get(
    store: StateStore, tmp_path: Path
) -> None:
    with served(make_console(store, tmp_path)) as base:
        got = requests.get(f"{base}/login", timeout=10)
        head = requests.head(f"{base}/login", timeout=10)
        health = requests.head(f"{base}/healthz", timeout=10)
    assert "Python" not in got.headers.get("Server", "")
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["Content-Length"] == got.headers["Content-Length"]
    assert health.status_code == 200
    assert "Strict-Transport-Security" not in got.headers  # plain HTTP on loopback


def test_https_consoles_send_hsts_and_secure_cookies(store: StateStore, tmp_path: Path) -> None:
    with served(make_console(store, tmp_path, secure_cookie=True)) as base:
        page = requests.get(f"{base}/login", timeout=10)
    assert page.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert "Secure" in page.headers["Set-Cookie"]


@pytest.mark.parametrize(
    ("host", "public"),
    [("127.0.0.1", False), ("::1", False), ("localhost", False), ("0.0.0.0", True),  # noqa: S104
     ("10.1.2.3", True), ("console.internal", True)],
)
def test_the_secure_cookie_is_on_unless_the_console_serves_loopback(
    host: str, public: bool
) -> None:
    assert _is_public(host) is public


def test_parallel_guesses_are_counted_before_any_hash(store: StateStore, tmp_path: Path) -> None:
    """30 wrong passwords at once: 28 were checked (limit 5) and the console grew to 518 MB."""
    console = make_console(store, tmp_path)
    checked: list[str] = []
    original = console.accounts.check_password

    def counting(name: str, password: str) -> User | None:
        checked.append(name)
        time.sleep(0.2)  # as slow as scrypt, so the guesses overlap
        return original(name, password)

    console.accounts.check_password = counting  # type: ignore[method-assign]
    with served(console) as base:
        def guess(_: int) -> int:
            http = requests.Session()
            page = http.get(f"{base}/login", timeout=10)
            token = page.text.split('name="login_token" value="')[1].split('"')[0]
            return http.post(
                f"{base}/login",
                data={"username": "olivia", "password": "wrong", "login_token": token},
                headers={"Origin": base}, allow_redirects=False, timeout=60,
            ).status_code

        with ThreadPoolExecutor(30) as pool:
            codes = list(pool.map(guess, range(30)))
    assert len(checked) == 5  # the pair's limit, however many came at once
    assert codes.count(401) == 5 and codes.count(429) == 25


def test_a_guesser_elsewhere_does_not_lock_the_user_out() -> None:
    now = [0.0]
    throttle = LoginThrottle(clock=lambda: now[0])
    for _ in range(40):  # two addresses guessing olivia's password for a while
        for address in ("203.0.113.7", "203.0.113.8"):
            throttle.begin("olivia", address)
        now[0] += 1
    assert throttle.begin("olivia", "198.51.100.4") <= throttle.name_pace  # slowed, not locked
    now[0] += throttle.name_pace
    assert throttle.begin("olivia", "198.51.100.4") == 0
    throttle.succeeded("olivia", "198.51.100.4")


def test_an_unknown_name_costs_what_the_costliest_user_costs() -> None:
    strong = PasswordHash.parse(hash_password("pw-1234567890"))  # the default settings
    stronger = dummy_like([strong, _scrypt_hash("pw", n=2**15)])
    assert stronger.params == (2**15, 8, 1)
    assert dummy_like([]).params == (2**14, 8, 1)
    accounts = Accounts(users={"a": (User("a", "viewer"), _scrypt_hash("pw", n=2**15))})
    assert accounts._dummy is not None and accounts._dummy.params == (2**15, 8, 1)


def _scrypt_hash(password: str, *, n: int) -> PasswordHash:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=8, p=1, dklen=32,
                            maxmem=256 * n * 8)
    return PasswordHash("scrypt", (n, 8, 1), salt, digest)
