"""``/orders``: list with CS-Cart's filters, get one, change its status."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from functools import partial
from typing import Any

from ..coercion import param_ids, param_set, parse_date, php_int, php_str, php_truthy
from ..model import Store, StoredOrder
from ..views import order_detail, order_list_item, order_total
from .common import Call, Handler, Reply, found, note_ignored, sorted_page

_NOTIFY = ("notify_user", "notify_department", "notify_vendor")


def list_orders(store: Store, call: Call) -> Reply:
    params = call.params
    keep = _order_filter(store, params)
    changed_from = php_int(params.get("updated_at_from")) if store.has_updated_at_filter else 0
    candidates: Iterable[StoredOrder] = (
        store.changed_since(changed_from) if changed_from else store.orders.values()
    )
    rows = [o for o in candidates if keep(o)]
    keys: dict[str, Callable[[StoredOrder], Any]] = {
        "order_id": lambda o: o.order_id,
        "status": lambda o: (o.status, o.order_id),
        "customer": lambda o: (o.lastname, o.firstname, o.order_id),
        "email": lambda o: (o.email, o.order_id),
        "date": lambda o: (o.timestamp, o.order_id),
        "total": lambda o: (Decimal(order_total(o)), o.order_id),
    }
    selected, echoed = sorted_page(rows, params, keys, "date", "desc")
    full = store.has_orders_data and php_truthy(params.get("get_orders_data"))
    items = [order_detail(store, o) if full else order_list_item(o) for o in selected]
    return 200, {"orders": items, "params": echoed}


def get_order(store: Store, call: Call) -> Reply:
    return found(store.orders.get(call.number), partial(order_detail, store))


def update_order(store: Store, call: Call) -> Reply:
    data = call.data
    order = store.orders.get(call.number)
    note_ignored(store, "orders.update", call, ("status", *_NOTIFY))
    if order is not None and php_truthy(data.get("status")):
        # an unknown letter is written as sent; the same status changes nothing
        store.change_status(
            order,
            php_str(data["status"]),
            source="api",
            notify_user=php_truthy(data.get("notify_user")),
            notify_department=php_truthy(data.get("notify_department")),
            notify_vendor=php_truthy(data.get("notify_vendor")),
        )
    return 200, {"order_id": call.ident}  # also for an unknown order: nothing written


def _order_filter(store: Store, params: Mapping[str, Any]) -> Callable[[StoredOrder], bool]:
    statuses = param_set(params, "status", php_str)
    hide_incomplete = not php_truthy(params.get("include_incompleted"))
    period = _period(params, store.tz)
    upd_from = upd_to = 0
    if store.has_updated_at_filter:  # older stores ignore these silently
        upd_from = php_int(params.get("updated_at_from"))
        upd_to = php_int(params.get("updated_at_to"))
    ids = param_ids(params, "order_id")
    company: int | None = None
    raw_company = params.get("company_id")
    if raw_company is not None and php_str(raw_company) != "":
        company = php_int(raw_company)
    email = php_str(params.get("email")).strip().lower() or None
    users = param_set(params, "user_id", php_int)

    def keep(o: StoredOrder) -> bool:
        if o.is_parent_order == "Y":
            return False  # parent orders are never listed
        if hide_incomplete and o.status == "N":
            return False
        if statuses is not None and o.status not in statuses:
            return False
        if period is not None and not period[0] <= o.timestamp <= period[1]:
            return False
        if upd_from and o.updated_at < upd_from:
            return False
        if upd_to and o.updated_at > upd_to:
            return False
        if ids is not None and o.order_id not in ids:
            return False
        if company is not None and o.company_id != company:
            return False
        if email is not None and email not in o.email.lower():
            return False  # LIKE %email%
        return users is None or o.user_id in users

    return keep


def _period(params: Mapping[str, Any], tz: dt.tzinfo) -> tuple[int, int] | None:
    """The ``period`` filter as (from, to) Unix times in the store's time zone; None filters
    nothing."""
    period = php_str(params.get("period"))
    if not period or period == "A":
        return None
    if period == "C":
        return (
            parse_date(params.get("time_from"), False, tz),
            parse_date(params.get("time_to"), True, tz),
        )
    now = int(time.time())
    today = dt.datetime.fromtimestamp(now, tz).replace(hour=0, minute=0, second=0, microsecond=0)
    day = dt.timedelta(days=1)

    def ts(d: dt.datetime) -> int:
        return int(d.timestamp())

    monday = today - day * today.weekday()
    first = today.replace(day=1)
    jan1 = today.replace(month=1, day=1)
    ranges: dict[str, Callable[[], tuple[int, int]]] = {
        "D": lambda: (ts(today), now),
        "LD": lambda: (ts(today - day), ts(today) - 1),
        "W": lambda: (ts(monday), now),
        "LW": lambda: (ts(monday - 7 * day), ts(monday) - 1),
        "M": lambda: (ts(first), now),
        "LM": lambda: (ts((first - day).replace(day=1)), ts(first) - 1),
        "Y": lambda: (ts(jan1), now),
        "LY": lambda: (ts(jan1.replace(year=jan1.year - 1)), ts(jan1) - 1),
        "HH": lambda: (now - 86400, now),
        "HW": lambda: (now - 7 * 86400, now),
        "HM": lambda: (now - 30 * 86400, now),
        "HC": lambda: (ts(today - day * php_int(params.get("last_days"))), now),
    }
    pick = ranges.get(period)
    return pick() if pick else None  # an unknown period filters nothing


HANDLERS: dict[str, Handler] = {
    "orders.list": list_orders,
    "orders.get": get_order,
    "orders.update": update_order,
}
