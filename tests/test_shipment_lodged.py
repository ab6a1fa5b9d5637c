"""The tracking push (shipment-lodged consumer) with the CS-Cart store emulator and the state
store (SQLite, and PostgreSQL where the state is what is tested): on kombu's in-process broker
for the rules, on a real RabbitMQ where retries, dead letters or a kill -9 are."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from consumers.registry import JOBS
from consumers.shipment_lodged.handler import (
    allocate,
    carrier_code,
    carries_marker,
    pushed_shipments,
)
from cscart_emulator import Fault, StoreEmulator
from cscart_fm.cli.wiring import Services
from cscart_fm.core import metrics
from cscart_fm.core.errors import RateLimited, StoreMismatch, StoreUnreachable
from cscart_fm.core.events import parse_event
from schemas.cscart import CartOrder

from .support.broker import declare, depth, drain, publish_json, shipment_event, wait_for
from .support.pipeline import (
    API_KEY,
    API_USER,
    cli_env,
    client_doc,
    consumer,
    deliver,
    make_services,
    start_cli,
    write_clients_file,
)

CONSUMER = "shipment-lodged"
WORK = "cscart.shipment-lodged"
DLQ = "cscart.shipment-lodged.dlq"
AUSPOST_URL = "https://auspost.com.au/mypost/track/#/details/33ABC1234567"


# --- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture
def emu() -> Iterator[StoreEmulator]:
    store = StoreEmulator(api_user=API_USER, api_key=API_KEY)
    store.add_product("Test001", 100, product="Test item 1")
    store.add_product("Test002", 100, product="Test item 2")
    store.add_product("Test003", 100, product="Test item 3")
    with store:
        yield store
    assert store.errors == []


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.sqlite'}"


def add_order(emu: StoreEmulator, order_id: int, *lines: tuple[str, int]) -> int:
    products = [{"product_code": sku, "amount": n} for sku, n in lines or (("Test001", 2),)]
    return emu.add_order(order_id=order_id, status="P", products=products)


def event(order_id: int, ref: str, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "order_no": f"CS{order_id}",
        "cart_order_id": order_id,
        "tracking_url": AUSPOST_URL,
    }
    return shipment_event(ref, **{**base, **overrides})


def publish(broker_url: str, body: dict[str, Any]) -> None:
    publish_json(broker_url, body, "shipment.lodged")


def item_ids(emu: StoreEmulator, order_id: int) -> list[str]:
    return list(emu.get_order_json(order_id)["products"])


def count(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


class Outcomes:
    """Messages the consumer finished since this object was made (the runtime's metric)."""

    def __init__(self) -> None:
        self.start = {
            o: count(metrics.MESSAGES, CONSUMER, o) for o in ("ok", "retry", "dead_letter")
        }

    def __getitem__(self, outcome: str) -> int:
        return int(count(metrics.MESSAGES, CONSUMER, outcome) - self.start[outcome])

    def wait(self, timeout: float = 30, **expected: int) -> None:
        wait_for(lambda: all(self[o] >= n for o, n in expected.items()), timeout=timeout)


@contextmanager
def pipeline(
    broker_url: str, state_url: str, emu: StoreEmulator, *clients: dict[str, Any], **options: Any
) -> Iterator[Services]:
    declare(broker_url)
    services = make_services(broker_url, state_url, list(clients) or [client_doc(emu.url)])
    try:
        with consumer(services, CONSUMER, **options):
            yield services
    finally:
        services.close()


def dead_letters(broker_url: str) -> dict[str, dict[str, Any]]:
    """Dead letters by shipment_ref: their cscart-* headers."""
    out = {}
    for message in drain(broker_url, DLQ):
        ref = json.loads(message.body)["shipment_ref"]
        out[ref] = {k: v for k, v in (message.headers or {}).items() if k.startswith("cscart-")}
    return out


def rows(state_url: str) -> dict[str, dict[str, Any]]:
    engine = sa.create_engine(state_url)
    try:
        with engine.connect() as conn:
            return {
                row.shipment_ref: dict(row._mapping)
                for row in conn.execute(sa.select(pushed_shipments))
            }
    finally:
        engine.dispose()


def posts(emu: StoreEmulator) -> list[dict[str, Any]]:
    return [r.json for r in emu.requests if r.endpoint == "shipments.create" and r.json]


# --- pure units -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("Australia Post", "aup"),
        ("AusPost", "aup"),
        ("australia  post", "aup"),
        ("USPS", "usps"),
        ("UPS", "ups"),
        ("FedEx", "fedex"),
        ("DHL Express", "dhl"),
        ("dhl", "dhl"),
        ("Canada Post", "can"),
        ("Swiss Post", "swisspost"),
        ("Temando", "temando"),
        ("Aramex", None),
        ("StarTrack", None),
        (None, None),
    ],
)
def test_carrier_names_map_to_the_codes_cscart_knows(name: str | None, code: str | None) -> None:
    assert carrier_code(name) == code


