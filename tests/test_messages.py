"""The contract's messages: the examples parse; anything else is refused naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cscart_fm.core.broker import message_properties
from cscart_fm.core.errors import InvalidMessage
from cscart_fm.core.events import parse_event
from schemas.messages import (
    OrderImported,
    OrderPollTick,
    ShipmentLodged,
    StockSnapshot,
    order_event_id,
)

TICK = {
    "type": "order-poll.tick",
    "version": 1,
    "event_id": "6f1c3c1e-8d7e-4f7e-9a57-0b7c1c0f1a11",
    "client_id": "ACME",
    "issued_at": "2026-11-22T10:00:00+00:00",
}
SHIPMENT = {
    "type": "shipment.lodged",
    "version": 1,
    "event_id": "a3e0",
    "client_id": "ACME",
    "order_no": "CS1000012",
    "cart_order_id": 1000012,
    "shipment_ref": "FM-SHP-77812",
    "tracking_number": "33ABC1234567",
    "carrier": "Australia Post",
    "tracking_url": "https://auspost.com.au/mypost/track/#/details/33ABC1234567",
    "lodged_at": "2026-11-23T15:02:00+11:00",
    "lines": [{"sku": "Test001", "quantity": 2}],
    "backordered": [{"sku": "Test003", "quantity": 1}],
}
SNAPSHOT = {
    "type": "stock.snapshot",
    "version": 1,
    "event_id": "s1",
    "client_id": "ACME",
    "taken_at": "2026-11-23T02:00:00+11:00",
    "items": [
        {"sku": "Test001", "on_hand": 25, "available": 20},
        {"sku": "Test002", "on_hand": 3, "available": -2},
    ],
}
ADDRESS = {
    "name": "Jane Citizen", "company": "", "address1": "1 George St", "address2": "",
    "city": "Sydney", "state": "NSW", "postcode": "2000", "country": "AU",
    "phone": "+61 400 000 000", "email": "jane@example.com",
}
IMPORTED = {
    "type": "order.imported", "version": 1, "event_id": "x", "client_id": "ACME",
    "order_no": "CS1000012", "cart_order_id": 1000012, "cart_status": "P",
    "placed_at": "2026-11-22T09:41:07+11:00", "is_test": False, "currency": "AUD",
    "customer": {"name": "Jane Citizen", "email": "jane@example.com", "phone": "+61 400 000 000"},
    "ship_to": ADDRESS, "bill_to": ADDRESS, "shipping_method": "Standard",
    "notes": "Leave at the door",
    "lines": [{"line_id": "2412734920", "sku": "Test001", "name": "Test item 1",
               "quantity": 2, "unit_price": "10.00"}],
    "totals": {"subtotal": "20.00", "shipping": "9.90", "tax": "2.99", "discount": "0.00",
               "total": "29.90"},
}


@pytest.mark.parametrize(
    ("document", "model"),
    [(TICK, OrderPollTick), (SHIPMENT, ShipmentLodged), (SNAPSHOT, StockSnapshot),
     (IMPORTED, OrderImported)],
)
def test_contract_examples_parse_and_round_trip(document: dict[str, Any], model: type) -> None:
    event = parse_event(json.dumps(document).encode())
    assert isinstance(event, model)
    again = parse_event(event.to_body())
    assert again == event
    props = message_properties(event)
    assert props["message_id"] == document["event_id"]
    assert props["delivery_mode"] == 2
    assert props["content_type"] == "application/json"
    assert props["headers"] == {"schema": f"{document['type']}/1"}


def test_fields_added_by_fm_later_are_ignored() -> None:
    event = parse_event(json.dumps({**SHIPMENT, "warehouse": "SYD1"}).encode())
    assert event.shipment_ref == "FM-SHP-77812"


def test_cart_order_id_may_be_absent() -> None:
    document = dict(SHIPMENT)
    del document["cart_order_id"]
    assert parse_event(json.dumps(document)).cart_order_id is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({**TICK, "type": "order-poll.tock"}, "type: unknown message type"),
        ({**TICK, "version": 2}, "version: unsupported version"),
        ({**TICK, "version": True}, "version"),
        ({**TICK, "issued_at": "2026-11-22T10:00:00"}, "issued_at"),
        ({**TICK, "client_id": ""}, "client_id"),
        ({**SHIPMENT, "lines": []}, "lines"),
        ({**SHIPMENT, "lines": [{"sku": "Test001", "quantity": 2.0}]}, "lines.0.quantity"),
        ({**SHIPMENT, "lines": [{"sku": "Test001", "quantity": 0}]}, "lines.0.quantity"),
        ({**SHIPMENT, "tracking_url": "javascript:alert(1)"}, "tracking_url"),
        ({**SNAPSHOT, "items": [{"sku": "A", "on_hand": "3", "available": 1}]}, "items.0.on_hand"),
        ({**IMPORTED, "totals": {**IMPORTED["totals"], "total": 29.9}}, "totals.total"),
        ({**IMPORTED, "lines": [{**IMPORTED["lines"][0], "unit_price": "ten"}]}, "lines.0.unit_price"),
    ],
)
def test_wrong_messages_name_the_field(document: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        parse_event(json.dumps(document).encode())
    assert field in info.value.reason


def test_a_message_on_the_wrong_queue_is_refused() -> None:
    with pytest.raises(InvalidMessage, match="does not belong on this queue"):
        parse_event(json.dumps(TICK).encode(), ShipmentLodged)


def test_order_event_ids_are_deterministic_per_client_and_order() -> None:
    assert order_event_id("ACME", 1000012) == order_event_id("ACME", 1000012)
    assert order_event_id("ACME", 1000012) != order_event_id("ACME", 1000013)
    assert order_event_id("ACME", 1000012) != order_event_id("BETA", 1000012)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.sampled_from(list(SHIPMENT)), json_values, max_size=12).map(
            lambda d: json.dumps({**SHIPMENT, **d}).encode()
        ),
    )
)
def test_any_body_either_parses_or_is_an_invalid_message(body: bytes) -> None:
    try:
        parse_event(body)
    except InvalidMessage as exc:
        assert exc.reason and len(exc.reason) < 2000


def test_times_are_written_with_an_explicit_offset_like_the_contract() -> None:
    tick = parse_event(json.dumps(TICK).encode())
    assert json.loads(tick.to_body())["issued_at"] == "2026-11-22T10:00:00+00:00"
    imported = parse_event(json.dumps(IMPORTED).encode())
    assert json.loads(imported.to_body())["placed_at"] == "2026-11-22T09:41:07+11:00"
