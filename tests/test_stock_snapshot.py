"""The stock-snapshot consumer end to end: the CS-Cart store emulator, the state store (SQLite,
and PostgreSQL where state matters), kombu's in-process broker for the rules, and a real
RabbitMQ where a retry, two replicas or `cscart-fm run` killed mid-snapshot is what is tested.

Store calls are counted from the emulator's request log, never timed."""

from __future__ import annotations

import math
import signal
import subprocess
import threading
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from consumers.stock_snapshot.handler import (
    MIN_LISTING_PAGE,
    StockSnapshotHandler,
    stock_product_map,
    stock_reports,
    target_quantities,
)
from cscart_emulator import Fault, StoreEmulator
from cscart_fm.cli.wiring import Services, open_state
from cscart_fm.core import metrics
from cscart_fm.core.errors import StoreUnreachable
from cscart_fm.core.events import parse_event
from cscart_fm.core.runtime import Delivery
from cscart_fm.core.state import StateStore
from schemas.messages import StockItem
from schemas.settings import StockSettings

from .support.broker import declare, depth, publish_json, wait_for
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
from .support.stock_store import sku_of, store_in_child

QUEUE = "cscart.stock-snapshot"
DLQ = "cscart.stock-snapshot.dlq"
T1 = "2026-11-23T02:00:00+11:00"
T2 = "2026-11-23T03:00:00+11:00"  # an hour after T1
T3 = "2026-11-23T04:00:00+11:00"


# --- helpers ---------------------------------------------------------------------------------


def item(sku: str, on_hand: int, available: int | None = None) -> dict[str, Any]:
    return {"sku": sku, "on_hand": on_hand, "available": on_hand if available is None else available}


def snapshot(
    items: list[dict[str, Any]], taken_at: str = T1, event_id: str | None = None
) -> dict[str, Any]:
    return {
        "type": "stock.snapshot",
        "version": 1,
        "event_id": event_id or f"snap-{uuid.uuid4().hex[:12]}",
        "client_id": "ACME",
        "taken_at": taken_at,
        "items": items,
    }


def send(broker_url: str, body: dict[str, Any]) -> str:
    publish_json(broker_url, body, "stock.snapshot")
    return str(body["event_id"])


def metric(counter: Any, client: str = "ACME") -> float:
    return float(counter.labels(client)._value.get())


@contextmanager
def store(version: tuple[int, int] = (4, 18)) -> Iterator[StoreEmulator]:
    emu = StoreEmulator(api_user=API_USER, api_key=API_KEY, version=version)
    with emu:
        yield emu
    assert emu.errors == []


@contextmanager
def pipeline(
    broker_url: str, state_url: str, emu: StoreEmulator, **stock: Any
) -> Iterator[Services]:
    """The stock consumer running in this process for one client (ACME) of the emulator."""
    declare(broker_url)
    stock = {"update_stock": True, "quantity": "on_hand", "negative_as_zero": False, **stock}
    services = make_services(broker_url, state_url, [client_doc(emu.url, stock=stock)])
    try:
        with consumer(services, "stock-snapshot"):
            yield services
    finally:
        services.close()


def report(state: StateStore, event_id: str, timeout: float = 30) -> dict[str, Any]:
    """The stock report of a message, once its handling completed."""

    def read() -> dict[str, Any] | None:
        with state.engine.connect() as conn:
            row = conn.execute(
                sa.select(stock_reports).where(stock_reports.c.event_id == event_id)
            ).first()
        return dict(row._mapping) if row is not None else None

    found: dict[str, Any] = wait_for(read, timeout=timeout)
    return found


def apply(broker_url: str, services: Services, body: dict[str, Any]) -> dict[str, Any]:
    """Publish one snapshot and wait for its report (and its acknowledgement)."""
    found = report(services.state, send(broker_url, body))
    wait_for(lambda: depth(broker_url, QUEUE) == 0)
    return found


