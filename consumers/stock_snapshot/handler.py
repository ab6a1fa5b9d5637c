"""Stock push: FM's snapshot becomes the store's quantities, written only where they differ.

One writer per client across replicas; an older snapshot never overwrites a newer one per SKU
(``stock_applied``); the store is read before it is written (the whole catalogue in pages, or
each code looked up when the message is small), so a retry writes only what still differs.
The whole story: docs/jobs.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, TypeVar

import sqlalchemy as sa
import structlog

from consumers.services import Services
from cscart.client import CsCartClient
from cscart_fm.core import metrics
from cscart_fm.core.errors import NotFound, StoreRefused
from cscart_fm.core.runtime import Delivery
from cscart_fm.core.state import StateStore, UtcDateTime, metadata, utcnow
from schemas.cscart import CartCombination, CartProduct
from schemas.messages import StockItem, StockSnapshot
from schemas.settings import ClientSettings, StockSettings

__all__ = [
    "SMALL_MESSAGE_SKUS",
    "StockSnapshotHandler",
    "stock_applied",
    "stock_catalogue",
    "stock_product_map",
    "stock_reports",
    "target_quantities",
]

log = structlog.get_logger(__name__)

SMALL_MESSAGE_SKUS: Final = 20
"""Until the client's catalogue was read in full once, a message with up to this many SKUs
looks each code up (``pcode``) and a larger one reads the catalogue. Once its size is known,
whichever costs fewer requests: lookups when the SKUs are no more than the catalogue's pages."""
MIN_LISTING_PAGE: Final = 250
"""Products per page when reading the catalogue (``limits.page_size`` if larger)."""
LOCK_WAIT_SECONDS: Final = 120.0
"""How long a message waits for another replica writing the same client's stock (then the
runtime retries it later: ``LockBusy``)."""
DISCOVERY_INTERVAL: Final = timedelta(minutes=10)
"""A small message whose SKU misses reads the whole catalogue to find option-combination
products at most this often per client (a SKU that is really unknown must not cost a full
read every time)."""
PARENT_MAX_AGE: Final = timedelta(hours=24)
"""A combination product whose combinations were not listed for this long is listed again
when a SKU misses."""
REFUSALS_BEFORE_GIVING_UP: Final = 10
"""Refused writes (HTTP 400), with none accepted, after which the message stops trying."""
REPORT_SAMPLE: Final = 20
"""SKUs named in the log line, per kind."""
REPORT_KEEP: Final = 200
"""SKUs kept in a report row, per kind (the text is also cut to ``REPORT_TEXT``)."""
REPORT_TEXT: Final = 4000
CHUNK: Final = 500
"""Rows per statement when reading or writing many SKUs (well under SQLite's limits)."""

# --- tables ------------------------------------------------------------------------------------

stock_applied = sa.Table(
    "stock_applied",
    metadata,
    sa.Column("client_id", sa.String(64), primary_key=True),
    sa.Column("sku", sa.String(200), primary_key=True),
    sa.Column("taken_at", UtcDateTime(), nullable=False),  # UTC
    sa.Column("quantity", sa.Integer, nullable=False),
    sa.Column("applied_at", UtcDateTime(), nullable=False),
)
"""Per client and SKU: the ``taken_at`` and quantity of the last snapshot applied."""

stock_product_map = sa.Table(
    "stock_product_map",
    metadata,
    sa.Column("client_id", sa.String(64), primary_key=True),
    sa.Column("sku", sa.String(200), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),  # "combination"
    sa.Column("ref", sa.String(64), nullable=False),  # the combination hash
    sa.Column("parent_product_id", sa.Integer, nullable=False),
    sa.Column("refreshed_at", UtcDateTime(), nullable=False),
    sa.Index("ix_stock_product_map_parent", "client_id", "parent_product_id"),
)
"""SKU → where its stock lives, for what a product listing cannot tell: option combinations
(stores up to 4.9). Products are not cached: their listing carries their amounts anyway."""