def test_the_marker_names_exactly_one_ref() -> None:
    assert carries_marker("Track your parcel: https://x.example/1\nFM ref FM-SHP-1", "FM-SHP-1")
    assert carries_marker("FM ref FM-SHP-1", "FM-SHP-1")
    assert not carries_marker("FM ref FM-SHP-12", "FM-SHP-1")
    assert not carries_marker("FM ref FM-SHP-1x", "FM-SHP-1")
    assert not carries_marker("", "FM-SHP-1")


def _order(*lines: tuple[str, str, int, int]) -> CartOrder:
    return CartOrder.model_validate(
        {
            "order_id": "7",
            "status": "P",
            "timestamp": "1",
            "products": {
                iid: {"item_id": iid, "product_code": sku, "amount": str(n), "shipped_amount": s}
                for iid, sku, n, s in lines
            },
        }
    )


def _lodged(*lines: tuple[str, int]) -> Any:
    body = shipment_event("R", lines=[{"sku": s, "quantity": q} for s, q in lines])
    return parse_event(body)


def test_allocation_fills_items_of_one_sku_in_order_and_never_beyond_what_is_left() -> None:
    order = _order(("11", "Test001", 2, 1), ("12", "Test001", 3, 0), ("13", "Test002", 1, 0))
    assert allocate(order, _lodged(("Test001", 3)), "order 7") == {"11": 1, "12": 2}
    assert allocate(order, _lodged(("Test001", 1), ("test001", 2), ("Test002", 1)), "order 7") == {
        "11": 1,
        "12": 2,
        "13": 1,
    }
    with pytest.raises(StoreMismatch) as caught:
        allocate(order, _lodged(("Test001", 5), ("Test009", 1)), "order 7 (CS7)")
    assert caught.value.reason == (
        "ships 5 × Test001 but order 7 (CS7) has 4 left to ship (ordered 5, already shipped 1); "
        "SKU Test009 is not on order 7 (CS7) (its SKUs: Test001, Test002)"
    )


def test_an_exact_sku_match_wins_over_a_case_insensitive_one() -> None:
    order = _order(("11", "test001", 5, 0), ("12", "Test001", 1, 0))
    assert allocate(order, _lodged(("Test001", 1)), "order 7") == {"12": 1}
    with pytest.raises(StoreMismatch):
        allocate(order, _lodged(("Test001", 2)), "order 7")


# --- the pipeline ---------------------------------------------------------------------------


