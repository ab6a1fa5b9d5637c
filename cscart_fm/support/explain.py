"""Explain, for support: what the service did with an order, and what it would do now.

Plain English from what the jobs recorded and a live look at the store; never a shopper's
name, address or e-mail.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from consumers.order_poll.filters import FILTER_NAMES, judge
from consumers.order_poll.handler import OrderPollHandler
from consumers.order_poll.listing import load_watermark, plan_listing
from consumers.order_poll.tables import imported_orders, order_decisions
from consumers.services import Services
from consumers.shipment_lodged.handler import pushed_shipments
from cscart_fm.core.errors import NotFound, StoreError
from cscart_fm.core.outbox import PUBLISHED
from schemas.settings import OrderSettings


def order_ref(ref: int | str, orders: OrderSettings) -> int:
    """``1000012`` or the order_no ``CS1000012`` (the client's prefix, its case ignored)."""
    if isinstance(ref, int):
        return ref
    text = ref.strip()
    if text.isascii() and text.isdigit():
        return int(text)
    order_id = orders.order_id(text)
    if order_id is None:
        raise ValueError(
            f"{ref!r} is neither a CS-Cart order id nor an order_no with the prefix "
            f"{orders.prefix!r}"
        )
    return order_id


@dataclass(frozen=True)
class Consignment:
    """A shipment FM lodged for the order, as the tracking push recorded it."""

    shipment_ref: str
    shipment_id: int | None
    status_kind: str | None
    status_done: bool
    created_at: datetime


def consignments(services: Services, client_id: str, order_id: int) -> list[Consignment]:
    t = pushed_shipments
    with services.state.engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                t.c.shipment_ref, t.c.shipment_id, t.c.status_kind, t.c.status_done, t.c.created_at
            )
            .where(t.c.client_id == client_id, t.c.cart_order_id == order_id)
            .order_by(t.c.created_at)
        ).all()
    return [
        Consignment(
            shipment_ref=row.shipment_ref,
            shipment_id=row.shipment_id,
            status_kind=row.status_kind,
            status_done=bool(row.status_done),
            created_at=row.created_at,
        )
        for row in rows
    ]


def explain_order(services: Services, client_id: str, order_id: int | str) -> str:
    """Plain English: whether the order was imported (when, as what order_no), or which of
    the client's filters excludes it — from what the service recorded and a live look at the
    store. Never a shopper's name, address or e-mail. Raises UnknownClient, ValueError."""
    settings = services.clients.require(client_id)
    oid = order_ref(order_id, settings.orders)
    zone = settings.orders.zone
    out: list[str] = [f"Order {oid} of client {client_id} (order_no {settings.orders.prefix}{oid})"]

    def when(moment: datetime | None) -> str:
        if moment is None:
            return "(unknown time)"
        local = moment.astimezone(zone)
        return f"{local.isoformat(sep=' ', timespec='seconds')} ({local.tzname()})"

    with services.state.engine.connect() as conn:
        row = conn.execute(
            sa.select(imported_orders).where(
                imported_orders.c.client_id == client_id, imported_orders.c.cart_order_id == oid
            )
        ).first()
        decision = conn.execute(
            sa.select(order_decisions).where(
                order_decisions.c.client_id == client_id, order_decisions.c.cart_order_id == oid
            )
        ).first()
    watermark = load_watermark(services, client_id)

    out.append("What the service recorded:")
    if row is not None and row.state == PUBLISHED:
        out.append(
            f"  IMPORTED: published to FM on {when(row.published_at)} as {row.order_no} "
            f"(event_id {row.event_id}); it was in status {row.cart_status} then."
        )
    elif row is not None:
        out.append(
            f"  CLAIMED on {when(row.claimed_at)} as {row.order_no} (event_id {row.event_id}), "
            "but the publish is not recorded as confirmed yet: the next tick publishes it "
            "(again, with the same event_id)."
        )
    elif decision is not None:
        out.append(
            f"  NOT IMPORTED: on {when(decision.seen_at)}, in status {decision.cart_status}, "
            f"the {FILTER_NAMES.get(decision.reason, decision.reason)} filter excluded it: "
            f"{decision.detail}."
        )
    else:
        out.append(
            "  nothing: it was not imported, and no poll recorded it as excluded (orders "
            "outside the pulled statuses are not recorded)."
        )
    if watermark is None:
        out.append(f"  No successful poll of client {client_id} yet.")
    else:
        out.append(
            f"  Last successful poll of client {client_id}: {when(watermark.last_success_at)} "
            f"({watermark.last_mode} listing)."
        )

    out.append("In the store now:")
    handler = OrderPollHandler(services)
    store = services.stores.for_client(settings)
    try:
        order = store.get_order(oid)
        filters = handler.filters(settings, store, strict=False)
        plan = plan_listing(filters, watermark, store, time.time())
    except NotFound:
        out.append(f"  The store has no order {oid}.")
        return "\n".join(out)
    except StoreError as exc:
        out.append(f"  Could not look at the store: {exc.reason}")
        return "\n".join(out)
    parent = f", a vendor order of parent order {order.parent_order_id}" if (
        order.parent_order_id
    ) else ""
    out.append(
        f"  status {filters.status_label(order.status)}, placed {filters.local(order.timestamp)}"
        f", ships to {order.s_country.strip().upper() or 'no country'}{parent}."
    )
    if filters.missing:
        out.append(
            f"  Note: configured statuses the store does not have: {', '.join(filters.missing)}."
        )
    out.append(f"  The next tick lists {plan.describe(filters)} ({plan.mode} listing).")
    verdict = judge(order, filters, plan.lookback)
    assert verdict is not None
    if row is not None:
        out.append("  Already imported: it is never published again.")
        if verdict.reason is not None:
            out.append(
                f"  (Today the {FILTER_NAMES[verdict.reason]} filter would exclude it: "
                f"{verdict.detail}.)"
            )
    elif verdict.reason is not None:
        out.append(
            f"  NOT IMPORTED: the {FILTER_NAMES[verdict.reason]} filter excludes it: "
            f"{verdict.detail}."
        )
    elif (
        plan.mode == "incremental"
        and plan.updated_from is not None
        and order.updated_at is not None
        and order.updated_at < plan.updated_from
    ):
        out.append(
            "  It passes every filter, but it has not changed since "
            f"{filters.local(plan.updated_from)}, and ticks list only orders changed since the "
            "last poll: the next tick will not see it. Save the order in CS-Cart (any change) "
            "and the next tick imports it."
        )
    else:
        out.append(
            f"  It passes every filter: the next tick imports it as {filters.prefix}{oid}."
        )
    return "\n".join(out)
