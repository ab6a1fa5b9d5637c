"""Order statuses as people name them, resolved against the store's own list.

Clients write statuses as letters (``P``) or names ("Processed", "Back Ordered", "Cancelled").
Stores name them their own way (``P`` is "Paid" on 4.13+, "Canceled" in US spelling, custom
statuses have any name), so names are matched loosely against ``GET /api/statuses``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# The client documents' names of CS-Cart's built-in statuses, for stores that renamed them.
_BUILT_IN = {
    "open": "O",
    "processed": "P",
    "paid": "P",
    "complete": "C",
    "completed": "C",
    "failed": "F",
    "declined": "D",
    "backordered": "B",
    "canceled": "I",
    "incomplete": "N",
}


def _key(name: str) -> str:
    key = re.sub(r"[^a-z]", "", name.lower())
    return key.replace("cancelled", "canceled")


def resolve_status(wanted: str, store_statuses: Mapping[str, str]) -> str | None:
    """The store's letter for ``wanted`` (a letter or a name), or None if it has none.

    ``store_statuses`` maps each letter the store lists to its name (description).
    """
    wanted = wanted.strip()
    if len(wanted) == 1 and wanted.upper() in store_statuses:
        return wanted.upper()
    key = _key(wanted)
    for letter, name in store_statuses.items():
        if _key(name) == key:
            return letter
    built_in = _BUILT_IN.get(key)
    if built_in is not None and built_in in store_statuses:
        return built_in
    return None


def resolve_all(
    wanted: Iterable[str], store_statuses: Mapping[str, str]
) -> tuple[list[str], list[str]]:
    """(letters found, names not found), in the order given, without duplicates."""
    found: list[str] = []
    missing: list[str] = []
    for item in wanted:
        letter = resolve_status(item, store_statuses)
        if letter is None:
            missing.append(item)
        elif letter not in found:
            found.append(letter)
    return found, missing
