"""Tracking push: a consignment FM lodged becomes one CS-Cart shipment, then the order status.

Exactly once although the broker delivers at least once: the shipment is recorded per
(client, shipment_ref), carries an ``FM ref`` marker that is read back before any POST (a
crash or a timed-out POST leaves no second shipment), and read-back and creation run under a
lock every replica shares. The whole story: docs/jobs.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import structlog

from consumers.services import Services
from cscart.client import CsCartClient
from cscart.statuses import resolve_status
from cscart_fm.core import metrics
from cscart_fm.core.errors import (
    InvalidMessage,
    NotFound,
    StoreMismatch,
    StoreOutcomeUnknown,
    StoreRefused,
    StoreUnreachable,
)
from cscart_fm.core.runtime import Delivery
from cscart_fm.core.state import UtcDateTime, metadata, utcnow
from schemas.cscart import CartOrder, CartOrderLine, CartShipment
from schemas.messages import ShipmentLodged
from schemas.settings import ClientSettings

log = structlog.get_logger(__name__)

# --- state ----------------------------------------------------------------------------------

pushed_shipments = sa.Table(
    "pushed_shipments",
    metadata,
    sa.Column("client_id", sa.String(64), primary_key=True),
    sa.Column("shipment_ref", sa.String(200), primary_key=True),
    sa.Column("cart_order_id", sa.BigInteger, nullable=False),
    sa.Column("shipment_id", sa.BigInteger, nullable=True),
    # "shipped", "partially_shipped", or "none" (the client's settings leave the status alone)
    sa.Column("status_kind", sa.String(32), nullable=True),
    sa.Column("status_done", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    # The console's "last shipment pushed" per client.
    sa.Index("ix_pushed_shipments_client_created", "client_id", "created_at"),
)

# --- carriers and the marker -----------------------------------------------------------------

CARRIER_CODES: Mapping[str, str] = {
    "australiapost": "aup",
    "auspost": "aup",
    "aup": "aup",
    "usps": "usps",
    "unitedstatespostalservice": "usps",
    "ups": "ups",
    "fedex": "fedex",
    "dhl": "dhl",
    "dhlexpress": "dhl",
    "canadapost": "can",
    "can": "can",
    "swisspost": "swisspost",
    "temando": "temando",
}
"""FM's carrier names (case, spaces and punctuation ignored) → the codes CS-Cart builds a
tracking link for. Any other carrier is sent by name."""

MARKER = "FM ref"
"""Written in every shipment's comments as ``FM ref <shipment_ref>``: how a shipment created
by an earlier attempt is recognised in the store."""

LOCK_WAIT_SECONDS = 60.0
LOCK_BUCKETS = 1024
"""Read-back and creation lock per order; orders share 1,024 locks per client so that the
SQLite lock files stay few (a PostgreSQL advisory lock leaves nothing behind anyway)."""
MAX_LISTED = 10


def carrier_code(name: str | None) -> str | None:
    """CS-Cart's code for a carrier FM names, or None when CS-Cart does not know it."""
    if not name:
        return None
    return CARRIER_CODES.get(re.sub(r"[^a-z0-9]", "", name.lower()))


def marker(shipment_ref: str) -> str:
    return f"{MARKER} {shipment_ref}"


def carries_marker(comments: str, shipment_ref: str) -> bool:
    """Whether a shipment's comments name exactly this ref (``FM-1`` is not ``FM-12``)."""
    pattern = r"(?:^|[\s>])" + re.escape(marker(shipment_ref)) + r"(?=$|[\s<])"
    return re.search(pattern, comments) is not None


def _listed(values: Iterable[str]) -> str:
    values = list(dict.fromkeys(values))
    shown = ", ".join(values[:MAX_LISTED])
    return shown + (f" and {len(values) - MAX_LISTED} more" if len(values) > MAX_LISTED else "")


# --- allocation -------------------------------------------------------------------------------


