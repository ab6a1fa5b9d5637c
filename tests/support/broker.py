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
from cscart_fm.core.runtime import ConsumerRuntime, Handler, Middleware, RuntimeOptions


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
