"""A CS-Cart 4.x store emulator: a real HTTP server speaking the store's REST API.

It reproduces what /work/shared/cscart-api.md describes, quirks included, for every endpoint
the bridge uses, so the client, the consumers, the benchmarks and the demo can run against
something that fails the way a real store fails.

Usage::

    with StoreEmulator(api_user="admin@example.com", api_key="k") as emu:
        emu.add_product("Test001", amount=5)
        oid = emu.add_order(products=[{"product_code": "Test001", "amount": 2}])
        requests.get(f"{emu.url}/api/orders/{oid}", auth=("admin@example.com", "k"))

Inspection:

- ``emu.orders[order_id]`` is a :class:`StoredOrder` (slotted). Read fields as attributes
  (``.status``) or by key (``["status"]``); ``emu.get_order_json(id)`` is the served JSON.
- ``emu.shipments`` / ``emu.shipments_for(order_id)``: dicts exactly as served.
- ``emu.products[product_id]`` / ``emu.product_by_code(code)``: the stored dict; ``amount`` is
  an ``int`` there (the API serves it as a string).
- ``emu.requests`` (every request, faulted ones included), ``emu.count()``, ``emu.clear_log()``.
- ``emu.notifications``: ``(order_id, status, notify_user)`` per status change made through the
  API (``PUT /orders`` or ``order_status`` on a shipment); ``emu.status_changes`` has every
  change with all three flags and its source; ``emu.ignored_fields`` the keys a PUT ignored;
  ``emu.back_in_stock`` product ids whose stock went from <= 0 to > 0 through the API;
  ``emu.errors`` tracebacks of emulator bugs (a test should expect it empty).

Choices where the reference leaves one (each also noted where it is made):

- Unknown order on ``POST /shipments`` → 400 (CS-Cart creates nothing and answers 400).
- Routing (404) is decided before authentication; 405 after it.
- ``shipped_amount`` is the number ``0`` when nothing shipped and a string (``"2"``) once
  something did, ``shipment_amount`` a number: that is what PHP produces (DB string vs
  arithmetic). Parse both tolerantly.
- Status changes move stock when the inventory flags differ (``move_stock=True``), for products
  tracked by product (``B``) or by combination (``O``); seeding an order takes no stock.
  ``allow_negative_stock=False`` makes a short order go to ``B`` instead.
- Products are sorted by name, then product_id (the store's default "A to Z"); shipments newest
  first; statuses in insertion order and filtered to ``type`` ``O`` unless ``type`` is given.
- ``GET /combinations`` answers a bare JSON list (as documented), paged only when
  ``items_per_page`` is given; ``product_id`` is required there (400 otherwise).
- Faults: the endpoint's own fault wins over ``"*"``; within one, the order is rate limit,
  unauthorized, HTML page, error, timeout (latency always applies first). A hung write with
  ``timeout_applies=False`` is not applied and ends in 504 (a proxy gave up).
  502/503/504 errors carry an HTML body (proxies write those), other statuses JSON.
- ``carrier_info`` is given only for the carrier codes CS-Cart knows, matched exactly.
- Extra endpoints beyond the brief: ``statuses.get``, ``users.list``, ``combinations.get``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import heapq
import hmac
import json
import random
import re
import socket
import sys
import threading
import time
import traceback
import zlib
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit
from zoneinfo import ZoneInfo

__all__ = [
    "ENDPOINTS",
    "Fault",
    "RecordedRequest",
    "StoreEmulator",
    "StoredOrder",
    "seed_demo_store",
]

# The names the bridge's HTTP client uses in its metrics; faults are keyed by them too.
ENDPOINTS: frozenset[str] = frozenset(
    {
        "orders.list", "orders.get", "orders.update",
        "shipments.list", "shipments.get", "shipments.create", "shipments.update",
        "shipments.delete",
        "products.list", "products.get", "products.update",
        "statuses.list", "statuses.get",
        "users.list", "users.get",
        "combinations.list", "combinations.get", "combinations.update",
    }
)  # fmt: skip

_ENTITY_ACTIONS: dict[str, frozenset[str]] = {
    "orders": frozenset({"list", "get", "update"}),
    "shipments": frozenset({"list", "get", "create", "update", "delete"}),
    "products": frozenset({"list", "get", "update"}),
    "statuses": frozenset({"list", "get"}),
    "users": frozenset({"list", "get"}),
    "combinations": frozenset({"list", "get", "update"}),
}
_ACTIONS: dict[tuple[str, bool], str] = {
    ("GET", False): "list",
    ("GET", True): "get",
    ("POST", False): "create",
    ("PUT", True): "update",
    ("DELETE", True): "delete",
}

# Default order statuses: letter, name, inventory flag, colour. P is renamed on 4.13+.
_DEFAULT_STATUSES: tuple[tuple[str, str, str, str], ...] = (
    ("O", "Open", "D", "#ff5215"),
    ("P", "Processed", "D", "#97cf4d"),
    ("C", "Complete", "D", "#97cf4d"),
    ("F", "Failed", "I", "#ff5215"),
    ("D", "Declined", "I", "#d2d2d2"),
    ("B", "Backordered", "D", "#28abf6"),
    ("I", "Canceled", "I", "#c2c2c2"),
    ("N", "Incomplete", "I", "#999999"),
)

# Carrier codes CS-Cart builds a tracking link for (plausible URLs; {tn} = tracking number).
CARRIERS: dict[str, tuple[str, str]] = {
    "aup": ("Australia Post", "https://auspost.com.au/mypost/track/#/details/{tn}"),
    "usps": ("USPS", "https://tools.usps.com/go/TrackConfirmAction_input?qtc_tLabels1={tn}"),
    "ups": ("UPS", "https://www.ups.com/WebTracking?track=yes&trackNums={tn}"),
    "fedex": ("FedEx", "https://www.fedex.com/apps/fedextrack/?tracknumbers={tn}"),
    "dhl": ("DHL", "https://www.dhl.com/en/express/tracking.html?AWB={tn}&brand=DHL"),
    "can": (
        "Canada Post",
        "https://www.canadapost-postescanada.ca/track-reperage/en#/search?searchFor={tn}",
    ),
    "swisspost": ("Swiss Post", "https://service.post.ch/ekp-web/ui/entry/search/{tn}"),
    "temando": ("Temando", "https://temando.com/en/track?token={tn}"),
}

# Plausible address per country, shared by every order (keeps orders compact).
_ADDRESSES: dict[str, tuple[str, str, str, str, str]] = {
    "AU": ("1 George Street", "Sydney", "NSW", "2000", "+61 2 9000 0000"),
    "NZ": ("12 Queen Street", "Auckland", "AUK", "1010", "+64 9 300 0000"),
    "US": ("350 Fifth Avenue", "New York", "NY", "10118", "+1 212 555 0100"),
    "GB": ("10 Baker Street", "London", "", "NW1 6XE", "+44 20 7946 0000"),
    "CA": ("100 Queen Street West", "Toronto", "ON", "M5H 2N2", "+1 416 555 0100"),
}
_DEFAULT_ADDRESS = ("1 Main Street", "Springfield", "", "12345", "")

_HTML_MAINTENANCE = (
    b"<!DOCTYPE html><html><head><title>Maintenance</title></head><body>"
    b"<h1>We'll be back soon</h1><p>The store is undergoing maintenance.</p></body></html>"
)

_Line = tuple[int, str, str, int, str]  # product_id, product_code, product name, amount, price


# --------------------------------------------------------------------------------------------
# Public records
# --------------------------------------------------------------------------------------------
@dataclass
class Fault:
    """What to do wrong on an endpoint. Mutable: ``rate_limit_next`` counts down in place."""

    latency: float = 0.0  # seconds added before answering
    error_rate: float = 0.0  # share answered error_status, effect NOT applied
    error_status: int = 503
    timeout_rate: float = 0.0  # share that hang hang_seconds before answering
    timeout_applies: bool = True  # a hung write IS applied first (the outcome-unknown case)
    hang_seconds: float = 5.0
    rate_limit_next: int = 0  # the next N requests answer 429 with Retry-After
    retry_after: int = 1
    unauthorized: bool = False  # answer 401 as CS-Cart does (e.g. a stripped header)
    html_body: bool = False  # answer 200 with a text/html page (a proxy's error page)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    endpoint: str | None  # None when the path routed nowhere (404)
    path: str
    query: dict[str, list[str]]
    json: Any | None  # the body as the store understood it (None: nothing understood)
    status: int
    at: float  # arrival, Unix time
    body: bytes = b""
    content_type: str = ""
    fault: str | None = None  # rate_limit, unauthorized, html, error, timeout
    duration: float = 0.0


@dataclass(slots=True)
class StoredOrder:
    """One order, kept small: 100,000 of them must fit in a few tens of MB."""

    order_id: int
    status: str
    timestamp: int
    updated_at: int
    lines: tuple[_Line, ...]  # often shared between orders seeded by add_history
    s_country: str
    b_country: str
    email: str
    firstname: str
    lastname: str
    company_id: int
    parent_order_id: int
    is_parent_order: str
    shipping_id: int
    shipping: str
    notes: str
    user_id: int
    total: str | None  # None: computed from the lines
    extra: dict[str, Any] | None  # other fields, served as given (may be shared: never mutate)

    def __getitem__(self, key: str) -> Any:
        # dict-style access for tests that prefer it
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None


# --------------------------------------------------------------------------------------------
# PHP-isms
# --------------------------------------------------------------------------------------------
_INT_PREFIX = re.compile(r"\s*[+-]?\d+")
_NUMERIC = re.compile(r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$")
_KEY_RE = re.compile(r"^([^\[]+)((?:\[[^\]]*\])*)")
_SUBKEY_RE = re.compile(r"\[([^\]]*)\]")
_CANON_INT = re.compile(r"^(0|-?[1-9]\d*)$")


def _php_truthy(value: Any) -> bool:
    """PHP's !empty(): "", "0", 0, false, null and empty arrays are off; "N" is ON."""
    if value is None or value is False:
        return False
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str):
        return value not in ("", "0")
    if isinstance(value, list | dict):
        return len(value) > 0
    return True


