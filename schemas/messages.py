"""The messages of the FM contract (§2), versioned and strict.

Strict: a missing field or one of the wrong type (a quantity as ``"2"``, money as a float, a
time without an offset) fails validation; fields the contract may add later are ignored, as the
contract allows. Decoding a body into one of these is the core's (``cscart_fm.core.events``).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    StrictInt,
    StringConstraints,
    field_validator,
)

Text = Annotated[str, StringConstraints(max_length=1000)]
Id = Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True)]
Sku = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Money = Annotated[str, StringConstraints(pattern=r"^-?\d{1,15}(\.\d{1,6})?$")]
"""A decimal string such as ``"19.90"``: never a float."""
IsoTime = Annotated[
    AwareDatetime,
    PlainSerializer(lambda value: value.isoformat(), return_type=str, when_used="json"),
]
"""A time with its offset, written as the contract writes it (``+00:00``, not ``Z``)."""
Quantity = Annotated[StrictInt, Field(ge=0, le=10_000_000)]
SignedQuantity = Annotated[StrictInt, Field(ge=-10_000_000, le=10_000_000)]


class Message(BaseModel):
    # ``strict`` refuses "2" for an int and 1.0 for a str; ``extra="ignore"`` because the
    # contract lets FM add fields without a new version.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    event_id: Id
    client_id: Id

    @property
    def schema_name(self) -> str:
        """The ``schema`` header: ``<type>/<version>``."""
        return f"{self.type}/{self.version}"  # type: ignore[attr-defined]

    def to_body(self) -> bytes:
        return self.model_dump_json(exclude_none=False).encode("utf-8")


class OrderPollTick(Message):
    type: Literal["order-poll.tick"]
    version: Literal[1]
    issued_at: IsoTime


class ShipmentLine(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    sku: Sku
    quantity: Annotated[StrictInt, Field(gt=0, le=10_000_000)]


class ShipmentLodged(Message):
    type: Literal["shipment.lodged"]
    version: Literal[1]
    order_no: Id
    cart_order_id: Annotated[StrictInt, Field(gt=0)] | None = None
    shipment_ref: Id
    tracking_number: Text | None = None
    carrier: Text | None = None
    tracking_url: Annotated[str, StringConstraints(max_length=2000)] | None = None
    lodged_at: IsoTime
    lines: Annotated[list[ShipmentLine], Field(min_length=1, max_length=10_000)]
    backordered: Annotated[list[ShipmentLine], Field(max_length=10_000)] = []

    @field_validator("tracking_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return value or None


class StockItem(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    sku: Sku
    on_hand: SignedQuantity
    available: SignedQuantity


class StockSnapshot(Message):
    type: Literal["stock.snapshot"]
    version: Literal[1]
    taken_at: IsoTime
    items: Annotated[list[StockItem], Field(min_length=1, max_length=100_000)]


class Party(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    name: str = ""
    email: str = ""
    phone: str = ""


class Address(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    name: str = ""
    company: str = ""
    address1: str = ""
    address2: str = ""
    city: str = ""
    state: str = ""
    postcode: str = ""
    country: str = ""
    phone: str = ""
    email: str = ""


class OrderLine(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    line_id: str
    sku: str
    name: str = ""
    quantity: Quantity
    unit_price: Money


class Totals(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    subtotal: Money
    shipping: Money
    tax: Money
    discount: Money
    total: Money


class OrderImported(Message):
    """What this service publishes to FM for each CS-Cart order (contract §2.2)."""

    type: Literal["order.imported"] = "order.imported"
    version: Literal[1] = 1
    order_no: Id
    cart_order_id: StrictInt
    cart_status: str
    placed_at: IsoTime
    is_test: StrictBool
    currency: str = ""
    customer: Party
    ship_to: Address
    bill_to: Address
    shipping_method: str = ""
    notes: str = ""
    lines: list[OrderLine]
    totals: Totals


Event = OrderPollTick | ShipmentLodged | StockSnapshot | OrderImported
EVENT_TYPES: dict[str, type[Message]] = {
    "order-poll.tick": OrderPollTick,
    "shipment.lodged": ShipmentLodged,
    "stock.snapshot": StockSnapshot,
    "order.imported": OrderImported,
}
ROUTING_KEYS: dict[type[Message], str] = {
    OrderPollTick: "order-poll.tick",
    ShipmentLodged: "shipment.lodged",
    StockSnapshot: "stock.snapshot",
    OrderImported: "order.imported",
}

_EVENT_NAMESPACE = uuid.UUID("8b0d6a43-6f57-4bd5-9a43-2f1f3f8e6c11")


def order_event_id(client_id: str, cart_order_id: int) -> str:
    """The deterministic ``event_id`` of an imported order: the same every time, so that a
    re-publish after a crash is recognisably the same message."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"order.imported/{client_id}/{cart_order_id}"))


__all__ = [
    "EVENT_TYPES",
    "ROUTING_KEYS",
    "Address",
    "Event",
    "OrderImported",
    "OrderLine",
    "OrderPollTick",
    "Party",
    "ShipmentLine",
    "ShipmentLodged",
    "StockItem",
    "StockSnapshot",
    "Totals",
    "order_event_id",
]
