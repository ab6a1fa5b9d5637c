"""Orders pulling with the CS-Cart store emulator, the consumer running in this process
(``polling``) or as ``cscart-fm run order-poll`` processes; FM's side is the
``fm.orders.imported`` queue.

The order job's rules (filters, statuses, countries, start date, lookback, listing,
watermark, prefix, test SKUs, Multi-Vendor parents, explain) run on kombu's in-process broker
(``memory_url``), or with the handler called directly for one attempt of a tick; a dead
tick on both brokers (``bus_url``). What rests on RabbitMQ stays on it: the tick's delayed
retry, kill -9 of a process at each step of a run and two replica processes at once; the
rules under those three are tested in this process too, with the handler called directly.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from consumers.order_poll import filters as order_poll
from consumers.order_poll import listing
from consumers.order_poll.tables import imported_orders, order_decisions, poll_watermarks
from consumers.registry import JOBS
from cscart.client import CsCartClient
from cscart_emulator import Fault, StoreEmulator
from cscart_fm.cli.wiring import Services
from cscart_fm.core import metrics
from cscart_fm.core.errors import Fate, StoreUnreachable
from cscart_fm.core.runtime import ConsumerRuntime
from cscart_fm.support.explain import explain_order
from schemas.messages import order_event_id

from .support import order_poll_crash
from .support.broker import declare, depth, drain, publish_json, wait_for
from .support.pipeline import (
    API_KEY,
    API_USER,
    REPO,
    cli_env,
    client_doc,
    consumer,
    deliver,
    make_services,
    start_cli,
    write_clients_file,
)
from .support.pipeline import (
    imported_orders as take_imported,
)

FM_QUEUE = "fm.orders.imported"
TICKS = "cscart.order-poll"
DLQ = "cscart.order-poll.dlq"
SYDNEY = ZoneInfo("Australia/Sydney")
HOUR, DAY = 3600, 86_400


def now() -> int:
    return int(time.time())


def tick_body(client_id: str = "ACME") -> dict[str, Any]:
    return {
        "type": "order-poll.tick",
        "version": 1,
        "event_id": str(uuid.uuid4()),
        "client_id": client_id,
        "issued_at": datetime.now(UTC).isoformat(),
    }


def counter(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


def poll_count() -> float:
    value = REGISTRY.get_sample_value("cscart_fm_order_poll_seconds_count", {"client": "ACME"})
    return value or 0.0


def new_store(**kwargs: Any) -> StoreEmulator:
    store = StoreEmulator(api_user=API_USER, api_key=API_KEY, **kwargs)
    store.add_product("Test001", 100, product="Test item 1", price="10.00")
    store.add_product("Test002", 100, product="Test item 2", price="15.50")
    store.add_product("REAL-1", 100, product="Enamel mug", price="14.95")
    return store.start()


@pytest.fixture
def store() -> Iterator[StoreEmulator]:
    emulator = new_store()
    try:
        yield emulator
    finally:
        emulator.stop()
        assert emulator.errors == []


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """For tests where the state store's kind does not matter."""
    return f"sqlite:///{tmp_path / 'state.sqlite'}"


@dataclass
class Poll:
    """One client's order-poll consumer in this process, on ``url``'s broker."""

    url: str
    store: StoreEmulator
    services: Services
    runtime: ConsumerRuntime[Any]

    def tick(self, client_id: str = "ACME", outcome: str = "ok", timeout: float = 90) -> None:
        """Publish a tick and return once the consumer settled it with ``outcome``."""
        done = metrics.MESSAGES.labels("order-poll", outcome)
        before = done._value.get()
        publish_json(self.url, tick_body(client_id), "order-poll.tick")
        wait_for(lambda: done._value.get() > before, timeout=timeout)

    def taken(self) -> list[dict[str, Any]]:
        """Every order.imported FM received since the last call."""
        return take_imported(self.url)

    def ids(self) -> list[int]:
        return sorted(o["cart_order_id"] for o in self.taken())

    def explain(self, order_id: int | str, client_id: str = "ACME") -> str:
        return explain_order(self.services, client_id, order_id)


@contextmanager
def polling(
    url: str, state_url: str, store: StoreEmulator, **sections: Any
) -> Iterator[Poll]:
    declare(url)
    services = make_services(url, state_url, [client_doc(store.url, **sections)])
    try:
        with consumer(services, "order-poll") as runtime:
            yield Poll(url, store, services, runtime)
    finally:
        services.close()


def rows(services: Services, table: sa.Table) -> list[Any]:
    with services.state.engine.connect() as conn:
        return list(conn.execute(sa.select(table)).all())


# --- the contract's fields ------------------------------------------------------------------


