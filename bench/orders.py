"""What the order benchmarks (1, 2, 5) share: a store full of orders, FM's side of
``fm.orders.imported``, ticks, and a ``cscart-fm run order-poll`` to measure."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kombu import Connection, Consumer
from kombu.message import Message

from cscart_fm.core import topology
from cscart_fm.core.broker import Publisher
from schemas.messages import OrderPollTick

from .common import (
    CLIENT,
    Service,
    client_doc,
    metric_value,
    service_env,
    wait_until,
    write_clients,
)
from .store import RemoteStore

CONSUMER = "order-poll"
LIMITS: dict[str, Any] = {"requests_per_second": 1000, "concurrency": 4, "page_size": 100}
"""The client's limits in the order benchmarks: the default concurrency (4) and page size
(100); the rate limit raised to the settings' maximum so that it never binds (the bound of
benchmark 1 is about latency and concurrency)."""


def shopper(n: int) -> str:
    return f"shopper.{n}@bench-mail.example"


def seed_orders(store: RemoteStore, count: int, *, placed_from: int, step: int = 1,
                status: str = "P") -> None:
    """``count`` orders (one line each), one every ``step`` seconds from ``placed_from``."""
    store.call("add_product", "Test001", 1_000_000, product="Test item 1", price="10.00")
    store.call("add_product", "NPF-MUG-350", 1_000_000, product="Enamel Mug", price="14.95")
    store.call(
        "add_history",
        count,
        start_timestamp=placed_from,
        step_seconds=step,
        status=status,
        products=[{"product_code": "NPF-MUG-350", "amount": 2, "price": "14.95",
                   "product": "Enamel Mug"}],
        email=shopper(0),
        firstname="Jane",
        lastname="Citizen",
    )


class FmQueue(threading.Thread):
    """FM's side: consumes ``fm.orders.imported`` and notes when each distinct event_id
    arrived (an order is at FM's queue once the publisher's confirm came back, a moment
    before this consumer sees it)."""

    def __init__(self, url: str) -> None:
        super().__init__(name="bench-fm", daemon=True)
        self.url = url
        self.seen: set[str] = set()
        self.copies = 0
        self.last_new_at = 0.0
        self.ready = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        with Connection(self.url, heartbeat=0) as conn:
            conn.connect()
            channel = conn.channel()
            channel.basic_qos(0, 2000, False)
            topology.orders_queue(channel).declare()

            def on_message(message: Message) -> None:
                event_id = message.properties.get("message_id") or ""
                if event_id in self.seen:
                    self.copies += 1
                else:
                    self.seen.add(event_id)
                    self.last_new_at = time.monotonic()

            consumer = Consumer(channel, queues=[topology.orders_queue], on_message=on_message,
                                no_ack=True, auto_declare=False)
            consumer.consume()
            self.ready.set()
            while not self._halt.is_set():
                try:
                    conn.drain_events(timeout=0.2)
                except TimeoutError:
                    pass

    def wait_for(self, count: int, timeout: float) -> float:
        """Monotonic time at which the ``count``-th distinct order arrived."""
        wait_until(lambda: len(self.seen) >= count, timeout=timeout, interval=0.005)
        return self.last_new_at

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def tick(publisher: Publisher) -> None:
    publisher.publish(OrderPollTick(type="order-poll.tick", version=1,
                                    event_id=f"tick-{uuid.uuid4().hex}", client_id=CLIENT,
                                    issued_at=datetime.now(UTC)))


def order_poll_service(url: str, store: RemoteStore, work: Path, **extra: str) -> Service:
    clients = write_clients(work / "clients.yaml", [client_doc(store.url, limits=LIMITS)])
    env = service_env(url, f"sqlite:///{work / 'state.sqlite'}", clients, **extra)
    return Service(CONSUMER, env, work / "order-poll.log")


def finished(service: Service) -> float:
    """Ticks the consumer has finished (handled, retried or dead-lettered)."""
    text = service.metrics()
    return sum(metric_value(text, "cscart_fm_messages_total", consumer=CONSUMER, outcome=o)
               for o in ("ok", "retry", "dead_letter"))


def run_tick(service: Service, publisher: Publisher, timeout: float) -> float:
    """Publish one tick, wait until it is acknowledged as done; seconds it took."""
    before = finished(service)
    ok_before = metric_value(service.metrics(), "cscart_fm_messages_total",
                             consumer=CONSUMER, outcome="ok")
    started = time.monotonic()
    tick(publisher)
    wait_until(lambda: finished(service) > before, timeout=timeout, interval=0.005)
    seconds = time.monotonic() - started
    ok = metric_value(service.metrics(), "cscart_fm_messages_total", consumer=CONSUMER,
                      outcome="ok")
    if ok <= ok_before:
        raise RuntimeError("the tick failed (retried or dead-lettered): see the log in "
                           f"{service.log_file}")
    return seconds