def product_puts(emu: StoreEmulator) -> Counter[int]:
    """Successful quantity writes per product id."""
    return Counter(
        int(r.path.rsplit("/", 1)[1])
        for r in emu.requests
        if r.endpoint == "products.update" and r.status == 200
    )


def amount(emu: StoreEmulator, code: str) -> int:
    product = emu.product_by_code(code)
    assert product is not None, code
    return int(product["amount"])


def catalogue_reads(emu: StoreEmulator) -> int:
    """Product listings without a pcode filter (pages of the whole catalogue)."""
    return sum(
        1 for r in emu.requests if r.endpoint == "products.list" and "pcode" not in r.query
    )


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.sqlite'}"


# --- what is pushed ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stock", "expected"),
    [
        ({"quantity": "on_hand"}, {"A": 5, "B": -1}),
        ({"quantity": "available"}, {"A": 2, "B": -3}),
        ({"quantity": "available", "negative_as_zero": True}, {"A": 2, "B": 0}),
    ],
)
def test_target_quantities_per_setting_last_duplicate_wins(
    stock: dict[str, Any], expected: dict[str, int]
) -> None:
    settings = StockSettings(update_stock=True, **stock)
    items = [
        StockItem(sku="B", on_hand=9, available=9),
        StockItem(sku="A", on_hand=5, available=2),
        StockItem(sku="B ", on_hand=-1, available=-3),  # the same code: the last one wins
    ]
    targets = target_quantities(items, settings)
    assert targets == expected
    assert list(targets) == ["A", "B"]  # in the order of the last occurrence



@pytest.mark.parametrize(("mode", "expected"), [("on_hand", (25, 3)), ("available", (20, 1))])
def test_pushes_on_hand_or_available_as_the_client_chose(
    memory_url: str, sqlite_url: str, mode: str, expected: tuple[int, int]
) -> None:
    with store() as emu:
        emu.add_product("Test001", 0)
        emu.add_product("Test002", 0)
        with pipeline(memory_url, sqlite_url, emu, quantity=mode) as services:
            found = apply(
                memory_url,
                services,
                snapshot(
                    [
                        item("Test001", 25, 20),
                        item("Test002", 99, 99),  # repeated below: the last one wins
                        item("Test002", 3, 1),
                    ]
                ),
            )
        assert (amount(emu, "Test001"), amount(emu, "Test002")) == expected
        assert found["items"] == 3 and found["written"] == 2 and found["unknown"] == 0
        assert sum(product_puts(emu).values()) == 2


@pytest.mark.parametrize(("negative_as_zero", "expected"), [(True, 0), (False, -2)])
def test_negative_available_is_pushed_as_zero_only_when_asked(
    memory_url: str, sqlite_url: str, negative_as_zero: bool, expected: int
) -> None:
    with store() as emu:
        emu.add_product("Test002", 7)
        emu.add_product("Test003", 7)
        with pipeline(
            memory_url, sqlite_url, emu, quantity="available", negative_as_zero=negative_as_zero
        ) as services:
            apply(memory_url, services, snapshot([item("Test002", 3, -2), item("Test003", 5, 4)]))
        assert amount(emu, "Test002") == expected
        assert amount(emu, "Test003") == 4


def test_update_stock_off_acknowledges_counts_and_writes_nothing(
    memory_url: str, sqlite_url: str
) -> None:
    with store() as emu:
        emu.add_product("Test001", 7)
        ignored = metric(metrics.STOCK_SNAPSHOTS_IGNORED)
        with pipeline(memory_url, sqlite_url, emu, update_stock=False) as services:
            event_id = send(memory_url, snapshot([item("Test001", 25)]))
            wait_for(lambda: metric(metrics.STOCK_SNAPSHOTS_IGNORED) == ignored + 1)
            wait_for(lambda: depth(memory_url, QUEUE) == 0)
            with services.state.engine.connect() as conn:
                reports = conn.execute(
                    sa.select(stock_reports).where(stock_reports.c.event_id == event_id)
                ).all()
        assert emu.requests == []  # not a read, not a write
        assert amount(emu, "Test001") == 7
        assert reports == []
        assert depth(memory_url, DLQ) == 0