@pytest.mark.postgres
def test_each_order_is_published_once_with_the_contracts_fields(
    memory_url: str, state_url: str, store: StoreEmulator
) -> None:
    placed = now() - HOUR
    real = store.add_order(
        status="P",
        timestamp=placed,
        s_country="AU",
        firstname="Jane",
        lastname="Citizen",
        email="jane@example.com",
        notes="Leave at the door",
        products=[
            {"product_code": "Test001", "amount": 2},
            {"product_code": "REAL-1", "amount": 1},
        ],
        shipping_cost="9.90",
        tax_subtotal="2.99",
        discount="0.50",
        subtotal_discount="1.00",
        total="42.24",
    )
    test_only = store.add_order(
        status="P", timestamp=placed + 60, products=[{"product_code": "Test002", "amount": 1}]
    )
    imported_before = counter(metrics.ORDERS_IMPORTED, "ACME")
    polls_before = poll_count()
    with polling(memory_url, state_url, store) as poll:
        poll.tick()
        received = {o["cart_order_id"]: o for o in poll.taken()}
        assert sorted(received) == [real, test_only]
        body = received[real]
        detail = store.get_order_json(real)
        assert body["type"] == "order.imported" and body["version"] == 1
        assert body["_schema"] == "order.imported/1"
        assert body["event_id"] == order_event_id("ACME", real) == body["_message_id"]
        assert body["client_id"] == "ACME"
        assert body["order_no"] == f"CS{real}"
        assert body["cart_status"] == "P"
        assert body["placed_at"] == datetime.fromtimestamp(placed, UTC).isoformat()  # +00:00
        assert body["is_test"] is False
        assert body["currency"] == "AUD"
        assert body["customer"] == {
            "name": "Jane Citizen",
            "email": "jane@example.com",
            "phone": "+61 2 9000 0000",
        }
        expected_address = {
            "name": "Jane Citizen",
            "company": "",
            "address1": "1 George Street",
            "address2": "",
            "city": "Sydney",
            "state": "NSW",
            "postcode": "2000",
            "country": "AU",
            "phone": "+61 2 9000 0000",
            "email": "jane@example.com",
        }
        assert body["ship_to"] == expected_address
        assert body["bill_to"] == expected_address
        assert body["shipping_method"] == "Standard"
        assert body["notes"] == "Leave at the door"
        item_ids = list(detail["products"])
        assert body["lines"] == [
            {"line_id": item_ids[0], "sku": "Test001", "name": "Test item 1", "quantity": 2,
             "unit_price": "10.00"},
            {"line_id": item_ids[1], "sku": "REAL-1", "name": "Enamel mug", "quantity": 1,
             "unit_price": "14.95"},
        ]
        assert body["totals"] == {
            "subtotal": "34.95", "shipping": "9.90", "tax": "2.99", "discount": "1.50",
            "total": "42.24",
        }
        assert received[test_only]["is_test"] is True

        poll.tick()
        poll.tick()
        assert poll.taken() == []  # repeated ticks: nothing again
        assert counter(metrics.ORDERS_IMPORTED, "ACME") - imported_before == 2
        assert counter(metrics.LAST_POLL_SUCCESS, "ACME") >= now() - 60
        assert poll_count() - polls_before == 3  # POLL_SECONDS observed once per poll
        state = {row.cart_order_id: row for row in rows(poll.services, imported_orders)}
        assert state[real].state == "published" and state[real].order_no == f"CS{real}"
        assert state[real].payload is None  # the shopper's address is not kept once published
        [mark] = rows(poll.services, poll_watermarks)
        assert mark.last_mode == "incremental"  # the third tick listed only changes


# --- filters ---------------------------------------------------------------------------------


def test_statuses_by_letter_name_or_custom_status_resolved_from_the_store(
    memory_url: str, sqlite_url: str, store: StoreEmulator
) -> None:
    store.add_status("Z", "Awaiting Pickup", inventory="D")
    placed = now() - HOUR
    by_status = {s: store.add_order(status=s, timestamp=placed) for s in "PZBOCI"}
    with polling(
        memory_url, sqlite_url, store,
        orders={"statuses": ["Processed", "awaiting pickup", "Back Ordered"]},
    ) as poll:
        skipped = counter(metrics.ORDERS_SKIPPED, "ACME", "status")
        poll.tick()
        assert poll.ids() == sorted(by_status[s] for s in "PZB")
        # The first poll asks the store for the pulled statuses only.
        listing = next(r for r in store.requests if r.query.get("status[]"))
        assert sorted(listing.query["status[]"]) == ["B", "P", "Z"]
        assert "Awaiting Pickup" in poll.explain(by_status["Z"])
        store.set_order_status(by_status["O"], "C")  # changes of unpulled orders: skipped
        poll.tick()
        assert poll.ids() == []
        assert counter(metrics.ORDERS_SKIPPED, "ACME", "status") > skipped


def test_countries_filter_the_ship_to_country(
    memory_url: str, sqlite_url: str, store: StoreEmulator
) -> None:
    placed = now() - HOUR
    by_country = {c: store.add_order(s_country=c, b_country="AU", timestamp=placed)
                  for c in ("AU", "NZ", "US", "GB")}
    before = counter(metrics.ORDERS_SKIPPED, "ACME", "country")
    with polling(memory_url, sqlite_url, store, orders={"countries": ["AU", "nz"]}) as poll:
        poll.tick()
        assert poll.ids() == [by_country["AU"], by_country["NZ"]]
        poll.tick()  # seen again: not counted again
        assert counter(metrics.ORDERS_SKIPPED, "ACME", "country") - before == 2
        decisions = {r.cart_order_id: r for r in rows(poll.services, order_decisions)}
        assert decisions[by_country["US"]].reason == "country"
        assert "ships to US" in decisions[by_country["US"]].detail
        assert "jane" not in decisions[by_country["US"]].detail.lower()


def test_empty_countries_pull_every_country_and_the_prefix_makes_the_order_no(
    memory_url: str, sqlite_url: str, store: StoreEmulator
) -> None:
    ids = [store.add_order(s_country=c, timestamp=now() - HOUR) for c in ("AU", "US", "JP")]
    with polling(memory_url, sqlite_url, store, orders={"prefix": "NPF-"}) as poll:
        poll.tick()
        received = poll.taken()
        assert sorted(o["cart_order_id"] for o in received) == ids
        assert {o["order_no"] for o in received} == {f"NPF-{i}" for i in ids}


