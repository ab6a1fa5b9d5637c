"""The runtime's settling and wake-up logic without a broker: which acks a batch of finished
messages turns into, in any completion order, and the wake-up socket."""

from __future__ import annotations

import select
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from kombu import Connection

from consumers.registry import JOBS
from cscart_fm.core import metrics
from cscart_fm.core.errors import NotFound, StoreUnreachable
from cscart_fm.core.runtime import (
    ATTEMPT_HEADER,
    ConsumerRuntime,
    Delivery,
    RuntimeOptions,
    _broker_socket,
    _Outcome,
    _Waker,
)
from schemas.messages import ShipmentLodged

SHIPMENTS = JOBS.named("shipment-lodged")


class Noop:
    consumer = "shipment-lodged"
    event_type = ShipmentLodged

    def handle(self, event: ShipmentLodged, delivery: Delivery) -> None:
        return None


class FakeChannel:
    """What the broker would make of our acks: ``multiple`` settles every unsettled tag up
    to the one named; acking a settled tag closes the channel (PRECONDITION_FAILED)."""

    def __init__(self) -> None:
        self.delivered: list[int] = []
        self.settled: set[int] = set()
        self.republished: set[int] = set()
        self.acks: list[tuple[int, bool]] = []

    def settle(self, tag: int, multiple: bool) -> list[int]:
        assert tag not in self.settled, f"tag {tag} settled twice"
        covered = (
            [t for t in self.delivered if t <= tag and t not in self.settled] if multiple else [tag]
        )
        self.settled.update(covered)
        self.acks.append((tag, multiple))
        return covered


class FakeMessage:
    content_type = "application/json"
    content_encoding = "utf-8"
    body = b"{}"

    def __init__(self, channel: FakeChannel, tag: int, finished: set[int]) -> None:
        self.channel, self.delivery_tag, self.finished = channel, tag, finished
        self.delivery_info: dict[str, Any] = {}
        self.headers: dict[str, Any] = {}
        self.properties = {"message_id": f"m{tag}"}

    def ack(self, multiple: bool = False) -> None:
        for tag in self.channel.settle(self.delivery_tag, multiple):
            # Never early: the handler returned, and a retry or dead letter was confirmed.
            assert tag in self.finished, f"tag {tag} acked before its handler returned"

    def reject(self, requeue: bool = False) -> None:
        self.channel.settle(self.delivery_tag, False)


class FakeProducer:
    def __init__(self, channel: FakeChannel) -> None:
        self.channel = channel

    def publish(self, body: bytes, **kwargs: Any) -> None:
        self.channel.republished.add(int(kwargs["message_id"][1:]))


@contextmanager
def idle_runtime(**options: Any) -> Iterator[ConsumerRuntime[Any]]:
    """A runtime that never connects: its settling is driven by hand."""
    runtime: ConsumerRuntime[Any] = ConsumerRuntime(
        Noop(),
        broker_url="memory://unused",
        topology=SHIPMENTS.topology((1,)),
        accepts=SHIPMENTS.events,
        options=RuntimeOptions(**options),
    )
    try:
        yield runtime
    finally:
        for _ in runtime._workers:
            runtime._work.put(None)


def _deliver(runtime: ConsumerRuntime[Any], channel: FakeChannel, count: int,
             finished: set[int]) -> dict[int, FakeMessage]:
    messages = {}
    for tag in range(1, count + 1):
        message = FakeMessage(channel, tag, finished)
        channel.delivered.append(tag)
        runtime._on_message(message)  # type: ignore[arg-type]
        messages[tag] = message
    runtime._received.clear()  # as if handed to the workers
    runtime._at_workers = count
    return messages


def _finish(runtime: ConsumerRuntime[Any], message: FakeMessage, fate: str,
            finished: set[int]) -> None:
    outcome = _Outcome(attempt=1)
    if fate == "retry":
        outcome.error = StoreUnreachable("down")
    elif fate == "dead-letter":
        outcome.error = NotFound("gone")
    runtime._done.put((message, outcome))  # type: ignore[arg-type]
    if fate == "ok":
        finished.add(message.delivery_tag)


class _RepublishedFirst(set[int]):
    """The tags that may be acked: a failed message only once its copy was published."""

    def __init__(self, channel: FakeChannel, ok: set[int]) -> None:
        super().__init__()
        self.channel, self.ok = channel, ok

    def __contains__(self, tag: object) -> bool:
        return tag in self.ok or tag in self.channel.republished