def test_unchanged_quantities_are_not_written(memory_url: str, sqlite_url: str) -> None:
    with store() as emu:
        for n in range(1, 6):
            emu.add_product(f"SKU-{n}", 10)
        items = [item(f"SKU-{n}", 10) for n in range(1, 6)]
        items[1] = item("SKU-2", 4)
        before = metric(metrics.STOCK_UNCHANGED)
        with pipeline(memory_url, sqlite_url, emu) as services:
            first = apply(memory_url, services, snapshot(items, T1))
            assert product_puts(emu) == Counter({emu.product_by_code("SKU-2")["product_id"]: 1})  # type: ignore[index]
            assert (first["written"], first["unchanged"]) == (1, 4)
            # The same quantities again (a later snapshot, then a redelivered copy of it):
            emu.clear_log()
            body = snapshot(items, T2)
            second = apply(memory_url, services, body)
            again = apply(memory_url, services, body)  # equal taken_at: proceeds, idempotent
        assert product_puts(emu) == Counter()
        assert (second["written"], second["unchanged"], second["stale"]) == (0, 5, 0)
        assert (again["written"], again["unchanged"], again["stale"]) == (0, 5, 0)
        assert metric(metrics.STOCK_UNCHANGED) - before == 4 + 5 + 5


# --- order of snapshots --------------------------------------------------------------------------


@pytest.mark.postgres
def test_an_older_snapshot_after_a_newer_one_leaves_the_newer(
    memory_url: str, state_url: str
) -> None:
    with store() as emu:
        a = emu.add_product("A", 0)
        emu.add_product("B", 0)
        stale_before = metric(metrics.STOCK_STALE)
        with pipeline(memory_url, state_url, emu) as services:
            apply(memory_url, services, snapshot([item("A", 5)], T2))
            # Late: taken an hour earlier. A was set since; B was not.
            late = apply(memory_url, services, snapshot([item("A", 9), item("B", 9)], T1))
        assert amount(emu, "A") == 5
        assert amount(emu, "B") == 9
        assert product_puts(emu)[a] == 1
        assert (late["stale"], late["written"]) == (1, 1)
        assert metric(metrics.STOCK_STALE) - stale_before == 1


@pytest.mark.postgres
def test_snapshots_in_order_apply_each_in_turn(memory_url: str, state_url: str) -> None:
    with store() as emu:
        a = emu.add_product("A", 0)
        with pipeline(memory_url, state_url, emu) as services:
            apply(memory_url, services, snapshot([item("A", 9)], T1))
            assert amount(emu, "A") == 9
            later = apply(memory_url, services, snapshot([item("A", 5)], T2))
        assert amount(emu, "A") == 5
        assert product_puts(emu)[a] == 2
        assert later["stale"] == 0


@pytest.mark.broker
@pytest.mark.postgres
def test_two_replicas_never_let_an_older_snapshot_win(broker_url: str, state_url: str) -> None:
    """Two consumers on one queue take an older and a newer snapshot at the same time: the
    client's stock lock serialises them, so whichever runs first, the newer quantities stay."""
    skus = [f"R-{n}" for n in range(8)]
    with store() as emu:
        for sku in skus:
            emu.add_product(sku, 0)
        emu.set_fault("products.update", Fault(latency=0.03))  # long enough to overlap
        declare(broker_url)
        doc = [client_doc(emu.url, stock={"update_stock": True, "quantity": "on_hand"})]
        replicas = [make_services(broker_url, state_url, doc) for _ in range(2)]
        try:
            with (
                consumer(replicas[0], "stock-snapshot", prefetch=1, concurrency=1),
                consumer(replicas[1], "stock-snapshot", prefetch=1, concurrency=1),
            ):
                # The newer first, the older right behind it: without the lock the older
                # one passes its staleness check before the newer recorded anything, then
                # writes each SKU just after the newer did.
                newer = send(broker_url, snapshot([item(s, 2) for s in skus], T2))
                older = send(broker_url, snapshot([item(s, 1) for s in skus], T1))
                report(replicas[0].state, older)
                report(replicas[0].state, newer)
        finally:
            for services in replicas:
                services.close()
        assert [amount(emu, sku) for sku in skus] == [2] * len(skus)