def _php_int(value: Any) -> int:
    """PHP's intval(): leading digits of a string, 0 for anything else."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value == value and abs(value) != float("inf") else 0
    if isinstance(value, str):
        if _NUMERIC.match(value):
            stripped = value.strip()
            return int(stripped) if stripped.lstrip("+-").isdigit() else int(float(stripped))
        m = _INT_PREFIX.match(value)
        return int(m.group()) if m else 0
    if isinstance(value, list | dict):
        return 1 if value else 0
    return 0


def _php_str(value: Any) -> str:
    if value is None or value is False:
        return ""
    if value is True:
        return "1"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, list | dict):
        return "Array"
    return str(value)


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return list(value.values())
    return [value]


def _php_parse(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Parse query/form pairs the way PHP fills $_GET: ``a[]=1`` lists, ``a[b]=1`` nesting,
    the last plain ``a=`` wins, and a comma is just a character."""
    root: dict[Any, Any] = {}
    for raw_key, value in pairs:
        m = _KEY_RE.match(raw_key)
        if not m:
            continue  # PHP drops a key with an empty base name
        base = m.group(1).replace(".", "_").replace(" ", "_")
        keys: list[Any] = [base, *_SUBKEY_RE.findall(m.group(2))]
        cur = root
        for i, key in enumerate(keys):
            if i > 0:
                if key == "":
                    ints = [k for k in cur if isinstance(k, int)]
                    key = max(ints) + 1 if ints else 0
                elif _CANON_INT.match(key):
                    key = int(key)  # PHP turns numeric string keys into integers
            if i == len(keys) - 1:
                cur[key] = value
            else:
                nxt = cur.get(key)
                if not isinstance(nxt, dict):
                    nxt = {}
                    cur[key] = nxt
                cur = nxt
    out = _listify(root)
    return out if isinstance(out, dict) else {}