def test_start_date_excludes_earlier_orders_even_if_the_store_returned_them(
    memory_url: str, sqlite_url: str, store: StoreEmulator
) -> None:
    start = datetime(2025, 3, 10, tzinfo=UTC)
    before = store.add_order(timestamp=int(start.timestamp()) - 1)
    after = store.add_order(timestamp=int(start.timestamp()))
    with polling(memory_url, sqlite_url, store, orders={"start_date": "10/03/2025"}) as poll:
        poll.tick()
        assert poll.ids() == [after]
        listing = next(r for r in store.requests if r.query.get("period"))
        assert listing.query["period"] == ["C"]
        assert listing.query["time_from"] == [str(int(start.timestamp()))]  # a Unix time
        store.set_order_status(before, "O")
        store.set_order_status(before, "P")  # changed later: still before the start date
        poll.tick()
        assert poll.ids() == []
        assert "before the start date 10/03/2025" in poll.explain(before)


def test_every_filter_is_checked_here_too_whatever_the_store_returned() -> None:
    """A store that ignores a filter (an old version, a plug-in) never gets an order
    imported that the client's filters exclude."""
    from cscart_fm.core.clients import parse_clients
    from schemas.cscart import CartOrder

    settings = parse_clients(
        {"clients": [client_doc("http://store.invalid", orders={
            "start_date": "10/03/2025", "countries": ["AU"], "status_lookback_days": 30})]},
        {"CSCART_FM_TEST_STORE_KEY": "k" * 8},
    )["ACME"]
    filters = order_poll.build_filters(settings, {"P": "Paid", "O": "Open"})
    start = int(datetime(2025, 3, 10, tzinfo=UTC).timestamp())

    def order(**fields: Any) -> CartOrder:
        base = {"order_id": 7, "status": "P", "timestamp": start + DAY, "s_country": "AU",
                "products": {"1": {"product_code": "Test001", "amount": 1, "price": "1"}}}
        return CartOrder.model_validate({**base, **fields})

    everything = order_poll.Lookback()
    assert order_poll.judge(order(), filters, everything) is order_poll.PASS
    cases = {
        "before_start_date": order(timestamp=start - 1),
        "status": order(status="O"),
        "country": order(s_country="NZ"),
        "parent_order": order(is_parent_order="Y"),
    }
    for reason, cart_order in cases.items():
        verdict = order_poll.judge(cart_order, filters, everything)
        assert verdict is not None and verdict.reason == reason
    late = order(updated_at=start + 40 * DAY)
    within = order_poll.Lookback("entered_within", 30 * DAY)
    assert order_poll.judge(late, filters, within).reason == "before_lookback"  # type: ignore[union-attr]
    window = order_poll.Lookback("placed_from", start + 2 * DAY)
    assert order_poll.judge(order(), filters, window).reason == "before_lookback"  # type: ignore[union-attr]
    slim = CartOrder.model_validate({"order_id": 7, "status": "P", "timestamp": start + DAY})
    assert order_poll.judge(slim, filters, everything) is None  # the country needs the order


def test_filters_combined(memory_url: str, sqlite_url: str, store: StoreEmulator) -> None:
    start = int(datetime(2025, 6, 1, tzinfo=SYDNEY).timestamp())
    good = store.add_order(status="P", s_country="NZ", timestamp=start + DAY)
    excluded = {
        "before_start_date": store.add_order(status="P", s_country="NZ", timestamp=start - 1),
        "country": store.add_order(status="P", s_country="US", timestamp=start + DAY),
        "status": store.add_order(status="O", s_country="NZ", timestamp=start + DAY),
    }
    also_good = store.add_order(status="C", s_country="AU", timestamp=start + 2 * DAY)
    orders = {"statuses": ["P", "Complete"], "countries": ["AU", "NZ"],
              "start_date": "01/06/2025", "timezone": "Australia/Sydney", "prefix": "ZZ"}
    with polling(memory_url, sqlite_url, store, orders=orders) as poll:
        poll.tick()
        received = poll.taken()
        assert sorted(o["order_no"] for o in received) == [f"ZZ{good}", f"ZZ{also_good}"]
        placed = {o["cart_order_id"]: o["placed_at"] for o in received}
        assert placed[good] == "2025-06-02T00:00:00+10:00"
        for reason, order_id in excluded.items():
            text = poll.explain(order_id)
            assert order_poll.FILTER_NAMES[reason] in text, text
            assert "NOT IMPORTED" in text


@pytest.mark.parametrize(
    ("start_date", "offset"),
    [
        ("06/04/2025", "+11:00"),  # DST ends at 03:00 that day: midnight is still AEDT
        ("05/10/2025", "+10:00"),  # DST starts at 02:00 that day: midnight is AEST
        ("15/07/2025", "+10:00"),  # winter
        ("15/01/2026", "+11:00"),  # summer
    ],
)
def test_start_date_midnight_edge_in_sydney(
    memory_url: str, sqlite_url: str, start_date: str, offset: str
) -> None:
    day, month, year = (int(part) for part in start_date.split("/"))
    midnight = datetime(year, month, day, tzinfo=SYDNEY)
    start = int(midnight.timestamp())
    emulator = new_store(timezone="Australia/Sydney")
    try:
        last_second_before = emulator.add_order(timestamp=start - 1)  # 23:59:59 the day before
        at_midnight = emulator.add_order(timestamp=start)
        later = emulator.add_order(timestamp=start + 4 * HOUR)  # after the DST change, if any
        orders = {"start_date": start_date, "timezone": "Australia/Sydney"}
        with polling(memory_url, sqlite_url, emulator, orders=orders) as poll:
            poll.tick()
            received = {o["cart_order_id"]: o["placed_at"] for o in poll.taken()}
            assert sorted(received) == [at_midnight, later]
            assert received[at_midnight] == f"{year:04d}-{month:02d}-{day:02d}T00:00:00{offset}"
            assert received[later] == datetime.fromtimestamp(start + 4 * HOUR, SYDNEY).isoformat()
            text = poll.explain(last_second_before)
            assert "23:59:59" in text and "before the start date" in text
    finally:
        emulator.stop()