# --- what the store holds ------------------------------------------------------------------------


def test_unknown_and_untracked_skus_are_reported_and_the_rest_applied(
    memory_url: str, sqlite_url: str
) -> None:
    with store() as emu:
        emu.add_product("Test001", 1)
        emu.add_product("GIFT-CARD", 0, tracking="D")
        emu.add_product("Test003", 1)
        unknown_before = metric(metrics.STOCK_UNKNOWN_SKUS)
        untracked_before = metric(metrics.STOCK_UNTRACKED)
        with pipeline(memory_url, sqlite_url, emu) as services, capture_logs() as logs:
            found = apply(
                memory_url,
                services,
                snapshot(
                    [item("Test001", 8), item("NOT-IN-STORE", 4), item("GIFT-CARD", 3),
                     item("Test003", 6)]
                ),
            )
        assert (amount(emu, "Test001"), amount(emu, "Test003")) == (8, 6)
        assert amount(emu, "GIFT-CARD") == 0  # not tracked: left alone
        assert (found["written"], found["unknown"], found["untracked"]) == (2, 1, 1)
        assert found["unknown_skus"] == "NOT-IN-STORE"
        assert found["untracked_skus"] == "GIFT-CARD"
        assert metric(metrics.STOCK_UNKNOWN_SKUS) - unknown_before == 1
        assert metric(metrics.STOCK_UNTRACKED) - untracked_before == 1
        [summary] = [line for line in logs if line["event"] == "stock.snapshot_applied"]
        assert summary["unknown_skus"] == ["NOT-IN-STORE"]
        assert summary["untracked_skus"] == ["GIFT-CARD"]
        assert (summary["written"], summary["unknown"], summary["untracked"]) == (2, 1, 1)
        assert depth(memory_url, DLQ) == 0  # reported, not dead-lettered


def test_variation_skus_are_products_of_their_own(memory_url: str, sqlite_url: str) -> None:
    with store((4, 18)) as emu:
        parent = emu.add_product("NPF-TEE", 0, tracking="D")
        black_m = emu.add_product(
            "NPF-TEE-BLK-M", 12, product_type="V", parent_product_id=parent
        )
        black_l = emu.add_product("NPF-TEE-BLK-L", 7, product_type="V", parent_product_id=parent)
        with pipeline(memory_url, sqlite_url, emu) as services:
            found = apply(
                memory_url,
                services,
                snapshot(
                    [item("NPF-TEE-BLK-M", 3), item("NPF-TEE-BLK-L", 7), item("NPF-TEE", 10)]
                ),
            )
        assert emu.products[black_m]["amount"] == 3
        assert emu.products[black_l]["amount"] == 7
        assert emu.products[parent]["amount"] == 0
        assert product_puts(emu) == Counter({black_m: 1})
        assert (found["written"], found["unchanged"], found["untracked"]) == (1, 1, 1)