def test_full_shipment_creates_the_shipment_and_sets_the_shipped_status(
    memory_url: str, sqlite_url: str, emu: StoreEmulator
) -> None:
    oid = add_order(emu, 1000012, ("Test001", 2), ("Test002", 1))
    pushed = count(metrics.SHIPMENTS_PUSHED, "ACME")
    updates = count(metrics.ORDER_STATUS_UPDATES, "ACME", "shipped")
    outcomes = Outcomes()
    with pipeline(memory_url, sqlite_url, emu):
        # No cart_order_id: the order id is order_no less the client's prefix "CS".
        body = event(
            oid,
            "FM-SHP-1",
            lines=[{"sku": "Test001", "quantity": 2}, {"sku": "Test002", "quantity": 1}],
        )
        del body["cart_order_id"]
        publish(memory_url, body)
        outcomes.wait(ok=1)
    [shipment] = emu.shipments_for(oid)
    first, second = item_ids(emu, oid)
    assert shipment["tracking_number"] == "33ABC1234567"
    assert shipment["carrier"] == "aup"
    assert shipment["products"] == {first: "2", second: "1"}
    assert shipment["carrier_info"]["tracking_url"] == AUSPOST_URL
    assert shipment["comments"] == "FM ref FM-SHP-1"  # CS-Cart links aup itself: no URL here
    assert emu.orders[oid].status == "C"
    assert emu.notifications == [(oid, "C", False)]  # notify_customer is off by default
    [post] = posts(emu)
    assert "order_status" not in post  # the status is its own, retryable step
    assert post["notify_user"] is False
    [put] = [r.json for r in emu.requests if r.endpoint == "orders.update"]
    assert put == {
        "status": "C",
        "notify_user": False,
        "notify_department": False,
        "notify_vendor": False,
    }
    assert count(metrics.SHIPMENTS_PUSHED, "ACME") == pushed + 1
    assert count(metrics.ORDER_STATUS_UPDATES, "ACME", "shipped") == updates + 1
    assert count(metrics.LAST_SHIPMENT_PUSH, "ACME") > 0
    row = rows(sqlite_url)["FM-SHP-1"]
    assert (row["cart_order_id"], row["shipment_id"], row["status_kind"], row["status_done"]) == (
        oid,
        int(shipment["shipment_id"]),
        "shipped",
        True,
    )
    assert outcomes["dead_letter"] == 0


def test_partial_then_final_consignment_set_the_partially_shipped_then_the_shipped_status_by_name(
    memory_url: str, sqlite_url: str, emu: StoreEmulator
) -> None:
    emu.add_status("A", "Partially shipped", inventory="D")
    oid = add_order(emu, 1000020, ("Test001", 2), ("Test003", 1))
    doc = client_doc(
        emu.url,
        tracking={
            "shipped_status": "Complete",
            "partially_shipped_status": "Partially Shipped",
            "notify_customer": True,
        },
    )
    outcomes = Outcomes()
    with pipeline(memory_url, sqlite_url, emu, doc):
        publish(
            memory_url,
            event(
                oid,
                "P-1",
                lines=[{"sku": "Test001", "quantity": 2}],
                backordered=[{"sku": "Test003", "quantity": 1}],
            ),
        )
        outcomes.wait(ok=1)
        [partial] = emu.shipments_for(oid)
        assert emu.orders[oid].status == "A"
        publish(memory_url, event(oid, "P-2", lines=[{"sku": "Test003", "quantity": 1}]))
        outcomes.wait(ok=2)
    first, second = item_ids(emu, oid)
    assert partial["products"] == {first: "2"}  # only what the consignment carries
    assert [s["products"] for s in emu.shipments_for(oid)] == [{first: "2"}, {second: "1"}]
    assert emu.orders[oid].status == "C"  # "Complete" resolved to C
    assert emu.notifications == [(oid, "A", True), (oid, "C", True)]
    assert all(post["notify_user"] is True for post in posts(emu))


