"""The machine's floor for benchmark 1: the least any bridge could do on this store and broker.

A minimal fetch-and-forward client, in a process of its own like the consumer: the store's
statuses, then the new orders' list pages (full orders) with ``concurrency`` requests in flight
(``requests``, offset paging: the store does not change meanwhile), each page parsed with
``json.loads`` and one small message per order published to FM's exchange, the page's confirms
awaited as the next pages arrive. No validation, no state, no mapping: none of what makes the
bridge safe. Its wall time shows what the store's and the broker's own service times cost on
this machine, which the bound (latency × pages ÷ concurrency) leaves out; its CPU time, what
the least per-order work costs one Python process.

    python -m bench.floor STORE_URL AMQP_URL PAGE_SIZE CONCURRENCY

It connects (one confirmed publish to nowhere), prints ``ready``, waits for a line on stdin,
runs, and prints ``{"cpu": seconds, "wall": seconds, "published": n}``.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from cscart_fm.core import topology
from cscart_fm.core.broker import Outgoing, Publisher, contract_properties

from .common import API_KEY, API_USER


def main(store_url: str, amqp_url: str, page_size: int, concurrency: int) -> None:
    local = threading.local()

    def get(path: str, params: dict[str, Any]) -> Any:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
            session.auth = (API_USER, API_KEY)
        response = session.get(store_url + path, params=params, timeout=60)
        response.raise_for_status()
        return json.loads(response.content)

    def page(number: int) -> Any:
        return get("/api/orders", {"sort_by": "date", "sort_order": "asc", "get_orders_data": 1,
                                   "status[]": "P", "items_per_page": page_size, "page": number})

    publisher = Publisher(amqp_url)
    # Connected and confirmed once before the start, as the consumer is: to a routing key no
    # queue is bound to, so nothing reaches FM's queue.
    publisher.publish_raw(b"{}", exchange="", routing_key="bench.floor.warm-up",
                          properties=contract_properties("floor-warm-up", "none/0"))
    print("ready", flush=True)
    sys.stdin.readline()
    cpu, started = time.process_time(), time.monotonic()
    published = 0
    with ThreadPoolExecutor(concurrency) as pool:
        get("/api/statuses", {"type": "O", "items_per_page": 250})
        first = page(1)
        pages = math.ceil(int(first["params"]["total_items"]) / page_size)
        rest = pool.map(page, range(2, pages + 1))
        pending = None
        for body in [first, *rest]:
            batch = [
                Outgoing(
                    json.dumps({"order_no": f"CS{order['order_id']}", "email": order["email"],
                                "lines": [{"sku": line["product_code"], "qty": line["amount"]}
                                          for line in order["products"].values()]}).encode(),
                    topology.ORDERS_EXCHANGE,
                    topology.ORDER_IMPORTED,
                    contract_properties(f"floor-{order['order_id']}", "order.imported/1"),
                )
                for order in body["orders"]
            ]
            sent = publisher.send(batch)
            if pending is not None:
                pending.wait()
            pending = sent
            published += len(batch)
        if pending is not None:
            pending.wait()
    wall = time.monotonic() - started
    publisher.close()
    print(json.dumps({"cpu": time.process_time() - cpu, "wall": wall, "published": published}),
          flush=True)


if __name__ == "__main__":
    store, amqp, size, slots = sys.argv[1:5]
    main(store, amqp, int(size), int(slots))
