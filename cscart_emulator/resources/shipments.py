"""``/shipments``: list, get, create (what is left to ship, cut down), update, delete."""

from __future__ import annotations

import time
from functools import partial

from ..coercion import as_list, php_int, php_str, php_truthy
from ..http import error
from ..model import Store, item_ids
from ..views import shipment_json
from .common import Call, Handler, Reply, found, listing, note_ignored

# PUT takes these; other keys are dropped (recorded in ignored_fields)
_WRITABLE = ("tracking_number", "comments", "status", "timestamp")


def list_shipments(store: Store, call: Call) -> Reply:
    params = call.params
    order_id = php_int(params["order_id"]) if php_truthy(params.get("order_id")) else None
    rows = store.shipment_records(order_id)
    newest_first = php_str(params.get("sort_order")).lower() != "asc"
    rows.sort(key=lambda s: s.shipment_id, reverse=newest_first)
    return listing("shipments", rows, params, partial(shipment_json, store), clamp=True)


def get_shipment(store: Store, call: Call) -> Reply:
    return found(store.shipment_record(call.number), partial(shipment_json, store))


def create_shipment(store: Store, call: Call) -> Reply:
    data = call.data
    order = store.orders.get(php_int(data.get("order_id")))
    if order is None:
        # Chosen: 400, not 404 - the resource posted to (/shipments) exists; CS-Cart
        # answers a create it cannot do with Bad Request.
        return 400, error(400, "order_id is invalid")
    shipping_id = php_int(data.get("shipping_id"))
    if not shipping_id:
        return 400, error(400, "shipping_id is required")
    tracking_number = php_str(data.get("tracking_number"))
    carrier = php_str(data.get("carrier"))
    if not tracking_number and not carrier:
        return 400, error(400, "tracking_number or carrier is required")
    shipped = store.shipped(order.order_id)
    left = {
        iid: line[3] - shipped.get(iid, 0)
        for iid, line in zip(item_ids(order), order.lines, strict=True)
    }
    asked = data.get("products")
    wanted: dict[str, int] = {}
    if not php_truthy(asked):
        wanted = {iid: n for iid, n in left.items() if n > 0}  # everything not yet shipped
    else:
        pairs = asked.items() if isinstance(asked, dict) else enumerate(as_list(asked))
        for iid, qty in pairs:
            take = min(php_int(qty), left.get(str(iid), 0))  # cut down to what is left
            if take > 0:
                wanted[str(iid)] = wanted.get(str(iid), 0) + take
    if not wanted:
        return 400, error(400, "there are no products to ship")
    sid = store.add_shipment(
        order,
        shipping_id=shipping_id,
        tracking_number=tracking_number,
        carrier=carrier,
        comments=php_str(data.get("comments")),
        products=wanted,
        timestamp=php_int(data.get("timestamp")) or int(time.time()),
        status=php_str(data.get("status")) or "P",
    )
    if php_truthy(data.get("order_status")):
        store.change_status(
            order,
            php_str(data["order_status"]),
            source="shipment",
            notify_user=php_truthy(data.get("notify_user")),
        )
    return 201, {"shipment_id": sid}  # a NUMBER, unlike the PUT echoes


def update_shipment(store: Store, call: Call) -> Reply:
    shipment = store.shipment_record(call.number)
    if shipment is None:
        return 404, error(404)
    data = call.data
    note_ignored(store, "shipments.update", call, _WRITABLE)
    for key in ("tracking_number", "comments", "status"):
        if key in data:
            setattr(shipment, key, php_str(data[key]))
    if "timestamp" in data:
        shipment.timestamp = php_int(data["timestamp"])
    return 200, {"shipment_id": call.ident}


def delete_shipment(store: Store, call: Call) -> Reply:
    if store.delete_shipment(call.number) is None:
        return 404, error(404)
    return 204, None


HANDLERS: dict[str, Handler] = {
    "shipments.list": list_shipments,
    "shipments.get": get_shipment,
    "shipments.create": create_shipment,
    "shipments.update": update_shipment,
    "shipments.delete": delete_shipment,
}