def test_with_neither_status_set_the_status_is_left_alone(
    memory_url: str, sqlite_url: str, emu: StoreEmulator
) -> None:
    full = add_order(emu, 1000030)
    partial = add_order(emu, 1000031, ("Test001", 2), ("Test002", 1))
    neither = client_doc(
        emu.url, tracking={"shipped_status": None, "partially_shipped_status": None}
    )
    # Only shipped_status set, and the order has a backorder: "otherwise" → left alone too.
    only_shipped = client_doc(emu.url, client_id="BETA", tracking={"shipped_status": "C"})
    outcomes = Outcomes()
    with pipeline(memory_url, sqlite_url, emu, neither, only_shipped):
        publish(memory_url, event(full, "N-1"))
        publish(
            memory_url,
            event(
                partial, "N-2", client_id="BETA", backordered=[{"sku": "Test002", "quantity": 1}]
            ),
        )
        outcomes.wait(ok=2)
    assert len(emu.shipments_for(full)) == 1
    assert len(emu.shipments_for(partial)) == 1
    assert emu.orders[full].status == "P"
    assert emu.orders[partial].status == "P"
    assert emu.count("orders.update") == 0
    state = rows(sqlite_url)
    assert (state["N-1"]["status_kind"], state["N-1"]["status_done"]) == ("none", True)


def test_tracking_number_off_creates_no_shipment(
    memory_url: str, sqlite_url: str, emu: StoreEmulator
) -> None:
    oid = add_order(emu, 1000040)
    doc = client_doc(emu.url, tracking={"update_tracking_number": False})
    outcomes = Outcomes()
    with pipeline(memory_url, sqlite_url, emu, doc):
        publish(memory_url, event(oid, "OFF-1"))
        outcomes.wait(ok=1)
    assert emu.shipments_for(oid) == []
    assert emu.count("shipments.create") == 0
    assert emu.orders[oid].status == "C"  # the status follows its own settings


def test_tracking_url_goes_to_the_carrier_link_or_the_comments_only_when_on(
    memory_url: str, sqlite_url: str, emu: StoreEmulator
) -> None:
    url_on = client_doc(emu.url, tracking={"update_tracking_url": True})
    url_off = client_doc(emu.url, client_id="BETA", tracking={"update_tracking_url": False})
    aramex_url = "https://www.aramex.com.au/tools/track?l=33ABC1234567"
    cases = {  # order id → (client, carrier, url)
        1000051: ("ACME", "Australia Post", AUSPOST_URL),
        1000052: ("BETA", "Australia Post", AUSPOST_URL),
        1000053: ("ACME", "Aramex", aramex_url),
        1000054: ("BETA", "Aramex", aramex_url),
    }
    for oid in cases:
        add_order(emu, oid)
    outcomes = Outcomes()
    with pipeline(memory_url, sqlite_url, emu, url_on, url_off):
        for oid, (client, carrier, url) in cases.items():
            publish(
                memory_url,
                event(oid, f"U-{oid}", client_id=client, carrier=carrier, tracking_url=url),
            )
        outcomes.wait(ok=4)
    shipments = {oid: emu.shipments_for(oid)[0] for oid in cases}
    # A carrier CS-Cart knows: it shows its own link, on or off; the URL is never repeated.
    for oid in (1000051, 1000052):
        assert shipments[oid]["carrier"] == "aup"
        assert shipments[oid]["carrier_info"]["tracking_url"] == AUSPOST_URL
        assert shipments[oid]["comments"] == f"FM ref U-{oid}"
    # Any other carrier: by name, and the URL in the comments only when update_tracking_url.
    assert shipments[1000053]["carrier"] == "Aramex"
    assert "carrier_info" not in shipments[1000053]
    assert shipments[1000053]["comments"] == f"Track your parcel: {aramex_url}\nFM ref U-1000053"
    assert shipments[1000054]["carrier"] == "Aramex"
    assert shipments[1000054]["comments"] == "FM ref U-1000054"
    assert "aramex.com" not in json.dumps(shipments[1000054])


