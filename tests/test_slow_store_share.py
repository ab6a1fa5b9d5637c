"""One slow store cannot take every worker of a consumer.

Seen: a store trickling one byte every 2 s held four calls, all four shipment workers, and
another client's shipment waited 85 s. Once a client's messages in hand have all run a while
and it holds all workers but one, its next messages go round a delay queue (their attempt not
counted) and the last worker stays free for the other clients.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from cscart_fm.core.runtime import Delivery
from schemas.messages import ShipmentLodged

from .support.broker import declare, depth, publish_json, running, shipment_event, wait_for

pytestmark = pytest.mark.broker

SLOW_CALL = 4.0


class StoreHandler:
    """Client SLOW's store takes ``SLOW_CALL`` seconds a message; FAST's answers at once."""

    consumer = "shipment-lodged"

    def __init__(self) -> None:
        self.done: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()

    def handle(self, event: ShipmentLodged, delivery: Delivery) -> None:
        with self.lock:
            self.calls[event.shipment_ref] = self.calls.get(event.shipment_ref, 0) + 1
        if event.client_id == "SLOW":
            time.sleep(SLOW_CALL)
        with self.lock:
            self.done[event.shipment_ref] = time.monotonic()


def test_a_slow_store_leaves_a_worker_for_the_other_clients(broker_url: str) -> None:
    declare(broker_url)
    handler = StoreHandler()
    options: dict[str, Any] = {"concurrency": 4, "prefetch": 8, "slow_client_after": 0.5}
    with running(handler, broker_url, **options):
        for n in range(3):
            publish_json(broker_url, shipment_event(f"S{n}", client_id="SLOW"), "shipment.lodged")
        time.sleep(1.0)  # SLOW's three messages in hand have now run a while: its store is slow
        for n in range(3, 8):
            publish_json(broker_url, shipment_event(f"S{n}", client_id="SLOW"), "shipment.lodged")
        sent = time.monotonic()
        publish_json(broker_url, shipment_event("F1", client_id="FAST"), "shipment.lodged")
        wait_for(lambda: "F1" in handler.done, timeout=SLOW_CALL)
        assert handler.done["F1"] - sent < SLOW_CALL / 2  # not behind SLOW's calls
        # SLOW's messages all get done in the end, each once.
        wait_for(lambda: len(handler.done) == 9, timeout=60)
        wait_for(lambda: depth(broker_url, "cscart.shipment-lodged") == 0)
    assert set(handler.done) == {f"S{n}" for n in range(8)} | {"F1"}
    assert all(count == 1 for count in handler.calls.values())
    assert depth(broker_url, "cscart.shipment-lodged.dlq") == 0


def test_a_healthy_client_may_use_every_worker(broker_url: str) -> None:
    """A burst for one client whose store answers: no deferral, every worker busy."""
    declare(broker_url)
    busy, peak, lock = [0], [0], threading.Lock()

    class Quick:
        consumer = "shipment-lodged"

        def handle(self, event: ShipmentLodged, delivery: Delivery) -> None:
            with lock:
                busy[0] += 1
                peak[0] = max(peak[0], busy[0])
            time.sleep(0.2)
            with lock:
                busy[0] -= 1

    with running(Quick(), broker_url, concurrency=4, prefetch=8, slow_client_after=0.5):
        for n in range(16):
            publish_json(broker_url, shipment_event(f"Q{n}"), "shipment.lodged")
        wait_for(lambda: depth(broker_url, "cscart.shipment-lodged") == 0 and busy[0] == 0)
    assert peak[0] == 4
    assert depth(broker_url, "cscart.shipment-lodged.retry.1s") == 0
