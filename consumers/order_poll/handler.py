"""Orders pulling: on an ``order-poll.tick`` for a client, import every order of its CS-Cart
store that passes the client's filters and was not imported before, publishing each once as
``order.imported`` on ``fm.orders`` (contract §2.2).

How a tick runs (one client; ``PollRun``):

1. **One poll per client across replicas**: the tick takes the client's ``order-poll`` lock
   (a PostgreSQL advisory lock or a file lock, both die with their holder). Another replica
   holding it is polling that client right now: the tick is acknowledged (counted in
   ``POLLS_SKIPPED_BUSY``) because that poll covers it.
2. **Finish what a crash left**: every ``claimed`` row of the client (an order whose publish
   was not confirmed, or confirmed but not recorded) is published again from its stored body —
   same ``event_id``, same bytes — and marked ``published``.
3. **List** the store by placement time (``CsCartClient.order_pages``: each request asks for
   a time range sorted by time and continues after the last order read, so an order leaving
   the listing while it is read, as FM's shipments move orders from ``P`` to ``C``, shifts no
   other order out of it, as offset paging would), with up to ``limits.concurrency`` requests
   in flight; full orders in the list pages where the store has ``get_orders_data`` (else slim
   items and a detail call only for an order about to be imported), a page in memory at a
   time. Which orders:

   - ``full`` (the first poll, or the start date changed): pulled statuses placed from the
     start date (00:00 in the client's time zone, sent as a Unix time);
   - ``incremental`` (the store filters on ``updated_at``, there is a watermark and the
     filters did not change): every order *changed* since the watermark less a 30 s overlap,
     whatever its status (the status is filtered here). An idle store answers one empty page,
     whatever its history;
   - ``window`` (stores without ``updated_at``, or the statuses/countries/lookback changed):
     pulled statuses placed within the lookback before the last successful poll.

   Every filter is checked here again; the store's filtering is never trusted alone.
4. **Per page**: orders already recorded are skipped; the rest are judged (``judge``). The
   page's passing orders are *claimed* in one transaction — a row per order with the exact
   body to publish — then published together; their confirms come back while the next page
   is judged, and that page's transaction records them ``published`` as it claims its own
   (one transaction a page). A crash before the claim loses nothing (the order is listed
   again: the watermark has not moved); after it, step 2 of the next tick publishes it with
   the same ``event_id`` (so a crash can send FM at most the page in flight again).
5. **Watermark**: saved only once the run succeeded, never ahead of the store's clock at the
   start of the listing (see ``_Pass.mark``), so an order changed while the listing ran is
   still listed next time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo

import sqlalchemy as sa
import structlog
from pydantic import ValidationError

from consumers.services import Services
from cscart.client import CsCartClient
from cscart.statuses import resolve_all
from cscart_fm.core import metrics
from cscart_fm.core.broker import Confirmation, Outgoing, contract_properties
from cscart_fm.core.errors import BridgeError, NotFound, StoreRefused
from cscart_fm.core.runtime import Delivery
from cscart_fm.core.state import UtcDateTime, metadata, utcnow
from cscart_fm.core.topology import ORDER_IMPORTED, ORDERS_EXCHANGE
from schemas.cscart import CartOrder
from schemas.messages import OrderImported, OrderPollTick, order_event_id
from schemas.settings import ClientSettings

log = structlog.get_logger(__name__)

POLL_LOCK = "order-poll"
"""One poll per client across replicas: the name of its lock."""
CLAIMED, PUBLISHED = "claimed", "published"

OVERLAP_SECONDS = 30
"""Listed again from the watermark less this: an order the store committed a little after
stamping its ``updated_at`` is not missed."""
LOOKBACK_MARGIN_SECONDS = 3600
"""Added to ``status_lookback_days``: a poll's own delay never pushes an order out of it."""
REPUBLISH_CHUNK = 100
DECISION_RETENTION = timedelta(days=180)
MAX_CLOCK_AHEAD_SECONDS = 86_400
"""An ``updated_at`` further ahead of our clock than this is bogus and never moves the mark."""

# --- skip reasons (the ``reason`` label of ORDERS_SKIPPED) -------------------------------------
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

# --- state ------------------------------------------------------------------------------------