@pytest.mark.postgres
def test_the_same_event_twice_creates_one_shipment(
    memory_url: str, state_url: str, emu: StoreEmulator
) -> None:
    oid = add_order(emu, 1000060)
    emu.set_fault("orders.get", Fault(latency=0.3))  # the two copies overlap in time
    already = count(metrics.SHIPMENTS_ALREADY_PUSHED, "ACME")
    outcomes = Outcomes()
    with pipeline(memory_url, state_url, emu, concurrency=4):
        publish(memory_url, event(oid, "D-1"))
        publish(memory_url, event(oid, "D-1", event_id="evt-D-1-resent"))  # at the same time
        outcomes.wait(ok=2)
        publish(memory_url, event(oid, "D-1"))  # and once more, long after
        outcomes.wait(ok=3)
    assert len(emu.shipments_for(oid)) == 1
    assert emu.count("shipments.create") == 1
    assert emu.orders[oid].status == "C"
    assert count(metrics.SHIPMENTS_ALREADY_PUSHED, "ACME") == already + 2
    # The copies overlapped: the second waited for the lock, found the shipment recorded and
    # went on to the status (reading the order); run one after the other it reads nothing.
    assert emu.count("orders.get") >= 3
    assert emu.count("shipments.list") == 1
    assert outcomes["dead_letter"] == 0 and outcomes["retry"] == 0


@pytest.mark.parametrize(
    "applied",
    [
        pytest.param(True, id="applied"),
        pytest.param(False, id="not-applied", marks=pytest.mark.broker),
    ],
)
def test_a_post_that_times_out_is_read_back_before_any_retry(
    request: pytest.FixtureRequest, sqlite_url: str, emu: StoreEmulator, applied: bool
) -> None:
    # Applied, nothing is retried: the in-process broker will do. Not applied, the message
    # waits in its retry queue, which only RabbitMQ gives back.
    broker_url: str = request.getfixturevalue("memory_url" if applied else "broker_url")
    oid = add_order(emu, 1000070)
    doc = client_doc(emu.url, limits={"read_timeout": 1})
    emu.set_fault(
        "shipments.create", Fault(timeout_rate=1.0, timeout_applies=applied, hang_seconds=2)
    )
    outcomes = Outcomes()
    with pipeline(broker_url, sqlite_url, emu, doc):
        publish(broker_url, event(oid, "TO-1"))
        # The emulator logs a request once it answered, after its hang.
        wait_for(lambda: emu.count("shipments.create") == 1, timeout=15)
        emu.set_fault("shipments.create", None)
        outcomes.wait(ok=1)
    assert len(emu.shipments_for(oid)) == 1
    assert emu.orders[oid].status == "C"
    faulted = [r.fault for r in emu.requests if r.endpoint == "shipments.create"]
    if applied:
        # Timed out but created: read back at once, adopted, never POSTed again.
        assert faulted == ["timeout"]
        assert outcomes["retry"] == 0
    else:
        # Not created (a proxy gave up): read back, found nothing, retried later, created once.
        # The fault is lifted only once the emulator logged the hung request, so a quick retry
        # may meet it again: any number of timeouts, then one success.
        timeouts = faulted.count("timeout")
        assert timeouts >= 1
        assert faulted == ["timeout"] * timeouts + [None]
        assert outcomes["retry"] == timeouts
    # Every POST was preceded by a read-back; after each timeout, one more.
    assert emu.count("shipments.list") == len(faulted) + faulted.count("timeout")
    assert outcomes["dead_letter"] == 0


