"""Where dead letters are kept: the ``dead_letters`` table, its rows, filters, queries, counts.

Every dead letter lives in the state store (``CSCART_FM_STATE_URL``): one row per
dead-lettering, with a short integer ``id`` support can type, the body as it came (bytes),
every header as JSON (the broker's ``x-death`` history included), what went wrong (error
type, reason, what to do, attempts), where the message was going (original exchange and
routing key) and its life here: ``status`` is ``open`` → ``replayed`` (sent back, not yet seen
to succeed) → ``resolved`` (a message with the same key succeeded), or ``discarded`` (with the
reason and who, kept for good). Rows are never deleted.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import RowMapping

from consumers.registry import JOBS
from cscart_fm.core.observability import mask_email
from cscart_fm.core.state import Component, StateStore, UtcDateTime, as_utc, metadata, utcnow
from cscart_fm.core.topology import EVENTS_EXCHANGE
from cscart_fm.support.dead_letters.masking import mask_payload, scrub

log = structlog.get_logger(__name__)

OPEN, REPLAYED, DISCARDED, RESOLVED = "open", "replayed", "discarded", "resolved"
STATUSES: tuple[str, ...] = (OPEN, REPLAYED, DISCARDED, RESOLVED)
UNSETTLED: tuple[str, ...] = (OPEN, REPLAYED)
"""Still waiting for someone (or a later success): what may be discarded or resolved."""

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
    """Create the table when a store was opened without this component."""
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


def peek(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None (not JSON, or not an object)."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


class NoDestination(Exception):
    """The dead letter is not one of its job's events: there is nowhere to replay it."""


def destination(consumer: str, body: bytes) -> tuple[str, str]:
    """Where a replay of this body goes: its job's work exchange, with the routing key of
    the event type the body names when that is one of the job's events. Never a header's
    say: headers travel with a message and anyone who can publish can write them."""
    try:
        job = JOBS.named(consumer)
    except KeyError:
        raise NoDestination(f"{consumer!r} is not a job of this service") from None
    document = peek(body)
    kind = document.get("type") if document is not None else None
    if not isinstance(kind, str) or kind not in job.event_types:
        shown = repr(kind[:40]) if isinstance(kind, str) else "none"
        raise NoDestination(
            f"its body is not one of {consumer}'s events (type {shown}; {consumer} reads "
            f"{', '.join(job.event_types)})"
        )
    return EVENTS_EXCHANGE, kind


HEADERS_HIDDEN = {
    "(hidden)": "the clients file could not be read, so the API keys a header may hold cannot "
    "be masked: set CSCART_FM_CLIENTS to see the headers"
}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


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
            values[name] = as_utc(values[name])
        values["body"] = bytes(values["body"])
        return cls(**values)

    @property
    def goes_to(self) -> str:
        """Where a replay sends it, or why it cannot be replayed (from its job, never from its
        headers: ``destination``)."""
        try:
            exchange, routing_key = destination(self.consumer, self.body)
        except NoDestination as exc:
            return f"nowhere: {exc}"
        return f"{exchange} / {routing_key}"

    @property
    def x_death(self) -> list[dict[str, Any]]:
        deaths = self.headers.get("x-death") or []
        return [d for d in deaths if isinstance(d, dict)]

    @property
    def event_type(self) -> str | None:
        if self.message_schema:
            return self.message_schema.split("/", 1)[0]
        document = peek(self.body)
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
            "reason": scrub(self.reason, reveal=False),
            "status": self.status,
            "attempts": self.attempts,
            "replay_count": self.replay_count,
            "message_id": self.message_id,
        }

    def details(self, *, reveal: bool = False, secrets_known: bool = True) -> dict[str, Any]:
        """The show view: everything support may need, personal data masked unless asked,
        registered secrets always hidden. ``secrets_known`` False (the clients file, and so
        the API keys, could not be loaded): the headers are not shown at all, as a store's
        error text in them may hold a key no one could mask."""
        def text(value: str | None) -> str | None:
            return value if value is None else scrub(value, reveal=reveal)

        return {
            **self.summary(),
            "reason": text(self.reason),
            "what_happened": self.what_happened,
            "action": text(self.action),
            "message_schema": self.message_schema,
            "original_exchange": self.original_exchange,
            "original_routing_key": self.original_routing_key,
            "goes_to": self.goes_to,
            "key": self.key,
            "collected_at": self.collected_at.isoformat(),
            "previous_replays": self.previous_replays,
            "replay_of": self.replay_of,
            "last_replayed_at": _iso(self.last_replayed_at),
            "discard_reason": text(self.discard_reason),
            "discarded_by": self.discarded_by,
            "discarded_at": _iso(self.discarded_at),
            "resolved_at": _iso(self.resolved_at),
            "resolved_by": self.resolved_by,
            "x_death": scrub(self.x_death, reveal=reveal),
            "headers": scrub(self.headers, reveal=reveal) if secrets_known else HEADERS_HIDDEN,
            "properties": scrub(self.properties, reveal=reveal),
            "payload": scrub(self.payload(reveal=reveal), reveal=True),
        }


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

    def describe(self) -> str:
        """In words, for the audit log: ``open, client ACME, type not-found``."""
        statuses = "/".join(self.statuses) if self.statuses else "any status"
        parts = [
            f"{name} {value}"
            for name, value in (
                ("consumer", self.consumer),
                ("client", self.client_id),
                ("type", self.error_type),
                ("since", _iso(self.since)),
                ("until", _iso(self.until)),
            )
            if value
        ]
        if not parts:
            return f"every {statuses} dead letter"
        return ", ".join([statuses, *parts])


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