imported_orders = sa.Table(
    "imported_orders",
    metadata,
    sa.Column("client_id", sa.String(64), primary_key=True),
    sa.Column("cart_order_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("order_no", sa.String(200), nullable=False),
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # claimed | published
    # The exact body published (kept until the publish is recorded, then cleared: it holds a
    # shopper's address, and nothing needs it once FM has it).
    sa.Column("payload", sa.Text, nullable=True),
    sa.Column("cart_status", sa.String(8), nullable=False),
    sa.Column("placed_at", UtcDateTime(), nullable=False),
    sa.Column("claimed_at", UtcDateTime(), nullable=False),
    sa.Column("published_at", UtcDateTime(), nullable=True),
    # Only the claimed orders (almost always none), in id order (republish_claimed): a
    # full index on state would tempt SQLite to walk the whole history for other lookups.
    sa.Index(
        "ix_imported_orders_claimed",
        "client_id",
        "cart_order_id",
        sqlite_where=sa.text("state = 'claimed'"),
        postgresql_where=sa.text("state = 'claimed'"),
    ),
    # The console's "orders imported today" per client.
    sa.Index("ix_imported_orders_client_published", "client_id", "published_at"),
)

poll_watermarks = sa.Table(
    "poll_watermarks",
    metadata,
    sa.Column("client_id", sa.String(64), primary_key=True),
    # Store-clock Unix time: orders changed from (this - overlap) on are listed next time.
    sa.Column("updated_mark", sa.BigInteger, nullable=True),
    sa.Column("start_key", sa.String(100), nullable=False),
    sa.Column("filter_key", sa.String(64), nullable=False),
    sa.Column("last_mode", sa.String(16), nullable=False),
    sa.Column("last_started_at", UtcDateTime(), nullable=False),
    sa.Column("last_success_at", UtcDateTime(), nullable=False),
)

order_decisions = sa.Table(
    "order_decisions",
    metadata,
    sa.Column("client_id", sa.String(64), primary_key=True),
    sa.Column("cart_order_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Column("detail", sa.String(500), nullable=False),  # plain English, no personal data
    sa.Column("cart_status", sa.String(8), nullable=False),
    sa.Column("seen_at", UtcDateTime(), nullable=False),
    sa.Index("ix_order_decisions_client_seen", "client_id", "seen_at"),
)


def claimed_after(client_id: str, after: int) -> sa.Select[Any]:
    """The next claimed orders of a client (ids above ``after``), from the partial index.
    The state is written into the SQL: a planner can use a partial index only for a value
    it sees."""
    table = imported_orders
    return (
        sa.select(table.c.cart_order_id, table.c.event_id, table.c.order_no, table.c.payload)
        .where(
            table.c.client_id == client_id,
            table.c.state == sa.bindparam("claimed", CLAIMED, literal_execute=True),
            table.c.cart_order_id > after,
        )
        .order_by(table.c.cart_order_id)
        .limit(REPUBLISH_CHUNK)
    )


def recorded(client_id: str, ids: Sequence[int]) -> sa.Select[Any]:
    """Which of these orders of a client are recorded (claimed or published), by key."""
    table = imported_orders
    return sa.select(table.c.cart_order_id, table.c.state).where(
        table.c.client_id == client_id, table.c.cart_order_id.in_(ids)
    )


# --- the client's filters ---------------------------------------------------------------------


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


# --- mapping to the contract ------------------------------------------------------------------

_CENT = Decimal("0.01")
_MICRO = Decimal("0.000001")


def money(value: Decimal) -> str:
    """A decimal string with two decimals (more only when the store keeps more); no float."""
    cents = value.quantize(_CENT)
    if cents == value:
        return "0.00" if cents == 0 else f"{cents:f}"
    return f"{value.quantize(_MICRO):f}"


def _name(first: str, last: str) -> str:
    return " ".join(part.strip() for part in (first, last) if part and part.strip())


def to_message(order: CartOrder, filters: Filters) -> OrderImported:
    """The ``order.imported`` message of a full CS-Cart order (contract §2.2). Built as a
    document and validated once by the schema (half the time of building each part as a
    model)."""
    customer_name = _name(order.firstname, order.lastname)
    lines = [
        {
            "line_id": line.item_id or key,
            "sku": line.product_code,
            "name": line.product,
            "quantity": line.amount,
            "unit_price": money(line.price),
        }
        for key, line in order.products.items()
    ]

    def address(prefix: Literal["s", "b"]) -> dict[str, str]:
        def get(name: str) -> str:
            return str(getattr(order, name))

        return {
            "name": _name(get(f"{prefix}_firstname"), get(f"{prefix}_lastname"))
            or customer_name,
            "company": order.company,
            "address1": get(f"{prefix}_address"),
            "address2": get(f"{prefix}_address_2"),
            "city": get(f"{prefix}_city"),
            "state": get(f"{prefix}_state"),
            "postcode": get(f"{prefix}_zipcode"),
            "country": get(f"{prefix}_country").strip().upper(),
            "phone": get(f"{prefix}_phone") or order.phone,
            "email": order.email,
        }

    return OrderImported.model_validate(
        {
            "event_id": order_event_id(filters.client_id, order.order_id),
            "client_id": filters.client_id,
            "order_no": f"{filters.prefix}{order.order_id}",
            "cart_order_id": order.order_id,
            "cart_status": order.status,
            "placed_at": datetime.fromtimestamp(order.timestamp, filters.zone),
            "is_test": bool(lines) and all(line["sku"] in filters.test_skus for line in lines),
            "currency": order.secondary_currency,
            "customer": {
                "name": customer_name,
                "email": order.email,
                "phone": order.phone or order.b_phone or order.s_phone,
            },
            "ship_to": address("s"),
            "bill_to": address("b"),
            "shipping_method": order.shipping[0].shipping if order.shipping else "",
            "notes": order.notes,
            "lines": lines,
            "totals": {
                "subtotal": money(order.subtotal),
                "shipping": money(order.shipping_cost),
                "tax": money(order.tax_subtotal),
                "discount": money(order.discount + order.subtotal_discount),
                "total": money(order.total),
            },
        }
    )


def _validation_summary(exc: ValidationError) -> str:
    # Field paths and messages only: the input values may be a shopper's data.
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "(order)"
    return f"{where}: {first['msg']}"


# --- one claim ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """An order about to be published: its key, its event_id and the exact body."""

    cart_order_id: int
    event_id: str
    order_no: str
    body: bytes
    schema: str  # the ``schema`` header: <type>/<version> of the body
    cart_status: str = ""
    placed_at: datetime | None = None

    @classmethod
    def of(cls, message: OrderImported) -> Claim:
        return cls(
            cart_order_id=message.cart_order_id,
            event_id=message.event_id,
            order_no=message.order_no,
            body=message.to_body(),
            schema=message.schema_name,
            cart_status=message.cart_status,
            placed_at=message.placed_at,
        )

    @classmethod
    def stored(cls, cart_order_id: int, event_id: str, order_no: str, payload: str) -> Claim:
        """A claim a previous run recorded, published again exactly as it was."""
        document = json.loads(payload)
        schema = f"{document.get('type')}/{document.get('version')}"
        return cls(cart_order_id, event_id, order_no, payload.encode(), schema)


_Sent = tuple[list[Claim], Confirmation]
"""Orders published, their confirms still to come."""


def _not_confirmed(claims: Sequence[Claim], exc: BaseException) -> BridgeError:
    return BridgeError(
        f"publishing {len(claims)} orders (from {claims[0].cart_order_id}) to "
        f"{ORDERS_EXCHANGE} was not confirmed ({type(exc).__name__}); they are published "
        "again on the next attempt",
        action=(
            "The broker did not confirm order.imported messages. Retried automatically; if "
            "dead-lettered, check RabbitMQ, then replay."
        ),
    )


# --- planning a listing -------------------------------------------------------------------------


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


# --- the handler ----------------------------------------------------------------------------------


class OrderPollHandler:
    """The order-poll consumer: one tick → one poll of the client's store."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._pruned: dict[str, float] = {}
        self._guard = threading.Lock()

    def filters(
        self, settings: ClientSettings, store: CsCartClient, *, strict: bool = True
    ) -> Filters:
        """The client's filters. A configured status the store does not list is reported
        (logged on every poll); when none of them resolves, there is nothing to poll and the
        tick is dead-lettered (``strict``) for a person to correct the settings."""
        filters = build_filters(settings, store.statuses.names())
        if filters.missing:  # perhaps added in the store since the cache was filled
            filters = build_filters(settings, store.statuses.names(refresh=True))
        if filters.missing and strict:
            known = ", ".join(f"{k} {v}" for k, v in sorted(filters.status_names.items()))
            if not filters.letters:
                raise StoreRefused(
                    f"order-poll: none of the client's statuses {list(filters.missing)} is an "
                    f"order status of the store (it has: {known})",
                    action=(
                        f"Correct orders.statuses of client {settings.client_id} in the clients "
                        "file (letters, or the store's names: `cscart-fm check "
                        f"{settings.client_id}` lists them), roll out the settings, then replay."
                    ),
                )
            log.error(
                "configured statuses are not in the store: orders in them are not pulled",
                missing=list(filters.missing),
                pulled=list(filters.letters),
            )
        return filters

    # --- one tick --------------------------------------------------------------------------------

    def handle(self, event: OrderPollTick, delivery: Delivery) -> None:
        settings = self.services.clients.require(event.client_id)
        client = settings.client_id
        with self.services.state.client_lock(POLL_LOCK, client) as held:
            if not held:
                metrics.POLLS_SKIPPED_BUSY.labels(client).inc()
                log.info("another replica is polling this client now: this tick is covered")
                return
            started = time.monotonic()
            try:
                summary = PollRun(self, settings).execute()
            finally:
                metrics.POLL_SECONDS.labels(client).observe(time.monotonic() - started)
            metrics.LAST_POLL_SUCCESS.labels(client).set_to_current_time()
            log.info(
                "order poll done",
                redelivered=delivery.redelivered,
                seconds=round(time.monotonic() - started, 3),
                **summary,
            )

    def maybe_prune(self, client_id: str) -> None:
        """Forget old skip decisions now and then (explain keeps half a year)."""
        now = time.monotonic()
        with self._guard:
            if now - self._pruned.get(client_id, -1e9) < 3600:
                return
            self._pruned[client_id] = now
        with self.services.state.transaction() as conn:
            conn.execute(
                sa.delete(order_decisions).where(
                    order_decisions.c.client_id == client_id,
                    order_decisions.c.seen_at < utcnow() - DECISION_RETENTION,
                )
            )


@dataclass
class _Pass:
    """What one listing saw."""

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


class PollRun:
    """One poll of one client, holding its lock."""

    def __init__(self, handler: OrderPollHandler, settings: ClientSettings) -> None:
        self.handler = handler
        self.services = handler.services
        self.state = handler.services.state
        self.settings = settings
        self.client_id = settings.client_id
        self.store: CsCartClient = handler.services.stores.for_client(settings)
        self.skipped: dict[str, int] = {}
        self.imported = 0

    # --- the run -------------------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        run_started = utcnow()
        republished = self.republish_claimed()
        filters = self.handler.filters(self.settings, self.store)
        watermark = load_watermark(self.services, self.client_id)
        plan = plan_listing(filters, watermark, self.store, time.time())
        mark = watermark.updated_mark if watermark is not None else None
        result = self.list_and_import(plan, filters)
        candidate = result.mark()
        if candidate is not None:
            mark = candidate if mark is None else max(mark, candidate)
        self.save_watermark(plan, filters, mark, run_started)
        self.handler.maybe_prune(self.client_id)
        return {
            "mode": plan.mode,
            "listed": result.listed,
            "imported": self.imported,
            "republished": republished,
            "skipped": dict(self.skipped),
        }

    # --- step 2: what a crash left ---------------------------------------------------------------

    def republish_claimed(self) -> int:
        """Publish again every claimed order of the client from its stored body (same
        event_id, same bytes) and record it; return how many."""
        last = -1
        count = 0
        while True:
            with self.state.engine.connect() as conn:
                rows = conn.execute(claimed_after(self.client_id, last)).all()
            if not rows:
                return count
            last = rows[-1].cart_order_id
            claims = []
            for row in rows:
                if not row.payload:
                    log.error("claimed order has no stored body", cart_order_id=row.cart_order_id)
                    continue
                claims.append(
                    Claim.stored(row.cart_order_id, row.event_id, row.order_no, row.payload)
                )
            self.publish(claims)
            self.mark_published(claims)
            count += len(claims)
            log.info("re-published orders a previous run had claimed", count=len(claims))

    # --- steps 3 and 4: list, judge, claim, publish, record --------------------------------------

    def list_and_import(self, plan: Plan, filters: Filters) -> _Pass:
        """List, judge, claim, publish and record, a page at a time, pipelined: a page's
        confirms come back while the next page is judged, and one transaction per page
        records the previous page as published and claims this one."""
        result = _Pass(started=time.time())
        pages = self.store.order_pages(
            statuses=plan.statuses,
            time_from=plan.time_from,
            updated_from=plan.updated_from,
            page_size=self.settings.limits.page_size,
        )
        sent: _Sent | None = None  # published, confirms still coming
        try:
            for page in pages:
                result.note(page)
                ready, skips, prior = self.judge_page(page, plan, filters)
                previous, sent = sent, None
                published = self.confirmed(previous)
                claimed = self.record(ready, skips, prior, published)
                sent = self.send(claimed)
            previous, sent = sent, None
            self.mark_published(self.confirmed(previous))
        except Exception:
            if sent is not None:
                # Spare FM copies on the next attempt: what was confirmed is recorded.
                with contextlib.suppress(Exception):
                    self.mark_published(self.confirmed(sent))
            raise
        return result

    def judge_page(
        self, batch: Sequence[CartOrder], plan: Plan, filters: Filters
    ) -> tuple[list[Claim], list[tuple[CartOrder, Verdict]], dict[int, tuple[str, str]]]:
        """The page's orders to claim (each mapped to its message) and those skipped."""
        ids = [order.order_id for order in batch]
        known = self.known(ids)
        prior = self.prior_decisions(ids)
        ready: list[Claim] = []
        skips: list[tuple[CartOrder, Verdict]] = []
        for order in batch:
            if order.order_id in known:
                self.count_skip(ALREADY_IMPORTED)
                continue
            verdict = judge(order, filters, plan.lookback)
            if verdict is None or (verdict.reason is None and not order.is_full):
                oid = order.order_id
                if verdict is None and prior.get(oid) == (COUNTRY, order.status):
                    continue  # decided before on the full order, unchanged since: no call
                try:
                    order = self.store.get_order(oid)
                except NotFound:
                    log.info("order vanished from the store while listed", cart_order_id=oid)
                    continue
                verdict = judge(order, filters, plan.lookback)
                assert verdict is not None  # a full order always has a verdict
            if verdict.reason is not None:
                skips.append((order, verdict))
                continue
            try:
                ready.append(Claim.of(to_message(order, filters)))
            except ValidationError as exc:
                detail = f"cannot be mapped to order.imported: {_validation_summary(exc)}"
                log.error("order cannot be published", cart_order_id=order.order_id, error=detail)
                skips.append((order, Verdict(UNMAPPABLE, detail)))
        return ready, skips, prior

    def known(self, ids: Sequence[int]) -> dict[int, str]:
        with self.state.engine.connect() as conn:
            rows = conn.execute(recorded(self.client_id, ids)).all()
        return {row.cart_order_id: row.state for row in rows}

    def prior_decisions(self, ids: Sequence[int]) -> dict[int, tuple[str, str]]:
        table = order_decisions
        with self.state.engine.connect() as conn:
            rows = conn.execute(
                sa.select(table.c.cart_order_id, table.c.reason, table.c.cart_status).where(
                    table.c.client_id == self.client_id, table.c.cart_order_id.in_(ids)
                )
            ).all()
        return {row.cart_order_id: (row.reason, row.cart_status) for row in rows}

    def count_skip(self, reason: str, n: int = 1) -> None:
        metrics.ORDERS_SKIPPED.labels(self.client_id, reason).inc(n)
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def record(
        self,
        ready: Sequence[Claim],
        skips: Sequence[tuple[CartOrder, Verdict]],
        prior: Mapping[int, tuple[str, str]],
        published: Sequence[Claim],
    ) -> list[Claim]:
        """One transaction: ``published`` recorded as published (the broker confirmed them),
        the skips kept for ``explain`` (written only when they changed, so that listing the
        same orders again costs no write), and ``ready`` claimed, each with its exact body.
        Returns the orders this run claimed (a row already there belongs to an earlier or
        another run)."""
        changed = []
        for order, verdict in skips:
            assert verdict.reason is not None
            if verdict.reason not in RECORDED_REASONS:
                self.count_skip(verdict.reason)
            elif prior.get(order.order_id) != (verdict.reason, order.status):
                self.count_skip(verdict.reason)
                changed.append((order, verdict))
        if not (ready or changed or published):
            return []
        now = utcnow()
        rows = [
            {
                "client_id": self.client_id,
                "cart_order_id": claim.cart_order_id,
                "order_no": claim.order_no,
                "event_id": claim.event_id,
                "state": CLAIMED,
                "payload": claim.body.decode("utf-8"),
                "cart_status": claim.cart_status[:8],
                "placed_at": (claim.placed_at or now).astimezone(UTC),
                "claimed_at": now,
                "published_at": None,
            }
            for claim in ready
        ]
        with self.state.transaction() as conn:
            done = self._record_published(conn, published)
            for order, verdict in changed:
                assert verdict.reason is not None
                self.state.upsert(
                    conn,
                    order_decisions,
                    {
                        "client_id": self.client_id,
                        "cart_order_id": order.order_id,
                        "decision": "skipped",
                        "reason": verdict.reason,
                        "detail": verdict.detail[:500],
                        "cart_status": order.status[:8],
                        "seen_at": now,
                    },
                    key=["client_id", "cart_order_id"],
                )
            inserted = self.state.insert_ignore_many(conn, imported_orders, rows)
        self._count_imported(done)
        won = [claim for claim in ready if (self.client_id, claim.cart_order_id) in inserted]
        if len(won) < len(ready):
            self.count_skip(ALREADY_IMPORTED, len(ready) - len(won))
        return won

    def send(self, claims: Sequence[Claim]) -> _Sent | None:
        """Publish the orders now; their confirms are awaited by ``confirmed``."""
        if not claims:
            return None
        messages = [
            Outgoing(
                claim.body,
                ORDERS_EXCHANGE,
                ORDER_IMPORTED,
                contract_properties(claim.event_id, claim.schema),
            )
            for claim in claims
        ]
        try:
            return list(claims), self.services.publisher.send(messages)
        except Exception as exc:
            raise _not_confirmed(claims, exc) from exc

    def confirmed(self, sent: _Sent | None) -> list[Claim]:
        """The orders of ``sent`` once the broker confirmed every one; raises (the tick is
        retried, and they are published again) otherwise."""
        if sent is None:
            return []
        claims, confirmation = sent
        try:
            confirmation.wait()
        except Exception as exc:
            raise _not_confirmed(claims, exc) from exc
        return claims

    def publish(self, claims: Sequence[Claim]) -> None:
        """Publish the orders with confirms, waiting for them."""
        self.confirmed(self.send(claims))

    def mark_published(self, claims: Sequence[Claim]) -> None:
        if not claims:
            return
        with self.state.transaction() as conn:
            done = self._record_published(conn, claims)
        self._count_imported(done)

    def _record_published(self, conn: sa.Connection, claims: Sequence[Claim]) -> int:
        if not claims:
            return 0
        ids = [claim.cart_order_id for claim in claims]
        done = conn.execute(
            sa.update(imported_orders)
            .where(
                imported_orders.c.client_id == self.client_id,
                imported_orders.c.cart_order_id.in_(ids),
                imported_orders.c.state == CLAIMED,
            )
            .values(state=PUBLISHED, published_at=utcnow(), payload=None)
        ).rowcount
        conn.execute(
            sa.delete(order_decisions).where(
                order_decisions.c.client_id == self.client_id,
                order_decisions.c.cart_order_id.in_(ids),
            )
        )
        return done if done is not None and done >= 0 else len(ids)

    def _count_imported(self, count: int) -> None:
        if count:
            metrics.ORDERS_IMPORTED.labels(self.client_id).inc(count)
            self.imported += count

    # --- step 5 ----------------------------------------------------------------------------------

    def save_watermark(
        self, plan: Plan, filters: Filters, mark: int | None, run_started: datetime
    ) -> None:
        with self.state.transaction() as conn:
            self.state.upsert(
                conn,
                poll_watermarks,
                {
                    "client_id": self.client_id,
                    "updated_mark": mark,
                    "start_key": filters.start_key,
                    "filter_key": filters.filter_key,
                    "last_mode": plan.mode,
                    "last_started_at": run_started,
                    "last_success_at": utcnow(),
                },
                key=["client_id"],
            )



__all__ = [
    "OrderPollHandler",
    "PollRun",
    "imported_orders",
    "judge",
    "order_decisions",
    "poll_watermarks",
    "to_message",
]
