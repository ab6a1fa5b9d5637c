"""FM's side of the broker, written with pika's BlockingConnection only.

A second AMQP client, independent of the service's kombu/py-amqp stack: what it publishes and
reads is what any other client would, so interop tests see the contract's wire format (§1),
not what two copies of the same library agree on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

EVENTS_EXCHANGE = "fm.events"
ORDERS_EXCHANGE = "fm.orders"


@dataclass(frozen=True)
class Received:
    """One message FM took off a queue: what pika decoded of the frame, and the raw body."""

    exchange: str
    routing_key: str
    properties: pika.BasicProperties
    body: bytes

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})


def schema_of(body: dict[str, Any]) -> str:
    """The contract's ``schema`` header of a body: ``<type>/<version>``."""
    return f"{body['type']}/{body['version']}"


class FmSide:
    """One pika connection, as FM would hold it: publishes with confirms on ``fm.events``,
    consumes and acks from the service's queues."""

    def __init__(self, broker_url: str) -> None:
        # The tests' kombu URL (amqp://user:pass@host:port/vhost) is a valid AMQP URI for pika.
        self.connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        self.channel: BlockingChannel = self.connection.channel()
        # Confirms plus mandatory: basic_publish raises if the broker nacks the message or
        # no queue is bound for its routing key, so a publish that returns was taken.
        self.channel.confirm_delivery()

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def __enter__(self) -> FmSide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- topology, as FM sees it -----------------------------------------------------------

    def check_exchanges(self) -> None:
        """Declare the contract's exchanges as FM knows them (topic, durable): the broker
        refuses (406, closing the channel) if the service declared them otherwise."""
        for name in (EVENTS_EXCHANGE, ORDERS_EXCHANGE):
            self.channel.exchange_declare(name, exchange_type="topic", durable=True)

    def depth(self, queue: str) -> int:
        """Messages ready on a queue the service declared (passive: FM never redeclares it)."""
        return int(self.channel.queue_declare(queue, passive=True).method.message_count)

    # --- publishing ------------------------------------------------------------------------

    def publish(self, body: dict[str, Any], routing_key: str) -> None:
        """An event exactly as contract §1 says: JSON in UTF-8, persistent, content_type
        application/json, message_id = event_id, header schema = type/version."""
        self.publish_raw(
            json.dumps(body, ensure_ascii=False).encode("utf-8"),
            routing_key,
            message_id=str(body["event_id"]),
            schema=schema_of(body),
        )

    def publish_raw(
        self, body: bytes, routing_key: str, *, message_id: str, schema: str
    ) -> None:
        """Bytes as they are, with the contract's properties (for bodies the service refuses)."""
        self.channel.basic_publish(
            EVENTS_EXCHANGE,
            routing_key,
            body,
            properties=pika.BasicProperties(
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=message_id,
                headers={"schema": schema},
            ),
            mandatory=True,
        )

    # --- consuming -------------------------------------------------------------------------

    def take(self, queue: str, count: int, timeout: float = 30.0) -> list[Received]:
        """The first ``count`` messages of ``queue``, waiting up to ``timeout`` for them;
        each is acked once read, as FM acks what it has stored."""
        taken: list[Received] = []
        deadline = time.monotonic() + timeout
        while len(taken) < count and time.monotonic() < deadline:
            method, properties, body = self.channel.basic_get(queue, auto_ack=False)
            if method is None:
                self.connection.sleep(0.05)  # services heartbeats while waiting
                continue
            taken.append(Received(method.exchange, method.routing_key, properties, body))
            self.channel.basic_ack(method.delivery_tag)
        if len(taken) < count:
            raise AssertionError(
                f"{queue}: {len(taken)} of {count} messages within {timeout} s"
            )
        return taken

    def wait_for(
        self, condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05
    ) -> Any:
        """Poll ``condition()`` until truthy, keeping this connection alive meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            self.connection.sleep(interval)
        raise AssertionError(f"condition not met within {timeout} s")
