"""``/statuses``: the order statuses (``type`` ``O`` unless asked), in insertion order."""

from __future__ import annotations

from ..coercion import php_str
from ..model import Store
from ..views import status_json
from .common import Call, Handler, Reply, found, listing


def list_statuses(store: Store, call: Call) -> Reply:
    kind = php_str(call.params.get("type")) or "O"
    rows = [s for s in store.statuses.values() if s["type"] == kind]
    return listing("statuses", rows, call.params, status_json)


def get_status(store: Store, call: Call) -> Reply:
    wanted = call.number
    return found(
        next((s for s in store.statuses.values() if s["status_id"] == wanted), None), status_json
    )


HANDLERS: dict[str, Handler] = {
    "statuses.list": list_statuses,
    "statuses.get": get_status,
}
