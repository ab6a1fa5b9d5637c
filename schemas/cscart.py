"""CS-Cart REST payloads as a real store sends them, parsed tolerantly.

CS-Cart's API writes JSON the way PHP's ``json_encode`` does: most numbers are strings
(``"order_id": "97"``, ``"total": "29.90"``), some are numbers, an empty object is ``[]``, a
missing value may be ``null``, ``""`` or ``false``, and ``Y``/``N`` stand for booleans. These
models accept all of that and still refuse what is truly malformed (``"order_id": "abc"``):
pydantic raises ``ValidationError`` and the client turns it into ``BadResponse`` naming the
field.

Money is ``Decimal`` and never passes through ``float``: the client parses JSON with
``parse_float=Decimal``; a float handed in directly is converted from its shortest ``repr``.
Unknown fields are ignored, so a newer CS-Cart adding fields changes nothing here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

__all__ = [
    "CartCombination",
    "CartOrder",
    "CartOrderLine",
    "CartProduct",
    "CartShipment",
    "CartShipping",
    "CartStatus",
    "CartStatusParams",
    "CartUser",
]

_INT = re.compile(r"[+-]?\d+")
_INTEGRAL_DECIMAL = re.compile(r"[+-]?\d+\.0*")
_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_PLAIN_DECIMAL = re.compile(r"\d{1,30}(\.\d{1,30})?", re.ASCII)


def _is_blank(value: Any) -> bool:
    # PHP writes a missing value as null, "" or false; an empty object or list as [].
    # (Compared by type and length: a store's page holds thousands of these values.)
    if value is None or value is False:
        return True
    kind = type(value)
    return (kind is str or kind is list or kind is dict) and not value


# --- scalar coercions ----------------------------------------------------------------------
# Messages name the expected type, never the value: values may be a shopper's data.


def _finite(value: Decimal | float) -> bool:
    return value.is_finite() if isinstance(value, Decimal) else math.isfinite(value)


def _int(value: Any) -> int:
    kind = type(value)
    if kind is str and value.isascii() and value.isdigit():  # the usual "97"
        return int(value)
    if kind is int:
        return int(value)
    if isinstance(value, bool):
        raise ValueError("expected an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, Decimal | float):
        if _finite(value) and value == int(value):
            return int(value)
        raise ValueError("expected an integer, got a fraction")
    if isinstance(value, str):
        text = value.strip()
        if _INT.fullmatch(text):
            return int(text)
        if _INTEGRAL_DECIMAL.fullmatch(text):  # "5.000" from a DECIMAL column
            return int(text.split(".", 1)[0])
    raise ValueError("expected an integer (a number or a string of digits)")


def _int_or_zero(value: Any) -> int:
    return 0 if _is_blank(value) else _int(value)


def _decimal(value: Any) -> Decimal:
    if type(value) is str and _PLAIN_DECIMAL.fullmatch(value):  # the usual "29.90"
        return Decimal(value)
    if isinstance(value, bool):
        raise ValueError("expected a decimal number, got a boolean")
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("expected a finite decimal number")
        return value
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        # Only when a caller parsed JSON without parse_float=Decimal: repr is the shortest
        # string that round-trips, i.e. what the store wrote, not the binary approximation.
        return _decimal(repr(value))
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        try:
            return Decimal(value.strip())
        except InvalidOperation:
            pass
    raise ValueError("expected a decimal number (e.g. 29.90)")


def _decimal_or_zero(value: Any) -> Decimal:
    return Decimal(0) if _is_blank(value) else _decimal(value)


def _text(value: Any) -> str:
    if type(value) is str:  # the usual case, "" included
        return value  # type: ignore[no-any-return]
    if _is_blank(value):
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a string, got a boolean")
    if isinstance(value, int | Decimal | float):
        # A product code or a post code that happens to be all digits.
        return str(value)
    raise ValueError("expected a string")


def _yes_no(value: Any) -> bool:
    if _is_blank(value):
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().upper() in ("Y", "N", "1", "0"):
        return value.strip().upper() in ("Y", "1")
    raise ValueError("expected Y or N")


def _object(value: Any) -> Any:
    """``[]`` (PHP's empty array) means an empty object; a non-empty list is left to fail."""
    if _is_blank(value):
        return {}
    return value


def _list(value: Any) -> Any:
    """A list, or an object keyed by index or id (PHP arrays with gaps encode as objects)."""
    if _is_blank(value):
        return []
    if isinstance(value, Mapping):
        return list(value.values())
    return value


Int = Annotated[int, BeforeValidator(_int)]
"""An integer that must be present: an id."""
IntOr0 = Annotated[int, BeforeValidator(_int_or_zero)]
"""An integer where null, "" or false mean 0."""
Money = Annotated[Decimal, BeforeValidator(_decimal_or_zero)]
Text = Annotated[str, BeforeValidator(_text)]
YesNo = Annotated[bool, BeforeValidator(_yes_no)]
Personal = Annotated[str, BeforeValidator(_text), Field(repr=False)]
"""A shopper's personal data: kept out of ``repr`` so a logged model does not leak it."""


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# --- orders --------------------------------------------------------------------------------


class CartOrderLine(_Payload):
    """One line of ``products`` in an order; ``item_id`` is the key shipments use."""

    item_id: Text = ""
    product_id: IntOr0 = 0
    product_code: Text = ""
    product: Text = ""
    """The product's name as ordered."""
    amount: IntOr0 = 0
    price: Money = Decimal(0)
    shipped_amount: IntOr0 = 0
    shipment_amount: IntOr0 = 0


class CartShipping(_Payload):
    """One shipping method chosen on an order (its ``shipping_id`` is needed to ship)."""

    shipping_id: IntOr0 = 0
    shipping: Text = ""


class CartOrder(_Payload):
    """An order, from the list (few fields) or the detail call / ``get_orders_data`` (all).

    ``is_full`` tells which: a list item has no ``products`` key at all.
    """

    order_id: Int
    status: Text
    timestamp: Int
    updated_at: int | None = None
    """Unix time of the last change; None on CS-Cart versions without the column."""
    issuer_id: IntOr0 = 0
    user_id: IntOr0 = 0
    is_parent_order: YesNo = False
    parent_order_id: IntOr0 = 0
    company_id: IntOr0 = 0
    company: Personal = ""
    email: Personal = ""
    phone: Personal = ""
    firstname: Personal = ""
    lastname: Personal = ""
    notes: Personal = ""
    """The shopper's notes."""
    details: Personal = ""
    """Staff notes."""

    b_firstname: Personal = ""
    b_lastname: Personal = ""
    b_address: Personal = ""
    b_address_2: Personal = ""
    b_city: Personal = ""
    b_state: Personal = ""
    b_country: Text = ""
    b_zipcode: Personal = ""
    b_phone: Personal = ""
    s_firstname: Personal = ""
    s_lastname: Personal = ""
    s_address: Personal = ""
    s_address_2: Personal = ""
    s_city: Personal = ""
    s_state: Personal = ""
    s_country: Text = ""
    """ISO 3166 alpha-2. CS-Cart has no country filter: filter on this."""
    s_zipcode: Personal = ""
    s_phone: Personal = ""

    products: dict[str, CartOrderLine] = Field(default_factory=dict)
    """Lines keyed by item id (a string)."""
    subtotal: Money = Decimal(0)
    discount: Money = Decimal(0)
    subtotal_discount: Money = Decimal(0)
    shipping_cost: Money = Decimal(0)
    total: Money = Decimal(0)
    tax_subtotal: Money = Decimal(0)
    taxes: dict[str, Any] = Field(default_factory=dict)
    secondary_currency: Text = ""
    shipping: list[CartShipping] = Field(default_factory=list)
    shipment_ids: list[Int] = Field(default_factory=list)

    @field_validator("updated_at", mode="before")
    @classmethod
    def _updated_at(cls, value: Any) -> int | None:
        return None if _is_blank(value) else _int(value)

    @field_validator("products", mode="before")
    @classmethod
    def _products(cls, value: Any) -> Any:
        value = _object(value)
        if isinstance(value, list):
            # Some versions list the lines instead of keying them: key them by item_id.
            value = {str(line.get("item_id", "")): line for line in value
                     if isinstance(line, Mapping)}
        if isinstance(value, Mapping):
            # The key is the item id; copy it into the line when the line lacks it.
            return {
                str(key): ({**line, "item_id": line.get("item_id") or key}
                           if isinstance(line, Mapping) else line)
                for key, line in value.items()
            }
        return value

    @field_validator("taxes", mode="before")
    @classmethod
    def _taxes(cls, value: Any) -> Any:
        return _object(value)

    @field_validator("shipping", "shipment_ids", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _list(value)

    @property
    def is_full(self) -> bool:
        """Whether this is the full order (detail call), not a slim list item."""
        return "products" in self.model_fields_set

    @property
    def lines(self) -> list[CartOrderLine]:
        return list(self.products.values())


# --- shipments -----------------------------------------------------------------------------


class CartShipment(_Payload):
    shipment_id: Int
    order_id: IntOr0 = 0
    shipping_id: IntOr0 = 0
    tracking_number: Text = ""
    carrier: Text = ""
    comments: Text = ""
    products: dict[str, IntOr0] = Field(default_factory=dict)
    """Amounts shipped, keyed by the order's item id."""
    status: Text = ""
    timestamp: IntOr0 = 0
    carrier_info: dict[str, Any] | None = None
    """``name`` and ``tracking_url`` when CS-Cart knows the carrier; ``{}`` when sent empty."""

    @field_validator("products", mode="before")
    @classmethod
    def _products(cls, value: Any) -> Any:
        return _object(value)

    @field_validator("carrier_info", mode="before")
    @classmethod
    def _carrier_info(cls, value: Any) -> Any:
        return None if value is None or value is False else _object(value)


# --- products and stock --------------------------------------------------------------------


class CartProduct(_Payload):
    product_id: Int
    product_code: Text = ""
    product: Text = ""
    """The product's name."""
    amount: IntOr0 = 0
    """Stock on hand as the store holds it (may be negative)."""
    status: Text = ""
    tracking: Text = ""
    """``B`` tracked, ``D`` not tracked, ``O`` tracked per option combination (up to 4.9)."""
    product_type: Text = "P"
    """``P`` a product, ``V`` a variation (4.10+)."""
    parent_product_id: IntOr0 = 0

    @property
    def tracks_combinations(self) -> bool:
        """Stock is kept per option combination (``/api/combinations``), not on the product."""
        return self.tracking == "O"

    @property
    def tracks_inventory(self) -> bool:
        return self.tracking in ("B", "O")


class CartCombination(_Payload):
    """An option combination of a product on an old (up to 4.9) store, with its own stock."""

    combination_hash: Text
    product_id: IntOr0 = 0
    product_code: Text = ""
    amount: IntOr0 = 0

    @field_validator("combination_hash")
    @classmethod
    def _hash_present(cls, value: str) -> str:
        if not value:
            raise ValueError("combination_hash is empty")
        return value


# --- statuses and users --------------------------------------------------------------------


class CartStatusParams(_Payload):
    inventory: Text = ""
    """``D`` the status takes stock, ``I`` it gives stock back."""


class CartStatus(_Payload):
    status: Text
    """The one-letter code."""
    status_id: IntOr0 = 0
    description: Text = ""
    """The status's name in the store (e.g. "Processed", or "Paid" on 4.13+)."""
    type: Text = "O"
    params: CartStatusParams = Field(default_factory=CartStatusParams)

    @field_validator("params", mode="before")
    @classmethod
    def _params(cls, value: Any) -> Any:
        return _object(value)

    @property
    def inventory(self) -> str:
        return self.params.inventory


class CartUser(_Payload):
    user_id: Int
    email: Text = ""
    user_type: Text = ""
    """``A`` administrator, ``V`` vendor administrator, ``C`` customer."""
    status: Text = ""
    """``A`` active, ``D`` disabled."""
    company_id: IntOr0 = 0
