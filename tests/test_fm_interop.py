"""Interop with a second, independent AMQP client: FM's side written with pika only.

The service speaks kombu/py-amqp; every other broker test publishes and reads with the same
stack, so a property both ends get wrong the same way would pass them. Here FM's side
(``tests/support/fm_side.py``) is pika's BlockingConnection: it publishes the contract's events
on ``fm.events`` (§1, §2), the service's jobs run in this process against the store emulator
and apply them, and FM reads back ``fm.orders.imported`` and the dead-letter queues, checking
every property the contract fixes on the wire.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from consumers.registry import JOBS
from cscart_emulator import StoreEmulator
from schemas.messages import order_event_id

from .support.broker import declare
from .support.fm_side import FmSide, Received, schema_of
from .support.pipeline import API_KEY, API_USER, client_doc, consumer, make_services

pytestmark = pytest.mark.broker

SYDNEY = ZoneInfo("Australia/Sydney")
ORDERS_QUEUE = "fm.orders.imported"
AUSPOST_URL = "https://auspost.com.au/mypost/track/#/details/33ABC1234567"
MONEY = re.compile(r"^-?\d+\.\d{2}$")
OFFSET = re.compile(r"[+-]\d{2}:\d{2}$")


@pytest.fixture
def emu() -> Iterator[StoreEmulator]:
    store = StoreEmulator(api_user=API_USER, api_key=API_KEY)
    store.add_product("Test001", 100, product="Test item 1", price="10.00")
    store.add_product("Test002", 100, product="Test item 2", price="15.50")
    store.add_product("REAL-1", 100, product="Enamel mug", price="14.95")
    with store:
        yield store
    assert store.errors == []


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.sqlite'}"


@pytest.fixture
def fm(broker_url: str) -> Iterator[FmSide]:
    """FM's pika connection; the service has declared the topology first (§1: it declares
    FM's queues so that nothing is lost before FM consumes)."""
    declare(broker_url)
    with FmSide(broker_url) as side:
        side.check_exchanges()
        yield side


def now_in_sydney() -> str:
    return datetime.now(SYDNEY).isoformat()


def no_float(text: str) -> Any:
    raise AssertionError(f"a JSON float on the wire: {text} (money is a decimal string)")


def assert_contract_properties(message: Received, schema: str) -> dict[str, Any]:
    """§1's properties of a message read with pika; returns its body."""
    props = message.properties
    assert props.content_type == "application/json"
    assert props.content_encoding in (None, "utf-8")  # if named, the body's UTF-8
    assert props.delivery_mode == 2  # persistent
    assert message.headers.get("schema") == schema
    # Strict UTF-8, and no JSON float anywhere: money travels as decimal strings.
    body: dict[str, Any] = json.loads(message.body.decode("utf-8"), parse_float=no_float)
    assert isinstance(body, dict)
    assert props.message_id == body["event_id"]
    assert schema_of(body) == schema
    return body


def assert_money(value: Any) -> None:
    assert isinstance(value, str) and MONEY.match(value), value
    Decimal(value)


def assert_quantity(value: Any) -> None:
    assert isinstance(value, int) and not isinstance(value, bool), value


def assert_time_with_offset(value: Any) -> datetime:
    assert isinstance(value, str) and OFFSET.search(value), value
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() is not None
    return parsed


# --- the round trip ------------------------------------------------------------------------------


