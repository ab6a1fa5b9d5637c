"""Benchmark 4: the runtime's overhead.

Messages per second through ``ConsumerRuntime`` with a no-op handler, against two raw
consume-ack loops: kombu (``Consumer`` with an ``on_message`` that acks: the runtime's own
client library, so the ratio is the runtime's overhead) and pika (``BlockingConnection``,
``basic_consume`` with a callback that acks: a second, independent client, so the figure is
not only relative to kombu). The same broker, the same queue type (the consumer's quorum work
queue, declared by the topology module), the same prefetch, one ack per message and one
message at a time (runtime concurrency 1). Each side consumes a queue pre-filled with the same
valid ``shipment.lodged`` messages, on its own fresh vhost; the sides alternate for several
rounds and the median of each is reported.

All sides run in this process; the main thread polls the count of acknowledged messages
every 2 ms on each side (the runtime's own ``cscart_fm_messages_total{outcome="ok"}``
counter, incremented right after the ack; the raw loops' counters after their ack), from the
moment the consumer is consuming to the moment the last message is acknowledged.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable

import pika
from kombu import Connection, Consumer, Producer
from kombu.message import Message as AmqpMessage
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from consumers.registry import JOBS
from cscart_fm.core import metrics
from cscart_fm.core.observability import configure_logging
from cscart_fm.core.runtime import ConsumerRuntime, Delivery, RuntimeOptions
from schemas.messages import Message, ShipmentLodged

from .common import Result, fresh_vhost, log

CONSUMER = "shipment-lodged"
JOB = JOBS.named(CONSUMER)
TOPOLOGY = JOB.topology()


class NoOpHandler:
    consumer = CONSUMER
    event_type: type[Message] = ShipmentLodged

    def handle(self, event: ShipmentLodged, delivery: Delivery) -> None:
        return None


def _body(n: int) -> bytes:
    return json.dumps(
        {
            "type": "shipment.lodged",
            "version": 1,
            "event_id": f"bench-{n}",
            "client_id": "ACME",
            "order_no": f"CS{1000000 + n}",
            "shipment_ref": f"FM-SHP-{n}",
            "tracking_number": "33ABC1234567",
            "carrier": "Australia Post",
            "lodged_at": "2026-11-23T15:02:00+11:00",
            "lines": [{"sku": "Test001", "quantity": 2}],
            "backordered": [],
        }
    ).encode()


def _fill(url: str, count: int) -> None:
    """Declare the consumer's queues and put ``count`` persistent messages on its work queue."""
    with Connection(url) as conn:
        channel = conn.channel()
        for queue in TOPOLOGY.queues():
            queue(channel).declare()
        producer = Producer(channel)
        for n in range(count):
            producer.publish(
                _body(n),
                exchange="",
                routing_key=TOPOLOGY.queue_name,
                serializer=None,
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
                message_id=f"bench-{n}",
            )
        deadline = time.monotonic() + 120
        while channel.queue_declare(queue=TOPOLOGY.queue_name, passive=True).message_count < count:
            if time.monotonic() > deadline:
                raise RuntimeError("the work queue did not fill up")
            time.sleep(0.05)


def _timed(count: int, started: Callable[[], bool], done: Callable[[], float]) -> float:
    """Seconds from ``started()`` to ``done() >= count`` (polled every 2 ms)."""
    deadline = time.monotonic() + 60
    while not started():
        if time.monotonic() > deadline:
            raise RuntimeError("the consumer did not start")
        time.sleep(0.001)
    t0 = time.monotonic()
    limit = t0 + 3600
    while done() < count:
        if time.monotonic() > limit:
            raise RuntimeError("the consumer did not finish within an hour")
        time.sleep(0.002)
    return time.monotonic() - t0


def run_runtime(url: str, count: int, prefetch: int) -> float:
    """Messages per second through ConsumerRuntime (no-op handler, concurrency 1)."""
    ok = metrics.MESSAGES.labels(CONSUMER, "ok")
    base = ok._value.get()
    runtime: ConsumerRuntime[ShipmentLodged] = ConsumerRuntime(
        NoOpHandler(),
        broker_url=url,
        topology=TOPOLOGY,
        accepts=JOB.events,
        options=RuntimeOptions(prefetch=prefetch, concurrency=1, heartbeat=30),
    )
    thread = threading.Thread(target=runtime.run, name="bench-runtime", daemon=True)
    thread.start()
    try:
        seconds = _timed(count, lambda: runtime.ready, lambda: ok._value.get() - base)
    finally:
        runtime.stop()
        thread.join(timeout=60)
    return count / seconds


def run_raw(url: str, count: int, prefetch: int) -> float:
    """Messages per second through a raw kombu consume-ack loop."""
    acked = 0
    consuming = threading.Event()
    stop = threading.Event()

    def loop() -> None:
        nonlocal acked
        with Connection(url, heartbeat=30) as conn:
            conn.connect()
            channel = conn.channel()
            channel.basic_qos(0, prefetch, False)

            def on_message(message: AmqpMessage) -> None:
                nonlocal acked
                message.ack()
                acked += 1

            consumer = Consumer(
                channel,
                queues=[TOPOLOGY.queue],
                on_message=on_message,
                no_ack=False,
                auto_declare=False,
            )
            consumer.consume()
            consuming.set()
            while not stop.is_set() and acked < count:
                try:
                    conn.drain_events(timeout=0.2)
                except TimeoutError:
                    pass

    thread = threading.Thread(target=loop, name="bench-raw", daemon=True)
    thread.start()
    try:
        seconds = _timed(count, consuming.is_set, lambda: acked)
    finally:
        stop.set()
        thread.join(timeout=60)
    return count / seconds


