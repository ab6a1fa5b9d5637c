"""Fault 1: shipment events while the consumer is killed with SIGKILL every ~2 s and the broker
is restarted once → every shipment in the store exactly once.

The consumer runs as ``cscart-fm run shipment-lodged`` (SQLite state, as embedded) against a
RabbitMQ node of the suite's own, so that ``rabbitmqctl stop_app`` / ``start_app`` restarts
nothing anyone else uses. The test publishes the events over time with publisher confirms,
retrying any publish the restart breaks (a retried publish may land twice: the consumer has
to cope with that too). The process alive during the restart is not killed until it has
reconnected by itself.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from kombu import Connection

from consumers.registry import JOBS
from cscart_emulator import Fault, StoreEmulator
from cscart_fm.core import topology
from cscart_fm.core.broker import Publisher
from tests.support.broker import shipment_event
from tests.support.pipeline import API_KEY, API_USER, cli_env, client_doc, write_clients_file

from .harness import (
    Artefacts,
    ConsumerProcess,
    LeakRegistry,
    PrivateBroker,
    audit,
    metric_value,
    queue_depth,
    report,
    size,
    take_dead_letters,
    total_over_processes,
)

pytestmark = [pytest.mark.broker, pytest.mark.timeout(1800)]

CONSUMER = "shipment-lodged"
WORK = "cscart.shipment-lodged"
FIRST_ORDER = 2_000_000
KILL_EVERY = (1.5, 2.5)
"""Seconds of consuming between two kills (uniform)."""
MARKER = re.compile(r"FM ref (\S+)")


def shopper(n: int) -> str:
    return f"shopper.{n}@fault-mail.example"


class Feeder(threading.Thread):
    """Publishes the events at a steady pace with confirms; a publish that fails (the broker is
    restarting) is retried on a new connection until confirmed."""

    def __init__(self, url: str, events: list[bytes], rate: float) -> None:
        super().__init__(name="fault-feeder", daemon=True)
        self.url = url
        self.events = events
        self.rate = rate
        self.published = 0
        self.retried = 0  # publishes that raised and were sent again
        self.held_up = 0  # publishes that took over a second (waiting for the broker)
        self.error: BaseException | None = None

    def run(self) -> None:
        publisher = Publisher(self.url)
        try:
            for n, body in enumerate(self.events):
                while True:
                    t0 = time.monotonic()
                    try:
                        publisher.publish_raw(
                            body,
                            exchange=topology.EVENTS_EXCHANGE,
                            routing_key="shipment.lodged",
                            properties={"content_type": "application/json",
                                        "delivery_mode": 2, "message_id": f"evt-{n}",
                                        "headers": {"schema": "shipment.lodged/1"}},
                        )
                        if time.monotonic() - t0 > 1:
                            self.held_up += 1
                        break
                    except Exception:
                        self.retried += 1
                        publisher.close()
                        publisher = Publisher(self.url)
                        time.sleep(0.5)
                self.published += 1
                time.sleep(1 / self.rate)
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            publisher.close()


def test_shipments_survive_sigkill_every_2s_and_a_broker_restart(
    private_broker: PrivateBroker,
    private_url: str,
    tmp_path: Path,
    artefacts: Artefacts,
    leak_registry: LeakRegistry,
) -> None:
    count = size(200, 1000)
    rng = random.Random(20261123)
    emu = StoreEmulator(api_user=API_USER, api_key=API_KEY)
    emu.add_product("Test001", 10_000, product="Test item 1")
    emu.add_product("Test002", 10_000, product="Test item 2")
    for n in range(count):
        emu.add_order(order_id=FIRST_ORDER + n, status="P", email=shopper(n),
                      firstname="Shop", lastname=f"Per{n}",
                      products=[{"product_code": "Test001", "amount": 2},
                                {"product_code": "Test002", "amount": 1}])
    # A little latency on every call, so that kills land in the middle of messages.
    emu.set_fault("*", Fault(latency=0.01))
    events = [
        shipment_event(f"FM-F1-{n:05d}", event_id=f"f1-{n}", order_no=f"CS{FIRST_ORDER + n}",
                       cart_order_id=FIRST_ORDER + n,
                       lines=[{"sku": "Test001", "quantity": 2}, {"sku": "Test002", "quantity": 1}])
        for n in range(count)
    ]
    bodies = [json.dumps(e).encode() for e in events]

    def done() -> int:
        return sum(1 for n in range(count) if emu.orders[FIRST_ORDER + n].status == "C")

    with emu:
        with Connection(private_url) as conn:
            JOBS.topology((1,)).declare(conn)
        clients = write_clients_file(
            tmp_path / "clients.yaml", [client_doc(emu.url, limits={"read_timeout": 5})]
        )
        state_url = f"sqlite:///{tmp_path / 'state.sqlite'}"
        env = cli_env(private_url, state_url, clients,
                      CSCART_FM_LOG_LEVEL="DEBUG", CSCART_FM_SHUTDOWN_GRACE="5")
        service = ConsumerProcess(CONSUMER, env, artefacts)
        # Fed over most of the run, so that the restart breaks publishes too.
        feeder = Feeder(private_url, bodies, rate=8.0)
        started = time.monotonic()
        restart: dict[str, float] = {}
        try:
            service.start().wait_ready()
            feeder.start()
            deadline = started + size(600, 1500)
            while done() < count:
                assert time.monotonic() < deadline, f"only {done()} of {count} shipped in time"
                time.sleep(rng.uniform(*KILL_EVERY))
                if not restart and feeder.published >= count // 2:
                    # The broker goes away under the running consumer, which must reconnect
                    # by itself; no kill until it has.
                    pid = service.pid
                    t0 = time.monotonic()
                    private_broker.stop_app()
                    time.sleep(3)
                    private_broker.start_app()
                    restart["down_seconds"] = time.monotonic() - t0
                    service.wait_ready(timeout=120)
                    assert service.pid == pid and service.alive()
                    restart["reconnected_after"] = time.monotonic() - t0
                    continue
                service.kill()
                service.start().wait_ready(timeout=120)
            feeder.join(timeout=120)
            assert feeder.error is None, feeder.error
            assert feeder.published == count
            # Let the last process finish what is left (redelivered and re-published copies).
            service_deadline = time.monotonic() + 120
            while queue_depth(private_url, WORK) or metric_value(
                service.metrics(), "cscart_fm_messages_in_progress", consumer=CONSUMER
            ):
                assert time.monotonic() < service_deadline, "the work queue never emptied"
                time.sleep(0.2)
            assert service.stop() == 0
        finally:
            if service.alive():
                service.stop()
            feeder.join(timeout=5)
        elapsed = time.monotonic() - started
        dead = take_dead_letters(private_url, CONSUMER, state_url, artefacts)
        refs = Counter(
            match.group(1)
            for shipment in emu.shipments.values()
            for match in [MARKER.search(shipment["comments"])]
            if match
        )
        per_order = Counter(int(s["order_id"]) for s in emu.shipments.values())
        log_text = service.log_file.read_text(errors="replace")
        figures = {
            "events": count,
            "kills (SIGKILL)": service.kills,
            "consumer starts": service.starts,
            "broker restarts": 1 if restart else 0,
            "broker down (s)": round(restart.get("down_seconds", 0), 1),
            "reconnected by itself after (s)": round(restart.get("reconnected_after", 0), 1),
            "publishes failed and retried": feeder.retried,
            "publishes held up > 1 s by the restart": feeder.held_up,
            "shipments in the store": len(emu.shipments),
            "distinct shipment refs": len(refs),
            "duplicate shipments": sum(n - 1 for n in refs.values() if n > 1),
            "orders shipped (status C)": done(),
            "adopted after a crash (found by marker)": log_text.count(
                "shipment already in the store: adopted"),
            "store POSTs answered": sum(1 for r in emu.requests
                                        if r.endpoint == "shipments.create"),
            "dead letters": len(dead),
            "messages handled ok (all processes)": int(total_over_processes(
                service, "cscart_fm_messages_total", consumer=CONSUMER, outcome="ok")),
            "retried (all processes)": int(total_over_processes(
                service, "cscart_fm_messages_total", consumer=CONSUMER, outcome="retry")),
            "seconds": round(elapsed, 1),
        }
        report("1. shipments under SIGKILL + broker restart", figures)
        assert restart, "the broker was never restarted (the run ended too early)"
        assert feeder.retried + feeder.held_up >= 1, "the restart never met a publish"
        assert service.kills >= 3
        assert emu.errors == []
        assert not dead, [d.headers.get("cscart-reason") for d in dead[:5]]
        assert len(emu.shipments) == count
        assert set(refs) == {f"FM-F1-{n:05d}" for n in range(count)}
        assert max(refs.values()) == 1, "a shipment was created twice"
        assert max(per_order.values()) == 1
        # Check 5 on this run.
        searched = audit(artefacts, leak_registry, {shopper(n) for n in range(count)})
        assert searched >= service.kills  # a log and a scrape per process at least
