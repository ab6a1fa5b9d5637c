"""The CS-Cart client over real HTTP: against the store emulator, and against a tiny local
server for the malformed stores the emulator does not play (no total_items, redirects, ...)."""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import structlog
from prometheus_client import REGISTRY
from pydantic import SecretStr

from cscart.client import OPERATIONS, CsCartClient, _parse_retry_after
from cscart_fm.core.errors import (
    BadResponse,
    NotFound,
    RateLimited,
    StoreError,
    StoreForbidden,
    StoreOutcomeUnknown,
    StoreRefused,
    StoreUnauthorized,
    StoreUnreachable,
)
from schemas.settings import ClientSettings, StoreLimits

API_USER = "admin@example.com"
API_KEY = "test-api-key"

# --- helpers -------------------------------------------------------------------------------


class Waits(list[float]):
    """An injected sleep that records the waits instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def new_client(
    url: str,
    *,
    key: str = API_KEY,
    waits: Waits | None = None,
    api_entry: str = "api",
    max_pages: int = 10_000,
    **limits: Any,
) -> CsCartClient:
    defaults: dict[str, Any] = {
        "requests_per_second": 1000, "concurrency": 4, "connect_timeout": 2,
        "read_timeout": 5, "max_attempts": 3, "max_retry_wait": 2, "page_size": 10,
    }
    defaults.update(limits)
    return CsCartClient(
        client_id=f"t-{uuid.uuid4().hex[:8]}",  # fresh metric labels per test
        store_url=url,
        api_user=API_USER,
        api_key=SecretStr(key),
        limits=StoreLimits(**defaults),
        api_entry=api_entry,  # type: ignore[arg-type]
        sleep=waits if waits is not None else Waits(),
        max_pages=max_pages,
    )


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


Reply = tuple[int, dict[str, str], bytes]


def reply_json(data: Any, status: int = 200, **headers: str) -> Reply:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(data).encode()


@dataclass
class LocalStore:
    """A threaded HTTP server answering with ``responder``; counts requests in flight."""

    responder: Callable[[Seen], Reply]
    delay: float = 0.0
    seen: list[Seen] = field(default_factory=list)
    inflight: int = 0
    max_inflight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def __enter__(self) -> LocalStore:
        store = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                seen = Seen(self.command, parts.path, parse_qs(parts.query), dict(self.headers),
                            raw)
                with store.lock:
                    store.seen.append(seen)
                    store.inflight += 1
                    store.max_inflight = max(store.max_inflight, store.inflight)
                try:
                    if store.delay:
                        time.sleep(store.delay)
                    status, headers, body = store.responder(seen)
                finally:
                    with store.lock:
                        store.inflight -= 1
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if "Content-Length" not in headers:
                    self.close_connection = True  # the body ends when the connection does
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up reading: that is what some tests want

            do_GET = do_PUT = do_POST = do_DELETE = handle_any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                         daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def paged(key: str, items: list[dict[str, Any]], seen: Seen, **params: Any) -> Reply:
    """A CS-Cart list answer for the page asked."""
    size = int(seen.query.get("items_per_page", ["10"])[0])
    page = int(seen.query.get("page", ["1"])[0])
    chunk = items[(page - 1) * size : page * size]
    meta = {"page": page, "items_per_page": size, "total_items": str(len(items)), **params}
    return reply_json({key: chunk, "params": meta})


def slim_order(order_id: int, status: str = "P") -> dict[str, Any]:
    return {"order_id": str(order_id), "status": status, "timestamp": "1763769600",
            "total": "10.00"}


# --- the emulator --------------------------------------------------------------------------


@pytest.fixture
def emu() -> Iterator[Any]:
    from cscart_emulator import StoreEmulator

    with StoreEmulator(api_user=API_USER, api_key=API_KEY, user_id=1) as emulator:
        yield emulator
        assert emulator.errors == []  # the emulator's own bugs would hide behind 500s


def add_orders(emu: Any, count: int, status: str = "P") -> list[int]:
    return [
        emu.add_order(
            status=status,
            products=[{"product_code": "Test001", "amount": 2, "price": "10.00",
                       "product": "Test item 1"}],
            s_country="AU",
        )
        for _ in range(count)
    ]


# --- paging --------------------------------------------------------------------------------


def listed(client: CsCartClient, **filters: Any) -> list[Any]:
    """Every order of ``order_pages``, in the order the pages came."""
    return [order for page in client.order_pages(**filters) for order in page]


def test_orders_are_paged_to_the_end_by_time(emu: Any) -> None:
    ids = [emu.add_order(status="P", timestamp=1_760_000_000 + 60 * i) for i in range(27)]
    emu.clear_log()
    client = new_client(emu.url, page_size=10, concurrency=1)

    orders = listed(client, statuses=["P"])

    assert [o.order_id for o in orders] == ids  # one range, read in time order
    assert all(o.is_full and o.products for o in orders)
    lists = [r for r in emu.requests if r.endpoint == "orders.list"]
    assert len(lists) == 3  # 10 + 10 + 7, stopped by total_items
    assert [r.query["items_per_page"] for r in lists] == [["10"], ["11"], ["11"]]
    assert [r.query["time_from"] for r in lists] == [
        ["1"], [str(orders[9].timestamp)], [str(orders[19].timestamp)]]
    for r in lists:
        assert r.query["page"] == ["1"]
        assert r.query["sort_by"] == ["date"]
        assert r.query["sort_order"] == ["asc"]


def test_status_lists_are_sent_php_style(emu: Any) -> None:
    paid = add_orders(emu, 2, "P")
    complete = add_orders(emu, 2, "C")
    add_orders(emu, 2, "O")
    emu.clear_log()
    client = new_client(emu.url)

    orders = listed(client, statuses=["P", "C"])

    assert sorted(o.order_id for o in orders) == sorted(paid + complete)
    query = emu.requests[0].query
    assert query["status[]"] == ["P", "C"]
    assert "status" not in query


def test_time_filter_sends_unix_times_with_period_c(emu: Any) -> None:
    start = 1_760_000_000
    emu.add_history(20, start_timestamp=start, step_seconds=60, status="C")
    emu.clear_log()
    client = new_client(emu.url)

    orders = listed(client, time_from=start + 300)

    assert [o.timestamp for o in orders] == [start + 60 * i for i in range(5, 20)]
    query = emu.requests[0].query
    assert query["period"] == ["C"]
    assert query["time_from"] == [str(start + 300)]
    # Up to a day past now: a store whose clock runs ahead still lists its newest orders.
    assert int(query["time_to"][0]) >= time.time() + 86_000


def test_missing_total_items_fails_loudly() -> None:
    def respond(seen: Seen) -> Reply:
        return reply_json({"orders": [slim_order(1)], "params": {"page": 1}})

    with LocalStore(respond) as store, pytest.raises(BadResponse) as caught:
        listed(new_client(store.url))
    assert "total_items" in caught.value.reason
    assert caught.value.reason.startswith("orders.list:")


def test_non_numeric_total_items_fails_loudly() -> None:
    def respond(seen: Seen) -> Reply:
        return reply_json({"orders": [], "params": {"total_items": "lots"}})

    with LocalStore(respond) as store, pytest.raises(BadResponse, match="total_items"):
        listed(new_client(store.url))


def test_empty_page_before_total_fails_loudly() -> None:
    orders = [slim_order(i) for i in range(1, 11)]

    def respond(seen: Seen) -> Reply:
        if int(seen.query["time_from"][0]) > 1763769600:  # after the orders' one second
            return reply_json({"orders": [], "params": {"total_items": "0"}})
        if seen.query["page"] == ["1"]:
            return reply_json({"orders": orders, "params": {"total_items": "25"}})
        return reply_json({"orders": [], "params": {"total_items": "25"}})

    got: list[int] = []

    def read(url: str) -> None:
        for page in new_client(url).order_pages():
            got.extend(o.order_id for o in page)

    with LocalStore(respond) as store, pytest.raises(BadResponse, match="an empty page"):
        read(store.url)
    assert got == list(range(1, 11))  # the first page came before the failure


def test_store_ignoring_page_fails_instead_of_looping() -> None:
    orders = [slim_order(i) for i in range(1, 11)]

    def respond(seen: Seen) -> Reply:
        return reply_json({"orders": orders, "params": {"total_items": "30"}})

    # Refused by whichever answer comes first: the rest of the second, or the time after it.
    with LocalStore(respond) as store, pytest.raises(
        BadResponse, match=r"already read|ignores the time filter"
    ):
        listed(new_client(store.url))
    assert len(store.seen) <= 3  # refused at once, never looping


def test_hard_cap_of_pages() -> None:
    orders = [slim_order(i) for i in range(1, 101)]
    with LocalStore(lambda seen: paged("orders", orders, seen)) as store:
        with pytest.raises(BadResponse, match="more than 3 pages"):
            listed(new_client(store.url, max_pages=3))
        assert len(store.seen) == 1  # refused from the first page's total_items


# --- order pages: paged by placement time, side by side ------------------------------------


def _listed(pages: Any) -> list[int]:
    return [order.order_id for page in pages for order in page]


def test_order_pages_read_each_order_once_with_requests_side_by_side() -> None:
    start = 1_760_000_000
    orders = [dict(slim_order(i), timestamp=str(start + 60 * i)) for i in range(1, 201)]

    def respond(seen: Seen) -> Reply:
        low, high = int(seen.query["time_from"][0]), int(seen.query["time_to"][0])
        inside = [o for o in orders if low <= int(o["timestamp"]) <= high]
        return paged("orders", inside, seen)

    with LocalStore(respond, delay=0.05) as store:
        listed = _listed(new_client(store.url, page_size=10, concurrency=4).order_pages(
            time_from=start, statuses=["P"]))
    assert sorted(listed) == list(range(1, 201))  # every order, none twice
    assert store.max_inflight == 4  # side by side, never more than the store's limit
    assert 20 <= len(store.seen) <= 24  # 200 orders in pages of 10, a few partial pages more
    for seen in store.seen:
        assert seen.query["sort_by"] == ["date"] and seen.query["sort_order"] == ["asc"]
        assert seen.query["period"] == ["C"] and seen.query["status[]"] == ["P"]
        assert seen.query["get_orders_data"] == ["1"]


def test_order_pages_of_an_idle_store_cost_one_request(emu: Any) -> None:
    emu.add_history(50, start_timestamp=1_760_000_000, status="P")
    emu.clear_log()
    client = new_client(emu.url, page_size=10)

    assert _listed(client.order_pages(updated_from=int(time.time()) + 3600)) == []
    assert len(emu.requests) == 1


def test_order_pages_lose_no_order_when_others_leave_the_listing(emu: Any) -> None:
    """FM's shipments move orders from P to C while the listing is read: with offset paging
    every later order moves back by one and one per page boundary is never read."""
    from cscart_emulator import Fault

    ids = emu.add_history(60, start_timestamp=1_760_000_000, step_seconds=60, status="P")
    emu.set_fault("orders.list", Fault(latency=0.1))
    client = new_client(emu.url, page_size=10, concurrency=1)
    listed: list[int] = []
    for page in client.order_pages(statuses=["P"], time_from=1):
        listed.extend(order.order_id for order in page)
        for order_id in ids[len(listed) - 10 : len(listed) - 7]:
            emu.set_order_status(order_id, "C")  # three of the page just read leave
    assert listed == ids


def test_order_pages_read_a_second_holding_more_than_a_page(emu: Any) -> None:
    same = emu.add_history(35, start_timestamp=1_760_000_500, step_seconds=0, status="P")
    around = [emu.add_order(status="P", timestamp=1_760_000_000 + i * 400) for i in range(4)]
    emu.clear_log()

    listed = _listed(new_client(emu.url, page_size=10).order_pages(time_from=1))

    assert sorted(listed) == sorted(same + around)
    assert len(listed) == len(set(listed))


def test_order_pages_do_not_rely_on_the_order_of_ids_inside_a_second() -> None:
    """A store sorting by time alone may list the orders of one second in any order: the
    orders of the second a page ends in are told apart by id when the next page starts."""
    start = 1_760_000_000
    orders = [dict(slim_order(i), timestamp=str(start + (i // 7) * 60)) for i in range(1, 60)]
    by_time = sorted(orders, key=lambda o: (int(o["timestamp"]), -int(o["order_id"])))

    def respond(seen: Seen) -> Reply:
        low, high = int(seen.query["time_from"][0]), int(seen.query["time_to"][0])
        return paged("orders", [o for o in by_time if low <= int(o["timestamp"]) <= high], seen)

    with LocalStore(respond) as store:
        got = [o.order_id for o in listed(new_client(store.url, page_size=10), time_from=1)]
    assert sorted(got) == list(range(1, 60))


@pytest.mark.parametrize("ignores", ["time", "sort"])
def test_order_pages_refuse_a_store_that_ignores_the_time_paging(ignores: str) -> None:
    start = 1_760_000_000
    orders = [dict(slim_order(i), timestamp=str(start + 60 * i)) for i in range(1, 31)]
    if ignores == "sort":
        orders.reverse()

    def respond(seen: Seen) -> Reply:
        low = int(seen.query["time_from"][0])
        inside = orders if ignores == "time" else [o for o in orders
                                                   if int(o["timestamp"]) >= low]
        return paged("orders", inside, seen)

    with LocalStore(respond) as store, pytest.raises(BadResponse) as caught:
        _listed(new_client(store.url, page_size=10).order_pages(time_from=start + 600))
    assert ("time filter" if ignores == "time" else "sort_by=date") in caught.value.reason


def test_shipment_pages_stop_by_total_not_by_empty_page(emu: Any) -> None:
    order_id = emu.add_order(
        status="P",
        products=[{"product_code": "Test001", "amount": 12, "price": "1.00",
                   "product": "Test item 1"}],
        s_country="AU",
    )
    client = new_client(emu.url, page_size=5)
    order = client.get_order(order_id)
    (item_id,) = order.products
    shipping_id = order.shipping[0].shipping_id if order.shipping else 1
    for n in range(12):
        client.create_shipment(order_id=order_id, shipping_id=shipping_id,
                               tracking_number=f"TN{n}", carrier="aup",
                               products={item_id: 1})
    emu.clear_log()

    shipments = client.list_shipments(order_id)

    assert len(shipments) == 12
    assert len({s.shipment_id for s in shipments}) == 12
    assert emu.count(endpoint="shipments.list") == 3  # 5 + 5 + 2


def test_page_past_the_end_of_shipments_repeats_the_last_page() -> None:
    """The quirk itself, played locally: only total_items tells the end."""
    shipments = [{"shipment_id": str(i), "order_id": "7"} for i in range(1, 8)]

    def respond(seen: Seen) -> Reply:
        size = int(seen.query["items_per_page"][0])
        page = min(int(seen.query["page"][0]), 2)  # past the end: the last page again
        chunk = shipments[(page - 1) * size : page * size]
        return reply_json({"shipments": chunk, "params": {"total_items": "7"}})

    with LocalStore(respond) as store:
        got = new_client(store.url, page_size=5).list_shipments(7)
    assert [s.shipment_id for s in got] == list(range(1, 8))
    assert len(store.seen) == 2


# --- requests as CS-Cart needs them ------------------------------------------------------


def test_requests_carry_basic_auth_json_and_no_credentials_in_the_url() -> None:
    def respond(seen: Seen) -> Reply:
        if seen.method == "PUT":
            return reply_json({"product_id": "12"})
        return reply_json({"product_id": "12", "product_code": "A", "amount": "1"})

    with LocalStore(respond) as store:
        client = new_client(store.url)
        client.update_product_amount(12, 5)
        client.get_product(12)

    put, get = store.seen
    token = base64.b64encode(f"{API_USER}:{API_KEY}".encode()).decode()
    for seen in (put, get):
        assert seen.headers["Authorization"] == f"Basic {token}"
        assert seen.headers["Accept"] == "application/json"
        assert API_KEY not in seen.path and not any(
            API_KEY in v for values in seen.query.values() for v in values
        )
    assert (put.method, put.path) == ("PUT", "/api/products/12")
    assert put.headers["Content-Type"] == "application/json"
    assert json.loads(put.body) == {"amount": 5}
    assert get.path == "/api/products/12"


def test_api_php_entry_for_stores_without_url_rewriting() -> None:
    def respond(seen: Seen) -> Reply:
        return reply_json({"user_id": "1", "email": API_USER, "user_type": "A", "status": "A"})

    with LocalStore(respond) as store:
        user = new_client(store.url, api_entry="api.php").get_user(1)
    assert user.user_type == "A"
    (seen,) = store.seen
    assert seen.path == "/api.php"
    assert seen.query["_d"] == ["users/1"]


def test_store_url_with_credentials_is_refused() -> None:
    with pytest.raises(ValueError, match="credentials") as caught:
        new_client(f"https://{API_USER}:{API_KEY}@shop.example")
    assert API_KEY not in str(caught.value)


# --- typed errors ----------------------------------------------------------------------------


def test_unknown_order_is_not_found_naming_operation_status_and_order(emu: Any) -> None:
    with pytest.raises(NotFound) as caught:
        new_client(emu.url).get_order(1000012)
    assert caught.value.status == 404
    assert caught.value.reason == "orders.get: HTTP 404 Not Found (order 1000012)"


def test_wrong_key_is_unauthorized(emu: Any) -> None:
    with pytest.raises(StoreUnauthorized) as caught:
        new_client(emu.url, key="wrong-key").get_order(1)
    assert caught.value.status == 401
    assert caught.value.reason.startswith("orders.get: HTTP 401 Unauthorized")


def test_unauthorized_fault_is_not_retried(emu: Any) -> None:
    from cscart_emulator import Fault

    emu.set_fault("orders.list", Fault(unauthorized=True))
    emu.clear_log()
    waits = Waits()
    with pytest.raises(StoreUnauthorized):
        listed(new_client(emu.url, waits=waits))
    assert emu.count(endpoint="orders.list") == 1
    assert waits == []


@pytest.mark.parametrize(
    ("status", "error"),
    [(401, StoreUnauthorized), (403, StoreForbidden), (404, NotFound), (400, StoreRefused),
     (405, StoreRefused), (415, StoreRefused), (409, StoreRefused)],
)
def test_client_errors_are_typed_and_not_retried(status: int, error: type[StoreError]) -> None:
    message = "Invalid data: " + "x" * 500

    def respond(seen: Seen) -> Reply:
        return reply_json({"message": message, "status": status}, status=status)

    waits = Waits()
    with LocalStore(respond) as store, pytest.raises(error) as caught:
        new_client(store.url, waits=waits).get_product(5)
    assert caught.value.status == status
    assert caught.value.reason.startswith(f"products.get: HTTP {status} ")
    assert caught.value.reason.endswith("(product 5)")
    if error is StoreRefused:
        assert "Invalid data: xxx" in caught.value.reason
        assert len(caught.value.reason) < 300  # the store's message is truncated
    assert len(store.seen) == 1 and waits == []


def test_nothing_left_to_ship_is_refused_with_the_stores_message(emu: Any) -> None:
    order_id = add_orders(emu, 1)[0]
    client = new_client(emu.url)
    order = client.get_order(order_id)
    (item_id,) = order.products
    shipping_id = order.shipping[0].shipping_id if order.shipping else 1
    client.create_shipment(order_id=order_id, shipping_id=shipping_id, tracking_number="T1",
                           carrier="aup", products={item_id: 2})
    with pytest.raises(StoreRefused) as caught:
        client.create_shipment(order_id=order_id, shipping_id=shipping_id,
                               tracking_number="T2", carrier="aup", products={item_id: 1})
    assert caught.value.status == 400
    assert caught.value.reason == (
        f"shipments.create: HTTP 400 Bad Request: there are no products to ship (order {order_id})"
    )


def test_html_page_is_a_bad_response(emu: Any) -> None:
    from cscart_emulator import Fault

    emu.set_fault("orders.get", Fault(html_body=True))
    with pytest.raises(BadResponse) as caught:
        new_client(emu.url).get_order(add_orders(emu, 1)[0])
    assert "not JSON" in caught.value.reason


def test_html_page_with_200_from_a_proxy_is_a_bad_response() -> None:
    def respond(seen: Seen) -> Reply:
        return 200, {"Content-Type": "text/html"}, b"<html><body>Site suspended</body></html>"

    with LocalStore(respond) as store, pytest.raises(BadResponse) as caught:
        new_client(store.url).get_order(5)
    assert caught.value.reason == "orders.get: HTTP 200 OK: the answer is not JSON (text/html) (order 5)"


def test_oversized_body_is_a_bad_response(emu: Any) -> None:
    add_orders(emu, 30)
    with pytest.raises(BadResponse, match="larger than max_response_bytes"):
        listed(new_client(emu.url, max_response_bytes=2048))


def test_oversized_body_without_content_length_is_cut_short() -> None:
    big = b'{"orders": [' + b'{"order_id": "1"},' * 100_000 + b"{}]}"

    def respond(seen: Seen) -> Reply:
        return 200, {"Content-Type": "application/json"}, big  # streamed, no length

    with LocalStore(respond) as store, pytest.raises(BadResponse, match="larger"):
        listed(new_client(store.url, max_response_bytes=4096))


def test_redirects_are_not_followed() -> None:
    def respond(seen: Seen) -> Reply:
        return 301, {"Location": "https://shop.example/api/orders/5", "Content-Length": "0"}, b""

    with LocalStore(respond) as store, pytest.raises(BadResponse) as caught:
        new_client(store.url).get_order(5)
    assert caught.value.status == 301
    assert "store_url" in caught.value.action
    assert len(store.seen) == 1


def test_malformed_order_is_a_bad_response_naming_the_field() -> None:
    def respond(seen: Seen) -> Reply:
        return reply_json({"order_id": "abc", "status": "P", "timestamp": "1",
                           "email": "jane@example.com"})

    with LocalStore(respond) as store, pytest.raises(BadResponse) as caught:
        new_client(store.url).get_order(5)
    assert caught.value.reason.startswith("orders.get: unexpected CartOrder from the store: order_id")
    assert "jane@" not in caught.value.reason and "abc" not in caught.value.reason
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# --- retries -------------------------------------------------------------------------------


def test_5xx_is_retried_within_bounds_then_unreachable(emu: Any) -> None:
    from cscart_emulator import Fault

    order_id = add_orders(emu, 1)[0]
    emu.set_fault("orders.get", Fault(error_rate=1.0, error_status=503))
    emu.clear_log()
    waits = Waits()
    client = new_client(emu.url, waits=waits, max_attempts=4, max_retry_wait=0.7)

    with pytest.raises(StoreUnreachable) as caught:
        client.get_order(order_id)

    assert type(caught.value) is StoreUnreachable
    assert caught.value.status == 503
    assert "after 4 attempts" in caught.value.reason
    assert emu.count(endpoint="orders.get") == 4
    assert len(waits) == 3
    assert all(0 < w <= 0.7 for w in waits)
    assert waits[0] < waits[2] or waits[2] == 0.7  # growing, up to the cap


def test_429_is_retried_honouring_retry_after(emu: Any) -> None:
    from cscart_emulator import Fault

    order_id = add_orders(emu, 1)[0]
    emu.set_fault("orders.get", Fault(rate_limit_next=2, retry_after=1))
    emu.clear_log()
    waits = Waits()
    client = new_client(emu.url, waits=waits, max_attempts=3, max_retry_wait=1.5)
    before = sample("cscart_fm_store_retries_total", client=client.client_id,
                    operation="orders.get")

    order = client.get_order(order_id)

    assert order.order_id == order_id
    assert emu.count(endpoint="orders.get") == 3
    assert len(waits) == 2
    assert all(1.0 <= w <= 1.5 for w in waits)  # at least Retry-After, at most the cap
    assert sample("cscart_fm_store_retries_total", client=client.client_id,
                  operation="orders.get") == before + 2


def test_429_after_all_attempts_is_rate_limited(emu: Any) -> None:
    from cscart_emulator import Fault

    order_id = add_orders(emu, 1)[0]
    emu.set_fault("orders.get", Fault(rate_limit_next=10, retry_after=1))
    waits = Waits()
    with pytest.raises(RateLimited) as caught:
        new_client(emu.url, waits=waits, max_attempts=3, max_retry_wait=1).get_order(order_id)
    assert caught.value.status == 429
    assert waits == [1.0, 1.0]  # Retry-After, exactly at the cap


def test_retry_after_longer_than_the_cap_gives_up_at_once() -> None:
    def respond(seen: Seen) -> Reply:
        return reply_json({"message": "slow down"}, status=429, **{"Retry-After": "120"})

    waits = Waits()
    with LocalStore(respond) as store, pytest.raises(RateLimited) as caught:
        new_client(store.url, waits=waits, max_retry_wait=10).get_order(5)
    assert "asks to wait 120 s" in caught.value.reason
    assert waits == [] and len(store.seen) == 1


def test_retry_after_as_an_http_date() -> None:
    calls: list[int] = []

    def respond(seen: Seen) -> Reply:
        calls.append(1)
        if len(calls) == 1:
            when = format_datetime(datetime.now(UTC) + timedelta(seconds=3), usegmt=True)
            return reply_json({}, status=503, **{"Retry-After": when})
        return reply_json(slim_order(5))

    waits = Waits()
    with LocalStore(respond) as store:
        order = new_client(store.url, waits=waits, max_retry_wait=5).get_order(5)
    assert order.order_id == 5
    assert len(waits) == 1 and 1.0 <= waits[0] <= 3.5


def test_parse_retry_after() -> None:
    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC).timestamp()
    assert _parse_retry_after("7") == 7.0
    assert _parse_retry_after(" 0 ") == 0.0
    assert _parse_retry_after("Sun, 22 Nov 2026 12:00:30 GMT", lambda: now) == 30.0
    assert _parse_retry_after("Sun, 22 Nov 2026 11:00:00 GMT", lambda: now) == 0.0
    assert _parse_retry_after("-5") == 0.0
    assert _parse_retry_after("soon") is None
    assert _parse_retry_after(None) is None


def test_get_timeout_is_retried_then_unreachable() -> None:
    with LocalStore(lambda seen: reply_json(slim_order(5)), delay=0.6) as store:
        waits = Waits()
        client = new_client(store.url, waits=waits, read_timeout=0.2, max_attempts=2)
        with pytest.raises(StoreUnreachable) as caught:
            client.get_order(5)
    assert type(caught.value) is StoreUnreachable
    assert "read timeout" in caught.value.reason
    assert len(store.seen) == 2 and len(waits) == 1
    assert sample("cscart_fm_store_requests_total", client=client.client_id,
                  operation="orders.get", status_class="timeout") == 2


def test_timed_out_post_is_never_repeated(emu: Any) -> None:
    from cscart_emulator import Fault

    order_id = add_orders(emu, 1)[0]
    client = new_client(emu.url, read_timeout=0.3, max_attempts=3)
    order = client.get_order(order_id)
    (item_id,) = order.products
    emu.set_fault("shipments.create", Fault(timeout_rate=1.0, hang_seconds=1.5))
    emu.clear_log()

    with pytest.raises(StoreOutcomeUnknown) as caught:
        client.create_shipment(order_id=order_id, shipping_id=1, tracking_number="T1",
                               carrier="aup", products={item_id: 1})

    # The emulator logs a request once it has answered: wait out its hang.
    deadline = time.monotonic() + 5
    while emu.count(endpoint="shipments.create") == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert emu.count(endpoint="shipments.create", method="POST") == 1
    assert len(emu.shipments_for(order_id)) == 1  # it was applied: why it is never repeated
    assert caught.value.reason.startswith("shipments.create: no answer (read timeout)")
    assert f"order {order_id}" in caught.value.reason


def test_post_answered_5xx_is_outcome_unknown_and_not_repeated() -> None:
    waits = Waits()
    with LocalStore(lambda seen: reply_json({}, status=502)) as store, \
            pytest.raises(StoreOutcomeUnknown) as caught:
        new_client(store.url, waits=waits).create_shipment(
            order_id=7, shipping_id=1, tracking_number="T", carrier=None, products={"11": 1})
    assert caught.value.status == 502
    assert len(store.seen) == 1 and waits == []


def test_post_success_with_garbage_is_outcome_unknown() -> None:
    def respond(seen: Seen) -> Reply:
        return 201, {"Content-Type": "text/html"}, b"<html>Created</html>"

    with LocalStore(respond) as store, pytest.raises(StoreOutcomeUnknown):
        new_client(store.url).create_shipment(
            order_id=7, shipping_id=1, tracking_number="T", carrier=None, products={"11": 1})
    assert len(store.seen) == 1


def test_post_that_could_not_connect_is_retried() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    waits = Waits()
    client = new_client(f"http://127.0.0.1:{port}", waits=waits, max_attempts=3)
    with pytest.raises(StoreUnreachable) as caught:
        client.create_shipment(order_id=7, shipping_id=1, tracking_number="T", carrier=None,
                               products={"11": 1})
    assert type(caught.value) is StoreUnreachable  # nothing was sent: not "outcome unknown"
    assert len(waits) == 2
    assert sample("cscart_fm_store_requests_total", client=client.client_id,
                  operation="shipments.create", status_class="error") == 3


def test_create_shipment_validates_before_sending() -> None:
    with LocalStore(lambda seen: reply_json({"shipment_id": 1}, status=201)) as store:
        client = new_client(store.url)
        with pytest.raises(ValueError, match="whole order"):
            client.create_shipment(order_id=7, shipping_id=1, tracking_number="T",
                                   carrier=None, products={})
        with pytest.raises(StoreRefused, match="tracking number or a carrier"):
            client.create_shipment(order_id=7, shipping_id=1, tracking_number=None,
                                   carrier="", products={"11": 1})
    assert store.seen == []


# --- orders, shipments, products through the emulator ------------------------------------


def test_update_order_status_sends_only_status_and_false_flags(emu: Any) -> None:
    order_id = add_orders(emu, 1)[0]
    client = new_client(emu.url)
    emu.clear_log()

    client.update_order_status(order_id, "C")

    assert client.get_order(order_id).status == "C"
    (put,) = [r for r in emu.requests if r.method == "PUT"]
    assert put.json == {"status": "C", "notify_user": False, "notify_department": False,
                        "notify_vendor": False}
    assert emu.count(endpoint="statuses.list") == 1


def test_update_order_status_refuses_a_letter_the_store_lacks(emu: Any) -> None:
    order_id = add_orders(emu, 1)[0]
    client = new_client(emu.url)
    with pytest.raises(StoreRefused, match="not one of the store's order statuses"):
        client.update_order_status(order_id, "Z")
    assert emu.count(method="PUT") == 0
    assert emu.get_order_json(order_id)["status"] == "P"


def test_update_order_status_of_an_unknown_order_is_not_found(emu: Any) -> None:
    with pytest.raises(NotFound):
        new_client(emu.url).update_order_status(999_999, "C")


def test_update_order_status_detects_backordered_and_unchanged() -> None:
    state = {"status": "P", "becomes": "B"}

    def respond(seen: Seen) -> Reply:
        if seen.path == "/api/statuses":
            letters = ["O", "P", "C", "B", "I"]
            return reply_json({"statuses": [{"status": s, "type": "O"} for s in letters],
                               "params": {"total_items": len(letters)}})
        if seen.method == "PUT":
            state["status"] = state["becomes"]
            return reply_json({"order_id": "5"})
        return reply_json({**slim_order(5), "status": state["status"]})

    with LocalStore(respond) as store:
        client = new_client(store.url)
        with pytest.raises(StoreRefused, match=r"in B \(Backordered\) instead of C"):
            client.update_order_status(5, "C")
        state.update(status="P", becomes="P")
        with pytest.raises(StoreRefused, match="still in 'P', not 'C'"):
            client.update_order_status(5, "C")


def test_create_and_list_shipments(emu: Any) -> None:
    order_id = add_orders(emu, 1)[0]
    client = new_client(emu.url)
    order = client.get_order(order_id)
    (item_id,) = order.products
    shipping_id = order.shipping[0].shipping_id if order.shipping else 1
    emu.clear_log()

    shipment_id = client.create_shipment(
        order_id=order_id, shipping_id=shipping_id, tracking_number="33ABC1234567",
        carrier="aup", comments="Track: https://auspost.com.au/track", products={item_id: 1})

    (post,) = emu.requests
    assert post.method == "POST"
    assert post.json["products"] == {item_id: 1}
    assert post.json["notify_user"] is False
    assert "order_status" not in post.json
    (shipment,) = client.list_shipments(order_id)
    assert shipment.shipment_id == shipment_id
    assert shipment.tracking_number == "33ABC1234567"
    assert shipment.products == {item_id: 1}
    assert shipment.carrier_info and shipment.carrier_info["name"] == "Australia Post"

    client.update_shipment(shipment_id, tracking_number="33ABC7654321")
    assert client.get_shipment(shipment_id).tracking_number == "33ABC7654321"
    assert emu.requests[-2].json == {"tracking_number": "33ABC7654321"}
    with pytest.raises(NotFound, match=r"shipments.get: HTTP 404 Not Found \(shipment 999\)"):
        client.get_shipment(999)


def test_client_from_settings_as_a_context_manager(emu: Any) -> None:
    settings = ClientSettings.model_validate({
        "client_id": "ACME", "store_url": emu.url + "/", "api_user": API_USER,
        "api_key": API_KEY, "user_id": 1, "orders": {"start_date": "22/11/2026"},
        "limits": {"requests_per_second": 100, "page_size": 7},
    })
    with CsCartClient.for_client(settings) as client:
        assert client.get_user(settings.user_id).user_type == "A"
        assert client.limits.page_size == 7
        assert client.client_id == "ACME"
        assert API_KEY not in repr(client)


def test_find_products_by_code_filters_the_substring_match(emu: Any) -> None:
    wanted = emu.add_product("ABC1", amount=3)
    emu.add_product("abc10", amount=1)
    emu.add_product("XABC1", amount=1)
    client = new_client(emu.url)

    found = client.find_products_by_code("ABC1")

    assert [p.product_id for p in found] == [wanted]
    assert found[0].amount == 3


def test_update_product_amount_and_unknown_product(emu: Any) -> None:
    product_id = emu.add_product("Test001", amount=0)
    client = new_client(emu.url)
    client.update_product_amount(product_id, 42)
    assert client.get_product(product_id).amount == 42
    with pytest.raises(NotFound) as caught:
        client.update_product_amount(987_654, 1)
    assert caught.value.reason == "products.update: HTTP 404 Not Found (product 987654)"


def test_iter_products_pages_to_the_end(emu: Any) -> None:
    for n in range(23):
        emu.add_product(f"SKU-{n:03d}", amount=n)
    emu.clear_log()
    products = list(new_client(emu.url, page_size=10).iter_products())
    assert len({p.product_id for p in products}) == 23
    assert emu.count(endpoint="products.list") == 3


def test_user_and_statuses(emu: Any) -> None:
    client = new_client(emu.url)
    user = client.get_user(1)
    assert (user.user_id, user.email, user.user_type) == (1, API_USER, "A")
    letters = {s.status for s in client.list_statuses()}
    assert {"O", "P", "C", "B", "I"} <= letters


@pytest.mark.parametrize(("version", "modern"), [((4, 18), True), ((4, 12), False)])
def test_capabilities_are_detected_and_order_pages_adapt(
    version: tuple[int, int], modern: bool
) -> None:
    from cscart_emulator import StoreEmulator

    with StoreEmulator(api_user=API_USER, api_key=API_KEY, version=version) as store:
        client = new_client(store.url)
        assert client.supports_updated_at() is False  # no order yet: cannot tell
        hour_ago = int(time.time()) - 3600
        old = [store.add_order(status="P", timestamp=hour_ago) for _ in range(3)]
        assert client.supports_updated_at() is modern
        store.clear_log()
        client.supports_updated_at()
        assert store.count() == 0  # cached

        orders = listed(client)

        assert [o.order_id for o in orders] == old
        # Old stores ignore get_orders_data: slim items, completed only by whoever needs to.
        assert all(o.is_full and o.products for o in orders) if modern else not any(
            o.is_full for o in orders)
        assert store.count(endpoint="orders.get") == 0
        if modern:
            store.set_order_status(old[1], "C")
            changed = listed(client, updated_from=hour_ago + 60)
            assert [o.order_id for o in changed] == [old[1]]


def test_combinations_on_an_old_store() -> None:
    from cscart_emulator import StoreEmulator

    with StoreEmulator(api_user=API_USER, api_key=API_KEY, version=(4, 9)) as store:
        shirt = store.add_product("SHIRT", tracking="O")
        plain = store.add_product("PLAIN")
        for n in range(12):
            store.add_combination(shirt, f"SHIRT-{n}", n, {"3": str(n)})
        client = new_client(store.url, page_size=5)
        assert client.get_product(shirt).tracks_combinations

        combos = list(client.iter_combinations(shirt))
        assert sorted(c.amount for c in combos) == list(range(12))  # all, not one page
        assert "items_per_page" not in store.requests[-1].query

        client.update_combination_amount(combos[0].combination_hash, 99)
        assert store.combinations[combos[0].combination_hash]["amount"] == 99
        assert list(client.iter_combinations(plain)) == []


# --- combinations (old stores) -------------------------------------------------------------


def test_combinations_bare_list_none_and_refusal() -> None:
    combos = [{"product_id": "12", "product_code": "BW/S", "combination_hash": "822274303",
               "amount": "50"},
              {"product_id": "12", "product_code": "BW/M", "combination_hash": "345234623",
               "amount": "0"}]

    def respond(seen: Seen) -> Reply:
        if seen.path == "/api/combinations" and seen.query["product_id"] == ["12"]:
            return reply_json(combos)  # a bare list, all at once
        if seen.path == "/api/combinations":
            return reply_json({"message": "Not Found"}, status=404)
        if seen.path == "/api/products/13":
            return reply_json({"product_id": "13", "tracking": "B"})
        if seen.path == "/api/products/14":
            return reply_json({"message": "Not Found"}, status=404)
        if seen.path == "/api/combinations/822274303":
            return reply_json({"combination_hash": "822274303"})
        return reply_json({"message": "Access denied"})  # 200 with only a message

    with LocalStore(respond) as store:
        client = new_client(store.url)
        got = list(client.iter_combinations(12))
        assert [(c.combination_hash, c.amount) for c in got] == [("822274303", 50),
                                                                ("345234623", 0)]
        assert list(client.iter_combinations(13)) == []  # product exists, no combinations
        with pytest.raises(NotFound):
            list(client.iter_combinations(14))
        client.update_combination_amount("822274303", 7)
        with pytest.raises(StoreRefused, match="Access denied"):
            client.update_combination_amount("345234623", 7)


# --- gentleness: rate limit and concurrency ------------------------------------------------


def test_rate_limit_spaces_requests() -> None:
    with LocalStore(lambda seen: reply_json(slim_order(5))) as store:
        client = new_client(store.url, requests_per_second=20)
        started = time.monotonic()
        threads = [threading.Thread(target=client.get_order, args=(5,)) for _ in range(11)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
    assert len(store.seen) == 11
    assert elapsed >= 0.45  # 10 intervals of 50 ms, measured loosely


def test_concurrency_cap_is_shared_by_threads() -> None:
    with LocalStore(lambda seen: reply_json(slim_order(5)), delay=0.1) as store:
        client = new_client(store.url, concurrency=2)
        threads = [threading.Thread(target=client.get_order, args=(5,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(store.seen) == 8
    assert store.max_inflight == 2


# --- metrics and logs ----------------------------------------------------------------------


def test_metrics_per_attempt_with_bounded_labels(emu: Any) -> None:
    from cscart_emulator import Fault

    order_id = add_orders(emu, 1)[0]
    client = new_client(emu.url, max_attempts=2)
    cid = client.client_id

    client.get_order(order_id)
    with pytest.raises(NotFound):
        client.get_order(order_id + 1000)
    emu.set_fault("orders.get", Fault(error_rate=1.0, error_status=502))
    with pytest.raises(StoreUnreachable):
        client.get_order(order_id)

    def requests_total(status_class: str) -> float:
        return sample("cscart_fm_store_requests_total", client=cid, operation="orders.get",
                      status_class=status_class)

    assert requests_total("2xx") == 1
    assert requests_total("4xx") == 1
    assert requests_total("5xx") == 2
    assert sample("cscart_fm_store_request_seconds_count", client=cid,
                  operation="orders.get") == 4
    assert sample("cscart_fm_store_retries_total", client=cid, operation="orders.get") == 1
    # Labels are bounded: the client, an operation name, a status class; never an id.
    for metric in REGISTRY.collect():
        for s in metric.samples:
            if s.labels.get("client") == cid:
                assert s.labels["operation"] in OPERATIONS
                assert s.labels.get("status_class", "2xx") in {
                    "2xx", "3xx", "4xx", "5xx", "timeout", "error"}
                assert set(s.labels) <= {"client", "operation", "status_class", "le"}


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[io.StringIO]:
    """Every log line at DEBUG, structlog's and the stdlib's (urllib3 included), rendered
    plainly, with no redaction: what the client itself emits."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    logging.getLogger("urllib3").setLevel(logging.DEBUG)
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.format_exc_info,
                    structlog.processors.KeyValueRenderer()],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    caplog.set_level(logging.DEBUG)
    try:
        yield stream
    finally:
        structlog.reset_defaults()
        root.removeHandler(handler)
        root.setLevel(old_level)


