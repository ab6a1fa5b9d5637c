"""``/combinations`` (stores before 4.10): option combinations and their own stock."""

from __future__ import annotations

from ..coercion import php_int, php_truthy
from ..http import error
from ..model import Store
from ..views import combination_json
from .common import Call, Handler, Reply, found, page_of, paging


def list_combinations(store: Store, call: Call) -> Reply:
    params = call.params
    if not php_truthy(params.get("product_id")):
        return 400, error(400, "product_id is required")
    pid = php_int(params["product_id"])
    rows = [c for c in store.combinations.values() if c["product_id"] == pid]
    page, ipp = paging(params, default=None)  # pages only when asked
    return 200, [combination_json(c) for c in page_of(rows, page, ipp)]  # a bare list


def get_combination(store: Store, call: Call) -> Reply:
    return found(store.combinations.get(call.ident or ""), combination_json)


def update_combination(store: Store, call: Call) -> Reply:
    combo = store.combinations.get(call.ident or "")
    if combo is None:
        return 404, error(404)
    if "amount" in call.data:
        combo["amount"] = php_int(call.data["amount"])
    return 200, {"combination_hash": call.ident}


HANDLERS: dict[str, Handler] = {
    "combinations.list": list_combinations,
    "combinations.get": get_combination,
    "combinations.update": update_combination,
}
