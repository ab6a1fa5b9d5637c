"""Fault 4: hostile messages (hypothesis: bad JSON, non-UTF-8, wrong types, missing fields,
huge fields and bodies, unknown clients, deep nesting, giant arrays, messages for another
queue, odd headers) published raw to ``fm.events`` with each routing key.

Each consumer runs as its own ``cscart-fm run`` process. Afterwards: every process is the same
one (same PID) and still ready; every message is either in the consumer's ``.dlq`` with
``cscart-error-type`` and a non-empty ``cscart-reason``, or was valid and handled (counted from
the consumer's own metrics): published == dead-lettered + handled, per consumer, counted in
the queue itself (the service's dead-letter collector is held off for the run) and in the
runtime's metrics. Then the dead letters are collected into the state store as the service
does (the collector must cope with all of it); identical messages dead-lettered within the same
second become one row there (its fingerprint), which the figures show.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from kombu import Connection

from consumers.registry import JOBS
from cscart_emulator import StoreEmulator
from cscart_fm.core import topology
from cscart_fm.core.broker import Publisher
from tests.support.amqp_values import raw_timestamps
from tests.support.pipeline import API_KEY, API_USER, cli_env, client_doc, write_clients_file

from .harness import (
    Artefacts,
    ConsumerProcess,
    LeakRegistry,
    audit,
    browse_queue,
    metric_value,
    queue_depth,
    report,
    size,
    start_all,
    take_dead_letters,
)
from .hostile import ROUTING_KEYS, Budget, Hostile, hostile_message

pytestmark = [pytest.mark.broker, pytest.mark.timeout(3600)]

CONSUMERS = {
    "order-poll.tick": "order-poll",
    "shipment.lodged": "shipment-lodged",
    "stock.snapshot": "stock-snapshot",
}
SHOPPER = "hostile.shopper@fault-mail.example"
EXPECTED_TYPES = {"invalid-message", "unknown-client", "not-found", "store-mismatch",
                  "store-refused"}
"""What a hostile message may be dead-lettered as: the message is wrong, its client unknown,
or (valid but nonsense) its order is not in the store or does not match it."""


def test_hostile_messages_are_dead_lettered_with_a_reason_and_the_consumers_stay_up(
    broker_url: str, tmp_path: Path, artefacts: Artefacts, leak_registry: LeakRegistry
) -> None:
    count = size(1000, 10_000)
    budget = Budget(max_bytes=size(40, 400) * 1024 * 1024)
    emu = StoreEmulator(api_user=API_USER, api_key=API_KEY)
    emu.add_product("Test001", 10, product="Test item 1")
    emu.add_product("Test002", 10, product="Test item 2")
    emu.add_order(order_id=1000012, status="P", email=SHOPPER,
                  products=[{"product_code": "Test001", "amount": 2}])
    published: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    largest = 0

    with emu:
        with Connection(broker_url) as conn:
            JOBS.topology((1,)).declare(conn)
        clients = write_clients_file(tmp_path / "clients.yaml", [client_doc(emu.url)])
        state_url = f"sqlite:///{tmp_path / 'state.sqlite'}"
        env = cli_env(broker_url, state_url, clients, CSCART_FM_LOG_LEVEL="INFO",
                      CSCART_FM_DEAD_LETTER_INTERVAL="86400")
        services = {rk: ConsumerProcess(name, env, artefacts) for rk, name in CONSUMERS.items()}
        publisher = Publisher(broker_url)
        started = time.monotonic()
        try:
            start_all(services.values())
            pids = {rk: s.pid for rk, s in services.items()}

            @settings(max_examples=count, database=None, deadline=None, derandomize=True,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(hostile_message(budget))
            def publish(message: Hostile) -> None:
                nonlocal largest
                properties = {**message.properties, "delivery_mode": 2,
                              "headers": message.headers}
                publisher.publish_raw(message.body, exchange=topology.EVENTS_EXCHANGE,
                                      routing_key=message.routing_key, properties=properties)
                published[message.routing_key] += 1
                categories[message.category] += 1
                largest = max(largest, len(message.body))

            with raw_timestamps():  # headers in any 64-bit range, as other clients send
                publish()
            publish_seconds = time.monotonic() - started

            def settled() -> bool:
                for rk, service in services.items():
                    topo = JOBS.named(CONSUMERS[rk]).topology((1,))
                    text = service.metrics()
                    handled = sum(metric_value(text, "cscart_fm_messages_total",
                                               consumer=topo.name, outcome=o)
                                  for o in ("ok", "dead_letter"))
                    if handled < published[rk] or queue_depth(broker_url, topo.queue_name):
                        return False
                    if queue_depth(broker_url, topo.retry_queue_name(1)):
                        return False
                return True

            deadline = time.monotonic() + size(600, 2400)
            not_ready_since: dict[str, float] = {}
            while not settled():
                for rk, service in services.items():
                    log_tail = service.log_file.read_text(errors="replace")[-3000:]
                    assert service.alive(), f"{CONSUMERS[rk]} died:\n{log_tail}"
                    # Staying up means staying ready: a message that breaks the consumer's
                    # connection loop shows here long before any deadline.
                    if service.ready():
                        not_ready_since.pop(rk, None)
                    elif time.monotonic() - not_ready_since.setdefault(rk, time.monotonic()) > 15:
                        raise AssertionError(
                            f"{CONSUMERS[rk]} has not been ready for 15 s:\n{log_tail}")
                assert time.monotonic() < deadline, "the consumers did not get through them"
                time.sleep(0.5)
            elapsed = time.monotonic() - started
            outcomes = {rk: service.scrape() for rk, service in services.items()}
            still = {rk: (service.alive(), service.pid == pids[rk], service.ready())
                     for rk, service in services.items()}
        finally:
            publisher.close()
            codes = {rk: service.stop() for rk, service in services.items()}

        figures: dict[str, object] = {"messages published": sum(published.values()),
                                      "largest body (bytes)": f"{largest:,}",
                                      "large payload bytes": f"{budget.used_bytes:,}"}
        figures.update({f"  category {k}": v for k, v in sorted(categories.items())})
        problems = []
        error_types: Counter[str] = Counter()
        for rk in ROUTING_KEYS:
            name = CONSUMERS[rk]
            dead = browse_queue(broker_url, f"cscart.{name}.dlq")
            stored = take_dead_letters(broker_url, name, state_url, artefacts)
            ok = int(metric_value(outcomes[rk], "cscart_fm_messages_total", consumer=name,
                                  outcome="ok"))
            counted_dead = int(metric_value(outcomes[rk], "cscart_fm_messages_total",
                                            consumer=name, outcome="dead_letter"))
            retried = int(metric_value(outcomes[rk], "cscart_fm_messages_total",
                                       consumer=name, outcome="retry"))
            without_reason = [d for d in dead if not d.headers.get("cscart-error-type")
                              or not str(d.headers.get("cscart-reason") or "").strip()]
            types = Counter(str(d.headers.get("cscart-error-type")) for d in dead)
            error_types.update(types)
            figures[f"{name}: published"] = published[rk]
            figures[f"{name}: dead-lettered (in the .dlq)"] = len(dead)
            figures[f"{name}: dead-lettered (runtime's metric)"] = counted_dead
            figures[f"{name}: rows in the state store once collected"] = len(stored)
            figures[f"{name}: valid and handled"] = ok
            figures[f"{name}: retried"] = retried
            figures[f"{name}: same PID, ready, exit code"] = (
                f"{still[rk][1]}, {still[rk][2]}, {codes[rk]}")
            if counted_dead + ok != published[rk]:
                problems.append(f"{name}: {published[rk]} published but the runtime counts "
                                f"{counted_dead} dead-lettered + {ok} handled")
            if len(stored) < len({d.body for d in dead}):
                problems.append(f"{name}: {len({d.body for d in dead})} distinct dead letters "
                                f"but {len(stored)} rows in the state store")
            if len(dead) + ok != published[rk]:
                problems.append(f"{name}: {published[rk]} published but {len(dead)} "
                                f"dead-lettered + {ok} handled")
            if without_reason:
                problems.append(f"{name}: {len(without_reason)} dead letters without a reason, "
                                f"e.g. headers {without_reason[0].headers}")
            if not all(still[rk]):
                problems.append(f"{name}: alive, same PID, ready = {still[rk]}")
            if codes[rk] != 0:
                problems.append(f"{name}: exit code {codes[rk]} on SIGTERM")
        figures.update({f"  dead-letter type {k}": v for k, v in sorted(error_types.items())})
        figures["publish seconds"] = round(publish_seconds, 1)
        figures["seconds"] = round(elapsed, 1)
        report("4. hostile messages", figures)
        unexpected = set(error_types) - EXPECTED_TYPES
        if unexpected:
            problems.append(f"unexpected dead-letter types {sorted(unexpected)}")
        assert not problems, "\n".join(problems)
        assert emu.errors == []
        audit(artefacts, leak_registry, {SHOPPER})
