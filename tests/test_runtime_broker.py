"""The consumer runtime on a real RabbitMQ: retries, dead letters, crashes, SIGTERM (every
test here but the in-process broker's is in the broker tier: it takes ``broker_url``)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cscart_fm.core import metrics
from cscart_fm.core.errors import NotFound, StoreUnreachable, UnknownClient
from cscart_fm.core.runtime import Delivery
from schemas.messages import ShipmentLodged

from .support.broker import (
    declare,
    depth,
    drain,
    publish_json,
    running,
    shipment_event,
    wait_for,
)

WORK = "cscart.shipment-lodged"
DLQ = "cscart.shipment-lodged.dlq"
REPO = Path(__file__).resolve().parents[1]


class Recorder:
    """A handler that records each call and fails as told per shipment_ref."""

    consumer = "shipment-lodged"
    event_type = ShipmentLodged

    def __init__(self, fail: dict[str, list[Exception]] | None = None) -> None:
        self.calls: list[tuple[str, Delivery, float]] = []
        self.fail = fail or {}
        self.lock = threading.Lock()

    def handle(self, event: ShipmentLodged, delivery: Delivery) -> None:
        with self.lock:
            self.calls.append((event.shipment_ref, delivery, time.monotonic()))
            plan = self.fail.get(event.shipment_ref)
            error = plan.pop(0) if plan else None
        if error is not None:
            raise error

    def refs(self) -> list[str]:
        with self.lock:
            return [ref for ref, _, _ in self.calls]


def headers_of(message) -> dict:  # type: ignore[no-untyped-def]
    return {k: v for k, v in (message.headers or {}).items() if k.startswith("cscart-")}


def test_transient_error_is_retried_with_delay_then_dead_lettered(broker_url: str) -> None:
    declare(broker_url)
    handler = Recorder({"S1": [StoreUnreachable("orders.get: HTTP 503") for _ in range(10)]})
    with running(handler, broker_url, max_attempts=3):
        publish_json(broker_url, shipment_event("S1"), "shipment.lodged")
        wait_for(lambda: depth(broker_url, DLQ) == 1, timeout=30)
    attempts = [d.attempt for ref, d, _ in handler.calls]
    times = [t for _, _, t in handler.calls]
    assert attempts == [1, 2, 3]
    # Each retry waited in the 1 s delay queue rather than spinning.
    assert all(later - earlier >= 0.9 for earlier, later in itertools.pairwise(times))
    [dead] = drain(broker_url, DLQ)
    h = headers_of(dead)
    assert h["cscart-error-type"] == "store-unreachable"
    assert h["cscart-reason"] == "gave up after 3 attempts: orders.get: HTTP 503"
    assert "store is up" in h["cscart-action"]
    assert h["cscart-attempts"] == 3
    assert h["cscart-client-id"] == "ACME"
    assert h["cscart-original-exchange"] == "fm.events"
    assert h["cscart-original-routing-key"] == "shipment.lodged"
    assert dead.properties["message_id"] == "evt-S1"
    assert depth(broker_url, WORK) == 0


def test_transient_error_then_success_is_not_dead_lettered(broker_url: str) -> None:
    declare(broker_url)
    handler = Recorder({"S2": [StoreUnreachable("timeout"), StoreUnreachable("timeout")]})
    before = metrics.MESSAGES.labels("shipment-lodged", "ok")._value.get()
    with running(handler, broker_url, max_attempts=5):
        publish_json(broker_url, shipment_event("S2"), "shipment.lodged")
        wait_for(lambda: len(handler.calls) == 3, timeout=30)
        wait_for(lambda: metrics.MESSAGES.labels("shipment-lodged", "ok")._value.get() > before)
    assert depth(broker_url, DLQ) == 0
    assert depth(broker_url, WORK) == 0


def test_permanent_errors_are_dead_lettered_at_once(broker_url: str) -> None:
    declare(broker_url)
    handler = Recorder(
        {
            "S3": [NotFound("orders.get: HTTP 404 Not Found (order 1000012)")],
            "S4": [UnknownClient("client_id 'NOPE' is not in the clients file")],
        }
    )
    with running(handler, broker_url):
        publish_json(broker_url, shipment_event("S3"), "shipment.lodged")
        publish_json(broker_url, shipment_event("S4", client_id="NOPE"), "shipment.lodged")
        wait_for(lambda: depth(broker_url, DLQ) == 2)
    assert sorted(handler.refs()) == ["S3", "S4"]  # one attempt each
    by_type = {headers_of(m)["cscart-error-type"]: headers_of(m) for m in drain(broker_url, DLQ)}
    assert by_type["not-found"]["cscart-reason"] == "orders.get: HTTP 404 Not Found (order 1000012)"
    assert by_type["not-found"]["cscart-attempts"] == 1
    assert by_type["unknown-client"]["cscart-client-id"] == "NOPE"
    assert "clients file" in by_type["unknown-client"]["cscart-action"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "expected an object"),
        (shipment_event("X", type="stock.snapshot"), "does not belong on this queue"),
        (shipment_event("X", version=2), "version"),
        (shipment_event("X", lines=[{"sku": "Test001", "quantity": "2"}]), "lines.0.quantity"),
        (shipment_event("X", lodged_at="2026-11-23T15:02:00"), "lodged_at"),
        (shipment_event("X", shipment_ref=None), "shipment_ref"),
    ],
)
def test_invalid_messages_are_dead_lettered_at_once_naming_the_problem(
    broker_url: str, body: object, field: str
) -> None:
    declare(broker_url)
    handler = Recorder()
    with running(handler, broker_url):
        publish_json(broker_url, body, "shipment.lodged")  # type: ignore[arg-type]
        wait_for(lambda: depth(broker_url, DLQ) == 1)
    assert handler.calls == []
    [dead] = drain(broker_url, DLQ)
    h = headers_of(dead)
    assert h["cscart-error-type"] == "invalid-message"
    assert field in h["cscart-reason"]
    assert "contract" in h["cscart-action"]
    assert dead.body == (body if isinstance(body, bytes) else dead.body)  # kept as it came


def _start_slow_consumer(url: str, markers: Path, seconds: float, grace: float) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.slow_consumer", url, str(markers), str(seconds), str(grace)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: (markers / "ready").exists(), timeout=30)
    return process


def test_message_held_by_a_killed_consumer_is_processed_again(broker_url: str, tmp_path: Path) -> None:
    declare(broker_url)
    first = _start_slow_consumer(broker_url, tmp_path, seconds=60, grace=1)
    publish_json(broker_url, shipment_event("K1"), "shipment.lodged")
    wait_for(lambda: (tmp_path / "started-K1").exists(), timeout=30)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert not list(tmp_path.glob("done-K1-*"))
    handler = Recorder()
    with running(handler, broker_url):
        wait_for(lambda: handler.refs() == ["K1"])
    [(_, delivery, _)] = handler.calls
    assert delivery.redelivered is True
    wait_for(lambda: depth(broker_url, WORK) == 0)


def test_sigterm_finishes_the_message_in_hand_and_exits_0(broker_url: str, tmp_path: Path) -> None:
    declare(broker_url)
    process = _start_slow_consumer(broker_url, tmp_path, seconds=2, grace=30)
    publish_json(broker_url, shipment_event("T1"), "shipment.lodged")
    wait_for(lambda: (tmp_path / "started-T1").exists(), timeout=30)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert (tmp_path / "done-T1-0").exists()
    assert depth(broker_url, WORK) == 0  # acknowledged: nothing handed back, nothing lost
    assert depth(broker_url, DLQ) == 0


def test_sigterm_hands_back_what_cannot_finish_within_the_grace(
    broker_url: str, tmp_path: Path
) -> None:
    declare(broker_url)
    process = _start_slow_consumer(broker_url, tmp_path, seconds=20, grace=0.5)
    publish_json(broker_url, shipment_event("T2"), "shipment.lodged")
    wait_for(lambda: (tmp_path / "started-T2").exists(), timeout=30)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    assert time.monotonic() - started < 15
    wait_for(lambda: depth(broker_url, WORK) == 1)  # handed back to the broker
    handler = Recorder()
    with running(handler, broker_url):
        wait_for(lambda: handler.refs() == ["T2"])


def test_consumer_reconnects_after_the_broker_drops_its_connection(broker_url: str) -> None:
    declare(broker_url)
    handler = Recorder()
    vhost = broker_url.rsplit("/", 1)[1]
    with running(handler, broker_url, heartbeat=5) as runtime:
        publish_json(broker_url, shipment_event("R1"), "shipment.lodged")
        wait_for(lambda: handler.refs() == ["R1"])
        subprocess.run(
            ["rabbitmqctl", "close_all_connections", "-p", vhost, "test: broker restart"],
            check=True,
            capture_output=True,
        )
        wait_for(lambda: not runtime.ready, timeout=20)
        wait_for(lambda: runtime.ready, timeout=40)
        publish_json(broker_url, shipment_event("R2"), "shipment.lodged")
        wait_for(lambda: handler.refs() == ["R1", "R2"], timeout=20)


def test_a_handler_slower_than_the_heartbeat_keeps_its_connection(broker_url: str) -> None:
    declare(broker_url)

    class Slow(Recorder):
        def handle(self, event: ShipmentLodged, delivery: Delivery) -> None:
            super().handle(event, delivery)
            time.sleep(7)  # > 2 × the 2 s heartbeat: a one-thread consumer would be dropped

    handler = Slow()
    with running(handler, broker_url, heartbeat=2) as runtime:
        publish_json(broker_url, shipment_event("H1"), "shipment.lodged")
        wait_for(lambda: depth(broker_url, WORK) == 0 and len(handler.calls) == 1, timeout=30)
        time.sleep(9)
        assert runtime.ready
    assert handler.refs() == ["H1"]  # processed once, never redelivered
    assert depth(broker_url, WORK) == 0


@pytest.mark.skipif(os.environ.get("CSCART_FM_SKIP_MEMORY") == "1", reason="asked to skip")
def test_the_runtime_also_runs_on_the_in_process_broker(memory_url: str) -> None:
    url = memory_url
    declare(url)
    handler = Recorder({"M2": [NotFound("order 9 not found")]})
    with running(handler, url, heartbeat=0):
        publish_json(url, shipment_event("M1"), "shipment.lodged")
        publish_json(url, shipment_event("M2"), "shipment.lodged")
        wait_for(lambda: sorted(handler.refs()) == ["M1", "M2"])
        wait_for(lambda: depth(url, DLQ) == 1)


@pytest.mark.parametrize("encoding", ["latin-1", "binary", "gzip", "utf-16"])
def test_odd_content_encodings_are_retried_and_dead_lettered_not_looped(
    broker_url: str, encoding: str
) -> None:
    """py-amqp decodes a body whose content_encoding is a text codec; republishing it must
    never fail on the encoding (which would look like a broker outage and loop forever)."""
    from kombu import Connection, Producer

    declare(broker_url)
    handler = Recorder({"E1": [StoreUnreachable("down"), StoreUnreachable("down")]})
    body = json.dumps(shipment_event("E1")).encode("utf-8")
    with Connection(broker_url) as conn:
        Producer(conn.default_channel).publish(
            body, exchange="fm.events", routing_key="shipment.lodged", serializer=None,
            content_type="application/json", content_encoding=encoding,
        )
    with running(handler, broker_url, max_attempts=2) as runtime:
        wait_for(lambda: depth(broker_url, DLQ) == 1, timeout=30)
        assert runtime.ready
    [dead] = drain(broker_url, DLQ)
    raw = dead.body if isinstance(dead.body, bytes) else dead.body.encode(dead.content_encoding)
    assert headers_of(dead)["cscart-error-type"] in ("store-unreachable", "invalid-message")
    if encoding in ("latin-1", "binary", "gzip"):
        assert raw == body  # the payload support sees is the one FM sent


def _unacked(url: str, queue_name: str) -> int:
    """What the broker counts as delivered and not yet acknowledged on a queue (from its
    statistics, which lag by a few seconds: poll it with wait_for)."""
    vhost = url.rsplit("/", 1)[1]
    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "-p", vhost, "name", "messages_unacknowledged",
         "--no-table-headers", "-q"],
        check=True, capture_output=True, text=True,
    ).stdout
    counts = dict(line.split("\t") for line in out.strip().splitlines() if "\t" in line)
    return int(counts.get(queue_name, 0))


class Gated(Recorder):
    """A handler that holds the messages named in ``gates`` until their event is set."""

    def __init__(self, *gated: str) -> None:
        super().__init__()
        self.gates = {ref: threading.Event() for ref in gated}

    def handle(self, event: ShipmentLodged, delivery: Delivery) -> None:
        super().handle(event, delivery)
        gate = self.gates.get(event.shipment_ref)
        if gate is not None:
            assert gate.wait(30), "test gate never opened"


def test_later_messages_finishing_first_never_ack_an_unfinished_earlier_one(
    broker_url: str,
) -> None:
    """Concurrency 2: A (delivered first, lowest delivery tag) is still being handled while
    B, C and D finish. They are acked; A is not, so when the connection drops A comes back
    and only A: a multiple ack covering A would have lost it."""
    declare(broker_url)
    for ref in "ABCD":
        publish_json(broker_url, shipment_event(ref), "shipment.lodged")
    handler = Gated("A")
    vhost = broker_url.rsplit("/", 1)[1]
    with running(handler, broker_url, prefetch=4, concurrency=2, heartbeat=5) as runtime:
        wait_for(lambda: sorted(handler.refs()) == ["A", "B", "C", "D"])
        wait_for(lambda: _unacked(broker_url, WORK) == 1, timeout=20)  # A alone
        assert depth(broker_url, WORK) == 0
        subprocess.run(
            ["rabbitmqctl", "close_all_connections", "-p", vhost, "test: broker restart"],
            check=True, capture_output=True,
        )
        wait_for(lambda: not runtime.ready, timeout=20)
        handler.gates["A"].set()  # A finishes on the lost connection: its ack cannot happen
        wait_for(lambda: handler.refs().count("A") == 2, timeout=40)
        wait_for(lambda: depth(broker_url, WORK) == 0 and _unacked(broker_url, WORK) == 0)
    assert sorted(handler.refs()) == ["A", "A", "B", "C", "D"]
    [first_a, second_a] = [d for ref, d, _ in handler.calls if ref == "A"]
    assert (first_a.redelivered, second_a.redelivered) == (False, True)


def test_messages_run_in_parallel_with_concurrency_2(broker_url: str) -> None:
    declare(broker_url)
    handler = Gated("P1", "P2")
    with running(handler, broker_url, prefetch=4, concurrency=2):
        publish_json(broker_url, shipment_event("P1"), "shipment.lodged")
        publish_json(broker_url, shipment_event("P2"), "shipment.lodged")
        wait_for(lambda: sorted(handler.refs()) == ["P1", "P2"])  # both started, none done
        handler.gates["P2"].set()
        handler.gates["P1"].set()
        wait_for(lambda: depth(broker_url, WORK) == 0 and _unacked(broker_url, WORK) == 0)


def test_a_slow_message_does_not_hold_back_the_ack_of_the_one_before_it(
    broker_url: str,
) -> None:
    """Concurrency 1, prefetch 2: Q1 is done while Q2 (already queued for the worker) takes
    long. Q1 is acked within the heartbeat tick, not when Q2 is done."""
    declare(broker_url)
    for ref in ("Q1", "Q2"):
        publish_json(broker_url, shipment_event(ref), "shipment.lodged")
    handler = Gated("Q2")
    ok = metrics.MESSAGES.labels("shipment-lodged", "ok")
    before = ok._value.get()
    with running(handler, broker_url, prefetch=2, concurrency=1):
        wait_for(lambda: handler.refs() == ["Q1", "Q2"])
        q1_done = time.monotonic()
        wait_for(lambda: ok._value.get() - before == 1, timeout=5)
        assert time.monotonic() - q1_done < 1.0
        handler.gates["Q2"].set()
        wait_for(lambda: ok._value.get() - before == 2)


def test_each_finished_message_wakes_the_connection_thread_at_once(broker_url: str) -> None:
    """Prefetch 1: the broker sends the next message only after the ack, so any wait between
    a handler returning and its ack (a timed poll, the heartbeat tick) adds up per message."""
    declare(broker_url)
    for n in range(40):
        publish_json(broker_url, shipment_event(f"W{n}"), "shipment.lodged")
    handler = Recorder()
    started = time.monotonic()
    with running(handler, broker_url, prefetch=1, concurrency=1):
        wait_for(lambda: len(handler.calls) == 40 and depth(broker_url, WORK) == 0)
        elapsed = time.monotonic() - started
    assert elapsed < 4.0  # 40 × the 0.2 s tick would be 8 s


def test_an_idle_consumer_keeps_its_connection_and_wakes_for_the_next_message(
    broker_url: str,
) -> None:
    """Asleep in poll() between heartbeat ticks, with nothing to do for 3 × the heartbeat."""
    declare(broker_url)
    handler = Recorder()
    with running(handler, broker_url, heartbeat=2) as runtime:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            assert runtime.ready  # a dropped connection clears it for ≥ 1 s
            time.sleep(0.05)
        publish_json(broker_url, shipment_event("I1"), "shipment.lodged")
        wait_for(lambda: handler.refs() == ["I1"], timeout=5)


def test_stopping_hands_back_messages_no_worker_started(broker_url: str) -> None:
    """Prefetch 4, concurrency 1: S1 is being handled, S2 and S3 wait in the runtime. Stopping
    finishes S1 and hands S2 and S3 back to the broker without handling them."""
    declare(broker_url)
    for ref in ("S1", "S2", "S3"):
        publish_json(broker_url, shipment_event(ref), "shipment.lodged")
    handler = Gated("S1")
    requeued = metrics.MESSAGES.labels("shipment-lodged", "requeued")
    before = requeued._value.get()
    with running(handler, broker_url, prefetch=4, concurrency=1, shutdown_grace=20) as runtime:
        wait_for(lambda: handler.refs() == ["S1"])
        wait_for(lambda: _unacked(broker_url, WORK) == 3)
        runtime.stop()
        time.sleep(0.3)
        handler.gates["S1"].set()
    # The runtime has returned and closed its connection: S1 acked, S2 and S3 back.
    assert handler.refs() == ["S1"]
    assert requeued._value.get() - before == 2
    assert depth(broker_url, WORK) == 2


def test_a_delivery_read_while_a_retry_awaits_its_confirm_is_handled_at_once(
    broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting for a publish confirm reads the connection, so kombu may deliver the next
    message then. It is handled at once, not when something else next arrives."""
    from cscart_fm.core.runtime import ConsumerRuntime

    declare(broker_url, delays=(30,))
    handler = Recorder({"F": [StoreUnreachable("down")]})
    republish = ConsumerRuntime._republish
    late: list[float] = []

    def republish_after_a_delivery(producer, message, **kwargs):  # type: ignore[no-untyped-def]
        if not late:
            publish_json(broker_url, shipment_event("LATE"), "shipment.lodged")
            time.sleep(0.5)  # its delivery is on the socket before the confirm
            late.append(time.monotonic())
        republish(producer, message, **kwargs)

    monkeypatch.setattr(ConsumerRuntime, "_republish", staticmethod(republish_after_a_delivery))
    with running(handler, broker_url, delays=(30,), prefetch=4, max_attempts=3):
        publish_json(broker_url, shipment_event("F"), "shipment.lodged")
        wait_for(lambda: "LATE" in handler.refs(), timeout=10)
        [(_, _, handled_at)] = [call for call in handler.calls if call[0] == "LATE"]
    assert handled_at - late[0] < 1.0  # not held until the next delivery (F, in 30 s)


def test_a_plain_amqp_connection_is_waited_on_through_its_socket(broker_url: str) -> None:
    """The tests above run the runtime in its socket mode (TLS and memory:// use timed waits)."""
    from cscart_fm.core.broker import connect
    from cscart_fm.core.runtime import _broker_socket, _Waker

    waker = _Waker()
    try:
        with connect(broker_url) as conn:
            conn.connect()
            broker = _broker_socket(conn, waker)
            assert broker is not None
            assert broker.fd == conn.connection.sock.fileno()
    finally:
        waker.close()
