"""Requests and responses of the console's WSGI application (nothing more than it needs)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs

from cscart_fm.support.console.auth import Session, User

MAX_BODY = 64 * 1024
"""Forms are small; a larger body is refused (413)."""

REASONS = {
    200: "OK",
    303: "See Other",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
}


class BodyTooLarge(Exception):
    pass


def _first(values: dict[str, list[str]]) -> dict[str, str]:
    return {name: items[0] for name, items in values.items() if items}


@dataclass
class Request:
    environ: dict[str, Any]
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]
    cookies: dict[str, str]
    remote_addr: str
    params: dict[str, str] = field(default_factory=dict)
    session: Session | None = None
    user: User | None = None

    @classmethod
    def from_environ(cls, environ: dict[str, Any]) -> Request:
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        raw_path = str(environ.get("PATH_INFO", "/")) or "/"
        # WSGI hands PATH_INFO as latin-1 decoded bytes.
        path = raw_path.encode("latin-1", errors="replace").decode("utf-8", errors="replace")
        query = _first(
            parse_qs(
                str(environ.get("QUERY_STRING", "")), keep_blank_values=True, max_num_fields=100
            )
        )
        form: dict[str, str] = {}
        if method == "POST":
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = 0
            if length > MAX_BODY:
                raise BodyTooLarge()
            body = environ["wsgi.input"].read(length) if length > 0 else b""
            ctype = str(environ.get("CONTENT_TYPE", "")).split(";", 1)[0].strip().lower()
            if ctype in ("application/x-www-form-urlencoded", ""):
                form = _first(
                    parse_qs(
                        body.decode("utf-8", errors="replace"),
                        keep_blank_values=True,
                        max_num_fields=100,
                    )
                )
        cookies: dict[str, str] = {}
        try:
            jar: SimpleCookie = SimpleCookie()
            jar.load(str(environ.get("HTTP_COOKIE", "")))
            cookies = {name: morsel.value for name, morsel in jar.items()}
        except CookieError:
            cookies = {}
        return cls(
            environ=environ,
            method=method,
            path=path,
            query=query,
            form=form,
            cookies=cookies,
            remote_addr=str(environ.get("REMOTE_ADDR", "")),
        )

    def header(self, name: str) -> str | None:
        value = self.environ.get("HTTP_" + name.upper().replace("-", "_"))
        return str(value) if value is not None else None

    def require_user(self) -> User:
        assert self.user is not None, "route without a user"
        return self.user

    def flash(self, kind: str, text: str) -> None:
        """A message shown once on the next page this session sees."""
        if self.session is not None:
            self.session.flash.append((kind, text))


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def status_line(self) -> str:
        return f"{self.status} {REASONS.get(self.status, 'Unknown')}"


def redirect(location: str, status: int = 303) -> Response:
    return Response(status=status, headers=[("Location", location)], content_type="text/plain")


def cookie(
    name: str,
    value: str,
    *,
    path: str = "/",
    secure: bool = False,
    max_age: int | None = None,
) -> tuple[str, str]:
    parts = [f"{name}={value}", f"Path={path}", "HttpOnly", "SameSite=Strict"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if secure:
        parts.append("Secure")
    return ("Set-Cookie", "; ".join(parts))


_PLAIN_PATH = re.compile(r"/[A-Za-z0-9/._~%!$&'()*+,;=:@?-]*")
"""A path (and query) of printable ASCII URL characters: no whitespace, control or backslash."""


def safe_next(value: str | None) -> str:
    """Where to go after logging in: a path on this console only (no open redirect)."""
    # A browser's URL parser drops tabs and newlines and reads a backslash as a slash, so
    # "/\t/evil.example" becomes "//evil.example": only a plain absolute path is taken.
    if not value or not _PLAIN_PATH.fullmatch(value) or "//" in value:
        return "/"
    return value
