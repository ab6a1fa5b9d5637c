"""Collecting dead letters: the ``.dlq`` queues moved into the state store, never lost, never twice.

Each ``cscart.<consumer>.dlq`` queue is drained with ``basic.get``: a batch is INSERTed
(de-duplicated by a deterministic fingerprint of the message and of its dead-lettering),
committed, and only THEN acknowledged. A crash between the commit and the ack leaves the
message in the queue; collecting it again finds its fingerprint and inserts nothing. So a
dead letter is always in the queue, in the store, or both — never nowhere, never twice.

Who collects: the desk before anything support does (every ``cscart-fm dlq`` command, the
console's pages and actions); ``cscart-fm dlq collect --every SECONDS`` (a small Deployment
or CronJob); and ``DeadLetterCollector``, the same loop as a thread for a process that runs
consumers. Until collected, a dead letter waits in its durable quorum ``.dlq`` queue.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
import structlog
from amqp.exceptions import AMQPError
from kombu import Connection
from kombu.exceptions import OperationalError as KombuOperationalError

from consumers.registry import JOBS
from cscart_fm.core.broker import connect
from cscart_fm.core.metrics import DEAD_LETTERS_OPEN
from cscart_fm.core.observability import redact_text
from cscart_fm.core.state import StateStore, as_utc, utcnow
from cscart_fm.core.topology import DELIVERY_LIMIT
from cscart_fm.support.dead_letters.replay import REPLAY_COUNT_HEADER, REPLAY_OF_HEADER
from cscart_fm.support.dead_letters.resolve import key_of_document
from cscart_fm.support.dead_letters.store import (
    OPEN,
    NoDestination,
    dead_letters,
    destination,
    ensure_table,
    peek,
)

log = structlog.get_logger(__name__)

_BROKER_REASONS: dict[str, tuple[str, str, str]] = {
    "delivery_limit": (
        "delivery-limit",
        "The broker handed this message to the consumer too many times without it ever "
        "finishing (the consumer crashed, was killed or lost its connection each time).",
        "A message that keeps stopping the consumer: hand it and the consumer's logs to the "
        "developers. Replay it once they fixed the cause; discard it if FM sent a corrected one.",
    ),
    "rejected": (
        "rejected",
        "A consumer rejected this message without saying why.",
        "Hand it to the developers with the consumer's logs, then replay it once fixed.",
    ),
    "expired": (
        "expired",
        "The message waited in a queue longer than its time to live.",
        "Check the consumer was running; replay it.",
    ),
    "maxlen": (
        "queue-full",
        "The queue was full, so the broker pushed this message out.",
        "Check the consumer keeps up (is it running?), then replay it.",
    ),
}


def _jsonable(value: Any) -> Any:
    """Header and property values as JSON (AMQP tables hold timestamps, bytes, decimals)."""
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return aware.astimezone(UTC).isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def fingerprint(
    queue: str, body: bytes, headers: Mapping[str, Any], properties: Mapping[str, Any]
) -> str:
    """The same for every delivery of one dead-lettered message, different for each
    dead-lettering (the runtime stamps time, attempts and replay count; the broker its
    ``x-death`` entries). Redelivery headers such as ``x-delivery-count`` are left out."""
    deaths = headers.get("x-death") or []
    summary = [
        queue,
        properties.get("message_id"),
        hashlib.sha256(body).hexdigest(),
        *(
            _jsonable(headers.get(name))
            for name in (
                "cscart-error-type",
                "cscart-dead-lettered-at",
                "cscart-attempts",
                REPLAY_COUNT_HEADER,
                REPLAY_OF_HEADER,
                "x-first-death-reason",
                "x-first-death-queue",
            )
        ),
        [
            _jsonable([d.get("queue"), d.get("reason"), d.get("count"), d.get("time")])
            for d in deaths
            if isinstance(d, Mapping)
        ],
    ]
    return hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()


def record_of(
    consumer: str,
    body: bytes,
    headers: Mapping[str, Any] | None,
    properties: Mapping[str, Any] | None,
    *,
    collected_at: datetime | None = None,
) -> dict[str, Any]:
    """The row for one message taken from ``cscart.<consumer>.dlq``."""
    headers = dict(headers or {})
    props = {k: v for k, v in (properties or {}).items() if k != "application_headers"}
    collected_at = collected_at or utcnow()
    document = peek(body)
    deaths = [d for d in headers.get("x-death") or [] if isinstance(d, Mapping)]
    topology = JOBS.named(consumer).topology()
    # The broker's own dead-lettering (a reject, the delivery limit) is its newest x-death, on
    # the work queue: then any cscart-* header came with the message, so it is not believed.
    by_broker = bool(deaths) and deaths[0].get("queue") == topology.queue_name
    if "cscart-error-type" in headers and not by_broker:  # the runtime's, with its reasons
        error_type = str(headers["cscart-error-type"])[:64]
        reason = str(headers.get("cscart-reason") or "")
        action = str(headers.get("cscart-action") or "")
        attempts = _int(headers.get("cscart-attempts"), 1)
        client_id = str(headers.get("cscart-client-id") or "") or None
        when = as_utc(headers.get("cscart-dead-lettered-at"))
    else:  # dead-lettered by the broker itself (x-delivery-limit, ...)
        code = str(
            (deaths[0].get("reason") if deaths else None)
            or headers.get("x-first-death-reason")
            or "unknown"
        )
        error_type, reason, action = _BROKER_REASONS.get(
            code,
            (
                f"broker-{code}"[:64],
                f"The broker dead-lettered this message ({code}).",
                "Hand it to the developers, then replay it once fixed.",
            ),
        )
        attempts = _int(headers.get("cscart-attempt"), 1) if not by_broker else 1
        if code == "delivery_limit":
            # The broker resets x-delivery-count when it dead-letters; the limit is ours.
            reason = f"{reason} (more than {DELIVERY_LIMIT} deliveries)"
            attempts = max(attempts, DELIVERY_LIMIT + 1)
        client_id = None
        when = as_utc(deaths[0].get("time")) if deaths else None
    # Where a replay would go comes from the job, never from a header (see replay.destination).
    try:
        exchange, routing_key = destination(consumer, bytes(body))
    except NoDestination:
        exchange, routing_key = "", ""
    if client_id is None and document is not None:
        value = document.get("client_id")
        client_id = value if isinstance(value, str) and value else None
    return {
        "fingerprint": fingerprint(topology.dead_letter_queue_name, body, headers, props),
        "consumer": consumer,
        "client_id": client_id[:200] if client_id else None,
        "error_type": error_type,
        "reason": redact_text(reason)[:4000],
        "action": action[:4000],
        "attempts": attempts,
        "message_id": str(props["message_id"])[:200] if props.get("message_id") else None,
        "message_schema": str(headers["schema"])[:100] if headers.get("schema") else None,
        "original_exchange": exchange[:255],
        "original_routing_key": routing_key[:255],
        "body": bytes(body),
        "properties": _jsonable(props),
        "headers": _jsonable(headers),
        "key": key_of_document(document),
        "previous_replays": _int(headers.get(REPLAY_COUNT_HEADER), 0),
        "replay_of": _int(headers.get(REPLAY_OF_HEADER), 0) or None,
        "dead_lettered_at": when or collected_at,
        "collected_at": collected_at,
        "status": OPEN,
        "replay_count": 0,
    }


@dataclass
class Collected:
    """What one collection found: new rows and copies already stored, by consumer."""

    new: dict[str, int] = field(default_factory=dict)
    already_stored: dict[str, int] = field(default_factory=dict)

    @property
    def total_new(self) -> int:
        return sum(self.new.values())


def collect(
    store: StateStore,
    broker_url: str,
    consumers: Iterable[str] | None = None,
    *,
    batch_size: int = 100,
    before_ack: Callable[[], None] | None = None,
) -> Collected:
    """Move every message of the consumers' ``.dlq`` queues into the store.

    Insert and commit first, acknowledge after: a crash in between leaves the message in its
    queue, and the next collection recognises it by its fingerprint. ``before_ack`` is a test
    seam for exactly that crash.
    """
    ensure_table(store)
    result = Collected()
    names = list(JOBS.names if consumers is None else consumers)
    for attempt in (1, 2):
        try:
            with connect(broker_url) as conn:
                conn.connect()
                for name in names:
                    _collect_queue(store, conn, name, batch_size, result, before_ack)
            return result
        except (AMQPError, KombuOperationalError) as exc:
            # On RabbitMQ 3.10 a freshly declared quorum queue may not be up yet: try once more.
            if attempt == 2:
                raise
            log.warning("collecting dead letters failed; trying again", error=str(exc))
            time.sleep(1.0)
    raise AssertionError("unreachable")


def _collect_queue(
    store: StateStore,
    conn: Connection,
    consumer: str,
    batch_size: int,
    result: Collected,
    before_ack: Callable[[], None] | None,
) -> None:
    queue = JOBS.named(consumer).topology().dead_letter_queue(conn.default_channel)
    queue.declare()
    while True:
        batch: list[Any] = []
        while len(batch) < batch_size:
            message = queue.get(no_ack=False)
            if message is None:
                break
            batch.append(message)
        if not batch:
            return
        now = utcnow()
        rows = [
            record_of(consumer, raw_body(m), m.headers, m.properties, collected_at=now)
            for m in batch
        ]
        new = 0
        with store.transaction() as db:
            for row in rows:
                new += store.insert_ignore(db, dead_letters, row)
        if before_ack is not None:
            before_ack()
        for message in batch:
            message.ack()
        result.new[consumer] = result.new.get(consumer, 0) + new
        if len(rows) - new:
            result.already_stored[consumer] = (
                result.already_stored.get(consumer, 0) + len(rows) - new
            )
        for row in rows:
            log.info(
                "dead letter collected",
                consumer=consumer,
                client_id=row["client_id"],
                error_type=row["error_type"],
                message_id=row["message_id"],
            )


def raw_body(message: Any) -> bytes:
    """The body's bytes: py-amqp decodes a body that names its content encoding."""
    body = message.body
    if isinstance(body, str):
        try:
            return body.encode(message.content_encoding or "utf-8", errors="surrogateescape")
        except (LookupError, UnicodeError):  # an encoding no codec knows ("binary", kombu's)
            return body.encode("utf-8", errors="surrogateescape")
    return bytes(body)


