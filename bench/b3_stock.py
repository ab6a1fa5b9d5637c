"""Benchmark 3: a stock snapshot of 20,000 SKUs with 1% changed.

The store emulator (its own process, 20 ms added to every request) holds 20,000 products at
quantity 10. ``cscart-fm run stock-snapshot`` (its own process, fresh SQLite state, fresh
vhost) receives one ``stock.snapshot`` message of all 20,000 SKUs:

1. the first snapshot of a new client (no state at all), 1% of the SKUs at a new quantity;
2. the next snapshot (an hour later), another 1% changed;
3. the one after, nothing changed.

Store calls are counted from the emulator's request log; wall time runs from the publish to the
message's acknowledgement (the consumer's ``cscart_fm_messages_total{outcome="ok"}``).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import uuid
from pathlib import Path

from consumers.stock_snapshot.handler import MIN_LISTING_PAGE
from cscart_emulator import Fault
from cscart_fm.core.broker import Publisher
from cscart_fm.core.topology import EVENTS_EXCHANGE

from .common import (
    API_KEY,
    API_USER,
    CLIENT,
    Result,
    Service,
    client_doc,
    fmt_s,
    fresh_vhost,
    log,
    metric_value,
    service_env,
    wait_until,
    write_clients,
)
from .store import RemoteStore

LATENCY = 0.020
SLACK = 5
"""The "small constant" of the goal: calls beyond pages + changed SKUs we accept."""
LIMITS = {"requests_per_second": 200, "concurrency": 4, "page_size": 100}


def _snapshot(quantities: list[int], taken_at: str) -> bytes:
    items = [
        {"sku": f"STK-{n:06d}", "on_hand": quantity, "available": quantity}
        for n, quantity in enumerate(quantities)
    ]
    return json.dumps(
        {
            "type": "stock.snapshot",
            "version": 1,
            "event_id": f"bench-{uuid.uuid4().hex}",
            "client_id": CLIENT,
            "taken_at": taken_at,
            "items": items,
        }
    ).encode()


def _apply(publisher: Publisher, service: Service, store: RemoteStore, body: bytes,
           done_before: float) -> tuple[float, dict[str, int]]:
    mark = store.mark()
    event_id = json.loads(body)["event_id"]
    started = time.monotonic()
    publisher.publish_raw(
        body,
        exchange=EVENTS_EXCHANGE,
        routing_key="stock.snapshot",
        properties={"content_type": "application/json", "delivery_mode": 2,
                    "message_id": event_id, "headers": {"schema": "stock.snapshot/1"}},
    )

    def acked() -> bool:
        text = service.metrics()
        finished = sum(
            metric_value(text, "cscart_fm_messages_total", consumer="stock-snapshot",
                         outcome=outcome)
            for outcome in ("ok", "retry", "dead_letter")
        )
        return finished > done_before

    wait_until(acked, timeout=1800, interval=0.02)
    seconds = time.monotonic() - started
    text = service.metrics()
    ok = metric_value(text, "cscart_fm_messages_total", consumer="stock-snapshot", outcome="ok")
    if ok <= done_before:
        raise RuntimeError("the snapshot was not applied (retried or dead-lettered)")
    return seconds, dict(store.counts(mark))


def run(quick: bool = False) -> Result:
    skus = 5_000 if quick else 20_000
    changed_share = 0.01
    n_changed = int(skus * changed_share)
    pages = math.ceil(skus / max(LIMITS["page_size"], MIN_LISTING_PAGE))
    goal_calls = pages + n_changed + SLACK
    result = Result(3, "Stock snapshot")
    with tempfile.TemporaryDirectory(prefix="cscart-fm-bench3-") as tmp, \
            RemoteStore(api_user=API_USER, api_key=API_KEY) as store, \
            fresh_vhost("b3") as url:
        work = Path(tmp)
        log(f"bench 3: seeding {skus:,} products")
        store.call("seed_products", "STK-", skus, 10)
        store.call("set_fault", "*", Fault(latency=LATENCY))
        clients = write_clients(work / "clients.yaml", [client_doc(store.url, limits=LIMITS)])
        env = service_env(url, f"sqlite:///{work / 'state.sqlite'}", clients)
        service = Service("stock-snapshot", env, work / "stock-snapshot.log")
        publisher = Publisher(url)
        try:
            service.wait_ready()
            step = max(1, skus // n_changed)
            cases = [
                ("first snapshot of a new client", set(range(0, skus, step)), 11,
                 "2026-11-23T02:00:00+11:00"),
                ("next snapshot, another 1% changed", set(range(1, skus, step)), 12,
                 "2026-11-23T03:00:00+11:00"),
                ("next snapshot, nothing changed", set(), 0,
                 "2026-11-23T04:00:00+11:00"),
            ]
            quantities = [10] * skus  # what the store holds, and each snapshot says
            done = 0.0
            for title, changed, quantity, taken_at in cases:
                for n in changed:
                    quantities[n] = quantity
                body = _snapshot(quantities, taken_at)
                seconds, counts = _apply(publisher, service, store, body, done)
                done += 1
                calls = sum(counts.values())
                writes = counts.get("products.update", 0)
                listing = counts.get("products.list", 0)
                goal = pages + len(changed) + SLACK
                log(f"bench 3: {title}: {calls} calls {counts} in {seconds:.2f} s")
                result.add(f"{title}: store calls", str(calls), f"≤ {goal}", calls <= goal,
                           notes=f"{listing} pages + {writes} writes; "
                           + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
                result.add(f"{title}: wall time", fmt_s(seconds),
                           notes="publish → acknowledged")
            amounts = store.call("product_amounts", "STK-")
            wrong = [n for n, quantity in enumerate(quantities)
                     if amounts.get(f"STK-{n:06d}") != quantity]
            result.add("quantities right in the store afterwards",
                       f"{len(amounts) - len(wrong):,} of {len(amounts):,}", "all",
                       not wrong)
            errors = store.call("errors")
            if errors:
                raise RuntimeError(f"the emulator failed: {errors[0]}")
        finally:
            publisher.close()
            service.stop()
    per_page = max(LIMITS["page_size"], MIN_LISTING_PAGE)
    result.details.append(
        f"{skus:,} products at 10; one message of {skus:,} items per snapshot; {n_changed} SKUs "
        f"differ per changed snapshot. Pages = ceil({skus:,} / {per_page}) "
        f"= {pages} (the consumer lists products {MIN_LISTING_PAGE} per page at least). "
        f"Goal: pages + changed SKUs + {SLACK} = {goal_calls}. Store latency "
        f"{LATENCY * 1000:.0f} ms on every request; client limits {LIMITS}; fresh SQLite state."
    )
    return result
