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

Three rounds, each on a fresh store, state, vhost and consumer process; the median is the
figure. A fourth round at 200 ms (closer to a real store's time for a page of full orders)
shows how much of the bridge's own work hides behind the store's latency.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cscart_emulator import Fault
from cscart_fm.core.broker import Publisher

from .common import (
    API_KEY,
    API_USER,
    Result,
    cpu_seconds,
    fmt_s,
    fresh_vhost,
    log,
    metric_value,
    wait_until,
)
from .orders import LIMITS, FmQueue, finished, order_poll_service, seed_orders, tick
from .store import RemoteStore

LATENCY = 0.020
ROUNDS = 3
SLOW_LATENCY = 0.200
"""A diagnostic round at a latency closer to a real store's for a page of full orders."""


@dataclass
class Round:
    wall: float
    acked: float
    poll_seconds: float
    cpu: float
    counts: dict[str, int]
    queries: list[dict[str, list[str]]]
    distinct: int
    copies: int


def _round(count: int, latency: float) -> Round:
    """One import of ``count`` new orders: fresh store, state, vhost and consumer process."""
    with tempfile.TemporaryDirectory(prefix="cscart-fm-bench1-") as tmp, \
            RemoteStore(api_user=API_USER, api_key=API_KEY) as store, \
            fresh_vhost("b1") as url:
        work = Path(tmp)
        seed_orders(store, count, placed_from=int(time.time()) - count * 60 - 3600, step=60)
        store.call("set_fault", "*", Fault(latency=latency))
        fm = FmQueue(url)
        fm.start()
        fm.ready.wait(30)
        service = order_poll_service(url, store, work)
        publisher = Publisher(url)
        try:
            service.wait_ready()
            mark = store.mark()
            cpu_before = cpu_seconds(service.pid)
            started = time.monotonic()
            tick(publisher)
            arrived = fm.wait_for(count, timeout=1800)
            wait_until(lambda: finished(service) >= 1, timeout=600, interval=0.01)
            acked = time.monotonic() - started
            cpu = cpu_seconds(service.pid) - cpu_before
            metrics = service.metrics()
            counts = store.counts(mark)
            queries = store.call("queries", mark, "orders.list")
        finally:
            publisher.close()
            service.stop()
            fm.stop()
    found = Round(arrived - started, acked,
                  metric_value(metrics, "cscart_fm_order_poll_seconds_sum"), cpu, dict(counts),
                  queries, len(fm.seen), fm.copies)
    log(f"bench 1: {count} orders at {latency * 1000:.0f} ms in {found.wall:.2f} s, "
        f"{sum(counts.values())} calls {found.counts}")
    return found


@dataclass
class Floor:
    wall: float
    cpu: float


def _floor_round(count: int, latency: float) -> Floor:
    """The same import by ``bench.floor``, a minimal fetch-and-forward client, in a process of
    its own: wall time from its start signal to the ``count``-th order at FM's queue."""
    with RemoteStore(api_user=API_USER, api_key=API_KEY) as store, fresh_vhost("b1f") as url:
        seed_orders(store, count, placed_from=int(time.time()) - count * 60 - 3600, step=60)
        store.call("set_fault", "*", Fault(latency=latency))
        fm = FmQueue(url)
        fm.start()
        fm.ready.wait(30)
        command = [sys.executable, "-m", "bench.floor", store.url, url,
                   str(LIMITS["page_size"]), str(LIMITS["concurrency"])]
        with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,  # noqa: S603
                              text=True) as floor:
            assert floor.stdin is not None
            assert floor.stdout is not None
            try:
                if floor.stdout.readline().strip() != "ready":
                    raise RuntimeError("bench.floor did not start")
                started = time.monotonic()
                floor.stdin.write("go\n")
                floor.stdin.flush()
                arrived = fm.wait_for(count, timeout=600)
                figures = json.loads(floor.stdout.readline())
            finally:
                floor.kill()
                fm.stop()
    found = Floor(arrived - started, float(figures["cpu"]))
    log(f"bench 1 floor: {count} orders at {latency * 1000:.0f} ms in {found.wall:.2f} s, "
        f"CPU {found.cpu:.2f} s")
    return found


