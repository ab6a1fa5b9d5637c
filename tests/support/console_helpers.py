"""Helpers for the console tests: users files, a console served on a free port, a logged-in
HTTP session (as a browser would hold it), and dead letters stored as the collector stores
them."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import requests
import yaml

from cscart_fm.core.state import StateStore
from cscart_fm.support.console.auth import Accounts, hash_password, load_accounts
from cscart_fm.support.console.server import Console, serve
from cscart_fm.support.dead_letters import store as dl
from cscart_fm.support.dead_letters.collect import record_of
from cscart_fm.support.dead_letters.replay import ReplayReport, replay

PASSWORDS = {
    "olivia": "olivia-operator-passphrase",
    "victor": "victor-viewer-passphrase",
}
ROLES = {"olivia": "operator", "victor": "viewer"}


@cache
def _hash(password: str) -> str:
    return hash_password(password)


def write_users(path: Path, users: dict[str, tuple[str, str]] | None = None) -> Path:
    """A users file: name → (role, password); by default the operator olivia and the
    viewer victor."""
    if users is None:
        users = {name: (ROLES[name], PASSWORDS[name]) for name in PASSWORDS}
    document = {
        "users": [
            {"name": name, "role": role, "password_hash": _hash(password)}
            for name, (role, password) in users.items()
        ]
    }
    path.write_text(yaml.safe_dump(document))
    return path


def accounts_for(tmp_path: Path, **environ: str) -> Accounts:
    users = write_users(tmp_path / "console-users.yaml")
    return load_accounts({"CSCART_FM_CONSOLE_USERS": str(users), **environ})


def no_collect(_store: StateStore, _url: str) -> None:
    """The console's collection step, for tests whose dead letters are already stored."""


class RecordingReplayer:
    """Replays through the real ``dead_letters.replay.replay`` onto a publisher that only
    records."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.published: list[tuple[bytes, str, str, dict[str, Any]]] = []
        self.calls: list[list[int]] = []

    def publish_raw(
        self, body: bytes, *, exchange: str, routing_key: str, properties: dict[str, Any]
    ) -> None:
        self.published.append((body, exchange, routing_key, properties))

    def __call__(self, letters: Sequence[dl.DeadLetter]) -> ReplayReport:
        self.calls.append([letter.id for letter in letters])
        return replay(self.store, self, letters, patience=1)  # type: ignore[arg-type]


@contextmanager
def served(console: Console) -> Iterator[str]:
    """The console on a free port of 127.0.0.1 for the block; yields its base URL."""
    server = serve(console, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def make_console(
    store: StateStore, tmp_path: Path, *, replayer: Callable[..., Any] | None = None, **kw: Any
) -> Console:
    kw.setdefault("broker_url", "amqp://guest:guest@127.0.0.1:1//")
    kw.setdefault("collect", no_collect)
    return Console(store=store, accounts=accounts_for(tmp_path), replayer=replayer, **kw)


_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_LOGIN_TOKEN = re.compile(r'name="login_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found, "no CSRF token on the page"
    return found.group(1)


def login(base: str, name: str, password: str | None = None) -> requests.Session:
    """Log in through the form as a browser does; the session holds the cookie."""
    http = requests.Session()
    page = http.get(f"{base}/login", timeout=10)
    token = _LOGIN_TOKEN.search(page.text)
    assert token, page.text
    answer = http.post(
        f"{base}/login",
        data={
            "username": name,
            "password": PASSWORDS.get(name, "") if password is None else password,
            "login_token": token.group(1),
            "next": "/",
        },
        headers={"Origin": base},
        allow_redirects=False,
        timeout=30,
    )
    assert answer.status_code == 303, answer.text
    return http


def post(
    http: requests.Session,
    base: str,
    path: str,
    data: dict[str, str] | None = None,
    *,
    csrf_from: str | None = None,
    origin: str | None = "same",
) -> requests.Response:
    """A form POST with the CSRF token of the page at ``csrf_from`` (default: ``/``)."""
    form = dict(data or {})
    if csrf_from is not None or "csrf_token" not in form:
        form.setdefault("csrf_token", csrf_of(http.get(base + (csrf_from or "/"), timeout=10).text))
    headers = {} if origin is None else {"Origin": base if origin == "same" else origin}
    return http.post(base + path, data=form, headers=headers, allow_redirects=False, timeout=30)


# --- dead letters as the collector stores them --------------------------------------------------


def runtime_headers(**extra: Any) -> dict[str, Any]:
    return {
        "schema": "shipment.lodged/1",
        "cscart-error-type": "not-found",
        "cscart-reason": "orders.get: HTTP 404 Not Found (order 1000012)",
        "cscart-action": "Create the order in the store, then replay.",
        "cscart-consumer": "shipment-lodged",
        "cscart-attempts": 1,
        "cscart-client-id": "ACME",
        "cscart-dead-lettered-at": "2026-11-23T04:00:00+00:00",
        "cscart-original-exchange": "fm.events",
        "cscart-original-routing-key": "shipment.lodged",
        **extra,
    }


def store_letter(
    store: StateStore,
    body: dict[str, Any],
    *,
    consumer: str = "shipment-lodged",
    **headers: Any,
) -> int:
    """Store one dead letter (as ``collect`` does); return its id."""
    row = record_of(
        consumer,
        json.dumps(body).encode(),
        runtime_headers(**{"cscart-consumer": consumer, **headers}),
        {"message_id": body.get("event_id"), "content_type": "application/json"},
    )
    with store.transaction() as conn:
        assert store.insert_ignore(conn, dl.dead_letters, row)
    [letter] = dl.find(store, dl.Filter(), limit=1, newest_first=True)
    return letter.id
