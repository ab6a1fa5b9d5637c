"""Fault 2: orders imported while the order-poll consumer is killed with SIGKILL again and
again → every order at FM's queue, and any copy of an order carries the same ``event_id``.

``cscart-fm run order-poll`` (SQLite state) polls a store of new orders with a small page and
some latency, so that every kill lands in the middle of a poll: between a page's claim, its
publishes and their recording. Ticks come every second, as the tick producer would send them.
FM's side consumes ``fm.orders.imported`` for the whole run.

Each process is killed a random 0.2–1.5 s after it published its first new order. (Killed on a
fixed clock instead, every 1–2 s, the import stalls: a poll killed mid-listing saves no
progress, and each new process first re-reads every page it already imported, so with 20
orders a page and 60 ms a request it never gets past about 580 orders.)
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kombu import Connection, Consumer
from kombu.message import Message

from consumers.registry import JOBS
from cscart_emulator import Fault, StoreEmulator
from cscart_fm.core import topology
from cscart_fm.core.broker import Publisher
from schemas.messages import OrderPollTick, order_event_id
from tests.support.pipeline import API_KEY, API_USER, cli_env, client_doc, write_clients_file

from .harness import (
    Artefacts,
    ConsumerProcess,
    LeakRegistry,
    audit,
    queue_depth,
    raw_body,
    report,
    size,
    take_dead_letters,
    total_over_processes,
)

pytestmark = [pytest.mark.broker, pytest.mark.timeout(1800)]

CONSUMER = "order-poll"
FIRST_ORDER = 3_000_000
KILL_AFTER = (0.2, 1.5)
"""Seconds a process runs, once it has published a new order, before it is killed."""


def shopper(n: int) -> str:
    return f"buyer.{n}@fault-orders.example"


class FmSide(threading.Thread):
    """FM consuming ``fm.orders.imported``: every copy, by cart order id."""

    def __init__(self, url: str) -> None:
        super().__init__(name="fault-fm", daemon=True)
        self.url = url
        self.event_ids: dict[int, set[str]] = defaultdict(set)
        self.copies: dict[int, int] = defaultdict(int)
        self.mismatched: list[str] = []
        self.ready = threading.Event()
        self.halt = threading.Event()

    def run(self) -> None:
        with Connection(self.url, heartbeat=0) as conn:
            conn.connect()
            channel = conn.channel()
            channel.basic_qos(0, 500, False)

            def on_message(message: Message) -> None:
                body = json.loads(raw_body(message))
                cart_id = int(body["cart_order_id"])
                self.copies[cart_id] += 1
                self.event_ids[cart_id].add(body["event_id"])
                if message.properties.get("message_id") != body["event_id"]:
                    self.mismatched.append(f"{cart_id}: message_id differs from event_id")
                message.ack()

            consumer = Consumer(channel, queues=[topology.orders_queue], on_message=on_message,
                                no_ack=False, auto_declare=False)
            consumer.consume()
            self.ready.set()
            while not self.halt.is_set():
                try:
                    conn.drain_events(timeout=0.2)
                except TimeoutError:
                    pass


class Ticker(threading.Thread):
    """A tick every second (the tick producer's job)."""

    def __init__(self, url: str) -> None:
        super().__init__(name="fault-ticker", daemon=True)
        self.url = url
        self.sent = 0
        self.halt = threading.Event()

    def run(self) -> None:
        publisher = Publisher(self.url)
        try:
            while not self.halt.wait(1.0):
                publisher.publish(OrderPollTick(type="order-poll.tick", version=1,
                                                event_id=f"tick-{uuid.uuid4().hex}",
                                                client_id="ACME",
                                                issued_at=datetime.now(UTC)))
                self.sent += 1
        finally:
            publisher.close()


def test_orders_survive_repeated_sigkill_each_at_fm_once_or_as_an_identical_copy(
    broker_url: str, tmp_path: Path, artefacts: Artefacts, leak_registry: LeakRegistry
) -> None:
    count = size(1000, 5000)
    rng = random.Random(20261122)
    emu = StoreEmulator(api_user=API_USER, api_key=API_KEY)
    emu.add_product("Test001", 1_000_000, product="Test item 1")
    emu.add_product("NPF-MUG-350", 1_000_000, product="Enamel Camping Mug 350ml",
                    price="14.95")
    placed = int(time.time()) - count * 60 - 3600
    for n in range(count):
        emu.add_order(order_id=FIRST_ORDER + n, status="P", timestamp=placed + n * 60,
                      email=shopper(n), firstname="Buyer", lastname=f"No{n}",
                      products=[{"product_code": "NPF-MUG-350", "amount": 1 + n % 3}])
    emu.set_fault("*", Fault(latency=0.06))

    with emu:
        with Connection(broker_url) as conn:
            JOBS.topology((1,)).declare(conn)
        clients = write_clients_file(
            tmp_path / "clients.yaml",
            # One request at a time: with four side by side the import outruns the kills.
            [client_doc(emu.url, limits={"page_size": 20, "read_timeout": 5,
                                         "concurrency": 1})],
        )
        state_url = f"sqlite:///{tmp_path / 'state.sqlite'}"
        env = cli_env(broker_url, state_url, clients,
                      CSCART_FM_LOG_LEVEL="DEBUG", CSCART_FM_SHUTDOWN_GRACE="5")
        fm = FmSide(broker_url)
        fm.start()
        assert fm.ready.wait(30)
        service = ConsumerProcess(CONSUMER, env, artefacts)
        ticker = Ticker(broker_url)
        started = time.monotonic()
        try:
            service.start().wait_ready()
            ticker.start()
            deadline = started + size(600, 1800)
            while len(fm.copies) < count:
                before = len(fm.copies)
                while len(fm.copies) == before:
                    assert time.monotonic() < deadline, f"only {before} of {count} at FM"
                    time.sleep(0.01)
                time.sleep(rng.uniform(*KILL_AFTER))
                if len(fm.copies) >= count:
                    break
                service.kill()
                service.start().wait_ready(timeout=120)
            # No more kills: the last process settles (a last tick, the queue drained).
            ticker.halt.set()
            ticker.join(timeout=30)
            settle = time.monotonic() + 120
            while queue_depth(broker_url, "cscart.order-poll"):
                assert time.monotonic() < settle
                time.sleep(0.2)
            time.sleep(2)
            assert service.stop() == 0
        finally:
            ticker.halt.set()
            if service.alive():
                service.stop()
            fm.halt.set()
            fm.join(timeout=10)
        elapsed = time.monotonic() - started
        dead = take_dead_letters(broker_url, CONSUMER, state_url, artefacts)
        # A tick in hand at a kill goes back to the head of the queue and to the next process:
        # held through more than 20 kills it is dead-lettered by the broker (x-delivery-limit),
        # although it harmed nothing; the next tick does its work. Counted, not failed.
        by_limit = [d for d in dead if d.headers.get("x-first-death-reason") == "delivery_limit"]
        other_dead = [d for d in dead if d not in by_limit]
        expected = {FIRST_ORDER + n for n in range(count)}
        copies = sum(n - 1 for n in fm.copies.values())
        several_ids = {k: v for k, v in fm.event_ids.items() if len(v) > 1}
        wrong_ids = [k for k, v in fm.event_ids.items()
                     if v != {order_event_id("ACME", k)}]
        figures = {
            "orders in the store": count,
            "kills (SIGKILL)": service.kills,
            "consumer starts": service.starts,
            "ticks sent": ticker.sent,
            "distinct orders at FM's queue": len(fm.copies),
            "messages at FM's queue": sum(fm.copies.values()),
            "copies (re-published after a kill)": copies,
            "orders with more than one event_id": len(several_ids),
            "orders published (all processes)": int(total_over_processes(
                service, "cscart_fm_orders_imported_total", client="ACME")),
            "ticks dead-lettered by the delivery limit (held through > 20 kills)": len(by_limit),
            "ticks dead-lettered otherwise": len(other_dead),
            "seconds": round(elapsed, 1),
        }
        report("2. orders under repeated SIGKILL", figures)
        assert service.kills >= 2
        assert emu.errors == []
        assert set(fm.copies) == expected
        assert not several_ids, list(several_ids.items())[:5]
        assert not wrong_ids, wrong_ids[:5]
        assert not fm.mismatched, fm.mismatched[:5]
        assert not other_dead, [d.headers.get("cscart-reason") for d in other_dead[:5]]
        audit(artefacts, leak_registry, {shopper(n) for n in range(count)})
