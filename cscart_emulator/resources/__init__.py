"""The store's API, one module per resource; ``HANDLERS`` maps each endpoint name to the
function that answers it (called with the store locked)."""

from __future__ import annotations

from . import combinations, orders, products, shipments, statuses, users
from .common import Call, Handler, Reply

__all__ = ["HANDLERS", "Call", "Handler", "Reply"]

HANDLERS: dict[str, Handler] = {
    **orders.HANDLERS,
    **shipments.HANDLERS,
    **products.HANDLERS,
    **combinations.HANDLERS,
    **statuses.HANDLERS,
    **users.HANDLERS,
}