@settings(max_examples=150, deadline=None)
@given(
    st.integers(min_value=1, max_value=16).flatmap(
        lambda n: st.tuples(
            st.permutations(list(range(1, n + 1))),
            st.lists(st.sampled_from(["ok", "ok", "ok", "retry", "dead-letter"]),
                     min_size=n, max_size=n),
            st.lists(st.integers(min_value=1, max_value=4), min_size=n, max_size=n),
        )
    )
)
def test_a_batch_is_acked_only_as_far_as_every_lower_tag_is_settled(
    plan: tuple[list[int], list[str], list[int]],
) -> None:
    """Any completion order (concurrency > 1 finishes out of order), any mix of fates, any
    batching: every ack covers only messages whose handler returned, each tag exactly once."""
    order, fates, batch_sizes = plan
    channel = FakeChannel()
    ok: set[int] = set()
    may_ack = _RepublishedFirst(channel, ok)
    ok_counter = metrics.MESSAGES.labels("shipment-lodged", "ok")
    with idle_runtime(concurrency=1, prefetch=len(order), max_attempts=3) as runtime:
        runtime._multiple_ack = True
        before = ok_counter._value.get()
        messages = _deliver(runtime, channel, len(order), may_ack)  # type: ignore[arg-type]
        producer = FakeProducer(channel)
        position = 0
        for size in batch_sizes:
            for tag in order[position:position + size]:
                _finish(runtime, messages[tag], fates[tag - 1], ok)
            position += size
            runtime._settle(producer)  # type: ignore[arg-type]
            if position >= len(order):
                break
        assert channel.settled == set(order)
        assert not runtime._in_flight
        assert runtime._at_workers == 0
        assert channel.republished == {t for t in order if fates[t - 1] != "ok"}
        assert ok_counter._value.get() - before == fates.count("ok")


def test_a_slow_lowest_message_holds_back_no_ack() -> None:
    """Concurrency 2: tag 1 is still running while 2, 3, 4 finish. They are acked one by one
    (a multiple ack would take tag 1 with them); once 1 finishes, 1 goes alone."""
    channel = FakeChannel()
    finished: set[int] = set()
    with idle_runtime(concurrency=2, prefetch=6) as runtime:
        runtime._multiple_ack = True
        messages = _deliver(runtime, channel, 6, finished)
        for tag in (2, 3, 4):
            _finish(runtime, messages[tag], "ok", finished)
        runtime._settle(None)  # type: ignore[arg-type]
        assert channel.acks == [(2, False), (3, False), (4, False)]
        assert list(runtime._in_flight) == [1, 5, 6]
        _finish(runtime, messages[1], "ok", finished)
        runtime._settle(None)  # type: ignore[arg-type]
        assert channel.acks[-1] == (1, False)
        for tag in (5, 6):
            _finish(runtime, messages[tag], "ok", finished)
        runtime._settle(None)  # type: ignore[arg-type]
        assert channel.acks[-1] == (6, True)  # 5 and 6: the bottom of the window, in one ack
        assert channel.settled == set(range(1, 7))


def test_without_amqp_multiple_acks_every_message_is_acked_by_itself() -> None:
    """kombu's virtual transports (memory://) ignore ``multiple``: never rely on it there."""
    channel = FakeChannel()
    finished: set[int] = set()
    with idle_runtime() as runtime:
        runtime._multiple_ack = False
        messages = _deliver(runtime, channel, 3, finished)
        for message in messages.values():
            _finish(runtime, message, "ok", finished)
        runtime._settle(None)  # type: ignore[arg-type]
        assert channel.acks == [(1, False), (2, False), (3, False)]


def test_a_retry_is_acked_only_after_its_copy_was_published() -> None:
    channel = FakeChannel()
    finished: set[int] = set()
    with idle_runtime(max_attempts=3) as runtime:
        runtime._multiple_ack = True
        [message] = _deliver(runtime, channel, 1, finished).values()
        message.headers = {ATTEMPT_HEADER: 1}
        events: list[str] = []

        class Producer:
            def publish(self, body: bytes, **kwargs: Any) -> None:
                events.append(f"publish {kwargs['routing_key']}")

        message.ack = lambda multiple=False: events.append("ack")  # type: ignore[method-assign]
        _finish(runtime, message, "retry", finished)
        runtime._settle(Producer())  # type: ignore[arg-type]
        assert events == ["publish cscart.shipment-lodged.retry.1s", "ack"]


def test_the_waker_sends_one_byte_per_burst_and_never_loses_a_wake_up() -> None:
    waker = _Waker()
    try:
        readable = lambda: bool(select.select([waker], [], [], 0)[0])  # noqa: E731
        assert not readable()
        waker.wake()
        waker.wake()  # already pending: no second byte
        assert readable()
        assert waker._read.recv(16) == b"\0"
        waker.wake()  # still pending (not cleared): nothing written
        assert not readable()
        waker.clear()
        waker.wake()
        assert readable()
        waker.clear()
        assert not readable()
        waker.wait(0.01)  # times out quietly
    finally:
        waker.close()
    waker.wake()  # after close (a handler outliving the runtime): no error


def test_only_plain_tcp_is_waited_on() -> None:
    """memory:// has no socket: the runtime uses timed waits there (as it does over TLS)."""
    with Connection(f"memory://unit-{id(object())}") as conn:
        conn.connect()
        assert _broker_socket(conn, _Waker()) is None
