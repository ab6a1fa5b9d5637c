"""``cscart-fm demo``: the whole pipeline on the embedded default, explained as it runs.

Nothing to install or configure: the broker is kombu's in-process ``memory://`` transport, the
store is the built-in CS-Cart emulator (a real HTTP server on a free local port) and the state
is SQLite in a temporary directory. The same consumers and runtime run as in production.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from kombu import Connection, Queue

from consumers.registry import JOBS
from consumers.services import Services
from cscart_emulator import StoreEmulator, seed_demo_store
from cscart_fm.cli.wiring import open_state, runtime_for
from cscart_fm.core import topology
from cscart_fm.core.broker import Publisher
from cscart_fm.core.clients import load_clients
from cscart_fm.core.config import Environment
from cscart_fm.core.observability import configure_logging
from cscart_fm.core.runtime import ConsumerRuntime
from schemas.messages import OrderPollTick, ShipmentLodged, StockItem, StockSnapshot

CLIENT = "DEMO"
KEY_ENV = "CSCART_FM_DEMO_API_KEY"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _wait(condition: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    return condition()


class _Demo:
    def __init__(self, workdir: Path) -> None:

        self.workdir = workdir
        self.api_key = uuid.uuid4().hex
        self.store = StoreEmulator(api_user="admin@demo.example", api_key=self.api_key, user_id=1)
        self.store.add_status("A", "Partially shipped", type="O", inventory="D")
        self.seeded = seed_demo_store(self.store)
        self.store.start()
        self.broker_url = f"memory://cscart-fm-demo-{uuid.uuid4().hex[:8]}"
        self.state_url = f"sqlite:///{workdir / 'state.sqlite'}"
        self.start = (datetime.now(UTC) - timedelta(days=3)).strftime("%d/%m/%Y")
        clients_file = workdir / "clients.yaml"
        clients_file.write_text(
            yaml.safe_dump(
                {
                    "clients": [
                        {
                            "client_id": CLIENT,
                            "store_url": self.store.url,
                            "api_user": "admin@demo.example",
                            "api_key": "${" + KEY_ENV + "}",
                            "user_id": 1,
                            "orders": {
                                "statuses": ["Processed"],
                                "start_date": self.start,
                                "timezone": "Australia/Sydney",
                                "prefix": "CS",
                                "countries": ["AU", "NZ"],
                            },
                            "tracking": {
                                "update_tracking_number": True,
                                "update_tracking_url": True,
                                "shipped_status": "Complete",
                                "partially_shipped_status": "Partially shipped",
                            },
                            "stock": {
                                "update_stock": True,
                                "quantity": "available",
                                "negative_as_zero": True,
                            },
                        }
                    ]
                },
                sort_keys=False,
            )
        )
        env = Environment(
            broker_url=self.broker_url,
            clients_path=str(clients_file),
            state_url=self.state_url,
            retry_delays=(1,),
            max_attempts=2,
            heartbeat=0,
        )
        self.services = Services(
            clients=load_clients(clients_file, {KEY_ENV: self.api_key}),
            state=open_state(self.state_url),
            publisher=Publisher(self.broker_url),
        )
        with Connection(self.broker_url) as conn:
            JOBS.topology(env.retry_delays).declare(conn)
        self.runtimes: list[ConsumerRuntime[Any]] = []
        self.threads: list[threading.Thread] = []
        for job in JOBS:
            runtime = runtime_for(job, self.services, env)
            thread = threading.Thread(target=runtime.run, name=f"demo-{job.name}", daemon=True)
            thread.start()
            self.runtimes.append(runtime)
            self.threads.append(thread)
        _wait(lambda: all(r.ready for r in self.runtimes), timeout=20)

    def publish(self, message: Any) -> None:
        self.services.publisher.publish(message)

    def take(self, queue_name: str) -> list[Any]:
        taken = []
        with Connection(self.broker_url) as conn:
            queue = Queue(queue_name, no_declare=True)(conn.default_channel)
            while (message := queue.get(no_ack=True)) is not None:
                taken.append(message)
        return taken

    def idle(self) -> bool:
        """Every consumer has nothing in hand and nothing waiting."""
        with Connection(self.broker_url) as conn:
            channel = conn.default_channel
            for name in self.runtimes_names():
                if channel.queue_declare(queue=f"cscart.{name}", passive=True).message_count:
                    return False
        return all(r.idle for r in self.runtimes)

    def runtimes_names(self) -> list[str]:
        return [r.name for r in self.runtimes]

    def close(self) -> None:
        for runtime in self.runtimes:
            runtime.stop()
        for thread in self.threads:
            thread.join(timeout=10)
        self.services.close()
        self.store.stop()


def _orders_step(demo: _Demo) -> None:
    _say("1. Orders pulling (order-poll consumer)")
    total = len(demo.store.orders)
    _say(f"   The store has {total} orders. Client {CLIENT} pulls orders in status 'Processed',")
    _say(f"   shipped to AU or NZ, placed from {demo.start} (Sydney time), prefixed 'CS'.")
    tick = OrderPollTick(
        type="order-poll.tick",
        version=1,
        event_id=str(uuid.uuid4()),
        client_id=CLIENT,
        issued_at=datetime.now(UTC),
    )
    demo.publish(tick)
    time.sleep(0.3)
    _wait(demo.idle)
    received = [json.loads(m.body) for m in demo.take(topology.ORDERS_QUEUE)]
    _say(f"   FM's queue '{topology.ORDERS_QUEUE}' received {len(received)} orders:")
    for order in sorted(received, key=lambda o: o["cart_order_id"]):
        lines = ", ".join(f"{line['quantity']} × {line['sku']}" for line in order["lines"])
        test = " — test order, FM will not dispatch it" if order["is_test"] else ""
        _say(
            f"     {order['order_no']:<10} ship to {order['ship_to']['country']}  "
            f"{lines}  total {order['totals']['total']} {order['currency']}{test}"
        )
    imported = {o["cart_order_id"] for o in received}
    for order_id, order in sorted(demo.store.orders.items()):
        if order_id not in imported:
            why = (
                f"status {order.status}"
                if order.status != "P"
                else f"ship-to {order.s_country}"
            )
            _say(f"     order #{order_id} not pulled ({why})")
    demo.publish(tick.model_copy(update={"event_id": str(uuid.uuid4())}))
    time.sleep(0.3)
    _wait(demo.idle)
    again = demo.take(topology.ORDERS_QUEUE)
    _say(f"   A second tick published {len(again)} more: each order reaches FM once.")


def _tracking_step(demo: _Demo) -> None:
    _say()
    _say("2. Tracking push (shipment-lodged consumer)")
    full_id, partial_id = demo.seeded["orders"][0], demo.seeded["orders"][1]
    now = datetime.now(UTC)
    shipments = [
        ShipmentLodged.model_validate(
            {
                "type": "shipment.lodged", "version": 1, "event_id": str(uuid.uuid4()),
                "client_id": CLIENT, "order_no": f"CS{full_id}", "shipment_ref": "FM-SHP-1001",
                "tracking_number": "33ABC1234567", "carrier": "Australia Post",
                "tracking_url": "https://auspost.com.au/mypost/track/#/details/33ABC1234567",
                "lodged_at": now, "lines": [{"sku": "Test001", "quantity": 2}],
                "backordered": [],
            }
        ),
        ShipmentLodged.model_validate(
            {
                "type": "shipment.lodged", "version": 1, "event_id": str(uuid.uuid4()),
                "client_id": CLIENT, "order_no": f"CS{partial_id}", "shipment_ref": "FM-SHP-1002",
                "tracking_number": "ARX998877", "carrier": "Aramex",
                "tracking_url": "https://www.aramex.co.nz/tools/track?l=ARX998877",
                "lodged_at": now, "lines": [{"sku": "Test002", "quantity": 1}],
                "backordered": [{"sku": "Test003", "quantity": 3}],
            }
        ),
    ]
    for shipment in shipments:
        demo.publish(shipment)
    demo.publish(shipments[0])  # FM sends the same consignment twice: still one shipment
    time.sleep(0.3)
    _wait(demo.idle)
    for shipment in shipments:
        order_id = int(shipment.order_no.removeprefix("CS"))
        created = demo.store.shipments_for(order_id)
        order = demo.store.orders[order_id]
        kind = "partial (backorder)" if shipment.backordered else "full"
        _say(
            f"   {shipment.order_no}: {kind} consignment {shipment.shipment_ref} "
            f"via {shipment.carrier}"
        )
        for row in created:
            link = (row.get("carrier_info") or {}).get("tracking_url") or ""
            comment = str(row.get("comments", "")).replace("\n", " / ")
            where = f"CS-Cart's own link {link}" if link else f"the comment '{comment}'"
            _say(
                f"     shipment #{row['shipment_id']}: tracking {row['tracking_number']}, "
                f"carrier '{row['carrier']}', items {row['products']}; URL via {where}"
            )
        _say(f"     order status is now {order.status} ({_status_name(demo, order.status)})")
    _say("   The first consignment was delivered twice; the store has one shipment for it.")


def _status_name(demo: _Demo, letter: str) -> str:
    entry = demo.store.statuses.get(("O", letter))
    return str(entry["description"]) if entry else letter


def _stock_step(demo: _Demo) -> None:
    _say()
    _say("3. Stock push (stock-snapshot consumer)")
    items = [
        StockItem(sku="Test001", on_hand=25, available=20),
        StockItem(sku="Test002", on_hand=3, available=-2),
        StockItem(sku="Test003", on_hand=0, available=0),
        StockItem(sku="NPF-TEE-BLK-M", on_hand=10, available=8),
        StockItem(sku="NPF-GONE-01", on_hand=5, available=5),
    ]
    before = {i.sku: (demo.store.product_by_code(i.sku) or {}).get("amount") for i in items}
    demo.store.clear_log()
    demo.publish(
        StockSnapshot(
            type="stock.snapshot", version=1, event_id=str(uuid.uuid4()), client_id=CLIENT,
            taken_at=datetime.now(UTC), items=items,
        )
    )
    time.sleep(0.3)
    _wait(demo.idle)
    _say("   Client DEMO pushes the *available* quantity, negatives as 0:")
    for item in items:
        product = demo.store.product_by_code(item.sku)
        after = product.get("amount") if product else None
        if product is None:
            _say(f"     {item.sku:<14} not in the store: reported, the rest applied")
        else:
            change = "unchanged (not written)" if str(before[item.sku]) == str(after) else "written"
            _say(
                f"     {item.sku:<14} on hand {item.on_hand:>3}, available {item.available:>3}"
                f" → store quantity {before[item.sku]} → {after}  {change}"
            )
    _say(f"   The store received {demo.store.count('products.update', 'PUT')} quantity updates.")


def _dead_letters(demo: _Demo) -> None:
    _say()
    letters = []
    for name in demo.runtimes_names():
        letters += [(name, m) for m in demo.take(f"cscart.{name}.dlq")]
    if not letters:
        _say("Dead letters: none. Every message was handled.")
        return
    _say(f"Dead letters ({len(letters)}), as support would see them:")
    for name, message in letters:
        headers = message.headers or {}
        _say(f"   [{name}] {headers.get('cscart-error-type')}: {headers.get('cscart-reason')}")


def run_demo(keep: bool = False) -> int:
    configure_logging("WARNING", "console")
    logging.getLogger("cscart_fm.core.runtime").setLevel(logging.ERROR)
    workdir = Path(tempfile.mkdtemp(prefix="cscart-fm-demo-"))
    _say("cscart-fm demo: the whole pipeline on the embedded default")
    demo = _Demo(workdir)
    try:
        _say(f"   broker: in-process ({demo.broker_url})")
        _say(f"   store: the CS-Cart emulator at {demo.store.url}")
        _say(f"   state: SQLite at {workdir / 'state.sqlite'}")
        _say()
        _orders_step(demo)
        _tracking_step(demo)
        _stock_step(demo)
        _dead_letters(demo)
    finally:
        demo.close()
        if keep:
            _say(f"\nKept {workdir} (clients.yaml, state.sqlite).")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    _say("\nDone. Run `cscart-fm --help` for the production commands.")
    return 0
