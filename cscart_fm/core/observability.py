"""JSON logs with secrets and personal data redacted, and the metrics/health HTTP endpoint.

Every log line (ours through structlog, and libraries' through the stdlib) passes one
redaction step: registered secrets (API keys) and fields named like secrets become ``***``,
and e-mail addresses are masked, so neither a key nor a shopper's address reaches a log.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Callable, MutableMapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()
_SECRET_KEYS = re.compile(r"(api_?key|password|passwd|secret|authorization|token)", re.I)
_EMAIL = re.compile(r"([\w.%+-])[\w.%+-]*@([\w-]+(?:\.[\w-]+)*)")
"""An e-mail address, international ones and dotless hosts (``bob@localhost``) included."""


def register_secret(value: str) -> None:
    """Make sure this exact value is never written to a log (an API key, a password)."""
    if value and len(value) >= 4:
        with _SECRETS_LOCK:
            _SECRETS.add(value)


def mask_email(text: str) -> str:
    return _EMAIL.sub(lambda m: f"{m.group(1)}***@{m.group(2)}", text)


def hide_secrets(text: str) -> str:
    """The text with every registered secret replaced by ``***``."""
    with _SECRETS_LOCK:
        secrets = tuple(_SECRETS)
    # Longest first: a secret that is the start of another would leave that one's end shown.
    for secret in sorted(secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return text


def redact_text(text: str) -> str:
    return mask_email(hide_secrets(text))


def _redact_value(key: str, value: Any) -> Any:
    if _SECRET_KEYS.search(key):
        return "***"
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(key, v) for v in value]
    if isinstance(value, BaseException):
        return redact_text(f"{type(value).__name__}: {value}")
    return value


def redact_processor(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        event_dict[key] = _redact_value(key, event_dict[key])
    return event_dict


def _redact_rendered(renderer: Callable[..., Any]) -> Callable[..., Any]:
    # Tracebacks are rendered late; redact the final text too.
    def render(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> Any:
        rendered = renderer(logger, name, event_dict)
        return redact_text(rendered) if isinstance(rendered, str) else rendered

    return render


def configure_logging(level: str = "INFO", fmt: str = "json", stream: Any = None) -> None:
    """JSON lines on stderr (or ``console`` for people), stdlib loggers included."""
    renderer: Callable[..., Any] = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_processor,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_processor,
            _redact_rendered(renderer),
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries are chatty at INFO about every connection; keep their warnings.
    for noisy in ("amqp", "kombu", "urllib3", "sqlalchemy.engine"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


# --- /metrics, /healthz, /readyz -------------------------------------------------------------


class Health:
    """What /readyz reports: every registered check must pass."""

    def __init__(self) -> None:
        self._checks: dict[str, Callable[[], bool]] = {}
        self._lock = threading.Lock()

    def add(self, name: str, check: Callable[[], bool]) -> None:
        with self._lock:
            self._checks[name] = check

    def failing(self) -> list[str]:
        with self._lock:
            checks = list(self._checks.items())
        if not checks:
            return ["nothing running yet"]
        failing = []
        for name, check in checks:
            try:
                ok = check()
            except Exception:
                ok = False
            if not ok:
                failing.append(name)
        return failing


def serve_metrics(port: int, health: Health, host: str = "0.0.0.0") -> ThreadingHTTPServer:  # noqa: S104 - scraped from other pods
    """Serve /metrics, /healthz (the process answers) and /readyz (connected and consuming)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                # Liveness never depends on the broker or a store: restarting would not help.
                self._send(200, b"ok\n")
            elif path == "/readyz":
                failing = health.failing()
                if failing:
                    self._send(503, ("not ready: " + ", ".join(failing) + "\n").encode())
                else:
                    self._send(200, b"ready\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would drown the logs

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server