stock_catalogue = sa.Table(
    "stock_catalogue",
    metadata,
    sa.Column("client_id", sa.String(64), primary_key=True),
    sa.Column("scanned_at", UtcDateTime(), nullable=True),
    sa.Column("products", sa.Integer, nullable=True),
    sa.Column("page_size", sa.Integer, nullable=True),
    sa.Column("discovered_at", UtcDateTime(), nullable=True),
    sa.Column("combination_products", sa.Integer, nullable=True),
    sa.Column("stock_model", sa.String(16), nullable=True),
)
"""Per client: the size of the catalogue at its last full read (to choose between reading it
and looking codes up), when combination products were last looked for, and how the store
keeps stock of product options: ``variations`` (4.10+, products carry ``parent_product_id``)
or ``combinations`` (up to 4.9, products with ``tracking: O``); NULL until seen."""

stock_reports = sa.Table(
    "stock_reports",
    metadata,
    sa.Column("client_id", sa.String(64), primary_key=True),
    sa.Column("event_id", sa.String(200), primary_key=True),
    sa.Column("taken_at", UtcDateTime(), nullable=False),
    sa.Column("items", sa.Integer, nullable=False),
    sa.Column("written", sa.Integer, nullable=False),
    sa.Column("unchanged", sa.Integer, nullable=False),
    sa.Column("unknown", sa.Integer, nullable=False),
    sa.Column("untracked", sa.Integer, nullable=False),
    sa.Column("stale", sa.Integer, nullable=False),
    sa.Column("refused", sa.Integer, nullable=False),
    sa.Column("unknown_skus", sa.Text, nullable=False),
    sa.Column("untracked_skus", sa.Text, nullable=False),
    sa.Column("refused_skus", sa.Text, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
)
"""One row per message (the last complete run of it): what it did, for support tools."""


# --- pure parts ----------------------------------------------------------------------------------


def target_quantities(items: Iterable[StockItem], settings: StockSettings) -> dict[str, int]:
    """The quantity to push per SKU, in message order. A SKU is its code without surrounding
    spaces (as product codes are matched). Duplicate SKUs: the last one wins."""
    targets: dict[str, int] = {}
    for item in items:
        quantity = item.available if settings.quantity == "available" else item.on_hand
        if settings.negative_as_zero and quantity < 0:
            quantity = 0
        sku = _code(item.sku) or item.sku  # all blanks: kept, to be reported unknown
        targets.pop(sku, None)  # keep the position of the last occurrence
        targets[sku] = quantity
    return targets


T = TypeVar("T")


def _chunks(values: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _code(value: str) -> str:
    return value.strip()


# --- one message -----------------------------------------------------------------------------


@dataclass
class _Holder:
    """Where one SKU's stock lives in the store, with the amount read just now."""

    kind: Literal["product", "combination"]
    ref: str  # product id, or combination hash
    amount: int
    parent_product_id: int = 0

    @property
    def label(self) -> str:
        return f"{self.kind} {self.ref}"


@dataclass
class _Tally:
    items: int
    written: int = 0
    unchanged: int = 0
    stale: int = 0
    unknown: int = 0
    untracked: int = 0
    refused: int = 0
    unknown_skus: list[str] = field(default_factory=list)
    untracked_skus: list[str] = field(default_factory=list)
    refused_skus: list[str] = field(default_factory=list)

    def note(self, kind: Literal["unknown", "untracked", "refused"], sku: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        kept: list[str] = getattr(self, f"{kind}_skus")
        if len(kept) < REPORT_KEEP:
            kept.append(sku)


def _sku_text(skus: list[str], total: int) -> str:
    text = ", ".join(skus)
    if total > len(skus):
        text += f" (and {total - len(skus)} more)"
    if len(text) > REPORT_TEXT:
        text = text[: REPORT_TEXT - 1] + "…"
    return text


class _SnapshotRun:
    """Applies one message for one client; the client's stock lock is held by the caller."""

    def __init__(
        self,
        *,
        state: StateStore,
        store: CsCartClient,
        settings: ClientSettings,
        event: StockSnapshot,
        targets: dict[str, int],
        attempt: int,
    ) -> None:
        self.state = state
        self.store = store
        self.client_id = settings.client_id
        self.event = event
        self.taken_at = event.taken_at.astimezone(UTC)
        self.targets = targets
        self.attempt = attempt
        self.page_size = max(settings.limits.page_size, MIN_LISTING_PAGE)
        self.tally = _Tally(items=len(event.items))
        self.log = log.bind(client_id=self.client_id, event_id=event.event_id)
        self.reads = 0  # listing and lookup calls made, for the summary line
        self.stock_model: str | None = None  # seen in this run: variations | combinations

    # --- the steps ------------------------------------------------------------------------

    def run(self) -> _Tally:
        started = time.monotonic()
        self._drop_stale()
        holders = self._locate()
        self._apply(holders)
        self._report(time.monotonic() - started)
        if self.tally.refused:
            raise StoreRefused(
                f"products.update: the store refused {self.tally.refused} of the snapshot's "
                f"quantities (SKUs: {', '.join(self.tally.refused_skus[:10])}); the rest was "
                "applied",
                action="Check those products in CS-Cart (the dead letter's reason and the "
                "stock report name them), then replay: only what still differs is written.",
            )
        return self.tally

    def _drop_stale(self) -> None:
        """Forget the SKUs a newer snapshot already set."""
        skus = list(self.targets)
        newer: list[str] = []
        with self.state.engine.connect() as conn:
            for chunk in _chunks(skus):
                rows = conn.execute(
                    sa.select(stock_applied.c.sku, stock_applied.c.taken_at).where(
                        stock_applied.c.client_id == self.client_id,
                        stock_applied.c.sku.in_(chunk),
                    )
                )
                newer.extend(sku for sku, at in rows if at > self.taken_at)
        for sku in newer:
            del self.targets[sku]
        self.tally.stale = len(newer)
        if newer:
            self.log.info(
                "stock.stale_items_ignored",
                stale=len(newer),
                skus=newer[:REPORT_SAMPLE],
                taken_at=self.taken_at.isoformat(),
            )

    def _locate(self) -> dict[str, list[_Holder]]:
        """Where each SKU's stock lives and its amount now; notes unknown and untracked."""
        wanted = {sku for sku in self.targets if _code(sku)}
        found: dict[str, list[_Holder]] = {}
        untracked: set[str] = set()  # tracking "D": not tracked at all
        per_combination: dict[str, int] = {}  # tracking "O": its combinations hold the stock

        def take(product: CartProduct) -> None:
            self._learn_model(product)
            code = _code(product.product_code)
            if code not in wanted:
                return
            if product.tracking == "D":
                untracked.add(code)
            elif product.tracking == "O":
                per_combination[code] = product.product_id
            else:  # "B", or a version that leaves it out: the product's own amount
                found.setdefault(code, []).append(
                    _Holder("product", str(product.product_id), product.amount)
                )

        def look_up(codes: Iterable[str]) -> None:
            for code in codes:
                self.reads += 1
                for product in self.store.find_products_by_code(code):
                    take(product)

        mapped = self._mapped_combinations(sorted(wanted))
        lookups = [code for code in self.targets if code in wanted and code not in mapped]
        combination_products: list[int] | None = None
        looked_up = self._look_up_each(len(lookups))
        if looked_up:
            look_up(lookups)
        else:
            combination_products = self._scan(take)

        # Option combinations (stores up to 4.9): every SKU no tracked product holds.
        pending = wanted - found.keys() - untracked
        if pending:
            found.update(
                self._combinations(pending, mapped, per_combination, combination_products)
            )
            if looked_up:
                # Mapped to a combination that is gone (an upgrade to 4.10 turns combinations
                # into variations, codes kept): perhaps a product has the code now.
                gone = [code for code in self.targets if code in mapped and code not in found]
                look_up(gone)
        untracked |= per_combination.keys() - found.keys()
        self._save_model()

        by_sku: dict[str, list[_Holder]] = {}
        for sku in self.targets:
            if sku in found:
                by_sku[sku] = found[sku]
            elif sku in untracked:
                self.tally.note("untracked", sku)
            else:
                self.tally.note("unknown", sku)
        return by_sku

    def _apply(self, holders: dict[str, list[_Holder]]) -> None:
        """Write what differs, SKU by SKU, recording each as applied once it is durable."""
        equal: list[dict[str, Any]] = []
        try:
            for sku, quantity in self.targets.items():
                places = holders.get(sku)
                if not places:
                    continue
                changed = False
                try:
                    for holder in places:
                        if holder.amount != quantity:
                            self._write(holder, quantity)
                            changed = True
                except NotFound:
                    # Deleted in the store since it was read: the same as unknown.
                    self.tally.note("unknown", sku)
                    continue
                except StoreRefused as exc:
                    self.tally.note("refused", sku)
                    self.log.warning("stock.write_refused", sku=sku, reason=exc.reason)
                    if self.tally.refused >= REFUSALS_BEFORE_GIVING_UP and not self.tally.written:
                        raise  # the store refuses every write: no point trying the rest
                    continue
                row = self._applied_row(sku, quantity)
                if changed:
                    self.tally.written += 1
                    metrics.STOCK_WRITTEN.labels(self.client_id).inc()
                    self._record([row])
                else:
                    self.tally.unchanged += 1
                    equal.append(row)
                    if len(equal) >= CHUNK:
                        self._record(equal)
                        equal = []
        finally:
            # Equal SKUs are recorded even when a write failed: they are as applied as can be.
            if equal:
                try:
                    self._record(equal)
                except Exception:
                    self.log.exception("stock.record_failed", rows=len(equal))

    def _write(self, holder: _Holder, quantity: int) -> None:
        if holder.kind == "product":
            self.store.update_product_amount(int(holder.ref), quantity)
        else:
            self.store.update_combination_amount(holder.ref, quantity)

    def _report(self, seconds: float) -> None:
        tally = self.tally
        # Written is counted as each write happens; the rest once per complete run, so a
        # message retried after a failure does not count them twice.
        metrics.STOCK_UNCHANGED.labels(self.client_id).inc(tally.unchanged)
        if tally.stale:
            metrics.STOCK_STALE.labels(self.client_id).inc(tally.stale)
        if tally.unknown:
            metrics.STOCK_UNKNOWN_SKUS.labels(self.client_id).inc(tally.unknown)
        if tally.untracked:
            metrics.STOCK_UNTRACKED.labels(self.client_id).inc(tally.untracked)
        values = {
            "client_id": self.client_id,
            "event_id": self.event.event_id,
            "taken_at": self.taken_at,
            "items": tally.items,
            "written": tally.written,
            "unchanged": tally.unchanged,
            "unknown": tally.unknown,
            "untracked": tally.untracked,
            "stale": tally.stale,
            "refused": tally.refused,
            "unknown_skus": _sku_text(tally.unknown_skus, tally.unknown),
            "untracked_skus": _sku_text(tally.untracked_skus, tally.untracked),
            "refused_skus": _sku_text(tally.refused_skus, tally.refused),
            "attempt": self.attempt,
            "created_at": utcnow(),
        }
        with self.state.transaction() as conn:
            self.state.upsert(conn, stock_reports, values, key=["client_id", "event_id"])
        if not tally.refused:
            metrics.LAST_STOCK_PUSH.labels(self.client_id).set_to_current_time()
        self.log.info(
            "stock.snapshot_applied",
            taken_at=self.taken_at.isoformat(),
            items=tally.items,
            skus=len(self.targets) + tally.stale,
            written=tally.written,
            unchanged=tally.unchanged,
            unknown=tally.unknown,
            untracked=tally.untracked,
            stale=tally.stale,
            refused=tally.refused,
            unknown_skus=tally.unknown_skus[:REPORT_SAMPLE],
            untracked_skus=tally.untracked_skus[:REPORT_SAMPLE],
            store_reads=self.reads,
            seconds=round(seconds, 3),
        )

    # --- reading the store ------------------------------------------------------------------

    def _catalogue(self) -> dict[str, Any]:
        with self.state.engine.connect() as conn:
            row = conn.execute(
                sa.select(stock_catalogue).where(stock_catalogue.c.client_id == self.client_id)
            ).first()
        return dict(row._mapping) if row is not None else {}

    def _save_catalogue(self, **values: Any) -> None:
        with self.state.transaction() as conn:
            self.state.upsert(
                conn, stock_catalogue, {"client_id": self.client_id, **values}, key=["client_id"]
            )

    def _learn_model(self, product: CartProduct) -> None:
        if product.tracking == "O":
            self.stock_model = "combinations"
        elif self.stock_model is None and "parent_product_id" in product.model_fields_set:
            self.stock_model = "variations"

    def _save_model(self) -> None:
        if self.stock_model is None:
            return
        known = self._catalogue()
        if known.get("stock_model") != self.stock_model:
            self._save_catalogue(stock_model=self.stock_model)
            self.log.info("stock.store_model", stock_model=self.stock_model)

    def _look_up_each(self, lookups: int) -> bool:
        """Whether looking codes up one by one costs fewer requests than a full read."""
        known = self._catalogue()
        products, size = known.get("products"), known.get("page_size") or self.page_size
        if products is None:  # never read in full: guess by the message alone
            return lookups <= SMALL_MESSAGE_SKUS
        pages = max(1, -(-int(products) // int(size)))
        return lookups <= pages  # a tie: a lookup is the lighter request for the store

    def _scan(self, take: Callable[[CartProduct], None]) -> list[int]:
        """Read the whole catalogue once; return the products that keep stock per combination."""
        combination_products: list[int] = []
        count = 0
        for product in self.store.iter_products(page_size=self.page_size):
            count += 1
            if product.tracking == "O":
                combination_products.append(product.product_id)
            take(product)
        self.reads += max(1, -(-count // self.page_size))
        self._save_catalogue(scanned_at=utcnow(), products=count, page_size=self.page_size)
        return combination_products

    def _mapped_combinations(self, codes: list[str]) -> dict[str, int]:
        """Cached SKU → parent product of the combinations among ``codes``."""
        mapped: dict[str, int] = {}
        with self.state.engine.connect() as conn:
            for chunk in _chunks(codes):
                rows = conn.execute(
                    sa.select(stock_product_map.c.sku, stock_product_map.c.parent_product_id)
                    .where(
                        stock_product_map.c.client_id == self.client_id,
                        stock_product_map.c.kind == "combination",
                        stock_product_map.c.sku.in_(chunk),
                    )
                )
                mapped.update({sku: int(parent) for sku, parent in rows})
        return mapped

    def _combinations(
        self,
        pending: set[str],
        mapped: dict[str, int],
        per_combination: dict[str, int],
        combination_products: list[int] | None,
    ) -> dict[str, list[_Holder]]:
        """Holders of the pending codes among option combinations: first through the cached
        mapping and the ``tracking: O`` products sent by their own code (reading a product's
        combinations gives their amounts and refreshes its mapping), then, for codes still
        missing, by listing combination products not listed recently (a catalogue read finds
        them; a small message reads the catalogue for that at most every
        ``DISCOVERY_INTERVAL``)."""
        found: dict[str, list[_Holder]] = {}
        listed: set[int] = set()

        def list_parent(parent: int) -> None:
            listed.add(parent)
            for combo in self._read_combinations(parent):
                code = _code(combo.product_code)
                if code in pending:
                    found.setdefault(code, []).append(
                        _Holder("combination", combo.combination_hash, combo.amount, parent)
                    )

        known = {mapped[code] for code in pending if code in mapped}
        for parent in sorted(known | set(per_combination.values())):
            list_parent(parent)
        missing = pending - found.keys() - per_combination.keys()
        if not missing:
            return found

        now = utcnow()
        if combination_products is None:
            catalogue = self._catalogue()
            model = self.stock_model or catalogue.get("stock_model")
            if model == "variations":
                return found  # a 4.10+ store has no option combinations
            last = catalogue.get("discovered_at")
            if last is not None and now - last < DISCOVERY_INTERVAL:
                return found  # looked recently: these SKUs are unknown (or untracked)
            combination_products = self._scan(self._learn_model)
        fresh = self._fresh_parents(now - PARENT_MAX_AGE)
        for parent in combination_products:
            if parent not in listed and parent not in fresh:
                list_parent(parent)
        self._save_catalogue(discovered_at=now, combination_products=len(combination_products))
        return found

    def _fresh_parents(self, since: datetime) -> set[int]:
        """Combination products whose combinations were all listed since ``since``."""
        with self.state.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    stock_product_map.c.parent_product_id,
                    sa.func.min(stock_product_map.c.refreshed_at),
                )
                .where(stock_product_map.c.client_id == self.client_id)
                .group_by(stock_product_map.c.parent_product_id)
            )
            return {int(parent) for parent, oldest in rows if oldest >= since}

    def _read_combinations(self, parent: int) -> list[CartCombination]:
        """One product's combinations, read now; the mapping of that product is refreshed."""
        self.reads += 1
        try:
            combos = [c for c in self.store.iter_combinations(parent) if _code(c.product_code)]
        except NotFound:
            combos = []  # the product is gone: so is its part of the mapping
        now = utcnow()
        seen: dict[str, CartCombination] = {}
        for combo in combos:
            seen.setdefault(_code(combo.product_code), combo)
        with self.state.transaction() as conn:
            conn.execute(
                stock_product_map.delete().where(
                    stock_product_map.c.client_id == self.client_id,
                    stock_product_map.c.parent_product_id == parent,
                    stock_product_map.c.sku.not_in(list(seen)) if seen else sa.true(),
                )
            )
            rows = [
                {
                    "client_id": self.client_id,
                    "sku": code,
                    "kind": "combination",
                    "ref": combo.combination_hash,
                    "parent_product_id": parent,
                    "refreshed_at": now,
                }
                for code, combo in seen.items()
            ]
            self.state.upsert_many(conn, stock_product_map, rows, key=["client_id", "sku"])
        return combos

    # --- recording ------------------------------------------------------------------------

    def _applied_row(self, sku: str, quantity: int) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "sku": sku,
            "taken_at": self.taken_at,
            "quantity": quantity,
            "applied_at": utcnow(),
        }

    def _record(self, rows: list[dict[str, Any]]) -> None:
        """Record SKUs as applied, never over a newer snapshot's record."""
        with self.state.transaction() as conn:
            self.state.upsert_many(
                conn,
                stock_applied,
                rows,
                key=["client_id", "sku"],
                where=lambda excluded: stock_applied.c.taken_at <= excluded.taken_at,
            )


# --- the handler ---------------------------------------------------------------------------------


class StockSnapshotHandler:
    """The stock-snapshot consumer's job (one message = one client's snapshot, or part of it)."""


    def __init__(self, services: Services) -> None:
        self.services = services

    def handle(self, event: StockSnapshot, delivery: Delivery) -> None:
        settings = self.services.clients.require(event.client_id)
        client_id = settings.client_id
        if not settings.stock.update_stock:
            metrics.STOCK_SNAPSHOTS_IGNORED.labels(client_id).inc()
            log.info(
                "stock.snapshot_ignored",
                client_id=client_id,
                event_id=event.event_id,
                reason="update_stock is off for this client",
                items=len(event.items),
            )
            return
        targets = target_quantities(event.items, settings.stock)
        if len(targets) < len(event.items):
            log.info(
                "stock.duplicate_skus",
                client_id=client_id,
                event_id=event.event_id,
                duplicates=len(event.items) - len(targets),
                rule="the last item of a SKU wins",
            )
        store: CsCartClient = self.services.stores.for_client(settings)
        with self.services.state.client_lock("stock", client_id, wait=LOCK_WAIT_SECONDS):
            _SnapshotRun(
                state=self.services.state,
                store=store,
                settings=settings,
                event=event,
                targets=targets,
                attempt=delivery.attempt,
            ).run()

