"""Order statuses as people name them, resolved against the store's own list.

Clients write statuses as letters (``P``) or names ("Processed", "Back Ordered", "Cancelled").
Stores name them their own way (``P`` is "Paid" on 4.13+, "Canceled" in US spelling, custom
statuses have any name), so names are matched loosely against ``GET /api/statuses``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from schemas.cscart import CartStatus

CACHE_SECONDS = 300.0

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


class OrderStatuses:
    """One store's order statuses (letter → name), read from the store and kept a few
    minutes: the catalogue every job resolves the client's statuses against."""

    def __init__(self, read: Callable[[], Iterable[CartStatus]], ttl: float = CACHE_SECONDS):
        self._read = read
        self._ttl = ttl
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, str]] | None = None

    def names(self, *, refresh: bool = False) -> dict[str, str]:
        """Each status letter the store lists, with its name."""
        with self._lock:
            cached = self._cached
        if not refresh and cached is not None and time.monotonic() - cached[0] < self._ttl:
            return cached[1]
        names = {status.status: status.description for status in self._read() if status.status}
        with self._lock:
            self._cached = (time.monotonic(), names)
        return names

    def forget(self) -> None:
        with self._lock:
            self._cached = None

    def resolve(self, wanted: str) -> str | None:
        """The letter of ``wanted`` (a letter or a name), read afresh once when the cached
        list lacks it (a status added in the store since)."""
        letter = resolve_status(wanted, self.names())
        if letter is None:
            letter = resolve_status(wanted, self.names(refresh=True))
        return letter

    def resolve_all(self, wanted: Iterable[str]) -> tuple[list[str], list[str]]:
        """(letters found, names not found), reading afresh once when any is missing."""
        wanted = list(wanted)
        found, missing = resolve_all(wanted, self.names())
        if missing:
            found, missing = resolve_all(wanted, self.names(refresh=True))
        return found, missing
