"""Benchmark 2: the cost of an idle tick with 1,000 vs 100,000 historical orders.

For each history size, a fresh store emulator (own process) holds that many orders in status
P, all placed (and last changed) more than an hour ago, and a fresh ``cscart-fm run
order-poll`` (fresh SQLite state, fresh vhost) imports them all with one tick (the backfill,
with no added latency, not measured). Then, with 20 ms added to every store request, one
warm-up tick, then ``IDLE_TICKS`` idle ticks are measured: store calls (request log) and the
time from the tick's publish to its acknowledgement. Nothing new is in the store, so an idle
tick should cost the same whatever the history.

The emulator answers "changed since" from an index, as a store's database does, so its own
time hardly grows with the history; still, the time the bridge itself spends (end to end less
the store's time per its request log) is the figure judged, with the poll handler's own time
from the consumer's metrics beside it.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cscart_emulator import Fault
from cscart_fm.core.broker import Publisher

from .common import API_KEY, API_USER, Result, fresh_vhost, log, metric_value, wait_until
from .orders import FmQueue, finished, order_poll_service, run_tick, seed_orders, tick
from .store import RemoteStore

LATENCY = 0.020
IDLE_TICKS = 7


@dataclass
class IdleRun:
    history: int
    backfill: float
    warm_calls: dict[str, int]
    times: list[float]
    bridge: list[float]
    handler: list[float]  # the handler's time less its waits on the store, per its metrics
    calls: list[int]
    last_counts: dict[str, int]


def _measure(history: int, quick: bool) -> IdleRun:
    with tempfile.TemporaryDirectory(prefix="cscart-fm-bench2-") as tmp, \
            RemoteStore(api_user=API_USER, api_key=API_KEY) as store, \
            fresh_vhost("b2") as url:
        work = Path(tmp)
        seed_orders(store, history, placed_from=int(time.time()) - history - 7200, step=1)
        fm = FmQueue(url)
        fm.start()
        fm.ready.wait(30)
        service = order_poll_service(url, store, work)
        publisher = Publisher(url)
        try:
            service.wait_ready()
            started = time.monotonic()
            tick(publisher)
            fm.wait_for(history, timeout=3600)
            wait_until(lambda: finished(service) >= 1, timeout=3600, interval=0.05)
            backfill = time.monotonic() - started
            log(f"bench 2: backfill of {history:,} orders took {backfill:.1f} s")
            store.call("set_fault", "*", Fault(latency=LATENCY))
            mark = store.mark()
            run_tick(service, publisher, timeout=600)
            warm_calls = store.counts(mark)
            times, bridge, handler, calls = [], [], [], []
            for _ in range(IDLE_TICKS if not quick else 3):
                mark = store.mark()
                before = _own_seconds(service.metrics())
                seconds = run_tick(service, publisher, timeout=600)
                counts = store.counts(mark)
                store_seconds = float(store.call("store_seconds", mark))
                times.append(seconds)
                bridge.append(seconds - store_seconds)
                handler.append(_own_seconds(service.metrics()) - before)
                calls.append(sum(counts.values()))
            last_counts = counts
        finally:
            publisher.close()
            service.stop()
            fm.stop()
    log(f"bench 2: history {history:,}: idle ticks {calls} calls, "
        f"{[round(t * 1000) for t in times]} ms")
    return IdleRun(history, backfill, dict(warm_calls), times, bridge, handler, calls,
                   dict(last_counts))


def _own_seconds(metrics: str) -> float:
    """The poll handler's seconds so far less those it spent waiting on the store's answers
    (both from the consumer's own metrics): what the bridge itself did."""
    return (metric_value(metrics, "cscart_fm_order_poll_seconds_sum")
            - metric_value(metrics, "cscart_fm_store_request_seconds_sum"))


def run(quick: bool = False) -> Result:
    sizes = (1_000, 10_000) if quick else (1_000, 100_000)
    result = Result(2, "Idle tick")
    runs = [_measure(n, quick) for n in sizes]
    for found in runs:
        n, times, bridge = found.history, found.times, found.bridge
        result.add(f"{n:,} orders: store calls per idle tick", "/".join(map(str, found.calls)),
                   notes=f"endpoints {found.last_counts}; the first tick after the "
                   f"backfill (warm-up, probes the store once per process): "
                   f"{found.warm_calls}; backfill took {found.backfill:.1f} s")
        result.add(f"{n:,} orders: idle tick time (median)",
                   f"{statistics.median(times) * 1000:.0f} ms",
                   notes="publish → acknowledged; each: "
                   + ", ".join(f"{t * 1000:.0f}" for t in times) + " ms")
        result.add(f"{n:,} orders: of which the bridge's own time (median)",
                   f"{statistics.median(bridge) * 1000:.0f} ms",
                   notes="end to end less the store's time per its request log")
        result.add(f"{n:,} orders: the poll handler's own time (median)",
                   f"{statistics.median(found.handler) * 1000:.1f} ms",
                   notes="the handler's time less its waits on the store, per the consumer's "
                   "metrics: state queries, planning, bookkeeping; each: "
                   + ", ".join(f"{t * 1000:.1f}" for t in found.handler) + " ms")
    small, large = runs
    calls_equal = small.calls == large.calls
    ratio_e2e = statistics.median(large.times) / statistics.median(small.times)
    ratio_bridge = statistics.median(large.bridge) / statistics.median(small.bridge)
    ratio_handler = statistics.median(large.handler) / statistics.median(small.handler)
    result.add("calls equal", "yes" if calls_equal else "no", "equal", calls_equal)
    result.add(f"time {sizes[1]:,} ÷ {sizes[0]:,}, end to end", f"{ratio_e2e:.2f}",
               notes="includes the emulator's own time")
    result.add(f"time {sizes[1]:,} ÷ {sizes[0]:,}, the bridge's own", f"{ratio_bridge:.2f}",
               "≈ 1 (within 25%)", 0.75 <= ratio_bridge <= 1.25)
    result.add(f"time {sizes[1]:,} ÷ {sizes[0]:,}, the poll handler's own",
               f"{ratio_handler:.2f}", notes="measured inside the consumer: no emulator in it")
    result.details.append(
        f"History sizes {sizes[0]:,} and {sizes[1]:,} (status P, all imported by a backfill "
        f"first). Store latency {LATENCY * 1000:.0f} ms on every request during the idle "
        "ticks. Fresh SQLite state, vhost and store per size."
    )
    return result