# --- orders that reach a pulled status later ---------------------------------------------------


@pytest.mark.parametrize("version", [(4, 18), (4, 12)], ids=["updated_at", "no-updated_at"])
def test_an_order_paid_after_it_was_placed_is_imported_when_it_is(
    memory_url: str, sqlite_url: str, version: tuple[int, int]
) -> None:
    emulator = new_store(version=version)
    try:
        early = emulator.add_order(status="P", timestamp=now() - 2 * HOUR)
        unpaid = emulator.add_order(status="O", timestamp=now() - HOUR)
        with polling(memory_url, sqlite_url, emulator) as poll:
            poll.tick()
            assert poll.ids() == [early]
            poll.tick()
            assert poll.ids() == []
            emulator.set_order_status(unpaid, "P")  # paid an hour after placement
            poll.tick()
            received = poll.taken()
            assert [o["cart_order_id"] for o in received] == [unpaid]
            assert received[0]["cart_status"] == "P"
            poll.tick()
            assert poll.ids() == []
            if version < (4, 13):
                # No get_orders_data: one detail call per imported order, none for the others.
                emulator.clear_log()
                poll.tick()
                assert emulator.count("orders.get") == 0
    finally:
        emulator.stop()


@pytest.mark.parametrize("version", [(4, 18), (4, 12)], ids=["updated_at", "no-updated_at"])
def test_an_order_paid_after_the_lookback_is_not_imported(
    memory_url: str, sqlite_url: str, version: tuple[int, int]
) -> None:
    emulator = new_store(version=version)
    try:
        old = emulator.add_order(status="O", timestamp=now() - 40 * DAY)
        recent = emulator.add_order(status="O", timestamp=now() - 10 * DAY)
        orders = {"status_lookback_days": 30}
        with polling(memory_url, sqlite_url, emulator, orders=orders) as poll:
            poll.tick()
            assert poll.ids() == []
            emulator.set_order_status(old, "P")
            emulator.set_order_status(recent, "P")
            poll.tick()
            assert poll.ids() == [recent]
            text = poll.explain(old)
            assert "status lookback" in text and "NOT IMPORTED" in text
    finally:
        emulator.stop()


