"""The tick producer and the hand-held event publisher, on kombu's in-process broker (what
they publish is the rule) and, for the tick loop as its own process, on a real RabbitMQ."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cscart_fm.cli.wiring import open_state
from cscart_fm.core.broker import Publisher
from cscart_fm.core.events import parse_event
from cscart_fm.support.dead_letters.collect import raw_body
from producers.tick import Schedule, TickTarget, load_targets, run_loop, tick_schedule
from schemas.messages import OrderPollTick

from .support.broker import declare, depth, drain, shipment_event, wait_for
from .support.dlq_handlers import cli, logging_restored, order_imported_body
from .support.pipeline import client_doc, start_cli, write_clients_file

TICKS = "cscart.order-poll"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with logging_restored():
        yield


def clients_file(tmp_path: Path, intervals: dict[str, int]) -> Path:
    docs = [
        client_doc("http://127.0.0.1:9", client_id, orders={"poll_interval_seconds": seconds})
        for client_id, seconds in intervals.items()
    ]
    return write_clients_file(tmp_path / "clients.yaml", docs)


def env_for(broker_url: str, tmp_path: Path, clients: Path) -> dict[str, str]:
    # No API key in the environment: the tick producer must not need the stores' secrets.
    return {
        "CSCART_FM_BROKER_URL": broker_url,
        "CSCART_FM_CLIENTS": str(clients),
        "CSCART_FM_STATE_URL": f"sqlite:///{tmp_path / 'state.sqlite'}",
        "CSCART_FM_RETRY_DELAYS": "1",
    }


def assert_contract_properties(message: Any, body: dict[str, Any], schema: str) -> None:
    assert message.content_type == "application/json"
    assert message.properties["delivery_mode"] == 2
    assert message.properties["message_id"] == body["event_id"]
    assert message.headers["schema"] == schema


# --- tick ------------------------------------------------------------------------------------


def test_tick_once_publishes_one_tick_per_client(memory_url: str, tmp_path: Path) -> None:
    env = env_for(memory_url, tmp_path, clients_file(tmp_path, {"ACME": 300, "BETA": 60}))
    result = cli(env, "tick", "--json")
    assert result.exit_code == 0, result.output
    reported = json.loads(result.stdout)
    assert [r["client_id"] for r in reported] == ["ACME", "BETA"]
    messages = drain(memory_url, TICKS)  # the tick declared the queue: nothing was lost
    assert len(messages) == 2
    before = datetime.now(UTC)
    for message in messages:
        body = json.loads(message.body)
        tick = parse_event(message.body, OrderPollTick)
        assert_contract_properties(message, body, "order-poll.tick/1")
        assert tick.issued_at.utcoffset() is not None
        assert before - timedelta(minutes=1) < tick.issued_at <= datetime.now(UTC)
    assert sorted(json.loads(m.body)["client_id"] for m in messages) == ["ACME", "BETA"]
    assert len({json.loads(m.body)["event_id"] for m in messages}) == 2


def test_tick_once_for_the_clients_named(memory_url: str, tmp_path: Path) -> None:
    env = env_for(memory_url, tmp_path, clients_file(tmp_path, {"ACME": 300, "BETA": 60}))
    result = cli(env, "tick", "BETA")
    assert result.exit_code == 0, result.output
    assert "ticked BETA" in result.stdout
    assert [json.loads(m.body)["client_id"] for m in drain(memory_url, TICKS)] == ["BETA"]


def test_tick_refuses_an_unknown_client(memory_url: str, tmp_path: Path) -> None:
    declare(memory_url)
    env = env_for(memory_url, tmp_path, clients_file(tmp_path, {"ACME": 300}))
    result = cli(env, "tick", "ACME", "NOPE")
    assert result.exit_code == 2
    assert "NOPE" in result.stderr
    assert "not in the clients file" in result.stderr
    assert "ACME" in result.stderr  # what it does know
    assert depth(memory_url, TICKS) == 0  # not even the known one: nothing half-done


def test_tick_refuses_a_broken_clients_file(memory_url: str, tmp_path: Path) -> None:
    path = clients_file(tmp_path, {"ACME": 5})  # below the 10 s minimum
    result = cli(env_for(memory_url, tmp_path, path), "tick")
    assert result.exit_code == 2
    assert "client ACME: orders.poll_interval_seconds" in result.stderr


def test_tick_due_for_a_cronjob_ticks_only_the_clients_whose_interval_elapsed(
    memory_url: str, tmp_path: Path
) -> None:
    env = env_for(memory_url, tmp_path, clients_file(tmp_path, {"ACME": 60, "BETA": 3600}))
    first = cli(env, "tick", "--due")
    assert first.exit_code == 0, first.output
    assert sorted(json.loads(m.body)["client_id"] for m in drain(memory_url, TICKS)) == [
        "ACME",
        "BETA",
    ]
    again = cli(env, "tick", "--due")  # the next minute's run, too early for both
    assert again.exit_code == 0, again.output
    assert "2 client(s) not due yet" in again.stdout
    assert drain(memory_url, TICKS) == []

    # 55 s later ACME is due (a CronJob starting a few seconds early still ticks it).
    store = open_state(env["CSCART_FM_STATE_URL"])
    with store.transaction() as conn:
        for client_id, last in conn.execute(
            sa.select(tick_schedule.c.client_id, tick_schedule.c.last_tick_at)
        ).all():
            conn.execute(
                sa.update(tick_schedule)
                .where(tick_schedule.c.client_id == client_id)
                .values(last_tick_at=last - timedelta(seconds=55))
            )
    store.close()
    later = cli(env, "tick", "--due")
    assert later.exit_code == 0, later.output
    assert [json.loads(m.body)["client_id"] for m in drain(memory_url, TICKS)] == ["ACME"]


def test_tick_loop_honours_each_clients_interval_and_a_restart_does_not_tick_again(
    memory_url: str, tmp_path: Path
) -> None:
    declare(memory_url)
    store = open_state(f"sqlite:///{tmp_path / 'state.sqlite'}")
    publisher = Publisher(memory_url)
    start = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    now = [start]

    def clock() -> datetime:
        return now[0]

    def wait_until(limit: float) -> Any:
        def wait(seconds: float) -> bool:  # a minute passes in no time
            now[0] += timedelta(seconds=seconds)
            return (now[0] - start).total_seconds() >= limit

        return wait

    targets = [TickTarget("ACME", 10), TickTarget("BETA", 30)]
    try:
        published = run_loop(
            publisher, targets, 5, schedule=Schedule(store), wait=wait_until(60), clock=clock
        )
        ticks = [json.loads(m.body) for m in drain(memory_url, TICKS)]
        # Wakes at 0, 5, ..., 55 s: ACME every 10 s, BETA every 30 s.
        assert Counter(t["client_id"] for t in ticks) == {"ACME": 6, "BETA": 2}
        assert published == 8
        acme = sorted(t["issued_at"] for t in ticks if t["client_id"] == "ACME")
        assert acme[0] == start.isoformat() and acme[-1] == (start + timedelta(seconds=50)).isoformat()

        # Killed at 52 s and restarted at once (a rollout): the last ticks are remembered, so
        # no client is ticked again before its interval is up (in memory alone, both would be).
        now[0] = start + timedelta(seconds=52)
        run_loop(
            publisher, targets, 5, schedule=Schedule(store), wait=wait_until(57), clock=clock
        )
        assert drain(memory_url, TICKS) == []
        # ... and ticking carries on once they are due (ACME at 60 s, BETA at 60 s).
        now[0] = start + timedelta(seconds=62)
        run_loop(publisher, targets, 5, schedule=Schedule(store), wait=wait_until(0), clock=clock)
        assert sorted(json.loads(m.body)["client_id"] for m in drain(memory_url, TICKS)) == [
            "ACME",
            "BETA",
        ]
    finally:
        publisher.close()
        store.close()


@pytest.mark.broker
def test_tick_loop_runs_until_sigterm_then_exits_0(broker_url: str, tmp_path: Path) -> None:
    path = clients_file(tmp_path, {"FAST": 10, "SLOW": 3600})
    env = {**os.environ, **env_for(broker_url, tmp_path, path)}
    process = start_cli(["tick", "--every", "1"], env, tmp_path / "tick.log")
    try:
        declare(broker_url)
        wait_for(lambda: depth(broker_url, TICKS) == 2, timeout=30)  # both at start
        time.sleep(12)  # FAST's second tick is due 10 s after the first, its third at 20 s
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
    ticks = Counter(json.loads(m.body)["client_id"] for m in drain(broker_url, TICKS))
    assert ticks == {"FAST": 2, "SLOW": 1}
    log = (tmp_path / "tick.log").read_text()
    assert "tick loop stopped" in log
    assert "Traceback" not in log


def test_load_targets_needs_no_api_key(tmp_path: Path) -> None:
    path = clients_file(tmp_path, {"ACME": 120})
    assert load_targets(path, environ={}) == [TickTarget("ACME", 120)]


# --- publish ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "named"),
    [
        (shipment_event("P1", lines=[{"sku": "Test001", "quantity": "2"}]), "lines.0.quantity"),
        (shipment_event("P1", lodged_at="2026-11-23T15:02:00"), "lodged_at"),
        (shipment_event("P1", shipment_ref=None), "shipment_ref"),
        (shipment_event("P1", type="shipment.lost"), "type"),
        ({**order_imported_body(), "totals": {"total": 29.9}}, "totals.subtotal"),
    ],
)
def test_publish_refuses_a_bad_event_naming_the_field(
    memory_url: str, tmp_path: Path, event: dict[str, Any], named: str
) -> None:
    declare(memory_url)
    source = tmp_path / "event.json"
    source.write_text(json.dumps(event))
    env = env_for(memory_url, tmp_path, tmp_path / "no-clients.yaml")
    result = cli(env, "publish", str(source))
    assert result.exit_code == 2
    assert "refused, nothing published" in result.stderr
    assert named in result.stderr
    assert depth(memory_url, "cscart.shipment-lodged") == 0
    assert depth(memory_url, "fm.orders.imported") == 0


def test_publish_refuses_what_is_not_json_or_not_there(memory_url: str, tmp_path: Path) -> None:
    env = env_for(memory_url, tmp_path, tmp_path / "no-clients.yaml")
    result = cli(env, "publish", "-", stdin="{not json")
    assert result.exit_code == 2
    assert "not JSON" in result.stderr
    result = cli(env, "publish", str(tmp_path / "missing.json"))
    assert result.exit_code == 2
    assert "cannot read" in result.stderr


def test_publish_sends_a_good_event_where_the_contract_says(memory_url: str, tmp_path: Path) -> None:
    env = env_for(memory_url, tmp_path, tmp_path / "no-clients.yaml")
    source = tmp_path / "shipment.json"
    raw = json.dumps(shipment_event("P2"), indent=2) + "\n"
    source.write_text(raw)
    result = cli(env, "publish", str(source))
    assert result.exit_code == 0, result.output
    assert "to fm.events / shipment.lodged: confirmed" in result.stdout
    [message] = drain(memory_url, "cscart.shipment-lodged")
    assert raw_body(message) == raw.strip().encode()  # as written, validated
    assert_contract_properties(message, shipment_event("P2"), "shipment.lodged/1")

    order = order_imported_body()
    result = cli(env, "publish", "-", "--json", stdin=json.dumps(order))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "schema": "order.imported/1",
        "event_id": "evt-order-1",
        "client_id": "ACME",
        "exchange": "fm.orders",
        "routing_key": "order.imported",
        "confirmed": True,
    }
    [message] = drain(memory_url, "fm.orders.imported")
    assert_contract_properties(message, order, "order.imported/1")
    assert "jane@example.com" not in result.output  # nothing personal echoed