@pytest.mark.broker
@pytest.mark.postgres
@pytest.mark.parametrize("moment", ["before-status", "before-recording"])
def test_kill_9_mid_message_then_a_restart_gives_one_shipment_and_the_status(
    broker_url: str, state_url: str, emu: StoreEmulator, tmp_path: Path, moment: str
) -> None:
    oid = add_order(emu, 1000080)
    clients = write_clients_file(
        tmp_path / "clients.yaml", [client_doc(emu.url, limits={"read_timeout": 10})]
    )
    env = cli_env(broker_url, state_url, clients)
    log = tmp_path / "cscart-fm.log"
    declare(broker_url)
    if moment == "before-status":
        # Dies after the shipment was created and recorded, while the status is being set.
        emu.set_fault("orders.update", Fault(latency=60))
    else:
        # Dies after the store created the shipment, before its answer came back.
        emu.set_fault("shipments.create", Fault(timeout_rate=1.0, hang_seconds=60))
    publish(broker_url, event(oid, "K-1"))
    first = start_cli(["run", CONSUMER], env, log)
    try:
        wait_for(lambda: emu.shipments_for(oid), timeout=30)
        if moment == "before-status":
            wait_for(lambda: (rows(state_url).get("K-1") or {}).get("shipment_id"), timeout=10)
            time.sleep(0.5)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    assert emu.orders[oid].status == "P"  # the status was never set
    emu.clear_faults()
    second = start_cli(["run", CONSUMER], env, log)
    try:
        wait_for(lambda: emu.orders[oid].status == "C", timeout=40)
        wait_for(lambda: depth(broker_url, WORK) == 0, timeout=10)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    assert len(emu.shipments_for(oid)) == 1
    # The restarted process never POSTed: it found the recorded (or marked) shipment.
    answered = [r for r in emu.requests if r.endpoint == "shipments.create" and r.fault is None]
    assert len(answered) == (1 if moment == "before-status" else 0)  # the first process's
    row = rows(state_url)["K-1"]
    assert row["shipment_id"] == int(emu.shipments_for(oid)[0]["shipment_id"])
    assert row["status_done"] is True
    assert depth(broker_url, DLQ) == 0
    text = log.read_text()
    if moment == "before-recording":
        assert "shipment already in the store: adopted" in text  # found by its FM ref marker
    assert API_KEY not in text
    assert "jane@example.com" not in text


def test_events_that_do_not_match_the_store_are_dead_lettered_with_a_reason(
    bus_url: str, sqlite_url: str, emu: StoreEmulator
) -> None:
    oid = add_order(emu, 1000090, ("Test001", 2))
    other = add_order(emu, 1000091)
    beta = client_doc(emu.url, client_id="BETA", tracking={"shipped_status": "Dispatched"})
    failures = count(metrics.SHIPMENT_FAILURES, "ACME", "store-mismatch")
    outcomes = Outcomes()
    with pipeline(bus_url, sqlite_url, emu, client_doc(emu.url), beta):
        publish(bus_url, event(1000099, "X-order"))
        publish(bus_url, event(oid, "X-sku", lines=[{"sku": "Test009", "quantity": 1}]))
        publish(bus_url, event(oid, "X-qty", lines=[{"sku": "Test001", "quantity": 3}]))
        no_prefix = event(oid, "X-prefix", order_no=f"XY{oid}")
        del no_prefix["cart_order_id"]
        publish(bus_url, no_prefix)
        publish(bus_url, event(other, "X-status", client_id="BETA"))
        outcomes.wait(dead_letter=5)
    dead = dead_letters(bus_url)
    assert dead["X-order"]["cscart-error-type"] == "not-found"
    assert dead["X-order"]["cscart-reason"] == (
        "order 1000099 (CS1000099) is not in the store "
        "(orders.get: HTTP 404 Not Found (order 1000099))"
    )
    assert dead["X-sku"]["cscart-error-type"] == "store-mismatch"
    assert dead["X-sku"]["cscart-reason"] == (
        f"SKU Test009 is not on order {oid} (CS{oid}) (its SKUs: Test001)"
    )
    assert dead["X-qty"]["cscart-error-type"] == "store-mismatch"
    assert dead["X-qty"]["cscart-reason"] == (
        f"ships 3 × Test001 but order {oid} (CS{oid}) has 2 left to ship "
        "(ordered 2, already shipped 0)"
    )
    assert "Nothing was shipped" in dead["X-qty"]["cscart-action"]
    assert dead["X-prefix"]["cscart-error-type"] == "invalid-message"
    assert dead["X-prefix"]["cscart-reason"] == (
        f"order_no 'XY{oid}' does not start with client ACME's prefix 'CS', "
        "and the event has no cart_order_id"
    )
    assert dead["X-status"]["cscart-error-type"] == "store-refused"
    assert dead["X-status"]["cscart-reason"].startswith(
        "tracking.shipped_status 'Dispatched' of client BETA is not an order status of the "
        "store (it has: O Open, P Paid, C Complete"
    )
    assert "only the status is missing" in dead["X-status"]["cscart-action"]
    assert all(h["cscart-attempts"] == 1 for h in dead.values())  # at once, never retried
    assert emu.shipments_for(oid) == []
    assert len(emu.shipments_for(other)) == 1  # the shipment is made; the status is refused
    assert emu.orders[other].status == "P"
    assert count(metrics.SHIPMENT_FAILURES, "ACME", "store-mismatch") == failures + 2


