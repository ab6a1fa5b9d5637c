"""The console's WSGI application and its threaded server (stdlib ``wsgiref``).

Every request: parse → route → who is it (session cookie or bearer token; none → the login
page for a GET, 401 for a POST) → for a POST, the CSRF token of the session and the Origin
(or Referer) must match → operator-only routes refuse viewers (403) → the view. Every answer
carries a strict Content-Security-Policy (no script at all), ``no-store`` and no framing.
"""

from __future__ import annotations

import re
import secrets
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import urlencode, urlsplit
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from zoneinfo import ZoneInfo

import structlog

from cscart_fm.core.observability import hide_secrets
from cscart_fm.core.state import StateStore, utcnow
from cscart_fm.support.console import views
from cscart_fm.support.console.auth import Accounts, LoginThrottle, Sessions, User, same_token
from cscart_fm.support.console.http import (
    BodyTooLarge,
    Request,
    Response,
    cookie,
    redirect,
    safe_next,
)
from cscart_fm.support.console.templates import CSS, environment
from cscart_fm.support.dead_letters import audit
from cscart_fm.support.dead_letters.audit import Actor
from cscart_fm.support.dead_letters.collect import collect as collect_letters
from cscart_fm.support.dead_letters.desk import DeadLetterDesk, Replayer

log = structlog.get_logger(__name__)

SESSION_COOKIE = "cscart_fm_console"
LOGIN_COOKIE = "cscart_fm_console_login"

SECURITY_HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    view: Callable[[Console, Request], Response]
    access: str  # "public", "user" or "operator"


def _route(method: str, path: str, view: Any, access: str = "user") -> Route:
    return Route(method, re.compile("^" + path + "$"), view, access)