def export_open_count(store: StateStore) -> dict[tuple[str, str], int]:
    """Set ``cscart_fm_dead_letters_open`` from the store: what the alert watches, since
    collection empties the ``.dlq`` queues."""
    c = dead_letters.c
    with store.engine.connect() as db:
        rows = db.execute(
            sa.select(c.consumer, c.error_type, sa.func.count())
            .where(c.status == OPEN)
            .group_by(c.consumer, c.error_type)
        ).all()
    counts = {(str(consumer), str(error_type)): int(n) for consumer, error_type, n in rows}
    DEAD_LETTERS_OPEN.clear()
    for consumer in JOBS.names:  # a zero per consumer keeps the series (and the alert) alive
        DEAD_LETTERS_OPEN.labels(consumer, "none").set(0)
    for (consumer, error_type), n in counts.items():
        DEAD_LETTERS_OPEN.labels(consumer, error_type).set(n)
    return counts


class DeadLetterCollector:
    """Collects every ``interval`` seconds on its own thread until ``stop()``.

    For a process that runs consumers (``collector.start()`` after the topology is declared)
    or for ``cscart-fm dlq collect --every``. A failed round is logged and tried again.
    """

    def __init__(
        self,
        store: StateStore,
        broker_url: str,
        consumers: Iterable[str] | None = None,
        *,
        interval: float = 30.0,
    ) -> None:
        self.store = store
        self.broker_url = broker_url
        self.consumers = list(JOBS.names if consumers is None else consumers)
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        while not self._stop.is_set():
            self.round()
            self._stop.wait(self.interval)

    def round(self) -> Collected | None:
        try:
            found = collect(self.store, self.broker_url, self.consumers)
        except Exception as exc:
            log.warning("dead letter collection failed", error=f"{type(exc).__name__}: {exc}")
            return None
        if found.total_new:
            log.info("dead letters collected", new=found.new)
        try:
            export_open_count(self.store)
        except Exception as exc:
            log.warning("counting open dead letters failed", error=f"{type(exc).__name__}: {exc}")
        return found

    def start(self) -> DeadLetterCollector:
        self._thread = threading.Thread(target=self.run, name="dead-letter-collector", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