def find_ids(store: StateStore, where: Filter, *, limit: int | None = None) -> list[int]:
    """The ids that match, oldest first (no rows loaded)."""
    ensure_table(store)
    c = dead_letters.c
    query = sa.select(c.id).where(*where.where()).order_by(c.id.asc())
    if limit is not None:
        query = query.limit(limit)
    with store.engine.connect() as conn:
        return [int(letter_id) for letter_id in conn.execute(query).scalars()]


def get(store: StateStore, letter_id: int) -> DeadLetter | None:
    found = find(store, Filter(ids=[letter_id]))
    return found[0] if found else None


_SUMMARY = (
    dead_letters.c.id,
    dead_letters.c.dead_lettered_at,
    dead_letters.c.consumer,
    dead_letters.c.client_id,
    dead_letters.c.error_type,
    dead_letters.c.reason,
    dead_letters.c.attempts,
    dead_letters.c.status,
)


def summaries(
    store: StateStore,
    where: Filter,
    *,
    offset: int = 0,
    limit: int | None = None,
    newest_first: bool = True,
) -> list[dict[str, Any]]:
    """Rows of a list: no bodies or headers (a stock snapshot can be megabytes); the reason
    e-mail-masked."""
    ensure_table(store)
    c = dead_letters.c
    order = c.id.desc() if newest_first else c.id.asc()
    query = sa.select(*_SUMMARY).where(*where.where()).order_by(order).offset(offset)
    if limit is not None:
        query = query.limit(limit)
    with store.engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    return [
        {
            **dict(row),
            "dead_lettered_at": as_utc(row["dead_lettered_at"]),
            "reason": mask_email(row["reason"]),
        }
        for row in rows
    ]


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
                "oldest": _iso(as_utc(oldest)),
            }
            for consumer, error_type, n, oldest in open_rows
        ],
        "open_by_client": by_client,
    }


def discard(store: StateStore, ids: Sequence[int], *, reason: str, by: str) -> list[int]:
    """Mark dead letters discarded, keeping why and who; return the ids changed.

    Resolved and already discarded ones are left as they are. Who may discard what, and the
    audit, are the desk's (``desk.DeadLetterDesk.discard``)."""
    if not reason.strip():
        raise ValueError("a reason is required to discard a dead letter")
    ensure_table(store)
    c = dead_letters.c
    with store.transaction() as conn:
        changed = [
            int(row[0])
            for row in conn.execute(
                sa.update(dead_letters)
                .where(c.id.in_(list(ids)), c.status.in_(list(UNSETTLED)))
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


def iter_ids(values: Iterable[str]) -> Iterator[int]:
    """Ids as support types them (``12`` or ``#12``); ValueError naming a bad one."""
    for value in values:
        text = value.strip().lstrip("#")
        if not text.isdigit():
            raise ValueError(f"{value!r} is not a dead letter id (a number, as in the list)")
        yield int(text)
