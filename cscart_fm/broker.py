"""Connections to the broker and the one confirmed publisher everything publishes through.

Publisher confirms are the only proof the broker took a message, so every publish here waits
for its confirm; the message in hand is acknowledged only after what it caused is confirmed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from typing import Any

from kombu import Connection, Exchange, Producer

from schemas.messages import ROUTING_KEYS, _Message

from . import topology

DEFAULT_HEARTBEAT = 30
CONFIRM_TIMEOUT = 30.0


def connect(url: str, *, heartbeat: int = DEFAULT_HEARTBEAT) -> Connection:
    """A kombu connection with heartbeats on (kombu's default is off) and confirms on."""
    return Connection(
        url,
        heartbeat=heartbeat,
        transport_options={"confirm_publish": True},
        connect_timeout=10,
    )


def is_memory(url: str) -> bool:
    return url.startswith("memory://")


def message_properties(message: _Message) -> dict[str, Any]:
    """The AMQP properties the contract requires of every message (§1)."""
    return {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "delivery_mode": 2,
        "message_id": message.event_id,
        "headers": {"schema": message.schema_name},
    }


class Publisher:
    """Publishes contract messages with confirms; safe to share between threads.

    Each thread gets its own connection (kombu connections are not thread-safe). A publish
    that cannot be confirmed raises: the caller must not acknowledge what caused it.
    """

    def __init__(self, url: str, *, heartbeat: int = 0) -> None:
        # No heartbeat by default: nothing services a publisher's connection between
        # publishes, so the broker would close it after two missed beats. A dead connection
        # shows at the next publish (its confirm times out) and is replaced once.
        self._url = url
        self._heartbeat = heartbeat
        self._local = threading.local()
        self._all: list[Connection] = []
        self._lock = threading.Lock()

    def _producer(self) -> Producer:
        producer: Producer | None = getattr(self._local, "producer", None)
        if producer is None:
            connection = connect(self._url, heartbeat=self._heartbeat)
            with self._lock:
                self._all.append(connection)
            producer = Producer(connection.default_channel)
            self._local.connection = connection
            self._local.producer = producer
        return producer

    def _reset(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.producer = None
        if connection is not None:
            with self._lock:
                if connection in self._all:
                    self._all.remove(connection)
            # The connection is already broken; dropping it is all there is to do.
            with contextlib.suppress(Exception):
                connection.release()

    def publish_raw(
        self,
        body: bytes,
        *,
        exchange: str,
        routing_key: str,
        properties: Mapping[str, Any],
    ) -> None:
        """Publish bytes as they are and wait for the broker's confirm (one reconnect)."""
        props = dict(properties)
        headers = props.pop("headers", None) or {}
        for attempt in (1, 2):
            producer = self._producer()
            try:
                producer.publish(
                    body,
                    exchange=Exchange(exchange) if exchange else "",
                    routing_key=routing_key,
                    headers=headers,
                    serializer=None,
                    mandatory=False,
                    retry=False,
                    # A broker that never confirms must not hold the message in hand forever.
                    timeout=CONFIRM_TIMEOUT,
                    confirm_timeout=CONFIRM_TIMEOUT,
                    **props,
                )
                return
            except Exception:
                self._reset()
                if attempt == 2:
                    raise

    def publish(self, message: _Message, *, exchange: str | None = None) -> None:
        """Publish a contract message where the contract puts it, and wait for the confirm."""
        routing_key = ROUTING_KEYS[type(message)]
        if exchange is None:
            exchange = (
                topology.ORDERS_EXCHANGE
                if routing_key == topology.ORDER_IMPORTED
                else topology.EVENTS_EXCHANGE
            )
        self.publish_raw(
            message.to_body(),
            exchange=exchange,
            routing_key=routing_key,
            properties=message_properties(message),
        )

    def close(self) -> None:
        with self._lock:
            connections, self._all = self._all, []
        for connection in connections:
            with contextlib.suppress(Exception):  # closing on shutdown; nothing left to do
                connection.release()
