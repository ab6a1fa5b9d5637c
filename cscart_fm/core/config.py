"""The service's environment (contract §4), read once at start.

The four contract variables keep their names; the rest are this project's tuning knobs.
A wrong value stops the service at start with the variable named.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cscart_fm.core.errors import SettingsError
from cscart_fm.core.jobs import Job, Tuning
from cscart_fm.core.state import DEFAULT_STATE_URL
from cscart_fm.core.topology import DEFAULT_RETRY_DELAYS

DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672//"


@dataclass(frozen=True)
class Environment:
    broker_url: str = DEFAULT_BROKER_URL
    clients_path: str = "clients.yaml"
    state_url: str = DEFAULT_STATE_URL
    metrics_port: int | None = None
    heartbeat: int = 30
    retry_delays: tuple[int, ...] = DEFAULT_RETRY_DELAYS
    max_attempts: int = 5
    shutdown_grace: float = 30.0
    log_level: str = "INFO"
    log_format: str = "json"
    dead_letter_interval: int = 30

    def tuning(self, job: Job[Any], environ: Mapping[str, str] | None = None) -> Tuning:
        """``CSCART_FM_<JOB>_PREFETCH`` / ``_CONCURRENCY`` override the job's defaults."""
        environ = os.environ if environ is None else environ
        base = job.tuning
        stem = "CSCART_FM_" + job.name.upper().replace("-", "_")
        return Tuning(
            prefetch=_int(environ, f"{stem}_PREFETCH", base.prefetch, minimum=1),
            concurrency=_int(environ, f"{stem}_CONCURRENCY", base.concurrency, minimum=1),
        )


def _int(environ: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}: expected a whole number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name}: must be at least {minimum}, got {value}")
    return value


def read_environment(environ: Mapping[str, str] | None = None) -> Environment:
    environ = os.environ if environ is None else environ
    port_raw = environ.get("CSCART_FM_METRICS_PORT", "").strip()
    metrics_port = _int(environ, "CSCART_FM_METRICS_PORT", 0) if port_raw else None
    delays_raw = environ.get("CSCART_FM_RETRY_DELAYS", "").strip()
    if delays_raw:
        try:
            delays = tuple(int(part) for part in delays_raw.split(","))
        except ValueError:
            raise SettingsError(
                f"CSCART_FM_RETRY_DELAYS: expected seconds such as 5,30,120, got {delays_raw!r}"
            ) from None
        if any(d <= 0 for d in delays):
            raise SettingsError("CSCART_FM_RETRY_DELAYS: every delay must be positive")
    else:
        delays = DEFAULT_RETRY_DELAYS
    log_format = environ.get("CSCART_FM_LOG_FORMAT", "json").strip().lower() or "json"
    if log_format not in ("json", "console"):
        raise SettingsError(f"CSCART_FM_LOG_FORMAT: expected json or console, got {log_format!r}")
    grace_raw = environ.get("CSCART_FM_SHUTDOWN_GRACE", "").strip()
    try:
        grace = float(grace_raw) if grace_raw else 30.0
    except ValueError:
        raise SettingsError(
            f"CSCART_FM_SHUTDOWN_GRACE: expected seconds, got {grace_raw!r}"
        ) from None
    return Environment(
        broker_url=environ.get("CSCART_FM_BROKER_URL", "").strip() or DEFAULT_BROKER_URL,
        clients_path=environ.get("CSCART_FM_CLIENTS", "").strip() or "clients.yaml",
        state_url=environ.get("CSCART_FM_STATE_URL", "").strip() or DEFAULT_STATE_URL,
        metrics_port=metrics_port,
        heartbeat=_int(environ, "CSCART_FM_HEARTBEAT", 30, minimum=0),
        retry_delays=delays,
        max_attempts=_int(environ, "CSCART_FM_MAX_ATTEMPTS", 5, minimum=1),
        shutdown_grace=grace,
        log_level=environ.get("CSCART_FM_LOG_LEVEL", "INFO").strip().upper() or "INFO",
        log_format=log_format,
        dead_letter_interval=_int(environ, "CSCART_FM_DEAD_LETTER_INTERVAL", 30, minimum=1),
    )


def redact_url(url: str) -> str:
    """A broker or database URL fit for a log line: the password replaced, in each URL of a
    failover list (``amqp://…//;amqp://…//``). A URL that does not parse cleanly (a password
    with ``#`` or ``/`` in it) loses everything between ``://`` and its last ``@``."""
    return ";".join(_redact_one(part) for part in url.split(";"))


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, after = rest.rpartition("@")
    try:
        parts = urlsplit(url)
        netloc, username = parts.netloc, parts.username
    except ValueError:
        netloc, username = "", None
    if "@" in netloc and netloc.rpartition("@")[0] == userinfo and username is not None:
        user = userinfo.partition(":")[0]
        return f"{scheme}://{user}:***@{after}" if ":" in userinfo else url
    return f"{scheme}://***@{after}"