def test_fm_on_pika_drives_every_job_and_reads_orders_as_the_contract_writes_them(
    broker_url: str, sqlite_url: str, emu: StoreEmulator, fm: FmSide
) -> None:
    placed = int(datetime.now(UTC).timestamp()) - 3600
    oid = emu.add_order(
        status="P",
        timestamp=placed,
        firstname="Zoë",  # not ASCII: the body must be UTF-8 end to end
        lastname="Ñúñez",
        notes="Leave at the door — thanks",
        products=[
            {"product_code": "Test001", "amount": 2},
            {"product_code": "REAL-1", "amount": 1},
        ],
        shipping_cost="9.90",
        tax_subtotal="2.99",
        total="44.84",
    )
    client = client_doc(
        emu.url,
        orders={"timezone": "Australia/Sydney"},  # placed_at carries the store's offset
        stock={"quantity": "available", "negative_as_zero": True},
    )
    services = make_services(broker_url, sqlite_url, [client])
    try:
        with ExitStack() as running:
            for job in JOBS:
                running.enter_context(consumer(services, job.name))

            # 1. order-poll.tick → the order comes back on fm.orders.imported.
            fm.publish(
                {
                    "type": "order-poll.tick",
                    "version": 1,
                    "event_id": str(uuid.uuid4()),
                    "client_id": "ACME",
                    "issued_at": now_in_sydney(),
                },
                "order-poll.tick",
            )
            [message] = fm.take(ORDERS_QUEUE, 1)
            assert (message.exchange, message.routing_key) == ("fm.orders", "order.imported")
            order = assert_contract_properties(message, "order.imported/1")
            assert order["event_id"] == order_event_id("ACME", oid)
            assert order["client_id"] == "ACME"
            assert order["order_no"] == f"CS{oid}"
            assert_quantity(order["cart_order_id"])
            assert order["cart_order_id"] == oid
            assert order["is_test"] is False
            placed_at = assert_time_with_offset(order["placed_at"])
            assert placed_at == datetime.fromtimestamp(placed, SYDNEY)
            assert placed_at.utcoffset() == datetime.fromtimestamp(placed, SYDNEY).utcoffset()
            assert order["customer"]["name"] == "Zoë Ñúñez"
            assert order["notes"] == "Leave at the door — thanks"
            assert [(line["sku"], line["quantity"]) for line in order["lines"]] == [
                ("Test001", 2),
                ("REAL-1", 1),
            ]
            for line in order["lines"]:
                assert_quantity(line["quantity"])
                assert_money(line["unit_price"])
                assert isinstance(line["line_id"], str) and line["line_id"]
            assert [line["unit_price"] for line in order["lines"]] == ["10.00", "14.95"]
            for value in order["totals"].values():
                assert_money(value)
            assert order["totals"]["shipping"] == "9.90"

            # 2. FM ships what it received: shipment.lodged → a CS-Cart shipment + status.
            lodged = {
                "type": "shipment.lodged",
                "version": 1,
                "event_id": str(uuid.uuid4()),
                "client_id": order["client_id"],
                "order_no": order["order_no"],
                "cart_order_id": order["cart_order_id"],
                "shipment_ref": "FM-SHP-77812",
                "tracking_number": "33ABC1234567",
                "carrier": "Australia Post",
                "tracking_url": AUSPOST_URL,
                "lodged_at": now_in_sydney(),
                "lines": [{"sku": ln["sku"], "quantity": ln["quantity"]} for ln in order["lines"]],
                "backordered": [],
            }
            fm.publish(lodged, "shipment.lodged")
            fm.wait_for(lambda: emu.orders[oid].status == "C")
            [shipment] = emu.shipments_for(oid)
            assert shipment["tracking_number"] == "33ABC1234567"
            assert shipment["carrier"] == "aup"
            assert sorted(shipment["products"].values()) == ["1", "2"]
            assert "FM ref FM-SHP-77812" in shipment["comments"]

            # 3. stock.snapshot → the client's quantity mode (available, negative as 0).
            fm.publish(
                {
                    "type": "stock.snapshot",
                    "version": 1,
                    "event_id": str(uuid.uuid4()),
                    "client_id": "ACME",
                    "taken_at": now_in_sydney(),
                    "items": [
                        {"sku": "Test002", "on_hand": 25, "available": 20},
                        {"sku": "REAL-1", "on_hand": 3, "available": -2},
                    ],
                },
                "stock.snapshot",
            )

            def amounts() -> list[int]:
                products = [emu.product_by_code(sku) or {} for sku in ("Test002", "REAL-1")]
                return [int(product.get("amount", -1)) for product in products]

            fm.wait_for(lambda: amounts() == [20, 0])
    finally:
        services.close()

    # Every job took its message and refused none; nothing more was published to FM.
    for job in JOBS:
        assert fm.depth(f"cscart.{job.name}") == 0
        assert fm.depth(f"cscart.{job.name}.dlq") == 0
    assert fm.depth(ORDERS_QUEUE) == 0
    assert len(emu.shipments_for(oid)) == 1