@pytest.mark.broker
def test_a_store_down_or_rate_limiting_is_retried_and_the_shipment_applied_once(
    broker_url: str, sqlite_url: str, emu: StoreEmulator
) -> None:
    down = add_order(emu, 1000100)
    limited = add_order(emu, 1000101)
    status_fails = add_order(emu, 1000102)
    unreachable = count(metrics.SHIPMENT_FAILURES, "ACME", "store-unreachable")
    rate_limited = count(metrics.SHIPMENT_FAILURES, "ACME", "rate-limited")
    outcomes = Outcomes()
    with pipeline(broker_url, sqlite_url, emu):
        emu.set_fault("orders.get", Fault(error_rate=1.0, error_status=503))
        publish(broker_url, event(down, "R-503"))
        outcomes.wait(retry=1)
        emu.set_fault("orders.get", None)  # the store is back
        outcomes.wait(ok=1)
        # A 429 on the POST: nothing was created; the message comes back after its delay.
        emu.set_fault("shipments.create", Fault(rate_limit_next=1, retry_after=1))
        publish(broker_url, event(limited, "R-429"))
        outcomes.wait(ok=2)
        # The shipment is created, then setting the status fails: the retry sets the status
        # only (no read-back, no POST).
        emu.set_fault("orders.update", Fault(error_rate=1.0, error_status=503))
        publish(broker_url, event(status_fails, "R-status"))
        outcomes.wait(retry=3)
        assert len(emu.shipments_for(status_fails)) == 1
        assert emu.orders[status_fails].status == "P"
        emu.set_fault("orders.update", None)
        outcomes.wait(ok=3)
    for oid in (down, limited, status_fails):
        assert len(emu.shipments_for(oid)) == 1
        assert emu.orders[oid].status == "C"
    assert outcomes["retry"] == 3 and outcomes["dead_letter"] == 0
    assert count(metrics.SHIPMENT_FAILURES, "ACME", "store-unreachable") == unreachable + 2
    assert count(metrics.SHIPMENT_FAILURES, "ACME", "rate-limited") == rate_limited + 1
    assert [r.fault for r in emu.requests if r.endpoint == "shipments.create"] == [
        None,
        "rate_limit",
        None,
        None,
    ]
    read_backs = [
        r
        for r in emu.requests
        if r.endpoint == "shipments.list" and r.query.get("order_id") == [str(status_fails)]
    ]
    assert len(read_backs) == 1


