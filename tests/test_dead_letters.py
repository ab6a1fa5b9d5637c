"""Dead letters support staff can work with, and the state store keeping them.

Dead letters are made the real way: small handlers on the consumer runtime fail with each
error type; support then works through ``cscart-fm dlq``. What support does with them
(collection, masking, filters, replay, discard, resolve, the desk's refusals and audit) runs
on kombu's in-process broker and, in the broker tier, on RabbitMQ (``bus_url``); what only
RabbitMQ does stays there: the broker dead-lettering a message itself (``x-delivery-limit``,
``x-death`` from a delay queue) and connections dropped mid-replay. The storage's own rules
(keys, masking, deduplication, a replay waiting for the broker) need no broker at all.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from consumers.registry import JOBS
from cscart_emulator import StoreEmulator
from cscart_fm.cli.wiring import middleware, open_state
from cscart_fm.core import metrics
from cscart_fm.core.broker import Publisher
from cscart_fm.core.errors import (
    NotFound,
    StoreMismatch,
    StoreRefused,
    StoreUnauthorized,
    StoreUnreachable,
    UnknownClient,
)
from cscart_fm.core.events import parse_event
from cscart_fm.core.state import StateStore
from cscart_fm.support.dead_letters import audit
from cscart_fm.support.dead_letters import store as dl
from cscart_fm.support.dead_letters.collect import collect, record_of
from cscart_fm.support.dead_letters.desk import REASON_REQUIRED, os_user
from cscart_fm.support.dead_letters.masking import mask_payload
from cscart_fm.support.dead_letters.replay import replay
from cscart_fm.support.dead_letters.resolve import DeadLetterResolver, key_of_document
from cscart_fm.support.dead_letters.store import Filter, find

from .support.broker import (
    declare,
    depth,
    drain,
    publish_attempt,
    publish_json,
    put_back,
    running,
    shipment_event,
    wait_for,
)
from .support.console_helpers import login, make_console, post, served
from .support.dlq_handlers import (
    Planned,
    StockChecker,
    cli,
    exceed_delivery_limit,
    logging_restored,
    order_imported_body,
    stock_event,
)
from .support.pipeline import (
    API_KEY,
    API_USER,
    KEY_ENV,
    client_doc,
    consumer,
    make_services,
    write_clients_file,
)

WORK = "cscart.shipment-lodged"
DLQ = "cscart.shipment-lodged.dlq"
STOCK_DLQ = "cscart.stock-snapshot.dlq"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with logging_restored():
        yield


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.sqlite'}"


CLIENTS_FILE = Path(tempfile.gettempdir()) / "cscart-fm-test-support-clients.yaml"


def support_env(broker_url: str, state_url: str) -> dict[str, str]:
    """Support's environment. Support works without a clients file, but shows a dead
    letter's headers only with one (its API keys are what it masks them with)."""
    write_clients_file(CLIENTS_FILE, [client_doc("http://127.0.0.1:9")])
    return {
        "CSCART_FM_BROKER_URL": broker_url,
        "CSCART_FM_STATE_URL": state_url,
        "CSCART_FM_RETRY_DELAYS": "1",
        "CSCART_FM_CLIENTS": str(CLIENTS_FILE),
        KEY_ENV: API_KEY,
    }


