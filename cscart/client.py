"""The CS-Cart REST client: the only code in the bridge that speaks HTTP to a store.

One ``CsCartClient`` per store (per client of the 3PL), shared by every thread that talks to
that store. It owns what "being gentle with a store on modest hosting" means:

- one ``requests.Session`` with HTTP Basic auth (the administrator's e-mail and API key; never
  credentials in a URL), ``Accept: application/json``, JSON bodies sent with ``json=`` (CS-Cart
  silently ignores a JSON body without ``Content-Type: application/json``), no cookies kept,
  redirects not followed;
- ``timeout=(connect, read)`` on every call; a per-store token bucket
  (``limits.requests_per_second``) and a cap on requests in flight (``limits.concurrency``);
- bounded retries of GET and PUT on 429, 5xx, timeouts and connection errors, with exponential
  backoff and jitter, honouring ``Retry-After``; a POST is never repeated once it may have
  reached the store (its timeout is ``StoreOutcomeUnknown``);
- responses read as a stream up to ``limits.max_response_bytes`` and parsed as JSON with
  decimals kept exact; pages read to the end by ``total_items``, loudly failing when the store's
  paging cannot be trusted;
- every failure raised as one of the typed errors of ``cscart_fm.core.errors`` whose reason
  names the operation, the HTTP status and the object (``orders.get: HTTP 404 Not Found
  (order 1000012)``), never a credential or a shopper's data;
- a metric sample for every HTTP attempt, a structured log line for every retry.
"""

from __future__ import annotations

import contextlib
import contextvars
import email.utils
import heapq
import http.cookiejar
import itertools
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from datetime import UTC
from decimal import Decimal
from functools import partial
from http import HTTPStatus
from types import TracebackType
from typing import Any, Final, Literal, TypeVar, get_args
from urllib.parse import quote, urlsplit

import requests
import structlog
from pydantic import BaseModel, SecretStr, ValidationError
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NewConnectionError,
    ReadTimeoutError,
)

from cscart.statuses import OrderStatuses
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
from cscart_fm.core.metrics import STORE_REQUEST_SECONDS, STORE_REQUESTS, STORE_RETRIES
from cscart_fm.core.observability import register_secret
from schemas.cscart import (
    CartCombination,
    CartOrder,
    CartProduct,
    CartShipment,
    CartStatus,
    CartUser,
)
from schemas.settings import ClientSettings, StoreLimits

__all__ = ["OPERATIONS", "CsCartClient", "Operation"]

log = structlog.get_logger(__name__)

Operation = Literal[
    "orders.list",
    "orders.get",
    "orders.update",
    "shipments.list",
    "shipments.get",
    "shipments.create",
    "shipments.update",
    "shipments.delete",
    "products.list",
    "products.get",
    "products.update",
    "statuses.list",
    "users.get",
    "combinations.list",
    "combinations.update",
]
OPERATIONS: Final[tuple[str, ...]] = get_args(Operation)
"""Metric label values of ``operation`` (the store emulator uses the same names)."""

Method = Literal["GET", "PUT", "POST", "DELETE"]
Params = Sequence[tuple[str, str]]
M = TypeVar("M", bound=BaseModel)

USER_AGENT: Final = "cscart-fm/0.1"
MESSAGE_CHARS: Final = 200
"""How much of a store's error message goes into a reason."""
STATUSES_PAGE_SIZE: Final = 250
"""Statuses are single letters (at most a few dozen): one page always holds them all, which
also sidesteps 4.x versions whose ``total_items`` counts only the page."""
_FAR_FUTURE: Final = 4_102_444_800  # 2100-01-01, for the updated_at capability probe
MIN_PAGES_PER_PIECE: Final = 4
"""A time range of an order listing is split among free request slots only into pieces
holding this many pages or more."""
_CLOCK_AHEAD: Final = 86_400
"""How far a store's clock may run ahead of ours: a listing reaches that far past now."""


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    headers: Mapping[str, str]
    content: bytes | None
    """None when the body exceeded ``max_response_bytes`` (it was not read to the end)."""


class _NoAnswer(Exception):
    """No HTTP status came back: a timeout or a broken connection."""

    def __init__(self, status_class: str, detail: str, *, maybe_sent: bool) -> None:
        super().__init__(detail)
        self.status_class = status_class  # "timeout" or "error", the metric label
        self.detail = detail
        self.maybe_sent = maybe_sent  # False only when the request surely never left