def allocate(order: CartOrder, event: ShipmentLodged, where: str) -> dict[str, int]:
    """Item id → amount for the consignment's lines; StoreMismatch naming every problem.

    A SKU matches the order's ``product_code`` exactly, or case-insensitively when nothing
    matches exactly. Several items with the same SKU are filled in the order's item order,
    each up to what is left to ship on it (ordered less already shipped); several lines with
    the same SKU draw on the same items. Nothing is ever shipped beyond what is left.
    """
    items = order.lines
    left = {line.item_id: max(0, line.amount - line.shipped_amount) for line in items}
    wanted: dict[str, int] = {}
    for consigned in event.lines:
        wanted[consigned.sku] = wanted.get(consigned.sku, 0) + consigned.quantity
    products: dict[str, int] = {}
    problems: list[str] = []
    for sku, quantity in wanted.items():
        matches = _items_for(items, sku)
        if not matches:
            on_order = _listed(line.product_code for line in items if line.product_code)
            problems.append(
                f"SKU {sku} is not on {where}" + (f" (its SKUs: {on_order})" if on_order else "")
            )
            continue
        available = sum(left[line.item_id] for line in matches)
        if quantity > available:
            ordered = sum(line.amount for line in matches)
            shipped = sum(line.shipped_amount for line in matches)
            problems.append(
                f"ships {quantity} × {sku} but {where} has {available} left to ship "
                f"(ordered {ordered}, already shipped {shipped})"
            )
            continue
        for line in matches:
            take = min(quantity, left[line.item_id])
            if take <= 0:
                continue
            products[line.item_id] = products.get(line.item_id, 0) + take
            left[line.item_id] -= take
            quantity -= take
            if quantity == 0:
                break
    if problems:
        raise StoreMismatch(
            "; ".join(problems),
            action="The consignment does not match the order in CS-Cart (see the reason). "
            "Correct the SKUs or quantities in FM, or the order in CS-Cart (a product code "
            "changed, a shipment made by hand), then replay. Nothing was shipped.",
        )
    return products


def _items_for(items: list[CartOrderLine], sku: str) -> list[CartOrderLine]:
    exact = [line for line in items if line.product_code == sku]
    if exact:
        return exact
    folded = sku.strip().casefold()
    return [line for line in items if line.product_code.strip().casefold() == folded]


# --- the handler ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    cart_order_id: int
    shipment_id: int | None
    status_kind: str | None
    status_done: bool


