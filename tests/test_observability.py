"""Every log line is redacted: registered secrets and e-mail addresses never reach the output."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from cscart_fm.core.config import redact_url
from cscart_fm.core.observability import configure_logging, hide_secrets, register_secret

SECRET = "sk-live-4f9d1c2b7a"


def test_secrets_and_emails_are_redacted_in_every_kind_of_log_line() -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream=stream)
    register_secret(SECRET)
    log = structlog.get_logger("test")
    log.info("calling store", url=f"https://x.example/api?key={SECRET}", customer="jane@example.com")
    log.info("headers", authorization=f"Basic {SECRET}", api_key=SECRET, nested={"password": "p"})
    logging.getLogger("urllib3.test").warning("retrying with %s for %s", SECRET, "bob@example.org")
    try:
        raise RuntimeError(f"store said no to {SECRET} for jane@example.com")
    except RuntimeError:
        log.exception("failed")
    output = stream.getvalue()
    assert SECRET not in output
    assert "jane@example.com" not in output and "bob@example.org" not in output
    lines = [json.loads(line) for line in output.splitlines()]
    assert lines[0]["customer"] == "j***@example.com"
    assert lines[1]["api_key"] == "***" and lines[1]["authorization"] == "***"
    assert lines[1]["nested"] == {"password": "***"}
    assert "***" in lines[2]["event"]
    assert "RuntimeError" in lines[3]["exception"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:guest@localhost:5672//", "amqp://guest:***@localhost:5672//"),
        # A password with # or / does not parse as a URL: everything before its last @ goes.
        ("amqp://svc:pa#ss/word@rabbit:5672//", "amqp://***@rabbit:5672//"),
        ("postgresql+psycopg://app:s3cr@t@db:5432/state", "postgresql+psycopg://app:***@db:5432/state"),
        ("amqp://u:p@[::1:5672//", "amqp://***@[::1:5672//"),  # malformed
        ("amqp://svc:one@h1//;amqp://svc:two@h2//", "amqp://svc:***@h1//;amqp://svc:***@h2//"),
        ("sqlite:///cscart-fm.sqlite", "sqlite:///cscart-fm.sqlite"),
        ("postgresql://app@db/state", "postgresql://app@db/state"),
    ],
)
def test_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_secret_that_starts_another_leaves_nothing_of_either_shown() -> None:
    register_secret("short-key")
    register_secret("short-key-and-more-7f3a")
    assert hide_secrets("a short-key-and-more-7f3a and a short-key") == "a *** and a ***"