class Console:
    """Everything a request needs, shared by the server's threads."""

    def __init__(
        self,
        *,
        store: StateStore,
        accounts: Accounts,
        broker_url: str,
        retry_delays: Sequence[int] | None = None,
        clients: Any = None,
        clients_error: str | None = None,
        services: Any = None,
        zone: ZoneInfo | None = None,
        secure_cookie: bool = False,
        origins: Iterable[str] = (),
        replay_patience: float = 10.0,
        collect_interval: float = 3.0,
        collect: Callable[[StateStore, str], Any] = collect_letters,
        replayer: Replayer | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        """``collect`` and ``replayer`` are seams for tests (the broker's side of things)."""
        self.store = store
        self.accounts = accounts
        self.broker_url = broker_url
        self.retry_delays = retry_delays
        self.clients = clients
        self.clients_error = clients_error
        self.services = services
        self.zone = zone or ZoneInfo("UTC")
        self.secure_cookie = secure_cookie
        self.origins = {o.rstrip("/") for o in origins}
        self.clock = clock
        self.sessions = Sessions()
        self.throttle = LoginThrottle()
        # Replays and discards go through the desk, as the command line's do: the same rules,
        # the same audit. A console request should not hang: a shorter replay patience.
        self.desk = DeadLetterDesk(
            store,
            broker_url,
            retry_delays=retry_delays,
            replay_patience=replay_patience,
            collect=collect,
            collect_interval=collect_interval,
            replayer=replayer,
        )
        self.templates = environment(self.zone, clock)
        self.routes = [
            _route("GET", "/login", login_page, "public"),
            _route("POST", "/login", login, "public"),
            _route("POST", "/logout", logout),
            _route("GET", "/", views.overview),
            _route("GET", "/letters", views.letters),
            _route("POST", "/letters/replay", views.replay_filtered, "operator"),
            _route("GET", r"/letters/(?P<id>[0-9]{1,9})", views.letter),
            _route("POST", r"/letters/(?P<id>[0-9]{1,9})/replay", views.replay, "operator"),
            _route("POST", r"/letters/(?P<id>[0-9]{1,9})/discard", views.discard, "operator"),
            _route("POST", r"/letters/(?P<id>[0-9]{1,9})/reveal", views.reveal, "operator"),
            _route("GET", "/orders", views.orders),
            _route("GET", "/audit", views.audit_log),
        ]

    # --- helpers for views ------------------------------------------------------------------------

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        session = request.session
        flash = list(session.flash) if session else []
        if session:
            session.flash.clear()
        context.setdefault("collect_warning", None)
        context.setdefault("section", "")
        body = self.templates.get_template(name).render(
            user=request.user,
            csrf=session.csrf if session else "",
            flash=flash,
            zone_name=self.zone.key,
            **context,
        )
        return Response(status=status, body=body.encode("utf-8"))

    def error(
        self, request: Request, status: int, title: str, message: str, back: str | None = None
    ) -> Response:
        return self.render(
            request, "error.html", status=status, title=title, message=message, back=back
        )

    def hide_secrets(self, text: str) -> str:
        """Secrets never shown, even in revealed payloads (API keys and tokens registered
        for log redaction); personal data is the views' business."""
        return hide_secrets(text)

    # --- the WSGI application ---------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        try:
            response = self.handle(environ)
        except Exception:
            incident = secrets.token_hex(4)
            log.error("console: request failed", incident=incident, error=traceback.format_exc())
            text = f"Something went wrong (incident {incident}); the console's log has the details."
            response = Response(500, text.encode(), "text/plain; charset=utf-8")
        headers = [("Content-Type", response.content_type), *response.headers]
        headers += SECURITY_HEADERS
        headers.append(("Server", "cscart-fm-console"))  # wsgiref's names the Python version
        if self.secure_cookie:  # served over HTTPS: browsers are told to keep to it
            headers.append(("Strict-Transport-Security", "max-age=31536000"))
        if not any(name == "Cache-Control" for name, _ in response.headers):
            headers.append(("Cache-Control", "no-store"))
        headers.append(("Content-Length", str(len(response.body))))
        start_response(response.status_line, headers)
        # HEAD: the GET's status and headers (Content-Length included), without the body.
        return [] if environ.get("REQUEST_METHOD", "").upper() == "HEAD" else [response.body]

    def handle(self, environ: dict[str, Any]) -> Response:
        try:
            request = Request.from_environ(environ)
        except BodyTooLarge:
            return Response(413, b"Too large.\n", "text/plain; charset=utf-8")
        if request.path == "/healthz" and request.method in ("GET", "HEAD"):
            return Response(200, b"ok\n", "text/plain; charset=utf-8")
        if request.path == "/static/console.css" and request.method in ("GET", "HEAD"):
            return Response(
                200, CSS.encode(), "text/css; charset=utf-8", [("Cache-Control", "max-age=300")]
            )
        route, allowed = self._match(request)
        if route is None:
            if allowed:
                return Response(
                    405,
                    b"Method not allowed.\n",
                    "text/plain; charset=utf-8",
                    [("Allow", ", ".join(sorted(allowed)))],
                )
            self._identify(request)
            return self.error(request, 404, "Not found", "There is no such page.")
        self._identify(request)
        if route.access != "public" and request.user is None:
            if request.method in ("GET", "HEAD"):
                target = request.path + (
                    "?" + str(environ.get("QUERY_STRING")) if environ.get("QUERY_STRING") else ""
                )
                return redirect("/login?" + urlencode({"next": target}))
            return self.error(request, 401, "Log in first", "You are not logged in.", "/login")
        if request.method == "POST" and route.access != "public":
            refused = self._check_forgery(request)
            if refused:
                log.warning(
                    "console: POST refused",
                    path=request.path,
                    why=refused,
                    user=request.user.name if request.user else None,
                    remote_addr=request.remote_addr,
                )
                return self.error(
                    request,
                    403,
                    "Refused",
                    "This form did not come from this console page, or it is out of date "
                    f"({refused}). Go back, reload the page and try again.",
                )
        if route.access == "operator" and not (request.user and request.user.is_operator):
            return self.error(
                request,
                403,
                "Operators only",
                "You have read-only access: replaying, discarding and revealing personal data "
                "are for operators.",
            )
        return route.view(self, request)

    def _match(self, request: Request) -> tuple[Route | None, set[str]]:
        allowed: set[str] = set()
        method = "GET" if request.method == "HEAD" else request.method
        for route in self.routes:
            found = route.pattern.match(request.path)
            if found is None:
                continue
            if route.method != method:
                allowed.add(route.method)
                continue
            request.params = found.groupdict()
            return route, allowed
        return None, allowed

    def _identify(self, request: Request) -> None:
        authorization = request.header("Authorization") or ""
        if authorization.lower().startswith("bearer "):
            request.user = self.accounts.check_token(authorization[7:].strip())
            return
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is not None:
            request.session = session
            request.user = session.user

    def same_origin(self, request: Request) -> bool:
        """The second line against forgery: a browser names the page a POST comes from."""
        host = request.header("Host") or ""
        allowed = {f"http://{host}", f"https://{host}", *self.origins}
        origin = request.header("Origin")
        if origin is not None:
            return origin.rstrip("/") in allowed
        referer = request.header("Referer")
        if referer:
            parts = urlsplit(referer)
            return f"{parts.scheme}://{parts.netloc}" in allowed
        return True  # neither header: not a browser's cross-site form

    def _check_forgery(self, request: Request) -> str | None:
        if not self.same_origin(request):
            return "it came from another site"
        if request.session is None:  # a bearer token: no cookie a forger could ride on
            return None
        if not same_token(request.session.csrf, request.form.get("csrf_token")):
            return "missing or wrong CSRF token"
        return None

    def session_cookie(self, value: str, *, clear: bool = False) -> tuple[str, str]:
        return cookie(
            SESSION_COOKIE, value, secure=self.secure_cookie, max_age=0 if clear else None
        )


# --- logging in and out ---------------------------------------------------------------------------


def _login_form(
    console: Console,
    request: Request,
    *,
    status: int = 200,
    error: str | None = None,
    username: str = "",
) -> Response:
    token = secrets.token_urlsafe(24)
    response = console.render(
        request,
        "login.html",
        status=status,
        title="Log in",
        error=error,
        username=username,
        login_token=token,
        next=safe_next(request.query.get("next") or request.form.get("next")),
    )
    response.headers.append(
        cookie(LOGIN_COOKIE, token, path="/login", secure=console.secure_cookie, max_age=3600)
    )
    return response


def login_page(console: Console, request: Request) -> Response:
    if request.user is not None:
        return redirect(safe_next(request.query.get("next")))
    return _login_form(console, request)


def login(console: Console, request: Request) -> Response:
    name = request.form.get("username", "").strip()[:64]
    password = request.form.get("password", "")
    # Login forgery: the form's token must match the cookie set with it (SameSite=Strict:
    # another site's form cannot send it) and the Origin must be this console.
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if (
        not expected
        or not same_token(expected, request.form.get("login_token"))
        or not console.same_origin(request)
    ):
        return _login_form(
            console,
            request,
            status=403,
            username=name,
            error="The login form was out of date or did not come from this console: try again.",
        )
    wait = console.throttle.begin(name, request.remote_addr) if name and password else 0.0
    if wait > 0:
        log.warning("console: login throttled", user=name, remote_addr=request.remote_addr)
        return _login_form(
            console,
            request,
            status=429,
            username=name,
            error=f"Too many failed logins for this name or from this address: try again in "
            f"{_minutes_or_seconds(wait)}.",
        )
    user = None
    if name and password:
        with console.throttle.checking() as slot:
            if not slot:
                return _login_form(
                    console, request, status=503, username=name,
                    error="The console is busy checking other logins: try again in a moment.",
                )
            user = console.accounts.check_password(name, password)
    if user is None:
        audit.start(
            console.store,
            Actor(name or "(blank)", "-", audit.CONSOLE, request.remote_addr),
            action="login-failed",
            target="console",
            result="wrong name or password",
        )
        return _login_form(
            console, request, status=401, username=name, error="Wrong name or password."
        )
    console.throttle.succeeded(name, request.remote_addr)
    session = console.sessions.create(user)
    audit.start(
        console.store,
        Actor(user.name, user.role, audit.CONSOLE, request.remote_addr),
        action="login",
        target="console",
        result="logged in",
    )
    log.info("console: logged in", user=user.name, role=user.role)
    response = redirect(safe_next(request.form.get("next")))
    response.headers.append(console.session_cookie(session.id))
    response.headers.append(cookie(LOGIN_COOKIE, "", path="/login", max_age=0))
    return response


def _minutes_or_seconds(wait: float) -> str:
    return f"{max(1, round(wait / 60))} min" if wait >= 90 else f"{max(1, round(wait))} s"


def logout(console: Console, request: Request) -> Response:
    who = views.actor(request)
    if request.session is not None:
        console.sessions.drop(request.session.id)
    audit.start(
        console.store,
        who,
        action="logout",
        target="console",
        result="logged out",
    )
    response = redirect("/login")
    response.headers.append(console.session_cookie("", clear=True))
    return response


# --- serving --------------------------------------------------------------------------------------


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # socketserver's 5 resets the sixth browser connecting at once


class _QuietHandler(WSGIRequestHandler):
    server_version = "cscart-fm-console"  # what a bare HTTP error names (no Python version)
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("console request", line=format % args)


def serve(console: Console, host: str = "127.0.0.1", port: int = 8090) -> WSGIServer:
    """Bind now (``port`` 0 picks a free one); the caller runs ``serve_forever``."""
    return make_server(
        host, port, console, server_class=_ThreadingServer, handler_class=_QuietHandler
    )


def user_summary(accounts: Accounts) -> str:
    users = [user for user, _ in accounts.users.values()]
    tokens = [user for _, user in accounts.tokens]

    def count(items: list[User]) -> str:
        roles = {role: sum(1 for u in items if u.role == role) for role in ("operator", "viewer")}
        return ", ".join(f"{n} {role}(s)" for role, n in roles.items() if n) or "none"

    return f"users: {count(users)}; tokens: {count(tokens)}"
