"""A client's order filters (statuses resolved against the store, countries, start date,
status lookback) and ``judge``: whether an order passes them, and if not, why."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal
from zoneinfo import ZoneInfo

from cscart.statuses import resolve_all
from schemas.cscart import CartOrder
from schemas.settings import ClientSettings

# --- skip reasons (the ``reason`` label of ORDERS_SKIPPED) ------------------------------------
STATUS = "status"
COUNTRY = "country"
BEFORE_START = "before_start_date"
BEFORE_LOOKBACK = "before_lookback"
PARENT = "parent_order"
ALREADY_IMPORTED = "already_imported"
UNMAPPABLE = "unmappable"
RECORDED_REASONS = frozenset({COUNTRY, BEFORE_START, BEFORE_LOOKBACK, PARENT, UNMAPPABLE})
"""Reasons kept per order in ``order_decisions`` (for ``explain``) and counted once per order;
``status`` and ``already_imported`` change or repeat on every listing and are counted per
sighting instead."""
FILTER_NAMES = {
    STATUS: "statuses",
    COUNTRY: "countries",
    BEFORE_START: "start date",
    BEFORE_LOOKBACK: "status lookback",
    PARENT: "Multi-Vendor parent order",
    UNMAPPABLE: "contract mapping",
}


@dataclass(frozen=True)
class Filters:
    """A client's order filters, with its statuses resolved against the store's own list."""

    client_id: str
    letters: tuple[str, ...]
    status_names: Mapping[str, str]  # every letter the store lists → its name
    missing: tuple[str, ...]  # configured statuses the store does not have
    countries: frozenset[str]
    start_ts: int
    start_label: str
    zone: ZoneInfo
    lookback_days: int
    prefix: str
    test_skus: frozenset[str]
    start_key: str
    filter_key: str

    @property
    def lookback_seconds(self) -> int:
        return self.lookback_days * 86_400

    def local(self, unix: float) -> str:
        moment = datetime.fromtimestamp(unix, self.zone)
        return f"{moment.isoformat(sep=' ', timespec='seconds')} ({moment.tzname()})"

    def status_label(self, letter: str) -> str:
        name = self.status_names.get(letter)
        return f"{letter} ({name})" if name else f"{letter} (not a status the store lists)"

    @property
    def pulled_label(self) -> str:
        return ", ".join(self.status_label(letter) for letter in self.letters) or "(none)"


def build_filters(settings: ClientSettings, store_statuses: Mapping[str, str]) -> Filters:
    orders = settings.orders
    letters, missing = resolve_all(orders.statuses, store_statuses)
    start = orders.start_datetime
    countries = frozenset(code.upper() for code in orders.countries)
    key_source = json.dumps(
        {
            "statuses": sorted(letters),
            "countries": sorted(countries),
            "lookback_days": orders.status_lookback_days,
        },
        sort_keys=True,
    )
    return Filters(
        client_id=settings.client_id,
        letters=tuple(letters),
        status_names=dict(store_statuses),
        missing=tuple(missing),
        countries=countries,
        start_ts=int(start.timestamp()),
        start_label=f"{orders.start_date:%d/%m/%Y} 00:00 {orders.timezone}",
        zone=orders.zone,
        lookback_days=orders.status_lookback_days,
        prefix=orders.prefix,
        test_skus=frozenset(orders.test_skus),
        start_key=f"{orders.start_date.isoformat()} {orders.timezone}",
        filter_key=hashlib.sha256(key_source.encode()).hexdigest()[:32],
    )


@dataclass(frozen=True)
class Lookback:
    """How ``status_lookback_days`` applies to one listing.

    ``none``: not at all (the first poll imports everything since the start date);
    ``placed_from``: the order was placed at or after ``value`` (a listing by placement time);
    ``entered_within``: its last change (when it entered a pulled status) is at most ``value``
    seconds after its placement (a listing by change time).
    """

    kind: Literal["none", "placed_from", "entered_within"] = "none"
    value: int = 0


@dataclass(frozen=True)
class Verdict:
    reason: str | None  # None: import it
    detail: str


PASS = Verdict(None, "passes every filter")


def judge(order: CartOrder, filters: Filters, lookback: Lookback) -> Verdict | None:
    """Whether the order passes the client's filters: a verdict, or None when only the full
    order can tell (the country of a slim list item). Details never name a shopper."""
    if order.is_parent_order:
        return Verdict(
            PARENT, "a Multi-Vendor parent order: its vendor orders are imported instead"
        )
    if order.timestamp < filters.start_ts:
        return Verdict(
            BEFORE_START,
            f"placed {filters.local(order.timestamp)}, before the start date "
            f"{filters.start_label}",
        )
    if order.status not in filters.letters:
        return Verdict(
            STATUS,
            f"in status {filters.status_label(order.status)}, not one of the pulled statuses "
            f"{filters.pulled_label}",
        )
    if lookback.kind == "placed_from" and order.timestamp < lookback.value:
        return Verdict(
            BEFORE_LOOKBACK,
            f"placed {filters.local(order.timestamp)}, before the lookback window that starts "
            f"{filters.local(lookback.value)} (status_lookback_days {filters.lookback_days}): "
            "it reached a pulled status too long after it was placed",
        )
    if (
        lookback.kind == "entered_within"
        and order.updated_at is not None
        and order.updated_at - order.timestamp > lookback.value
    ):
        return Verdict(
            BEFORE_LOOKBACK,
            f"placed {filters.local(order.timestamp)} but reached status "
            f"{filters.status_label(order.status)} only around "
            f"{filters.local(order.updated_at)}, more than status_lookback_days "
            f"({filters.lookback_days}) later",
        )
    if filters.countries:
        if not order.is_full:
            return None
        country = order.s_country.strip().upper()
        if country not in filters.countries:
            return Verdict(
                COUNTRY,
                f"ships to {country or 'no country'}, not one of the client's countries "
                f"{', '.join(sorted(filters.countries))}",
            )
    return PASS