def test_an_order_paid_while_a_long_listing_runs_is_imported_next_tick(
    memory_url: str, sqlite_url: str, store: StoreEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order changes behind the reader's page (lower id) while later orders change too:
    the watermark must not move past it. The overlap is taken away to show the watermark
    itself never passes the store's clock at the start of the listing."""
    monkeypatch.setattr(listing, "OVERLAP_SECONDS", 0)
    behind = store.add_order(status="O", timestamp=now() - DAY)
    first = store.add_order(status="P", timestamp=now() - DAY)
    with polling(memory_url, sqlite_url, store, limits={"page_size": 5}) as poll:
        poll.tick()
        assert poll.ids() == [first]
        time.sleep(1.1)
        fresh = [store.add_order(status="P", timestamp=now() - 60) for _ in range(20)]
        store.set_fault("orders.list", Fault(latency=0.6))

        def change_during_the_listing() -> None:
            wait_for(lambda: any(r.query.get("page") == ["2"] for r in store.requests), 30)
            store.set_order_status(behind, "P")  # behind the reader: not listed by this pass
            time.sleep(1.1)
            store.set_order_status(fresh[-1], "O")  # read later, changed a second later

        changer = threading.Thread(target=change_during_the_listing)
        changer.start()
        poll.tick()
        changer.join()
        store.clear_faults()
        assert poll.ids() == fresh[:-1]
        poll.tick()
        assert poll.ids() == [behind]


def test_an_order_leaving_the_listing_while_it_is_read_shifts_no_order_out(
    memory_url: str, sqlite_url: str, store: StoreEmulator
) -> None:
    """CS-Cart pages by offset: orders on page 1 leaving the status filter (FM's shipments
    complete them) while page 2 is requested would shift page 2 back, and the orders sliding
    over the page boundary would never be read. The listing pages by placement time instead
    (each request continues after the last order read), so nothing shifts."""
    ids = [store.add_order(status="P", timestamp=now() - 2 * DAY + i) for i in range(40)]
    store.set_fault("orders.list", Fault(latency=0.3))

    def ship_page_one() -> None:
        wait_for(
            lambda: any(
                r.query.get("page") == ["1"] and r.query.get("status[]") for r in store.requests
            ),
            30,
        )
        for order_id in ids[:3]:
            store.set_order_status(order_id, "C")

    with polling(memory_url, sqlite_url, store, limits={"page_size": 10}) as poll:
        shipper = threading.Thread(target=ship_page_one)
        shipper.start()
        poll.tick()
        shipper.join()
        store.clear_faults()
        received = poll.ids()
        assert received == ids  # all in one tick, none twice
        listing = [r for r in store.requests if r.endpoint == "orders.list"]
        assert all(r.query["page"] == ["1"] and r.query["period"] == ["C"] for r in listing)
        poll.tick()
        poll.tick()
        assert poll.ids() == []


# --- volume and cost ----------------------------------------------------------------------------


def test_1200_orders_at_the_stores_default_page_size_are_imported_once(
    memory_url: str, sqlite_url: str, store: StoreEmulator
) -> None:
    store.add_history(1200, start_timestamp=now() - 3 * DAY, step_seconds=90, status="P")
    store.add_history(300, start_timestamp=now() - 3 * DAY, step_seconds=90, status="C")
    with polling(memory_url, sqlite_url, store, limits={"page_size": 10}) as poll:
        started = time.monotonic()
        poll.tick(timeout=180)
        seconds = time.monotonic() - started
        received = poll.taken()
        ids = [o["cart_order_id"] for o in received]
        assert len(ids) == len(set(ids)) == 1200
        pages = [r for r in store.requests if r.endpoint == "orders.list"]
        # 1,200 orders in pages of 10, each read once; the time ranges read side by side
        # each end on a partial page, a few calls more than the fewest (120).
        assert 120 <= len(pages) <= 132
        assert all(r.query["sort_by"] == ["date"] and r.query["sort_order"] == ["asc"]
                   for r in pages)
        assert store.count("orders.get") == 0  # full orders came in the pages
        print(f"\n1,200 orders at 10 per page imported in {seconds:.1f} s "
              f"({store.count()} store requests, {len(pages)} list pages)")
        poll.tick()
        poll.tick()
        assert poll.taken() == []


@pytest.mark.parametrize("version", [(4, 18), (4, 12)], ids=["updated_at", "no-updated_at"])
def test_an_idle_tick_costs_the_same_with_1000_or_100000_orders_in_the_store(
    memory_url: str, tmp_path: Path, version: tuple[int, int]
) -> None:
    calls: dict[int, Counter[str]] = {}
    for history in (1_000, 100_000):
        emulator = new_store(version=version)
        try:
            # Years of completed orders, placed after the start date, and a few recent ones.
            emulator.add_history(
                history, start_timestamp=now() - 400 * DAY,
                step_seconds=(399 * DAY) // history, status="C",
            )
            recent = [emulator.add_order(status="P", timestamp=now() - HOUR) for _ in range(3)]
            state = f"sqlite:///{tmp_path / f'state-{history}.sqlite'}"
            with polling(memory_url, state, emulator) as poll:
                poll.tick()
                assert poll.ids() == recent
                poll.tick()  # the poll after the first one
                emulator.clear_log()
                poll.tick()  # idle
                calls[history] = Counter(str(r.endpoint) for r in emulator.requests)
                assert poll.taken() == []
        finally:
            emulator.stop()
    print(f"\nidle tick store requests ({version}): 1,000 → {dict(calls[1_000])}, "
          f"100,000 → {dict(calls[100_000])}")
    assert calls[1_000] == calls[100_000]
    assert calls[100_000] == Counter({"orders.list": 1})


# --- failures -------------------------------------------------------------------------------------


@pytest.mark.broker
def test_a_store_error_mid_tick_retries_the_tick_and_every_order_arrives_once(
    broker_url: str, sqlite_url: str, store: StoreEmulator
) -> None:
    ids = [store.add_order(status="P", timestamp=now() - DAY + i) for i in range(50)]
    store.set_fault("orders.list", Fault(latency=0.1))
    imported = metrics.ORDERS_IMPORTED.labels("ACME")
    start = imported._value.get()

    def break_the_store() -> None:
        wait_for(lambda: imported._value.get() - start >= 10, 60)
        store.set_fault("orders.list", Fault(error_rate=1.0, error_status=503))

    retries = metrics.MESSAGES.labels("order-poll", "retry")
    retried = retries._value.get()
    with polling(broker_url, sqlite_url, store, limits={"page_size": 10}) as poll:
        breaker = threading.Thread(target=break_the_store)
        breaker.start()
        publish_json(broker_url, tick_body(), "order-poll.tick")
        breaker.join()
        wait_for(lambda: retries._value.get() > retried, 60)  # not dropped: retried later
        assert depth(broker_url, DLQ) == 0
        store.clear_faults()
        wait_for(lambda: depth(broker_url, FM_QUEUE) >= 50, 60)
        poll.tick()
        received = poll.ids()
        assert received == ids


def test_an_attempt_after_a_store_error_mid_tick_imports_only_what_is_left(
    memory_url: str, sqlite_url: str, store: StoreEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule the retry above rests on, with the handler called directly, one call per
    attempt (the delay between them is the broker tier's): a 503 on the third page fails the
    attempt with a retryable error once the pages before it are at FM and recorded; the next
    attempt imports the rest, none twice, and a later tick nothing."""
    ids = [store.add_order(status="P", timestamp=now() - DAY + i) for i in range(50)]
    # One page in flight at a time, so that the fault meets the third page and no other.
    doc = client_doc(store.url, limits={"page_size": 10, "concurrency": 1})
    original = CsCartClient._order_page
    pages = 0

    def third_page_fails(self: CsCartClient, *args: Any, **kwargs: Any) -> Any:
        nonlocal pages
        pages += 1
        if pages == 3:
            store.set_fault("orders.list", Fault(error_rate=1.0, error_status=503))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CsCartClient, "_order_page", third_page_fails)
    declare(memory_url)
    services = make_services(memory_url, sqlite_url, [doc])
    handler = JOBS.named("order-poll").build(services)
    tick = tick_body()
    try:
        with pytest.raises(StoreUnreachable) as caught:
            deliver(handler, tick)
        assert caught.value.fate is Fate.RETRY  # not dropped: retried later
        first = sorted(o["cart_order_id"] for o in take_imported(memory_url))
        assert first == ids[:20]  # the two pages read before the error
        published = {r.cart_order_id for r in rows(services, imported_orders)
                     if r.state == "published"}
        assert published == set(first)  # recorded: the next attempt does not send them again
        store.clear_faults()
        deliver(handler, tick, 2)
        rest = sorted(o["cart_order_id"] for o in take_imported(memory_url))
        assert rest == ids[20:]
        deliver(handler, tick_body())
        assert take_imported(memory_url) == []
    finally:
        services.close()


def test_a_status_the_store_does_not_have_is_reported_and_the_others_still_pulled(
    memory_url: str, sqlite_url: str, store: StoreEmulator
) -> None:
    paid = store.add_order(status="P", timestamp=now() - HOUR)
    with polling(memory_url, sqlite_url, store, orders={"statuses": ["P", "Shipped-ish"]}) as poll:
        poll.tick()
        assert poll.ids() == [paid]
        assert "Shipped-ish" in poll.explain(paid)


def test_no_status_the_store_has_dead_letters_the_tick_naming_the_settings(
    bus_url: str, sqlite_url: str, store: StoreEmulator
) -> None:
    store.add_order(status="P", timestamp=now() - HOUR)
    with polling(bus_url, sqlite_url, store, orders={"statuses": ["Paid in gold"]}) as poll:
        poll.tick(outcome="dead_letter")
        [dead] = drain(bus_url, DLQ)
        assert dead.headers["cscart-error-type"] == "store-refused"
        assert "Paid in gold" in dead.headers["cscart-reason"]
        assert "orders.statuses" in dead.headers["cscart-action"]
        assert poll.taken() == []


def test_multi_vendor_parent_order_is_not_imported_beside_its_vendor_orders(
    memory_url: str, sqlite_url: str, store: StoreEmulator
) -> None:
    placed = now() - HOUR
    parent = store.add_order(status="P", timestamp=placed, is_parent_order="Y")
    vendors = [
        store.add_order(status="P", timestamp=placed, parent_order_id=parent, company_id=2),
        store.add_order(status="P", timestamp=placed, parent_order_id=parent, company_id=3),
    ]
    with polling(memory_url, sqlite_url, store) as poll:
        poll.tick()
        assert poll.ids() == vendors
        text = poll.explain(parent)
        assert "Multi-Vendor parent order" in text and "NOT IMPORTED" in text
        assert f"vendor order of parent order {parent}" in poll.explain(vendors[0])


def test_an_order_the_contract_cannot_carry_is_skipped_with_the_field_and_the_rest_imported(
    memory_url: str, sqlite_url: str, store: StoreEmulator
) -> None:
    """A quantity beyond what the contract allows (a typing slip in the store's admin): that
    order is not published (FM would refuse it), explain names the field, and the tick
    imports the others."""
    placed = now() - HOUR
    good = store.add_order(status="P", timestamp=placed)
    bad = store.add_order(status="P", timestamp=placed + 1,
                          products=[{"product_code": "Test001", "amount": 20_000_000,
                                     "price": "10.00", "product": "Test item 1"}])
    with polling(memory_url, sqlite_url, store) as poll:
        poll.tick()
        assert poll.ids() == [good]
        text = poll.explain(bad)
        assert "NOT IMPORTED" in text and "contract mapping" in text
        assert "lines.0.quantity" in text
        poll.tick()
        assert poll.ids() == []


def test_a_tick_for_a_client_being_polled_is_acknowledged_as_covered(
    memory_url: str, sqlite_url: str, store: StoreEmulator
) -> None:
    """Two ticks at once in one process (two worker threads): one polls, the other finds the
    client's lock held, counts it and acknowledges the tick."""
    ids = [store.add_order(status="P", timestamp=now() - DAY + i) for i in range(30)]
    store.set_fault("orders.list", Fault(latency=0.3))
    busy = metrics.POLLS_SKIPPED_BUSY.labels("ACME")
    ok = metrics.MESSAGES.labels("order-poll", "ok")
    busy_before, ok_before = busy._value.get(), ok._value.get()
    with polling(memory_url, sqlite_url, store, limits={"page_size": 10}) as poll:
        assert poll.runtime.options.concurrency == 2
        for _ in range(2):
            publish_json(memory_url, tick_body(), "order-poll.tick")
        wait_for(lambda: ok._value.get() - ok_before >= 2, 60)
        assert busy._value.get() - busy_before == 1
        assert poll.ids() == ids


# --- explain --------------------------------------------------------------------------------------


def test_explain_says_when_and_as_what_or_which_filter(
    memory_url: str, sqlite_url: str, store: StoreEmulator, tmp_path: Path
) -> None:
    imported = store.add_order(status="P", s_country="AU", timestamp=now() - HOUR)
    elsewhere = store.add_order(status="P", s_country="US", timestamp=now() - HOUR)
    doc = client_doc(store.url, orders={"countries": ["AU"], "timezone": "Australia/Sydney"})
    with polling(memory_url, sqlite_url, store,
                 orders={"countries": ["AU"], "timezone": "Australia/Sydney"}) as poll:
        poll.tick()
        assert poll.ids() == [imported]
        waiting = store.add_order(status="P", s_country="AU", timestamp=now() - 60)
    env = cli_env(memory_url, sqlite_url, write_clients_file(tmp_path / "c.yaml", [doc]))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cscart_fm.cli", "explain", *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )

    shown = run("ACME", f"CS{imported}")
    assert shown.returncode == 0, shown.stderr
    assert "IMPORTED: published to FM on" in shown.stdout
    assert f"as CS{imported} (event_id {order_event_id('ACME', imported)})" in shown.stdout
    assert "(AEDT)" in shown.stdout or "(AEST)" in shown.stdout  # the client's time zone
    shown = run("ACME", str(elsewhere))
    assert shown.returncode == 0
    assert "the countries filter excluded it: ships to US" in shown.stdout
    shown = run("ACME", str(waiting))
    assert f"passes every filter: the next tick imports it as CS{waiting}" in shown.stdout
    shown = run("ACME", "999999")
    assert "The store has no order 999999" in shown.stdout
    for text in (shown.stdout, shown.stderr):
        assert API_KEY not in text and "jane@example.com" not in text
    unknown = run("NOPE", "1")
    assert unknown.returncode == 2
    assert "'NOPE' is not in the clients file" in unknown.stderr


# --- crashes and replicas -------------------------------------------------------------------------


def _state_for(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'state.sqlite'}"
    url = request.getfixturevalue("postgres_database")
    from cscart_fm.core.state import metadata

    def clean() -> None:
        engine = sa.create_engine(url)
        metadata.drop_all(engine)
        engine.dispose()

    clean()  # a clean state store for this test
    request.addfinalizer(clean)  # and for the next one (``state_url`` does not clean first)
    return url


def _check_fm_received_each_once(
    received: list[dict[str, Any]], expected: list[int], *, copies_allowed: bool
) -> int:
    """Every order at FM; copies only with the same event_id (and body). Returns copies."""
    by_order: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for body in received:
        by_order[body["cart_order_id"]].append(body)
    assert sorted(by_order) == sorted(expected)
    copies = 0
    for order_id, bodies in by_order.items():
        event_id = order_event_id("ACME", order_id)
        assert {b["_message_id"] for b in bodies} == {event_id}
        assert {b["event_id"] for b in bodies} == {event_id}
        assert len({json.dumps(b, sort_keys=True) for b in bodies}) == 1  # the same message
        copies += len(bodies) - 1
    if not copies_allowed:
        assert copies == 0
    return copies


def _wait_for_all(broker_url: str, expected: list[int], taken: list[dict[str, Any]],
                  timeout: float = 90) -> None:
    wanted = set(expected)

    def arrived() -> bool:
        taken.extend(take_imported(broker_url))
        return wanted <= {b["cart_order_id"] for b in taken}

    wait_for(arrived, timeout=timeout, interval=0.2)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


CRASH_STEPS = [
    ("list", 25, "sqlite"),      # 2 pages done, the 3rd read and not claimed
    ("claim", 2, "sqlite"),      # page 2 claimed, nothing of it published
    ("publish", 2, "sqlite"),    # page 2 published, none of page 2 recorded
    ("mark", 2, "sqlite"),       # 2 pages recorded, the 3rd claimed and not published
    ("watermark", 1, "sqlite"),  # every order done, the run not recorded
    ("publish", 2, "postgresql"),
    ("list", 25, "postgresql"),
]
"""Where a run dies (``tests/support/order_poll_crash.py``), and on which state store."""


def _check_copies(step: str, copies: int) -> None:
    """The copies FM may get after a run died at ``step``, all with the same event_id."""
    if step == "publish":
        assert copies >= 1  # published, not recorded: sent again, with the same event_id
    if step == "list":
        # The page before was published and its confirms were awaited beside this page's
        # judging: at most that one page is sent again, with the same event_ids.
        assert copies <= 10
    if step in ("claim", "mark", "watermark"):
        assert copies == 0  # nothing was published without being recorded


@pytest.mark.broker
@pytest.mark.postgres
@pytest.mark.parametrize(("step", "n", "backend"), CRASH_STEPS)
def test_kill_9_at_each_step_of_a_run_loses_no_order(
    broker_url: str, store: StoreEmulator, tmp_path: Path, request: pytest.FixtureRequest,
    step: str, n: int, backend: str,
) -> None:
    state_url = _state_for(backend, request, tmp_path)
    ids = [store.add_order(status="P", timestamp=now() - DAY + i) for i in range(40)]
    clients = write_clients_file(
        tmp_path / "clients.yaml", [client_doc(store.url, limits={"page_size": 10})]
    )
    marker = tmp_path / "crashed"
    env = cli_env(broker_url, state_url, clients, CSCART_FM_TEST_CRASH_MARKER=str(marker))
    declare(broker_url)
    publish_json(broker_url, tick_body(), "order-poll.tick")
    crashing = subprocess.Popen(
        [sys.executable, "-m", "tests.support.order_poll_crash", step, str(n)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "crash.log", "ab"),  # noqa: SIM115
    )
    assert crashing.wait(timeout=90) == -signal.SIGKILL, (tmp_path / "crash.log").read_text()
    assert marker.read_text().startswith(step)
    taken = take_imported(broker_url)
    before = {b["cart_order_id"] for b in taken}
    assert len(before) < 40 or step == "watermark"

    # The tick the dead process held comes back; a fresh process finishes the job.
    process = start_cli(["run", "order-poll"], env, tmp_path / "run.log")
    try:
        _wait_for_all(broker_url, ids, taken)
        publish_json(broker_url, tick_body(), "order-poll.tick")  # and a later tick adds nothing
        wait_for(lambda: depth(broker_url, TICKS) == 0, 30)
        time.sleep(1.0)
        taken.extend(take_imported(broker_url))
    finally:
        _stop(process)
    taken.extend(take_imported(broker_url))
    copies = _check_fm_received_each_once(taken, ids, copies_allowed=True)
    _check_copies(step, copies)


class Crash(BaseException):
    """A kill -9 in this process: no code of the run runs after it (clean-ups that handle
    ``Exception``, as the outbox's pipeline does, never see it)."""


@pytest.mark.postgres
@pytest.mark.parametrize(("step", "n", "backend"), CRASH_STEPS)
def test_a_run_that_dies_at_each_step_loses_no_order_once_its_tick_comes_back(
    memory_url: str, store: StoreEmulator, tmp_path: Path, request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch, step: str, n: int, backend: str,
) -> None:
    """The rules the kill -9 test above rests on, in this process: a run dies at each step
    (a ``Crash``), then a fresh process's services on the same state store get the tick
    again (RabbitMQ's redelivery, in the broker tier) and finish the job."""
    state_url = _state_for(backend, request, tmp_path)
    ids = [store.add_order(status="P", timestamp=now() - DAY + i) for i in range(40)]
    doc = client_doc(store.url, limits={"page_size": 10})
    declare(memory_url)
    tick = tick_body()
    died: list[int] = []

    def die(hits: int) -> None:
        died.append(hits)
        raise Crash(step)

    dying = make_services(memory_url, state_url, [doc])
    try:
        with monkeypatch.context() as patch:
            order_poll_crash.arm(step, n, die, patch.setattr)
            with pytest.raises(Crash):
                deliver(JOBS.named("order-poll").build(dying), tick)
    finally:
        dying.close()  # the dead process's connections go with it
    assert died  # the run got to the step and died there
    taken = take_imported(memory_url)
    before = {b["cart_order_id"] for b in taken}
    assert len(before) < 40 or step == "watermark"

    fresh = make_services(memory_url, state_url, [doc])
    try:
        handler = JOBS.named("order-poll").build(fresh)
        deliver(handler, tick, redelivered=True)  # the tick the dead process held
        deliver(handler, tick_body())  # and a later tick adds nothing
    finally:
        fresh.close()
    taken.extend(take_imported(memory_url))
    copies = _check_fm_received_each_once(taken, ids, copies_allowed=True)
    _check_copies(step, copies)


@pytest.mark.broker
@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill_9_of_a_slow_consumer_process_at_any_moment_loses_no_order(
    broker_url: str, store: StoreEmulator, tmp_path: Path, request: pytest.FixtureRequest,
    backend: str,
) -> None:
    state_url = _state_for(backend, request, tmp_path)
    ids = [store.add_order(status="P", timestamp=now() - DAY + i) for i in range(60)]
    store.set_fault("orders.list", Fault(latency=0.15))
    clients = write_clients_file(
        tmp_path / "clients.yaml", [client_doc(store.url, limits={"page_size": 5})]
    )
    env = cli_env(broker_url, state_url, clients)
    declare(broker_url)
    publish_json(broker_url, tick_body(), "order-poll.tick")
    taken: list[dict[str, Any]] = []
    for kill_at in (15, 35):
        process = start_cli(["run", "order-poll"], env, tmp_path / "run.log")

        def published(at: int = kill_at) -> bool:
            taken.extend(take_imported(broker_url))
            return len({b["cart_order_id"] for b in taken}) >= at

        wait_for(published, timeout=90, interval=0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    store.clear_faults()
    process = start_cli(["run", "order-poll"], env, tmp_path / "run.log")
    try:
        _wait_for_all(broker_url, ids, taken)
        wait_for(lambda: depth(broker_url, TICKS) == 0, 30)
        time.sleep(1.0)
    finally:
        _stop(process)
    taken.extend(take_imported(broker_url))
    _check_fm_received_each_once(taken, ids, copies_allowed=True)


@pytest.mark.broker
@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_consumer_processes_on_the_same_client_publish_each_order_once(
    broker_url: str, store: StoreEmulator, tmp_path: Path, request: pytest.FixtureRequest,
    backend: str,
) -> None:
    state_url = _state_for(backend, request, tmp_path)
    ids = [store.add_order(status="P", timestamp=now() - DAY + i) for i in range(80)]
    store.set_fault("orders.list", Fault(latency=0.1))
    clients = write_clients_file(
        tmp_path / "clients.yaml", [client_doc(store.url, limits={"page_size": 10})]
    )
    env = cli_env(broker_url, state_url, clients)
    declare(broker_url)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    processes = [start_cli(["run", "order-poll"], env, log) for log in logs]
    taken: list[dict[str, Any]] = []
    try:
        wait_for(lambda: all(b"consuming" in log.read_bytes() for log in logs if log.exists())
                 and all(log.exists() for log in logs), 60)
        for _ in range(6):
            publish_json(broker_url, tick_body(), "order-poll.tick")
        _wait_for_all(broker_url, ids, taken)
        wait_for(lambda: depth(broker_url, TICKS) == 0, 60)
        for _ in range(2):  # more ticks once the first polls are over: nothing new
            publish_json(broker_url, tick_body(), "order-poll.tick")
        wait_for(lambda: depth(broker_url, TICKS) == 0, 60)
        time.sleep(1.5)
    finally:
        for process in processes:
            _stop(process)
    taken.extend(take_imported(broker_url))
    _check_fm_received_each_once(taken, ids, copies_allowed=False)
    text = "".join(log.read_text() for log in logs)
    assert "another replica is polling this client now" in text  # they did run at once
    assert text.count('"order poll done"') >= 2


@pytest.mark.postgres
def test_two_replicas_taking_ticks_of_one_client_at_once_publish_each_order_once(
    memory_url: str, state_url: str, store: StoreEmulator
) -> None:
    """The rule the two-process test above rests on, in this process: two replicas, each
    with its own services (state store connections, lock handles, publisher), take ticks of
    one client at once; one polls, the other finds the client's lock held, and FM gets each
    order once."""
    ids = [store.add_order(status="P", timestamp=now() - DAY + i) for i in range(80)]
    store.set_fault("orders.list", Fault(latency=0.1))
    doc = client_doc(store.url, limits={"page_size": 10})
    declare(memory_url)
    busy = metrics.POLLS_SKIPPED_BUSY.labels("ACME")
    busy_before = busy._value.get()
    replicas = [make_services(memory_url, state_url, [doc]) for _ in range(2)]
    errors: list[BaseException] = []
    together = threading.Barrier(2)  # both replicas' first ticks at once

    def ticks(handler: Any) -> None:
        try:
            together.wait(timeout=30)
            for _ in range(3):
                deliver(handler, tick_body())
        except BaseException as exc:  # reported on the test's thread
            errors.append(exc)

    try:
        handlers = [JOBS.named("order-poll").build(services) for services in replicas]
        threads = [threading.Thread(target=ticks, args=(handler,)) for handler in handlers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
        assert errors == []
        for handler in handlers:  # more ticks once the first polls are over: nothing new
            deliver(handler, tick_body())
    finally:
        for services in replicas:
            services.close()
    _check_fm_received_each_once(take_imported(memory_url), ids, copies_allowed=False)
    assert busy._value.get() > busy_before  # they did run at once
