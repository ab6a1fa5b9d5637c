"""The messages of the FM contract (§2), versioned and strict.

Strict means: an unknown ``type`` or ``version``, a missing field, or a field of the wrong type
(a quantity as ``"2"``, money as a float, a time without an offset) is an ``InvalidMessage``
naming the field. Fields the contract may add later are ignored, as the contract allows.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    StrictInt,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from pydantic_core import ErrorDetails

from cscart_fm.errors import InvalidMessage

MAX_BODY_BYTES = 16 * 1024 * 1024
"""A message larger than this is refused before parsing (a 10,000-item snapshot is ~1 MB)."""

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


class _Message(BaseModel):
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


class OrderPollTick(_Message):
    type: Literal["order-poll.tick"]
    version: Literal[1]
    issued_at: IsoTime


class ShipmentLine(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    sku: Sku
    quantity: Annotated[StrictInt, Field(gt=0, le=10_000_000)]


class ShipmentLodged(_Message):
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


class StockSnapshot(_Message):
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


class OrderImported(_Message):
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
EVENT_TYPES: dict[str, type[_Message]] = {
    "order-poll.tick": OrderPollTick,
    "shipment.lodged": ShipmentLodged,
    "stock.snapshot": StockSnapshot,
    "order.imported": OrderImported,
}
ROUTING_KEYS: dict[type[_Message], str] = {
    OrderPollTick: "order-poll.tick",
    ShipmentLodged: "shipment.lodged",
    StockSnapshot: "stock.snapshot",
    OrderImported: "order.imported",
}

_json_object = TypeAdapter(dict[str, Any])

_EVENT_NAMESPACE = uuid.UUID("8b0d6a43-6f57-4bd5-9a43-2f1f3f8e6c11")


def order_event_id(client_id: str, cart_order_id: int) -> str:
    """The deterministic ``event_id`` of an imported order: the same every time, so that a
    re-publish after a crash is recognisably the same message."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"order.imported/{client_id}/{cart_order_id}"))


def _describe(error: ErrorDetails) -> str:
    loc = ".".join(str(part) for part in error["loc"]) or "(body)"
    return f"{loc}: {error['msg'].removeprefix('Value error, ')}"


def decode_json(body: bytes | str) -> dict[str, Any]:
    """The body as a JSON object, or InvalidMessage saying why not."""
    if isinstance(body, str):
        body = body.encode("utf-8", errors="surrogatepass")
    if len(body) > MAX_BODY_BYTES:
        raise InvalidMessage(f"body is {len(body)} bytes, over the {MAX_BODY_BYTES} limit")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"body is not UTF-8 (byte {exc.start})") from None
    try:
        document = json.loads(text)
    except RecursionError:
        raise InvalidMessage("body is nested too deeply to be a contract message") from None
    except json.JSONDecodeError as exc:
        raise InvalidMessage(f"body is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(document, dict):
        raise InvalidMessage(f"body is a JSON {type(document).__name__}, expected an object")
    return document


M = TypeVar("M", bound=_Message)


def parse_event(body: bytes | str | dict[str, Any], expected: type[M] | None = None) -> M:
    """Decode and validate one message; ``expected`` narrows the accepted type.

    Raises InvalidMessage naming the field for anything the contract does not allow.
    """
    if isinstance(body, dict):
        document, body = body, json.dumps(body)
    else:
        document = decode_json(body)
    kind = document.get("type")
    model = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise InvalidMessage(f"type: unknown message type {str(kind)[:60]!r}")
    if expected is not None and model is not expected:
        expected_type = expected.model_fields["type"].annotation.__args__[0]  # type: ignore[union-attr]
        raise InvalidMessage(
            f"type: {kind!r} does not belong on this queue (expected {expected_type!r})"
        )
    version = document.get("version")
    if version != 1 or isinstance(version, bool):
        raise InvalidMessage(f"version: unsupported version {str(version)[:20]!r} of {kind}")
    try:
        # Validated from the JSON text: strict JSON mode takes ISO times as strings but still
        # refuses "2" for a quantity and 1.5 for money.
        return model.model_validate_json(body)  # type: ignore[return-value]
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        shown = "; ".join(_describe(error) for error in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise InvalidMessage(f"{shown}{more}") from None


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
    "decode_json",
    "order_event_id",
    "parse_event",
]