def run_pika(url: str, count: int, prefetch: int) -> float:
    """Messages per second through a raw pika consume-ack loop (BlockingConnection)."""
    acked = 0
    consuming = threading.Event()
    stop = threading.Event()

    def loop() -> None:
        nonlocal acked
        params = pika.URLParameters(url)  # amqp://user:pass@host:port/vhost, as kombu's
        params.heartbeat = 30  # as the other two sides
        conn = pika.BlockingConnection(params)
        try:
            channel = conn.channel()
            channel.basic_qos(prefetch_count=prefetch)

            def on_message(
                ch: BlockingChannel, method: Basic.Deliver, _props: BasicProperties, _body: bytes
            ) -> None:
                nonlocal acked
                ch.basic_ack(method.delivery_tag)
                acked += 1

            channel.basic_consume(TOPOLOGY.queue_name, on_message, auto_ack=False)
            consuming.set()  # basic_consume returned: the broker answered consume-ok
            while not stop.is_set() and acked < count:
                conn.process_data_events(time_limit=0.2)
        finally:
            if conn.is_open:
                conn.close()

    thread = threading.Thread(target=loop, name="bench-pika", daemon=True)
    thread.start()
    try:
        seconds = _timed(count, consuming.is_set, lambda: acked)
    finally:
        stop.set()
        thread.join(timeout=60)
    return count / seconds


RUNNERS: dict[str, Callable[[str, int, int], float]] = {
    "raw": run_raw,
    "pika": run_pika,
    "runtime": run_runtime,
}
"""Each side by its name in the log: raw kombu, raw pika, the runtime."""


def _one(kind: str, count: int, prefetch: int) -> float:
    with fresh_vhost(f"b4-{kind}") as url:
        _fill(url, count)
        rate = RUNNERS[kind](url, count, prefetch)
    log(f"bench 4: {kind:7s} prefetch {prefetch}: {rate:,.0f} msg/s ({count:,} messages)")
    return rate


def run(quick: bool = False) -> Result:
    configure_logging("WARNING", "json")
    count = 5_000 if quick else 20_000
    rounds = 2 if quick else 3
    prefetch = 8
    result = Result(4, "Runtime overhead")
    rates: dict[str, list[float]] = {kind: [] for kind in RUNNERS}
    for _ in range(rounds):
        for kind, measured in rates.items():
            measured.append(_one(kind, count, prefetch))
    raw, pik, ours = rates["raw"], rates["pika"], rates["runtime"]
    raw_rate, pika_rate = statistics.median(raw), statistics.median(pik)
    our_rate = statistics.median(ours)
    ratio = our_rate / raw_rate
    setup = (f"prefetch {prefetch}, concurrency 1, {count:,} messages per round, "
             f"{rounds} rounds each")
    result.add("raw kombu consume-ack loop", f"{raw_rate:,.0f} msg/s",
               notes="median of " + ", ".join(f"{r:,.0f}" for r in raw))
    result.add("raw pika consume-ack loop (BlockingConnection)", f"{pika_rate:,.0f} msg/s",
               notes="median of " + ", ".join(f"{r:,.0f}" for r in pik))
    result.add("ConsumerRuntime, no-op handler", f"{our_rate:,.0f} msg/s",
               notes="median of " + ", ".join(f"{r:,.0f}" for r in ours))
    # The goal is against kombu, the runtime's own client: that ratio is its overhead.
    result.add("runtime ÷ raw kombu", f"{ratio:.2f}", "≥ 0.7", ratio >= 0.7, notes=setup)
    # No goal: pika is another library with its own costs; this only places the figures.
    result.add("runtime ÷ raw pika", f"{our_rate / pika_rate:.2f}", notes=setup)
    # The same at prefetch 1: one message outstanding, so every message pays the whole
    # hand-off to the worker and back (no batch to share it with) and its own ack.
    small = 300
    one = {kind: _one(kind, small, 1) for kind in RUNNERS}
    result.add("prefetch 1 (diagnostic): runtime ÷ raw kombu",
               f"{one['runtime'] / one['raw']:.3f}",
               notes=f"{one['runtime']:,.0f} vs {one['raw']:,.0f} msg/s, {small} messages")
    result.add("prefetch 1 (diagnostic): runtime ÷ raw pika",
               f"{one['runtime'] / one['pika']:.3f}",
               notes=f"{one['runtime']:,.0f} vs {one['pika']:,.0f} msg/s, {small} messages")
    result.details.append(
        f"Queue: the consumer's quorum work queue (`{TOPOLOGY.queue_name}`), pre-filled with "
        f"{count:,} persistent `shipment.lodged` messages per round, a fresh vhost per round. "
        f"Prefetch {prefetch}, concurrency 1, one ack per message; {rounds} alternating rounds "
        "(raw kombu, raw pika, runtime), medians reported."
    )
    return result
