"""A full CS-Cart order as ``order.imported`` (contract §2.2): money as decimal strings, the
test flag from the client's test SKUs, the order_no with its prefix."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Literal

from pydantic import ValidationError

from consumers.order_poll.filters import Filters
from schemas.cscart import CartOrder
from schemas.messages import OrderImported, order_event_id

_CENT = Decimal("0.01")
_MICRO = Decimal("0.000001")


def money(value: Decimal) -> str:
    """A decimal string with two decimals (more only when the store keeps more); no float."""
    cents = value.quantize(_CENT)
    if cents == value:
        return "0.00" if cents == 0 else f"{cents:f}"
    return f"{value.quantize(_MICRO):f}"


def _name(first: str, last: str) -> str:
    return " ".join(part.strip() for part in (first, last) if part and part.strip())


def to_message(order: CartOrder, filters: Filters) -> OrderImported:
    """The ``order.imported`` message of a full CS-Cart order (contract §2.2). Built as a
    document and validated once by the schema (half the time of building each part as a
    model)."""
    customer_name = _name(order.firstname, order.lastname)
    lines = [
        {
            "line_id": line.item_id or key,
            "sku": line.product_code,
            "name": line.product,
            "quantity": line.amount,
            "unit_price": money(line.price),
        }
        for key, line in order.products.items()
    ]

    def address(prefix: Literal["s", "b"]) -> dict[str, str]:
        def get(name: str) -> str:
            return str(getattr(order, name))

        return {
            "name": _name(get(f"{prefix}_firstname"), get(f"{prefix}_lastname"))
            or customer_name,
            "company": order.company,
            "address1": get(f"{prefix}_address"),
            "address2": get(f"{prefix}_address_2"),
            "city": get(f"{prefix}_city"),
            "state": get(f"{prefix}_state"),
            "postcode": get(f"{prefix}_zipcode"),
            "country": get(f"{prefix}_country").strip().upper(),
            "phone": get(f"{prefix}_phone") or order.phone,
            "email": order.email,
        }

    return OrderImported.model_validate(
        {
            "event_id": order_event_id(filters.client_id, order.order_id),
            "client_id": filters.client_id,
            "order_no": f"{filters.prefix}{order.order_id}",
            "cart_order_id": order.order_id,
            "cart_status": order.status,
            "placed_at": datetime.fromtimestamp(order.timestamp, filters.zone),
            "is_test": bool(lines) and all(line["sku"] in filters.test_skus for line in lines),
            "currency": order.secondary_currency,
            "customer": {
                "name": customer_name,
                "email": order.email,
                "phone": order.phone or order.b_phone or order.s_phone,
            },
            "ship_to": address("s"),
            "bill_to": address("b"),
            "shipping_method": order.shipping[0].shipping if order.shipping else "",
            "notes": order.notes,
            "lines": lines,
            "totals": {
                "subtotal": money(order.subtotal),
                "shipping": money(order.shipping_cost),
                "tax": money(order.tax_subtotal),
                "discount": money(order.discount + order.subtotal_discount),
                "total": money(order.total),
            },
        }
    )


def validation_summary(exc: ValidationError) -> str:
    """Why an order cannot be mapped: the first field and its problem."""
    # Field paths and messages only: the input values may be a shopper's data.
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "(order)"
    return f"{where}: {first['msg']}"

