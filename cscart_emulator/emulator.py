"""The store on the wire: a :class:`~cscart_emulator.model.Store` behind an HTTP server, with
faults to inject and a log of every request.

This is where a request meets the store: the HTTP side decides whether it gets through, the
resource handlers what the store does with it.
"""

from __future__ import annotations

import threading
import time
import traceback
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

from .coercion import php_parse
from .http import (
    Fault,
    Faults,
    RecordedRequest,
    Response,
    Route,
    Server,
    authenticate,
    error,
    fault_response,
    html_response,
    json_response,
    not_allowed,
    parse_body,
    route,
    unauthorized,
)
from .model import Store
from .resources import HANDLERS, Call
from .views import order_detail, shipment_json


class StoreEmulator(Store):
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
        super().__init__(
            timezone=timezone,
            version=version,
            currency=currency,
            move_stock=move_stock,
            allow_negative_stock=allow_negative_stock,
        )
        self.api_user = api_user
        self.api_key = api_key
        self.user_id = user_id
        self.host = host
        self.port = port

        self._faults = Faults(seed)
        self._stop_event = threading.Event()
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self.requests: list[RecordedRequest] = []
        self.errors: list[str] = []  # tracebacks of emulator bugs: a test expects none

        self.add_user(
            user_id, api_user, "A", "A", api_key=api_key, firstname="Store", lastname="Admin"
        )

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> StoreEmulator:
        if self._server is not None:
            return self
        self._stop_event.clear()
        self._server = Server((self.host, self.port), self._handle, self.errors)
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
        self._faults.set(endpoint, fault)

    def clear_faults(self) -> None:
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

    # ---- inspection: the JSON the API serves -------------------------------------------------
    def get_order_json(self, order_id: int) -> dict[str, Any]:
        with self._lock:
            return order_detail(self, self.orders[order_id])

    @property
    def shipments(self) -> dict[int, dict[str, Any]]:
        with self._lock:
            return {s.shipment_id: shipment_json(self, s) for s in self.shipment_records()}

    def shipments_for(self, order_id: int) -> list[dict[str, Any]]:
        with self._lock:
            return [shipment_json(self, s) for s in self.shipment_records(order_id)]

    # ---- one request ---------------------------------------------------------------------------
    def _handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> Response:
        at = time.time()
        split = urlsplit(raw_path)
        query = parse_qs(split.query, keep_blank_values=True)
        params = php_parse(parse_qsl(split.query, keep_blank_values=True))
        found = route(method, split.path, params, combinations=not self.has_variations)
        endpoint = found.endpoint if found else None
        content_type = headers.get("Content-Type", "") or ""
        data = parse_body(content_type, body)
        plan = self._faults.draw(endpoint)
        try:
            if plan.latency > 0:
                self._sleep(plan.latency)
            resp = fault_response(plan)
            if resp is not None:
                pass  # answered by the fault: nothing applied
            elif plan.kind == "timeout" and not plan.applies:
                self._sleep(plan.hang)
                resp = html_response(504)  # the proxy gave up; the store never saw it
            else:
                resp = self._answer(found, headers, params, data or {})
                if plan.kind == "timeout":
                    self._sleep(plan.hang)  # applied, then hung: the outcome-unknown case
        except Exception:
            self.errors.append(traceback.format_exc())
            resp = json_response(500, error(500))
        record = RecordedRequest(
            method=method,
            endpoint=endpoint,
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

    def _answer(
        self, found: Route | None, headers: Any, params: dict[str, Any], data: dict[str, Any]
    ) -> Response:
        # routing (404) is decided before authentication; 405 after it
        if found is None:
            return json_response(404, error(404))
        auth = authenticate(headers.get("Authorization", "") or "", self.user_by_email)
        if auth == 401:
            return unauthorized()
        if auth == 403:
            return json_response(403, error(403))
        if not found.allowed:
            return not_allowed(found.entity)
        with self._lock:
            status, payload = HANDLERS[found.endpoint](self, Call(found.ident, params, data))
        return json_response(status, payload)

    def _sleep(self, seconds: float) -> None:
        self._stop_event.wait(seconds)  # stop() wakes hung requests