# --- what the service refuses ends in the job's .dlq, as FM sent it -------------------------------


def _tick(**overrides: Any) -> dict[str, Any]:
    body = {
        "type": "order-poll.tick",
        "version": 1,
        "event_id": str(uuid.uuid4()),
        "client_id": "ACME",
        "issued_at": now_in_sydney(),
    }
    return {**body, **overrides}


def _lodged(**overrides: Any) -> dict[str, Any]:
    body = {
        "type": "shipment.lodged",
        "version": 1,
        "event_id": str(uuid.uuid4()),
        "client_id": "ACME",
        "order_no": "CS1000012",
        "shipment_ref": "FM-SHP-1",
        "tracking_number": "33ABC1234567",
        "carrier": "Australia Post",
        "lodged_at": now_in_sydney(),
        "lines": [{"sku": "Test001", "quantity": 2}],
        "backordered": [],
    }
    return {**body, **overrides}


def _snapshot(**overrides: Any) -> dict[str, Any]:
    body = {
        "type": "stock.snapshot",
        "version": 1,
        "event_id": str(uuid.uuid4()),
        "client_id": "ACME",
        "taken_at": now_in_sydney(),
        "items": [{"sku": "Test001", "on_hand": 25, "available": 20}],
    }
    return {**body, **overrides}


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


REFUSED = [
    pytest.param(
        "order-poll", "order-poll.tick", _encode(_tick(issued_at="2026-11-22T10:00:00")),
        "invalid-message", "issued_at", id="tick-time-without-offset",
    ),
    pytest.param(
        "shipment-lodged", "shipment.lodged",
        _encode(_lodged(lines=[{"sku": "Test001", "quantity": "2"}])),
        "invalid-message", "lines.0.quantity", id="lodged-quantity-as-string",
    ),
    pytest.param(
        "shipment-lodged", "shipment.lodged", b'\xff{"type": "shipment.lodged"',
        "invalid-message", "not UTF-8", id="lodged-body-not-utf8",
    ),
    pytest.param(
        "stock-snapshot", "stock.snapshot",
        _encode(_snapshot(items=[{"sku": "Test001", "on_hand": 2.5, "available": 2}])),
        "invalid-message", "items.0.on_hand", id="snapshot-float-quantity",
    ),
    pytest.param(
        "stock-snapshot", "stock.snapshot", _encode(_snapshot(client_id="NOPE")),
        "unknown-client", "NOPE", id="snapshot-unknown-client",
    ),
]


@pytest.mark.parametrize(("job", "routing_key", "body", "error_type", "reason"), REFUSED)
def test_a_message_fm_sends_that_the_service_refuses_lands_in_the_jobs_dlq_unchanged(
    broker_url: str,
    sqlite_url: str,
    emu: StoreEmulator,
    fm: FmSide,
    job: str,
    routing_key: str,
    body: bytes,
    error_type: str,
    reason: str,
) -> None:
    message_id = f"fm-{uuid.uuid4()}"
    schema = f"{routing_key}/1"
    services = make_services(broker_url, sqlite_url, [client_doc(emu.url)])
    try:
        with consumer(services, job):
            fm.publish_raw(body, routing_key, message_id=message_id, schema=schema)
            [dead] = fm.take(f"cscart.{job}.dlq", 1)
    finally:
        services.close()

    assert dead.body == body  # byte for byte, whatever it was
    props = dead.properties
    assert props.message_id == message_id
    assert props.content_type == "application/json"
    assert props.delivery_mode == 2
    headers = dead.headers
    assert headers["schema"] == schema  # FM's own headers are kept
    assert headers["cscart-error-type"] == error_type
    assert reason in headers["cscart-reason"]
    assert headers["cscart-action"]
    assert headers["cscart-consumer"] == job
    assert headers["cscart-attempts"] == 1  # refused at once, never retried
    assert headers["cscart-original-exchange"] == "fm.events"
    assert headers["cscart-original-routing-key"] == routing_key
    assert fm.depth(f"cscart.{job}") == 0  # acked once dead-lettered
    assert fm.depth(f"cscart.{job}.dlq") == 0
    assert emu.shipments == {}
