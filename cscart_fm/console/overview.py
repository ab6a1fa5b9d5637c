"""The per-client overview, read from the consumers' own tables (read-only).

One grouped query per table, whatever the number of clients: the last successful order poll
(``poll_watermarks``), orders published today in the client's time zone (``imported_orders``),
the last stock snapshot applied (``stock_reports``), the last shipment created
(``pushed_shipments``) and the open dead letters (``dead_letters``). A table that does not
exist (a consumer this release lacks, an older database) leaves its column "unknown" and says
so; it never breaks the page.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
import structlog

from .. import dead_letters as dl
from ..state import StateStore

log = structlog.get_logger(__name__)

STALL_INTERVALS = 3
"""A client whose last successful poll is older than this many poll intervals is stalled
(the same rule as the CscartFmOrderSyncStalled alert)."""


def aware(value: Any) -> datetime | None:
    """SQLite hands back naive datetimes (or text from an aggregate): they are UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass
class ClientStatus:
    client_id: str
    configured: bool
    zone: ZoneInfo
    poll_interval: int | None = None
    last_poll: datetime | None = None
    imported_today: int | None = None
    today_from: datetime | None = None
    last_stock: datetime | None = None
    last_shipment: datetime | None = None
    open_letters: int = 0
    stalled: str | None = None


@dataclass
class Overview:
    clients: list[ClientStatus]
    notes: list[str] = field(default_factory=list)
    """Columns that could not be read, in plain words."""

    @property
    def open_letters(self) -> int:
        return sum(c.open_letters for c in self.clients)


def _table(module: str, name: str) -> sa.Table | None:
    try:
        table = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return table if isinstance(table, sa.Table) else None


def _grouped(
    store: StateStore,
    what: str,
    notes: list[str],
    module: str,
    name: str,
    query: Callable[[sa.Table], Any],
) -> dict[str, Any] | None:
    table = _table(module, name) if module else dl.dead_letters
    if table is None:
        notes.append(f"{what}: not known to this release of cscart-fm")
        return None
    try:
        with store.engine.connect() as conn:
            return {str(row[0]): row[1] for row in conn.execute(query(table)).all()}
    except sa.exc.SQLAlchemyError as exc:
        log.warning("overview query failed", what=what, error=f"{type(exc).__name__}: {exc}")
        notes.append(f"{what}: could not be read from the state store ({type(exc).__name__})")
        return None


def local_midnight(now: datetime, zone: ZoneInfo) -> datetime:
    local = now.astimezone(zone)
    midnight = datetime(local.year, local.month, local.day, tzinfo=zone)
    return midnight.astimezone(UTC)


def build(store: StateStore, clients: Mapping[str, Any] | None, now: datetime) -> Overview:
    """``clients`` is the loaded clients file (or None when it could not be read)."""
    notes: list[str] = []
    settings = dict(clients or {})
    zones = {cid: s.orders.zone for cid, s in settings.items()}

    polls = _grouped(
        store,
        "Last successful order poll",
        notes,
        "consumers.order_poll",
        "poll_watermarks",
        lambda t: sa.select(t.c.client_id, t.c.last_success_at),
    )

    def imported_query(t: sa.Table) -> Any:
        utc_midnight = local_midnight(now, ZoneInfo("UTC"))
        windows = [
            sa.and_(t.c.client_id == cid, t.c.published_at >= local_midnight(now, zone))
            for cid, zone in zones.items()
        ]
        others = t.c.published_at >= utc_midnight
        if zones:
            others = sa.and_(t.c.client_id.not_in(list(zones)), others)
        return (
            sa.select(t.c.client_id, sa.func.count())
            .where(t.c.state == "published", sa.or_(*windows, others))
            .group_by(t.c.client_id)
        )

    imported = _grouped(
        store,
        "Orders imported today",
        notes,
        "consumers.order_poll",
        "imported_orders",
        imported_query,
    )
    stock = _grouped(
        store,
        "Last stock snapshot applied",
        notes,
        "consumers.stock_snapshot",
        "stock_reports",
        lambda t: sa.select(t.c.client_id, sa.func.max(t.c.created_at)).group_by(t.c.client_id),
    )
    shipments = _grouped(
        store,
        "Last shipment pushed",
        notes,
        "consumers.shipment_lodged",
        "pushed_shipments",
        lambda t: (
            sa.select(t.c.client_id, sa.func.max(t.c.created_at))
            .where(t.c.shipment_id.is_not(None))
            .group_by(t.c.client_id)
        ),
    )
    dl.ensure_table(store)
    letters = _grouped(
        store,
        "Open dead letters",
        notes,
        "",
        "dead_letters",
        lambda t: (
            sa.select(sa.func.coalesce(t.c.client_id, "(no client)"), sa.func.count())
            .where(t.c.status == dl.OPEN)
            .group_by(t.c.client_id)
        ),
    )

    names = set(settings)
    for found in (polls, imported, stock, shipments, letters):
        names.update(found or {})
    rows: list[ClientStatus] = []
    for cid in sorted(names):
        configured = cid in settings
        zone = zones.get(cid, ZoneInfo("UTC"))
        status = ClientStatus(client_id=cid, configured=configured, zone=zone)
        if configured:
            status.poll_interval = int(settings[cid].orders.poll_interval_seconds)
        if polls is not None:
            status.last_poll = aware(polls.get(cid))
        if imported is not None:
            status.imported_today = int(imported.get(cid, 0))
            status.today_from = local_midnight(now, zone)
        if stock is not None:
            status.last_stock = aware(stock.get(cid))
        if shipments is not None:
            status.last_shipment = aware(shipments.get(cid))
        status.open_letters = int((letters or {}).get(cid, 0))
        if configured and polls is not None and status.poll_interval:
            limit = timedelta(seconds=STALL_INTERVALS * status.poll_interval)
            if status.last_poll is None:
                status.stalled = "No successful order poll recorded yet."
            elif now - status.last_poll > limit:
                age = describe_age(now - status.last_poll)
                every = describe_age(timedelta(seconds=status.poll_interval))
                status.stalled = (
                    f"Order sync stalled: no successful poll for {age} (it should poll every "
                    f"{every})."
                )
        rows.append(status)
    return Overview(rows, notes)


def describe_age(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 90:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 90:
        return f"{minutes} min"
    hours = minutes // 60
    if hours < 48:
        return f"{hours} h {minutes % 60} min" if minutes % 60 else f"{hours} h"
    return f"{hours // 24} days"
