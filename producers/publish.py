"""Publish one contract event by hand (``cscart-fm publish FILE|-``).

How FM's developers and support inject an event: the JSON is validated against the message
schemas first (a bad event is refused with the field named, and nothing is published), then
published as written to where the contract puts its type — ``order-poll.tick``,
``shipment.lodged`` and ``stock.snapshot`` on ``fm.events``, ``order.imported`` on
``fm.orders`` — with the contract's properties (§1) and a publisher confirm.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import BinaryIO

from cscart_fm.core import topology
from cscart_fm.core.broker import Publisher, message_properties
from cscart_fm.core.errors import InvalidMessage
from cscart_fm.core.events import parse_event
from schemas.messages import ROUTING_KEYS, Message


class CannotRead(Exception):
    """The file named cannot be read."""


def read_source(source: str, stdin: BinaryIO | None = None) -> bytes:
    if source == "-":
        return (stdin or sys.stdin.buffer).read()
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise CannotRead(f"cannot read {source!r} ({exc.strerror})") from None


def validate(body: bytes) -> tuple[bytes, Message]:
    """The body to publish and the event it holds, or InvalidMessage naming the field."""
    body = body.strip()
    if body.startswith(b"\xef\xbb\xbf"):  # an editor's byte-order mark is not the event's
        body = body[3:]
    if not body:
        raise InvalidMessage("(body): the input is empty; expected one JSON event")
    return body, parse_event(body)


def destination(event: Message) -> tuple[str, str]:
    """The exchange and routing key the contract gives this event's type."""
    routing_key = ROUTING_KEYS[type(event)]
    exchange = (
        topology.ORDERS_EXCHANGE
        if routing_key == topology.ORDER_IMPORTED
        else topology.EVENTS_EXCHANGE
    )
    return exchange, routing_key


def publish_event(publisher: Publisher, body: bytes, event: Message) -> tuple[str, str]:
    """Publish the validated body as written, with the contract's properties; wait for the
    broker's confirm. Returns where it went."""
    exchange, routing_key = destination(event)
    publisher.publish_raw(
        body, exchange=exchange, routing_key=routing_key, properties=message_properties(event)
    )
    return exchange, routing_key
