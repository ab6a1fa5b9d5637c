"""The broker topology of the FM contract (§1), declared from this one module.

Exchanges, work queues, dead-letter queues, delayed-retry queues and their bindings are all
named here and nowhere else. Declaring is idempotent and never deletes a message.

Retry design (RabbitMQ 3.x without the unmaintained delayed-message plugin): one classic queue
per delay step, ``cscart.<consumer>.retry.<N>s``, whose per-queue TTL dead-letters the message
back into the work queue through the default exchange. Per-message TTLs are avoided on purpose:
they only expire at the head of a queue.

Dead letters: the runtime publishes them itself to ``cscart.dead-letter`` with headers that say
what went wrong and what support should do. The work queues also dead-letter there on their own
(``x-delivery-limit``: a message that crashed the consumer too many times), at-least-once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kombu import Connection, Exchange, Queue, binding

EVENTS_EXCHANGE = "fm.events"
ORDERS_EXCHANGE = "fm.orders"
DEAD_LETTER_EXCHANGE = "cscart.dead-letter"
ORDERS_QUEUE = "fm.orders.imported"
ORDER_IMPORTED = "order.imported"

DEFAULT_RETRY_DELAYS: tuple[int, ...] = (5, 30, 120, 600)
"""Seconds before the 2nd, 3rd, ... attempt of a message that failed transiently."""

DELIVERY_LIMIT = 20
"""Redeliveries (crashes mid-message) before the broker itself dead-letters a message."""

events = Exchange(EVENTS_EXCHANGE, type="topic", durable=True)
orders = Exchange(ORDERS_EXCHANGE, type="topic", durable=True)
dead_letters = Exchange(DEAD_LETTER_EXCHANGE, type="direct", durable=True)


def _quorum(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"x-queue-type": "quorum", **(extra or {})}


@dataclass(frozen=True)
class ConsumerTopology:
    """Where one job's consumer reads, retries and dead-letters."""

    name: str  # "shipment-lodged"
    routing_keys: tuple[str, ...]  # ("shipment.lodged",)
    retry_delays: tuple[int, ...] = DEFAULT_RETRY_DELAYS

    @classmethod
    def of(
        cls, name: str, routing_keys: Sequence[str], retry_delays: Sequence[int]
    ) -> ConsumerTopology:
        delays = tuple(int(d) for d in retry_delays)
        if not delays or any(d <= 0 for d in delays):
            raise ValueError("retry delays must be positive whole seconds")
        if not routing_keys:
            raise ValueError(f"job {name!r} reads no events")
        return cls(name, tuple(routing_keys), delays)

    @property
    def routing_key(self) -> str:
        """The first event's routing key (a job with one event has only this one)."""
        return self.routing_keys[0]

    @property
    def queue_name(self) -> str:
        return f"cscart.{self.name}"

    @property
    def dead_letter_queue_name(self) -> str:
        return f"cscart.{self.name}.dlq"

    def retry_queue_name(self, delay: int) -> str:
        return f"cscart.{self.name}.retry.{delay}s"

    @property
    def queue(self) -> Queue:
        return Queue(
            self.queue_name,
            exchange=events,
            bindings=[binding(events, routing_key=key) for key in self.routing_keys],
            durable=True,
            queue_arguments=_quorum(
                {
                    "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
                    "x-dead-letter-routing-key": self.dead_letter_queue_name,
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                    "x-delivery-limit": DELIVERY_LIMIT,
                }
            ),
        )

    @property
    def dead_letter_queue(self) -> Queue:
        return Queue(
            self.dead_letter_queue_name,
            exchange=dead_letters,
            routing_key=self.dead_letter_queue_name,
            durable=True,
            queue_arguments=_quorum(),
        )

    def retry_queue(self, delay: int) -> Queue:
        return Queue(
            self.retry_queue_name(delay),
            durable=True,
            queue_arguments={
                "x-queue-type": "classic",
                "x-message-ttl": delay * 1000,
                "x-dead-letter-exchange": "",  # default exchange: straight back to the work queue
                "x-dead-letter-routing-key": self.queue_name,
            },
        )

    def retry_delay(self, attempt: int) -> int:
        """The delay before attempt ``attempt + 1`` (attempts count from 1)."""
        return self.retry_delays[min(attempt, len(self.retry_delays)) - 1]

    def queues(self) -> list[Queue]:
        return [
            self.queue,
            self.dead_letter_queue,
            *(self.retry_queue(d) for d in sorted(set(self.retry_delays))),
        ]


orders_queue = Queue(
    ORDERS_QUEUE,
    exchange=orders,
    routing_key=ORDER_IMPORTED,
    durable=True,
    queue_arguments=_quorum(),
)
FM_QUEUES: tuple[Queue, ...] = (orders_queue,)
"""FM's queues on ``fm.orders``, declared by this service so nothing published is lost."""
EXCHANGES: tuple[Exchange, ...] = (events, orders, dead_letters)


@dataclass(frozen=True)
class Topology:
    """The whole topology: the exchanges, FM's queues and each job's queues."""

    consumers: tuple[ConsumerTopology, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(consumer.name for consumer in self.consumers)

    def consumer(self, name: str) -> ConsumerTopology:
        for consumer in self.consumers:
            if consumer.name == name:
                return consumer
        raise ValueError(f"unknown consumer {name!r}; known: {', '.join(self.names)}")

    def queues(self) -> list[Queue]:
        queues = list(FM_QUEUES)
        for consumer in self.consumers:
            queues.extend(consumer.queues())
        return queues

    def declare(self, connection: Connection) -> list[str]:
        """Declare every exchange, queue and binding; return the queue names.

        Idempotent. A queue that already exists with other arguments makes the broker refuse
        (406 PRECONDITION_FAILED): that is reported, never "fixed" by deleting the queue.
        """
        declared: list[str] = []
        channel = connection.channel()
        try:
            for exchange in EXCHANGES:
                exchange(channel).declare()
            for queue in self.queues():
                queue(channel).declare()
                declared.append(queue.name)
        finally:
            channel.close()
        return declared

    def describe(self) -> list[dict[str, Any]]:
        """A plain description (for ``cscart-fm topology`` and the deploy checks): each queue
        with the exchange it is bound to (none for a retry queue) and its routing keys."""
        rows: list[dict[str, Any]] = []
        for exchange in EXCHANGES:
            rows.append({"kind": "exchange", "name": exchange.name, "type": exchange.type})

        def queue_row(queue: Queue, exchange: str, keys: Sequence[str]) -> dict[str, Any]:
            return {
                "kind": "queue",
                "name": queue.name,
                "exchange": exchange,
                "routing_keys": list(keys),
                "arguments": dict(getattr(queue, "queue_arguments", None) or {}),
            }

        for queue in FM_QUEUES:
            rows.append(queue_row(queue, ORDERS_EXCHANGE, [queue.routing_key]))
        for consumer in self.consumers:
            rows.append(queue_row(consumer.queue, EVENTS_EXCHANGE, consumer.routing_keys))
            dlq = consumer.dead_letter_queue
            rows.append(queue_row(dlq, DEAD_LETTER_EXCHANGE, [dlq.routing_key]))
            for delay in sorted(set(consumer.retry_delays)):
                rows.append(queue_row(consumer.retry_queue(delay), "", []))
        return rows