def test_the_api_key_never_reaches_a_log(
    emu: Any, all_logs: io.StringIO, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cscart_emulator import Fault

    order_id = add_orders(emu, 12)[0]
    client = new_client(emu.url, read_timeout=0.3, max_attempts=2)
    errors: list[BaseException] = []

    listed(client)
    client.update_order_status(order_id, "C")
    calls: list[Callable[[], object]] = [
        lambda: client.get_order(999_999),
        lambda: new_client(emu.url, key="wrong-key").get_order(order_id),
    ]
    for call in calls:
        try:
            call()
        except StoreError as exc:
            errors.append(exc)
    emu.set_fault("orders.get", Fault(error_rate=1.0, error_status=503))
    emu.set_fault("shipments.create", Fault(timeout_rate=1.0, hang_seconds=1.0))
    emu.set_fault("orders.list", Fault(html_body=True))
    calls = [
        lambda: client.get_order(order_id),
        lambda: listed(client),
        lambda: client.create_shipment(order_id=order_id, shipping_id=1, tracking_number="T",
                                       carrier=None, products={"1": 1}),
    ]
    for call in calls:
        try:
            call()
        except StoreError as exc:
            errors.append(exc)
            # As the runtime would: the error with its traceback, through both loggers.
            logging.getLogger("test").exception("handler failed")
            structlog.get_logger("test").exception("handler failed", error=str(exc))

    assert len(errors) == 5
    logged = all_logs.getvalue() + caplog.text
    out, err = capsys.readouterr()
    # The capture works: our lines, urllib3's, and the tracebacks.
    assert "cscart.retry" in logged and "cscart.request" in logged
    assert '"GET /api/orders' in logged
    assert "Traceback" in logged
    basic = base64.b64encode(f"{API_USER}:{API_KEY}".encode()).decode()
    for text in (logged, out, err, *map(str, errors), *map(repr, errors), repr(client)):
        assert API_KEY not in text
        assert basic not in text
    for error in errors:
        assert API_KEY not in getattr(error, "action", "")


def test_the_decimals_come_through_json_exactly(emu: Any) -> None:
    order_id = emu.add_order(
        status="P",
        products=[{"product_code": "Test001", "amount": 3, "price": "0.10",
                   "product": "Test item 1"}],
        s_country="AU",
    )
    order = new_client(emu.url).get_order(order_id)
    (line,) = order.lines
    assert line.price == Decimal("0.10")
    assert line.price * line.amount == Decimal("0.30")
