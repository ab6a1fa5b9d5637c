"""The store's data: statuses, users, products and their stock, option combinations, orders
and shipments, with the indexes a real store answers from.

Kept apart from HTTP so tests seed and inspect the same records the API serves. Seeding
takes ``_lock`` itself; the rest runs under it, held by the HTTP side around a whole request.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import zlib
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from .coercion import money, phpify

Line = tuple[int, str, str, int, str]  # product_id, product_code, product name, amount, price

# Default order statuses: letter, name, inventory flag, colour. P is renamed on 4.13+.
DEFAULT_STATUSES: tuple[tuple[str, str, str, str], ...] = (
    ("O", "Open", "D", "#ff5215"),
    ("P", "Processed", "D", "#97cf4d"),
    ("C", "Complete", "D", "#97cf4d"),
    ("F", "Failed", "I", "#ff5215"),
    ("D", "Declined", "I", "#d2d2d2"),
    ("B", "Backordered", "D", "#28abf6"),
    ("I", "Canceled", "I", "#c2c2c2"),
    ("N", "Incomplete", "I", "#999999"),
)

_Moment = int | float | dt.datetime


@dataclass(slots=True)
class StoredOrder:
    """One order, kept small: 100,000 of them must fit in a few tens of MB."""

    order_id: int
    status: str
    timestamp: int
    updated_at: int
    lines: tuple[Line, ...]  # often shared between orders seeded by add_history
    s_country: str
    b_country: str
    email: str
    firstname: str
    lastname: str
    company_id: int
    parent_order_id: int
    is_parent_order: str
    shipping_id: int
    shipping: str
    notes: str
    user_id: int
    total: str | None  # None: computed from the lines
    extra: dict[str, Any] | None  # other fields, served as given (may be shared: never mutate)

    def __getitem__(self, key: str) -> Any:
        # dict-style access for tests that prefer it
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None


@dataclass(slots=True)
class Shipment:
    shipment_id: int
    order_id: int
    shipping_id: int
    shipping: str
    tracking_number: str
    carrier: str
    comments: str
    products: dict[str, int]  # item_id -> amount
    timestamp: int
    status: str


def item_ids(order: StoredOrder) -> list[str]:
    """Stable numeric item ids like CS-Cart's (e.g. "2412734920"): a hash of the order id and
    the product code, salted on the rare collision."""
    seen: set[str] = set()
    out: list[str] = []
    for n, line in enumerate(order.lines):
        salt = f"{order.order_id}:{line[1]}"
        iid = str(zlib.crc32(salt.encode()))
        while iid in seen:
            salt += f":{n}"
            iid = str(zlib.crc32(salt.encode()))
        seen.add(iid)
        out.append(iid)
    return out


def _test_item(amount: int) -> list[dict[str, Any]]:
    return [
        {"product_code": "Test001", "amount": amount, "price": "10.00", "product": "Test item 1"}
    ]


class Store:
    """A CS-Cart 4.x store's records, its seeding helpers and the rules that change them."""

    def __init__(
        self,
        *,
        timezone: str,
        version: tuple[int, int],
        currency: str,
        move_stock: bool,
        allow_negative_stock: bool,
    ) -> None:
        # no defaults here: StoreEmulator, the one way to build a store, holds them
        self.timezone = timezone
        self.tz = ZoneInfo(timezone)
        self.version = tuple(version)
        self.currency = currency
        self.move_stock = move_stock
        self.allow_negative_stock = allow_negative_stock
        self._lock = threading.RLock()  # every piece of store state

        self.users: dict[int, dict[str, Any]] = {}
        self.statuses: dict[tuple[str, str], dict[str, Any]] = {}  # (type, letter) -> status
        self._next_status_id = 1
        self.products: dict[int, dict[str, Any]] = {}
        self._product_codes: dict[str, int] = {}
        self._next_product_id = 1
        self.combinations: dict[str, dict[str, Any]] = {}
        self.orders: dict[int, StoredOrder] = {}
        # (updated_at, order_id), sorted: a store answers "changed since" from an index, so
        # an idle listing of a long history costs it no more than of a short one.
        self._by_change: list[tuple[int, int]] = []
        self._next_order_id = 1
        self._shipments: dict[int, Shipment] = {}
        self._shipments_by_order: dict[int, list[int]] = {}
        self._next_shipment_id = 1

        # what the store did besides answering, for tests to assert on
        self.notifications: list[tuple[int, str, bool]] = []
        self.status_changes: list[dict[str, Any]] = []
        self.ignored_fields: list[tuple[str, str, list[str]]] = []
        self.back_in_stock: list[int] = []

        for letter, name, inventory, color in DEFAULT_STATUSES:
            if letter == "P" and self.version >= (4, 13):
                name = "Paid"
            self.add_status(letter, name, inventory=inventory, _color=color, _default=True)

    # ---- feature switches ------------------------------------------------------------------
    @property
    def has_orders_data(self) -> bool:
        return self.version >= (4, 13)

    @property
    def has_updated_at_filter(self) -> bool:
        return self.version >= (4, 13)

    @property
    def has_variations(self) -> bool:
        return self.version >= (4, 10)

    # ---- seeding -----------------------------------------------------------------------------
    def add_user(
        self,
        user_id: int | None,
        email: str,
        user_type: str = "A",
        status: str = "A",
        api_key: str | None = None,
        *,
        company_id: int = 0,
        firstname: str = "",
        lastname: str = "",
    ) -> dict[str, Any]:
        with self._lock:
            uid = user_id if user_id is not None else max(self.users, default=0) + 1
            user = {
                "user_id": uid,
                "email": email,
                "user_type": user_type,
                "status": status,
                "company_id": company_id,
                "firstname": firstname,
                "lastname": lastname,
                "api_key": api_key,
            }
            self.users[uid] = user
            return user

    def user_by_email(self, email: str) -> dict[str, Any] | None:
        """The user an API login names; e-mails match whatever their case."""
        with self._lock:
            return next(
                (u for u in self.users.values() if u["email"].lower() == email.lower()), None
            )

    def add_status(
        self,
        letter: str,
        description: str,
        type: str = "O",
        inventory: str = "D",
        *,
        _color: str = "#cccccc",
        _default: bool = False,
    ) -> dict[str, Any]:
        with self._lock:
            existing = self.statuses.get((type, letter))
            status = {
                "status_id": existing["status_id"] if existing else self._next_status_id,
                "status": letter,
                "type": type,
                "is_default": "Y" if _default else "N",
                "description": description,
                "email_subj": f"status changed to {description}",
                "email_header": f"The status of your order is now: {description}.",
                "lang_code": "en",
                "params": {
                    "color": _color,
                    "notify": "Y",
                    "notify_department": "Y",
                    "inventory": inventory,
                    "remove_cc_info": "Y",
                    "repay": "N",
                    "appearance_type": "D",
                    "allow_return": "N",
                },
            }
            if not existing:
                self._next_status_id += 1
            self.statuses[(type, letter)] = status
            return status

    def add_product(
        self,
        product_code: str,
        amount: int = 0,
        *,
        product: str | None = None,
        price: str = "10.00",
        tracking: str = "B",
        product_type: str = "P",
        parent_product_id: int = 0,
        status: str = "A",
        product_id: int | None = None,
        company_id: int = 1,
    ) -> int:
        if tracking == "O" and self.has_variations:
            raise ValueError("tracking 'O' (option combinations) only exists before 4.10")
        if (product_type == "V" or parent_product_id) and not self.has_variations:
            raise ValueError("product variations only exist from 4.10")
        with self._lock:
            if product_code in self._product_codes:
                raise ValueError(f"product_code {product_code!r} already exists in this store")
            pid = product_id if product_id is not None else self._next_product_id
            if pid in self.products:
                raise ValueError(f"product_id {pid} already exists")
            self._next_product_id = max(self._next_product_id, pid + 1)
            self.products[pid] = {
                "product_id": pid,
                "product_code": product_code,
                "product": product if product is not None else product_code,
                "amount": int(amount),
                "price": money(price),
                "status": status,
                "tracking": tracking,
                "product_type": product_type,
                "parent_product_id": int(parent_product_id),
                "company_id": company_id,
                "timestamp": int(time.time()),
            }
            self._product_codes[product_code] = pid
            return pid

    def product_by_code(self, code: str) -> dict[str, Any] | None:
        with self._lock:
            pid = self._product_codes.get(code)
            return self.products.get(pid) if pid is not None else None

    def add_combination(
        self,
        product_id: int,
        product_code: str,
        amount: int,
        combination: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        if self.has_variations:
            raise ValueError("option combinations only exist before 4.10 (use variations)")
        with self._lock:
            if product_id not in self.products:
                raise KeyError(product_id)
            combo = {str(k): str(v) for k, v in (combination or {}).items()}
            key = f"{product_id}|" + "|".join(f"{k}={v}" for k, v in sorted(combo.items()))
            chash = str(zlib.crc32(key.encode()))
            stored = {
                "combination_hash": chash,
                "product_id": product_id,
                "product_code": product_code,
                "amount": int(amount),
                "combination": combo,
                "temp": "N",
                "position": len(self.combinations),
            }
            self.combinations[chash] = stored
            return stored

    def add_order(
        self,
        *,
        order_id: int | None = None,
        status: str = "P",
        timestamp: _Moment | None = None,
        updated_at: _Moment | None = None,
        products: Iterable[Mapping[str, Any]] | None = None,
        s_country: str = "AU",
        b_country: str | None = None,
        email: str = "jane@example.com",
        firstname: str = "Jane",
        lastname: str = "Citizen",
        company_id: int = 1,
        parent_order_id: int = 0,
        is_parent_order: str = "N",
        shipping_id: int = 1,
        shipping: str = "Standard",
        notes: str = "",
        user_id: int = 0,
        total: Any = None,
        **other_fields: Any,
    ) -> int:
        """One order as given; seeding takes no stock (only status changes move it)."""
        ts = self._unix(timestamp)
        with self._lock:
            lines = self._make_lines(_test_item(2) if products is None else products)
            oid = order_id if order_id is not None else self._next_order_id
            if oid in self.orders:
                raise ValueError(f"order {oid} already exists")
            order = StoredOrder(
                order_id=oid,
                status=status,
                timestamp=ts,
                updated_at=self._unix(updated_at) if updated_at is not None else ts,
                lines=lines,
                s_country=s_country,
                b_country=b_country or s_country,
                email=email,
                firstname=firstname,
                lastname=lastname,
                company_id=int(company_id),
                parent_order_id=int(parent_order_id),
                is_parent_order=is_parent_order,
                shipping_id=int(shipping_id),
                shipping=shipping,
                notes=notes,
                user_id=int(user_id),
                total=money(total) if total is not None else None,
                extra=phpify(other_fields) if other_fields else None,
            )
            self.orders[oid] = order
            insort(self._by_change, (order.updated_at, oid))
            self._next_order_id = max(self._next_order_id, oid + 1)
            return oid

    def add_history(
        self,
        count: int,
        *,
        start_timestamp: _Moment,
        step_seconds: int = 60,
        status: str = "C",
        products: Iterable[Mapping[str, Any]] | None = None,
        s_country: str = "AU",
        b_country: str | None = None,
        email: str = "jane@example.com",
        firstname: str = "Jane",
        lastname: str = "Citizen",
        company_id: int = 1,
        shipping_id: int = 1,
        shipping: str = "Standard",
        user_id: int = 0,
        **other_fields: Any,
    ) -> list[int]:
        """Many orders cheaply: one order every step_seconds from start_timestamp, sharing
        their lines and extra fields (100,000 in well under a second)."""
        start = self._unix(start_timestamp)
        extra = phpify(other_fields) if other_fields else None
        new = StoredOrder
        with self._lock:
            lines = self._make_lines(_test_item(1) if products is None else products)
            # every field after order_id, status, timestamp and updated_at, shared by all
            rest = (
                lines, s_country, b_country or s_country, email, firstname, lastname,
                company_id, 0, "N", shipping_id, shipping, "", user_id, None, extra,
            )  # fmt: skip
            first = self._next_order_id
            ids = range(first, first + count)
            orders = self.orders
            for i, oid in enumerate(ids):
                ts = start + i * step_seconds
                orders[oid] = new(oid, status, ts, ts, *rest)
            # all above every existing id, so no order is replaced
            self._by_change.extend((start + i * step_seconds, oid) for i, oid in enumerate(ids))
            self._by_change.sort()
            self._next_order_id = first + count
            return list(ids)

    def set_order_status(self, order_id: int, status: str) -> None:
        """A change made in the store's admin: moves stock like any change, bumps updated_at."""
        with self._lock:
            self.change_status(self.orders[order_id], status, source="admin")

    def _unix(self, value: _Moment | None) -> int:
        if value is None:
            return int(time.time())
        if isinstance(value, dt.datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=self.tz)  # naive: the store's wall clock
            return int(value.timestamp())
        return int(value)

    def _make_lines(self, products: Iterable[Mapping[str, Any]]) -> tuple[Line, ...]:
        lines: list[Line] = []
        for p in products:
            code = str(p["product_code"])
            stored = self.product_by_code(code)
            pid = p.get("product_id") or (stored["product_id"] if stored else 0)
            name = p.get("product") or (stored["product"] if stored else code)
            price = p.get("price") or (stored["price"] if stored else "10.00")
            lines.append((int(pid), code, str(name), int(p.get("amount", 1)), money(price)))
        return tuple(lines)

    # ---- the "changed since" index -------------------------------------------------------------
    def _unindex_change(self, order: StoredOrder) -> None:
        key = (order.updated_at, order.order_id)
        at = bisect_left(self._by_change, key)
        if at < len(self._by_change) and self._by_change[at] == key:
            del self._by_change[at]

    def changed_since(self, since: int) -> Iterator[StoredOrder]:
        """Orders whose updated_at is at or after since, read from the index."""
        at = bisect_left(self._by_change, (since, 0))
        return (self.orders[oid] for _, oid in self._by_change[at:])

    # ---- status changes and stock -------------------------------------------------------------
    def _inventory(self, letter: str) -> str | None:
        status = self.statuses.get(("O", letter))
        return status["params"]["inventory"] if status else None

    def _stock_holder(self, line: Line) -> dict[str, Any] | None:
        """Where a line's stock lives: the product, or its combination on old stores."""
        product = self.products.get(line[0]) or self.product_by_code(line[1])
        if product is None:
            return None
        if product["tracking"] == "B":
            return product
        if product["tracking"] == "O":
            for combo in self.combinations.values():
                if (
                    combo["product_id"] == product["product_id"]
                    and combo["product_code"] == line[1]
                ):
                    return combo
        return None

    def change_status(
        self,
        order: StoredOrder,
        new: str,
        *,
        source: str,
        notify_user: bool = False,
        notify_department: bool = False,
        notify_vendor: bool = False,
    ) -> bool:
        """fn_change_order_status: stock moves when the inventory flags differ."""
        old = order.status
        if new == old:
            return False  # CS-Cart returns early: no stock move, no e-mail
        old_inv, new_inv = self._inventory(old), self._inventory(new)
        if self.move_stock and old_inv and new_inv and old_inv != new_inv:
            holders = [(self._stock_holder(line), line[3]) for line in order.lines]
            if new_inv == "D":
                short = any(h is not None and h["amount"] < qty for h, qty in holders)
                if short and not self.allow_negative_stock:
                    new = "B"  # CS-Cart backorders instead of the status asked for
                    if new == old:
                        return False
                for holder, qty in holders:
                    if holder is not None:
                        holder["amount"] -= qty
            else:
                for holder, qty in holders:
                    if holder is not None:
                        holder["amount"] += qty
        order.status = new
        self._unindex_change(order)
        order.updated_at = int(time.time())
        insort(self._by_change, (order.updated_at, order.order_id))
        self.status_changes.append(
            {
                "order_id": order.order_id,
                "from": old,
                "to": new,
                "source": source,
                "notify_user": notify_user,
                "notify_department": notify_department,
                "notify_vendor": notify_vendor,
                "at": time.time(),
            }
        )
        if source != "admin":
            self.notifications.append((order.order_id, new, notify_user))
        return True

    # ---- shipments ---------------------------------------------------------------------------
    def shipment_record(self, shipment_id: int) -> Shipment | None:
        return self._shipments.get(shipment_id)

    def shipment_records(self, order_id: int | None = None) -> list[Shipment]:
        """In creation order: every shipment, or one order's."""
        if order_id is None:
            return list(self._shipments.values())
        return [self._shipments[sid] for sid in self._shipments_by_order.get(order_id, ())]

    def shipped(self, order_id: int) -> dict[str, int]:
        """Amount shipped so far per item id."""
        shipped: dict[str, int] = {}
        for shipment in self.shipment_records(order_id):
            for iid, qty in shipment.products.items():
                shipped[iid] = shipped.get(iid, 0) + qty
        return shipped

    def add_shipment(
        self,
        order: StoredOrder,
        *,
        shipping_id: int,
        tracking_number: str,
        carrier: str,
        comments: str,
        products: dict[str, int],
        timestamp: int,
        status: str,
    ) -> int:
        sid = self._next_shipment_id
        self._next_shipment_id += 1
        shipping = order.shipping if shipping_id == order.shipping_id else "Custom shipping method"
        self._shipments[sid] = Shipment(
            sid,
            order.order_id,
            shipping_id,
            shipping,
            tracking_number,
            carrier,
            comments,
            products,
            timestamp,
            status,
        )
        self._shipments_by_order.setdefault(order.order_id, []).append(sid)
        return sid

    def delete_shipment(self, shipment_id: int) -> Shipment | None:
        """Remove a shipment; its quantities count as "not yet shipped" again."""
        shipment = self._shipments.pop(shipment_id, None)
        if shipment is not None:
            self._shipments_by_order[shipment.order_id].remove(shipment.shipment_id)
        return shipment