def test_each_attempt_after_a_transient_failure_does_only_what_is_left(
    memory_url: str, sqlite_url: str, emu: StoreEmulator
) -> None:
    """The rules the retries above rest on, with the handler called directly, one call per
    attempt (the retry delays are the broker tier's): a 503 reading the order, a 429 on the
    POST and a timed-out POST that the read-back finds not applied are retryable and leave
    nothing in the store; after a failed status update, the next attempt sets the status
    only, without a read-back or a POST."""
    down, limited, lost, status_fails = (add_order(emu, n) for n in range(1000130, 1000134))
    doc = client_doc(emu.url, limits={"read_timeout": 1})
    services = make_services(memory_url, sqlite_url, [doc])
    handler = JOBS.named(CONSUMER).build(services)

    def attempt(oid: int, ref: str, n: int) -> None:
        deliver(handler, event(oid, ref), n)

    try:
        emu.set_fault("orders.get", Fault(error_rate=1.0, error_status=503))
        with pytest.raises(StoreUnreachable):
            attempt(down, "A-503", 1)
        emu.set_fault("orders.get", None)
        attempt(down, "A-503", 2)

        emu.set_fault("shipments.create", Fault(rate_limit_next=1, retry_after=1))
        with pytest.raises(RateLimited):
            attempt(limited, "A-429", 1)
        assert emu.shipments_for(limited) == []
        attempt(limited, "A-429", 2)

        emu.set_fault(
            "shipments.create", Fault(timeout_rate=1.0, timeout_applies=False, hang_seconds=2)
        )
        with pytest.raises(StoreUnreachable, match="so it was not created"):
            attempt(lost, "A-lost", 1)
        # Logged once answered, after its hang: the 4th POST (A-503's, A-429's two, this one).
        wait_for(lambda: emu.count("shipments.create") == 4, timeout=15)
        emu.set_fault("shipments.create", None)
        assert emu.shipments_for(lost) == []
        attempt(lost, "A-lost", 2)

        emu.set_fault("orders.update", Fault(error_rate=1.0, error_status=503))
        with pytest.raises(StoreUnreachable):
            attempt(status_fails, "A-status", 1)
        assert len(emu.shipments_for(status_fails)) == 1
        assert emu.orders[status_fails].status == "P"
        emu.set_fault("orders.update", None)
        emu.clear_log()
        attempt(status_fails, "A-status", 2)
        assert emu.count("shipments.list") == 0 and emu.count("shipments.create") == 0
    finally:
        services.close()
    for oid in (down, limited, lost, status_fails):
        assert len(emu.shipments_for(oid)) == 1
        assert emu.orders[oid].status == "C"


def test_the_same_sku_on_two_items_is_allocated_without_over_shipping(
    bus_url: str, sqlite_url: str, emu: StoreEmulator
) -> None:
    oid = add_order(emu, 1000110, ("Test001", 2), ("Test001", 3))
    first, second = item_ids(emu, oid)
    outcomes = Outcomes()
    with pipeline(bus_url, sqlite_url, emu):
        publish(
            bus_url,
            event(
                oid,
                "S-1",
                lines=[{"sku": "Test001", "quantity": 4}],
                backordered=[{"sku": "Test001", "quantity": 1}],
            ),
        )
        outcomes.wait(ok=1)
        publish(bus_url, event(oid, "S-2", lines=[{"sku": "Test001", "quantity": 2}]))
        outcomes.wait(dead_letter=1)
        # A SKU in another case still finds the item that has one left.
        publish(bus_url, event(oid, "S-3", lines=[{"sku": "test001", "quantity": 1}]))
        outcomes.wait(ok=2)
    assert [s["products"] for s in emu.shipments_for(oid)] == [
        {first: "2", second: "2"},
        {second: "1"},
    ]
    dead = dead_letters(bus_url)
    assert dead["S-2"]["cscart-reason"] == (
        f"ships 2 × Test001 but order {oid} (CS{oid}) has 1 left to ship "
        "(ordered 5, already shipped 4)"
    )


def test_a_late_partial_consignment_never_moves_a_shipped_order_back(
    memory_url: str, sqlite_url: str, emu: StoreEmulator
) -> None:
    emu.add_status("A", "Partially shipped", inventory="D")
    oid = add_order(emu, 1000120, ("Test001", 2), ("Test003", 1))
    doc = client_doc(emu.url, tracking={"shipped_status": "C", "partially_shipped_status": "A"})
    outcomes = Outcomes()
    with pipeline(memory_url, sqlite_url, emu, doc):
        # FM's final consignment arrives first, its earlier partial one second.
        publish(memory_url, event(oid, "L-2", lines=[{"sku": "Test003", "quantity": 1}]))
        outcomes.wait(ok=1)
        publish(
            memory_url,
            event(
                oid,
                "L-1",
                lines=[{"sku": "Test001", "quantity": 2}],
                backordered=[{"sku": "Test003", "quantity": 1}],
            ),
        )
        outcomes.wait(ok=2)
    assert len(emu.shipments_for(oid)) == 2
    assert emu.orders[oid].status == "C"
    assert emu.notifications == [(oid, "C", False)]
