"""Planning a listing of the store and the watermark it starts from.

``full`` (the first poll, or the start date changed), ``incremental`` (orders changed since
the watermark, where the store filters on ``updated_at`` and the filters did not change) or
``window`` (pulled statuses placed within the lookback); the watermark moves only once a run
succeeded, never past the store's clock at the start of its listing (``Listing.mark``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import sqlalchemy as sa
import structlog

from consumers.order_poll.filters import Filters, Lookback
from consumers.order_poll.tables import poll_watermarks
from consumers.services import Services
from cscart.client import CsCartClient
from cscart_fm.core.state import utcnow
from schemas.cscart import CartOrder

log = structlog.get_logger(__name__)

OVERLAP_SECONDS = 30
"""Listed again from the watermark less this: an order the store committed a little after
stamping its ``updated_at`` is not missed."""
LOOKBACK_MARGIN_SECONDS = 3600
"""Added to ``status_lookback_days``: a poll's own delay never pushes an order out of it."""
MAX_CLOCK_AHEAD_SECONDS = 86_400
"""An ``updated_at`` further ahead of our clock than this is bogus and never moves the mark."""


@dataclass(frozen=True)
class Watermark:
    updated_mark: int | None
    start_key: str
    filter_key: str
    last_mode: str
    last_started_at: datetime
    last_success_at: datetime


@dataclass(frozen=True)
class Plan:
    mode: Literal["full", "window", "incremental"]
    time_from: int
    statuses: tuple[str, ...]
    updated_from: int | None
    lookback: Lookback

    def describe(self, filters: Filters) -> str:
        if self.mode == "incremental":
            assert self.updated_from is not None
            return (
                f"orders changed since {filters.local(self.updated_from)}, placed from "
                f"{filters.start_label}"
            )
        return (
            f"orders in {filters.pulled_label} placed from {filters.local(self.time_from)}"
        )


def load_watermark(services: Services, client_id: str) -> Watermark | None:
    with services.state.engine.connect() as conn:
        row = conn.execute(
            sa.select(poll_watermarks).where(poll_watermarks.c.client_id == client_id)
        ).first()
    if row is None:
        return None
    return Watermark(
        updated_mark=row.updated_mark,
        start_key=row.start_key,
        filter_key=row.filter_key,
        last_mode=row.last_mode,
        last_started_at=row.last_started_at or utcnow(),
        last_success_at=row.last_success_at or utcnow(),
    )


def plan_listing(
    filters: Filters, watermark: Watermark | None, store: CsCartClient, now: float
) -> Plan:
    if watermark is None or watermark.start_key != filters.start_key:
        return Plan("full", filters.start_ts, filters.letters, None, Lookback())
    updated_at = store.supports_updated_at()
    if (
        updated_at
        and watermark.filter_key == filters.filter_key
        and watermark.updated_mark is not None
    ):
        return Plan(
            "incremental",
            filters.start_ts,
            (),
            watermark.updated_mark - OVERLAP_SECONDS,
            Lookback("entered_within", filters.lookback_seconds + LOOKBACK_MARGIN_SECONDS),
        )
    anchor = min(now, watermark.last_started_at.timestamp())
    window_start = max(
        filters.start_ts, int(anchor) - filters.lookback_seconds - LOOKBACK_MARGIN_SECONDS
    )
    lookback = Lookback("placed_from", window_start)
    return Plan("window", window_start, filters.letters, None, lookback)


def save_watermark(
    services: Services,
    client_id: str,
    plan: Plan,
    filters: Filters,
    mark: int | None,
    run_started: datetime,
) -> None:
    """Record a successful run: its listing, the filters it used and the new mark."""
    state = services.state
    with state.transaction() as conn:
        state.upsert(
            conn,
            poll_watermarks,
            {
                "client_id": client_id,
                "updated_mark": mark,
                "start_key": filters.start_key,
                "filter_key": filters.filter_key,
                "last_mode": plan.mode,
                "last_started_at": run_started,
                "last_success_at": utcnow(),
            },
            key=["client_id"],
        )

@dataclass
class Listing:
    """What one listing saw, and the watermark it allows."""

    listed: int = 0
    best_lead: float | None = None  # max(updated_at - our clock when read): ≤ store clock offset
    started: float = 0.0

    def note(self, orders: Sequence[CartOrder]) -> None:
        """Count a page and learn from its ``updated_at`` how far the store's clock is."""
        read_at = time.time()
        self.listed += len(orders)
        for order in orders:
            if order.updated_at is None:
                continue
            lead = order.updated_at - read_at
            if lead > MAX_CLOCK_AHEAD_SECONDS:
                log.warning(
                    "order changed in the far future by our clock: ignored for the watermark",
                    cart_order_id=order.order_id,
                )
            elif self.best_lead is None or lead > self.best_lead:
                self.best_lead = lead

    def mark(self) -> int | None:
        """The watermark this listing allows: the store's clock when the listing started, or
        a little earlier. ``updated_at - read_time`` of any order is at most the store's clock
        offset, so ``start + max(...)`` never passes the store's clock at the start: an order
        changed meanwhile, even behind the reader's page, is listed next time."""
        if self.best_lead is None:
            return None
        return int(self.started + self.best_lead)

