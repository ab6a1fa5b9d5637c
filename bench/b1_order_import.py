"""Benchmark 1: order import of 2,000 new orders at 20 ms store latency.

The store emulator (own process, CS-Cart 4.18: full orders in its list pages with
``get_orders_data``) holds 2,000 new orders in status P; every request to it takes 20 ms more.
``cscart-fm run order-poll`` (own process, fresh SQLite state, fresh vhost) gets one tick.

- Wall time: from the tick's publish to the arrival of the 2,000th distinct order at FM's
  queue (a consumer of ``fm.orders.imported`` in this process).
- Calls: every request the store received from the tick on (its request log).
- The bound: the fewest calls the store's API allows for 2,000 orders is one list page per
  ``page_size`` orders (full orders come in the list), so pages = ceil(2,000 / page_size);
  bound = 20 ms × pages ÷ ``limits.concurrency`` (the per-store concurrency allowed).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

from cscart.emulator import Fault
from cscart_fm.broker import Publisher

from .common import (
    API_KEY,
    API_USER,
    Result,
    fmt_s,
    fresh_vhost,
    log,
    metric_value,
    wait_until,
)
from .orders import LIMITS, FmQueue, finished, order_poll_service, seed_orders, tick
from .store import RemoteStore

LATENCY = 0.020


def run(quick: bool = False) -> Result:
    count = 500 if quick else 2_000
    page_size = int(LIMITS["page_size"])
    concurrency = int(LIMITS["concurrency"])
    pages = math.ceil(count / page_size)
    bound = LATENCY * pages / concurrency
    result = Result(1, "Order import")
    with tempfile.TemporaryDirectory(prefix="cscart-fm-bench1-") as tmp, \
            RemoteStore(api_user=API_USER, api_key=API_KEY) as store, \
            fresh_vhost("b1") as url:
        work = Path(tmp)
        seed_orders(store, count, placed_from=int(time.time()) - count * 60 - 3600, step=60)
        store.call("set_fault", "*", Fault(latency=LATENCY))
        fm = FmQueue(url)
        fm.start()
        fm.ready.wait(30)
        service = order_poll_service(url, store, work)
        publisher = Publisher(url)
        try:
            service.wait_ready()
            mark = store.mark()
            started = time.monotonic()
            tick(publisher)
            arrived = fm.wait_for(count, timeout=1800)
            wall = arrived - started
            wait_until(lambda: finished(service) >= 1, timeout=600, interval=0.01)
            acked = time.monotonic() - started
            metrics = service.metrics()
            counts = store.counts(mark)
            queries = store.call("queries", mark, "orders.list")
        finally:
            publisher.close()
            service.stop()
            fm.stop()
        poll_seconds = metric_value(metrics, "cscart_fm_order_poll_seconds_sum")
        calls = sum(counts.values())
        checks = sum(1 for q in queries if "order_id" in q)
        probes = sum(1 for q in queries if q.get("items_per_page") == ["1"])
        pages_read = len(queries) - checks - probes
        per_order = calls / count
        ratio = wall / bound
        log(f"bench 1: {count} orders in {wall:.2f} s, {calls} calls {dict(counts)}")
        result.add("wall time, tick → last order at FM's queue", fmt_s(wall),
                   notes=f"the tick was acknowledged after {acked:.2f} s (the poll ends with "
                   f"a check of the listing); the handler's own time {poll_seconds:.2f} s")
        result.add("the bound", fmt_s(bound),
                   notes=f"{LATENCY * 1000:.0f} ms × {pages} pages (ceil({count:,} / "
                   f"page_size {page_size})) ÷ concurrency {concurrency}")
        result.add("ratio to the bound", f"{ratio:.1f}×", "≤ 1.25×", ratio <= 1.25)
        result.add("store calls", str(calls),
                   notes=f"{pages_read} list pages, {checks} checks of the listing (orders "
                   f"by id, 50 a request), {probes} capability probes; "
                   + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        result.add("calls per order", f"{per_order:.3f}", "≤ 0.05", per_order <= 0.05)
        result.add("distinct orders at FM's queue", f"{len(fm.seen):,}", f"{count:,}",
                   len(fm.seen) == count, notes=f"{fm.copies} extra copies")
    result.details.append(
        f"{count:,} new orders (status P, one line each) in the emulator (CS-Cart 4.18, full "
        f"orders in list pages), {LATENCY * 1000:.0f} ms added to every request. Client limits "
        f"{LIMITS}. Fresh SQLite state and vhost. Bound = latency × ceil(orders / page_size) ÷ "
        "concurrency: one list page per page_size orders is the fewest calls the API allows, "
        "with `limits.concurrency` requests in flight at once."
    )
    return result
