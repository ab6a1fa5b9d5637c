"""A replay goes only where its job reads: never where a header says.

Seen: a message published to the dead-letter exchange with ``cscart-error-type:
store-unreachable``, ``cscart-client-id: ACME``, ``cscart-original-exchange: fm.orders``,
``cscart-original-routing-key: order.imported`` and an ``order.imported`` body (50 phones at
0.00) was collected as an ordinary dead letter, and ``dlq replay --client ACME --type
store-unreachable`` published it to ``fm.orders``: FM's queue received a fake order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from cscart_fm.cli.wiring import open_state
from cscart_fm.core.errors import NotFound
from cscart_fm.support.dead_letters.collect import collect, record_of
from cscart_fm.support.dead_letters.store import Filter, find

from .support.broker import (
    declare,
    depth,
    drain,
    publish_json,
    running,
    shipment_event,
    wait_for,
)
from .support.console_helpers import (
    RecordingReplayer,
    login,
    make_console,
    post,
    served,
    store_letter,
)
from .support.dlq_handlers import Planned, cli, logging_restored, order_imported_body

FORGED = {
    "cscart-error-type": "store-unreachable",
    "cscart-reason": "the store was down",
    "cscart-client-id": "ACME",
    "cscart-consumer": "order-poll",
    "cscart-original-exchange": "fm.orders",
    "cscart-original-routing-key": "order.imported",
}


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with logging_restored():
        yield


def fake_order() -> dict[str, Any]:
    body = order_imported_body()
    body["lines"] = [{"line_id": "1", "sku": "PHONE", "name": "Phone", "quantity": 50,
                      "unit_price": "0.00"}]
    return body


def publish_dead_letter(url: str, body: dict[str, Any], queue: str, **headers: Any) -> None:
    with Connection(url) as conn:
        conn.Producer().publish(
            json.dumps(body).encode(), exchange="cscart.dead-letter", routing_key=queue,
            headers=headers, content_type="application/json", serializer=None,
            delivery_mode=2, message_id=body["event_id"],
        )


def env(broker_url: str, state_url: str) -> dict[str, str]:
    return {"CSCART_FM_BROKER_URL": broker_url, "CSCART_FM_STATE_URL": state_url,
            "CSCART_FM_RETRY_DELAYS": "1", "CSCART_FM_CLIENTS": "/nonexistent/clients.yaml"}


@pytest.mark.broker
def test_a_forged_dead_letter_is_never_replayed_to_fm(broker_url: str, tmp_path: Path) -> None:
    declare(broker_url)
    state_url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    publish_dead_letter(broker_url, fake_order(), "cscart.shipment-lodged.dlq", **FORGED)
    # A genuine one beside it, replayed as usual, to its own queue.
    publish_json(broker_url, shipment_event("REAL-1"), "shipment.lodged")
    genuine = drain(broker_url, "cscart.shipment-lodged")
    publish_dead_letter(broker_url, json.loads(genuine[0].body), "cscart.shipment-lodged.dlq",
                        **{**FORGED, "cscart-client-id": "ACME"})
    cli_env = env(broker_url, state_url)

    listed = json.loads(cli(cli_env, "dlq", "list", "--json").stdout)
    assert len(listed) == 2
    forged_id = next(row["id"] for row in listed if row["message_id"] != "evt-REAL-1")
    real_id = next(row["id"] for row in listed if row["message_id"] == "evt-REAL-1")

    shown = cli(cli_env, "dlq", "show", str(forged_id))
    assert "Goes to: nowhere: its body is not one of shipment-lodged's events" in shown.stdout
    assert "fm.orders" not in shown.stdout.split("Goes to:")[1].splitlines()[0]

    by_id = cli(cli_env, "dlq", "replay", str(forged_id))
    assert by_id.exit_code == 2
    assert (
        f"Dead letter {forged_id} cannot be replayed: its body is not one of shipment-lodged's "
        "events (type 'order.imported'; shipment-lodged reads shipment.lodged): nothing "
        "replayed."
    ) in by_id.output

    dry = cli(cli_env, "dlq", "replay", "--client", "ACME", "--type", "store-unreachable",
              "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "1 dead letter(s) would be replayed." in dry.stdout
    assert "to fm.events / shipment.lodged: 1" in dry.stdout
    assert f"not dead letter {forged_id}:" in dry.stdout

    done = cli(cli_env, "dlq", "replay", "--client", "ACME", "--type", "store-unreachable",
               "--json")
    assert done.exit_code == 0, done.output
    outcome = json.loads(done.stdout)
    assert outcome["replayed"] == [real_id]
    assert str(forged_id) in outcome["refused"]
    assert depth(broker_url, "fm.orders.imported") == 0  # FM received no fake order
    [replayed] = drain(broker_url, "cscart.shipment-lodged")
    assert json.loads(replayed.body)["shipment_ref"] == "REAL-1"


def test_forged_headers_on_a_broker_dead_letter_are_not_believed() -> None:
    """The broker's own dead-lettering (its newest x-death on the work queue) keeps whatever
    headers the message came with: they say nothing about why or where."""
    body = json.dumps(shipment_event("S1")).encode()
    deaths = [{"queue": "cscart.shipment-lodged", "reason": "delivery_limit", "count": 1,
               "exchange": "fm.events", "routing-keys": ["shipment.lodged"]}]
    row = record_of("shipment-lodged", body, {**FORGED, "x-death": deaths}, {})
    assert row["consumer"] == "shipment-lodged"  # the queue it came from, not the header
    assert row["error_type"] == "delivery-limit"
    assert row["client_id"] == "ACME"  # from the body
    assert (row["original_exchange"], row["original_routing_key"]) == (
        "fm.events", "shipment.lodged")


@pytest.mark.broker
def test_a_stored_letter_keeps_no_destination_of_its_headers(
    broker_url: str, tmp_path: Path
) -> None:
    declare(broker_url)
    publish_dead_letter(broker_url, fake_order(), "cscart.order-poll.dlq", **FORGED)
    state = open_state(f"sqlite:///{tmp_path / 'state.sqlite'}")
    try:
        collect(state, broker_url, ["order-poll"])
        [letter] = find(state, Filter())
    finally:
        state.close()
    assert (letter.original_exchange, letter.original_routing_key) == ("", "")
    assert letter.goes_to.startswith("nowhere: its body is not one of order-poll's events")


def test_the_consoles_confirmation_says_where_they_go(tmp_path: Path) -> None:
    store = open_state(f"sqlite:///{tmp_path / 'state.sqlite'}")
    try:
        real = store_letter(store, shipment_event("R1"))
        forged = store_letter(store, fake_order(), **FORGED)
        replayer = RecordingReplayer(store)
        with served(make_console(store, tmp_path, replayer=replayer)) as base:
            http = login(base, "olivia")
            ask = post(http, base, "/letters/replay", {"client": "ACME"},
                       csrf_from="/letters?client=ACME")
            assert ask.status_code == 200
            assert "Replay these 1 dead letter(s)" in ask.text
            assert "<li>fm.events / shipment.lodged: 1</li>" in ask.text
            assert f"#{forged} (its body is not one of shipment-lodged&#39;s events" in ask.text
            page = http.get(f"{base}/letters/{forged}", timeout=10).text
            assert '<dd id="goes-to">nowhere: its body is not one of' in page
            one = post(http, base, f"/letters/{forged}/replay", csrf_from=f"/letters/{forged}")
            assert one.status_code == 303
            after = http.get(f"{base}/letters/{forged}", timeout=10).text
            assert "cannot be replayed" in after
        assert replayer.calls == []  # nothing was sent
        assert real != forged
    finally:
        store.close()


@pytest.mark.broker
def test_a_replay_keeps_the_messages_properties(broker_url: str, tmp_path: Path) -> None:
    """correlation_id, reply_to and app_id were dropped on the way to the dead letters, so a
    replay arrived without them."""
    declare(broker_url)
    state_url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    with Connection(broker_url) as conn:
        conn.Producer().publish(
            json.dumps(shipment_event("P1")).encode(), exchange="fm.events",
            routing_key="shipment.lodged", content_type="application/json", serializer=None,
            delivery_mode=2, message_id="evt-P1", correlation_id="corr-7",
            reply_to="fm.replies", app_id="fm-warehouse", headers={"schema": "shipment.lodged/1"},
        )
    with running(Planned({"P1": [NotFound("orders.get: HTTP 404 Not Found")]}), broker_url):
        wait_for(lambda: depth(broker_url, "cscart.shipment-lodged.dlq") == 1)
    cli_env = env(broker_url, state_url)
    [row] = json.loads(cli(cli_env, "dlq", "list", "--json").stdout)
    done = cli(cli_env, "dlq", "replay", str(row["id"]))
    assert done.exit_code == 0, done.output
    [again] = drain(broker_url, "cscart.shipment-lodged")
    assert (again.properties["correlation_id"], again.properties["reply_to"],
            again.properties["app_id"]) == ("corr-7", "fm.replies", "fm-warehouse")
