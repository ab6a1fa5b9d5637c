"""A header Python cannot read is that message's fault, not the connection's.

Seen: a ``stock.snapshot`` with an AMQP timestamp header in epoch milliseconds
(1796352000000, the year 58894) made py-amqp raise while reading the frame; the consumer
reconnected ~27 times and applied the next valid snapshot 9 minutes late, and once the broker
dead-lettered it, every collection round of ``cscart.stock-snapshot.dlq`` failed on it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection

from consumers.registry import JOBS
from cscart_emulator import StoreEmulator
from cscart_fm.cli.wiring import open_state
from cscart_fm.core import frames
from cscart_fm.support.dead_letters.collect import collect
from cscart_fm.support.dead_letters.store import Filter, find

from .support.amqp_values import RawTimestamp, raw_timestamps
from .support.broker import declare, depth, drain, wait_for
from .support.pipeline import API_KEY, API_USER, client_doc, consumer, make_services

pytestmark = pytest.mark.broker

MILLISECONDS = 1796352000000
"""2026-12-04 as epoch milliseconds, written where AMQP wants seconds."""


@pytest.fixture
def raw_timestamps_on() -> Iterator[None]:
    """Let this test's publisher write any 64-bit timestamp, as other AMQP clients can."""
    with raw_timestamps():
        yield


def snapshot(sku: str, quantity: int) -> dict[str, Any]:
    return {
        "type": "stock.snapshot", "version": 1, "event_id": f"snap-{uuid.uuid4().hex[:8]}",
        "client_id": "ACME", "taken_at": "2026-12-04T02:00:00+11:00",
        "items": [{"sku": sku, "on_hand": quantity, "available": quantity}],
    }


def publish(url: str, body: dict[str, Any], *, exchange: str = "fm.events",
            routing_key: str = "stock.snapshot", headers: dict[str, Any] | None = None) -> None:
    with Connection(url) as conn:
        conn.Producer().publish(
            json.dumps(body).encode(), exchange=exchange, routing_key=routing_key,
            headers={"schema": "stock.snapshot/1", **(headers or {})},
            content_type="application/json", content_encoding="utf-8", serializer=None,
            delivery_mode=2, message_id=body["event_id"],
        )


@pytest.fixture
def store() -> Iterator[StoreEmulator]:
    with StoreEmulator(api_user=API_USER, api_key=API_KEY) as emu:
        emu.add_product("Test001", 0)
        emu.add_product("Test002", 0)
        yield emu


def test_a_millisecond_timestamp_header_is_dead_lettered_and_the_consumer_goes_on(
    broker_url: str, tmp_path: Any, store: StoreEmulator, raw_timestamps_on: None
) -> None:
    declare(broker_url)
    services = make_services(
        broker_url, f"sqlite:///{tmp_path / 'state.sqlite'}", [client_doc(store.url)]
    )
    try:
        with consumer(services, "stock-snapshot") as runtime:
            publish(broker_url, snapshot("Test001", 7),
                    headers={"sent_at": RawTimestamp(MILLISECONDS), "nested": {"at": [1]}})
            started = time.monotonic()
            publish(broker_url, snapshot("Test002", 9))
            wait_for(lambda: store.product_by_code("Test002")["amount"] == 9, timeout=15)
            assert time.monotonic() - started < 10  # not minutes of reconnects
            wait_for(lambda: depth(broker_url, "cscart.stock-snapshot.dlq") == 1)
            assert runtime.ready
        assert int(store.product_by_code("Test001")["amount"]) == 0  # never applied
        [letter] = drain(broker_url, "cscart.stock-snapshot.dlq")
    finally:
        services.close()
    assert letter.headers["cscart-error-type"] == "invalid-message"
    assert letter.headers["cscart-reason"] == (
        "header sent_at: a timestamp no date can hold (milliseconds sent where the AMQP "
        "timestamp is seconds?)"
    )
    assert letter.headers["sent_at"] == MILLISECONDS  # kept, as a plain integer


def test_the_collector_keeps_collecting_past_such_a_dead_letter(
    broker_url: str, tmp_path: Any, raw_timestamps_on: None
) -> None:
    """A broker-dead-lettered copy (no headers of ours) waits in the .dlq: collected like any
    other, and the letters after it too."""
    declare(broker_url)
    dlq = JOBS.named("stock-snapshot").topology().dead_letter_queue_name
    poisoned, plain = snapshot("Test001", 1), snapshot("Test002", 2)
    publish(broker_url, poisoned, exchange="cscart.dead-letter", routing_key=dlq,
            headers={"sent_at": RawTimestamp(MILLISECONDS)})
    publish(broker_url, plain, exchange="cscart.dead-letter", routing_key=dlq)
    state = open_state(f"sqlite:///{tmp_path / 'state.sqlite'}")
    try:
        found = collect(state, broker_url, ["stock-snapshot"])
        assert found.total_new == 2
        letters = {letter.message_id: letter for letter in find(state, Filter())}
    finally:
        state.close()
    assert set(letters) == {poisoned["event_id"], plain["event_id"]}
    assert letters[poisoned["event_id"]].headers["sent_at"] == MILLISECONDS
    assert depth(broker_url, dlq) == 0


def test_undecodable_names_each_unreadable_header() -> None:
    headers = {
        "ok": 1,
        "sent_at": frames.OutOfRangeTimestamp(MILLISECONDS),
        "x-death": [{"time": frames.OutOfRangeTimestamp(MILLISECONDS), "count": 1}],
    }
    assert frames.undecodable(headers) == ["sent_at", "x-death[0].time"]
    assert frames.undecodable({"ok": 1}) == frames.undecodable(None) == []


def test_the_collector_keeps_a_body_whose_encoding_no_codec_knows(
    broker_url: str, tmp_path: Any
) -> None:
    """kombu marks a body published without a content type as encoded in "binary", and
    py-amqp hands an empty body back as text: such a dead letter once stopped every
    collection round with LookupError (found by the fault suite's hostile properties)."""
    declare(broker_url)
    dlq = JOBS.named("order-poll").topology().dead_letter_queue_name
    with Connection(broker_url) as conn:
        conn.Producer().publish(b'{"type": "order-poll.tick"}', exchange="cscart.dead-letter",
                                routing_key=dlq, content_type="", serializer=None)
        conn.Producer().publish(b"\xff\xfe not text", exchange="cscart.dead-letter",
                                routing_key=dlq, content_type="", serializer=None)
        conn.Producer().publish(b"", exchange="cscart.dead-letter",  # py-amqp reads it as ""
                                routing_key=dlq, content_type="", serializer=None)
    state = open_state(f"sqlite:///{tmp_path / 'state.sqlite'}")
    try:
        assert collect(state, broker_url, ["order-poll"]).total_new == 3
        bodies = sorted(letter.body for letter in find(state, Filter()))
    finally:
        state.close()
    assert bodies == [b"", b'{"type": "order-poll.tick"}', b"\xff\xfe not text"]