@pytest.mark.postgres
def test_option_combination_skus_on_an_old_store(memory_url: str, state_url: str) -> None:
    with store((4, 9)) as emu:
        emu.add_product("Test001", 1)
        tee = emu.add_product("NPF-TEE", 0, tracking="O")
        medium = emu.add_combination(tee, "NPF-TEE-BLK-M", 12, {"1": "1", "2": "5"})
        large = emu.add_combination(tee, "NPF-TEE-BLK-L", 7, {"1": "1", "2": "6"})
        cap = emu.add_product("NPF-CAP", 0, tracking="O")
        red = emu.add_combination(cap, "NPF-CAP-RED", 0, {"3": "1"})
        with pipeline(memory_url, state_url, emu) as services:
            first = apply(
                memory_url,
                services,
                snapshot(
                    [
                        item("NPF-TEE-BLK-M", 4),
                        item("NPF-TEE-BLK-L", 7),
                        item("Test001", 2),
                        item("NPF-TEE", 50),  # the product sent by its own code
                        item("NPF-CAP-RED", 6),  # its product is not in the message
                    ]
                ),
            )
            assert (medium["amount"], large["amount"], red["amount"]) == (4, 7, 6)
            assert amount(emu, "Test001") == 2
            assert emu.products[tee]["amount"] == 0  # its stock is in its combinations
            assert (first["written"], first["unchanged"], first["untracked"]) == (3, 1, 1)
            assert first["untracked_skus"] == "NPF-TEE"
            assert first["unknown"] == 0
            assert emu.count("combinations.list") == 2  # NPF-TEE's, then NPF-CAP's
            assert catalogue_reads(emu) == 1  # to find NPF-CAP-RED's product
            with services.state.engine.connect() as conn:
                mapped = dict(
                    conn.execute(sa.select(stock_product_map.c.sku, stock_product_map.c.ref)).all()
                )
            assert mapped == {
                "NPF-TEE-BLK-M": medium["combination_hash"],
                "NPF-TEE-BLK-L": large["combination_hash"],
                "NPF-CAP-RED": red["combination_hash"],
            }

            # Next time the mapping is cached: no catalogue read, one read of the product's
            # combinations (their amounts), and a combination added since is found there.
            emu.clear_log()
            extra = emu.add_combination(tee, "NPF-TEE-BLK-XL", 0, {"1": "1", "2": "7"})
            second = apply(
                memory_url,
                services,
                snapshot(
                    [item("NPF-TEE-BLK-M", 4), item("NPF-TEE-BLK-L", 1), item("NPF-TEE-BLK-XL", 5)],
                    T2,
                ),
            )
        assert (medium["amount"], large["amount"], extra["amount"]) == (4, 1, 5)
        assert (second["written"], second["unchanged"], second["unknown"]) == (2, 1, 0)
        assert catalogue_reads(emu) == 0
        assert emu.count("combinations.list") == 1
        assert emu.count("combinations.update") == 2
        assert emu.count("products.update") == 0


# --- cost ----------------------------------------------------------------------------------------


def test_a_large_snapshot_costs_its_pages_plus_the_changed_skus(
    memory_url: str, sqlite_url: str
) -> None:
    catalogue = 2000
    with store() as emu:
        for n in range(catalogue):
            emu.add_product(f"NPF-{n:05d}", 10)
        changed = {f"NPF-{n:05d}" for n in range(0, catalogue, 100)}  # 1%: 20 SKUs
        items = [item(f"NPF-{n:05d}", 10) for n in range(catalogue)]
        items = [item(i["sku"], 11) if i["sku"] in changed else i for i in items]
        pages = math.ceil(catalogue / MIN_LISTING_PAGE)
        with pipeline(memory_url, sqlite_url, emu) as services:
            found = apply(memory_url, services, snapshot(items, T1))
            first = Counter(r.endpoint for r in emu.requests)
            emu.clear_log()
            apply(memory_url, services, snapshot(items, T2))  # nothing differs now
            second = Counter(r.endpoint for r in emu.requests)
        assert first == Counter({"products.list": pages, "products.update": len(changed)})
        assert sum(first.values()) == pages + 20 == 28
        assert second == Counter({"products.list": pages})
        assert (found["written"], found["unchanged"]) == (20, catalogue - 20)
        assert all(amount(emu, sku) == 11 for sku in changed)


