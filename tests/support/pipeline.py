"""The whole pipeline for consumer tests: a store emulator, a clients file, the state store,
the real broker, and a consumer running in this process or as a `cscart-fm run` process."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from consumers.registry import JOBS
from consumers.services import Services
from cscart_fm.cli.wiring import middleware, open_state
from cscart_fm.core.broker import Publisher
from cscart_fm.core.clients import parse_clients
from cscart_fm.core.config import Environment
from cscart_fm.core.events import parse_event
from cscart_fm.core.runtime import ConsumerRuntime, Delivery, Handler

from .broker import drain, running

API_USER = "admin@example.com"
API_KEY = "test-api-key-7f3a9c1e55"
"""The store's API key in every test: tests grep logs, dead letters and metrics for it."""
KEY_ENV = "CSCART_FM_TEST_STORE_KEY"
REPO = Path(__file__).resolve().parents[2]


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def client_doc(store_url: str, client_id: str = "ACME", **sections: Any) -> dict[str, Any]:
    """One client of the clients file, pointing at the emulator; sections override parts,
    e.g. ``client_doc(url, orders={"countries": ["AU"]}, stock={"update_stock": True})``."""
    base: dict[str, Any] = {
        "client_id": client_id,
        "store_url": store_url,
        "api_user": API_USER,
        "api_key": "${" + KEY_ENV + "}",
        "user_id": 1,
        "orders": {
            "statuses": ["P"],
            "start_date": "01/01/2020",
            "timezone": "UTC",
            "prefix": "CS",
            "countries": [],
        },
        "tracking": {
            "update_tracking_number": True,
            "update_tracking_url": True,
            "shipped_status": "C",
            "partially_shipped_status": None,
        },
        "stock": {"update_stock": True, "quantity": "on_hand", "negative_as_zero": False},
        "limits": {"requests_per_second": 200, "concurrency": 4, "max_retry_wait": 0.5,
                   "read_timeout": 5},
    }
    return _merge(base, sections)


@dataclass
class PipelineServices(Services):
    """The services of a test process, with the environment it was made for."""

    env: Environment = field(default_factory=Environment)


def make_services(
    broker_url: str, state_url: str, clients: list[dict[str, Any]]
) -> PipelineServices:
    env = Environment(
        broker_url=broker_url, state_url=state_url, retry_delays=(1,), max_attempts=3
    )
    parsed = parse_clients({"clients": clients}, {KEY_ENV: API_KEY})
    return PipelineServices(
        clients=parsed,
        state=open_state(state_url),
        publisher=Publisher(broker_url),
        env=env,
    )


@contextmanager
def consumer(
    services: PipelineServices, name: str, **options: Any
) -> Iterator[ConsumerRuntime[Any]]:
    """The named job's consumer in this process on the real broker (retry delay 1 s), with
    the middleware ``cscart-fm run`` gives it."""
    job = JOBS.named(name)
    options.setdefault("max_attempts", services.env.max_attempts)
    options.setdefault("middleware", middleware(job, services))
    with running(job.build(services), services.env.broker_url, job=job,
                 delays=services.env.retry_delays, **options) as runtime:
        yield runtime


def deliver(
    handler: Handler[Any], body: dict[str, Any], attempt: int = 1, *, redelivered: bool = False
) -> None:
    """``body`` handed to a job's handler directly, validated as the runtime does: one call
    is one attempt (a retry's is 2, 3, ...). For rules that need no broker at all; an error
    the handler raises is the one the runtime would retry or dead-letter on."""
    message_id = str(body.get("event_id", ""))
    handler.handle(parse_event(body), Delivery(message_id, attempt, redelivered))


def imported_orders(broker_url: str) -> list[dict[str, Any]]:
    """Take every order.imported message FM would receive (bodies, with message_id)."""
    bodies = []
    for message in drain(broker_url, "fm.orders.imported"):
        body = json.loads(message.body)
        body["_message_id"] = message.properties.get("message_id")
        body["_schema"] = (message.headers or {}).get("schema")
        bodies.append(body)
    return bodies


def write_clients_file(path: Path, clients: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"clients": clients}, sort_keys=False))
    return path


def cli_env(
    broker_url: str, state_url: str, clients_file: Path, **extra: str
) -> dict[str, str]:
    """The environment of a `cscart-fm run` process for tests (contract §4 names)."""
    env = {
        **os.environ,
        "CSCART_FM_BROKER_URL": broker_url,
        "CSCART_FM_CLIENTS": str(clients_file),
        "CSCART_FM_STATE_URL": state_url,
        "CSCART_FM_RETRY_DELAYS": "1",
        "CSCART_FM_MAX_ATTEMPTS": "3",
        "CSCART_FM_HEARTBEAT": "10",
        KEY_ENV: API_KEY,
    }
    env.update(extra)
    return env


def start_cli(args: list[str], env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    """``cscart-fm ARGS`` as a separate process, its logs to ``log_file``."""
    handle = open(log_file, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "cscart_fm.cli", *args],
        cwd=REPO,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
