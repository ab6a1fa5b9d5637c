"""``/products``: list with the catalogue's filters, get one, update stock, price and more."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from functools import partial
from typing import Any

from ..coercion import money, param_ids, param_set, php_int, php_str, php_truthy
from ..http import error
from ..model import Store
from ..views import product_json
from .common import Call, Handler, Reply, found, note_ignored, sorted_page

_WRITABLE = ("amount", "price", "product", "status", "tracking")

_SORT_KEYS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "product": lambda p: (p["product"].lower(), p["product_id"]),
    "code": lambda p: (p["product_code"].lower(), p["product_id"]),
    "price": lambda p: (Decimal(p["price"]), p["product_id"]),
    "amount": lambda p: (p["amount"], p["product_id"]),
    "timestamp": lambda p: (p["timestamp"], p["product_id"]),
}


def list_products(store: Store, call: Call) -> Reply:
    params = call.params
    rows = list(store.products.values())
    pcode = php_str(params.get("pcode")).strip().lower()
    if pcode:
        rows = [p for p in rows if pcode in p["product_code"].lower()]  # a SUBSTRING
    q = php_str(params.get("q")).strip().lower()
    if q:
        rows = [p for p in rows if q in p["product"].lower()]
    for key in ("tracking", "product_type", "status"):
        wanted = param_set(params, key, php_str)
        if wanted is not None:
            rows = [p for p in rows if p[key] in wanted]
    if store.has_variations and php_truthy(params.get("parent_product_id")):
        parent = php_int(params["parent_product_id"])
        rows = [p for p in rows if p["parent_product_id"] == parent]
    pids = param_ids(params, "pid")
    if pids is not None:
        rows = [p for p in rows if p["product_id"] in pids]
    # the store's default "A to Z": by name, then product_id
    selected, echoed = sorted_page(rows, params, _SORT_KEYS, "product", "asc")
    return 200, {"products": [product_json(store, p) for p in selected], "params": echoed}


def get_product(store: Store, call: Call) -> Reply:
    return found(store.products.get(call.number), partial(product_json, store))


def update_product(store: Store, call: Call) -> Reply:
    product = store.products.get(call.number)
    if product is None:
        return 404, error(404)
    data = call.data
    note_ignored(store, "products.update", call, _WRITABLE)
    if "amount" in data:
        before = product["amount"]
        product["amount"] = php_int(data["amount"])  # negative stored as sent
        if before <= 0 < product["amount"]:
            store.back_in_stock.append(product["product_id"])  # subscribers e-mailed
    if "price" in data:
        product["price"] = money(data["price"])
    for key in ("product", "status", "tracking"):
        if key in data:
            product[key] = php_str(data[key])
    return 200, {"product_id": call.ident}


HANDLERS: dict[str, Handler] = {
    "products.list": list_products,
    "products.get": get_product,
    "products.update": update_product,
}