def test_a_small_snapshot_looks_its_codes_up_instead_of_reading_the_catalogue(
    memory_url: str, sqlite_url: str
) -> None:
    with store() as emu:
        for n in range(600):
            emu.add_product(f"NPF-{n:05d}", 10)
        unknown_before = metric(metrics.STOCK_UNKNOWN_SKUS)
        with pipeline(memory_url, sqlite_url, emu) as services:
            found = apply(
                memory_url,
                services,
                snapshot(
                    [
                        item("NPF-00007", 3),
                        item("NPF-00070", 10),
                        # pcode is a substring match: this one matches NPF-00070..NPF-00079,
                        # none of them exactly, so it is unknown.
                        item("NPF-0007", 1),
                        item("NPF-00700", 1),  # not in the store at all
                    ]
                ),
            )
        lookups = [r.query["pcode"][0] for r in emu.requests if r.endpoint == "products.list"]
        assert sorted(lookups) == sorted(["NPF-00007", "NPF-00070", "NPF-0007", "NPF-00700"])
        assert catalogue_reads(emu) == 0  # a 4.10+ store: no combinations to look for either
        assert (amount(emu, "NPF-00007"), amount(emu, "NPF-00070")) == (3, 10)
        assert sum(product_puts(emu).values()) == 1
        assert (found["written"], found["unchanged"], found["unknown"]) == (1, 1, 2)
        assert metric(metrics.STOCK_UNKNOWN_SKUS) - unknown_before == 2


def test_memory_does_not_grow_with_the_catalogue(tmp_path: Path) -> None:
    """A normal 10,000-item message against catalogues of 10,000 and 20,000 products: the
    consumer keeps the message's SKUs, never the catalogue. (Measured in-process with the
    store in a child process; keeping the catalogue costs about 1.5 KB per product, what
    remains is the client's set of ids seen while paging, about 0.2 KB.)"""
    peaks = []
    for catalogue in (10_000, 20_000):
        with store_in_child(catalogue) as url:
            state_url = f"sqlite:///{tmp_path / f'memory-{catalogue}.sqlite'}"
            services = make_services("memory://", state_url, [client_doc(url)])
            handler = StockSnapshotHandler(services)
            event = parse_event(
                snapshot([item(sku_of(n), 10) for n in range(10_000)], event_id="mem")
            )
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                handler.handle(event, Delivery("mem", 1, False))
                peaks.append(tracemalloc.get_traced_memory()[1] - base)
            finally:
                tracemalloc.stop()
                services.close()
    grown = peaks[1] - peaks[0]
    assert grown < 5_000_000, f"10,000 more products cost {grown / 1e6:.1f} MB"


# --- failures ------------------------------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.postgres
def test_a_5xx_burst_mid_snapshot_resumes_without_rewriting(
    broker_url: str, state_url: str
) -> None:
    skus = [f"F-{n:02d}" for n in range(30)]
    with store() as emu:
        for sku in skus:
            emu.add_product(sku, 0)
        emu.add_product("SAME", 4)
        emu.set_fault("products.update", Fault(latency=0.02))
        retries = metrics.MESSAGES.labels("stock-snapshot", "retry")
        retried = retries._value.get()

        def break_the_store_then_mend_it() -> None:
            wait_for(lambda: emu.count("products.update") >= 6, timeout=30, interval=0.002)
            emu.set_fault("products.update", Fault(error_rate=1.0, error_status=503))
            wait_for(lambda: retries._value.get() > retried, timeout=30, interval=0.01)
            emu.clear_faults()

        saboteur = threading.Thread(target=break_the_store_then_mend_it, daemon=True)
        saboteur.start()
        with pipeline(broker_url, state_url, emu) as services:
            event_id = send(
                broker_url, snapshot([item("SAME", 4)] + [item(sku, 5) for sku in skus])
            )
            found = report(services.state, event_id, timeout=60)
        saboteur.join(timeout=5)
        failed = [r for r in emu.requests if r.endpoint == "products.update" and r.status == 503]
        assert len(failed) >= 3  # the client's own attempts, then the message's retry
        assert all(amount(emu, sku) == 5 for sku in skus)
        puts = product_puts(emu)
        assert set(puts) == {emu.product_by_code(sku)["product_id"] for sku in skus}  # type: ignore[index]
        assert set(puts.values()) == {1}  # nothing written twice
        assert found["attempt"] == 2
        assert found["written"] + found["unchanged"] == len(skus) + 1
        assert 0 < found["written"] < len(skus)  # the retry wrote only the rest
        assert depth(broker_url, DLQ) == 0