class ShipmentLodgedHandler:

    def __init__(self, services: Services) -> None:
        self.services = services
        self.state = services.state

    # --- entry ----------------------------------------------------------------------------

    def handle(self, event: ShipmentLodged, delivery: Delivery) -> None:
        settings = self.services.clients.require(event.client_id)
        with structlog.contextvars.bound_contextvars(
            shipment_ref=event.shipment_ref, redelivered=delivery.redelivered
        ):
            self._handle(settings, event)

    def _handle(self, settings: ClientSettings, event: ShipmentLodged) -> None:
        client_id = settings.client_id
        tracking = settings.tracking
        order_id = self._order_id(settings, event)
        where = f"order {order_id} ({event.order_no})"
        record = self._load(client_id, event.shipment_ref)
        if record is not None and record.cart_order_id != order_id:
            raise StoreMismatch(
                f"shipment_ref {event.shipment_ref} was already pushed for order "
                f"{record.cart_order_id}, and this event names {where}",
                action="FM used one consignment reference for two orders. Check the "
                "consignment in FM; once corrected, send it with its own shipment_ref.",
            )
        want_shipment = tracking.update_tracking_number
        shipment_done = record is not None and record.shipment_id is not None
        status_done = record is not None and record.status_done
        if (shipment_done or not want_shipment) and status_done:
            if shipment_done:
                metrics.SHIPMENTS_ALREADY_PUSHED.labels(client_id).inc()
            log.info("shipment event already handled", order_id=order_id)
            return
        store: CsCartClient = self.services.stores.for_client(settings)
        order: CartOrder | None = None
        if want_shipment and not shipment_done:
            order = self._push_shipment(settings, store, event, order_id, where)
            if order is None:  # another worker recorded the shipment while we waited
                record = self._load(client_id, event.shipment_ref)
                status_done = record is not None and record.status_done
        elif not want_shipment:
            log.info("update_tracking_number is off: no shipment created", order_id=order_id)
        if not status_done:
            self._update_status(settings, store, event, order_id, where, order)

    # --- the order ------------------------------------------------------------------------

    @staticmethod
    def _order_id(settings: ClientSettings, event: ShipmentLodged) -> int:
        if event.cart_order_id is not None:
            return event.cart_order_id
        order_id = settings.orders.order_id(event.order_no)
        if order_id is not None:
            return order_id
        prefix, number = settings.orders.prefix, event.order_no.strip()
        action = (
            "order_no must be the client's prefix followed by the CS-Cart order id. Check "
            "orders.prefix in the clients file (changed since the order was imported?) or have "
            "FM send cart_order_id, then replay."
        )
        if prefix and not number.casefold().startswith(prefix.casefold()):
            raise InvalidMessage(
                f"order_no {number[:60]!r} does not start with client {settings.client_id}'s "
                f"prefix {prefix!r}, and the event has no cart_order_id",
                action=action,
            )
        raise InvalidMessage(
            f"order_no {event.order_no[:60]!r} less client {settings.client_id}'s prefix "
            f"{prefix!r} is not a CS-Cart order id (digits), and the event has no "
            "cart_order_id",
            action=action,
        )

    @staticmethod
    def _get_order(store: CsCartClient, order_id: int, where: str) -> CartOrder:
        try:
            return store.get_order(order_id)
        except NotFound as exc:
            raise NotFound(
                f"{where} is not in the store ({exc.reason})",
                status=exc.status,
                action="Check the order number and the client's prefix (orders.prefix) against "
                "the orders in CS-Cart; if the order was deleted there, discard the dead letter, "
                "otherwise fix it and replay.",
            ) from None

    # --- the shipment ---------------------------------------------------------------------

    def _push_shipment(
        self,
        settings: ClientSettings,
        store: CsCartClient,
        event: ShipmentLodged,
        order_id: int,
        where: str,
    ) -> CartOrder | None:
        """Create the shipment unless it exists; return the order as read before it (None when
        another worker recorded the shipment meanwhile)."""
        client_id = settings.client_id
        ref = event.shipment_ref
        job = f"shipment-{order_id % LOCK_BUCKETS}"
        with self.state.client_lock(job, client_id, wait=LOCK_WAIT_SECONDS):
            record = self._load(client_id, ref)
            if record is not None and record.shipment_id is not None:
                metrics.SHIPMENTS_ALREADY_PUSHED.labels(client_id).inc()
                return None
            order = self._get_order(store, order_id, where)
            existing = self._find_ours(store, order_id, ref)
            if existing is not None:
                # Created by an earlier attempt that died (or timed out) before recording it.
                self._save(client_id, ref, order_id, shipment_id=existing.shipment_id)
                metrics.SHIPMENTS_ALREADY_PUSHED.labels(client_id).inc()
                log.info(
                    "shipment already in the store: adopted",
                    order_id=order_id,
                    shipment_id=existing.shipment_id,
                )
                return order
            products = allocate(order, event, where)
            shipping_id = next((s.shipping_id for s in order.shipping if s.shipping_id > 0), 0)
            if not shipping_id:
                raise StoreMismatch(
                    f"{where} has no shipping method, and CS-Cart needs one to create a shipment",
                    action="Set a shipping method on the order in CS-Cart, then replay.",
                )
            code = carrier_code(event.carrier)
            comments = self._comments(settings, event, code)
            try:
                shipment_id = store.create_shipment(
                    order_id=order_id,
                    shipping_id=shipping_id,
                    tracking_number=event.tracking_number,
                    carrier=code or event.carrier,
                    comments=comments,
                    products=products,
                    notify_user=settings.tracking.notify_customer,
                )
            except StoreOutcomeUnknown as exc:
                # The POST may have been applied: read back before anything else.
                log.warning("shipment outcome unknown: reading back", order_id=order_id)
                existing = self._find_ours(store, order_id, ref)
                if existing is None:
                    raise StoreUnreachable(
                        f"{exc.reason}; read back: no shipment of {where} carries "
                        f"'{marker(ref)}', so it was not created. Retried later (reading back "
                        "first again)",
                        status=exc.status,
                    ) from None
                shipment_id = existing.shipment_id
            self._save(client_id, ref, order_id, shipment_id=shipment_id)
        metrics.SHIPMENTS_PUSHED.labels(client_id).inc()
        metrics.LAST_SHIPMENT_PUSH.labels(client_id).set_to_current_time()
        log.info(
            "shipment pushed",
            order_id=order_id,
            shipment_id=shipment_id,
            carrier=code or "by name",
            items=len(products),
        )
        return order

    @staticmethod
    def _comments(settings: ClientSettings, event: ShipmentLodged, code: str | None) -> str:
        """The shopper-visible comments: the tracking URL when it has to travel there (a
        carrier CS-Cart does not know, or no tracking number for it to build a link from),
        then our marker."""
        lines = []
        url = event.tracking_url
        if (
            url
            and settings.tracking.update_tracking_url
            and (code is None or not event.tracking_number)
        ):
            lines.append(f"Track your parcel: {url}")
        lines.append(marker(event.shipment_ref))
        return "\n".join(lines)

    @staticmethod
    def _find_ours(store: CsCartClient, order_id: int, ref: str) -> CartShipment | None:
        for shipment in store.list_shipments(order_id):
            if carries_marker(shipment.comments, ref):
                return shipment
        return None

    # --- the status -----------------------------------------------------------------------

    def _update_status(
        self,
        settings: ClientSettings,
        store: CsCartClient,
        event: ShipmentLodged,
        order_id: int,
        where: str,
        order: CartOrder | None,
    ) -> None:
        client_id = settings.client_id
        tracking = settings.tracking
        if event.backordered:
            kind, setting, wanted = (
                "partially_shipped",
                "partially_shipped_status",
                tracking.partially_shipped_status,
            )
        else:
            kind, setting, wanted = "shipped", "shipped_status", tracking.shipped_status
        if wanted is None:
            self._save(
                client_id, event.shipment_ref, order_id, status_kind="none", status_done=True
            )
            log.info("status left alone: the client sets none", order_id=order_id, kind=kind)
            return
        letter = self._resolve(settings, store, wanted, setting)
        if order is None:
            order = self._get_order(store, order_id, where)
        shipped_letter = (
            resolve_status(tracking.shipped_status, store.statuses.names())
            if kind == "partially_shipped" and tracking.shipped_status
            else None
        )
        if order.status == letter:
            log.info("order already has the status", order_id=order_id, status=letter)
        elif shipped_letter is not None and order.status == shipped_letter:
            # A late partial consignment never moves a shipped order back.
            log.info(
                "order already in the shipped status: partial status not set",
                order_id=order_id,
                status=order.status,
            )
        else:
            store.update_order_status(order_id, letter, notify_user=tracking.notify_customer)
            metrics.ORDER_STATUS_UPDATES.labels(client_id, kind).inc()
            log.info("order status set", order_id=order_id, status=letter, kind=kind)
        self._save(client_id, event.shipment_ref, order_id, status_kind=kind, status_done=True)

    def _resolve(
        self, settings: ClientSettings, store: CsCartClient, wanted: str, setting: str
    ) -> str:
        letter = store.statuses.resolve(wanted)
        if letter is None:
            statuses = store.statuses.names()
            known = _listed(f"{code} {name}".strip() for code, name in statuses.items())
            raise StoreRefused(
                f"tracking.{setting} {wanted!r} of client {settings.client_id} is not an order "
                f"status of the store (it has: {known})",
                action=f"Correct tracking.{setting} in the clients file (a letter or a status "
                "name the store lists), or add the status in CS-Cart, then replay. The shipment, "
                "if any, is already created; only the status is missing.",
            )
        return letter

    # --- state ------------------------------------------------------------------------------

    def _load(self, client_id: str, ref: str) -> _Record | None:
        table = pushed_shipments
        with self.state.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    table.c.cart_order_id,
                    table.c.shipment_id,
                    table.c.status_kind,
                    table.c.status_done,
                ).where(table.c.client_id == client_id, table.c.shipment_ref == ref)
            ).first()
        if row is None:
            return None
        return _Record(
            cart_order_id=int(row.cart_order_id),
            shipment_id=int(row.shipment_id) if row.shipment_id is not None else None,
            status_kind=row.status_kind,
            status_done=bool(row.status_done),
        )

    def _save(self, client_id: str, ref: str, order_id: int, **fields: Any) -> None:
        """Create the event's row if missing, then write ``fields``; committed on return."""
        table = pushed_shipments
        now = utcnow()
        with self.state.transaction() as conn:
            self.state.insert_ignore(
                conn,
                table,
                {
                    "client_id": client_id,
                    "shipment_ref": ref,
                    "cart_order_id": order_id,
                    "status_done": False,
                    "created_at": now,
                    "updated_at": now,
                },
            )
            conn.execute(
                table.update()
                .where(table.c.client_id == client_id, table.c.shipment_ref == ref)
                .values(**fields, updated_at=now)
            )

