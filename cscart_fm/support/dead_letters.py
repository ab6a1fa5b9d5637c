"""Dead letters support staff can work with: kept, listed, shown, replayed, discarded, resolved.

Storage
    Every dead letter lives in the state store (``CSCART_FM_STATE_URL``), table
    ``dead_letters``: one row per dead-lettering, with a short integer ``id`` support can type,
    the body as it came (bytes), every header as JSON (the broker's ``x-death`` history
    included), what went wrong (error type, reason, what to do, attempts), where the message
    was going (original exchange and routing key) and its life here: ``status`` is ``open``
    → ``replayed`` (sent back, not yet seen to succeed) → ``resolved`` (a message with the same
    key succeeded), or ``discarded`` (with the reason and who, kept for good). Rows are never
    deleted.

Collection (``collect``)
    Each ``cscart.<consumer>.dlq`` queue is drained with ``basic.get``: a batch is INSERTed
    (de-duplicated by a deterministic fingerprint of the message and of its dead-lettering),
    committed, and only THEN acknowledged. A crash between the commit and the ack leaves the
    message in the queue; collecting it again finds its fingerprint and inserts nothing. So a
    dead letter is always in the queue, in the store, or both — never nowhere, never twice.

Who collects
    Every ``cscart-fm dlq`` command collects first, so support never browses a stale list and
    the queue is never the only place a dead letter lives while somebody works on it. If the
    broker cannot be reached the commands say so and work on what is stored.
    ``cscart-fm dlq collect --every SECONDS`` keeps collecting (a small Deployment or CronJob),
    and ``DeadLetterCollector`` is the same loop as a thread for a process that runs consumers.
    Until collected, a dead letter waits in its durable quorum ``.dlq`` queue.

Replay (``replay``)
    The stored body is published with its original properties to the original exchange and
    routing key (taken from the runtime's ``cscart-original-*`` headers; for a dead letter
    the broker made itself, e.g. ``x-delivery-limit``, from the consumer's topology). Our own
    headers and the broker's ``x-`` headers are dropped (a replay starts with a fresh attempt
    counter); ``cscart-replay-count`` (the message's replays so far, ours: the broker ignores
    client-set ``x-`` headers since 3.13) and ``cscart-replay-of`` (this row's id) are added.
    The row is marked ``replayed`` only after the broker confirmed the publish; a publish that
    fails is retried on a new connection for up to ``patience`` seconds, then reported, and the
    row stays ``open``. A crash between the confirm and the update can replay a message twice
    — the consumers are idempotent — but nothing is ever lost. The topology is declared first
    so that a replay is never published to an exchange with no queue bound.

Resolve (``DeadLetterResolver``)
    Installed in ``Services.success_hooks``: after any message succeeds, one indexed UPDATE
    marks ``open``/``replayed`` rows with the same key ``resolved``. The key is derived from the
    body: ``shipment:<client>:<shipment_ref>``, ``order-poll:<client>``,
    ``stock:<client>:<event_id>``, ``order:<client>:<cart_order_id>``. A dead letter still
    waiting uncollected in its queue when its key succeeds is collected as ``open`` later: keep
    a collector running to make that window short.

Personal data
    Shoppers' names, e-mails, phones and addresses (order payloads) are masked in every view
    unless ``reveal=True`` (``cscart-fm dlq show --reveal``); reasons are e-mail-masked too.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
import structlog
from amqp.exceptions import AMQPError
from kombu import Connection
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy.engine import Connection as DbConnection
from sqlalchemy.engine import RowMapping

from consumers.registry import JOBS
from cscart_fm.core.broker import Publisher, connect
from cscart_fm.core.errors import BridgeError
from cscart_fm.core.jobs import Registry
from cscart_fm.core.metrics import DEAD_LETTERS_OPEN
from cscart_fm.core.observability import mask_email, redact_text
from cscart_fm.core.runtime import Middleware
from cscart_fm.core.state import Component, StateStore, UtcDateTime, metadata, utcnow
from cscart_fm.core.topology import DEFAULT_RETRY_DELAYS, DELIVERY_LIMIT, EVENTS_EXCHANGE
from schemas.messages import Message

log = structlog.get_logger(__name__)

OPEN, REPLAYED, DISCARDED, RESOLVED = "open", "replayed", "discarded", "resolved"
STATUSES: tuple[str, ...] = (OPEN, REPLAYED, DISCARDED, RESOLVED)

REPLAY_COUNT_HEADER = "cscart-replay-count"
"""How many times this message was replayed from the dead-letter store, over its whole life."""
REPLAY_OF_HEADER = "cscart-replay-of"
"""The id of the dead letter a replayed message came from."""

REPLAYED_PROPERTIES = (
    "content_type",
    "content_encoding",
    "message_id",
    "correlation_id",
    "type",
    "app_id",
    "priority",
    "reply_to",
)
"""Properties a replay carries over (``expiration`` and ``user_id`` are not: a replay must
neither expire on its way nor be refused for another user's name)."""

dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("fingerprint", sa.String(64), nullable=False, unique=True),
    sa.Column("consumer", sa.String(64), nullable=False),
    sa.Column("client_id", sa.String(200), nullable=True),
    sa.Column("error_type", sa.String(64), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("message_id", sa.String(200), nullable=True),
    sa.Column("message_schema", sa.String(100), nullable=True),
    sa.Column("original_exchange", sa.String(255), nullable=False),
    sa.Column("original_routing_key", sa.String(255), nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("properties", sa.JSON, nullable=False),
    sa.Column("headers", sa.JSON, nullable=False),
    sa.Column("key", sa.String(300), nullable=True),
    sa.Column("previous_replays", sa.Integer, nullable=False, default=0),
    sa.Column("replay_of", sa.Integer, nullable=True),
    sa.Column("dead_lettered_at", UtcDateTime(), nullable=False),
    sa.Column("collected_at", UtcDateTime(), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, default=OPEN),
    sa.Column("replay_count", sa.Integer, nullable=False, default=0),
    sa.Column("last_replayed_at", UtcDateTime(), nullable=True),
    sa.Column("discard_reason", sa.Text, nullable=True),
    sa.Column("discarded_by", sa.String(200), nullable=True),
    sa.Column("discarded_at", UtcDateTime(), nullable=True),
    sa.Column("resolved_at", UtcDateTime(), nullable=True),
    sa.Column("resolved_by", sa.String(200), nullable=True),
    sa.Index("ix_dead_letters_key_status", "key", "status"),
    sa.Index("ix_dead_letters_status_dead_lettered_at", "status", "dead_lettered_at"),
)

COMPONENT = Component("dead-letters", (dead_letters,))

_table_lock = threading.Lock()
_tables_ready: set[int] = set()


def ensure_table(store: StateStore) -> None:
    """Create the table when a store was opened before this module was imported."""
    with _table_lock:
        if id(store) in _tables_ready:
            return
        for attempt in range(3):
            try:
                with store.transaction() as conn:
                    dead_letters.create(conn, checkfirst=True)
                break
            except sa.exc.SQLAlchemyError:
                # Two replicas creating it at once: the loser finds it made on the next try.
                if attempt == 2:
                    raise
                time.sleep(0.2)
        _tables_ready.add(id(store))


# --- what a dead letter says ------------------------------------------------------------------

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

ERROR_TITLES: dict[str, str] = {
    "invalid-message": "the message does not follow the FM contract",
    "unknown-client": "the message names a client that is not in the clients file",
    "not-found": "the order or product is not in the store",
    "store-mismatch": "the message and the store disagree",
    "store-refused": "the store refused the request as invalid",
    "store-unauthorized": "the store refused the API credentials",
    "store-forbidden": "the API user may not do this in the store",
    "store-unreachable": "the store did not answer",
    "store-outcome-unknown": "a write to the store timed out",
    "rate-limited": "the store kept rate limiting us",
    "bad-response": "the store answered something that is not the CS-Cart API",
    "internal-error": "an unexpected error in cscart-fm",
    "busy": "another replica kept the client busy",
    "delivery-limit": "the message kept stopping the consumer",
}


def key_of_document(document: Any) -> str | None:
    """The resolve key of a (possibly invalid) message body, as its job declares it."""
    return JOBS.dead_letter_key(document)


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


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    return None


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _peek(body: bytes) -> Mapping[str, Any] | None:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


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
    document = _peek(body)
    deaths = [d for d in headers.get("x-death") or [] if isinstance(d, Mapping)]
    topology = JOBS.named(consumer).topology()
    if "cscart-error-type" in headers:  # dead-lettered by the runtime, with its reasons
        error_type = str(headers["cscart-error-type"])[:64]
        reason = str(headers.get("cscart-reason") or "")
        action = str(headers.get("cscart-action") or "")
        attempts = _int(headers.get("cscart-attempts"), 1)
        consumer = str(headers.get("cscart-consumer") or consumer)[:64]
        exchange = str(headers.get("cscart-original-exchange") or EVENTS_EXCHANGE)
        routing_key = str(headers.get("cscart-original-routing-key") or topology.routing_key)
        client_id = str(headers.get("cscart-client-id") or "") or None
        when = _parse_time(headers.get("cscart-dead-lettered-at"))
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
        attempts = _int(headers.get("cscart-attempt"), 1)
        if code == "delivery_limit":
            # The broker resets x-delivery-count when it dead-letters; the limit is ours.
            reason = f"{reason} (more than {DELIVERY_LIMIT} deliveries)"
            attempts = max(attempts, DELIVERY_LIMIT + 1)
        exchange, routing_key = EVENTS_EXCHANGE, topology.routing_key
        client_id = None
        when = _parse_time(deaths[0].get("time")) if deaths else None
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


# --- collection ---------------------------------------------------------------------------------


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
        return body.encode(message.content_encoding or "utf-8", errors="surrogateescape")
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


# --- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    id: int
    consumer: str
    client_id: str | None
    error_type: str
    reason: str
    action: str
    attempts: int
    message_id: str | None
    message_schema: str | None
    original_exchange: str
    original_routing_key: str
    body: bytes
    properties: dict[str, Any]
    headers: dict[str, Any]
    key: str | None
    previous_replays: int
    replay_of: int | None
    dead_lettered_at: datetime
    collected_at: datetime
    status: str
    replay_count: int
    last_replayed_at: datetime | None
    discard_reason: str | None
    discarded_by: str | None
    discarded_at: datetime | None
    resolved_at: datetime | None
    resolved_by: str | None

    @classmethod
    def from_row(cls, row: RowMapping) -> DeadLetter:
        values = {name: row[name] for name in cls.__dataclass_fields__}
        for name in (
            "dead_lettered_at",
            "collected_at",
            "last_replayed_at",
            "discarded_at",
            "resolved_at",
        ):
            values[name] = _parse_time(values[name])
        values["body"] = bytes(values["body"])
        return cls(**values)

    @property
    def x_death(self) -> list[dict[str, Any]]:
        deaths = self.headers.get("x-death") or []
        return [d for d in deaths if isinstance(d, dict)]

    @property
    def event_type(self) -> str | None:
        if self.message_schema:
            return self.message_schema.split("/", 1)[0]
        document = _peek(self.body)
        kind = document.get("type") if document else None
        return kind if isinstance(kind, str) else None

    @property
    def what_happened(self) -> str:
        title = ERROR_TITLES.get(self.error_type, self.error_type)
        kind = self.event_type or "unreadable"
        client = f" for client {self.client_id}" if self.client_id else ""
        return (
            f"The {self.consumer} consumer could not process this {kind} message{client}: {title}."
        )

    def payload(self, *, reveal: bool = False) -> Any:
        """The body as JSON when it is JSON (masked unless ``reveal``), else as text."""
        document = None
        try:
            document = json.loads(self.body)
        except (ValueError, RecursionError):
            pass
        if document is not None:
            return document if reveal else mask_payload(document)
        text = self.body.decode("utf-8", errors="replace")
        return text if reveal else mask_email(text)

    def summary(self) -> dict[str, Any]:
        """The list view (no payload); the reason is e-mail-masked."""
        return {
            "id": self.id,
            "dead_lettered_at": self.dead_lettered_at.isoformat(),
            "consumer": self.consumer,
            "client_id": self.client_id,
            "error_type": self.error_type,
            "reason": mask_email(self.reason),
            "status": self.status,
            "attempts": self.attempts,
            "replay_count": self.replay_count,
            "message_id": self.message_id,
        }

    def details(self, *, reveal: bool = False) -> dict[str, Any]:
        """The show view: everything support may need, personal data masked unless asked."""
        return {
            **self.summary(),
            "reason": self.reason if reveal else mask_email(self.reason),
            "what_happened": self.what_happened,
            "action": self.action,
            "message_schema": self.message_schema,
            "original_exchange": self.original_exchange,
            "original_routing_key": self.original_routing_key,
            "key": self.key,
            "collected_at": self.collected_at.isoformat(),
            "previous_replays": self.previous_replays,
            "replay_of": self.replay_of,
            "last_replayed_at": _iso(self.last_replayed_at),
            "discard_reason": self.discard_reason,
            "discarded_by": self.discarded_by,
            "discarded_at": _iso(self.discarded_at),
            "resolved_at": _iso(self.resolved_at),
            "resolved_by": self.resolved_by,
            "x_death": self.x_death,
            "headers": self.headers,
            "properties": self.properties,
            "payload": self.payload(reveal=reveal),
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


@dataclass(frozen=True)
class Filter:
    ids: Sequence[int] = ()
    consumer: str | None = None
    client_id: str | None = None
    error_type: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    statuses: Sequence[str] = ()

    @property
    def narrows(self) -> bool:
        """True when something other than the status narrows the selection."""
        return bool(
            self.ids
            or self.consumer
            or self.client_id
            or self.error_type
            or self.since
            or self.until
        )

    def where(self) -> list[Any]:
        c = dead_letters.c
        clauses: list[Any] = []
        if self.ids:
            clauses.append(c.id.in_(list(self.ids)))
        if self.consumer:
            clauses.append(c.consumer == self.consumer)
        if self.client_id:
            clauses.append(c.client_id == self.client_id)
        if self.error_type:
            clauses.append(c.error_type == self.error_type)
        if self.since:
            clauses.append(c.dead_lettered_at >= self.since.astimezone(UTC))
        if self.until:
            clauses.append(c.dead_lettered_at < self.until.astimezone(UTC))
        if self.statuses:
            clauses.append(c.status.in_(list(self.statuses)))
        return clauses


def find(
    store: StateStore, where: Filter, *, limit: int | None = None, newest_first: bool = False
) -> list[DeadLetter]:
    ensure_table(store)
    order = dead_letters.c.id.desc() if newest_first else dead_letters.c.id.asc()
    query = sa.select(dead_letters).where(*where.where()).order_by(order)
    if limit is not None:
        query = query.limit(limit)
    with store.engine.connect() as conn:
        return [DeadLetter.from_row(row) for row in conn.execute(query).mappings()]


def count(store: StateStore, where: Filter) -> int:
    ensure_table(store)
    query = sa.select(sa.func.count()).select_from(dead_letters).where(*where.where())
    with store.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def get(store: StateStore, letter_id: int) -> DeadLetter | None:
    found = find(store, Filter(ids=[letter_id]))
    return found[0] if found else None


def stats(store: StateStore) -> dict[str, Any]:
    """Counts by status; open ones by consumer and error type, and by client."""
    ensure_table(store)
    c = dead_letters.c
    with store.engine.connect() as conn:
        by_status = {
            status: int(n)
            for status, n in conn.execute(
                sa.select(c.status, sa.func.count()).group_by(c.status)
            ).all()
        }
        open_rows = conn.execute(
            sa.select(
                c.consumer,
                c.error_type,
                sa.func.count(),
                sa.func.min(c.dead_lettered_at),
            )
            .where(c.status == OPEN)
            .group_by(c.consumer, c.error_type)
            .order_by(c.consumer, c.error_type)
        ).all()
        by_client = {
            client or "(none)": int(n)
            for client, n in conn.execute(
                sa.select(c.client_id, sa.func.count())
                .where(c.status == OPEN)
                .group_by(c.client_id)
                .order_by(c.client_id)
            ).all()
        }
    return {
        "by_status": {status: by_status.get(status, 0) for status in STATUSES},
        "open_by_consumer_and_type": [
            {
                "consumer": consumer,
                "error_type": error_type,
                "count": int(n),
                "oldest": _iso(_parse_time(oldest)),
            }
            for consumer, error_type, n, oldest in open_rows
        ],
        "open_by_client": by_client,
    }


# --- acting -------------------------------------------------------------------------------------


class ReplayFailed(Exception):
    """The broker did not confirm a replay in time; the dead letter stays where it was."""


def replay_headers(letter: DeadLetter) -> dict[str, Any]:
    kept = {k: v for k, v in letter.headers.items() if not k.startswith(("x-", "cscart-"))}
    kept[REPLAY_COUNT_HEADER] = letter.previous_replays + letter.replay_count + 1
    kept[REPLAY_OF_HEADER] = letter.id
    return kept


def replay_properties(letter: DeadLetter) -> dict[str, Any]:
    props = {k: letter.properties[k] for k in REPLAYED_PROPERTIES if letter.properties.get(k)}
    props.setdefault("content_type", "application/json")
    props.setdefault("content_encoding", "utf-8")
    props["delivery_mode"] = 2
    props["headers"] = replay_headers(letter)
    return props


def declare_topology(broker_url: str, retry_delays: Sequence[int] | None = None) -> None:
    """Declare the contract's topology so nothing is published where no queue is bound.

    Failing to declare (e.g. a queue declared with other arguments by another release) is
    logged, not fatal: the publish itself still needs its confirm."""
    try:
        with Connection(broker_url, connect_timeout=10) as conn:
            conn.ensure_connection(max_retries=3)
            JOBS.topology(retry_delays or DEFAULT_RETRY_DELAYS).declare(conn)
    except Exception as exc:
        log.warning("could not declare the topology", error=f"{type(exc).__name__}: {exc}")


def replay_one(
    store: StateStore,
    publisher: Publisher,
    letter: DeadLetter,
    *,
    patience: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Publish the dead letter back where it was going, wait for the confirm, then mark it.

    A publish that fails (the broker restarting, a dropped connection) is tried again on a
    new connection until ``patience`` seconds passed; then ReplayFailed, and the row is left
    as it was."""
    deadline = time.monotonic() + patience
    wait = 0.5
    properties = replay_properties(letter)
    while True:
        try:
            publisher.publish_raw(
                letter.body,
                exchange=letter.original_exchange,
                routing_key=letter.original_routing_key,
                properties=properties,
            )
            break
        except Exception as exc:
            if time.monotonic() + wait > deadline:
                raise ReplayFailed(
                    f"dead letter {letter.id}: the broker did not confirm the replay "
                    f"({type(exc).__name__}: {exc}); it stays {letter.status}"
                ) from exc
            log.warning(
                "replay not confirmed; trying again",
                dead_letter=letter.id,
                error=f"{type(exc).__name__}: {exc}",
                retry_in=wait,
            )
            sleep(wait)
            wait = min(wait * 2, 5.0)
    c = dead_letters.c
    with store.transaction() as conn:
        conn.execute(
            sa.update(dead_letters)
            .where(c.id == letter.id)
            .values(
                # The consumer may already have succeeded and resolved it: keep that.
                status=sa.case((c.status == RESOLVED, RESOLVED), else_=REPLAYED),
                replay_count=c.replay_count + 1,
                last_replayed_at=utcnow(),
            )
        )
    log.info(
        "dead letter replayed",
        dead_letter=letter.id,
        consumer=letter.consumer,
        client_id=letter.client_id,
        exchange=letter.original_exchange,
        routing_key=letter.original_routing_key,
    )


@dataclass
class ReplayReport:
    replayed: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)


def replay(
    store: StateStore,
    publisher: Publisher,
    letters: Iterable[DeadLetter],
    *,
    patience: float = 60.0,
    on_replayed: Callable[[DeadLetter], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> ReplayReport:
    """Replay several, oldest first; stop at the first one the broker will not take."""
    report = ReplayReport()
    for letter in letters:
        try:
            replay_one(store, publisher, letter, patience=patience, sleep=sleep)
        except ReplayFailed as exc:
            report.failed[letter.id] = str(exc)
            break
        report.replayed.append(letter.id)
        if on_replayed is not None:
            on_replayed(letter)
    return report


def discard(store: StateStore, ids: Sequence[int], *, reason: str, by: str) -> list[int]:
    """Mark dead letters discarded, keeping why and who; return the ids changed.

    Resolved and already discarded ones are left as they are."""
    if not reason.strip():
        raise ValueError("a reason is required to discard a dead letter")
    ensure_table(store)
    c = dead_letters.c
    with store.transaction() as conn:
        changed = [
            int(row[0])
            for row in conn.execute(
                sa.update(dead_letters)
                .where(c.id.in_(list(ids)), c.status.in_([OPEN, REPLAYED]))
                .values(
                    status=DISCARDED,
                    discard_reason=reason.strip()[:2000],
                    discarded_by=by[:200],
                    discarded_at=utcnow(),
                )
                .returning(c.id)
            ).all()
        ]
    for letter_id in changed:
        log.info("dead letter discarded", dead_letter=letter_id, by=by)
    return sorted(changed)


def _unresolved(key: str) -> sa.ColumnElement[bool]:
    """The open and replayed dead letters with this key (the key and status index)."""
    c = dead_letters.c
    return sa.and_(c.key == key, c.status.in_([OPEN, REPLAYED]))


def resolve(conn: DbConnection, key: str, *, by: str | None = None) -> int:
    """Mark open and replayed dead letters with this key resolved (one indexed UPDATE)."""
    result = conn.execute(
        sa.update(dead_letters)
        .where(_unresolved(key))
        .values(status=RESOLVED, resolved_at=utcnow(), resolved_by=by)
    )
    return int(result.rowcount or 0)


class DeadLetterResolver(Middleware):
    """After a message succeeds, resolve the dead letters with its key (as its job declares)."""

    def __init__(self, store: StateStore, jobs: Registry[Any] = JOBS) -> None:
        self.store = store
        self.jobs = jobs
        self._ready = False

    def after_handle(self, consumer: str, event: Message, error: BridgeError | None) -> None:
        if error is None:
            self(consumer, event)

    def __call__(self, consumer: str, event: Message) -> None:
        key = self.jobs.dead_letter_key_of_event(consumer, event)
        if key is None:
            return
        if not self._ready:
            ensure_table(self.store)
            self._ready = True
        with self.store.engine.connect() as conn:
            # Almost every success has nothing to resolve: a read, not a write per message.
            open_ = conn.execute(
                sa.select(dead_letters.c.id).where(_unresolved(key)).limit(1)
            ).first()
        if open_ is None:
            return
        with self.store.transaction() as conn:
            resolved = resolve(conn, key, by=f"{consumer}:{event.event_id}"[:200])
        if resolved:
            log.info(
                "dead letters resolved by a later success",
                consumer=consumer,
                client_id=event.client_id,
                event_id=event.event_id,
                count=resolved,
            )


# --- masking ------------------------------------------------------------------------------------

_PERSONAL_SECTIONS = frozenset(
    {"customer", "ship_to", "bill_to", "shipping_address", "billing_address"}
)
_KEEP_IN_SECTIONS = frozenset({"country", "state"})
_FREE_TEXT = frozenset({"notes", "customer_notes", "comment"})


def _mask_name(text: str) -> str:
    return " ".join(f"{part[0]}***" for part in text.split() if part)


def _mask_field(name: str, value: Any) -> Any:
    if not isinstance(value, str) or not value:
        return value
    lowered = name.lower()
    if "email" in lowered:
        masked = mask_email(value)
        return masked if masked != value else "***"
    if "phone" in lowered:
        digits = [ch for ch in value if ch.isdigit()]
        return "***" + "".join(digits[-2:])
    if lowered in ("name", "firstname", "lastname", "company"):
        return _mask_name(value)
    return "***"


def mask_payload(document: Any, _key: str = "") -> Any:
    """A copy of a message body with shoppers' personal data masked (names to initials,
    e-mails to ``j***@example.com``, phones to their last two digits, addresses to ``***``);
    e-mail addresses anywhere else are masked too."""
    if isinstance(document, Mapping):
        masked: dict[str, Any] = {}
        for name, value in document.items():
            key = str(name)
            if key in _PERSONAL_SECTIONS and isinstance(value, Mapping):
                masked[key] = {
                    k: v if k in _KEEP_IN_SECTIONS else _mask_field(str(k), v)
                    for k, v in value.items()
                }
            elif key in _FREE_TEXT and isinstance(value, str) and value:
                masked[key] = "***"
            elif ("email" in key.lower() or "phone" in key.lower()) and isinstance(value, str):
                masked[key] = _mask_field(key, value)
            else:
                masked[key] = mask_payload(value, key)
        return masked
    if isinstance(document, list):
        return [mask_payload(item, _key) for item in document]
    if isinstance(document, str):
        return mask_email(document)
    return document


def iter_ids(values: Iterable[str]) -> Iterator[int]:
    """Ids as support types them (``12`` or ``#12``); ValueError naming a bad one."""
    for value in values:
        text = value.strip().lstrip("#")
        if not text.isdigit():
            raise ValueError(f"{value!r} is not a dead letter id (a number, as in the list)")
        yield int(text)
