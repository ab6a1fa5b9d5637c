"""The store's HTTP face: a threaded server, routing, Basic authentication, injected faults
and the request log's record.

Knows nothing of the store's data: the emulator hands it one function that answers a request,
so what can go wrong on the wire stays apart from what the store does.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import random
import re
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote

from .coercion import json_encode, php_int, php_parse, php_str

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
    entity: frozenset(e.partition(".")[2] for e in ENDPOINTS if e.startswith(f"{entity}."))
    for entity in {e.partition(".")[0] for e in ENDPOINTS}
}
_ACTIONS: dict[tuple[str, bool], str] = {  # (method, an id in the path) -> action
    ("GET", False): "list",
    ("GET", True): "get",
    ("POST", False): "create",
    ("PUT", True): "update",
    ("DELETE", True): "delete",
}

_HTML_MAINTENANCE = (
    b"<!DOCTYPE html><html><head><title>Maintenance</title></head><body>"
    b"<h1>We'll be back soon</h1><p>The store is undergoing maintenance.</p></body></html>"
)


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
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class Route:
    entity: str
    ident: str | None
    action: str
    endpoint: str
    allowed: bool


@dataclass(slots=True)
class Plan:
    """What one request's fault does: drawn once, on arrival."""

    kind: str | None = None
    latency: float = 0.0
    status: int = 0
    retry_after: int = 1
    hang: float = 0.0
    applies: bool = True


# ---- answers ------------------------------------------------------------------------------------
def error(status: int, detail: str = "") -> dict[str, Any]:
    """CS-Cart's error body: the reason phrase, then the detail."""
    reason = HTTPStatus(status).phrase
    return {"message": f"{reason}: {detail}" if detail else reason, "status": status}


def json_response(
    status: int, payload: Any, headers: list[tuple[str, str]] | None = None
) -> Response:
    body = b"" if status == 204 else json_encode(payload)
    return Response(status, body, "application/json", headers or [])


def html_response(status: int, body: bytes | None = None) -> Response:
    if body is None:
        phrase = HTTPStatus(status).phrase
        body = (
            f"<!DOCTYPE html><html><head><title>{status} {phrase}</title></head>"
            f"<body><h1>{phrase}</h1><hr><address>nginx</address></body></html>"
        ).encode()
    return Response(status, body, "text/html; charset=UTF-8")


def unauthorized() -> Response:
    return json_response(
        401, error(401), [("WWW-Authenticate", 'Basic realm="User email/API key"')]
    )


def not_allowed(entity: str) -> Response:
    allow = sorted({m for (m, _), a in _ACTIONS.items() if a in _ENTITY_ACTIONS[entity]})
    return json_response(405, error(405), [("Allow", ", ".join(allow))])


# ---- reading a request --------------------------------------------------------------------------
def route(method: str, path: str, params: dict[str, Any], *, combinations: bool) -> Route | None:
    """The endpoint a request names, or None (404). Takes ``_d`` out of ``params`` for
    /api.php. ``combinations``: the store still has the pre-4.10 endpoint."""
    if path == "/api.php":
        segments = [s for s in php_str(params.pop("_d", "")).split("/") if s]
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
    if entity not in _ENTITY_ACTIONS or (entity == "combinations" and not combinations):
        return None  # /api/2/... lands here too: "2" is no entity
    if ident is not None:
        pattern = r"[0-9A-Za-z_-]+" if entity == "combinations" else r"[0-9]+"
        if not re.fullmatch(pattern, ident):
            return None
    action = _ACTIONS.get((method, ident is not None))
    allowed = action is not None and action in _ENTITY_ACTIONS[entity]
    endpoint = f"{entity}.{action or method.lower()}"
    return Route(entity, ident, action or method.lower(), endpoint, allowed)


def parse_body(content_type: str, body: bytes) -> dict[str, Any] | None:
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
        return php_parse(parse_qsl(text, keep_blank_values=True)) or None
    return None


def authenticate(header: str, find_user: Callable[[str], Mapping[str, Any] | None]) -> int:
    """200, 401 or 403 for an Authorization header: Basic, a user's e-mail and API key."""
    if header[:6].lower() != "basic ":
        return 401
    try:
        raw = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return 401
    email, sep, key = raw.partition(":")
    if not sep:
        return 401
    user = find_user(email)
    if user is None or not user["api_key"]:
        return 401
    if not hmac.compare_digest(user["api_key"].encode(), key.encode()):
        return 401
    if user["status"] != "A":
        return 401  # a disabled user is refused even with a valid key
    if user["user_type"] == "C":
        return 403
    return 200


# ---- faults -------------------------------------------------------------------------------------
class Faults:
    """The faults set per endpoint (or ``"*"``), drawn from a seeded generator so a run is
    reproducible."""

    def __init__(self, seed: int) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._faults: dict[str, Fault] = {}

    def set(self, endpoint: str, fault: Fault | None) -> None:
        if endpoint != "*" and endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {sorted(ENDPOINTS)} or '*'")
        with self._lock:
            if fault is None:
                self._faults.pop(endpoint, None)
            else:
                self._faults[endpoint] = fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def draw(self, endpoint: str | None) -> Plan:
        """The endpoint's own fault wins over "*"; within one: rate limit, unauthorized, HTML
        page, error, timeout (latency always applies first)."""
        with self._lock:
            fault = self._faults.get(endpoint) if endpoint else None
            if fault is None:
                fault = self._faults.get("*")
            if fault is None:
                return Plan()
            plan = Plan(latency=fault.latency)
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


def fault_response(plan: Plan) -> Response | None:
    """The answer a fault gives instead of the store's; None when the store answers (no fault,
    or a timeout: the caller decides whether the write happens)."""
    if plan.kind == "rate_limit":
        return json_response(429, error(429), [("Retry-After", str(plan.retry_after))])
    if plan.kind == "unauthorized":
        return unauthorized()
    if plan.kind == "html":
        return html_response(200, _HTML_MAINTENANCE)
    if plan.kind == "error":
        # proxies write 502/503/504 pages; the store itself answers JSON
        if plan.status in (502, 503, 504):
            return html_response(plan.status)
        return json_response(plan.status, error(plan.status))
    return None


# ---- the server ---------------------------------------------------------------------------------
Respond = Callable[[str, str, Any, bytes], Response]  # method, raw path, headers, body


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    timeout = 120  # an idle keep-alive connection ends eventually
    wbufsize = 64 * 1024  # headers and body leave in one write (flushed per response)
    server: Server

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
        self.server.track(self.connection, add=True)
        try:
            super().handle()
        except OSError:
            pass  # the client went away (timed out and closed): nothing to report
        finally:
            self.server.track(self.connection, add=False)

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
        length = php_int(self.headers.get("Content-Length") or "0")
        if length <= 0:
            return b""
        body = self.rfile.read(length)
        return body if len(body) == length else None

    def _serve(self) -> None:
        try:
            body = self._read_body()
        except ValueError:  # a malformed chunk size
            body = None
        if body is None:
            self.close_connection = True  # a truncated request: PHP never runs, nothing applies
            return
        resp = self.server.respond(self.command, self.path, self.headers, body)
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

    # the store answers (or refuses) every method the same way
    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve


class Server(ThreadingHTTPServer):
    """Serves ``respond`` on a thread per connection; ``errors`` collects tracebacks of bugs
    (a disconnect is no bug)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], respond: Respond, errors: list[str]) -> None:
        self.respond = respond
        self.errors = errors
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
        self.errors.append(traceback.format_exc())
