"""Fault 3: a store answering 20% of requests with a 5xx, hanging on 5% (past the client's
read timeout; a hung write is applied first: the outcome-unknown case) and answering bursts of
429 → every event is applied or dead-lettered with a reason, and nothing is done twice.

Shipment events and stock snapshots, consumed by ``cscart-fm run shipment-lodged`` and
``cscart-fm run stock-snapshot`` (SQLite state). The client honours ``Retry-After`` up to
``max_retry_wait`` (1.5 s): bursts ask for 1 s (waited out) or 3 s (given up: the message is
retried later through the delay queues, up to 6 attempts).
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from kombu import Connection

from consumers.registry import JOBS
from cscart_emulator import Fault, StoreEmulator
from cscart_fm.core import topology
from cscart_fm.core.broker import Publisher
from tests.support.broker import shipment_event
from tests.support.pipeline import API_KEY, API_USER, cli_env, client_doc, write_clients_file

from .harness import (
    Artefacts,
    ConsumerProcess,
    LeakRegistry,
    audit,
    metric_value,
    queue_depth,
    report,
    size,
    start_all,
    take_dead_letters,
)

pytestmark = [pytest.mark.broker, pytest.mark.timeout(2400)]

FIRST_ORDER = 4_000_000
SKUS_PER_SNAPSHOT = 3
MARKER = re.compile(r"FM ref (\S+)")
ERROR_STATUS = {
    "orders.get": 503, "orders.update": 502, "shipments.list": 504, "shipments.create": 500,
    "statuses.list": 503, "products.list": 502, "products.update": 500,
}
WRITES = {"orders.update", "shipments.create", "products.update"}


def shopper(n: int) -> str:
    return f"flaky.{n}@fault-store.example"


class Bursts(threading.Thread):
    """Every 3–5 s, the next 3–8 requests of one or two endpoints answer 429 (Retry-After 1 s,
    waited out by the client; sometimes 3 s, more than it waits: the message is retried)."""

    def __init__(self, faults: dict[str, Fault], rng: random.Random) -> None:
        super().__init__(name="fault-429", daemon=True)
        self.faults = faults
        self.rng = rng
        self.halt = threading.Event()
        self.bursts = 0

    def run(self) -> None:
        while not self.halt.wait(self.rng.uniform(3, 5)):
            retry_after = self.rng.choice([1, 1, 1, 3])
            for name in self.rng.sample(sorted(self.faults), k=self.rng.randint(1, 2)):
                fault = self.faults[name]
                fault.retry_after = retry_after
                fault.rate_limit_next = self.rng.randint(3, 8)
            self.bursts += 1


def test_a_flaky_store_ends_with_every_event_applied_or_dead_lettered_and_nothing_twice(
    broker_url: str, tmp_path: Path, artefacts: Artefacts, leak_registry: LeakRegistry
) -> None:
    total = size(150, 1000)
    n_stock = total // 6
    n_ship = total - n_stock
    rng = random.Random(20261124)
    emu = StoreEmulator(api_user=API_USER, api_key=API_KEY, seed=7)
    emu.add_product("Test001", 100_000, product="Test item 1")
    for n in range(n_ship):
        emu.add_order(order_id=FIRST_ORDER + n, status="P", email=shopper(n),
                      products=[{"product_code": "Test001", "amount": 1}])
    targets: dict[int, dict[str, int]] = {}
    for s in range(n_stock):
        targets[s] = {}
        for k in range(SKUS_PER_SNAPSHOT):
            sku = f"FLK-{s:04d}-{k}"
            emu.add_product(sku, 0)
            targets[s][sku] = rng.randint(1, 500)
    faults = {
        name: Fault(error_rate=0.2, error_status=status, timeout_rate=0.05, hang_seconds=1.5,
                    timeout_applies=name in WRITES)
        for name, status in ERROR_STATUS.items()
    }
    ship_events = [
        shipment_event(f"FM-F3-{n:05d}", event_id=f"f3-{n}", order_no=f"CS{FIRST_ORDER + n}",
                       cart_order_id=FIRST_ORDER + n, lines=[{"sku": "Test001", "quantity": 1}])
        for n in range(n_ship)
    ]
    stock_events = [
        {"type": "stock.snapshot", "version": 1, "event_id": f"f3-stock-{s}",
         "client_id": "ACME", "taken_at": "2026-11-23T02:00:00+11:00",
         "items": [{"sku": sku, "on_hand": q, "available": q} for sku, q in targets[s].items()]}
        for s in range(n_stock)
    ]

    with emu:
        for name, fault in faults.items():
            emu.set_fault(name, fault)
        with Connection(broker_url) as conn:
            JOBS.topology((1, 2)).declare(conn)
        clients = write_clients_file(tmp_path / "clients.yaml", [client_doc(
            emu.url,
            stock={"update_stock": True, "quantity": "on_hand"},
            limits={"read_timeout": 1, "max_attempts": 3, "max_retry_wait": 1.5,
                    "requests_per_second": 200},
        )])
        state_url = f"sqlite:///{tmp_path / 'state.sqlite'}"
        env = cli_env(broker_url, state_url, clients,
                      CSCART_FM_RETRY_DELAYS="1,2", CSCART_FM_MAX_ATTEMPTS="6",
                      CSCART_FM_LOG_LEVEL="DEBUG")
        services = {
            "shipment.lodged": ConsumerProcess("shipment-lodged", env, artefacts),
            "stock.snapshot": ConsumerProcess("stock-snapshot", env, artefacts),
        }
        published = {"shipment.lodged": n_ship, "stock.snapshot": n_stock}
        bursts = Bursts(faults, rng)
        started = time.monotonic()
        try:
            start_all(services.values())
            bursts.start()
            publisher = Publisher(broker_url)
            try:
                for body, key in [*((e, "shipment.lodged") for e in ship_events),
                                  *((e, "stock.snapshot") for e in stock_events)]:
                    publisher.publish_raw(
                        json.dumps(body).encode(), exchange=topology.EVENTS_EXCHANGE,
                        routing_key=key,
                        properties={"content_type": "application/json", "delivery_mode": 2,
                                    "message_id": body["event_id"]})
            finally:
                publisher.close()

            def settled() -> bool:
                for key, service in services.items():
                    topo = JOBS.named(service.consumer).topology((1, 2))
                    text = service.metrics()
                    final = sum(metric_value(text, "cscart_fm_messages_total",
                                             consumer=service.consumer, outcome=o)
                                for o in ("ok", "dead_letter"))
                    if final < published[key]:
                        return False
                    if any(queue_depth(broker_url, q) for q in
                           (topo.queue_name, topo.retry_queue_name(1),
                            topo.retry_queue_name(2))):
                        return False
                return True

            deadline = time.monotonic() + size(900, 2400)
            while not settled():
                for service in services.values():
                    assert service.alive(), service.log_file.read_text()[-3000:]
                assert time.monotonic() < deadline, "the consumers never got through"
                time.sleep(1)
            scrapes = {key: service.scrape() for key, service in services.items()}
        finally:
            bursts.halt.set()
            codes = {key: service.stop() for key, service in services.items()}
        elapsed = time.monotonic() - started
        emu.clear_faults()

        ship_dead = take_dead_letters(broker_url, "shipment-lodged", state_url, artefacts)
        stock_dead = take_dead_letters(broker_url, "stock-snapshot", state_url, artefacts)
        dead_refs = Counter(json.loads(d.body)["shipment_ref"] for d in ship_dead)
        dead_stock = Counter(json.loads(d.body)["event_id"] for d in stock_dead)
        refs = Counter(m.group(1) for s in emu.shipments.values()
                       for m in [MARKER.search(s["comments"])] if m)
        per_order = Counter(int(s["order_id"]) for s in emu.shipments.values())
        applied_ship = {f"FM-F3-{n:05d}" for n in range(n_ship)
                        if refs.get(f"FM-F3-{n:05d}") == 1
                        and emu.orders[FIRST_ORDER + n].status == "C"}
        applied_stock = {f"f3-stock-{s}" for s in range(n_stock)
                         if all(emu.product_by_code(sku)["amount"] == q  # type: ignore[index]
                                for sku, q in targets[s].items())}
        all_ship = {f"FM-F3-{n:05d}" for n in range(n_ship)}
        all_stock = {f"f3-stock-{s}" for s in range(n_stock)}
        faulted = Counter(r.fault for r in emu.requests if r.fault)
        dead_types = Counter(str(d.headers.get("cscart-error-type"))
                             for d in ship_dead + stock_dead)

        def outcome(key: str, name: str) -> int:
            return int(metric_value(scrapes[key], "cscart_fm_messages_total",
                                    consumer=services[key].consumer, outcome=name))

        figures = {
            "shipment events": n_ship,
            "stock snapshots": n_stock,
            "store requests": len(emu.requests),
            "answered 5xx (injected)": faulted["error"],
            "hung past the read timeout": faulted["timeout"],
            "answered 429 (in bursts)": faulted["rate_limit"],
            "429 bursts": bursts.bursts,
            "client retries (GET/PUT)": int(sum(metric_value(
                s, "cscart_fm_store_retries_total") for s in scrapes.values())),
            "message retries (delay queues)": outcome("shipment.lodged", "retry")
            + outcome("stock.snapshot", "retry"),
            "shipments applied": len(applied_ship),
            "shipments dead-lettered": len(dead_refs),
            "shipments applied and also dead-lettered": len(applied_ship & set(dead_refs)),
            "snapshots applied": len(applied_stock),
            "snapshots dead-lettered": len(dead_stock),
            "duplicate shipments": sum(n - 1 for n in refs.values() if n > 1),
            **{f"  dead-letter type {k}": v for k, v in sorted(dead_types.items())},
            "seconds": round(elapsed, 1),
        }
        report("3. flaky store (20% 5xx, 5% timeouts, 429 bursts)", figures)
        assert codes == {"shipment.lodged": 0, "stock.snapshot": 0}
        assert emu.errors == []
        assert faulted["error"] and faulted["timeout"] and faulted["rate_limit"]
        assert max(refs.values(), default=0) <= 1, "a shipment was created twice"
        assert max(per_order.values(), default=0) <= 1
        assert max(dead_refs.values(), default=0) <= 1
        assert all_ship <= applied_ship | set(dead_refs), sorted(
            all_ship - applied_ship - set(dead_refs))[:5]
        assert all_stock <= applied_stock | set(dead_stock)
        assert outcome("shipment.lodged", "ok") + len(ship_dead) == n_ship
        assert outcome("stock.snapshot", "ok") + len(stock_dead) == n_stock
        for letter in ship_dead + stock_dead:
            assert letter.headers.get("cscart-error-type"), letter.headers
            assert str(letter.headers.get("cscart-reason") or "").strip(), letter.headers
        audit(artefacts, leak_registry, {shopper(n) for n in range(n_ship)})