def dlq_json(env: dict[str, str], *args: str) -> Any:
    result = cli(env, "dlq", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def rows(state_url: str, **where: Any) -> list[dl.DeadLetter]:
    store = open_state(state_url)
    try:
        return find(store, Filter(**where))
    finally:
        store.close()


# --- every error type, with its reason --------------------------------------------------------


def error_plan() -> dict[str, Any]:
    """What the planned handler raises for each shipment_ref: one of each error type."""
    return {
        "S-404": NotFound("orders.get: HTTP 404 Not Found (order 1000012)"),
        "S-MISMATCH": StoreMismatch("SKU Test009 is not on order CS1000012"),
        "S-400": StoreRefused("shipments.create: HTTP 400 (order_id: unknown)", status=400),
        "S-401": StoreUnauthorized("orders.get: HTTP 401 Unauthorized", status=401),
        "S-503": StoreUnreachable("orders.get: HTTP 503 Service Unavailable"),
        "S-NOPE": UnknownClient("client_id 'NOPE' is not in the clients file"),
    }


def assert_the_runtimes_reasons(by_type: dict[str, Any]) -> None:
    assert by_type["not-found"]["reason"] == "orders.get: HTTP 404 Not Found (order 1000012)"
    assert by_type["store-mismatch"]["reason"] == "SKU Test009 is not on order CS1000012"
    assert by_type["store-refused"]["reason"].startswith("shipments.create: HTTP 400")
    assert by_type["store-unauthorized"]["reason"] == "orders.get: HTTP 401 Unauthorized"
    assert by_type["store-unreachable"]["reason"] == (
        "gave up after 2 attempts: orders.get: HTTP 503 Service Unavailable"
    )
    assert by_type["store-unreachable"]["attempts"] == 2


def assert_the_messages_own_faults(by_type: dict[str, Any]) -> None:
    assert by_type["unknown-client"]["client_id"] == "NOPE"
    assert "lines.0.quantity" in by_type["invalid-message"]["reason"]
    assert by_type["invalid-message"]["client_id"] == "ACME"  # read from the body

def assert_support_reads_them(
    env: dict[str, str], by_type: dict[str, Any], open_count: int
) -> None:
    """What support reads: a table, and each one in plain words with what to do."""
    table = cli(env, "dlq", "list")
    assert table.exit_code == 0, table.output
    assert table.stdout.splitlines()[0].split() == [
        "ID", "DEAD-LETTERED", "(UTC)", "CONSUMER", "CLIENT", "ERROR", "TYPE", "REASON", "STATUS",
    ]  # fmt: skip
    for error_type in by_type:
        assert error_type in table.stdout
    assert f"{open_count} open dead letter(s)" in table.stdout

    unauthorized = cli(env, "dlq", "show", str(by_type["store-unauthorized"]["id"]))
    assert unauthorized.exit_code == 0, unauthorized.output
    text = unauthorized.stdout
    assert "What happened: The shipment-lodged consumer could not process this shipment.lodged " \
        "message for client ACME: the store refused the API credentials." in text
    assert "What to do: The store refused the API credentials (HTTP 401)" in text
    assert "cscart-fm dlq replay" in text
    assert "Attempts: 1" in text
    assert '"shipment_ref": "S-401"' in text



@pytest.mark.broker
def test_a_dead_letter_of_each_error_type_appears_with_its_reason(
    broker_url: str, state_url: str
) -> None:
    declare(broker_url)
    # The broker's own dead letter: a message that kept coming back (a consumer killed
    # holding it) past x-delivery-limit.
    publish_json(broker_url, shipment_event("S-LIMIT"), "shipment.lodged")
    exceed_delivery_limit(broker_url, WORK)
    wait_for(lambda: depth(broker_url, DLQ) == 1)

    handler = Planned(error_plan())
    with running(handler, broker_url, max_attempts=2):
        for ref in ("S-404", "S-MISMATCH", "S-400", "S-401", "S-503"):
            publish_json(broker_url, shipment_event(ref), "shipment.lodged")
        publish_json(broker_url, shipment_event("S-NOPE", client_id="NOPE"), "shipment.lodged")
        bad = shipment_event("S-BAD", lines=[{"sku": "Test001", "quantity": "2"}])
        publish_json(broker_url, bad, "shipment.lodged")
        wait_for(lambda: depth(broker_url, DLQ) == 8, timeout=30)

    env = support_env(broker_url, state_url)
    listed = dlq_json(env, "list")
    assert depth(broker_url, DLQ) == 0  # collected: now kept in the state store
    by_type = {row["error_type"]: row for row in listed}
    assert set(by_type) == {
        "not-found",
        "store-mismatch",
        "store-refused",
        "store-unauthorized",
        "store-unreachable",
        "unknown-client",
        "invalid-message",
        "delivery-limit",
    }
    assert_the_runtimes_reasons(by_type)
    assert_the_messages_own_faults(by_type)
    assert "too many times" in by_type["delivery-limit"]["reason"]
    assert by_type["delivery-limit"]["attempts"] == 21  # past x-delivery-limit 20
    assert all(row["status"] == "open" and row["consumer"] == "shipment-lodged" for row in listed)

    assert_support_reads_them(env, by_type, open_count=8)

    limit = dlq_json(env, "show", str(by_type["delivery-limit"]["id"]))
    assert limit["x_death"][0]["reason"] == "delivery_limit"
    assert limit["x_death"][0]["queue"] == WORK
    assert limit["original_exchange"] == "fm.events"
    assert limit["original_routing_key"] == "shipment.lodged"
    assert "developers" in limit["action"]
    limit_text = cli(env, "dlq", "show", str(by_type["delivery-limit"]["id"])).stdout
    assert "History (x-death" in limit_text and "delivery_limit" in limit_text

    exhausted = dlq_json(env, "show", str(by_type["store-unreachable"]["id"]))
    assert exhausted["attempts"] == 2
    assert any(d["reason"] == "expired" for d in exhausted["x_death"])  # its delay queue

    stats = dlq_json(env, "stats")
    assert stats["by_status"]["open"] == 8
    assert stats["open_by_client"] == {"ACME": 7, "NOPE": 1}

    assert len(dlq_json(env, "list", "--type", "not-found")) == 1
    assert len(dlq_json(env, "list", "--client", "NOPE")) == 1
    assert len(dlq_json(env, "list", "--consumer", "stock-snapshot")) == 0
    assert len(dlq_json(env, "list", "--since", "2000-01-01")) == 8
    assert len(dlq_json(env, "list", "--until", "2000-01-01")) == 0


def test_each_error_type_the_runtime_dead_letters_is_listed_with_its_reason(
    memory_url: str, sqlite_url: str
) -> None:
    """The rules of the test above that need no RabbitMQ, on the in-process broker: each
    error type the runtime dead-letters (a transient one at its last attempt, published as
    its delay queue gives it back) is collected, listed with its reason, shown in plain words
    with what to do, counted and filtered. The broker's own dead letter (``delivery-limit``)
    and the ``x-death`` history stay with the test above."""
    declare(memory_url)
    handler = Planned(error_plan())
    with running(handler, memory_url, max_attempts=2):
        for ref in ("S-404", "S-MISMATCH", "S-400", "S-401"):
            publish_json(memory_url, shipment_event(ref), "shipment.lodged")
        publish_attempt(memory_url, shipment_event("S-503"), "shipment.lodged", 2)
        publish_json(memory_url, shipment_event("S-NOPE", client_id="NOPE"), "shipment.lodged")
        bad = shipment_event("S-BAD", lines=[{"sku": "Test001", "quantity": "2"}])
        publish_json(memory_url, bad, "shipment.lodged")
        wait_for(lambda: depth(memory_url, DLQ) == 7, timeout=30)

    env = support_env(memory_url, sqlite_url)
    listed = dlq_json(env, "list")
    assert depth(memory_url, DLQ) == 0  # collected: now kept in the state store
    by_type = {row["error_type"]: row for row in listed}
    assert set(by_type) == {
        "not-found",
        "store-mismatch",
        "store-refused",
        "store-unauthorized",
        "store-unreachable",
        "unknown-client",
        "invalid-message",
    }
    assert_the_runtimes_reasons(by_type)
    assert handler.calls["S-503"] == 1  # its last attempt only: nothing retried here
    assert_the_messages_own_faults(by_type)
    assert all(row["status"] == "open" and row["consumer"] == "shipment-lodged" for row in listed)

    assert_support_reads_them(env, by_type, open_count=7)

    stats = dlq_json(env, "stats")
    assert stats["by_status"]["open"] == 7
    assert stats["open_by_client"] == {"ACME": 6, "NOPE": 1}

    assert len(dlq_json(env, "list", "--type", "not-found")) == 1
    assert len(dlq_json(env, "list", "--client", "NOPE")) == 1
    assert len(dlq_json(env, "list", "--consumer", "stock-snapshot")) == 0
    assert len(dlq_json(env, "list", "--since", "2000-01-01")) == 7
    assert len(dlq_json(env, "list", "--until", "2000-01-01")) == 0


def test_dead_letters_the_broker_wrote_x_death_on_are_read_from_it(
    memory_url: str, sqlite_url: str
) -> None:
    """The reading of RabbitMQ's own headers the first test above rests on, with the headers
    as RabbitMQ writes them (kombu's in-process broker writes none): a message the broker
    dead-lettered itself past ``x-delivery-limit`` is a delivery-limit dead letter for the
    developers, its ``x-death`` shown as the history; a retry that came back from its delay
    queue keeps the runtime's reason, its ``expired`` x-death beside it."""
    at = datetime(2026, 11, 23, 4, 0, tzinfo=UTC)
    limit_deaths = [
        {"count": 1, "exchange": "fm.events", "queue": WORK, "reason": "delivery_limit",
         "routing-keys": ["shipment.lodged"], "time": at},
    ]
    delay_deaths = [
        {"count": 1, "exchange": "", "queue": "cscart.shipment-lodged.retry.1s",
         "reason": "expired", "routing-keys": ["cscart.shipment-lodged.retry.1s"], "time": at},
    ]
    props = {"content_type": "application/json", "delivery_mode": 2}
    letters = [
        record_of(
            "shipment-lodged", json.dumps(shipment_event("S-LIMIT")).encode(),
            {"x-death": limit_deaths, "x-first-death-exchange": "fm.events",
             "x-first-death-queue": WORK, "x-first-death-reason": "delivery_limit"},
            {**props, "message_id": "evt-S-LIMIT"},
        ),
        record_of(
            "shipment-lodged", json.dumps(shipment_event("S-503")).encode(),
            _runtime_headers(**{
                "cscart-error-type": "store-unreachable", "cscart-attempts": 2,
                "cscart-reason": "gave up after 2 attempts: orders.get: HTTP 503",
                "x-death": delay_deaths, "x-first-death-reason": "expired",
            }),
            {**props, "message_id": "evt-S-503"},
        ),
    ]
    store = open_state(sqlite_url)
    try:
        with store.transaction() as conn:
            for row in letters:
                assert store.insert_ignore(conn, dl.dead_letters, row)
    finally:
        store.close()

    env = support_env(memory_url, sqlite_url)
    by_type = {row["error_type"]: row for row in dlq_json(env, "list")}
    assert set(by_type) == {"delivery-limit", "store-unreachable"}
    assert "too many times" in by_type["delivery-limit"]["reason"]
    assert by_type["delivery-limit"]["attempts"] == 21  # past x-delivery-limit 20
    assert by_type["delivery-limit"]["client_id"] == "ACME"  # read from the body

    limit = dlq_json(env, "show", str(by_type["delivery-limit"]["id"]))
    assert limit["x_death"][0]["reason"] == "delivery_limit"
    assert limit["x_death"][0]["queue"] == WORK
    assert limit["original_exchange"] == "fm.events"
    assert limit["original_routing_key"] == "shipment.lodged"
    assert "developers" in limit["action"]
    limit_text = cli(env, "dlq", "show", str(by_type["delivery-limit"]["id"])).stdout
    assert "History (x-death" in limit_text and "delivery_limit" in limit_text

    exhausted = dlq_json(env, "show", str(by_type["store-unreachable"]["id"]))
    assert exhausted["attempts"] == 2
    assert exhausted["reason"] == "gave up after 2 attempts: orders.get: HTTP 503"
    assert any(d["reason"] == "expired" for d in exhausted["x_death"])  # its delay queue


def test_personal_data_is_masked_in_list_and_show_unless_revealed(
    bus_url: str, sqlite_url: str
) -> None:
    declare(bus_url)
    handler = Planned()
    with running(handler, bus_url):
        # An order published on the shipment route: invalid here, and full of personal data.
        publish_json(bus_url, order_imported_body(), "shipment.lodged")
        wait_for(lambda: depth(bus_url, DLQ) == 1)
    env = support_env(bus_url, sqlite_url)
    listing = cli(env, "dlq", "list")
    [row] = dlq_json(env, "list")
    shown = cli(env, "dlq", "show", str(row["id"]))
    shown_json = dlq_json(env, "show", str(row["id"]))
    for output in (listing.stdout, shown.stdout, json.dumps(shown_json)):
        for personal in ("jane@example.com", "Jane Citizen", "1 George St", "Sydney", "0400 000 123"):
            assert personal not in output
    assert "j***@example.com" in shown.stdout
    assert shown_json["payload"]["ship_to"]["name"] == "J*** C***"
    assert shown_json["payload"]["ship_to"]["phone"] == "***23"
    assert shown_json["payload"]["ship_to"]["country"] == "AU"  # kept: not personal
    assert shown_json["payload"]["lines"][0]["sku"] == "Test001"
    assert "personal data masked" in shown.stdout

    revealed = cli(env, "dlq", "show", str(row["id"]), "--reveal")
    assert "jane@example.com" in revealed.stdout and "1 George St" in revealed.stdout


# --- replay ------------------------------------------------------------------------------------


def test_replay_of_one_reaches_the_consumer_and_succeeds_once_the_cause_is_fixed(
    bus_url: str, state_url: str
) -> None:
    declare(bus_url)
    env = support_env(bus_url, state_url)
    store = open_state(state_url)
    with StoreEmulator() as emu, running(
        StockChecker(emu), bus_url, middleware=[DeadLetterResolver(store)]
    ) as runtime:
        handler: StockChecker = runtime.handler  # type: ignore[assignment]
        publish_json(bus_url, stock_event("snap-1", "NEW-1"), "stock.snapshot")
        wait_for(lambda: depth(bus_url, STOCK_DLQ) == 1)
        [first] = dlq_json(env, "list")
        assert first["error_type"] == "not-found"
        assert "NEW-1" in first["reason"]

        # Replayed before the fix: it fails again and comes back as a new dead letter that
        # knows it was replayed (our replay counter) and from which one.
        result = cli(env, "dlq", "replay", str(first["id"]))
        assert result.exit_code == 0, result.output
        assert f"replayed {first['id']} (stock-snapshot, ACME, not-found)" in result.stdout
        wait_for(lambda: depth(bus_url, STOCK_DLQ) == 1)
        [again] = dlq_json(env, "list")
        assert again["id"] != first["id"]
        again_details = dlq_json(env, "show", str(again["id"]))
        assert again_details["previous_replays"] == 1
        assert again_details["replay_of"] == first["id"]
        assert again_details["headers"]["cscart-replay-count"] == 1
        assert dlq_json(env, "show", str(first["id"]))["status"] == "replayed"

        emu.add_product("NEW-1", 0)  # support fixed the cause in the store
        result = cli(env, "dlq", "replay", str(again["id"]))
        assert result.exit_code == 0, result.output
        wait_for(lambda: handler.applied == ["snap-1"])
        assert emu.product_by_code("NEW-1")["amount"] == 7  # type: ignore[index]

    # The success resolved both dead letters of that snapshot.
    states = {row.id: row for row in rows(state_url, statuses=dl.STATUSES)}
    assert states[first["id"]].status == "resolved"
    assert states[again["id"]].status == "resolved"
    assert states[again["id"]].replay_count == 1
    assert states[again["id"]].last_replayed_at is not None
    assert states[again["id"]].resolved_by == "stock-snapshot:snap-1"
    assert dlq_json(env, "list") == []
    store.close()


def test_replay_of_a_filter_replays_only_what_it_selects(
    bus_url: str, sqlite_url: str
) -> None:
    declare(bus_url)
    env = support_env(bus_url, sqlite_url)
    store = open_state(sqlite_url)
    missing = NotFound("orders.get: HTTP 404 Not Found")
    handler = Planned({ref: missing for ref in ("A1", "A2", "A3", "B1", "B2")})
    with running(handler, bus_url, middleware=[DeadLetterResolver(store)]):
        for ref in ("A1", "A2", "A3"):
            publish_json(bus_url, shipment_event(ref), "shipment.lodged")
        for ref in ("B1", "B2"):
            publish_json(bus_url, shipment_event(ref, client_id="BETA"), "shipment.lodged")
        wait_for(lambda: depth(bus_url, DLQ) == 5)

        refused = cli(env, "dlq", "replay")
        assert refused.exit_code == 2
        assert "say which dead letters to replay" in refused.stderr

        dry = cli(env, "dlq", "replay", "--client", "ACME", "--dry-run")
        assert dry.exit_code == 0 and "3 dead letter(s) would be replayed" in dry.stdout

        handler.fix()  # e.g. the orders were created in the store
        result = dlq_json(env, "replay", "--client", "ACME", "--type", "not-found")
        assert len(result["replayed"]) == 3 and result["failed"] == {}
        wait_for(lambda: handler.created == {"A1", "A2", "A3"})
        wait_for(lambda: {r["client_id"] for r in dlq_json(env, "list")} == {"BETA"})
    assert handler.calls == {"A1": 2, "A2": 2, "A3": 2, "B1": 1, "B2": 1}
    wait_for(lambda: [r.status for r in rows(sqlite_url, client_id="ACME")] == ["resolved"] * 3)
    assert [r.status for r in rows(sqlite_url, client_id="BETA")] == ["open"] * 2
    store.close()


def test_discard_keeps_the_reason_and_who(bus_url: str, state_url: str) -> None:
    declare(bus_url)
    env = support_env(bus_url, state_url)
    handler = Planned({"D1": StoreMismatch("more shipped than ordered for Test001")})
    with running(handler, bus_url):
        publish_json(bus_url, shipment_event("D1"), "shipment.lodged")
        wait_for(lambda: depth(bus_url, DLQ) == 1)
    [row] = dlq_json(env, "list")

    no_reason = cli(env, "dlq", "discard", str(row["id"]))
    assert no_reason.exit_code == 2 and "--reason is required" in no_reason.stderr

    result = cli(
        env, "dlq", "discard", str(row["id"]), "--reason", "FM resent it as D1b", "--by", "alice"
    )
    assert result.exit_code == 0, result.output
    assert "discarded" in result.stdout and "FM resent it as D1b" in result.stdout

    assert dlq_json(env, "list") == []
    [kept] = dlq_json(env, "list", "--status", "discarded")
    assert kept["id"] == row["id"]
    details = dlq_json(env, "show", str(row["id"]))
    assert details["status"] == "discarded"
    assert details["discard_reason"] == "FM resent it as D1b"
    assert details["discarded_by"] == "alice"
    assert details["discarded_at"]
    text = cli(env, "dlq", "show", str(row["id"])).stdout
    assert "Discarded: by alice" in text and "because: FM resent it as D1b" in text

    # Neither --all nor an id replays it by accident; --force does.
    assert dlq_json(env, "replay", "--all")["replayed"] == []
    refused = cli(env, "dlq", "replay", str(row["id"]))
    assert refused.exit_code == 2 and "is discarded" in refused.stderr
    assert dlq_json(env, "stats")["by_status"]["discarded"] == 1
    assert depth(bus_url, WORK) == 0


@pytest.mark.broker
def test_replay_under_a_broker_restart_loses_nothing_and_doubles_nothing(
    broker_url: str, sqlite_url: str
) -> None:
    """Connections are dropped twice while 120 dead letters are replayed (the broker is shared
    with other test runs, so its connections on our vhost are closed rather than the whole
    node stopped): each message reaches the consumer and succeeds, each dead letter is
    replayed exactly once, and the consumer's effect happens once per shipment."""
    declare(broker_url)
    count = 120
    refs = [f"R{i:03d}" for i in range(count)]
    store = open_state(sqlite_url)
    handler = Planned({ref: NotFound("orders.get: HTTP 404 Not Found") for ref in refs})
    vhost = broker_url.rsplit("/", 1)[1]

    class CountingPublisher(Publisher):
        reconnects = 0

        def _reset(self, channel: Any = None) -> None:
            CountingPublisher.reconnects += 1
            super()._reset(channel)

    def restart_broker_connections() -> None:
        subprocess.run(
            ["rabbitmqctl", "close_all_connections", "-p", vhost, "test: broker restart"],
            check=True,
            capture_output=True,
            timeout=60,
        )

    with running(
        handler, broker_url, middleware=[DeadLetterResolver(store)], heartbeat=5
    ) as runtime:
        for ref in refs:
            publish_json(broker_url, shipment_event(ref), "shipment.lodged")
        wait_for(lambda: depth(broker_url, DLQ) == count, timeout=60)
        assert collect(store, broker_url).total_new == count
        handler.fix()

        letters = find(store, Filter(statuses=["open"]))
        publisher = CountingPublisher(broker_url)

        def slow_and_interrupted(letter: dl.DeadLetter) -> None:
            if letter.id in (letters[30].id, letters[80].id):
                restart_broker_connections()  # the next replays meet a dropped connection
            time.sleep(0.01)

        report = replay(store, publisher, letters, on_replayed=slow_and_interrupted)
        publisher.close()
        assert report.failed == {}
        assert len(report.replayed) == count
        wait_for(lambda: runtime.ready, timeout=40)
        wait_for(lambda: handler.created == set(refs), timeout=60)
        wait_for(lambda: depth(broker_url, WORK) == 0, timeout=30)

    assert CountingPublisher.reconnects >= 2  # the drops did hit the replay
    # Nothing lost: every message came back and succeeded; nothing dead-lettered again.
    assert handler.created == set(refs)
    assert depth(broker_url, DLQ) == 0
    stored = find(store, Filter(statuses=dl.STATUSES))
    assert len(stored) == count  # no dead letter stored twice
    assert {row.status for row in stored} == {"resolved"}
    # Nothing doubled: each dead letter was replayed once; the effect happened once per
    # shipment (a redelivery after a dropped connection is a no-op, as in the real consumer).
    assert {row.replay_count for row in stored} == {1}
    replayed_deliveries = sum(handler.calls.values()) - count  # minus the first attempts
    assert count <= replayed_deliveries <= count + 2 * 5  # at most prefetch+1 per drop
    store.close()


# --- resolve and collection ----------------------------------------------------------------------


def test_a_dead_letter_whose_key_later_succeeds_is_resolved(
    bus_url: str, sqlite_url: str
) -> None:
    """FM resends the shipment (a new event, the same shipment_ref) after fixing it: the
    success resolves the dead letter through the middleware ``cscart-fm run`` installs."""
    declare(bus_url)
    env = support_env(bus_url, sqlite_url)
    services = make_services(bus_url, sqlite_url, [client_doc("http://127.0.0.1:9")])
    around = middleware(JOBS.named("shipment-lodged"), services)
    assert any(isinstance(hook, DeadLetterResolver) for hook in around)
    handler = Planned({"K1": [NotFound("orders.get: HTTP 404 Not Found")]})
    try:
        with running(handler, bus_url, middleware=around):
            publish_json(bus_url, shipment_event("K1"), "shipment.lodged")
            publish_json(bus_url, shipment_event("K2"), "shipment.lodged")
            wait_for(lambda: depth(bus_url, DLQ) == 1)
            [row] = dlq_json(env, "list")
            assert row["status"] == "open"
            publish_json(
                bus_url, shipment_event("K1", event_id="evt-K1-resent"), "shipment.lodged"
            )
            wait_for(lambda: "K1" in handler.created)
            wait_for(lambda: dlq_json(env, "list") == [])
    finally:
        services.close()
    [resolved] = dlq_json(env, "list", "--status", "resolved")
    details = dlq_json(env, "show", str(resolved["id"]))
    assert details["resolved_by"] == "shipment-lodged:evt-K1-resent"
    assert details["key"] == "shipment:ACME:K1"
    assert "Resolved:" in cli(env, "dlq", "show", str(resolved["id"])).stdout


@pytest.mark.broker
def test_collection_survives_a_crash_between_commit_and_ack(
    broker_url: str, state_url: str
) -> None:
    declare(broker_url)
    handler = Planned({ref: NotFound("no order") for ref in ("C1", "C2", "C3")})
    with running(handler, broker_url):
        for ref in ("C1", "C2", "C3"):
            publish_json(broker_url, shipment_event(ref), "shipment.lodged")
        wait_for(lambda: depth(broker_url, DLQ) == 3)
    store = open_state(state_url)

    def crash() -> None:
        raise RuntimeError("killed before the ack")

    with pytest.raises(RuntimeError):
        collect(store, broker_url, ["shipment-lodged"], before_ack=crash)
    assert len(find(store, Filter())) == 3  # stored...
    wait_for(lambda: depth(broker_url, DLQ) == 3)  # ...and still in the queue
    again = collect(store, broker_url)
    assert again.new == {"shipment-lodged": 0}
    assert again.already_stored == {"shipment-lodged": 3}
    assert depth(broker_url, DLQ) == 0
    assert len(find(store, Filter())) == 3  # never twice
    store.close()


def test_a_dead_letter_collected_again_after_a_crash_before_its_ack_is_not_stored_twice(
    memory_url: str, state_url: str
) -> None:
    """The collector's rule the test above rests on, on the in-process broker: a batch is
    committed before it is acknowledged, so a crash in between leaves it stored; collected
    again (RabbitMQ gives it back; here it is put back as it was), each is recognised by its
    fingerprint: counted as already stored, and acknowledged."""
    declare(memory_url)
    handler = Planned({ref: NotFound("no order") for ref in ("C1", "C2", "C3")})
    with running(handler, memory_url):
        for ref in ("C1", "C2", "C3"):
            publish_json(memory_url, shipment_event(ref), "shipment.lodged")
        wait_for(lambda: depth(memory_url, DLQ) == 3)
    dead = drain(memory_url, DLQ)  # kept, to be given back as the broker would
    put_back(memory_url, DLQ, dead)
    store = open_state(state_url)

    def crash() -> None:
        raise RuntimeError("killed before the ack")

    with pytest.raises(RuntimeError):
        collect(store, memory_url, ["shipment-lodged"], before_ack=crash)
    assert len(find(store, Filter())) == 3  # stored...
    put_back(memory_url, DLQ, dead)  # ...and, the acks never sent, in the queue again
    again = collect(store, memory_url)
    assert again.new == {"shipment-lodged": 0}
    assert again.already_stored == {"shipment-lodged": 3}
    assert depth(memory_url, DLQ) == 0
    assert len(find(store, Filter())) == 3  # never twice
    store.close()


def test_dlq_commands_work_on_what_is_stored_when_the_broker_is_unreachable(
    bus_url: str, sqlite_url: str
) -> None:
    declare(bus_url)
    handler = Planned({"U1": NotFound("no order")})
    with running(handler, bus_url):
        publish_json(bus_url, shipment_event("U1"), "shipment.lodged")
        wait_for(lambda: depth(bus_url, DLQ) == 1)
    assert len(dlq_json(support_env(bus_url, sqlite_url), "list")) == 1
    offline = support_env("amqp://guest:guest@127.0.0.1:1//", sqlite_url)
    result = cli(offline, "dlq", "list")
    assert result.exit_code == 0
    assert "could not collect new dead letters" in result.stderr
    assert "not-found" in result.stdout
    missing = cli(offline, "dlq", "show", "999", "--no-collect")
    assert missing.exit_code == 2 and "no dead letter 999" in missing.stderr


# --- one desk for the command line and the console ------------------------------------------------


def test_cli_replays_and_discards_are_audited_and_on_the_consoles_audit_page(
    bus_url: str, state_url: str, tmp_path: Path
) -> None:
    """``dlq replay`` and ``dlq discard`` go through the desk the console uses: each leaves
    its audit row (who: ``--by`` or the OS user; from where: the command line), and the
    console shows them with its own."""
    declare(bus_url)
    env = support_env(bus_url, state_url)
    handler = Planned({ref: NotFound("orders.get: HTTP 404") for ref in ("AU1", "AU2")})
    with running(handler, bus_url):
        for ref in ("AU1", "AU2"):
            publish_json(bus_url, shipment_event(ref), "shipment.lodged")
        wait_for(lambda: depth(bus_url, DLQ) == 2)
        by_ref = {row["message_id"]: row["id"] for row in dlq_json(env, "list")}
        replayed, discarded = by_ref["evt-AU1"], by_ref["evt-AU2"]
        handler.fix()
        assert cli(env, "dlq", "replay", str(replayed)).exit_code == 0
        wait_for(lambda: handler.created == {"AU1"})
        result = cli(
            env, "dlq", "discard", str(discarded), "--reason", "FM resent it as AU2b", "--by", "alice"
        )
        assert result.exit_code == 0, result.output

    store = open_state(state_url)
    try:
        entries = {entry.action: entry for entry in audit.page(store)[0]}
        assert set(entries) == {"replay", "discard"}
        replay_entry, discard_entry = entries["replay"], entries["discard"]
        assert (replay_entry.who, replay_entry.via, replay_entry.letter_id) == (
            os_user(),
            "cli",
            replayed,
        )
        assert replay_entry.result == "replayed: confirmed by the broker"
        assert "shipment-lodged, ACME, not-found, was open" in replay_entry.target
        assert (discard_entry.who, discard_entry.via, discard_entry.letter_id) == (
            "alice",
            "cli",
            discarded,
        )
        assert (discard_entry.reason, discard_entry.result) == ("FM resent it as AU2b", "discarded")
        assert discard_entry.remote_addr is None

        with served(make_console(store, tmp_path)) as base:
            http = login(base, "victor")
            page = http.get(base + "/audit", timeout=10).text
            rows = re.findall(r'<tr class="audit-(\w+) via-(\w+)">(.*?)</tr>', page, re.S)
            shown = {action: (via, text) for action, via, text in rows}
            assert shown["replay"][0] == "cli" and shown["discard"][0] == "cli"
            assert os_user() in shown["replay"][1]
            assert "confirmed by the broker" in shown["replay"][1]
            assert "alice" in shown["discard"][1] and "FM resent it as AU2b" in shown["discard"][1]
            assert shown["login"][0] == "console"  # the viewer's own login, beside them
            history = http.get(base + f"/letters/{discarded}", timeout=10).text
            assert "Command line: alice — discard: discarded." in history
    finally:
        store.close()


def test_the_cli_and_the_console_refuse_alike_in_the_same_words(
    bus_url: str, sqlite_url: str, tmp_path: Path
) -> None:
    """A discard without a reason, and a replay or a discard of a resolved dead letter: both
    front ends refuse them through the desk, with its message, and nothing changes."""
    declare(bus_url)
    env = support_env(bus_url, sqlite_url)
    handler = Planned({ref: NotFound("orders.get: HTTP 404") for ref in ("SR1", "SR2")})
    with running(handler, bus_url):
        for ref in ("SR1", "SR2"):
            publish_json(bus_url, shipment_event(ref), "shipment.lodged")
        wait_for(lambda: depth(bus_url, DLQ) == 2)
    by_ref = {row["message_id"]: row["id"] for row in dlq_json(env, "list")}
    resolved, open_ = by_ref["evt-SR1"], by_ref["evt-SR2"]
    store = open_state(sqlite_url)
    try:
        # FM resent SR1 and it went through: its dead letter is resolved.
        DeadLetterResolver(store)(
            "shipment-lodged", parse_event(json.dumps(shipment_event("SR1", event_id="evt-b")))
        )
        refusals = [
            (
                REASON_REQUIRED,
                ("discard", str(open_), "--reason", "  "),
                (f"/letters/{open_}/discard", {"reason": "  "}),
            ),
            (
                f"Dead letter #{resolved} is resolved: nothing replayed.",
                ("replay", str(resolved)),
                (f"/letters/{resolved}/replay", {}),
            ),
            (
                f"Dead letter #{resolved} is resolved: nothing discarded.",
                ("discard", str(resolved), "--reason", "a duplicate"),
                (f"/letters/{resolved}/discard", {"reason": "a duplicate"}),
            ),
        ]
        with served(make_console(store, tmp_path)) as base:
            http = login(base, "olivia")
            for message, args, (path, form) in refusals:
                from_cli = cli(env, "dlq", *args)
                assert from_cli.exit_code == 2, from_cli.output
                assert f"cscart-fm: {message}" in from_cli.stderr
                page = path.rsplit("/", 1)[0]
                answer = post(http, base, path, form, csrf_from=page)
                assert answer.status_code == 303 and answer.headers["Location"] == page
                assert html.escape(message) in http.get(base + page, timeout=10).text
        assert dl.get(store, resolved).status == "resolved"  # type: ignore[union-attr]
        letter = dl.get(store, open_)
        assert letter is not None and (letter.status, letter.replay_count) == ("open", 0)
        assert {entry.action for entry in audit.page(store)[0]} == {"login"}  # nothing done
        assert depth(bus_url, WORK) == 0
    finally:
        store.close()


# --- the storage itself (SQLite and PostgreSQL) ----------------------------------------------------


def _runtime_headers(**extra: Any) -> dict[str, Any]:
    return {
        "schema": "shipment.lodged/1",
        "cscart-error-type": "not-found",
        "cscart-reason": "orders.get: HTTP 404 for jane@example.com",
        "cscart-action": "Create the order, then replay.",
        "cscart-consumer": "shipment-lodged",
        "cscart-attempts": 1,
        "cscart-client-id": "ACME",
        "cscart-dead-lettered-at": "2026-11-23T04:00:00+00:00",
        "cscart-original-exchange": "fm.events",
        "cscart-original-routing-key": "shipment.lodged",
        **extra,
    }


def test_storage_deduplicates_filters_and_resolves(state_url: str) -> None:
    store = open_state(state_url)
    body = json.dumps(shipment_event("Z1")).encode()
    props = {"message_id": "evt-Z1", "content_type": "application/json"}
    first = record_of("shipment-lodged", body, _runtime_headers(), props)
    redelivered = record_of(
        "shipment-lodged", body, {**_runtime_headers(), "x-delivery-count": 1}, props
    )
    failed_again = record_of(
        "shipment-lodged",
        body,
        _runtime_headers(**{"cscart-replay-count": 1, "cscart-replay-of": 1}),
        props,
    )
    assert first["fingerprint"] == redelivered["fingerprint"]
    assert first["fingerprint"] != failed_again["fingerprint"]
    assert first["key"] == "shipment:ACME:Z1"
    assert first["reason"] == "orders.get: HTTP 404 for j***@example.com"
    with store.transaction() as conn:
        assert store.insert_ignore(conn, dl.dead_letters, first)
        assert not store.insert_ignore(conn, dl.dead_letters, redelivered)
        assert store.insert_ignore(conn, dl.dead_letters, failed_again)
        other = record_of(
            "shipment-lodged",
            json.dumps(shipment_event("Z2", client_id="BETA")).encode(),
            _runtime_headers(
                **{"cscart-dead-lettered-at": "2026-11-25T04:00:00+00:00", "cscart-client-id": "BETA"}
            ),
            {"message_id": "evt-Z2"},
        )
        store.insert_ignore(conn, dl.dead_letters, other)

    assert len(find(store, Filter())) == 3
    assert len(find(store, Filter(client_id="BETA"))) == 1
    assert len(find(store, Filter(since=datetime(2026, 11, 24, tzinfo=UTC)))) == 1
    assert len(find(store, Filter(until=datetime(2026, 11, 24, tzinfo=UTC)))) == 2
    [z2] = find(store, Filter(client_id="BETA"))
    assert z2.dead_lettered_at == datetime(2026, 11, 25, 4, tzinfo=UTC)
    assert z2.body == json.dumps(shipment_event("Z2", client_id="BETA")).encode()

    resolver = DeadLetterResolver(store)
    resolver("shipment-lodged", parse_event(json.dumps(shipment_event("Z1", event_id="e9"))))
    statuses = {row.key: row.status for row in find(store, Filter())}
    assert statuses == {"shipment:ACME:Z1": "resolved", "shipment:BETA:Z2": "open"}
    assert len(find(store, Filter(statuses=["resolved"]))) == 2
    # Discarded ones stay discarded whatever succeeds later.
    assert dl.discard(store, [z2.id], reason="duplicate", by="bob") == [z2.id]
    resolver("shipment-lodged", parse_event(json.dumps(shipment_event("Z2", client_id="BETA"))))
    assert dl.get(store, z2.id).status == "discarded"  # type: ignore[union-attr]
    with store.engine.connect() as conn:
        indexes = {ix["name"] for ix in sa.inspect(conn).get_indexes("dead_letters")}
    assert "ix_dead_letters_key_status" in indexes
    store.close()


def test_keys_and_masking() -> None:
    tick = {"type": "order-poll.tick", "version": 1, "event_id": "t1", "client_id": "ACME"}
    assert key_of_document(tick) == "order-poll:ACME"
    assert key_of_document(stock_event("s1", "X")) == "stock:ACME:s1"
    assert key_of_document(order_imported_body()) is None  # FM's message: no job reads it
    assert key_of_document({"type": "shipment.lodged", "client_id": "ACME"}) is None
    assert key_of_document(["not", "an", "object"]) is None
    event = parse_event(json.dumps(shipment_event(" S9 ")))
    key_of_event = JOBS.dead_letter_key_of_event("shipment-lodged", event)
    assert key_of_event == key_of_document(shipment_event("S9")) == "shipment:ACME:S9"

    masked = mask_payload(order_imported_body())
    assert masked["customer"] == {"name": "J*** C***", "email": "j***@example.com", "phone": "***23"}
    assert masked["bill_to"]["address1"] == "***"
    assert masked["bill_to"]["postcode"] == "***"
    assert masked["bill_to"]["state"] == "NSW"
    assert masked["notes"] == "***"
    assert masked["totals"] == order_imported_body()["totals"]


# --- end to end with the real shipment consumer ---------------------------------------------------


def dead_letter_shipments_of_missing_orders(
    url: str, env: dict[str, str], emu: StoreEmulator, orders: list[int], prefix: str
) -> list[dict[str, Any]]:
    """Shipments for orders the store does not have yet, dead-lettered (not-found) and
    listed; then support has the orders created in the store."""
    for order_id in orders:
        body = shipment_event(
            f"{prefix}-{order_id}", order_no=f"CS{order_id}", cart_order_id=order_id
        )
        publish_json(url, body, "shipment.lodged")
    wait_for(lambda: depth(url, DLQ) == len(orders), timeout=60)
    listed: list[dict[str, Any]] = dlq_json(env, "list")
    assert {row["error_type"] for row in listed} == {"not-found"}
    assert all(emu.shipments_for(order_id) == [] for order_id in orders)
    for order_id in orders:
        emu.add_order(order_id=order_id, products=[{"product_code": "Test001", "amount": 2}])
    return listed


@pytest.mark.broker
def test_end_to_end_replay_with_the_real_shipment_consumer(
    broker_url: str, sqlite_url: str
) -> None:
    """Shipments for orders the store does not have yet are dead-lettered (not-found); the
    orders are created; ``dlq replay --all`` sends them back while the broker drops every
    connection mid-way; exactly one shipment per order results, and the dead letters end
    resolved through the hook Services installs."""
    declare(broker_url)
    env = support_env(broker_url, sqlite_url)
    orders = list(range(1000100, 1000110))
    vhost = broker_url.rsplit("/", 1)[1]
    emu = StoreEmulator(api_user=API_USER, api_key=API_KEY)
    emu.add_product("Test001", 100)
    with emu:
        services = make_services(broker_url, sqlite_url, [client_doc(emu.url)])
        try:
            with consumer(services, "shipment-lodged"):
                listed = dead_letter_shipments_of_missing_orders(broker_url, env, emu, orders, "E2E")
                ok = metrics.MESSAGES.labels("shipment-lodged", "ok")
                before = ok._value.get()
                replayer = threading.Thread(
                    target=cli, args=(env, "dlq", "replay", "--all"), daemon=True
                )
                replayer.start()
                wait_for(lambda: ok._value.get() > before, timeout=30)
                subprocess.run(
                    ["rabbitmqctl", "close_all_connections", "-p", vhost, "test: restart"],
                    check=True,
                    capture_output=True,
                    timeout=60,
                )
                replayer.join(timeout=120)
                # Whatever the drop interrupted is still open: replaying again is safe.
                cli(env, "dlq", "replay", "--all")
                wait_for(
                    lambda: all(len(emu.shipments_for(o)) == 1 for o in orders), timeout=60
                )
                wait_for(
                    lambda: len(dlq_json(env, "list", "--status", "resolved")) == len(orders),
                    timeout=30,
                )
                # Replaying a resolved one again (forced) changes nothing in the store.
                first = listed[0]["id"]
                before = ok._value.get()
                assert cli(env, "dlq", "replay", str(first), "--force").exit_code == 0
                wait_for(lambda: ok._value.get() > before, timeout=30)
        finally:
            services.close()
    assert all(len(emu.shipments_for(o)) == 1 for o in orders)
    assert dlq_json(env, "list") == []
    assert depth(broker_url, DLQ) == 0
    assert emu.errors == []


def test_replay_all_with_the_real_shipment_consumer_resolves_each_and_a_forced_one_is_a_no_op(
    memory_url: str, sqlite_url: str
) -> None:
    """The rules of the test above that need no RabbitMQ, on the in-process broker: shipments
    for orders the store does not have yet are dead-lettered (not-found); once the orders
    exist, ``dlq replay --all`` gives one shipment per order and the dead letters end resolved
    through the hook Services installs; a forced replay of a resolved one changes nothing in
    the store. The connections dropped mid-replay stay with the test above."""
    declare(memory_url)
    env = support_env(memory_url, sqlite_url)
    orders = list(range(1000200, 1000205))
    emu = StoreEmulator(api_user=API_USER, api_key=API_KEY)
    emu.add_product("Test001", 100)
    with emu:
        services = make_services(memory_url, sqlite_url, [client_doc(emu.url)])
        try:
            with consumer(services, "shipment-lodged"):
                listed = dead_letter_shipments_of_missing_orders(memory_url, env, emu, orders, "RA")
                replayed = dlq_json(env, "replay", "--all")
                assert len(replayed["replayed"]) == len(orders) and replayed["failed"] == {}
                wait_for(
                    lambda: all(len(emu.shipments_for(o)) == 1 for o in orders), timeout=60
                )
                wait_for(
                    lambda: len(dlq_json(env, "list", "--status", "resolved")) == len(orders),
                    timeout=30,
                )
                # Replaying a resolved one again (forced) changes nothing in the store.
                ok = metrics.MESSAGES.labels("shipment-lodged", "ok")
                before = ok._value.get()
                assert cli(env, "dlq", "replay", str(listed[0]["id"]), "--force").exit_code == 0
                wait_for(lambda: ok._value.get() > before, timeout=30)
        finally:
            services.close()
    assert all(len(emu.shipments_for(o)) == 1 for o in orders)
    assert dlq_json(env, "list") == []
    assert depth(memory_url, DLQ) == 0
    assert emu.errors == []


class FlakyPublisher:
    """A publisher whose broker is away for the first ``down`` publishes."""

    def __init__(self, down: int) -> None:
        self.down = down
        self.published: list[tuple[bytes, str, str, dict[str, Any]]] = []

    def publish_raw(
        self, body: bytes, *, exchange: str, routing_key: str, properties: dict[str, Any]
    ) -> None:
        if self.down > 0:
            self.down -= 1
            raise ConnectionRefusedError(111, "Connection refused")
        self.published.append((body, exchange, routing_key, properties))


def _stored(store: StateStore, *refs: str) -> list[dl.DeadLetter]:
    with store.transaction() as conn:
        for ref in refs:
            row = record_of(
                "shipment-lodged",
                json.dumps(shipment_event(ref)).encode(),
                _runtime_headers(**{"cscart-attempt": 3, "x-death": [{"queue": "q", "count": 1}]}),
                {"message_id": f"evt-{ref}", "content_type": "application/json",
                 "expiration": "1000", "user_id": "someone-else"},
            )
            store.insert_ignore(conn, dl.dead_letters, row)
    return find(store, Filter())


def test_a_replay_waits_for_the_broker_and_never_marks_what_was_not_confirmed(
    sqlite_url: str,
) -> None:
    waited: list[float] = []
    store = open_state(sqlite_url)
    first, second = _stored(store, "F1", "F2")

    # The broker comes back within the patience: replayed once, marked once.
    publisher = FlakyPublisher(down=3)
    report = replay(store, publisher, [first], patience=30, sleep=waited.append)  # type: ignore[arg-type]
    assert report.replayed == [first.id]
    assert waited == [0.5, 1.0, 2.0]  # backing off while the broker is away
    [(body, exchange, routing_key, props)] = publisher.published
    assert (body, exchange, routing_key) == (first.body, "fm.events", "shipment.lodged")
    assert props["headers"] == {
        "schema": "shipment.lodged/1",
        "cscart-replay-count": 1,
        "cscart-replay-of": first.id,
    }  # our dead-letter headers, the retry counter and the broker's x- headers are dropped
    assert props["delivery_mode"] == 2 and props["message_id"] == "evt-F1"
    assert "expiration" not in props and "user_id" not in props
    assert dl.get(store, first.id).status == "replayed"  # type: ignore[union-attr]

    # The broker stays away: nothing is marked, the rest is not even tried.
    report = replay(store, FlakyPublisher(down=10**6), [second, first], patience=0.2)  # type: ignore[arg-type]
    assert report.replayed == [] and list(report.failed) == [second.id]
    assert "stays open" in report.failed[second.id]
    assert dl.get(store, second.id).status == "open"  # type: ignore[union-attr]
    assert dl.get(store, first.id).replay_count == 1  # type: ignore[union-attr]
    store.close()
