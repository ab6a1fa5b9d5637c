"""The fault suite's search for leaked secrets finds what it must (check 5 relies on it)."""

from __future__ import annotations

from pathlib import Path

from tests.fault.harness import find_leaks
from tests.support.pipeline import API_KEY

SHOPPERS = [f"shopper.{n}@bench-mail.example" for n in range(5000)]


def _file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_form_of_a_leak_is_found_among_thousands_of_addresses(tmp_path: Path) -> None:
    files = [
        _file(tmp_path, "plain.log", '{"email": "Shopper.4711@Bench-Mail.example"}'),
        _file(tmp_path, "encoded.log", "GET /api/orders?email=shopper.12%40bench-mail.example"),
        _file(tmp_path, "inside.log", "mailto:xshopper.99@bench-mail.example.org;"),
        _file(tmp_path, "key.log", f"auth failed for key {API_KEY}"),
        _file(tmp_path, "masked.log", "s***@bench-mail.example and shopper.5000@bench-mail.example"),
    ]

    leaks = find_leaks(files, [API_KEY, *SHOPPERS])

    assert sorted(leaks) == [
        "encoded.log: shopper.12@bench-mail.example",
        "inside.log: shopper.99@bench-mail.example",
        f"key.log: {API_KEY.lower()}",
        "plain.log: shopper.4711@bench-mail.example",
    ]
