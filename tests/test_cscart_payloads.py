"""Parsing CS-Cart payloads as real stores write them: numbers as strings, ``[]`` for empty
objects, Y/N booleans, exact decimals, and loud failure on what is truly malformed."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.cscart import (
    CartCombination,
    CartOrder,
    CartProduct,
    CartShipment,
    CartStatus,
    CartUser,
)


def load(text: str) -> Any:
    # As the client parses: decimals exact, never through float.
    return json.loads(text, parse_float=Decimal)


# A detail answer shaped like CS-Cart 4.x's json_encode output (escaped slashes included).
FULL_ORDER = r"""
{
  "order_id": "97", "is_parent_order": "N", "parent_order_id": "0", "company_id": "1",
  "issuer_id": null, "user_id": "3", "total": "59.90", "subtotal": 49.9, "discount": "0.00",
  "subtotal_discount": "0.00", "payment_surcharge": "0.00", "shipping_ids": "1",
  "shipping_cost": "10.00", "timestamp": "1763769600", "status": "P", "notes": "Leave at door",
  "details": "", "promotions": [], "firstname": "Jane", "lastname": "Citizen",
  "company": "", "b_firstname": "Jane", "b_lastname": "Citizen",
  "b_address": "1 George St", "b_address_2": "", "b_city": "Sydney", "b_county": "",
  "b_state": "NSW", "b_country": "AU", "b_zipcode": "2000", "b_phone": "",
  "s_firstname": "Jane", "s_lastname": "Citizen", "s_address": "Unit 4\/12 Pitt St",
  "s_address_2": "", "s_city": "Sydney", "s_state": "NSW", "s_country": "AU",
  "s_zipcode": 2000, "s_phone": "0400 000 000", "s_address_type": "",
  "phone": "0400 000 000", "email": "jane@example.com", "tax_subtotal": 0,
  "secondary_currency": "AUD", "lang_code": "en",
  "products": {
    "3195287640": {"item_id": "3195287640", "order_id": "97", "product_id": "12",
      "product_code": "Test001", "price": "19.95", "amount": "2", "extra": {"product_options": []},
      "product": "Test item 1", "shipped_amount": "1", "shipment_amount": "1"},
    "844019362": {"product_id": "13", "product_code": "SKU-2", "price": 9.99, "amount": 1,
      "product": "Widget \u00e9"}
  },
  "taxes": [],
  "shipping": [{"shipping_id": "1", "shipping": "Australia Post", "group_key": 0}],
  "shipment_ids": ["5", 6],
  "updated_at": "1763770000",
  "some_future_field": {"whatever": true}
}
"""


def test_full_order_with_strings_for_numbers() -> None:
    order = CartOrder.model_validate(load(FULL_ORDER))

    assert order.order_id == 97
    assert order.timestamp == 1_763_769_600
    assert order.updated_at == 1_763_770_000
    assert order.is_parent_order is False
    assert order.parent_order_id == 0
    assert order.issuer_id == 0  # null
    assert order.s_address == "Unit 4/12 Pitt St"  # PHP's escaped slash
    assert order.s_zipcode == "2000"  # a number where a string belongs
    assert order.s_country == "AU"
    assert order.total == Decimal("59.90")
    assert order.subtotal == Decimal("49.9")
    assert order.tax_subtotal == Decimal(0)
    assert order.taxes == {}  # [] is an empty object
    assert order.secondary_currency == "AUD"
    assert [s.shipping_id for s in order.shipping] == [1]
    assert order.shipping[0].shipping == "Australia Post"
    assert order.shipment_ids == [5, 6]
    assert order.is_full


def test_order_lines_are_keyed_by_item_id() -> None:
    order = CartOrder.model_validate(load(FULL_ORDER))

    assert set(order.products) == {"3195287640", "844019362"}
    first = order.products["3195287640"]
    assert (first.product_id, first.product_code, first.amount) == (12, "Test001", 2)
    assert first.price == Decimal("19.95")
    assert (first.shipped_amount, first.shipment_amount) == (1, 1)
    # A line without its own item_id takes it from its key.
    second = order.products["844019362"]
    assert second.item_id == "844019362"
    assert second.price == Decimal("9.99")
    assert second.product == "Widget é"
    assert [line.item_id for line in order.lines] == ["3195287640", "844019362"]


def test_money_is_exact_never_float() -> None:
    order = CartOrder.model_validate(load(FULL_ORDER))
    line = order.products["3195287640"]
    total = line.price * line.amount + order.products["844019362"].price
    assert total == Decimal("49.89")
    assert isinstance(order.subtotal, Decimal)
    # A float handed in directly becomes its shortest repr, not the binary approximation.
    parsed = CartOrder.model_validate(
        {"order_id": 1, "status": "P", "timestamp": 1, "total": 0.1 + 0.2, "subtotal": 0.1}
    )
    assert parsed.subtotal == Decimal("0.1")
    assert parsed.total == Decimal("0.30000000000000004")


def test_slim_list_item_and_empty_objects() -> None:
    item = load(
        '{"order_id": "98", "issuer_id": "", "user_id": "0", "is_parent_order": "N",'
        ' "parent_order_id": "41", "company_id": "2", "company": "", "timestamp": "1763769600",'
        ' "firstname": "A", "lastname": "B", "email": "a@example.com", "phone": "",'
        ' "status": "O", "total": "0.00"}'
    )
    order = CartOrder.model_validate(item)
    assert order.parent_order_id == 41
    assert order.products == {}
    assert not order.is_full  # no products key at all: a list item
    assert order.updated_at is None

    empty = CartOrder.model_validate(
        {"order_id": "5", "status": "P", "timestamp": "1", "products": [], "shipping": {},
         "shipment_ids": None, "is_parent_order": "Y", "notes": False}
    )
    assert empty.products == {} and empty.is_full
    assert empty.shipping == [] and empty.shipment_ids == []
    assert empty.is_parent_order is True
    assert empty.notes == ""


def test_shipping_as_an_object_keyed_by_index() -> None:
    order = CartOrder.model_validate(
        {"order_id": 1, "status": "P", "timestamp": 1,
         "shipping": {"0": {"shipping_id": "7", "shipping": "Courier"}}}
    )
    assert [(s.shipping_id, s.shipping) for s in order.shipping] == [(7, "Courier")]


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("order_id", "97", 97),
        ("order_id", " 97 ", 97),
        ("order_id", "+97", 97),
        ("order_id", "0097", 97),
        ("order_id", 97, 97),
        ("order_id", Decimal("97"), 97),
        ("order_id", "97.000", 97),  # a DECIMAL column
        ("parent_order_id", "-3", -3),
        ("parent_order_id", "", 0),
        ("parent_order_id", None, 0),
        ("total", "29.90", Decimal("29.90")),
        ("total", " 29.90 ", Decimal("29.90")),
        ("total", "+1.5", Decimal("1.5")),
        ("total", "-1.5", Decimal("-1.5")),
        ("total", ".5", Decimal("0.5")),
        ("total", "1e2", Decimal("100")),
        ("total", 7, Decimal(7)),
        ("total", "", Decimal(0)),
        ("total", False, Decimal(0)),
        ("b_zipcode", 2000, "2000"),
        ("b_zipcode", "", ""),
        ("b_zipcode", None, ""),
        ("b_zipcode", [], ""),
    ],
)
def test_scalar_forms_a_store_writes(field: str, value: Any, expected: Any) -> None:
    data: dict[str, Any] = {"order_id": "1", "status": "P", "timestamp": "1", field: value}
    parsed = getattr(CartOrder.model_validate(data), field)
    assert parsed == expected
    assert type(parsed) is type(expected)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("order_id", "abc"),
        ("order_id", ""),
        ("order_id", True),
        ("timestamp", "yesterday"),
        ("total", "29,90"),
        ("total", "NaN"),
        ("is_parent_order", "maybe"),
        ("parent_order_id", "1.5"),
        ("parent_order_id", "²"),  # a digit to str.isdigit, not to int()
        ("total", "1.2.3"),
        ("total", "Infinity"),
        ("b_zipcode", True),
    ],
)
def test_malformed_fields_fail_naming_the_field(field: str, value: Any) -> None:
    data: dict[str, Any] = {"order_id": "97", "status": "P", "timestamp": "1", field: value}
    with pytest.raises(ValidationError) as caught:
        CartOrder.model_validate(data)
    errors = caught.value.errors()
    assert errors[0]["loc"] == (field,)


def test_malformed_line_names_the_nested_field() -> None:
    data = {"order_id": 1, "status": "P", "timestamp": 1,
            "products": {"11": {"amount": "two", "price": "1.00"}}}
    with pytest.raises(ValidationError) as caught:
        CartOrder.model_validate(data)
    assert caught.value.errors()[0]["loc"] == ("products", "11", "amount")


def test_missing_order_id_is_malformed() -> None:
    with pytest.raises(ValidationError):
        CartOrder.model_validate({"status": "P", "timestamp": "1"})


def test_repr_keeps_shoppers_data_out() -> None:
    order = CartOrder.model_validate(load(FULL_ORDER))
    text = repr(order)
    for personal in ("jane@example.com", "Citizen", "Pitt St", "0400 000 000", "Leave at door"):
        assert personal not in text
    assert "order_id=97" in text


def test_shipment() -> None:
    shipment = CartShipment.model_validate(load(
        '{"shipment_id": "15", "order_id": "97", "shipping_id": "1", "shipping": "Post",'
        ' "tracking_number": "AP123", "carrier": "aup", "comments": "", "status": "A",'
        ' "timestamp": "1763770000", "products": {"3195287640": "2", "844019362": 1},'
        ' "carrier_info": {"name": "Australia Post",'
        ' "tracking_url": "https:\\/\\/auspost.com.au\\/track\\/AP123"}}'
    ))
    assert shipment.shipment_id == 15 and shipment.order_id == 97
    assert shipment.products == {"3195287640": 2, "844019362": 1}
    assert shipment.carrier_info is not None
    assert shipment.carrier_info["tracking_url"] == "https://auspost.com.au/track/AP123"

    bare = CartShipment.model_validate({"shipment_id": 16, "products": [], "carrier_info": []})
    assert bare.products == {} and bare.carrier_info == {}
    assert CartShipment.model_validate({"shipment_id": 17}).carrier_info is None


def test_product_and_variation() -> None:
    product = CartProduct.model_validate(load(
        '{"product_id": "12", "product_code": "Test001", "product": "Test item 1",'
        ' "amount": "-3", "status": "A", "tracking": "B", "product_type": "P",'
        ' "parent_product_id": "0", "price": "19.950000"}'
    ))
    assert (product.product_id, product.amount, product.tracking) == (12, -3, "B")
    assert product.tracks_inventory and not product.tracks_combinations

    variation = CartProduct.model_validate(
        {"product_id": "13", "product_code": "Test001-RED", "amount": "5.000",
         "product_type": "V", "parent_product_id": "12", "tracking": "O"}
    )
    assert variation.amount == 5
    assert variation.parent_product_id == 12
    assert variation.tracks_combinations


def test_combination_status_and_user() -> None:
    combination = CartCombination.model_validate(
        {"product_id": "12", "product_code": "BW/S", "combination_hash": 822274303,
         "combination": {"3": "12"}, "amount": "50", "position": "0"}
    )
    assert combination.combination_hash == "822274303"
    assert combination.amount == 50
    with pytest.raises(ValidationError):
        CartCombination.model_validate({"combination_hash": "", "amount": "1"})

    status = CartStatus.model_validate(
        {"status_id": "2", "status": "P", "type": "O", "description": "Paid",
         "params": {"inventory": "D", "notify": "Y", "color": "#97cf4d"}}
    )
    assert (status.status, status.description, status.inventory) == ("P", "Paid", "D")
    assert CartStatus.model_validate({"status": "N", "params": []}).inventory == ""

    user = CartUser.model_validate(
        {"user_id": "1", "email": "admin@example.com", "user_type": "A", "status": "A",
         "company_id": "0", "api_key": "never-kept"}
    )
    assert (user.user_id, user.user_type, user.status) == (1, "A", "A")
    assert "never-kept" not in repr(user)
    assert not hasattr(user, "api_key")


@given(
    st.decimals(allow_nan=False, allow_infinity=False, places=2,
                min_value=Decimal("-1000000"), max_value=Decimal("1000000"))
)
def test_any_price_string_round_trips_exactly(price: Decimal) -> None:
    text = json.dumps({"order_id": "1", "status": "P", "timestamp": "1", "total": str(price)})
    assert CartOrder.model_validate(load(text)).total == price
