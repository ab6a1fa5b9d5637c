"""Benchmark 5: peak memory of a 100,000-order backfill.

The store emulator (own process) holds 100,000 new orders in status P; every request takes
20 ms more. ``cscart-fm run order-poll`` (own process, fresh SQLite state, fresh vhost) gets
one tick and imports them all. Its peak resident set (``VmHWM`` in ``/proc/<pid>/status``, the
consumer process only: the store and FM's side run elsewhere) is read once the tick is
acknowledged, before the process is stopped; its resident set when ready and idle is given
for comparison.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from cscart_emulator import Fault
from cscart_fm.core.broker import Publisher

from .common import (
    API_KEY,
    API_USER,
    Result,
    fmt_s,
    fresh_vhost,
    log,
    peak_rss_mb,
    rss_mb,
    wait_until,
)
from .orders import FmQueue, finished, order_poll_service, seed_orders, tick
from .store import RemoteStore

LATENCY = 0.020
GOAL_MB = 250


def run(quick: bool = False) -> Result:
    count = 10_000 if quick else 100_000
    result = Result(5, "Memory")
    with tempfile.TemporaryDirectory(prefix="cscart-fm-bench5-") as tmp, \
            RemoteStore(api_user=API_USER, api_key=API_KEY) as store, \
            fresh_vhost("b5") as url:
        work = Path(tmp)
        seed_orders(store, count, placed_from=int(time.time()) - count - 7200, step=1)
        store.call("set_fault", "*", Fault(latency=LATENCY))
        fm = FmQueue(url)
        fm.start()
        fm.ready.wait(30)
        service = order_poll_service(url, store, work)
        publisher = Publisher(url)
        try:
            service.wait_ready()
            time.sleep(1)
            idle = rss_mb(service.pid)
            mark = store.mark()
            started = time.monotonic()
            tick(publisher)
            samples: list[float] = []

            def done() -> bool:
                samples.append(rss_mb(service.pid))
                return len(fm.seen) >= count and finished(service) >= 1

            wait_until(done, timeout=7200, interval=1.0)
            seconds = time.monotonic() - started
            peak = peak_rss_mb(service.pid)
            counts = store.counts(mark)
        finally:
            publisher.close()
            code = service.stop()
            fm.stop()
    log(f"bench 5: {count:,} orders in {seconds:.0f} s, peak RSS {peak:.0f} MB (idle {idle:.0f})")
    result.add(f"peak RSS of the consumer, {count:,}-order backfill", f"{peak:.0f} MB",
               f"≤ {GOAL_MB} MB", peak <= GOAL_MB,
               notes="VmHWM of the `cscart-fm run order-poll` process")
    result.add("RSS when ready, before the tick", f"{idle:.0f} MB")
    result.add("RSS sampled each second during the backfill",
               f"{min(samples):.0f}–{max(samples):.0f} MB")
    result.add("backfill time", fmt_s(seconds),
               notes=f"{len(fm.seen):,} distinct orders at FM's queue, {fm.copies} copies; "
               f"{sum(counts.values()):,} store calls ({dict(counts)}); exit code {code}")
    result.details.append(
        f"{count:,} orders (status P, one line each), {LATENCY * 1000:.0f} ms store latency, "
        "fresh SQLite state and vhost, the default order-poll tuning (prefetch 2, "
        "concurrency 1), page_size 100."
    )
    return result
