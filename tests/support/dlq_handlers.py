"""Test handlers and helpers for the dead-letter and producer tests.

The real consumers are written elsewhere; these small handlers run on the real runtime and
fail the way a consumer fails (each error type), so dead letters are made the real way.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from kombu import Connection, Queue
from typer.testing import CliRunner, Result

from cscart_emulator import StoreEmulator
from cscart_fm.cli import app
from cscart_fm.core.errors import NotFound
from cscart_fm.core.runtime import Delivery
from schemas.messages import ShipmentLodged, StockSnapshot


class Planned:
    """A shipment-lodged handler that raises what the plan says for a shipment_ref.

    ``plan[ref]`` is an exception (raised every time until the test removes it: the cause is
    not fixed yet) or a list of exceptions (raised once each, in order). Success "creates the
    shipment" once per shipment_ref, as the real consumer does: a repeat changes nothing."""

    consumer = "shipment-lodged"
    event_type = ShipmentLodged

    def __init__(self, plan: dict[str, Exception | list[Exception]] | None = None) -> None:
        self.plan: dict[str, Exception | list[Exception]] = dict(plan or {})
        self.calls: Counter[str] = Counter()
        self.successes: Counter[str] = Counter()
        self.created: set[str] = set()
        self.lock = threading.Lock()

    def handle(self, event: ShipmentLodged, delivery: Delivery) -> None:
        ref = event.shipment_ref
        with self.lock:
            self.calls[ref] += 1
            step = self.plan.get(ref)
            error = step.pop(0) if isinstance(step, list) and step else step
            if isinstance(error, list):
                error = None
        if error is not None:
            raise error
        with self.lock:
            self.successes[ref] += 1
            self.created.add(ref)

    def fix(self, *refs: str) -> None:
        with self.lock:
            for ref in refs or list(self.plan):
                self.plan.pop(ref, None)


class StockChecker:
    """A stock-snapshot handler that needs every SKU to exist in the store emulator: an
    unknown SKU is NotFound (dead-lettered) until the test adds the product."""

    consumer = "stock-snapshot"
    event_type = StockSnapshot

    def __init__(self, emu: StoreEmulator) -> None:
        self.emu = emu
        self.applied: list[str] = []
        self.lock = threading.Lock()

    def handle(self, event: StockSnapshot, delivery: Delivery) -> None:
        for item in event.items:
            if self.emu.product_by_code(item.sku) is None:
                raise NotFound(f"products.list: no product with code {item.sku!r}")
        for item in event.items:
            product = self.emu.product_by_code(item.sku)
            assert product is not None
            product["amount"] = item.on_hand
        with self.lock:
            self.applied.append(event.event_id)


def stock_event(event_id: str, sku: str, client_id: str = "ACME") -> dict[str, Any]:
    return {
        "type": "stock.snapshot",
        "version": 1,
        "event_id": event_id,
        "client_id": client_id,
        "taken_at": "2026-11-23T02:00:00+11:00",
        "items": [{"sku": sku, "on_hand": 7, "available": 5}],
    }


def order_imported_body() -> dict[str, Any]:
    """An order as FM receives it: full of a shopper's personal data."""
    address = {
        "name": "Jane Citizen",
        "company": "",
        "address1": "1 George St",
        "address2": "",
        "city": "Sydney",
        "state": "NSW",
        "postcode": "2000",
        "country": "AU",
        "phone": "+61 400 000 123",
        "email": "jane@example.com",
    }
    return {
        "type": "order.imported",
        "version": 1,
        "event_id": "evt-order-1",
        "client_id": "ACME",
        "order_no": "CS1000012",
        "cart_order_id": 1000012,
        "cart_status": "P",
        "placed_at": "2026-11-22T09:41:07+11:00",
        "is_test": False,
        "currency": "AUD",
        "customer": {"name": "Jane Citizen", "email": "jane@example.com", "phone": "+61 400 000 123"},
        "ship_to": address,
        "bill_to": address,
        "shipping_method": "Standard",
        "notes": "Ring Jane on 0400 000 123",
        "lines": [
            {"line_id": "1", "sku": "Test001", "name": "Test item 1", "quantity": 2, "unit_price": "10.00"}
        ],
        "totals": {"subtotal": "20.00", "shipping": "9.90", "tax": "2.99", "discount": "0.00", "total": "29.90"},
    }


def exceed_delivery_limit(url: str, queue_name: str, limit: int = 20) -> None:
    """Hand a message back to its quorum queue until the broker dead-letters it itself
    (``x-delivery-limit``), as it would for a message that keeps killing the consumer."""
    with Connection(url) as conn:
        queue = Queue(queue_name, no_declare=True)(conn.default_channel)
        for _ in range(limit + 5):
            message = queue.get(no_ack=False)
            if message is None:
                return
            message.requeue()
    raise AssertionError("the broker never dead-lettered the message")


def cli(env: dict[str, str], *args: str, stdin: str | None = None) -> Result:
    """``cscart-fm ARGS`` in this process, with the given environment."""
    return CliRunner().invoke(app, list(args), env=env, input=stdin)


@contextmanager
def logging_restored() -> Iterator[None]:
    """The CLI configures logging for the process; give the next test back what it had."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**config)