def _listify(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    converted = {k: _listify(v) for k, v in value.items()}
    if converted and list(converted) == list(range(len(converted))):
        return list(converted.values())  # a PHP "list" array: json_encode writes []
    return {str(k): v for k, v in converted.items()}


def _phpify(value: Any) -> Any:
    """Empty objects come out of json_encode as []: convert once, when data is stored."""
    if isinstance(value, dict):
        return {k: _phpify(v) for k, v in value.items()} if value else []
    if isinstance(value, list | tuple):
        return [_phpify(v) for v in value]
    return value


def _encode(payload: Any) -> bytes:
    # PHP json_encode: compact, non-ASCII as \uXXXX, slashes escaped. "/" only occurs inside
    # strings in JSON text, so a blanket replace is exact.
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"))
    return text.replace("/", "\\/").encode("ascii")


def _money(value: Any) -> str:
    try:
        return f"{Decimal(_php_str(value) or '0'):.2f}"
    except InvalidOperation:
        return "0.00"


def _error(status: int, detail: str = "") -> dict[str, Any]:
    reason = HTTPStatus(status).phrase
    return {"message": f"{reason}: {detail}" if detail else reason, "status": status}


def _item_ids(order: StoredOrder) -> list[str]:
    """Stable numeric item ids like CS-Cart's (e.g. "2412734920"): a hash of the order id and
    the product code, salted on the rare collision."""
    seen: set[str] = set()
    out: list[str] = []
    for n, line in enumerate(order.lines):
        salt = f"{order.order_id}:{line[1]}"
        iid = str(zlib.crc32(salt.encode()))
        while iid in seen:
            salt += f":{n}"
            iid = str(zlib.crc32(salt.encode()))
        seen.add(iid)
        out.append(iid)
    return out


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class _Route:
    entity: str
    ident: str | None
    action: str
    endpoint: str
    allowed: bool


@dataclass(slots=True)
class _Plan:
    kind: str | None = None
    latency: float = 0.0
    status: int = 0
    retry_after: int = 1
    hang: float = 0.0
    applies: bool = True


def _json_response(
    status: int, payload: Any, headers: list[tuple[str, str]] | None = None
) -> _Response:
    body = b"" if status == 204 else _encode(payload)
    return _Response(status, body, "application/json", headers or [])


def _html_response(status: int, body: bytes | None = None) -> _Response:
    if body is None:
        phrase = HTTPStatus(status).phrase
        body = (
            f"<!DOCTYPE html><html><head><title>{status} {phrase}</title></head>"
            f"<body><h1>{phrase}</h1><hr><address>nginx</address></body></html>"
        ).encode()
    return _Response(status, body, "text/html; charset=UTF-8")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    timeout = 120  # an idle keep-alive connection ends eventually
    wbufsize = 64 * 1024  # headers and body leave in one write (flushed per response)

    def setup(self) -> None:
        super().setup()
        # no Nagle: a small answer must not wait for the client's delayed ACK (40 ms)
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def version_string(self) -> str:
        return "Apache"

    def log_message(self, format: str, *args: Any) -> None:
        return  # quiet: no access log on stderr

    def handle(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        server.track(self.connection, add=True)
        try:
            super().handle()
        except OSError:
            pass  # the client went away (timed out and closed): nothing to report
        finally:
            server.track(self.connection, add=False)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def _read_body(self) -> bytes | None:
        """The request body; None when the client went away before sending all of it."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                line = self.rfile.readline()
                if not line:
                    return None
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunk = self.rfile.read(size)
                if len(chunk) < size:
                    return None
                chunks.append(chunk)
                self.rfile.readline()
        length = _php_int(self.headers.get("Content-Length") or "0")
        if length <= 0:
            return b""
        body = self.rfile.read(length)
        return body if len(body) == length else None

    def _serve(self, method: str) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        try:
            body = self._read_body()
        except ValueError:  # a malformed chunk size
            body = None
        if body is None:
            self.close_connection = True  # a truncated request: PHP never runs, nothing applies
            return
        resp = server.emu._handle(method, self.path, self.headers, body)
        try:
            self.send_response(resp.status)
            for name, value in resp.headers:
                self.send_header(name, value)
            if resp.status != 204:
                self.send_header("Content-Type", resp.content_type)
                self.send_header("Content-Length", str(len(resp.body)))
            self.end_headers()
            if resp.body and resp.status != 204:
                self.wfile.write(resp.body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client is gone; the log has the answer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], emu: StoreEmulator) -> None:
        self.emu = emu
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, conn: socket.socket, *, add: bool) -> None:
        with self._conns_lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return  # a disconnect: quiet
        self.emu.errors.append(traceback.format_exc())


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------
class StoreEmulator:
    """A CS-Cart 4.x store: state, seeding helpers, fault injection and the HTTP server."""

    def __init__(
        self,
        api_user: str = "admin@example.com",
        api_key: str = "test-api-key",
        user_id: int = 1,
        timezone: str = "UTC",
        version: tuple[int, int] = (4, 18),
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
        *,
        currency: str = "AUD",
        move_stock: bool = True,
        allow_negative_stock: bool = True,
    ) -> None:
        self.api_user = api_user
        self.api_key = api_key
        self.user_id = user_id
        self.timezone = timezone
        self.tz = ZoneInfo(timezone)
        self.version = tuple(version)
        self.host = host
        self.port = port
        self.currency = currency
        self.move_stock = move_stock
        self.allow_negative_stock = allow_negative_stock

        self._lock = threading.RLock()  # every piece of store state
        self._fault_lock = threading.Lock()
        self._rng = random.Random(seed)
        self._faults: dict[str, Fault] = {}
        self._stop_event = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

        self.users: dict[int, dict[str, Any]] = {}
        self.statuses: dict[tuple[str, str], dict[str, Any]] = {}  # (type, letter) -> status
        self._next_status_id = 1
        self.products: dict[int, dict[str, Any]] = {}
        self._product_codes: dict[str, int] = {}
        self._next_product_id = 1
        self.combinations: dict[str, dict[str, Any]] = {}
        self.orders: dict[int, StoredOrder] = {}
        self._order_ids: list[int] = []  # sorted
        # (updated_at, order_id), sorted: a store answers "changed since" from an index, so
        # an idle listing of a long history costs it no more than of a short one.
        self._by_change: list[tuple[int, int]] = []
        self._next_order_id = 1
        self._shipments: dict[int, _Shipment] = {}
        self._shipments_by_order: dict[int, list[int]] = {}
        self._next_shipment_id = 1

        self.requests: list[RecordedRequest] = []
        self.notifications: list[tuple[int, str, bool]] = []
        self.status_changes: list[dict[str, Any]] = []
        self.ignored_fields: list[tuple[str, str, list[str]]] = []
        self.back_in_stock: list[int] = []
        self.errors: list[str] = []

        for letter, name, inventory, color in _DEFAULT_STATUSES:
            if letter == "P" and self.version >= (4, 13):
                name = "Paid"
            self.add_status(letter, name, inventory=inventory, _color=color, _default=True)
        self.add_user(
            user_id, api_user, "A", "A", api_key=api_key, firstname="Store", lastname="Admin"
        )

    # ---- feature switches ------------------------------------------------------------------
    @property
    def has_orders_data(self) -> bool:
        return self.version >= (4, 13)

    @property
    def has_updated_at_filter(self) -> bool:
        return self.version >= (4, 13)

    @property
    def has_variations(self) -> bool:
        return self.version >= (4, 10)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> StoreEmulator:
        if self._server is not None:
            return self
        self._stop_event.clear()
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]  # a restart keeps the same port
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"cscart-emulator:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stop_event.set()  # ends hung requests early
        server.shutdown()
        server.server_close()
        server.close_connections()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (the CLI's ``emulator`` command)."""
        self.start()
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> StoreEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __repr__(self) -> str:
        return (
            f"StoreEmulator(url={self.url!r}, version={self.version}, "
            f"orders={len(self.orders)}, products={len(self.products)})"
        )

    # ---- faults and the log ------------------------------------------------------------------
    def set_fault(self, endpoint: str, fault: Fault | None) -> None:
        if endpoint != "*" and endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {sorted(ENDPOINTS)} or '*'")
        with self._fault_lock:
            if fault is None:
                self._faults.pop(endpoint, None)
            else:
                self._faults[endpoint] = fault

    def clear_faults(self) -> None:
        with self._fault_lock:
            self._faults.clear()

    def count(self, endpoint: str | None = None, method: str | None = None) -> int:
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (endpoint is None or r.endpoint == endpoint)
                and (method is None or r.method == method.upper())
            )

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    # ---- seeding -----------------------------------------------------------------------------
    def add_user(
        self,
        user_id: int | None,
        email: str,
        user_type: str = "A",
        status: str = "A",
        api_key: str | None = None,
        *,
        company_id: int = 0,
        firstname: str = "",
        lastname: str = "",
    ) -> dict[str, Any]:
        with self._lock:
            uid = user_id if user_id is not None else max(self.users, default=0) + 1
            user = {
                "user_id": uid,
                "email": email,
                "user_type": user_type,
                "status": status,
                "company_id": company_id,
                "firstname": firstname,
                "lastname": lastname,
                "api_key": api_key,
            }
            self.users[uid] = user
            return user

    def add_status(
        self,
        letter: str,
        description: str,
        type: str = "O",
        inventory: str = "D",
        *,
        _color: str = "#cccccc",
        _default: bool = False,
    ) -> dict[str, Any]:
        with self._lock:
            existing = self.statuses.get((type, letter))
            status = {
                "status_id": existing["status_id"] if existing else self._next_status_id,
                "status": letter,
                "type": type,
                "is_default": "Y" if _default else "N",
                "description": description,
                "email_subj": f"status changed to {description}",
                "email_header": f"The status of your order is now: {description}.",
                "lang_code": "en",
                "params": {
                    "color": _color,
                    "notify": "Y",
                    "notify_department": "Y",
                    "inventory": inventory,
                    "remove_cc_info": "Y",
                    "repay": "N",
                    "appearance_type": "D",
                    "allow_return": "N",
                },
            }
            if not existing:
                self._next_status_id += 1
            self.statuses[(type, letter)] = status
            return status

    def add_product(
        self,
        product_code: str,
        amount: int = 0,
        *,
        product: str | None = None,
        price: str = "10.00",
        tracking: str = "B",
        product_type: str = "P",
        parent_product_id: int = 0,
        status: str = "A",
        product_id: int | None = None,
        company_id: int = 1,
    ) -> int:
        if tracking == "O" and self.has_variations:
            raise ValueError("tracking 'O' (option combinations) only exists before 4.10")
        if (product_type == "V" or parent_product_id) and not self.has_variations:
            raise ValueError("product variations only exist from 4.10")
        with self._lock:
            if product_code in self._product_codes:
                raise ValueError(f"product_code {product_code!r} already exists in this store")
            pid = product_id if product_id is not None else self._next_product_id
            if pid in self.products:
                raise ValueError(f"product_id {pid} already exists")
            self._next_product_id = max(self._next_product_id, pid + 1)
            self.products[pid] = {
                "product_id": pid,
                "product_code": product_code,
                "product": product if product is not None else product_code,
                "amount": int(amount),
                "price": _money(price),
                "status": status,
                "tracking": tracking,
                "product_type": product_type,
                "parent_product_id": int(parent_product_id),
                "company_id": company_id,
                "timestamp": int(time.time()),
            }
            self._product_codes[product_code] = pid
            return pid

    def product_by_code(self, code: str) -> dict[str, Any] | None:
        with self._lock:
            pid = self._product_codes.get(code)
            return self.products.get(pid) if pid is not None else None

    def add_combination(
        self,
        product_id: int,
        product_code: str,
        amount: int,
        combination: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        if self.has_variations:
            raise ValueError("option combinations only exist before 4.10 (use variations)")
        with self._lock:
            if product_id not in self.products:
                raise KeyError(product_id)
            combo = {str(k): str(v) for k, v in (combination or {}).items()}
            key = f"{product_id}|" + "|".join(f"{k}={v}" for k, v in sorted(combo.items()))
            chash = str(zlib.crc32(key.encode()))
            stored = {
                "combination_hash": chash,
                "product_id": product_id,
                "product_code": product_code,
                "amount": int(amount),
                "combination": combo,
                "temp": "N",
                "position": len(self.combinations),
            }
            self.combinations[chash] = stored
            return stored

    def add_order(
        self,
        *,
        order_id: int | None = None,
        status: str = "P",
        timestamp: int | float | dt.datetime | None = None,
        updated_at: int | float | dt.datetime | None = None,
        products: Iterable[Mapping[str, Any]] | None = None,
        s_country: str = "AU",
        b_country: str | None = None,
        email: str = "jane@example.com",
        firstname: str = "Jane",
        lastname: str = "Citizen",
        company_id: int = 1,
        parent_order_id: int = 0,
        is_parent_order: str = "N",
        shipping_id: int = 1,
        shipping: str = "Standard",
        notes: str = "",
        user_id: int = 0,
        total: Any = None,
        **other_fields: Any,
    ) -> int:
        if products is None:
            products = [
                {"product_code": "Test001", "amount": 2, "price": "10.00", "product": "Test item 1"}
            ]
        ts = self._unix(timestamp)
        with self._lock:
            lines = self._make_lines(products)
            oid = order_id if order_id is not None else self._next_order_id
            if oid in self.orders:
                raise ValueError(f"order {oid} already exists")
            order = StoredOrder(
                oid,
                status,
                ts,
                self._unix(updated_at) if updated_at is not None else ts,
                lines,
                s_country,
                b_country or s_country,
                email,
                firstname,
                lastname,
                int(company_id),
                int(parent_order_id),
                is_parent_order,
                int(shipping_id),
                shipping,
                notes,
                int(user_id),
                _money(total) if total is not None else None,
                _phpify(other_fields) if other_fields else None,
            )
            self._insert_order(order)
            return oid

    def add_history(
        self,
        count: int,
        *,
        start_timestamp: int | float | dt.datetime,
        step_seconds: int = 60,
        status: str = "C",
        products: Iterable[Mapping[str, Any]] | None = None,
        s_country: str = "AU",
        b_country: str | None = None,
        email: str = "jane@example.com",
        firstname: str = "Jane",
        lastname: str = "Citizen",
        company_id: int = 1,
        shipping_id: int = 1,
        shipping: str = "Standard",
        user_id: int = 0,
        **other_fields: Any,
    ) -> list[int]:
        """Many orders cheaply: one order every step_seconds from start_timestamp, sharing
        their lines and extra fields (100,000 in well under a second)."""
        if products is None:
            products = [
                {"product_code": "Test001", "amount": 1, "price": "10.00", "product": "Test item 1"}
            ]
        start = self._unix(start_timestamp)
        extra = _phpify(other_fields) if other_fields else None
        new = StoredOrder
        with self._lock:
            lines = self._make_lines(products)
            first = self._next_order_id
            ids = range(first, first + count)
            orders = self.orders
            bc = b_country or s_country
            for i, oid in enumerate(ids):
                ts = start + i * step_seconds
                orders[oid] = new(
                    oid,
                    status,
                    ts,
                    ts,
                    lines,
                    s_country,
                    bc,
                    email,
                    firstname,
                    lastname,
                    company_id,
                    0,
                    "N",
                    shipping_id,
                    shipping,
                    "",
                    user_id,
                    None,
                    extra,
                )
            self._order_ids.extend(ids)  # all above every existing id: stays sorted
            self._by_change.extend((start + i * step_seconds, oid) for i, oid in enumerate(ids))
            self._by_change.sort()
            self._next_order_id = first + count
            return list(ids)

    def set_order_status(self, order_id: int, status: str) -> None:
        """A change made in the store's admin: moves stock like any change, bumps updated_at."""
        with self._lock:
            self._change_status(self.orders[order_id], status, source="admin")

    # ---- inspection --------------------------------------------------------------------------
    def get_order_json(self, order_id: int) -> dict[str, Any]:
        with self._lock:
            return self._order_detail(self.orders[order_id])

    @property
    def shipments(self) -> dict[int, dict[str, Any]]:
        with self._lock:
            return {sid: self._shipment_json(s) for sid, s in self._shipments.items()}

    def shipments_for(self, order_id: int) -> list[dict[str, Any]]:
        with self._lock:
            return [
                self._shipment_json(self._shipments[sid])
                for sid in self._shipments_by_order.get(order_id, [])
            ]

    # ---- internals: seeding helpers ----------------------------------------------------------
    def _unix(self, value: int | float | dt.datetime | None) -> int:
        if value is None:
            return int(time.time())
        if isinstance(value, dt.datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=self.tz)  # naive: the store's wall clock
            return int(value.timestamp())
        return int(value)

    def _make_lines(self, products: Iterable[Mapping[str, Any]]) -> tuple[_Line, ...]:
        lines: list[_Line] = []
        for p in products:
            code = str(p["product_code"])
            stored = self.product_by_code(code)
            pid = p.get("product_id") or (stored["product_id"] if stored else 0)
            name = p.get("product") or (stored["product"] if stored else code)
            price = p.get("price") or (stored["price"] if stored else "10.00")
            lines.append((int(pid), code, str(name), int(p.get("amount", 1)), _money(price)))
        return tuple(lines)

    def _insert_order(self, order: StoredOrder) -> None:
        oid = order.order_id
        replaced = self.orders.get(oid)
        if replaced is not None:
            self._unindex_change(replaced)
        self.orders[oid] = order
        insort(self._by_change, (order.updated_at, oid))
        if not self._order_ids or oid > self._order_ids[-1]:
            self._order_ids.append(oid)
        else:
            insort(self._order_ids, oid)
        self._next_order_id = max(self._next_order_id, oid + 1)

    def _unindex_change(self, order: StoredOrder) -> None:
        key = (order.updated_at, order.order_id)
        at = bisect_left(self._by_change, key)
        if at < len(self._by_change) and self._by_change[at] == key:
            del self._by_change[at]

    # ---- internals: status changes and stock -------------------------------------------------
    def _inventory(self, letter: str) -> str | None:
        status = self.statuses.get(("O", letter))
        return status["params"]["inventory"] if status else None

    def _stock_holder(self, line: _Line) -> dict[str, Any] | None:
        """Where a line's stock lives: the product, or its combination on old stores."""
        product = self.products.get(line[0]) or self.product_by_code(line[1])
        if product is None:
            return None
        if product["tracking"] == "B":
            return product
        if product["tracking"] == "O":
            for combo in self.combinations.values():
                if (
                    combo["product_id"] == product["product_id"]
                    and combo["product_code"] == line[1]
                ):
                    return combo
        return None

    def _change_status(
        self,
        order: StoredOrder,
        new: str,
        *,
        source: str,
        notify_user: bool = False,
        notify_department: bool = False,
        notify_vendor: bool = False,
    ) -> bool:
        old = order.status
        if new == old:
            return False  # CS-Cart returns early: no stock move, no e-mail
        old_inv, new_inv = self._inventory(old), self._inventory(new)
        if self.move_stock and old_inv and new_inv and old_inv != new_inv:
            holders = [(self._stock_holder(line), line[3]) for line in order.lines]
            if new_inv == "D":
                short = any(h is not None and h["amount"] < qty for h, qty in holders)
                if short and not self.allow_negative_stock:
                    new = "B"  # CS-Cart backorders instead of the status asked for
                    if new == old:
                        return False
                for holder, qty in holders:
                    if holder is not None:
                        holder["amount"] -= qty
            else:
                for holder, qty in holders:
                    if holder is not None:
                        holder["amount"] += qty
        order.status = new
        self._unindex_change(order)
        order.updated_at = int(time.time())
        insort(self._by_change, (order.updated_at, order.order_id))
        self.status_changes.append(
            {
                "order_id": order.order_id,
                "from": old,
                "to": new,
                "source": source,
                "notify_user": notify_user,
                "notify_department": notify_department,
                "notify_vendor": notify_vendor,
                "at": time.time(),
            }
        )
        if source != "admin":
            self.notifications.append((order.order_id, new, notify_user))
        return True

    # ---- internals: JSON views ---------------------------------------------------------------
    def _order_total(self, order: StoredOrder) -> str:
        if order.total is not None:
            return order.total
        total = sum((Decimal(line[4]) * line[3] for line in order.lines), Decimal(0))
        if order.extra and "shipping_cost" in order.extra:
            total += Decimal(_money(order.extra["shipping_cost"]))
        return f"{total:.2f}"

    def _order_list_item(self, order: StoredOrder) -> dict[str, Any]:
        extra = order.extra or {}
        item: dict[str, Any] = {
            "order_id": str(order.order_id),
            "issuer_id": None,  # NULL for orders placed by shoppers
            "user_id": str(order.user_id),
            "is_parent_order": order.is_parent_order,
            "parent_order_id": str(order.parent_order_id),
            "company_id": str(order.company_id),
            "company": "",
            "timestamp": str(order.timestamp),
            "firstname": order.firstname,
            "lastname": order.lastname,
            "email": order.email,
            "phone": _ADDRESSES.get(order.b_country, _DEFAULT_ADDRESS)[4],
            "status": order.status,
            "total": self._order_total(order),
        }
        if extra:
            for key in item.keys() & extra.keys():
                item[key] = extra[key]
        return item

    def _shipped(self, order_id: int) -> dict[str, int]:
        shipped: dict[str, int] = {}
        for sid in self._shipments_by_order.get(order_id, ()):
            for iid, qty in self._shipments[sid].products.items():
                shipped[iid] = shipped.get(iid, 0) + qty
        return shipped

    def _order_detail(self, order: StoredOrder) -> dict[str, Any]:
        detail = self._order_list_item(order)
        shipped = self._shipped(order.order_id)
        products: dict[str, Any] = {}
        subtotal = Decimal(0)
        for iid, (pid, code, name, amount, price) in zip(
            _item_ids(order), order.lines, strict=True
        ):
            done = shipped.get(iid, 0)
            products[iid] = {
                "item_id": iid,
                "order_id": str(order.order_id),
                "product_id": str(pid),
                "product_code": code,
                "price": price,
                "amount": str(amount),
                "extra": [],
                "product": name,
                # PHP: a DB string once something shipped, the integer 0 before
                "shipped_amount": str(done) if done else 0,
                "shipment_amount": amount - done,
                "base_price": price,
                "original_price": price,
                "company_id": "1",
                "is_accessible": True,
                "product_status": "A",
            }
            subtotal += Decimal(price) * amount
        names = {"s": (order.firstname, order.lastname), "b": (order.firstname, order.lastname)}
        for prefix, country in (("b", order.b_country), ("s", order.s_country)):
            street, city, state, zipcode, phone = _ADDRESSES.get(country, _DEFAULT_ADDRESS)
            detail.update(
                {
                    f"{prefix}_firstname": names[prefix][0],
                    f"{prefix}_lastname": names[prefix][1],
                    f"{prefix}_address": street,
                    f"{prefix}_address_2": "",
                    f"{prefix}_city": city,
                    f"{prefix}_county": "",
                    f"{prefix}_state": state,
                    f"{prefix}_country": country,
                    f"{prefix}_zipcode": zipcode,
                    f"{prefix}_phone": phone,
                }
            )
        sids = self._shipments_by_order.get(order.order_id, [])
        detail.update(
            {
                "updated_at": str(order.updated_at),
                "notes": order.notes,
                "details": "",
                "promotions": [],
                "promotion_ids": "",
                "fax": "",
                "url": "",
                "payment_id": "1",
                "tax_exempt": "N",
                "lang_code": "en",
                "ip_address": "127.0.0.1",
                "repaid": "0",
                "validation_code": "",
                "localization_id": "0",
                "profile_id": "0",
                "subtotal": float(subtotal),
                "discount": 0,
                "subtotal_discount": "0.00",
                "shipping_cost": "0.00",
                "tax_subtotal": 0,
                "taxes": [],
                "display_subtotal": float(subtotal),
                "display_shipping_cost": 0,
                "secondary_currency": self.currency,
                "products": products or [],
                "shipping": [
                    {
                        "shipping_id": str(order.shipping_id),
                        "shipping": order.shipping,
                        "group_key": 0,
                        "rate": 0,
                        "delivery_time": "",
                    }
                ],
                "shipment_ids": [str(s) for s in sids],
            }
        )
        if order.extra:
            detail.update(order.extra)
        return detail

    def _shipment_json(self, s: _Shipment) -> dict[str, Any]:
        order = self.orders.get(s.order_id)
        out: dict[str, Any] = {
            "shipment_id": str(s.shipment_id),
            "timestamp": str(s.timestamp),
            "comments": s.comments,
            "status": s.status,
            "order_id": str(s.order_id),
            "order_timestamp": str(order.timestamp) if order else "0",
            "s_firstname": order.firstname if order else "",
            "s_lastname": order.lastname if order else "",
            "company": "",
            "user_id": str(order.user_id) if order else "0",
            "shipping_id": str(s.shipping_id),
            "shipping": s.shipping,
            "tracking_number": s.tracking_number,
            "carrier": s.carrier,
            "group_key": "0",
            "products": {iid: str(qty) for iid, qty in s.products.items()} or [],
        }
        known = CARRIERS.get(s.carrier)
        if known:
            name, url = known
            out["carrier_info"] = {
                "name": name,
                "tracking_url": url.format(tn=s.tracking_number),
                "info": "",
            }
        return out

    def _product_json(self, p: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "product_id": str(p["product_id"]),
            "product_code": p["product_code"],
            "product": p["product"],
            "amount": str(p["amount"]),
            "price": p["price"],
            "list_price": "0.00",
            "status": p["status"],
            "tracking": p["tracking"],
            "product_type": p["product_type"],
            "company_id": str(p["company_id"]),
            "timestamp": str(p["timestamp"]),
        }
        if self.has_variations:
            out["parent_product_id"] = str(p["parent_product_id"])
        return out

    @staticmethod
    def _status_json(s: dict[str, Any]) -> dict[str, Any]:
        return {**s, "status_id": str(s["status_id"]), "params": dict(s["params"])}

    @staticmethod
    def _user_json(u: dict[str, Any]) -> dict[str, Any]:
        return {
            "user_id": str(u["user_id"]),
            "email": u["email"],
            "user_type": u["user_type"],
            "status": u["status"],
            "company_id": str(u["company_id"]),
            "firstname": u["firstname"],
            "lastname": u["lastname"],
            "lang_code": "en",
            "is_root": "Y" if u["user_type"] == "A" else "N",
        }

    # ---- internals: dates --------------------------------------------------------------------
    def _parse_date(self, value: Any, end_of_day: bool) -> int:
        """fn_parse_date: Unix digits as they are; a/b/c = m/d/Y in the store's time zone
        (00:00:00, or 23:59:59 for the end); anything else is "now"."""
        now = int(time.time())
        text = _php_str(value).strip()
        if not text:
            return now
        if _NUMERIC.match(text):
            return int(float(text))
        parts = text.split("/")
        if len(parts) != 3:
            return now
        month, day, year = (_php_int(p) for p in parts)
        if year == 0:
            year = dt.datetime.now(self.tz).year
        # mktime normalises out-of-range months and days
        year += (month - 1) // 12
        month = (month - 1) % 12 + 1
        h, m, s = (23, 59, 59) if end_of_day else (0, 0, 0)
        try:
            base = dt.datetime(year, month, 1, h, m, s, tzinfo=self.tz)
            return int((base + dt.timedelta(days=day - 1)).timestamp())
        except (ValueError, OverflowError):
            return now

    def _period(self, params: Mapping[str, Any]) -> tuple[int, int] | None:
        period = _php_str(params.get("period"))
        if not period or period == "A":
            return None
        if period == "C":
            return (
                self._parse_date(params.get("time_from"), False),
                self._parse_date(params.get("time_to"), True),
            )
        now = int(time.time())
        today = dt.datetime.fromtimestamp(now, self.tz).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        day = dt.timedelta(days=1)

        def ts(d: dt.datetime) -> int:
            return int(d.timestamp())

        monday = today - day * today.weekday()
        first = today.replace(day=1)
        jan1 = today.replace(month=1, day=1)
        ranges: dict[str, Callable[[], tuple[int, int]]] = {
            "D": lambda: (ts(today), now),
            "LD": lambda: (ts(today - day), ts(today) - 1),
            "W": lambda: (ts(monday), now),
            "LW": lambda: (ts(monday - 7 * day), ts(monday) - 1),
            "M": lambda: (ts(first), now),
            "LM": lambda: (ts((first - day).replace(day=1)), ts(first) - 1),
            "Y": lambda: (ts(jan1), now),
            "LY": lambda: (ts(jan1.replace(year=jan1.year - 1)), ts(jan1) - 1),
            "HH": lambda: (now - 86400, now),
            "HW": lambda: (now - 7 * 86400, now),
            "HM": lambda: (now - 30 * 86400, now),
            "HC": lambda: (ts(today - day * _php_int(params.get("last_days"))), now),
        }
        pick = ranges.get(period)
        return pick() if pick else None  # an unknown period filters nothing

    # ---- request handling ----------------------------------------------------------------------
    def _route(self, method: str, path: str, params: dict[str, Any]) -> _Route | None:
        if path == "/api.php":
            segments = [s for s in _php_str(params.pop("_d", "")).split("/") if s]
        elif path.startswith("/api/"):
            segments = [unquote(s) for s in path[len("/api/") :].split("/") if s]
            if segments and segments[0] == "2.0":
                segments = segments[1:]
        else:
            return None
        if not segments or len(segments) > 2:
            return None
        entity = segments[0]
        ident = segments[1] if len(segments) == 2 else None
        if entity not in _ENTITY_ACTIONS or (entity == "combinations" and self.has_variations):
            return None  # /api/2/... lands here too: "2" is no entity
        if ident is not None:
            pattern = r"[0-9A-Za-z_-]+" if entity == "combinations" else r"[0-9]+"
            if not re.fullmatch(pattern, ident):
                return None
        action = _ACTIONS.get((method, ident is not None))
        allowed = action is not None and action in _ENTITY_ACTIONS[entity]
        endpoint = f"{entity}.{action or method.lower()}"
        return _Route(entity, ident, action or method.lower(), endpoint, allowed)

    def _draw_fault(self, endpoint: str | None) -> _Plan:
        with self._fault_lock:
            fault = self._faults.get(endpoint) if endpoint else None
            if fault is None:
                fault = self._faults.get("*")
            if fault is None:
                return _Plan()
            plan = _Plan(latency=fault.latency)
            if fault.rate_limit_next > 0:
                fault.rate_limit_next -= 1
                plan.kind, plan.retry_after = "rate_limit", fault.retry_after
            elif fault.unauthorized:
                plan.kind = "unauthorized"
            elif fault.html_body:
                plan.kind = "html"
            elif fault.error_rate > 0 and self._rng.random() < fault.error_rate:
                plan.kind, plan.status = "error", fault.error_status
            elif fault.timeout_rate > 0 and self._rng.random() < fault.timeout_rate:
                plan.kind, plan.hang, plan.applies = (
                    "timeout",
                    fault.hang_seconds,
                    fault.timeout_applies,
                )
            return plan

    def _sleep(self, seconds: float) -> None:
        self._stop_event.wait(seconds)  # stop() wakes hung requests

    @staticmethod
    def _unauthorized() -> _Response:
        return _json_response(
            401, _error(401), [("WWW-Authenticate", 'Basic realm="User email/API key"')]
        )

    @staticmethod
    def _parse_body(content_type: str, body: bytes) -> dict[str, Any] | None:
        """JSON only with application/json; a PHP form with x-www-form-urlencoded; anything
        else (text/plain, none, multipart) reads as nothing."""
        if not body:
            return None
        kind = content_type.split(";")[0].strip().lower()
        if kind == "application/json":
            try:
                data = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                return None  # json_decode gives null: the request carries nothing
            return data if isinstance(data, dict) else None
        if kind == "application/x-www-form-urlencoded":
            text = body.decode("utf-8", "replace")
            return _php_parse(parse_qsl(text, keep_blank_values=True)) or None
        return None

    def _handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> _Response:
        at = time.time()
        split = urlsplit(raw_path)
        query = parse_qs(split.query, keep_blank_values=True)
        params = _php_parse(parse_qsl(split.query, keep_blank_values=True))
        route = self._route(method, split.path, params)
        content_type = headers.get("Content-Type", "") or ""
        data = self._parse_body(content_type, body)
        plan = self._draw_fault(route.endpoint if route else None)
        try:
            if plan.latency > 0:
                self._sleep(plan.latency)
            if plan.kind == "rate_limit":
                resp = _json_response(429, _error(429), [("Retry-After", str(plan.retry_after))])
            elif plan.kind == "unauthorized":
                resp = self._unauthorized()
            elif plan.kind == "html":
                resp = _html_response(200, _HTML_MAINTENANCE)
            elif plan.kind == "error":
                resp = (
                    _html_response(plan.status)
                    if plan.status in (502, 503, 504)
                    else _json_response(plan.status, _error(plan.status))
                )
            elif plan.kind == "timeout" and not plan.applies:
                self._sleep(plan.hang)
                resp = _html_response(504)  # the proxy gave up; the store never saw it
            else:
                resp = self._answer(route, method, headers, params, data or {})
                if plan.kind == "timeout":
                    self._sleep(plan.hang)  # applied, then hung: the outcome-unknown case
        except Exception:
            self.errors.append(traceback.format_exc())
            resp = _json_response(500, _error(500))
        record = RecordedRequest(
            method=method,
            endpoint=route.endpoint if route else None,
            path=split.path,
            query=query,
            json=data,
            status=resp.status,
            at=at,
            body=body,
            content_type=content_type,
            fault=plan.kind,
            duration=time.time() - at,
        )
        with self._lock:
            self.requests.append(record)
        return resp

    def _authenticate(self, headers: Any) -> int:
        header = headers.get("Authorization", "") or ""
        if header[:6].lower() != "basic ":
            return 401
        try:
            raw = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return 401
        email, sep, key = raw.partition(":")
        if not sep:
            return 401
        with self._lock:
            user = next(
                (u for u in self.users.values() if u["email"].lower() == email.lower()), None
            )
        if user is None or not user["api_key"]:
            return 401
        if not hmac.compare_digest(user["api_key"].encode(), key.encode()):
            return 401
        if user["status"] != "A":
            return 401  # a disabled user is refused even with a valid key
        if user["user_type"] == "C":
            return 403
        return 200

    def _answer(
        self,
        route: _Route | None,
        method: str,
        headers: Any,
        params: dict[str, Any],
        data: dict[str, Any],
    ) -> _Response:
        if route is None:
            return _json_response(404, _error(404))
        auth = self._authenticate(headers)
        if auth == 401:
            return self._unauthorized()
        if auth == 403:
            return _json_response(403, _error(403))
        if not route.allowed:
            allow = sorted(
                {m for (m, has_id), a in _ACTIONS.items() if a in _ENTITY_ACTIONS[route.entity]}
            )
            return _json_response(405, _error(405), [("Allow", ", ".join(allow))])
        handler = getattr(self, f"_api_{route.entity}_{route.action}")
        with self._lock:
            status, payload = handler(route.ident, params, data)
        return _json_response(status, payload)

    # ---- paging ----------------------------------------------------------------------------
    @staticmethod
    def _paging(params: Mapping[str, Any], default: int | None = 10) -> tuple[int, int]:
        """(page, items_per_page); items_per_page 0 = everything in one response."""
        raw = params.get("items_per_page")
        ipp = (default or 0) if raw is None else max(0, _php_int(raw))
        page = max(1, _php_int(params.get("page", 1)))
        return page, ipp

    @staticmethod
    def _echo(
        params: Mapping[str, Any], page: int, ipp: int, total: int, **more: Any
    ) -> dict[str, Any]:
        out = {k: v for k, v in params.items() if v != {}}
        out.update(more)
        out["page"] = str(page)
        out["items_per_page"] = str(ipp)
        if ipp:
            out["total_items"] = str(total)
        else:
            out.pop("total_items", None)
        return out

    # ---- orders ----------------------------------------------------------------------------
    def _api_orders_list(
        self, _ident: str | None, params: dict[str, Any], _data: dict[str, Any]
    ) -> tuple[int, Any]:
        keep = self._order_filter(params)
        changed_from = (
            _php_int(params.get("updated_at_from")) if self.has_updated_at_filter else 0
        )
        if changed_from:
            at = bisect_left(self._by_change, (changed_from, 0))
            candidates: Iterable[StoredOrder] = (
                self.orders[oid] for _, oid in self._by_change[at:]
            )
        else:
            candidates = self.orders.values()
        rows = [o for o in candidates if keep(o)]
        sort_by = _php_str(params.get("sort_by")) or "date"
        keys: dict[str, Callable[[StoredOrder], Any]] = {
            "order_id": lambda o: o.order_id,
            "status": lambda o: (o.status, o.order_id),
            "customer": lambda o: (o.lastname, o.firstname, o.order_id),
            "email": lambda o: (o.email, o.order_id),
            "date": lambda o: (o.timestamp, o.order_id),
            "total": lambda o: (Decimal(self._order_total(o)), o.order_id),
        }
        if sort_by not in keys:
            sort_by = "date"
        sort_order = "asc" if _php_str(params.get("sort_order")).lower() == "asc" else "desc"
        page, ipp = self._paging(params)
        selected = self._select(rows, keys[sort_by], sort_order == "desc", page, ipp)
        full = self.has_orders_data and _php_truthy(params.get("get_orders_data"))
        items = [self._order_detail(o) if full else self._order_list_item(o) for o in selected]
        return 200, {
            "orders": items,
            "params": self._echo(
                params, page, ipp, len(rows), sort_by=sort_by, sort_order=sort_order
            ),
        }

    @staticmethod
    def _select(
        rows: list[Any], key: Callable[[Any], Any], reverse: bool, page: int, ipp: int
    ) -> list[Any]:
        """One page of rows sorted by key, without sorting everything for an early page."""
        if ipp == 0:
            return sorted(rows, key=key, reverse=reverse)
        start = (page - 1) * ipp
        if start >= len(rows):
            return []
        need = start + ipp
        if need * 8 < len(rows):
            pick = heapq.nlargest if reverse else heapq.nsmallest
            return pick(need, rows, key=key)[start:need]
        return sorted(rows, key=key, reverse=reverse)[start:need]

    def _order_filter(self, params: Mapping[str, Any]) -> Callable[[StoredOrder], bool]:
        statuses = (
            {_php_str(s) for s in _as_list(params["status"])}
            if _php_truthy(params.get("status"))
            else None
        )
        hide_incomplete = not _php_truthy(params.get("include_incompleted"))
        period = self._period(params)
        upd_from = upd_to = 0
        if self.has_updated_at_filter:  # older stores ignore these silently
            upd_from = _php_int(params.get("updated_at_from"))
            upd_to = _php_int(params.get("updated_at_to"))
        ids: set[int] | None = None
        if _php_truthy(params.get("order_id")):
            ids = {
                _php_int(p)
                for v in _as_list(params["order_id"])
                for p in _php_str(v).split(",")
                if p.strip()
            }
        company: int | None = None
        raw_company = params.get("company_id")
        if raw_company is not None and _php_str(raw_company) != "":
            company = _php_int(raw_company)
        email = _php_str(params.get("email")).strip().lower() or None
        users = (
            {_php_int(u) for u in _as_list(params["user_id"])}
            if _php_truthy(params.get("user_id"))
            else None
        )

        def keep(o: StoredOrder) -> bool:
            if o.is_parent_order == "Y":
                return False  # parent orders are never listed
            if hide_incomplete and o.status == "N":
                return False
            if statuses is not None and o.status not in statuses:
                return False
            if period is not None and not period[0] <= o.timestamp <= period[1]:
                return False
            if upd_from and o.updated_at < upd_from:
                return False
            if upd_to and o.updated_at > upd_to:
                return False
            if ids is not None and o.order_id not in ids:
                return False
            if company is not None and o.company_id != company:
                return False
            if email is not None and email not in o.email.lower():
                return False  # LIKE %email%
            return users is None or o.user_id in users

        return keep

    def _api_orders_get(
        self, ident: str | None, _params: dict[str, Any], _data: dict[str, Any]
    ) -> tuple[int, Any]:
        order = self.orders.get(int(ident or 0))
        if order is None:
            return 404, _error(404)
        return 200, self._order_detail(order)

    def _api_orders_update(
        self, ident: str | None, _params: dict[str, Any], data: dict[str, Any]
    ) -> tuple[int, Any]:
        assert ident is not None
        order = self.orders.get(int(ident))
        flags = ("notify_user", "notify_department", "notify_vendor")
        ignored = [k for k in data if k != "status" and k not in flags]
        if ignored:
            self.ignored_fields.append(("orders.update", ident, ignored))
        if order is not None and _php_truthy(data.get("status")):
            # an unknown letter is written as sent; the same status changes nothing
            self._change_status(
                order,
                _php_str(data["status"]),
                source="api",
                notify_user=_php_truthy(data.get("notify_user")),
                notify_department=_php_truthy(data.get("notify_department")),
                notify_vendor=_php_truthy(data.get("notify_vendor")),
            )
        return 200, {"order_id": ident}  # also for an unknown order: nothing written

    # ---- shipments ---------------------------------------------------------------------------
    def _api_shipments_list(
        self, _ident: str | None, params: dict[str, Any], _data: dict[str, Any]
    ) -> tuple[int, Any]:
        if _php_truthy(params.get("order_id")):
            sids = list(self._shipments_by_order.get(_php_int(params["order_id"]), []))
        else:
            sids = list(self._shipments)
        asc = _php_str(params.get("sort_order")).lower() == "asc"
        sids.sort(reverse=not asc)  # newest first by default
        page, ipp = self._paging(params)
        total = len(sids)
        if ipp:
            last = max(1, -(-total // ipp))
            page = min(page, last)  # past the end: the LAST page again (db_paginate clamps)
            sids = sids[(page - 1) * ipp : page * ipp]
        items = [self._shipment_json(self._shipments[s]) for s in sids]
        return 200, {"shipments": items, "params": self._echo(params, page, ipp, total)}

    def _api_shipments_get(
        self, ident: str | None, _params: dict[str, Any], _data: dict[str, Any]
    ) -> tuple[int, Any]:
        shipment = self._shipments.get(int(ident or 0))
        if shipment is None:
            return 404, _error(404)
        return 200, self._shipment_json(shipment)

    def _api_shipments_create(
        self, _ident: str | None, _params: dict[str, Any], data: dict[str, Any]
    ) -> tuple[int, Any]:
        order = self.orders.get(_php_int(data.get("order_id")))
        if order is None:
            # Chosen: 400, not 404 - the resource posted to (/shipments) exists; CS-Cart
            # answers a create it cannot do with Bad Request.
            return 400, _error(400, "order_id is invalid")
        shipping_id = _php_int(data.get("shipping_id"))
        if not shipping_id:
            return 400, _error(400, "shipping_id is required")
        tracking_number = _php_str(data.get("tracking_number"))
        carrier = _php_str(data.get("carrier"))
        if not tracking_number and not carrier:
            return 400, _error(400, "tracking_number or carrier is required")
        shipped = self._shipped(order.order_id)
        left = {
            iid: line[3] - shipped.get(iid, 0)
            for iid, line in zip(_item_ids(order), order.lines, strict=True)
        }
        asked = data.get("products")
        wanted: dict[str, int] = {}
        if not _php_truthy(asked):
            wanted = {iid: n for iid, n in left.items() if n > 0}  # everything not yet shipped
        else:
            pairs = asked.items() if isinstance(asked, dict) else enumerate(_as_list(asked))
            for iid, qty in pairs:
                take = min(_php_int(qty), left.get(str(iid), 0))  # cut down to what is left
                if take > 0:
                    wanted[str(iid)] = wanted.get(str(iid), 0) + take
        if not wanted:
            return 400, _error(400, "there are no products to ship")
        sid = self._next_shipment_id
        self._next_shipment_id += 1
        status = _php_str(data.get("status")) or "P"
        self._shipments[sid] = _Shipment(
            sid,
            order.order_id,
            shipping_id,
            order.shipping if shipping_id == order.shipping_id else "Custom shipping method",
            tracking_number,
            carrier,
            _php_str(data.get("comments")),
            wanted,
            _php_int(data.get("timestamp")) or int(time.time()),
            status,
        )
        self._shipments_by_order.setdefault(order.order_id, []).append(sid)
        if _php_truthy(data.get("order_status")):
            self._change_status(
                order,
                _php_str(data["order_status"]),
                source="shipment",
                notify_user=_php_truthy(data.get("notify_user")),
            )
        return 201, {"shipment_id": sid}  # a NUMBER, unlike the PUT echoes

    def _api_shipments_update(
        self, ident: str | None, _params: dict[str, Any], data: dict[str, Any]
    ) -> tuple[int, Any]:
        assert ident is not None
        shipment = self._shipments.get(int(ident))
        if shipment is None:
            return 404, _error(404)
        allowed = ("tracking_number", "comments", "status", "timestamp")
        ignored = [k for k in data if k not in allowed]
        if ignored:
            self.ignored_fields.append(("shipments.update", ident, ignored))
        if "tracking_number" in data:
            shipment.tracking_number = _php_str(data["tracking_number"])
        if "comments" in data:
            shipment.comments = _php_str(data["comments"])
        if "status" in data:
            shipment.status = _php_str(data["status"])
        if "timestamp" in data:
            shipment.timestamp = _php_int(data["timestamp"])
        return 200, {"shipment_id": ident}

    def _api_shipments_delete(
        self, ident: str | None, _params: dict[str, Any], _data: dict[str, Any]
    ) -> tuple[int, Any]:
        shipment = self._shipments.pop(int(ident or 0), None)
        if shipment is None:
            return 404, _error(404)
        # its quantities count as "not yet shipped" again
        self._shipments_by_order[shipment.order_id].remove(shipment.shipment_id)
        return 204, None

    # ---- products ----------------------------------------------------------------------------
    def _api_products_list(
        self, _ident: str | None, params: dict[str, Any], _data: dict[str, Any]
    ) -> tuple[int, Any]:
        rows = list(self.products.values())
        pcode = _php_str(params.get("pcode")).strip().lower()
        if pcode:
            rows = [p for p in rows if pcode in p["product_code"].lower()]  # a SUBSTRING
        q = _php_str(params.get("q")).strip().lower()
        if q:
            rows = [p for p in rows if q in p["product"].lower()]
        if _php_truthy(params.get("tracking")):
            tracking = {_php_str(t) for t in _as_list(params["tracking"])}
            rows = [p for p in rows if p["tracking"] in tracking]
        if _php_truthy(params.get("product_type")):
            types = {_php_str(t) for t in _as_list(params["product_type"])}
            rows = [p for p in rows if p["product_type"] in types]
        if self.has_variations and _php_truthy(params.get("parent_product_id")):
            parent = _php_int(params["parent_product_id"])
            rows = [p for p in rows if p["parent_product_id"] == parent]
        if _php_truthy(params.get("pid")):
            pids = {
                _php_int(x)
                for v in _as_list(params["pid"])
                for x in _php_str(v).split(",")
                if x.strip()
            }
            rows = [p for p in rows if p["product_id"] in pids]
        if _php_truthy(params.get("status")):
            wanted = {_php_str(s) for s in _as_list(params["status"])}
            rows = [p for p in rows if p["status"] in wanted]
        sort_by = _php_str(params.get("sort_by")) or "product"
        keys: dict[str, Callable[[dict[str, Any]], Any]] = {
            "product": lambda p: (p["product"].lower(), p["product_id"]),
            "code": lambda p: (p["product_code"].lower(), p["product_id"]),
            "price": lambda p: (Decimal(p["price"]), p["product_id"]),
            "amount": lambda p: (p["amount"], p["product_id"]),
            "timestamp": lambda p: (p["timestamp"], p["product_id"]),
        }
        if sort_by not in keys:
            sort_by = "product"
        reverse = _php_str(params.get("sort_order")).lower() == "desc"
        page, ipp = self._paging(params)
        selected = self._select(rows, keys[sort_by], reverse, page, ipp)
        return 200, {
            "products": [self._product_json(p) for p in selected],
            "params": self._echo(
                params,
                page,
                ipp,
                len(rows),
                sort_by=sort_by,
                sort_order="desc" if reverse else "asc",
            ),
        }

    def _api_products_get(
        self, ident: str | None, _params: dict[str, Any], _data: dict[str, Any]
    ) -> tuple[int, Any]:
        product = self.products.get(int(ident or 0))
        if product is None:
            return 404, _error(404)
        return 200, self._product_json(product)

    def _api_products_update(
        self, ident: str | None, _params: dict[str, Any], data: dict[str, Any]
    ) -> tuple[int, Any]:
        assert ident is not None
        product = self.products.get(int(ident))
        if product is None:
            return 404, _error(404)
        allowed = ("amount", "price", "product", "status", "tracking")
        ignored = [k for k in data if k not in allowed]
        if ignored:
            self.ignored_fields.append(("products.update", ident, ignored))
        if "amount" in data:
            before = product["amount"]
            product["amount"] = _php_int(data["amount"])  # negative stored as sent
            if before <= 0 < product["amount"]:
                self.back_in_stock.append(product["product_id"])  # subscribers e-mailed
        if "price" in data:
            product["price"] = _money(data["price"])
        for key in ("product", "status", "tracking"):
            if key in data:
                product[key] = _php_str(data[key])
        return 200, {"product_id": ident}

    # ---- combinations (before 4.10) ------------------------------------------------------------
    def _api_combinations_list(
        self, _ident: str | None, params: dict[str, Any], _data: dict[str, Any]
    ) -> tuple[int, Any]:
        if not _php_truthy(params.get("product_id")):
            return 400, _error(400, "product_id is required")
        pid = _php_int(params["product_id"])
        rows = [c for c in self.combinations.values() if c["product_id"] == pid]
        page, ipp = self._paging(params, default=None)  # pages only when asked
        if ipp:
            rows = rows[(page - 1) * ipp : page * ipp]
        return 200, [self._combination_json(c) for c in rows]  # a bare list, as documented

    def _api_combinations_get(
        self, ident: str | None, _params: dict[str, Any], _data: dict[str, Any]
    ) -> tuple[int, Any]:
        combo = self.combinations.get(ident or "")
        if combo is None:
            return 404, _error(404)
        return 200, self._combination_json(combo)

    def _api_combinations_update(
        self, ident: str | None, _params: dict[str, Any], data: dict[str, Any]
    ) -> tuple[int, Any]:
        combo = self.combinations.get(ident or "")
        if combo is None:
            return 404, _error(404)
        if "amount" in data:
            combo["amount"] = _php_int(data["amount"])
        return 200, {"combination_hash": ident}

    @staticmethod
    def _combination_json(c: dict[str, Any]) -> dict[str, Any]:
        return {
            "product_id": str(c["product_id"]),
            "product_code": c["product_code"],
            "combination_hash": c["combination_hash"],
            "combination": dict(c["combination"]) or [],
            "amount": str(c["amount"]),
            "temp": c["temp"],
            "position": str(c["position"]),
        }

    # ---- statuses and users --------------------------------------------------------------------
    def _api_statuses_list(
        self, _ident: str | None, params: dict[str, Any], _data: dict[str, Any]
    ) -> tuple[int, Any]:
        kind = _php_str(params.get("type")) or "O"
        rows = [s for s in self.statuses.values() if s["type"] == kind]
        page, ipp = self._paging(params)
        total = len(rows)
        if ipp:
            rows = rows[(page - 1) * ipp : page * ipp]
        return 200, {
            "statuses": [self._status_json(s) for s in rows],
            "params": self._echo(params, page, ipp, total),
        }

    def _api_statuses_get(
        self, ident: str | None, _params: dict[str, Any], _data: dict[str, Any]
    ) -> tuple[int, Any]:
        found = next((s for s in self.statuses.values() if s["status_id"] == int(ident or 0)), None)
        if found is None:
            return 404, _error(404)
        return 200, self._status_json(found)

    def _api_users_list(
        self, _ident: str | None, params: dict[str, Any], _data: dict[str, Any]
    ) -> tuple[int, Any]:
        rows = sorted(self.users.values(), key=lambda u: u["user_id"])
        if _php_truthy(params.get("user_type")):
            rows = [u for u in rows if u["user_type"] == _php_str(params["user_type"])]
        page, ipp = self._paging(params)
        total = len(rows)
        if ipp:
            rows = rows[(page - 1) * ipp : page * ipp]
        return 200, {
            "users": [self._user_json(u) for u in rows],
            "params": self._echo(params, page, ipp, total),
        }

    def _api_users_get(
        self, ident: str | None, _params: dict[str, Any], _data: dict[str, Any]
    ) -> tuple[int, Any]:
        user = self.users.get(int(ident or 0))
        if user is None:
            return 404, _error(404)
        return 200, self._user_json(user)  # never the key


@dataclass(slots=True)
class _Shipment:
    shipment_id: int
    order_id: int
    shipping_id: int
    shipping: str
    tracking_number: str
    carrier: str
    comments: str
    products: dict[str, int]  # item_id -> amount
    timestamp: int
    status: str


# --------------------------------------------------------------------------------------------
# Demo data
# --------------------------------------------------------------------------------------------
def seed_demo_store(emu: StoreEmulator) -> dict[str, list[int]]:
    """Products Test001-003 plus a few real-looking ones, and a handful of orders on the test
    items (AU/NZ/US; statuses P, O, C). Returns the ids created."""
    products = [
        emu.add_product("Test001", 100, product="Test item 1", price="10.00"),
        emu.add_product("Test002", 50, product="Test item 2", price="15.50"),
        emu.add_product("Test003", 0, product="Test item 3", price="7.25"),
        emu.add_product("NPF-MUG-350", 24, product="Enamel Camping Mug 350ml", price="14.95"),
    ]
    if emu.has_variations:
        parent = emu.add_product(
            "NPF-TEE", 0, product="Organic Cotton Tee", price="29.00", tracking="D"
        )
        products.append(parent)
        for code, amount in (("NPF-TEE-BLK-M", 12), ("NPF-TEE-BLK-L", 7)):
            products.append(
                emu.add_product(
                    code,
                    amount,
                    product="Organic Cotton Tee",
                    price="29.00",
                    product_type="V",
                    parent_product_id=parent,
                )
            )
    else:
        tee = emu.add_product(
            "NPF-TEE", 0, product="Organic Cotton Tee", price="29.00", tracking="O"
        )
        products.append(tee)
        emu.add_combination(tee, "NPF-TEE-BLK-M", 12, {"1": "1", "2": "5"})
        emu.add_combination(tee, "NPF-TEE-BLK-L", 7, {"1": "1", "2": "6"})
    now = int(time.time())
    hour = 3600
    orders = [
        emu.add_order(
            status="P",
            timestamp=now - 30 * hour,
            s_country="AU",
            firstname="Jane",
            lastname="Citizen",
            email="jane@example.com",
            products=[{"product_code": "Test001", "amount": 2}],
        ),
        emu.add_order(
            status="P",
            timestamp=now - 26 * hour,
            s_country="NZ",
            firstname="Aroha",
            lastname="Ngata",
            email="aroha@example.co.nz",
            products=[
                {"product_code": "Test002", "amount": 1},
                {"product_code": "Test003", "amount": 3},
            ],
        ),
        emu.add_order(
            status="O",
            timestamp=now - 20 * hour,
            s_country="US",
            firstname="John",
            lastname="Smith",
            email="john.smith@example.com",
            products=[{"product_code": "Test001", "amount": 1}],
        ),
        emu.add_order(
            status="C",
            timestamp=now - 50 * hour,
            s_country="AU",
            firstname="Liam",
            lastname="Nguyen",
            email="liam@example.com.au",
            products=[{"product_code": "Test002", "amount": 2}],
        ),
        emu.add_order(
            status="P",
            timestamp=now - 5 * hour,
            s_country="AU",
            firstname="Olivia",
            lastname="Brown",
            email="olivia@example.com.au",
            products=[
                {"product_code": "Test003", "amount": 1},
                {"product_code": "Test001", "amount": 1},
            ],
        ),
        emu.add_order(
            status="P",
            timestamp=now - 2 * hour,
            s_country="US",
            firstname="Emma",
            lastname="Johnson",
            email="emma.j@example.com",
            products=[
                {"product_code": "Test001", "amount": 1},
                {"product_code": "Test002", "amount": 1},
            ],
        ),
    ]
    return {"products": products, "orders": orders}
