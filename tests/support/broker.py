"""Small helpers for tests that talk to the real broker."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from kombu import Connection, Queue

from consumers.registry import JOBS
from cscart_fm.core import topology
from cscart_fm.core.broker import Publisher
from cscart_fm.core.jobs import Job
from cscart_fm.core.runtime import (
    ATTEMPT_HEADER,
    ConsumerRuntime,
    Handler,
    Middleware,
    RuntimeOptions,
)


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll until ``condition()`` is truthy; fail the test with a clear message otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def shipment_event(ref: str, **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "shipment.lodged",
        "version": 1,
        "event_id": f"evt-{ref}",
        "client_id": "ACME",
        "order_no": "CS1000012",
        "shipment_ref": ref,
        "tracking_number": "33ABC1234567",
        "carrier": "Australia Post",
        "lodged_at": "2026-11-23T15:02:00+11:00",
        "lines": [{"sku": "Test001", "quantity": 2}],
        "backordered": [],
    }
    event.update(overrides)
    return event


def publish_json(
    url: str, body: dict[str, Any] | bytes, routing_key: str, message_id: str | None = None
) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    props: dict[str, Any] = {"content_type": "application/json", "delivery_mode": 2}
    if message_id is None and isinstance(body, dict):
        message_id = body.get("event_id")
    if message_id:
        props["message_id"] = message_id
    publisher = Publisher(url)
    try:
        publisher.publish_raw(
            raw, exchange=topology.EVENTS_EXCHANGE, routing_key=routing_key, properties=props
        )
    finally:
        publisher.close()


def publish_attempt(url: str, body: dict[str, Any], routing_key: str, attempt: int) -> None:
    """``body`` as its delay queue gives a retry back to the work queue: with the runtime's
    attempt header. kombu's in-process broker never gives a retry back, so a rule about a
    later attempt publishes that attempt itself."""
    props: dict[str, Any] = {
        "content_type": "application/json",
        "delivery_mode": 2,
        "message_id": body.get("event_id"),
        "headers": {ATTEMPT_HEADER: attempt},
    }
    publisher = Publisher(url)
    try:
        publisher.publish_raw(
            json.dumps(body).encode(), exchange=topology.EVENTS_EXCHANGE,
            routing_key=routing_key, properties=props,
        )
    finally:
        publisher.close()


def put_back(url: str, queue_name: str, messages: Sequence[Any]) -> None:
    """Put messages taken with ``drain`` back in their queue as they were (body, headers,
    properties): what RabbitMQ does with a message whose ack never came, and kombu's
    in-process broker does not (it loses an unacked message with its connection)."""
    with Connection(url) as conn:
        producer = conn.Producer()
        for message in messages:
            properties = {
                name: value for name, value in message.properties.items()
                if name not in ("application_headers", "delivery_info", "delivery_tag")
            }
            producer.publish(
                message.body, exchange="", routing_key=queue_name,
                headers=dict(message.headers or {}), content_type=message.content_type,
                content_encoding=message.content_encoding, retry=False, **properties,
            )


def drain(url: str, queue_name: str) -> list[Any]:
    """Take every message out of a queue (bodies and headers), acking them."""
    taken = []
    with Connection(url) as conn:
        queue = Queue(queue_name, no_declare=True)(conn.default_channel)
        while True:
            message = queue.get(no_ack=False)
            if message is None:
                break
            taken.append(message)
            message.ack()
    return taken


def depth(url: str, queue_name: str) -> int:
    with Connection(url) as conn:
        channel = conn.default_channel
        return int(channel.queue_declare(queue=queue_name, passive=True).message_count)


def declare(url: str, delays: tuple[int, ...] = (1,)) -> None:
    with Connection(url) as conn:
        JOBS.topology(delays).declare(conn)


@contextmanager
def running(
    handler: Handler[Any],
    url: str,
    *,
    job: Job[Any] | None = None,
    delays: tuple[int, ...] = (1,),
    middleware: Sequence[Middleware] = (),
    **options: Any,
) -> Iterator[ConsumerRuntime[Any]]:
    """A runtime consuming on a thread for the duration of the block: ``job``'s, or the job
    a test handler names with its ``consumer`` attribute."""
    job = job or JOBS.named(handler.consumer)  # type: ignore[attr-defined]
    runtime: ConsumerRuntime[Any] = ConsumerRuntime(
        handler,
        broker_url=url,
        topology=job.topology(delays),
        accepts=job.events,
        options=RuntimeOptions(**options),
        middleware=middleware,
    )
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    wait_for(lambda: runtime.ready, timeout=20)
    try:
        yield runtime
    finally:
        runtime.stop()
        thread.join(timeout=30)


# --- one vhost per test module, emptied before each test -------------------------------------

RESET_DELAYS: tuple[int, ...] = tuple(sorted({1, 2, 30, *topology.DEFAULT_RETRY_DELAYS}))
"""Retry delays whose queues ``reset`` deletes even if no test in this process declared
them: `cscart-fm run` processes declare theirs out of sight of ``record_declarations``."""

_declared: dict[str, tuple[set[str], set[str]]] = {}  # vhost → (queues, exchanges)


def _vhost_of(url: str) -> str:
    return url.rsplit("/", 1)[1] if url.count("/") > 2 else "/"


def record_declarations() -> Callable[[], None]:
    """Note every queue and exchange this process declares, per vhost, so that ``reset``
    also deletes those no topology names (a test's own queue, a toy job's). Returns the
    undo. py-amqp is where kombu's and the runtime's declarations all pass."""
    import amqp

    queue_declare, exchange_declare = amqp.Channel.queue_declare, amqp.Channel.exchange_declare

    def note(channel: Any, kind: int, name: str) -> None:
        if name:
            vhost = channel.connection.virtual_host
            _declared.setdefault(vhost, (set(), set()))[kind].add(name)

    def on_queue(self: Any, queue: str = "", passive: bool = False, *a: Any, **kw: Any) -> Any:
        if not passive:
            note(self, 0, queue)
        return queue_declare(self, queue, passive, *a, **kw)

    def on_exchange(
        self: Any, exchange: str, type: str, passive: bool = False, *a: Any, **kw: Any
    ) -> Any:
        if not passive:
            note(self, 1, exchange)
        return exchange_declare(self, exchange, type, passive, *a, **kw)

    amqp.Channel.queue_declare = on_queue  # type: ignore[method-assign]
    amqp.Channel.exchange_declare = on_exchange  # type: ignore[method-assign]

    def undo() -> None:
        amqp.Channel.queue_declare = queue_declare  # type: ignore[method-assign]
        amqp.Channel.exchange_declare = exchange_declare  # type: ignore[method-assign]

    return undo


def known_names(url: str) -> tuple[set[str], set[str]]:
    """The queues and exchanges ``reset`` deletes on ``url``'s vhost."""
    queues = {queue.name for queue in JOBS.topology(RESET_DELAYS).queues()}
    exchanges = {exchange.name for exchange in topology.EXCHANGES}
    seen_queues, seen_exchanges = _declared.get(_vhost_of(url), (set(), set()))
    return queues | seen_queues, exchanges | seen_exchanges


def reset(url: str) -> None:
    """Empty a test vhost over AMQP: delete every queue and exchange a test may have made,
    messages and bindings with them. What a fresh vhost gave each test (a rabbitmqctl
    add_vhost + delete_vhost costs over a second), for a few tens of milliseconds.
    RabbitMQ deletes a queue that is not there without complaint."""
    queues, exchanges = known_names(url)
    with Connection(url, connect_timeout=10) as conn:
        channel = conn.channel()
        for name in sorted(queues):
            channel.queue_delete(name)
        for name in sorted(exchanges - {""}):
            if not name.startswith("amq."):  # the broker's own: not to be deleted
                channel.exchange_delete(name)


def reset_memory() -> None:
    """Empty kombu's memory:// broker, whose queues, exchanges and bindings are one state
    for the whole process whatever the URL says after ``memory://``."""
    from kombu.transport import memory

    memory.Transport.global_state.clear()
    memory.Channel.queues.clear()
    memory.Channel.events.clear()
