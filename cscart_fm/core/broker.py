"""Connections to the broker and the one confirmed publisher everything publishes through.

Publisher confirms are the only proof the broker took a message, so every publish here waits
for its confirm; the message in hand is acknowledged only after what it caused is confirmed.
A batch is published in one go and its confirms awaited together (a confirm per message, each
awaited before the next, costs a broker round trip per message: 2,000 orders took seconds).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from amqp import Message as AmqpMessage
from kombu import Connection, Exchange, Producer

from cscart_fm.core import frames, topology
from schemas.messages import ROUTING_KEYS, Message

DEFAULT_HEARTBEAT = 30
CONFIRM_TIMEOUT = 30.0


def connect(url: str, *, heartbeat: int = DEFAULT_HEARTBEAT, confirms: bool = True) -> Connection:
    """A kombu connection with heartbeats on (kombu's default is off) and, unless the caller
    awaits confirms itself, every publish on it waiting for its confirm."""
    frames.install()
    return Connection(
        url,
        heartbeat=heartbeat,
        transport_options={"confirm_publish": confirms},
        connect_timeout=10,
    )


def is_memory(url: str) -> bool:
    return url.startswith("memory://")


def message_properties(message: Message) -> dict[str, Any]:
    """The AMQP properties the contract requires of every message (§1)."""
    return contract_properties(message.event_id, message.schema_name)


def contract_properties(event_id: str, schema: str) -> dict[str, Any]:
    """The same, from a body's ``event_id`` and ``<type>/<version>``."""
    return {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "delivery_mode": 2,
        "message_id": event_id,
        "headers": {"schema": schema},
    }


@dataclass(frozen=True)
class Outgoing:
    """One message to publish: bytes as they are, where they go, and their properties."""

    body: bytes
    exchange: str
    routing_key: str
    properties: Mapping[str, Any]


class NotConfirmed(Exception):
    """The broker refused (nacked) a message, or its confirm did not come in time."""


class _Channel:
    """One thread's publishing channel in confirm mode, counting delivery tags itself.

    RabbitMQ numbers a confirm channel's publishes 1, 2, 3 …; an ack or nack names a tag, or
    every tag up to it (``multiple``).
    """

    def __init__(self, url: str, heartbeat: int) -> None:
        # Confirms are awaited here, per batch: kombu's confirm_publish would wait per message.
        self.connection = connect(url, heartbeat=heartbeat, confirms=False)
        self.channel = self.connection.channel()
        self.memory = is_memory(url)  # the in-process broker has no confirms
        self.producer = Producer(self.channel) if self.memory else None
        self.published = 0
        self.outstanding: set[int] = set()
        self.nacked: set[int] = set()
        self.closed = False
        if not self.memory:
            self.channel.confirm_select()
            self.channel.events["basic_ack"].add(self._on_ack)
            self.channel.events["basic_nack"].add(self._on_nack)

    def _settled(self, tag: int, multiple: bool) -> set[int]:
        if not multiple:
            return {tag} & self.outstanding
        return {t for t in self.outstanding if t <= tag}

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self.outstanding -= self._settled(tag, multiple)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        settled = self._settled(tag, multiple)
        self.outstanding -= settled
        self.nacked |= settled

    def send(self, messages: Sequence[Outgoing]) -> list[int]:
        """Publish every message without waiting; their delivery tags (none in memory)."""
        tags: list[int] = []
        for item in messages:
            props = dict(item.properties)
            headers = props.pop("headers", None) or {}
            if self.producer is not None:
                self.producer.publish(
                    item.body, exchange=Exchange(item.exchange) if item.exchange else "",
                    routing_key=item.routing_key, headers=headers, serializer=None,
                    retry=False, **props,
                )
                continue
            # As kombu marks bytes of no stated encoding, so that no consumer decodes them.
            props.setdefault("content_encoding", "binary")
            self.channel.basic_publish(
                AmqpMessage(item.body, application_headers=headers, **props),
                exchange=item.exchange,
                routing_key=item.routing_key,
            )
            self.published += 1
            tags.append(self.published)
            self.outstanding.add(self.published)
        return tags

    def wait(self, tags: Sequence[int], deadline: float) -> list[int]:
        """Wait for the confirms of ``tags`` until ``deadline`` (monotonic); the indexes of
        those not confirmed (nacked, or still unconfirmed at the deadline)."""
        pending = set(tags)
        while pending & self.outstanding:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                self.connection.drain_events(timeout=left)
            except TimeoutError:
                break
        failed = [i for i, tag in enumerate(tags) if tag in self.outstanding or tag in self.nacked]
        self.nacked -= pending
        return failed

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(Exception):  # closing a possibly broken connection
            self.connection.release()


class Confirmation:
    """Messages published and not yet confirmed: ``wait`` returns once every one of them is,
    so that the caller can prepare its next batch while the broker writes this one."""

    def __init__(
        self,
        publisher: Publisher,
        messages: Sequence[Outgoing],
        channel: _Channel,
        tags: Sequence[int],
        timeout: float,
    ) -> None:
        self._publisher = publisher
        self._messages = list(messages)
        self._channel = channel
        self._tags = list(tags)
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout

    def wait(self) -> None:
        """Return once the broker confirmed every message. What it did not confirm (a nack,
        no confirm in time, the connection lost) is published once more on a fresh
        connection; raises ``NotConfirmed`` or the connection's error if that fails too."""
        try:
            failed = (
                list(range(len(self._tags)))
                if self._channel.closed
                else self._channel.wait(self._tags, self._deadline)
            )
        except Exception:
            failed = list(range(len(self._tags)))  # the connection broke: none is confirmed
        if not failed:
            return
        self._publisher._reset(self._channel)  # a nack or a lost confirm: not to be trusted
        again = [self._messages[i] for i in failed]
        channel = self._publisher._channel()
        try:
            still = channel.wait(channel.send(again), time.monotonic() + self._timeout)
        except Exception:
            self._publisher._reset(channel)
            raise
        if still:
            self._publisher._reset(channel)
            raise NotConfirmed(
                f"the broker did not confirm {len(still)} of {len(self._messages)} messages "
                f"within {self._timeout:g} s"
            )


class Publisher:
    """Publishes contract messages with confirms; safe to share between threads.

    Each thread gets its own connection (kombu connections are not thread-safe). A publish
    that cannot be confirmed raises: the caller must not acknowledge what caused it.
    """

    def __init__(self, url: str, *, heartbeat: int = 0) -> None:
        # No heartbeat by default: nothing services a publisher's connection between
        # publishes, so the broker would close it after two missed beats. A dead connection
        # shows at the next publish and is replaced once.
        self._url = url
        self._heartbeat = heartbeat
        self._local = threading.local()
        self._all: list[_Channel] = []
        self._lock = threading.Lock()

    def _channel(self) -> _Channel:
        channel: _Channel | None = getattr(self._local, "channel", None)
        if channel is None:
            channel = _Channel(self._url, self._heartbeat)
            with self._lock:
                self._all.append(channel)
            self._local.channel = channel
        return channel

    def _reset(self, channel: _Channel | None = None) -> None:
        """Drop this thread's channel (or ``channel``, if it still is this thread's)."""
        current: _Channel | None = getattr(self._local, "channel", None)
        channel = channel or current
        if channel is None:
            return
        if channel is current:
            self._local.channel = None
        with self._lock:
            if channel in self._all:
                self._all.remove(channel)
        channel.close()

    def send(
        self, messages: Sequence[Outgoing], *, timeout: float = CONFIRM_TIMEOUT
    ) -> Confirmation:
        """Publish the messages now, their confirms awaited by ``Confirmation.wait`` (on
        this same thread). A send that fails is tried once more on a fresh connection."""
        for attempt in (1, 2):
            channel = self._channel()
            try:
                tags = channel.send(messages)
            except Exception:
                self._reset(channel)
                if attempt == 2:
                    raise
                continue
            return Confirmation(self, messages, channel, tags, timeout)
        raise AssertionError("unreachable")  # pragma: no cover

    def publish_batch(
        self, messages: Sequence[Outgoing], *, timeout: float = CONFIRM_TIMEOUT
    ) -> None:
        """Publish the messages and wait until the broker confirmed every one of them
        (what it did not is published once more: a copy it did take is possible then, which
        a consumer recognises by its ``message_id``)."""
        if messages:
            self.send(messages, timeout=timeout).wait()

    def publish_raw(
        self,
        body: bytes,
        *,
        exchange: str,
        routing_key: str,
        properties: Mapping[str, Any],
    ) -> None:
        """Publish bytes as they are and wait for the broker's confirm (one reconnect)."""
        self.publish_batch([Outgoing(body, exchange, routing_key, properties)])

    def publish(self, message: Message, *, exchange: str | None = None) -> None:
        """Publish a contract message where the contract puts it, and wait for the confirm."""
        self.publish_batch([outgoing(message, exchange=exchange)])

    def close(self) -> None:
        with self._lock:
            channels, self._all = self._all, []
        for channel in channels:
            channel.close()


def outgoing(message: Message, *, exchange: str | None = None) -> Outgoing:
    """A contract message, addressed where the contract puts it (§1)."""
    routing_key = ROUTING_KEYS[type(message)]
    if exchange is None:
        exchange = (
            topology.ORDERS_EXCHANGE
            if routing_key == topology.ORDER_IMPORTED
            else topology.EVENTS_EXCHANGE
        )
    return Outgoing(message.to_body(), exchange, routing_key, message_properties(message))