def run(quick: bool = False) -> Result:
    count = 500 if quick else 2_000
    page_size = int(LIMITS["page_size"])
    concurrency = int(LIMITS["concurrency"])
    pages = math.ceil(count / page_size)
    bound = LATENCY * pages / concurrency
    result = Result(1, "Order import")
    rounds = [_round(count, LATENCY) for _ in range(1 if quick else ROUNDS)]
    median = sorted(rounds, key=lambda r: r.wall)[len(rounds) // 2]
    calls = sum(median.counts.values())
    sizes = sorted({q.get("items_per_page", ["?"])[0] for q in median.queries})
    per_order = calls / count
    ratio = median.wall / bound
    result.add("wall time, tick → last order at FM's queue (median)", fmt_s(median.wall),
               notes="each: " + ", ".join(fmt_s(r.wall) for r in rounds) + "; the median "
               f"round's tick was acknowledged after {median.acked:.2f} s, the handler's own "
               f"time {median.poll_seconds:.2f} s, the consumer process's CPU {fmt_s(median.cpu)}")
    result.add("the bound", fmt_s(bound),
               notes=f"{LATENCY * 1000:.0f} ms × {pages} pages (ceil({count:,} / "
               f"page_size {page_size})) ÷ concurrency {concurrency}")
    result.add("ratio to the bound", f"{ratio:.1f}×", "≤ 1.25×", ratio <= 1.25)
    result.add("store calls", str(calls),
               notes=f"{len(median.queries)} list pages (items_per_page {', '.join(sizes)}: a "
               "page continuing a time range asks on top for the orders of its first second "
               "already read); " + ", ".join(f"{k} {v}" for k, v in sorted(median.counts.items())))
    result.add("calls per order", f"{per_order:.3f}", "≤ 0.05", per_order <= 0.05)
    distinct = min(r.distinct for r in rounds)
    result.add("distinct orders at FM's queue", f"{distinct:,}", f"{count:,}", distinct == count,
               notes=f"{sum(r.copies for r in rounds)} extra copies in {len(rounds)} rounds")
    floors = [_floor_round(count, LATENCY) for _ in range(1 if quick else ROUNDS)]
    floor = sorted(floors, key=lambda f: f.wall)[len(floors) // 2]
    result.add("diagnostic: the machine's floor (a minimal fetch-and-forward client), ratio "
               "to the bound", f"{floor.wall / bound:.2f}×",
               notes=f"{fmt_s(floor.wall)} (each: {', '.join(fmt_s(f.wall) for f in floors)}), "
               f"its CPU {fmt_s(floor.cpu)}: bench/floor.py lists, parses and forwards the same "
               "orders with no validation, state or mapping; what it takes above the bound is "
               "the store's and the broker's own service time, which the bound leaves out")
    if not quick:
        slow = _round(count, SLOW_LATENCY)
        slow_bound = SLOW_LATENCY * pages / concurrency
        result.add(f"diagnostic: at {SLOW_LATENCY * 1000:.0f} ms store latency, ratio to the "
                   "bound", f"{slow.wall / slow_bound:.2f}×",
                   notes=f"{fmt_s(slow.wall)} vs a bound of {fmt_s(slow_bound)}: the bridge's "
                   "own work (mapping, state, publishing) runs while pages are in flight")
    result.details.append(
        f"{count:,} new orders (status P, one line each) in the emulator (CS-Cart 4.18, full "
        f"orders in list pages), {LATENCY * 1000:.0f} ms added to every request. Client limits "
        f"{LIMITS}. Fresh SQLite state, vhost, store and consumer process per round; "
        f"{ROUNDS} rounds, the median reported. Bound = latency × ceil(orders / page_size) ÷ "
        "concurrency: one list page per page_size orders is the fewest calls the API allows, "
        "with `limits.concurrency` requests in flight at once."
    )
    return result