def test_an_attempt_after_a_5xx_burst_writes_only_what_is_left(
    memory_url: str, sqlite_url: str
) -> None:
    """The rule the retry above rests on, with the handler called directly, one call per
    attempt: what the failed attempt wrote is not written again."""
    skus = [f"F-{n:02d}" for n in range(30)]
    with store() as emu:
        for sku in skus:
            emu.add_product(sku, 0)
        emu.set_fault("products.update", Fault(latency=0.02))
        services = make_services(memory_url, sqlite_url, [client_doc(emu.url)])
        handler = StockSnapshotHandler(services)
        body = snapshot([item(sku, 5) for sku in skus])

        def break_the_store() -> None:
            wait_for(lambda: emu.count("products.update") >= 6, timeout=30, interval=0.002)
            emu.set_fault("products.update", Fault(error_rate=1.0, error_status=503))

        saboteur = threading.Thread(target=break_the_store, daemon=True)
        saboteur.start()
        try:
            with pytest.raises(StoreUnreachable):
                deliver(handler, body, 1)
            saboteur.join(timeout=5)
            emu.clear_faults()
            deliver(handler, body, 2)
            found = report(services.state, body["event_id"])
        finally:
            services.close()
        assert all(amount(emu, sku) == 5 for sku in skus)
        assert set(product_puts(emu).values()) == {1}  # nothing written twice
        assert found["attempt"] == 2
        assert 0 < found["written"] < len(skus)  # the second attempt wrote only the rest


@pytest.mark.broker
@pytest.mark.postgres
def test_kill_9_mid_snapshot_ends_with_the_right_quantities(
    broker_url: str, state_url: str, tmp_path: Path
) -> None:
    changed = [f"K-{n:02d}" for n in range(25)]
    same = [f"S-{n:02d}" for n in range(5)]
    with store() as emu:
        for sku in changed:
            emu.add_product(sku, 1)
        for sku in same:
            emu.add_product(sku, 3)
        emu.set_fault("products.update", Fault(latency=0.15))  # a slow store
        declare(broker_url)
        clients = write_clients_file(
            tmp_path / "clients.yaml",
            [client_doc(emu.url, stock={"update_stock": True, "quantity": "on_hand"})],
        )
        env = cli_env(broker_url, state_url, clients)
        log_file = tmp_path / "cscart-fm.log"
        items = [item(sku, 3) for sku in same] + [item(sku, 7) for sku in changed]
        first = start_cli(["run", "stock-snapshot"], env, log_file)
        second: subprocess.Popen[bytes] | None = None
        state = open_state(state_url)
        try:
            event_id = send(broker_url, snapshot(items))
            wait_for(lambda: emu.count("products.update") >= 5, timeout=60)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            time.sleep(0.5)  # the PUT in flight at the kill still lands (the store got it)
            written_before_restart = len(product_puts(emu))
            assert written_before_restart < len(changed)  # killed mid-snapshot

            second = start_cli(["run", "stock-snapshot"], env, log_file)
            found = report(state, event_id, timeout=90)
            wait_for(lambda: depth(broker_url, QUEUE) == 0, timeout=30)
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=30) == 0
        except BaseException:
            print(log_file.read_text()[-5000:])
            raise
        finally:
            for process in (first, second):
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait(timeout=10)
            state.close()
        assert [amount(emu, sku) for sku in changed] == [7] * len(changed)
        assert [amount(emu, sku) for sku in same] == [3] * len(same)
        puts = product_puts(emu)
        assert set(puts) == {emu.product_by_code(sku)["product_id"] for sku in changed}  # type: ignore[index]
        assert set(puts.values()) == {1}  # what the killed consumer wrote was not rewritten
        assert found["written"] == len(changed) - written_before_restart
        assert found["unchanged"] == len(same) + written_before_restart
        assert depth(broker_url, DLQ) == 0
