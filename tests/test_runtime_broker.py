"""The consumer runtime on a real RabbitMQ: retries, dead letters, crashes, SIGTERM."""

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

from cscart_fm import metrics
from cscart_fm.errors import NotFound, StoreUnreachable, UnknownClient
from cscart_fm.runtime import Delivery
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

pytestmark = pytest.mark.broker

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
def test_the_runtime_also_runs_on_the_in_process_broker() -> None:
    url = f"memory://runtime-test-{time.monotonic_ns()}"
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