class _TokenBucket:
    """A thread-safe token bucket; a caller that finds it empty reserves the next token and
    sleeps until it is due (so waiting threads are served in arrival order, without polling).

    The capacity defaults to one token: requests are then spaced evenly, the gentlest reading
    of "N requests per second" (no burst of N at the start of every second).
    """

    def __init__(
        self,
        rate: float,
        capacity: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._rate = rate
        self._capacity = capacity
        self._tokens = capacity
        self._clock = clock
        self._sleep = sleep
        self._stamp = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        """Take one token, sleeping until it is available; return the time slept."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
            self._tokens -= 1.0
            wait = -self._tokens / self._rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _http(status: int) -> str:
    return f"HTTP {status} {_phrase(status)}".rstrip()


def _ctx(what: str) -> str:
    return f" ({what})" if what else ""


def _retryable(status: int) -> bool:
    return status == 429 or 500 <= status <= 599


def _parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds from ``Retry-After`` (delta-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # HTTP dates are GMT by definition
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


class _Deadline:
    """One attempt's deadline. When it passes, the attempt's connection is shut down under the
    thread reading it, which then fails at once: the only way to bound a read that a store
    keeps alive a byte at a time (each byte restarts the socket's read timeout)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.expired = False
        self.finished = False
        self._lock = threading.Lock()
        self._connection: Any = None

    def watch(self, connection: Any) -> None:
        with self._lock:
            self._connection = connection
            expired = self.expired
        if expired:
            self._shut(connection)

    def expire(self) -> None:
        with self._lock:
            if self.finished:
                return
            self.expired = True
            connection = self._connection
        if connection is not None:
            self._shut(connection)

    def finish(self) -> None:
        with self._lock:
            self.finished = True
            self._connection = None

    @staticmethod
    def _shut(connection: Any) -> None:
        sock = getattr(connection, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """One thread for every attempt's deadline in the process (a timer thread per attempt
    would cost a thread start per request)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._counter = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, deadline: _Deadline) -> None:
        with self._wake:
            heapq.heappush(self._heap, (deadline.at, next(self._counter), deadline))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="cscart-deadlines", daemon=True
                )
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._heap and self._heap[0][2].finished:
                    heapq.heappop(self._heap)  # done in time: nothing to do
                if not self._heap:
                    self._wake.wait()
                    continue
                at, _, deadline = self._heap[0]
                now = time.monotonic()
                if at > now:
                    self._wake.wait(at - now)
                    continue
                heapq.heappop(self._heap)
            deadline.expire()


_WATCHDOG = _Watchdog()
_ATTEMPT: contextvars.ContextVar[_Deadline | None] = contextvars.ContextVar(
    "cscart_attempt", default=None
)


class _DeadlinePool(HTTPConnectionPool):
    """Hands each connection it uses to the current attempt's deadline."""

    def _make_request(self, conn: Any, *args: Any, **kwargs: Any) -> Any:
        deadline = _ATTEMPT.get()
        if deadline is not None:
            deadline.watch(conn)
        return super()._make_request(conn, *args, **kwargs)


class _DeadlineHTTPSPool(_DeadlinePool, HTTPSConnectionPool):
    pass


class _DeadlineAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {  # type: ignore[assignment]
            "http": _DeadlinePool,
            "https": _DeadlineHTTPSPool,
        }


def _root_cause(exc: BaseException) -> BaseException | None:
    """The urllib3 error inside a requests error (requests wraps it in MaxRetryError)."""
    inner = exc.args[0] if exc.args else None
    if isinstance(inner, MaxRetryError):
        return inner.reason
    return inner if isinstance(inner, BaseException) else None


def _no_answer(exc: requests.RequestException) -> _NoAnswer:
    """Classify a transport failure: was it a timeout, and may the request have been sent?"""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return _NoAnswer("timeout", "connect timeout", maybe_sent=False)
    if isinstance(exc, requests.exceptions.Timeout):
        return _NoAnswer("timeout", "read timeout", maybe_sent=True)
    cause = _root_cause(exc)
    if isinstance(cause, ReadTimeoutError):  # a timeout while streaming the body
        return _NoAnswer("timeout", "read timeout", maybe_sent=True)
    # NewConnectionError subclasses ConnectTimeoutError in urllib3: test it first.
    if isinstance(cause, NewConnectionError):  # refused, DNS failure: nothing was sent
        return _NoAnswer("error", "cannot connect", maybe_sent=False)
    if isinstance(cause, ConnectTimeoutError):
        return _NoAnswer("timeout", "connect timeout", maybe_sent=False)
    # Reset, closed mid-answer, TLS or protocol errors: the request may have gone out.
    return _NoAnswer("error", f"connection error ({type(exc).__name__})", maybe_sent=True)


def _int_field(value: Any) -> int | None:
    """A non-negative integer sent as a number or a string of digits, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _as_items(value: Any) -> list[Any] | None:
    """A JSON list, or an object keyed by id (PHP arrays with gaps), or ``[]``; else None."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return list(value.values())
    return None


def _store_message(content: bytes | None) -> str:
    """CS-Cart's ``message`` (or first of ``messages``/``errors``), one line, truncated."""
    if not content:
        return ""
    try:
        data = json.loads(content.decode("utf-8-sig"), parse_float=Decimal)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return ""
    if not isinstance(data, dict):
        return ""
    message = data.get("message")
    if not isinstance(message, str) or not message.strip():
        for key in ("messages", "errors"):
            extra = _as_items(data.get(key))
            if extra and isinstance(extra[0], str):
                message = extra[0]
                break
        else:
            return ""
    text = " ".join(message.split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 1] + "…"


def _in_background(call: Callable[[], Any]) -> Future[Any]:
    """Run ``call`` on a daemon thread: a page fetch stuck on a hung store must never hold up
    the exit Kubernetes asked for (a thread pool's threads are joined at exit). It runs in a
    copy of the caller's context, so its log lines carry the message in hand."""
    future: Future[Any] = Future()
    context = contextvars.copy_context()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(context.run(call))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="cscart-page", daemon=True).start()
    return future


@dataclass
class _TimeRange:
    """Orders placed from ``start`` to ``end`` (Unix seconds, both included) still to read.

    ``seen``: the orders already read that were placed in its first second (``start``). The
    next request starts at that second, so those come first again and are asked for on top of
    the page (``repeats``); they are told apart by id, not by their order inside the second.
    ``page`` > 1 only inside one second holding a page of orders or more, the one case paged
    by offset.
    """

    start: int
    end: int
    seen: frozenset[int] = frozenset()
    page: int = 1

    @property
    def repeats(self) -> int:
        return len(self.seen) if self.page == 1 else 0

    def where(self) -> str:
        return f"placed {self.start}..{self.end}, page {self.page}"

    def fresh(self, items: Sequence[CartOrder]) -> list[CartOrder]:
        return [o for o in items if o.timestamp != self.start or o.order_id not in self.seen]

    def check(self, items: Sequence[CartOrder], size: int) -> None:
        times = [o.timestamp for o in items]
        if times != sorted(times):
            raise BadResponse(
                "orders.list: the store ignores sort_by=date: orders not in time "
                f"order{_ctx(self.where())}"
            )
        if any(not self.start <= t <= self.end for t in times):
            raise BadResponse(
                "orders.list: the store ignores the time filter (period=C): an order placed "
                f"outside the range asked for{_ctx(self.where())}"
            )
        if len(items) > size + self.repeats:
            raise BadResponse(
                f"orders.list: more orders on a page than asked for{_ctx(self.where())}"
            )

    def follow_up(
        self,
        items: Sequence[CartOrder],
        fresh: Sequence[CartOrder],
        total: int,
        size: int,
        free: int,
        now: int,
    ) -> list[_TimeRange]:
        """The requests this answer calls for: none when the range is read, else the rest
        of it, split in time over the ``free`` request slots when it holds more than a page."""
        if (self.page - 1) * size + len(items) >= total:
            return []
        if not items:
            raise BadResponse(
                f"orders.list: an empty page but total_items is {total}{_ctx(self.where())}"
            )
        if not fresh:
            raise BadResponse(
                "orders.list: a page of only orders already read: the store's paging cannot "
                f"be trusted{_ctx(self.where())}"
            )
        last = items[-1].timestamp
        at_last = {o.order_id for o in items if o.timestamp == last}
        if last == self.start:
            at_last |= self.seen
        if self.page > 1:
            return [_TimeRange(last, last, frozenset(at_last), self.page + 1)]
        if len(at_last) >= size:
            # A page of orders placed in one second: read the rest of that second by offset,
            # from the page holding the first one not read yet, and the time after it.
            inside = _TimeRange(last, last, frozenset(at_last), len(at_last) // size + 1)
            return [inside, _TimeRange(last + 1, self.end)] if last < self.end else [inside]
        resume = _TimeRange(last, self.end, frozenset(at_last))
        # Each piece ends on a partial page (a call more): split only what leaves every
        # piece a few pages.
        pieces = max(1, min(free, (total - len(items)) // (size * MIN_PAGES_PER_PIECE)))
        # Split where the rest likely lies, at the pace this page was placed at (orders are
        # not spread evenly up to now: a shop's history is mostly old, or mostly recent); the
        # last piece reaches to the end of the range whatever the guess.
        pace = max(1, last - items[0].timestamp) / len(items)
        top = min(self.end, now, last + int(pace * (total - len(items))) + 1)
        width = (top - last) // pieces
        if pieces == 1 or width < 1:
            return [resume]
        cuts = [last + width * i for i in range(1, pieces)]
        resume.end = cuts[0] - 1
        spans = [resume]
        for low, high in zip(cuts, [*cuts[1:], None], strict=True):
            spans.append(_TimeRange(low, high - 1 if high is not None else self.end))
        return spans


class CsCartClient:
    """Client for one CS-Cart store. Thread-safe; use one object per store and share it.

    Extra keyword arguments beyond the settings, for tests and tuning: ``sleep`` (the function
    that waits between attempts; tests pass a recorder), ``max_pages`` (hard cap of pages in
    one listing), ``rng`` (randomness of the backoff jitter), ``backoff_base`` (first backoff
    step in seconds, doubled per attempt).
    """

    def __init__(
        self,
        *,
        client_id: str,
        store_url: str,
        api_user: str,
        api_key: SecretStr,
        limits: StoreLimits | None = None,
        api_entry: Literal["api", "api.php"] = "api",
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        max_pages: int = 10_000,
        rng: random.Random | None = None,
        backoff_base: float = 0.5,
    ) -> None:
        parts = urlsplit(store_url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("store_url must be an http(s) URL such as https://shop.example")
        if parts.username or parts.password:
            # Said without echoing the URL: it holds a credential.
            raise ValueError("store_url must not contain credentials; use api_user and api_key")
        if parts.query or parts.fragment:
            raise ValueError("store_url must be the store's base URL, without query or fragment")
        if api_entry not in ("api", "api.php"):
            raise ValueError("api_entry must be 'api' or 'api.php'")
        self.client_id = client_id
        self.store_url = store_url.strip().rstrip("/")
        self.api_entry = api_entry
        self.limits = limits or StoreLimits()
        self._timeout = (self.limits.connect_timeout, self.limits.read_timeout)
        self._sleep = sleep
        self._max_pages = max_pages
        self._rng = rng or random.Random()
        self._backoff_base = backoff_base
        self._slots = threading.BoundedSemaphore(self.limits.concurrency)
        self._bucket = _TokenBucket(self.limits.requests_per_second)

        # Defence in depth: the log pipeline masks this value should it ever reach a log line.
        register_secret(api_key.get_secret_value())
        self._owns_session = session is None
        self._session = session or requests.Session()
        self._session.auth = (api_user, api_key.get_secret_value())
        self._session.headers.update({"Accept": "application/json", "User-Agent": USER_AGENT})
        if self._owns_session:
            # Stateless API calls: no session cookie from the store is ever sent back.
            self._session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
            # Retries are ours (below), never urllib3's; one pooled connection per slot.
            adapter = _DeadlineAdapter(
                pool_connections=1, pool_maxsize=self.limits.concurrency, max_retries=0
            )
            self._session.mount("http://", adapter)
            self._session.mount("https://", adapter)

        self._updated_at: bool | None = None
        self.statuses = OrderStatuses(partial(self.list_statuses, "O"))
        """The store's order statuses, cached: what every job resolves statuses against."""

    @classmethod
    def for_client(cls, settings: ClientSettings, **kwargs: Any) -> CsCartClient:
        """The client for one entry of the clients file (``kwargs`` as in ``__init__``)."""
        return cls(
            client_id=settings.client_id,
            store_url=settings.store_url,
            api_user=settings.api_user,
            api_key=settings.api_key,
            limits=settings.limits,
            api_entry=settings.api_entry,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"CsCartClient(client_id={self.client_id!r}, store_url={self.store_url!r})"

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> CsCartClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- users and statuses ----------------------------------------------------------------

    def get_user(self, user_id: int) -> CartUser:
        what = f"user {user_id}"
        data = self._call("GET", "users.get", "users", user_id, what=what)
        return self._model(CartUser, self._object(data, "users.get", what), "users.get", what)

    def list_statuses(self, type: str = "O") -> list[CartStatus]:
        """The store's statuses of one type (``O`` orders), with names and inventory flags."""
        items = self._pages(
            "statuses.list", "statuses", "statuses", [("type", type)],
            page_size=STATUSES_PAGE_SIZE, what=f"type {type}", id_field="status",
        )
        return [self._model(CartStatus, item, "statuses.list", f"type {type}") for item in items]

    def _known_letters(self, letter: str) -> frozenset[str]:
        names = self.statuses.names()
        if letter not in names:  # perhaps added in the store since the cache was filled
            names = self.statuses.names(refresh=True)
        return frozenset(names)

    # --- orders ----------------------------------------------------------------------------

    def order_pages(
        self,
        *,
        statuses: Sequence[str] = (),
        time_from: int | None = None,
        updated_from: int | None = None,
        page_size: int | None = None,
    ) -> Iterator[list[CartOrder]]:
        """Every order matching the filters (``statuses``, placed from ``time_from``,
        changed from ``updated_from``), each once, a page at a time, with up to
        ``limits.concurrency`` requests in flight.

        Paged by placement time, not by offset: every request asks for the orders placed in
        a time range, sorted by ``timestamp``, and the next request of that range starts at
        the second of the last order read (those of that second already read are skipped by
        id). An order's placement time never changes, so
        an order leaving the filter meanwhile (FM's shipments move ``P`` to ``C``) or deleted
        shifts nothing: with offset paging it would move every later order back by one and the
        one sliding over a page boundary would never be read. A range holding more than a page
        is split in time among the free request slots. Pages come in the order the store
        answers them.

        Items are as the list gives them: full orders where the store has ``get_orders_data``
        (4.13+), slim list items elsewhere (``is_full`` tells); completing a slim item is the
        caller's choice, so that an order it skips costs no call. An idle listing costs one
        request. Fails loudly (``BadResponse``) where the store's answers cannot be paged
        safely: unsorted, outside the range asked for, an empty page before ``total_items``.
        """
        size = page_size or self.limits.page_size
        base = self._order_params(statuses, updated_from)
        lanes = self.limits.concurrency
        now = int(time.time())
        # A store's clock may run ahead of ours: the last range reaches well past now.
        horizon = now + _CLOCK_AHEAD
        in_flight: dict[Future[tuple[list[CartOrder], int]], _TimeRange] = {}
        asked = 0

        def ask(span: _TimeRange) -> None:
            nonlocal asked
            asked += 1
            if asked > self._max_pages:
                raise BadResponse(
                    f"orders.list: more than {self._max_pages} pages of {size}; refusing to "
                    "page further"
                )
            query = [
                *base, ("period", "C"), ("time_from", str(span.start)),
                ("time_to", str(span.end)), ("items_per_page", str(size + span.repeats)),
                ("page", str(span.page)),
            ]
            in_flight[_in_background(partial(self._order_page, query, span.where()))] = span

        # Never 0: PHP reads "0" as empty, and older versions then take "now".
        ask(_TimeRange(max(1, time_from or 1), horizon))
        first = True
        try:
            while in_flight:
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    span = in_flight.pop(future)
                    items, total = future.result()
                    if first and total > self._max_pages * size:
                        raise BadResponse(
                            f"orders.list: the store reports {total} orders, more than "
                            f"{self._max_pages} pages of {size}{_ctx(span.where())}"
                        )
                    first = False
                    span.check(items, size)
                    fresh = span.fresh(items)
                    free = lanes - len(in_flight)
                    for follow in span.follow_up(items, fresh, total, size, free, now):
                        ask(follow)
                    if fresh:
                        yield fresh
        finally:
            for future in in_flight:
                future.cancel()  # a GET asked ahead and not needed: nothing to undo

    def _order_page(self, query: Params, where: str) -> tuple[list[CartOrder], int]:
        data = self._call("GET", "orders.list", "orders", params=query, what=where)
        items, total = self._page_of(data, "orders", "orders.list", where)
        return [self._model(CartOrder, item, "orders.list", where) for item in items], total

    @staticmethod
    def _order_params(statuses: Sequence[str], updated_from: int | None) -> list[tuple[str, str]]:
        """The query of an order listing: sorted by (time placed, id), full orders where the
        store can, and the filters, the PHP way (``status[]=P&status[]=C``)."""
        if isinstance(statuses, str):
            statuses = [statuses]
        base = [("sort_by", "date"), ("sort_order", "asc"), ("get_orders_data", "1")]
        base += [("status[]", status) for status in statuses]
        if updated_from is not None:
            # Stores without it ignore it silently: check supports_updated_at() first.
            base.append(("updated_at_from", str(updated_from)))
        return base

    def get_order(self, order_id: int) -> CartOrder:
        what = f"order {order_id}"
        data = self._call("GET", "orders.get", "orders", order_id, what=what)
        if data in (None, [], {}):
            raise NotFound(f"orders.get: the store answered an empty order{_ctx(what)}")
        order = self._model(CartOrder, self._object(data, "orders.get", what), "orders.get", what)
        if order.order_id != order_id:
            raise BadResponse(f"orders.get: the store answered order {order.order_id}{_ctx(what)}")
        return order

    def update_order_status(self, order_id: int, status: str, *, notify_user: bool = False) -> None:
        """Set an order's status, and make sure it took.

        CS-Cart answers ``200`` to ``PUT /api/orders/<id>`` whatever happened: for an unknown
        order, for an unchanged status, and it writes an unknown letter as sent. So:

        1. the letter must be one of the store's order statuses (``StoreRefused`` otherwise,
           nothing sent);
        2. only ``status`` and the notify flags are sent (other keys make some versions
           recalculate the whole order). A flag is on whenever it is non-empty on the PHP side
           (``"N"`` would send the e-mail), so they go as JSON ``false`` when off; staff and
           vendor e-mails are always off;
        3. the order is read back (``get_order``): an unknown order is ``NotFound``; if the
           store put it in ``B`` (Backordered: stock short and negative stock forbidden) or the
           status did not change, ``StoreRefused`` says so.

        A PUT is retried on timeouts and 5xx like a GET: setting the same status twice is a
        no-op in CS-Cart.
        """
        what = f"order {order_id}"
        letters = self._known_letters(status)
        if status not in letters:
            raise StoreRefused(
                f"orders.update: {status!r} is not one of the store's order statuses "
                f"({', '.join(sorted(letters))}){_ctx(what)}"
            )
        body = {
            "status": status,
            "notify_user": bool(notify_user),
            "notify_department": False,
            "notify_vendor": False,
        }
        data = self._call("PUT", "orders.update", "orders", order_id, body=body, what=what)
        self._expect_echo(data, "order_id", "orders.update", what)
        now = self.get_order(order_id).status
        if now == status:
            return
        if now == "B":
            raise StoreRefused(
                f"orders.update: the store put order {order_id} in B (Backordered) instead of "
                f"{status}: stock is short and the store forbids negative stock",
                action="Restock the order's products in CS-Cart (or allow negative stock), set "
                "the status there, or replay once stock is in.",
            )
        raise StoreRefused(
            f"orders.update: order {order_id} is still in {now!r}, not {status!r}: the store "
            "did not apply the change"
        )

    # --- shipments -------------------------------------------------------------------------

    def list_shipments(self, order_id: int) -> list[CartShipment]:
        """Every shipment of one order. Paged by ``total_items``: CS-Cart answers a page past
        the end of shipments with the last page again, so an empty page never comes."""
        what = f"order {order_id}"
        items = self._pages(
            "shipments.list", "shipments", "shipments", [("order_id", str(order_id))],
            page_size=self.limits.page_size, what=what, id_field="shipment_id",
        )
        shipments = [self._model(CartShipment, item, "shipments.list", what) for item in items]
        # A store that ignored the filter would hand back everyone's shipments.
        return [shipment for shipment in shipments if shipment.order_id in (order_id, 0)]

    def get_shipment(self, shipment_id: int) -> CartShipment:
        what = f"shipment {shipment_id}"
        data = self._call("GET", "shipments.get", "shipments", shipment_id, what=what)
        return self._model(
            CartShipment, self._object(data, "shipments.get", what), "shipments.get", what
        )

    def update_shipment(
        self, shipment_id: int, *, tracking_number: str | None = None,
        comments: str | None = None,
    ) -> None:
        """Change a shipment's tracking number and/or comments (the fields newer versions
        accept on PUT; the carrier and the products cannot be changed)."""
        what = f"shipment {shipment_id}"
        body: dict[str, Any] = {}
        if tracking_number is not None:
            body["tracking_number"] = tracking_number
        if comments is not None:
            body["comments"] = comments
        if not body:
            raise ValueError("nothing to update: give tracking_number and/or comments")
        data = self._call(
            "PUT", "shipments.update", "shipments", shipment_id, body=body, what=what
        )
        self._expect_echo(data, "shipment_id", "shipments.update", what)

    def create_shipment(
        self,
        *,
        order_id: int,
        shipping_id: int,
        tracking_number: str | None,
        carrier: str | None,
        comments: str = "",
        products: Mapping[str, int],
        notify_user: bool = False,
        order_status: str | None = None,
    ) -> int:
        """Create a shipment and return its id. Never retried once sent.

        CS-Cart does not de-duplicate shipments: a repeated POST creates a second one. So a
        read timeout, a 5xx or an unreadable success answer raises ``StoreOutcomeUnknown``:
        the caller must read ``list_shipments`` before trying again. Only a failure to connect
        (nothing sent) is retried. A 429 (a proxy refusing before the store) is ``RateLimited``.

        ``products`` (item id → amount) must not be empty: without it CS-Cart ships everything
        not yet shipped. A tracking number or a carrier is required (CS-Cart refuses neither).
        ``order_status`` changes the order's status in the same call (checked against the
        store's letters first).
        """
        what = f"order {order_id}"
        if not products:
            raise ValueError("products must not be empty: CS-Cart would ship the whole order")
        if any(int(amount) <= 0 for amount in products.values()):
            raise ValueError("every shipped amount must be positive")
        if not (tracking_number or carrier):
            raise StoreRefused(
                f"shipments.create: a tracking number or a carrier is required{_ctx(what)}"
            )
        if order_status is not None and order_status not in self._known_letters(order_status):
            raise StoreRefused(
                f"shipments.create: {order_status!r} is not one of the store's order "
                f"statuses{_ctx(what)}"
            )
        body: dict[str, Any] = {
            "order_id": order_id,
            "shipping_id": shipping_id,
            "comments": comments,
            "products": {str(item_id): int(amount) for item_id, amount in products.items()},
            "notify_user": bool(notify_user),
        }
        if tracking_number:
            body["tracking_number"] = tracking_number
        if carrier:
            body["carrier"] = carrier
        if order_status:
            body["order_status"] = order_status
        data = self._call("POST", "shipments.create", "shipments", body=body, what=what)
        shipment_id = _int_field(data.get("shipment_id")) if isinstance(data, dict) else None
        if not shipment_id:
            message = data.get("message") if isinstance(data, dict) else None
            raise StoreOutcomeUnknown(
                "shipments.create: the store answered success without a shipment_id"
                f"{': ' + str(message)[:MESSAGE_CHARS] if message else ''}{_ctx(what)}; "
                "read the order's shipments before trying again"
            )
        return shipment_id

    # --- products and stock ----------------------------------------------------------------

    def iter_products(
        self, *, pcode: str | None = None, page_size: int | None = None
    ) -> Iterator[CartProduct]:
        """Every product (or those whose code contains ``pcode``, case-insensitively), paged
        to the end, sorted by product code (CS-Cart cannot sort products by id)."""
        params: list[tuple[str, str]] = [("sort_by", "code"), ("sort_order", "asc")]
        if pcode:
            params.append(("pcode", pcode))
        what = f"pcode {pcode}" if pcode else ""
        for item in self._pages(
            "products.list", "products", "products", params,
            page_size=page_size or self.limits.page_size, what=what, id_field="product_id",
        ):
            yield self._model(CartProduct, item, "products.list", what)

    def find_products_by_code(self, code: str) -> list[CartProduct]:
        """Products whose code is exactly ``code`` (surrounding spaces ignored): CS-Cart's
        ``pcode`` is a case-insensitive substring match, so its answer is filtered here."""
        wanted = code.strip()
        if not wanted:
            raise ValueError("an empty product code would match every product")
        return [p for p in self.iter_products(pcode=wanted) if p.product_code.strip() == wanted]

    def get_product(self, product_id: int) -> CartProduct:
        what = f"product {product_id}"
        data = self._call("GET", "products.get", "products", product_id, what=what)
        product = self._model(
            CartProduct, self._object(data, "products.get", what), "products.get", what
        )
        return product

    def update_product_amount(self, product_id: int, amount: int) -> None:
        """Set a product's (or variation's) stock. The amount is stored as sent, negative
        included: clamping is the caller's policy."""
        what = f"product {product_id}"
        data = self._call(
            "PUT", "products.update", "products", product_id, body={"amount": int(amount)},
            what=what,
        )
        self._expect_echo(data, "product_id", "products.update", what)

    def iter_combinations(self, product_id: int) -> Iterator[CartCombination]:
        """Option combinations of a product on stores up to 4.9 (``tracking: O``).

        CS-Cart answers this entity as a bare list without ``total_items``, paged only when
        ``items_per_page`` is sent: so nothing is sent and all rows come at once (a product's
        combinations are few). It answers ``404`` when the product has none: the product is
        then read to tell "no combinations" from "no such product".
        """
        what = f"product {product_id}"
        try:
            data = self._call(
                "GET", "combinations.list", "combinations",
                params=[("product_id", str(product_id))], what=what,
            )
        except NotFound:
            self.get_product(product_id)  # raises NotFound when the product is gone
            return
        if isinstance(data, dict) and "combinations" in data:
            data = data["combinations"]  # in case a version wraps it like other lists
        items = _as_items(data)
        if items is None or any(not isinstance(item, dict) for item in items):
            raise BadResponse(f"combinations.list: expected a list of objects{_ctx(what)}")
        for item in items:
            yield self._model(CartCombination, item, "combinations.list", what)

    def update_combination_amount(self, combination_hash: str, amount: int) -> None:
        what = f"combination {combination_hash}"
        data = self._call(
            "PUT", "combinations.update", "combinations", combination_hash,
            body={"amount": int(amount)}, what=what,
        )
        # Some versions answer 200 with only a message when they refuse (access denied).
        self._expect_echo(data, "combination_hash", "combinations.update", what)

    # --- capabilities ----------------------------------------------------------------------

    def supports_updated_at(self) -> bool:
        """Whether the store filters orders by ``updated_at_from`` (not every 4.x does; the
        others ignore the parameter and return every order).

        Probed by asking for orders changed after 2100: a store that filters answers none.
        A store without any order answers False without caching.
        """
        if self._updated_at is None:
            _, future = self._probe([("updated_at_from", str(_FAR_FUTURE))])
            if future > 0:
                self._updated_at = False  # the filter was ignored
            else:
                _, total = self._probe([])
                if total == 0:
                    return False
                self._updated_at = True  # orders exist, and the filter removed them all
        return self._updated_at

    def _probe(self, extra: Params) -> tuple[list[Any], int]:
        params = [("items_per_page", "1"), ("page", "1"), *extra]
        data = self._call("GET", "orders.list", "orders", params=params, what="capability probe")
        return self._page_of(data, "orders", "orders.list", "capability probe")

    # --- paging ----------------------------------------------------------------------------

    def _pages(
        self,
        op: Operation,
        entity: str,
        key: str,
        params: Params,
        *,
        page_size: int,
        what: str,
        id_field: str,
    ) -> Iterator[dict[str, Any]]:
        """Items of a listing, page by page to the end, one at a time (bounded memory).

        Stops when ``total_items`` (re-read on every page) items have come, never on an empty
        page (CS-Cart answers the shipments page past the end with the last page again).
        Fails loudly (``BadResponse``) when the store's paging cannot be trusted: no numeric
        ``total_items``, an empty page before the total, a page of only repeats, or more than
        ``max_pages`` pages. Items already yielded (same id) are skipped.
        """
        seen: set[str] = set()
        received = 0
        page = 1
        while True:
            where = f"{what}, page {page}" if what else f"page {page}"
            if page > self._max_pages:
                raise BadResponse(
                    f"{op}: more than {self._max_pages} pages of {page_size}{_ctx(where)}; "
                    "refusing to page further"
                )
            query = [*params, ("items_per_page", str(page_size)), ("page", str(page))]
            data = self._call("GET", op, entity, params=query, what=where)
            items, total = self._page_of(data, key, op, where)
            if page == 1 and total > self._max_pages * page_size:
                raise BadResponse(
                    f"{op}: the store reports {total} items, more than {self._max_pages} pages "
                    f"of {page_size}{_ctx(where)}"
                )
            if not items:
                if received >= total:
                    return
                raise BadResponse(
                    f"{op}: page {page} is empty but total_items is {total} and only "
                    f"{received} came{_ctx(what)}"
                )
            fresh = 0
            for item in items:
                ident = item.get(id_field)
                if ident is not None:
                    if str(ident) in seen:
                        continue
                    seen.add(str(ident))
                fresh += 1
                yield item
            if fresh == 0:
                raise BadResponse(
                    f"{op}: page {page} only repeats earlier items: the store ignores "
                    f"paging{_ctx(what)}"
                )
            received += len(items)
            if received >= total:
                return
            page += 1

    @staticmethod
    def _page_of(data: Any, key: str, op: str, where: str) -> tuple[list[dict[str, Any]], int]:
        if not isinstance(data, dict):
            raise BadResponse(f"{op}: expected an object with {key!r}{_ctx(where)}")
        items = _as_items(data.get(key))
        if items is None:
            raise BadResponse(f"{op}: no {key!r} list in the answer{_ctx(where)}")
        if any(not isinstance(item, dict) for item in items):
            raise BadResponse(f"{op}: a {key!r} item is not an object{_ctx(where)}")
        params = data.get("params")
        total = _int_field(params.get("total_items")) if isinstance(params, dict) else None
        if total is None:
            raise BadResponse(
                f"{op}: params.total_items is missing or not a number{_ctx(where)}; "
                "cannot tell where the list ends"
            )
        return items, total

    # --- shapes ----------------------------------------------------------------------------

    @staticmethod
    def _model(model: type[M], data: Any, op: str, what: str) -> M:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            # Never the input values: they may be a shopper's data.
            errors = exc.errors(include_url=False, include_input=False, include_context=False)
            first = errors[0]
            field = ".".join(str(part) for part in first["loc"]) or "(the whole object)"
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise BadResponse(
                f"{op}: unexpected {model.__name__} from the store: {field}: "
                f"{first['msg'].removeprefix('Value error, ')}{more}{_ctx(what)}"
            ) from None

    @staticmethod
    def _object(data: Any, op: str, what: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise BadResponse(f"{op}: expected a JSON object{_ctx(what)}")
        return data

    @staticmethod
    def _expect_echo(data: Any, key: str, op: str, what: str) -> None:
        """A write answers ``{key: id}``; an answer with only a message is a refusal."""
        if isinstance(data, dict) and data.get(key) not in (None, ""):
            return
        message = data.get("message") if isinstance(data, dict) else None
        if isinstance(message, str) and message.strip():
            message = " ".join(message.split())[:MESSAGE_CHARS]
            raise StoreRefused(f"{op}: the store refused: {message}{_ctx(what)}", status=200)
        raise BadResponse(f"{op}: the answer has no {key!r}{_ctx(what)}", status=200)

    # --- one call: retries -----------------------------------------------------------------

    def _endpoint(self, entity: str, ident: int | str | None) -> tuple[str, list[tuple[str, str]]]:
        path = entity if ident is None else f"{entity}/{quote(str(ident), safe='')}"
        if self.api_entry == "api.php":
            return f"{self.store_url}/api.php", [("_d", path)]
        return f"{self.store_url}/api/{path}", []

    def _call(
        self,
        method: Method,
        op: Operation,
        entity: str,
        ident: int | str | None = None,
        *,
        params: Params = (),
        body: Any = None,
        what: str = "",
    ) -> Any:
        """One logical call: attempts with backoff until an answer that is not retried."""
        url, query = self._endpoint(entity, ident)
        query = [*query, *params]
        attempts = self.limits.max_attempts
        for attempt in range(1, attempts + 1):
            retry_after: float | None = None
            status: int | None = None
            try:
                reply = self._send(method, op, url, query, body, attempt)
            except _NoAnswer as exc:
                if method == "POST" and exc.maybe_sent:
                    raise StoreOutcomeUnknown(
                        f"{op}: no answer ({exc.detail}) after the request was sent: it may "
                        f"or may not have been applied{_ctx(what)}"
                    ) from None
                failure = f"no answer ({exc.detail})"
            else:
                if not _retryable(reply.status):
                    return self._interpret(method, op, reply, what, listing=ident is None)
                if method == "POST":
                    raise self._post_failure(op, reply, what)
                status = reply.status
                failure = _http(status)
                retry_after = _parse_retry_after(reply.headers.get("Retry-After"))
            if attempt >= attempts:
                raise self._gave_up(op, status, f"{failure} after {attempts} attempts", what)
            cap = self.limits.max_retry_wait
            if retry_after is not None and retry_after > cap:
                # Asking earlier than the store allows only earns another refusal: stop here
                # and let the message's own delayed retry come back later.
                raise self._gave_up(
                    op, status,
                    f"{failure}; the store asks to wait {retry_after:.0f} s, more than "
                    f"max_retry_wait ({cap:g} s)",
                    what,
                )
            wait = self._backoff(attempt, retry_after)
            STORE_RETRIES.labels(self.client_id, op).inc()
            log.warning(
                "cscart.retry", client=self.client_id, operation=op,
                status=status if status is not None else failure, attempt=attempt,
                wait=round(wait, 3),
            )
            self._sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with "equal jitter" (half fixed, half random), at least
        ``Retry-After``, at most ``max_retry_wait``."""
        step = self._backoff_base * 2 ** (attempt - 1)
        wait = step / 2 + self._rng.uniform(0, step / 2)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, self.limits.max_retry_wait)

    def _gave_up(self, op: str, status: int | None, detail: str, what: str) -> StoreError:
        log.warning(
            "cscart.gave_up", client=self.client_id, operation=op, status=status, detail=detail
        )
        reason = f"{op}: {detail}{_ctx(what)}"
        if status == 429:
            return RateLimited(reason, status=429)
        return StoreUnreachable(reason, status=status)

    def _post_failure(self, op: str, reply: _Reply, what: str) -> StoreError:
        if reply.status == 429:
            # A rate limiter refuses before passing the request on: nothing was created.
            return RateLimited(f"{op}: {_http(429)}{_ctx(what)}", status=429)
        # A 5xx from a POST: the store (or the proxy's upstream) may have acted on it.
        return StoreOutcomeUnknown(
            f"{op}: {_http(reply.status)}: the request may or may not have been "
            f"applied{_ctx(what)}",
            status=reply.status,
        )

    def _interpret(
        self, method: Method, op: str, reply: _Reply, what: str, *, listing: bool
    ) -> Any:
        """Turn an answer that is not retried into data or a typed error."""
        status = reply.status
        head = f"{op}: {_http(status)}"
        if 200 <= status < 300:
            try:
                return self._json(op, reply, what)
            except BadResponse as exc:
                if method == "POST":
                    raise StoreOutcomeUnknown(
                        f"{exc.reason}; the write may have been applied", status=status
                    ) from None
                raise
        if 300 <= status < 400:
            raise BadResponse(
                f"{head}: the store redirects the API{_ctx(what)}",
                status=status,
                action="The store redirects API calls (http to https, or another host): set "
                "store_url to the final address of the store, then replay.",
            )
        if status == 401:
            raise StoreUnauthorized(f"{head}{_ctx(what)}", status=status)
        if status == 403:
            raise StoreForbidden(f"{head}{_ctx(what)}", status=status)
        if status == 404:
            if listing:
                # A listing itself is missing: the API is not where we look for it.
                raise NotFound(
                    f"{head}: no CS-Cart API at this address{_ctx(what)}",
                    status=status,
                    action="Check store_url and api_entry (api.php for stores without URL "
                    "rewriting), then replay.",
                )
            raise NotFound(f"{head}{_ctx(what)}", status=status)
        message = _store_message(reply.content)
        # CS-Cart writes "<Reason>: detail"; the reason is already in the head.
        phrase = _phrase(status)
        if phrase and message.lower().startswith(phrase.lower()):
            message = message[len(phrase):].lstrip(" :")
        raise StoreRefused(
            f"{head}{': ' + message if message else ''}{_ctx(what)}", status=status
        )

    @staticmethod
    def _json(op: str, reply: _Reply, what: str) -> Any:
        if reply.content is None:
            raise BadResponse(
                f"{op}: {_http(reply.status)}: the answer is larger than max_response_bytes"
                f"{_ctx(what)}",
                status=reply.status,
            )
        if reply.status == 204 or not reply.content.strip():
            return None
        kind = reply.headers.get("Content-Type", "").split(";")[0].strip() or "no content type"
        try:
            text = reply.content.decode("utf-8-sig")  # some hosts prepend a BOM
            return json.loads(text, parse_float=Decimal, parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):  # deep nesting: not an answer
            raise BadResponse(
                f"{op}: {_http(reply.status)}: the answer is not JSON ({kind}){_ctx(what)}",
                status=reply.status,
            ) from None

    # --- one attempt -----------------------------------------------------------------------

    def _send(
        self, method: Method, op: str, url: str, query: Params, body: Any, attempt: int
    ) -> _Reply:
        """One HTTP attempt inside the store's concurrency cap and rate limit, within
        ``limits.attempt_timeout`` from its first byte sent to its last byte read."""
        with self._slots:
            self._bucket.take()
            started = time.monotonic()
            status_class = "error"
            status: int | str = "error"
            deadline = _Deadline(self.limits.attempt_timeout)
            token = _ATTEMPT.set(deadline)
            _WATCHDOG.add(deadline)
            try:
                try:
                    response = self._session.request(
                        method, url, params=list(query), json=body, timeout=self._timeout,
                        stream=True, allow_redirects=False,
                    )
                except requests.RequestException as exc:
                    failure = self._failure(exc, deadline, status_sent=False)
                    status_class, status = failure.status_class, failure.detail
                    raise failure from None
                with response:
                    status_class, status = f"{response.status_code // 100}xx", response.status_code
                    try:
                        content = self._read_capped(response)
                    except requests.RequestException as exc:
                        # The status line came: the request surely reached the store.
                        failure = self._failure(exc, deadline, status_sent=True)
                        status_class, status = failure.status_class, failure.detail
                        raise failure from None
                    return _Reply(response.status_code, response.headers, content)
            finally:
                deadline.finish()
                _ATTEMPT.reset(token)
                elapsed = time.monotonic() - started
                STORE_REQUESTS.labels(self.client_id, op, status_class).inc()
                STORE_REQUEST_SECONDS.labels(self.client_id, op).observe(elapsed)
                log.debug(
                    "cscart.request", client=self.client_id, operation=op, method=method,
                    status=status, attempt=attempt, seconds=round(elapsed, 3),
                )

    @staticmethod
    def _failure(
        exc: requests.RequestException, deadline: _Deadline, *, status_sent: bool
    ) -> _NoAnswer:
        failure = _no_answer(exc)
        if deadline.expired:
            failure = _NoAnswer(
                "timeout",
                f"no complete answer within attempt_timeout ({deadline.seconds:g} s)",
                maybe_sent=True,
            )
        if status_sent:
            failure.maybe_sent = True
        return failure

    def _read_capped(self, response: requests.Response) -> bytes | None:
        """The body, or None as soon as it exceeds ``max_response_bytes``."""
        cap = self.limits.max_response_bytes
        declared = _int_field(response.headers.get("Content-Length"))
        if declared is not None and declared > cap:
            return None
        body = bytearray()
        for chunk in response.iter_content(chunk_size=64 * 1024):
            body += chunk
            if len(body) > cap:
                return None
        return bytes(body)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not valid JSON")


class StoreClients:
    """One CS-Cart client per store, shared by every thread of the process, so that the
    per-store rate limit and concurrency cap hold for the whole process."""

    def __init__(self) -> None:
        self._cache: dict[str, CsCartClient] = {}
        self._lock = threading.Lock()

    def for_client(self, settings: ClientSettings) -> CsCartClient:
        with self._lock:
            client = self._cache.get(settings.client_id)
            if client is None:
                client = CsCartClient.for_client(settings)
                self._cache[settings.client_id] = client
            return client

    def close(self) -> None:
        with self._lock:
            clients, self._cache = list(self._cache.values()), {}
        for client in clients:
            client.close()
