"""The store's records as CS-Cart serves them: numbers as strings (mostly), PHP's empty
arrays, the fields a real answer carries.

One place for the served shape, so the API and the inspection helpers agree on it.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from .coercion import money
from .model import Shipment, Store, StoredOrder, item_ids

# Carrier codes CS-Cart builds a tracking link for (plausible URLs; {tn} = tracking number).
CARRIERS: dict[str, tuple[str, str]] = {
    "aup": ("Australia Post", "https://auspost.com.au/mypost/track/#/details/{tn}"),
    "usps": ("USPS", "https://tools.usps.com/go/TrackConfirmAction_input?qtc_tLabels1={tn}"),
    "ups": ("UPS", "https://www.ups.com/WebTracking?track=yes&trackNums={tn}"),
    "fedex": ("FedEx", "https://www.fedex.com/apps/fedextrack/?tracknumbers={tn}"),
    "dhl": ("DHL", "https://www.dhl.com/en/express/tracking.html?AWB={tn}&brand=DHL"),
    "can": (
        "Canada Post",
        "https://www.canadapost-postescanada.ca/track-reperage/en#/search?searchFor={tn}",
    ),
    "swisspost": ("Swiss Post", "https://service.post.ch/ekp-web/ui/entry/search/{tn}"),
    "temando": ("Temando", "https://temando.com/en/track?token={tn}"),
}

# Plausible address per country, shared by every order (keeps orders compact).
_ADDRESSES: dict[str, tuple[str, str, str, str, str]] = {
    "AU": ("1 George Street", "Sydney", "NSW", "2000", "+61 2 9000 0000"),
    "NZ": ("12 Queen Street", "Auckland", "AUK", "1010", "+64 9 300 0000"),
    "US": ("350 Fifth Avenue", "New York", "NY", "10118", "+1 212 555 0100"),
    "GB": ("10 Baker Street", "London", "", "NW1 6XE", "+44 20 7946 0000"),
    "CA": ("100 Queen Street West", "Toronto", "ON", "M5H 2N2", "+1 416 555 0100"),
}
_DEFAULT_ADDRESS = ("1 Main Street", "Springfield", "", "12345", "")


def order_total(order: StoredOrder) -> str:
    if order.total is not None:
        return order.total
    total = sum((Decimal(line[4]) * line[3] for line in order.lines), Decimal(0))
    if order.extra and "shipping_cost" in order.extra:
        total += Decimal(money(order.extra["shipping_cost"]))
    return f"{total:.2f}"


def order_list_item(order: StoredOrder) -> dict[str, Any]:
    """An order as a list shows it: no addresses, no products."""
    extra = order.extra or {}
    item: dict[str, Any] = {
        "order_id": str(order.order_id),
        "issuer_id": None,  # NULL for orders placed by shoppers
        "user_id": str(order.user_id),
        "is_parent_order": order.is_parent_order,
        "parent_order_id": str(order.parent_order_id),
        "company_id": str(order.company_id),
        "company": "",
        "timestamp": str(order.timestamp),
        "firstname": order.firstname,
        "lastname": order.lastname,
        "email": order.email,
        "phone": _ADDRESSES.get(order.b_country, _DEFAULT_ADDRESS)[4],
        "status": order.status,
        "total": order_total(order),
    }
    if extra:
        for key in item.keys() & extra.keys():
            item[key] = extra[key]
    return item


def order_detail(store: Store, order: StoredOrder) -> dict[str, Any]:
    """The full order: ``GET /orders/<id>``, and list items with ``get_orders_data``."""
    detail = order_list_item(order)
    shipped = store.shipped(order.order_id)
    products: dict[str, Any] = {}
    subtotal = Decimal(0)
    for iid, (pid, code, name, amount, price) in zip(item_ids(order), order.lines, strict=True):
        done = shipped.get(iid, 0)
        products[iid] = {
            "item_id": iid,
            "order_id": str(order.order_id),
            "product_id": str(pid),
            "product_code": code,
            "price": price,
            "amount": str(amount),
            "extra": [],
            "product": name,
            # PHP: a DB string once something shipped, the integer 0 before
            "shipped_amount": str(done) if done else 0,
            "shipment_amount": amount - done,
            "base_price": price,
            "original_price": price,
            "company_id": "1",
            "is_accessible": True,
            "product_status": "A",
        }
        subtotal += Decimal(price) * amount
    for prefix, country in (("b", order.b_country), ("s", order.s_country)):
        street, city, state, zipcode, phone = _ADDRESSES.get(country, _DEFAULT_ADDRESS)
        detail.update(
            {
                f"{prefix}_firstname": order.firstname,
                f"{prefix}_lastname": order.lastname,
                f"{prefix}_address": street,
                f"{prefix}_address_2": "",
                f"{prefix}_city": city,
                f"{prefix}_county": "",
                f"{prefix}_state": state,
                f"{prefix}_country": country,
                f"{prefix}_zipcode": zipcode,
                f"{prefix}_phone": phone,
            }
        )
    detail.update(
        {
            "updated_at": str(order.updated_at),
            "notes": order.notes,
            "details": "",
            "promotions": [],
            "promotion_ids": "",
            "fax": "",
            "url": "",
            "payment_id": "1",
            "tax_exempt": "N",
            "lang_code": "en",
            "ip_address": "127.0.0.1",
            "repaid": "0",
            "validation_code": "",
            "localization_id": "0",
            "profile_id": "0",
            "subtotal": float(subtotal),
            "discount": 0,
            "subtotal_discount": "0.00",
            "shipping_cost": "0.00",
            "tax_subtotal": 0,
            "taxes": [],
            "display_subtotal": float(subtotal),
            "display_shipping_cost": 0,
            "secondary_currency": store.currency,
            "products": products or [],
            "shipping": [
                {
                    "shipping_id": str(order.shipping_id),
                    "shipping": order.shipping,
                    "group_key": 0,
                    "rate": 0,
                    "delivery_time": "",
                }
            ],
            "shipment_ids": [str(s.shipment_id) for s in store.shipment_records(order.order_id)],
        }
    )
    if order.extra:
        detail.update(order.extra)
    return detail


def shipment_json(store: Store, s: Shipment) -> dict[str, Any]:
    order = store.orders.get(s.order_id)
    out: dict[str, Any] = {
        "shipment_id": str(s.shipment_id),
        "timestamp": str(s.timestamp),
        "comments": s.comments,
        "status": s.status,
        "order_id": str(s.order_id),
        "order_timestamp": str(order.timestamp) if order else "0",
        "s_firstname": order.firstname if order else "",
        "s_lastname": order.lastname if order else "",
        "company": "",
        "user_id": str(order.user_id) if order else "0",
        "shipping_id": str(s.shipping_id),
        "shipping": s.shipping,
        "tracking_number": s.tracking_number,
        "carrier": s.carrier,
        "group_key": "0",
        "products": {iid: str(qty) for iid, qty in s.products.items()} or [],
    }
    known = CARRIERS.get(s.carrier)  # only the codes CS-Cart knows, matched exactly
    if known:
        name, url = known
        out["carrier_info"] = {
            "name": name,
            "tracking_url": url.format(tn=s.tracking_number),
            "info": "",
        }
    return out


def product_json(store: Store, p: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "product_id": str(p["product_id"]),
        "product_code": p["product_code"],
        "product": p["product"],
        "amount": str(p["amount"]),
        "price": p["price"],
        "list_price": "0.00",
        "status": p["status"],
        "tracking": p["tracking"],
        "product_type": p["product_type"],
        "company_id": str(p["company_id"]),
        "timestamp": str(p["timestamp"]),
    }
    if store.has_variations:
        out["parent_product_id"] = str(p["parent_product_id"])
    return out


def combination_json(c: dict[str, Any]) -> dict[str, Any]:
    return {
        "product_id": str(c["product_id"]),
        "product_code": c["product_code"],
        "combination_hash": c["combination_hash"],
        "combination": dict(c["combination"]) or [],
        "amount": str(c["amount"]),
        "temp": c["temp"],
        "position": str(c["position"]),
    }


def status_json(s: dict[str, Any]) -> dict[str, Any]:
    return {**s, "status_id": str(s["status_id"]), "params": dict(s["params"])}


def user_json(u: dict[str, Any]) -> dict[str, Any]:
    return {  # never the API key
        "user_id": str(u["user_id"]),
        "email": u["email"],
        "user_type": u["user_type"],
        "status": u["status"],
        "company_id": str(u["company_id"]),
        "firstname": u["firstname"],
        "lastname": u["lastname"],
        "lang_code": "en",
        "is_root": "Y" if u["user_type"] == "A" else "N",
    }
