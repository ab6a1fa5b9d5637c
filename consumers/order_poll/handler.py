"""Orders pulling: one tick, one poll of the client's store; each new order that passes the
client's filters goes to FM once, as ``order.imported``.

One poll per client across replicas (a lock that dies with its holder); a crash's claimed
orders are published first (the outbox: same ``event_id``, same bytes); the store is listed
by placement time so no order leaving the listing shifts another out of it; the watermark
moves only once the run succeeded, never ahead of the store's clock. The whole story:
docs/jobs.md.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from pydantic import ValidationError
from sqlalchemy.engine import Connection

from consumers.order_poll.filters import (
    ALREADY_IMPORTED,
    COUNTRY,
    RECORDED_REASONS,
    UNMAPPABLE,
    Filters,
    Verdict,
    build_filters,
    judge,
)
from consumers.order_poll.listing import (
    Listing,
    Plan,
    load_watermark,
    plan_listing,
    save_watermark,
)
from consumers.order_poll.mapping import to_message, validation_summary
from consumers.order_poll.tables import IMPORTED, imported_entry, order_decisions
from consumers.services import Services
from cscart.client import CsCartClient
from cscart_fm.core import metrics
from cscart_fm.core.errors import NotFound, StoreRefused
from cscart_fm.core.outbox import Entry, Outbox, OutboxTable
from cscart_fm.core.runtime import Delivery
from cscart_fm.core.state import utcnow
from schemas.cscart import CartOrder
from schemas.messages import OrderPollTick
from schemas.settings import ClientSettings

log = structlog.get_logger(__name__)

POLL_LOCK = "order-poll"  # the lock's key, as replicas of the last release take it
"""One poll per client across replicas: the name of its lock."""
DECISION_RETENTION = timedelta(days=180)


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


Skip = tuple[CartOrder, Verdict]


class PollRun:
    """One poll of one client, holding its lock."""

    def __init__(self, handler: OrderPollHandler, settings: ClientSettings) -> None:
        self.handler = handler
        self.services = handler.services
        self.state = handler.services.state
        self.settings = settings
        self.client_id = settings.client_id
        self.store: CsCartClient = handler.services.stores.for_client(settings)
        self.outbox = Outbox(
            self.state,
            self.services.publisher,
            self.client_id,
            (IMPORTED,),
            with_published=self.forget_decisions,
            count_published=self.count_imported,
        )
        self.skipped: dict[str, int] = {}
        self.imported = 0

    def execute(self) -> dict[str, Any]:
        run_started = utcnow()
        republished = self.outbox.republish_claimed()
        filters = self.handler.filters(self.settings, self.store)
        watermark = load_watermark(self.services, self.client_id)
        plan = plan_listing(filters, watermark, self.store, time.time())
        mark = watermark.updated_mark if watermark is not None else None
        listing = self.list_and_import(plan, filters)
        candidate = listing.mark()
        if candidate is not None:
            mark = candidate if mark is None else max(mark, candidate)
        save_watermark(self.services, self.client_id, plan, filters, mark, run_started)
        self.handler.maybe_prune(self.client_id)
        return {
            "mode": plan.mode,
            "listed": listing.listed,
            "imported": self.imported,
            "republished": republished,
            "skipped": dict(self.skipped),
        }

    def list_and_import(self, plan: Plan, filters: Filters) -> Listing:
        """List, judge, claim, publish and record, a page at a time, pipelined: a page's
        confirms come back while the next page is judged, and one transaction per page
        records the previous page as published, keeps this page's skips and claims its
        orders."""
        listing = Listing(started=time.time())
        pages = self.store.order_pages(
            statuses=plan.statuses,
            time_from=plan.time_from,
            updated_from=plan.updated_from,
            page_size=self.settings.limits.page_size,
        )
        with self.outbox.pipeline() as pipeline:
            for page in pages:
                listing.note(page)
                ready, skips, prior = self.judge_page(page, plan, filters)
                changed = self.decisions_to_keep(skips, prior)
                claimed = pipeline.page(ready, self.keep_decisions(changed))
                if len(claimed) < len(ready):  # claimed meanwhile by another run
                    self.count_skip(ALREADY_IMPORTED, len(ready) - len(claimed))
        return listing

    def judge_page(
        self, batch: Sequence[CartOrder], plan: Plan, filters: Filters
    ) -> tuple[list[Entry], list[Skip], dict[int, tuple[str, str]]]:
        """The page's orders to claim (each mapped to its message), those skipped, and the
        skip decisions recorded before for the page's orders."""
        ids = [order.order_id for order in batch]
        known = self.outbox.known(IMPORTED, [(oid,) for oid in ids])
        prior = self.prior_decisions(ids)
        ready: list[Entry] = []
        skips: list[Skip] = []
        for order in batch:
            if (order.order_id,) in known:
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
                ready.append(imported_entry(to_message(order, filters)))
            except ValidationError as exc:
                detail = f"cannot be mapped to order.imported: {validation_summary(exc)}"
                log.error("order cannot be published", cart_order_id=order.order_id, error=detail)
                skips.append((order, Verdict(UNMAPPABLE, detail)))
        return ready, skips, prior

    # --- skip decisions (for explain) ------------------------------------------------------------

    def prior_decisions(self, ids: Sequence[int]) -> dict[int, tuple[str, str]]:
        table = order_decisions
        with self.state.engine.connect() as conn:
            rows = conn.execute(
                sa.select(table.c.cart_order_id, table.c.reason, table.c.cart_status).where(
                    table.c.client_id == self.client_id, table.c.cart_order_id.in_(ids)
                )
            ).all()
        return {row.cart_order_id: (row.reason, row.cart_status) for row in rows}

    def decisions_to_keep(
        self, skips: Sequence[Skip], prior: Mapping[int, tuple[str, str]]
    ) -> list[Skip]:
        """Count the skips; those to keep for ``explain``: recorded reasons that changed (so
        that listing the same orders again costs no write, and counts them once)."""
        changed = []
        for order, verdict in skips:
            assert verdict.reason is not None
            if verdict.reason not in RECORDED_REASONS:
                self.count_skip(verdict.reason)
            elif prior.get(order.order_id) != (verdict.reason, order.status):
                self.count_skip(verdict.reason)
                changed.append((order, verdict))
        return changed

    def keep_decisions(self, changed: Sequence[Skip]) -> Callable[[Connection], None] | None:
        """Writes the skips in the page's transaction (None: nothing to write)."""
        if not changed:
            return None

        def write(conn: Connection) -> None:
            now = utcnow()
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

        return write

    def forget_decisions(self, conn: Connection, published: Sequence[Entry]) -> None:
        """An order recorded published is no longer skipped (in the same transaction)."""
        ids = [entry.key[0] for entry in published if entry.box is IMPORTED]
        conn.execute(
            sa.delete(order_decisions).where(
                order_decisions.c.client_id == self.client_id,
                order_decisions.c.cart_order_id.in_(ids),
            )
        )

    # --- counters ---------------------------------------------------------------------------------

    def count_skip(self, reason: str, n: int = 1) -> None:
        metrics.ORDERS_SKIPPED.labels(self.client_id, reason).inc(n)
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def count_imported(self, box: OutboxTable, count: int) -> None:
        metrics.ORDERS_IMPORTED.labels(self.client_id).inc(count)
        self.imported += count


__all__ = ["POLL_LOCK", "OrderPollHandler", "PollRun"]
