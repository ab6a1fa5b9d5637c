"""The support console over HTTP: the real server on a free port, a real state store (SQLite,
and PostgreSQL where storage matters), requests as a browser sends them.

The broker's side (collecting, publishing replays) is replaced by recorders here, except in
the last test, which uses the real consumer runtime on kombu's in-process broker and on
RabbitMQ (``bus_url``); the browser test (``test_console_browser.py``) goes through all of it
in headless Chromium.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
import yaml

from cscart_fm.cli.wiring import open_state
from cscart_fm.core.state import StateStore, UtcDateTime
from cscart_fm.support.console.auth import (
    ConsoleSettingsError,
    LoginThrottle,
    PasswordHash,
    Sessions,
    User,
    load_accounts,
)
from cscart_fm.support.dead_letters import audit
from cscart_fm.support.dead_letters import store as dl
from cscart_fm.support.dead_letters.audit import Actor
from cscart_fm.support.dead_letters.collect import collect, record_of
from cscart_fm.support.dead_letters.desk import MAX_BULK

from .support.broker import shipment_event, wait_for
from .support.console_helpers import (
    PASSWORDS,
    RecordingReplayer,
    csrf_of,
    login,
    make_console,
    post,
    runtime_headers,
    served,
    store_letter,
    write_users,
)
from .support.dlq_handlers import cli, logging_restored, order_imported_body, stock_event
from .support.pipeline import REPO

PERSONAL = ("jane@example.com", "Jane Citizen", "1 George St", "Sydney", "400 000 123", "Ring Jane")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with logging_restored():
        yield


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.sqlite'}"


@pytest.fixture
def store(sqlite_url: str) -> Iterator[StateStore]:
    opened = open_state(sqlite_url)
    yield opened
    opened.close()


def audit_rows(store: StateStore, action: str | None = None) -> list[audit.Entry]:
    return [e for e in audit.page(store, limit=1000)[0] if action is None or e.action == action]


# --- who may use it ---------------------------------------------------------------------------------


def test_start_is_refused_without_users_and_with_mistakes_in_them(tmp_path: Path) -> None:
    env = {
        "CSCART_FM_STATE_URL": f"sqlite:///{tmp_path / 's.sqlite'}",
        "CSCART_FM_CLIENTS": "/nonexistent/clients.yaml",
        "CSCART_FM_CONSOLE_USERS": "",
        "CSCART_FM_CONSOLE_TOKENS": "",
    }
    nobody = cli(env, "console", "--port", "0")
    assert nobody.exit_code == 2
    assert "the console has no users" in nobody.stderr
    assert "never starts with a default login" in nobody.stderr

    bad = tmp_path / "bad-users.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "users": [
                    {"name": "ann", "role": "admin", "password_hash": "scrypt$n=16384,r=8,p=1$x$y"},
                    {"name": "bob", "role": "viewer", "password_hash": "hunter2"},
                    {"name": "carl", "role": "viewer"},
                    {
                        "name": "dee",
                        "role": "viewer",
                        "password_hash": "pbkdf2_sha256$1000$c2FsdHNhbHQ$" + "A" * 43,
                    },
                ]
            }
        )
    )
    wrong = cli({**env, "CSCART_FM_CONSOLE_USERS": str(bad)}, "console", "--port", "0")
    assert wrong.exit_code == 2
    lines = wrong.stderr
    assert "user 1 (ann): role: expected viewer or operator, got 'admin'" in lines
    assert "user 1 (ann): password_hash: " in lines
    assert "user 2 (bob): password_hash: expected scrypt$" in lines
    assert "user 3 (carl): password_hash: missing" in lines
    assert "user 4 (dee): password_hash: pbkdf2_sha256 needs 100000" in lines
    assert "hunter2" not in lines

    missing = cli({**env, "CSCART_FM_CONSOLE_USERS": str(tmp_path / "nope.yaml")}, "console")
    assert missing.exit_code == 2 and "cannot read the users file" in missing.stderr

    short = cli({**env, "CSCART_FM_CONSOLE_TOKENS": "bot:operator:Tok3nTooShort"}, "console")
    assert short.exit_code == 2 and "at least 32 characters" in short.stderr
    assert "Tok3nTooShort" not in short.output  # a token is never echoed


def test_hash_password_makes_hashes_the_console_accepts(tmp_path: Path) -> None:
    env = {"CSCART_FM_CLIENTS": "/nonexistent"}
    made = cli(
        env,
        "console",
        "hash-password",
        "--stdin",
        "--name",
        "ann",
        "--role",
        "operator",
        stdin="a long enough passphrase\n",
    )
    assert made.exit_code == 0, made.output
    assert "a long enough passphrase" not in made.stdout
    users = tmp_path / "users.yaml"
    users.write_text("users:\n" + made.stdout)
    accounts = load_accounts({"CSCART_FM_CONSOLE_USERS": str(users)})
    assert accounts.check_password("ann", "a long enough passphrase") == User("ann", "operator")
    assert accounts.check_password("ann", "a long enough passphrasE") is None
    assert accounts.check_password("nobody", "a long enough passphrase") is None

    plain = cli(env, "console", "hash-password", "--stdin", stdin="another passphrase!\n")
    assert plain.exit_code == 0 and plain.stdout.startswith("scrypt$n=16384,r=8,p=1$")
    assert PasswordHash.parse(plain.stdout.strip()).verify("another passphrase!")
    weak = cli(env, "console", "hash-password", "--stdin", stdin="short\n")
    assert weak.exit_code == 2 and "too short" in weak.stderr


def test_unauthenticated_requests_are_refused(store: StateStore, tmp_path: Path) -> None:
    letter_id = store_letter(store, shipment_event("S-1"))
    replayer = RecordingReplayer(store)
    with served(make_console(store, tmp_path, replayer=replayer)) as base:
        for path in ("/", "/letters?client=ACME", f"/letters/{letter_id}", "/orders", "/audit"):
            answer = requests.get(base + path, allow_redirects=False, timeout=10)
            assert answer.status_code == 303, path
            assert answer.headers["Location"].startswith("/login?next=%2F")
            assert "S-1" not in answer.text
        for path in (
            f"/letters/{letter_id}/replay",
            f"/letters/{letter_id}/discard",
            f"/letters/{letter_id}/reveal",
            "/letters/replay",
            "/logout",
        ):
            answer = requests.post(
                base + path,
                data={"reason": "x", "confirm": "yes", "ids": str(letter_id)},
                headers={"Origin": base},
                allow_redirects=False,
                timeout=10,
            )
            assert answer.status_code == 401, path
        # A made-up session cookie or token is nobody.
        fake = requests.get(
            base + "/letters",
            cookies={"cscart_fm_console": "x" * 43},
            allow_redirects=False,
            timeout=10,
        )
        assert fake.status_code == 303
        bearer = requests.get(
            base + "/letters",
            headers={"Authorization": "Bearer " + "y" * 40},
            allow_redirects=False,
            timeout=10,
        )
        assert bearer.status_code == 303
        assert requests.get(base + "/healthz", timeout=10).text == "ok\n"
        assert requests.get(base + "/static/console.css", timeout=10).status_code == 200
    assert replayer.published == []
    assert dl.get(store, letter_id).status == "open"  # type: ignore[union-attr]


def test_wrong_password_is_refused_audited_and_throttled(store: StateStore, tmp_path: Path) -> None:
    with served(make_console(store, tmp_path)) as base:
        for _ in range(2):
            with pytest.raises(AssertionError, match="Wrong name or password"):
                login(base, "olivia", "not her password")
        with pytest.raises(AssertionError, match="Wrong name or password"):
            login(base, "mallory", "anything at all")
        failed = audit_rows(store, "login-failed")
        assert {e.who for e in failed} == {"olivia", "mallory"} and len(failed) == 3
        assert all("not her password" not in (e.target + e.result) for e in failed)
        for _ in range(3):
            with pytest.raises(AssertionError):
                login(base, "olivia", "still wrong")
        # Five failures for this name: even the right password waits now.
        with pytest.raises(AssertionError, match="Too many failed logins"):
            login(base, "olivia")
        # Another user from the same address is not locked out by olivia's failures.
        http = login(base, "victor")
        assert "victor (viewer)" in http.get(base + "/", timeout=10).text
    assert [e.who for e in audit_rows(store, "login")] == ["victor"]


def test_throttle_and_sessions_expire() -> None:
    now = [1000.0]
    throttle = LoginThrottle(per_pair=2, per_address=3, per_name=3, name_pace=10, window=60,
                             clock=lambda: now[0])
    assert throttle.begin("ann", "10.0.0.1") == 0
    assert throttle.begin("ANN", "10.0.0.1") == 0
    assert throttle.begin("ann", "10.0.0.1") == pytest.approx(60)  # this pair waits
    assert throttle.begin("ann", "10.0.0.2") == 0  # the same name elsewhere does not
    # Three failures for the name from anywhere: slowed to one try every 10 s, not locked.
    assert throttle.begin("ann", "10.0.0.9") == pytest.approx(10)
    now[0] += 10
    assert throttle.begin("ann", "10.0.0.9") == 0
    now[0] += 61
    assert throttle.begin("ann", "10.0.0.1") == 0

    sessions = Sessions(idle=10, maximum=30, clock=lambda: now[0])
    session = sessions.create(User("ann", "viewer"))
    assert len(session.id) >= 43 and session.id != session.csrf
    now[0] += 9
    assert sessions.get(session.id) is session
    now[0] += 11
    assert sessions.get(session.id) is None  # idle too long
    kept = sessions.create(User("ann", "viewer"))
    for _ in range(3):
        now[0] += 8
        assert sessions.get(kept.id) is kept
    now[0] += 8
    assert sessions.get(kept.id) is None  # too old, however active


def test_login_form_forgery_is_refused(store: StateStore, tmp_path: Path) -> None:
    with served(make_console(store, tmp_path)) as base:
        # Another site's form: no login cookie (SameSite=Strict), a token it guessed.
        forged = requests.post(
            base + "/login",
            data={"username": "olivia", "password": PASSWORDS["olivia"], "login_token": "guess"},
            headers={"Origin": "https://evil.example"},
            allow_redirects=False,
            timeout=30,
        )
        assert forged.status_code == 403 and "cscart_fm_console=" not in forged.headers.get(
            "Set-Cookie", ""
        )
        # The right cookie and token, from another origin.
        http = requests.Session()
        page = http.get(base + "/login", timeout=10)
        token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        cross = http.post(
            base + "/login",
            data={"username": "olivia", "password": PASSWORDS["olivia"], "login_token": token},
            headers={"Origin": "https://evil.example"},
            allow_redirects=False,
            timeout=30,
        )
        assert cross.status_code == 403
        # An open redirect through next= is not possible.
        http = login(base, "olivia")
        page = http.get(base + "/login?next=//evil.example/x", allow_redirects=False, timeout=10)
        assert page.headers["Location"] == "/"


def test_session_cookie_is_random_httponly_strict_and_ends_at_logout(
    store: StateStore, tmp_path: Path
) -> None:
    with served(make_console(store, tmp_path)) as base:
        first, second = login(base, "olivia"), login(base, "olivia")
        cookies = [first.cookies["cscart_fm_console"], second.cookies["cscart_fm_console"]]
        assert cookies[0] != cookies[1] and len(cookies[0]) >= 43
        raw = requests.Session()
        page = raw.get(base + "/login", timeout=10)
        token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        answer = raw.post(
            base + "/login",
            data={"username": "olivia", "password": PASSWORDS["olivia"], "login_token": token},
            allow_redirects=False,
            timeout=30,
        )
        set_cookie = answer.headers["Set-Cookie"]
        assert "cscart_fm_console=" in set_cookie
        assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
        overview = first.get(base + "/", timeout=10)
        assert "script" not in overview.headers["Content-Security-Policy"].replace(
            "default-src 'none'", ""
        )
        assert "<script" not in overview.text
        assert overview.headers["X-Frame-Options"] == "DENY"
        assert overview.headers["Cache-Control"] == "no-store"

        out = post(first, base, "/logout")
        assert out.status_code == 303 and out.headers["Location"] == "/login"
        assert first.get(base + "/", allow_redirects=False, timeout=10).status_code == 303
        assert second.get(base + "/", allow_redirects=False, timeout=10).status_code == 200
    assert [e.action for e in audit_rows(store)][:1] == ["logout"]


def test_tokens_from_the_environment(store: StateStore, tmp_path: Path) -> None:
    from cscart_fm.support.console.server import Console

    from .support.console_helpers import no_collect

    viewer_token, operator_token = "v" * 40, "o" * 40
    accounts = load_accounts(
        {
            "CSCART_FM_CONSOLE_TOKENS": f"watcher:viewer:{viewer_token}, bot:operator:{operator_token}"
        }
    )
    letter_id = store_letter(store, shipment_event("T-1"))
    replayer = RecordingReplayer(store)
    console = Console(
        store=store, accounts=accounts, broker_url="amqp://x", collect=no_collect, replayer=replayer
    )
    with served(console) as base:
        seen = requests.get(
            base + "/letters", headers={"Authorization": f"Bearer {viewer_token}"}, timeout=10
        )
        assert seen.status_code == 200 and "watcher (viewer)" in seen.text
        refused = requests.post(
            base + f"/letters/{letter_id}/replay",
            headers={"Authorization": f"Bearer {viewer_token}"},
            allow_redirects=False,
            timeout=10,
        )
        assert refused.status_code == 403
        done = requests.post(
            base + f"/letters/{letter_id}/replay",
            headers={"Authorization": f"Bearer {operator_token}"},
            allow_redirects=False,
            timeout=10,
        )
        assert done.status_code == 303
    assert replayer.calls == [[letter_id]]
    [entry] = audit_rows(store, "replay")
    assert entry.who == "bot" and entry.role == "operator"
    with pytest.raises(ConsoleSettingsError, match="already a user or another token"):
        load_accounts(
            {"CSCART_FM_CONSOLE_TOKENS": f"a:viewer:{viewer_token},a:viewer:{viewer_token}"}
        )


# --- roles and forgery ------------------------------------------------------------------------------


def test_a_viewer_sees_no_actions_and_cannot_act(store: StateStore, tmp_path: Path) -> None:
    letter_id = store_letter(store, order_imported_body())
    replayer = RecordingReplayer(store)
    with served(make_console(store, tmp_path, replayer=replayer)) as base:
        http = login(base, "victor")
        page = http.get(f"{base}/letters/{letter_id}", timeout=10).text
        for button in ('id="replay"', 'id="discard"', 'id="reveal"', "/replay", "/discard"):
            assert button not in page
        assert "read-only access" in page
        listing = http.get(f"{base}/letters", timeout=10).text
        assert 'id="replay-filtered"' not in listing
        token = csrf_of(page)  # the viewer's own, valid token: still refused
        for path, data in (
            (f"/letters/{letter_id}/replay", {}),
            (f"/letters/{letter_id}/discard", {"reason": "no"}),
            (f"/letters/{letter_id}/reveal", {}),
            ("/letters/replay", {"confirm": "yes", "ids": str(letter_id)}),
        ):
            answer = post(http, base, path, {**data, "csrf_token": token})
            assert answer.status_code == 403, path
            assert "Operators only" in answer.text
            for personal in PERSONAL:
                assert personal not in answer.text
    assert replayer.calls == []
    letter = dl.get(store, letter_id)
    assert letter is not None and letter.status == "open" and letter.replay_count == 0
    assert {e.action for e in audit_rows(store)} == {"login"}


def test_a_forged_post_without_or_with_a_wrong_csrf_token_is_refused(
    store: StateStore, tmp_path: Path
) -> None:
    letter_id = store_letter(store, shipment_event("F-1"))
    replayer = RecordingReplayer(store)
    with served(make_console(store, tmp_path, replayer=replayer)) as base:
        http = login(base, "olivia")
        other = login(base, "olivia")  # another session: its token is not this one's
        path = f"/letters/{letter_id}/replay"
        without = http.post(
            base + path, data={}, headers={"Origin": base}, allow_redirects=False, timeout=10
        )
        assert without.status_code == 403 and "CSRF" in without.text
        wrong = post(http, base, path, {"csrf_token": "x" * 43})
        assert wrong.status_code == 403
        borrowed = post(http, base, path, {"csrf_token": csrf_of(other.get(base, timeout=10).text)})
        assert borrowed.status_code == 403
        # The right token, but the page that sent it is on another site.
        token = csrf_of(http.get(base, timeout=10).text)
        cross = post(http, base, path, {"csrf_token": token}, origin="https://evil.example")
        assert cross.status_code == 403 and "another site" in cross.text
        referred = http.post(
            base + path,
            data={"csrf_token": token},
            headers={"Referer": "https://evil.example/page"},
            allow_redirects=False,
            timeout=10,
        )
        assert referred.status_code == 403
        discard = post(
            http, base, f"/letters/{letter_id}/discard", {"reason": "x", "csrf_token": "nope"}
        )
        assert discard.status_code == 403
        assert replayer.calls == [] and dl.get(store, letter_id).status == "open"  # type: ignore[union-attr]
        assert audit_rows(store, "replay") == []

        ok = post(http, base, path, {"csrf_token": token})
        assert ok.status_code == 303 and ok.headers["Location"] == f"/letters/{letter_id}"
    assert replayer.calls == [[letter_id]]


# --- personal data ------------------------------------------------------------------------------------


def test_personal_data_is_masked_by_default_and_a_reveal_is_audited(
    state_url: str, tmp_path: Path
) -> None:
    store = open_state(state_url)
    letter_id = store_letter(
        store,
        order_imported_body(),
        consumer="order-poll",
        **{"cscart-reason": "orders.get failed for jane@example.com", "schema": "order.imported/1"},
    )
    try:
        with served(make_console(store, tmp_path)) as base:
            http = login(base, "olivia")
            pages = [
                http.get(f"{base}/letters", timeout=10).text,
                http.get(f"{base}/letters?status=all&client=ACME", timeout=10).text,
                http.get(f"{base}/letters/{letter_id}", timeout=10).text,
                http.get(f"{base}/letters/{letter_id}?reveal=1", timeout=10).text,
                http.get(f"{base}/", timeout=10).text,
            ]
            for page in pages:
                for personal in PERSONAL:
                    assert personal not in page, personal
            shown = pages[2]
            assert "j***@example.com" in shown and "J*** C***" in shown
            assert "&#34;country&#34;: &#34;AU&#34;" in shown or '"country": "AU"' in shown
            assert "personal data (names, e-mails, phones, addresses) is masked" in shown

            revealed = post(
                http, base, f"/letters/{letter_id}/reveal", csrf_from=f"/letters/{letter_id}"
            )
            assert revealed.status_code == 200
            assert "jane@example.com" in revealed.text and "1 George St" in revealed.text
            assert "recorded in the" in revealed.text
            assert revealed.headers["Cache-Control"] == "no-store"
            again = http.get(f"{base}/letters/{letter_id}", timeout=10).text
            assert "jane@example.com" not in again
        [entry] = audit_rows(store, "reveal")
        assert (entry.who, entry.role, entry.letter_id) == ("olivia", "operator", letter_id)
        assert entry.result == "personal data shown"
        assert "jane" not in entry.target
    finally:
        store.close()


# --- the list: filters and paging ----------------------------------------------------------------------


def test_filters_and_paging(state_url: str, tmp_path: Path) -> None:
    store = open_state(state_url)
    try:
        ids: dict[str, list[int]] = {"acme": [], "beta": [], "stock": [], "old": []}
        for n in range(30):
            ids["acme"].append(store_letter(store, shipment_event(f"A{n:02}")))
        for n in range(12):
            ids["beta"].append(
                store_letter(
                    store,
                    shipment_event(f"B{n:02}", client_id="BETA"),
                    **{"cscart-client-id": "BETA", "cscart-error-type": "store-unauthorized"},
                )
            )
        for n in range(3):
            ids["stock"].append(
                store_letter(
                    store,
                    stock_event(f"snap-{n}", "NEW-1"),
                    consumer="stock-snapshot",
                    **{"schema": "stock.snapshot/1"},
                )
            )
        ids["old"].append(
            store_letter(
                store,
                shipment_event("OLD"),
                **{"cscart-dead-lettered-at": "2026-10-01T23:30:00+00:00"},
            )
        )
        dl.discard(store, ids["acme"][:5], reason="dup", by="test")

        with served(make_console(store, tmp_path)) as base:
            http = login(base, "victor")

            def listed(query: str) -> tuple[list[int], str]:
                page = http.get(f"{base}/letters?{query}", timeout=10)
                assert page.status_code == 200, page.text
                return [int(x) for x in re.findall(r'<tr id="letter-(\d+)"', page.text)], page.text

            first, text = listed("")
            assert len(first) == 25 and first == sorted(first, reverse=True)
            assert "of <strong>41</strong>" in text and 'id="older"' in text
            second, text = listed("page=2")
            assert len(second) == 16 and not set(first) & set(second)
            assert 'id="newer"' in text and 'id="older"' not in text
            assert len(listed("per_page=10&page=5")[0]) == 1

            assert sorted(listed("client=BETA")[0]) == ids["beta"]
            assert sorted(listed("type=store-unauthorized&per_page=50")[0]) == ids["beta"]
            assert sorted(listed("consumer=stock-snapshot")[0]) == ids["stock"]
            assert listed("consumer=stock-snapshot&client=BETA")[0] == []
            assert sorted(listed("status=discarded")[0]) == ids["acme"][:5]
            assert len(listed("status=all&per_page=100")[0]) == 46
            assert listed("until=2026-10-01")[0] == ids["old"]
            assert ids["old"][0] not in listed("since=2026-10-02&per_page=100")[0]
            # Paging links keep the filters.
            _, text = listed("client=ACME&per_page=5")
            assert "client=ACME" in re.search(r'href="([^"]+)" id="older"', text).group(1)  # type: ignore[union-attr]
            # Nonsense is said plainly, never a 500.
            _, text = listed("consumer=nope&since=yesterday&status=weird&page=x")
            assert "is not one of" in text and "is not a date" in text
    finally:
        store.close()


# --- actions ----------------------------------------------------------------------------------------


def test_discard_keeps_the_reason_and_is_audited(state_url: str, tmp_path: Path) -> None:
    store = open_state(state_url)
    try:
        letter_id = store_letter(store, shipment_event("D-1"))
        with served(make_console(store, tmp_path)) as base:
            http = login(base, "olivia")
            page = f"/letters/{letter_id}"
            blank = post(http, base, f"{page}/discard", {"reason": "   "}, csrf_from=page)
            assert blank.status_code == 303
            assert "Say why" in http.get(base + page, timeout=10).text
            assert dl.get(store, letter_id).status == "open"  # type: ignore[union-attr]

            done = post(
                http, base, f"{page}/discard", {"reason": "FM resent it as D-1b"}, csrf_from=page
            )
            assert done.status_code == 303
            shown = http.get(base + page, timeout=10).text
            assert "discarded" in shown and "FM resent it as D-1b" in shown
            assert 'id="discard"' not in shown  # nothing left to discard
            log_page = http.get(base + "/audit", timeout=10).text
            assert "FM resent it as D-1b" in log_page and "discard" in log_page
        letter = dl.get(store, letter_id)
        assert letter is not None
        assert (letter.status, letter.discard_reason, letter.discarded_by) == (
            "discarded",
            "FM resent it as D-1b",
            "olivia",
        )
        [entry] = audit_rows(store, "discard")
        assert (entry.who, entry.reason, entry.result, entry.letter_id) == (
            "olivia",
            "FM resent it as D-1b",
            "discarded",
            letter_id,
        )
        assert entry.at is not None and entry.remote_addr == "127.0.0.1"
    finally:
        store.close()


def test_replay_one_and_replay_filtered_are_confirmed_and_audited(
    store: StateStore, tmp_path: Path
) -> None:
    acme = [store_letter(store, shipment_event(f"R{n}")) for n in range(3)]
    beta = store_letter(
        store, shipment_event("RB", client_id="BETA"), **{"cscart-client-id": "BETA"}
    )
    replayer = RecordingReplayer(store)
    with served(make_console(store, tmp_path, replayer=replayer)) as base:
        http = login(base, "olivia")
        one = post(http, base, f"/letters/{acme[0]}/replay", csrf_from=f"/letters/{acme[0]}")
        assert one.status_code == 303
        page = http.get(base + f"/letters/{acme[0]}", timeout=10).text
        assert "the broker took it" in page and "status-replayed" in page
        assert 'http-equiv="refresh"' in page  # waits for the consumer by itself

        listing = http.get(base + "/letters?client=ACME", timeout=10).text
        assert "Replay the 2 open dead letter(s) matching these filters" in listing
        ask = post(
            http, base, "/letters/replay", {"client": "ACME"}, csrf_from="/letters?client=ACME"
        )
        assert ask.status_code == 200 and "Replay these 2 dead letter(s)" in ask.text
        assert replayer.calls == [[acme[0]]]  # nothing more until confirmed
        ids = re.search(r'name="ids" value="([^"]+)"', ask.text).group(1)  # type: ignore[union-attr]
        assert ids == f"{acme[1]},{acme[2]}"
        done = post(
            http,
            base,
            "/letters/replay",
            {"client": "ACME", "confirm": "yes", "ids": ids, "csrf_token": csrf_of(ask.text)},
        )
        assert done.status_code == 303
        assert (
            "Replayed 2 dead letter(s)"
            in http.get(base + done.headers["Location"], timeout=10).text
        )
        # Discarded ones are not replayed by accident; "Replay anyway" is explicit.
        dl.discard(store, [beta], reason="dup", by="t")
        refused = post(http, base, f"/letters/{beta}/replay", csrf_from=f"/letters/{beta}")
        assert refused.status_code == 303
        assert (
            "is discarded: nothing replayed" in http.get(base + f"/letters/{beta}", timeout=10).text
        )
    assert replayer.calls == [[acme[0]], [acme[1], acme[2]]]
    assert [json.loads(body)["shipment_ref"] for body, *_ in replayer.published] == [
        "R0",
        "R1",
        "R2",
    ]
    assert all(dl.get(store, i).status == "replayed" for i in acme)  # type: ignore[union-attr]
    assert dl.get(store, beta).status == "discarded"  # type: ignore[union-attr]
    [single] = audit_rows(store, "replay")
    assert single.letter_id == acme[0] and single.result == "replayed: confirmed by the broker"
    [bulk] = audit_rows(store, "replay-filtered")
    assert "client ACME" in bulk.target and f"{acme[1]}, {acme[2]}" in bulk.target
    assert bulk.result == "replayed 2" and bulk.who == "olivia"


def test_a_replay_the_broker_does_not_take_stays_open_and_says_so(
    store: StateStore, tmp_path: Path
) -> None:
    letter_id = store_letter(store, shipment_event("NB-1"))
    console = make_console(store, tmp_path, replay_patience=0.5)  # the real replay, no broker
    with served(console) as base:
        http = login(base, "olivia")
        answer = post(http, base, f"/letters/{letter_id}/replay", csrf_from=f"/letters/{letter_id}")
        assert answer.status_code == 303
        page = http.get(base + f"/letters/{letter_id}", timeout=10).text
        assert "Not replayed" in page and "cannot be reached" in page
    assert dl.get(store, letter_id).status == "open"  # type: ignore[union-attr]
    [entry] = audit_rows(store, "replay")
    assert entry.result.startswith("failed: ")


def test_the_list_says_when_the_broker_cannot_be_reached(store: StateStore, tmp_path: Path) -> None:
    store_letter(store, shipment_event("OFF-1"))
    console = make_console(store, tmp_path, collect=collect)  # broker at 127.0.0.1:1: refused
    with served(console) as base:
        page = login(base, "victor").get(base + "/letters", timeout=30).text
    assert "Could not collect new dead letters" in page and "showing what is stored" in page
    assert "OFF-1" not in page and "not-found" in page  # the stored one is listed


def test_a_filtered_replay_takes_at_most_the_desks_cap_from_the_console_and_the_cli(
    store: StateStore, sqlite_url: str, tmp_path: Path
) -> None:
    """The cap is the desk's: the console's confirmation and ``dlq replay --dry-run`` take the
    same oldest ones and say the same about the rest."""
    with store.transaction() as conn:
        for n in range(MAX_BULK + 1):
            body = json.dumps(shipment_event(f"CAP{n:03}")).encode()
            row = record_of("shipment-lodged", body, runtime_headers(), {"message_id": f"e{n}"})
            assert store.insert_ignore(conn, dl.dead_letters, row)
    oldest = dl.find_ids(store, dl.Filter(), limit=MAX_BULK)
    rest = (
        f"1 more match: at most {MAX_BULK} are replayed at once (oldest first); "
        "replay again afterwards for the rest."
    )
    replayer = RecordingReplayer(store)
    with served(make_console(store, tmp_path, replayer=replayer)) as base:
        http = login(base, "olivia")
        ask = post(
            http, base, "/letters/replay", {"client": "ACME"}, csrf_from="/letters?client=ACME"
        )
        assert ask.status_code == 200 and rest in ask.text
        ids = re.search(r'name="ids" value="([^"]+)"', ask.text).group(1)  # type: ignore[union-attr]
        assert ids == ",".join(map(str, oldest))
    env = {
        "CSCART_FM_STATE_URL": sqlite_url,
        "CSCART_FM_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//",
        "CSCART_FM_CLIENTS": "/nonexistent/clients.yaml",
    }
    dry = cli(env, "dlq", "replay", "--client", "ACME", "--dry-run", "--no-collect")
    assert dry.exit_code == 0, dry.output
    assert f"{MAX_BULK} dead letter(s) would be replayed." in dry.stdout and rest in dry.stdout
    as_json = cli(env, "dlq", "replay", "--all", "--dry-run", "--no-collect", "--json")
    assert json.loads(as_json.stdout) == {"would_replay": oldest}
    assert replayer.calls == []


def test_an_audit_log_from_before_the_command_line_was_audited_is_migrated(
    state_url: str,
) -> None:
    """The table as the console alone wrote it (no ``via``): opening the store adds the
    column, its rows came from the console, and opening it again changes nothing."""
    before = sa.Table(
        "console_audit",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", UtcDateTime(), nullable=False),
        sa.Column("who", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("letter_id", sa.Integer, nullable=True),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("result", sa.Text, nullable=False),
        sa.Column("remote_addr", sa.String(64), nullable=True),
    )
    engine = sa.create_engine(state_url)
    with engine.begin() as conn:
        before.create(conn)
        conn.execute(
            before.insert().values(
                at=datetime(2026, 11, 23, 4, tzinfo=UTC),
                who="olivia",
                role="operator",
                action="discard",
                letter_id=7,
                target="dead letter 7",
                result="discarded",
                remote_addr="10.0.0.5",
            )
        )
    engine.dispose()
    for _ in range(2):
        store = open_state(state_url)
        try:
            audit.start(store, Actor("alice"), action="discard", target="x", result="discarded")
            entries = audit.page(store)[0]
        finally:
            store.close()
    assert [(e.who, e.via) for e in entries] == [
        ("alice", "cli"),
        ("alice", "cli"),
        ("olivia", "console"),
    ]
    assert entries[-1].remote_addr == "10.0.0.5"


# --- the dead-letter page in plain words -----------------------------------------------------------


def test_a_dead_letter_page_says_what_happened_what_to_do_and_its_history(
    store: StateStore, tmp_path: Path
) -> None:
    letter_id = store_letter(
        store,
        shipment_event("H-1"),
        **{
            "cscart-error-type": "store-unreachable",
            "cscart-reason": "gave up after 3 attempts: orders.get: HTTP 503",
            "cscart-action": "Check the store is up, then replay.",
            "cscart-attempts": 3,
            "x-death": [
                {
                    "queue": "cscart.shipment-lodged.retry.5s",
                    "reason": "expired",
                    "count": 2,
                    "time": "2026-11-23T03:59:00+00:00",
                    "exchange": "",
                    "routing-keys": ["x"],
                },
            ],
        },
    )
    with served(make_console(store, tmp_path)) as base:
        page = login(base, "victor").get(base + f"/letters/{letter_id}", timeout=10).text
    assert "What happened" in page and "What to do" in page
    assert (
        "The shipment-lodged consumer could not process this shipment.lodged message for "
        "client ACME: the store did not answer."
    ) in page
    assert "gave up after 3 attempts: orders.get: HTTP 503" in page
    assert "retried automatically; it was dead-lettered after 3 attempt(s) failed" in page
    assert "Check the store is up, then replay." in page
    assert "waited out its retry delay in cscart.shipment-lodged.retry.5s" in page
    assert "(2 times)" in page
    assert "Collected into the state store." in page


# --- overview and order lookup ----------------------------------------------------------------------


def test_overview_per_client(state_url: str, tmp_path: Path) -> None:
    from consumers.order_poll import tables as op
    from consumers.shipment_lodged.handler import pushed_shipments
    from consumers.stock_snapshot.handler import stock_reports
    from cscart_fm.core.clients import parse_clients

    from .support.pipeline import API_KEY, KEY_ENV, client_doc

    now = datetime.now(UTC)
    clients = parse_clients(
        {
            "clients": [
                client_doc("http://127.0.0.1:9", "ACME"),
                client_doc(
                    "http://127.0.0.1:9",
                    "SLOW",
                    orders={"poll_interval_seconds": 60, "timezone": "Australia/Sydney"},
                ),
            ]
        },
        {KEY_ENV: API_KEY},
    )
    store = open_state(state_url)
    try:

        def poll_row(cid: str, at: datetime) -> dict[str, Any]:
            return {
                "client_id": cid,
                "updated_mark": None,
                "start_key": "k",
                "filter_key": "f",
                "last_mode": "full",
                "last_started_at": at,
                "last_success_at": at,
            }

        def order_row(cid: str, n: int, at: datetime, state: str = "published") -> dict[str, Any]:
            return {
                "client_id": cid,
                "cart_order_id": n,
                "order_no": f"CS{n}",
                "event_id": f"e{n}",
                "state": state,
                "payload": None,
                "cart_status": "P",
                "placed_at": at,
                "claimed_at": at,
                "published_at": at if state == "published" else None,
            }

        with store.transaction() as conn:
            conn.execute(
                op.poll_watermarks.insert(),
                [
                    poll_row("ACME", now - timedelta(minutes=2)),
                    poll_row("SLOW", now - timedelta(hours=3)),
                ],
            )
            conn.execute(
                op.imported_orders.insert(),
                [
                    order_row("ACME", 1, now - timedelta(minutes=5)),
                    order_row("ACME", 2, now - timedelta(minutes=1)),
                    order_row("ACME", 3, now - timedelta(days=3)),
                    order_row("ACME", 4, now, state="claimed"),
                ],
            )
            conn.execute(
                stock_reports.insert(),
                [
                    {
                        "client_id": "ACME",
                        "event_id": "s1",
                        "taken_at": now,
                        "items": 1,
                        "written": 1,
                        "unchanged": 0,
                        "unknown": 0,
                        "untracked": 0,
                        "stale": 0,
                        "refused": 0,
                        "unknown_skus": "",
                        "untracked_skus": "",
                        "refused_skus": "",
                        "attempt": 1,
                        "created_at": now - timedelta(minutes=7),
                    }
                ],
            )
            conn.execute(
                pushed_shipments.insert(),
                [
                    {
                        "client_id": "ACME",
                        "shipment_ref": "X1",
                        "cart_order_id": 1,
                        "shipment_id": 5,
                        "status_kind": "shipped",
                        "status_done": True,
                        "created_at": now - timedelta(minutes=9),
                        "updated_at": now,
                    },
                    {
                        "client_id": "ACME",
                        "shipment_ref": "X2",
                        "cart_order_id": 2,
                        "shipment_id": None,
                        "status_kind": None,
                        "status_done": False,
                        "created_at": now,
                        "updated_at": now,
                    },
                ],
            )
        store_letter(store, shipment_event("O-1"))
        store_letter(store, shipment_event("O-2", client_id="GONE"), **{"cscart-client-id": "GONE"})

        with served(make_console(store, tmp_path, clients=clients)) as base:
            http = login(base, "victor")
            page = http.get(base + "/", timeout=10).text

            def row(cid: str) -> str:
                return re.search(rf'<tr id="client-{cid}".*?</tr>', page, re.S).group(0)  # type: ignore[union-attr]

            acme = row("ACME")
            assert "stalled" not in acme and "(2 min ago)" in acme
            assert re.search(r'<td class="num">2\s*<br>', acme)  # two published today
            assert "(7 min ago)" in acme and "(9 min ago)" in acme
            assert '/letters?client=ACME">1</a>' in acme
            slow = row("SLOW")
            assert 'class="stalled"' in slow
            assert (
                "Order sync stalled: no successful poll for 3 h (it should poll every 60 s)" in slow
            )
            assert "since 00:00 Australia/Sydney" in slow
            gone = row("GONE")
            assert "not in the clients file" in gone and '/letters?client=GONE">1</a>' in gone
            assert 'id="open-total">2<' in page

            # A table missing (an older database): the column says so, the page still works.
            with store.transaction() as conn:
                conn.execute(sa.text("DROP TABLE stock_reports"))
            page = http.get(base + "/", timeout=10).text
            assert "Last stock snapshot applied: could not be read from the state store" in page
            assert '<tr id="client-ACME"' in page
    finally:
        store.close()


def test_order_lookup_shows_explain(sqlite_url: str, tmp_path: Path) -> None:
    from consumers.services import Services
    from cscart_emulator import StoreEmulator
    from cscart_fm.core.broker import Publisher
    from cscart_fm.core.clients import parse_clients

    from .support.pipeline import API_KEY, API_USER, KEY_ENV, client_doc

    with StoreEmulator(api_user=API_USER, api_key=API_KEY) as emu:
        emu.add_product("Test001", 5)
        emu.add_order(
            order_id=1000012, products=[{"product_code": "Test001", "amount": 1}], s_country="NZ"
        )
        clients = parse_clients(
            {"clients": [client_doc(emu.url, orders={"countries": ["AU"]})]}, {KEY_ENV: API_KEY}
        )
        store = open_state(sqlite_url)
        services = Services(
            clients=clients,
            state=store,
            publisher=Publisher("amqp://guest:guest@127.0.0.1:1//"),
        )
        try:
            console = make_console(store, tmp_path, clients=clients, services=services)
            with served(console) as base:
                http = login(base, "victor")
                page = http.get(base + "/orders?client=ACME&order=CS1000012", timeout=30).text
                assert "Order 1000012 of client ACME (order_no CS1000012)" in page
                assert "countries filter excludes it" in page
                assert "jane" not in page.lower()
                unknown = http.get(base + "/orders?client=NOPE&order=1", timeout=30).text
                assert 'id="lookup-error"' in unknown and "NOPE" in unknown
                bad = http.get(base + "/orders?client=ACME&order=XX12", timeout=30).text
                assert "neither a CS-Cart order id nor an order_no" in bad
        finally:
            services.close()


# --- the command itself ----------------------------------------------------------------------------


def test_cscart_fm_console_serves_until_sigterm(tmp_path: Path) -> None:
    users = write_users(tmp_path / "users.yaml")
    env = {
        **os.environ,
        "CSCART_FM_STATE_URL": f"sqlite:///{tmp_path / 's.sqlite'}",
        "CSCART_FM_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//",
        "CSCART_FM_CLIENTS": "/nonexistent/clients.yaml",
        "CSCART_FM_CONSOLE_USERS": str(users),
    }
    log_file = tmp_path / "console.log"
    with open(log_file, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cscart_fm.cli", "console", "--port", "0"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        found = wait_for(
            lambda: re.search(r"console on (http://127\.0\.0\.1:\d+)/", log_file.read_text()),
            timeout=30,
        )
        base = found.group(1)
        http = login(base, "olivia")
        assert "olivia (operator)" in http.get(base + "/letters", timeout=10).text
        assert "users: 1 operator(s), 1 viewer(s)" in log_file.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    assert code == 0, log_file.read_text()


def test_console_collects_from_the_broker_and_replays_through_it(
    bus_url: str, sqlite_url: str, tmp_path: Path
) -> None:
    """Collected from the .dlq queue when the page lists it; replayed with confirms; resolved
    by the consumer's success hook: on the in-process broker, and on RabbitMQ in the broker
    tier."""
    from cscart_fm.core.errors import NotFound
    from cscart_fm.support.dead_letters.resolve import DeadLetterResolver

    from .support.broker import declare, depth, publish_json, running
    from .support.dlq_handlers import Planned

    declare(bus_url)
    store = open_state(sqlite_url)
    handler = Planned({"BR-1": NotFound("orders.get: HTTP 404"), "BR-2": NotFound("HTTP 404")})
    console = make_console(
        store,
        tmp_path,
        broker_url=bus_url,
        retry_delays=(1,),
        collect=collect,
        collect_interval=0,
    )
    try:
        with (
            running(handler, bus_url, middleware=[DeadLetterResolver(store)]),
            served(console) as base,
        ):
            publish_json(bus_url, shipment_event("BR-1"), "shipment.lodged")
            publish_json(bus_url, shipment_event("BR-2", client_id="BETA"), "shipment.lodged")
            wait_for(lambda: depth(bus_url, "cscart.shipment-lodged.dlq") == 2)
            http = login(base, "olivia")
            listing = http.get(base + "/letters?client=ACME", timeout=30).text
            assert depth(bus_url, "cscart.shipment-lodged.dlq") == 0  # collected
            [letter_id] = [int(x) for x in re.findall(r'<tr id="letter-(\d+)"', listing)]
            handler.fix("BR-1")
            ask = post(
                http, base, "/letters/replay", {"client": "ACME"}, csrf_from="/letters?client=ACME"
            )
            done = post(
                http,
                base,
                "/letters/replay",
                {
                    "client": "ACME",
                    "confirm": "yes",
                    "csrf_token": csrf_of(ask.text),
                    "ids": re.search(r'name="ids" value="([^"]+)"', ask.text).group(1),  # type: ignore[union-attr]
                },
            )
            assert done.status_code == 303
            wait_for(lambda: handler.created == {"BR-1"})
            wait_for(
                lambda: (
                    "status-resolved" in http.get(base + f"/letters/{letter_id}", timeout=10).text
                )
            )
        assert [r.status for r in dl.find(store, dl.Filter(client_id="BETA"))] == ["open"]
    finally:
        store.close()
