"""A transactional outbox for the messages this service publishes to FM.

A message is *claimed* (a row with its key, its ``event_id`` and the exact body) in the job's
own transaction, published with publisher confirms, and recorded *published* (body cleared)
only once confirmed. A claim not recorded published — a crash between the claim and the
record — is published again by the next run from its stored body: the same ``event_id``, the
same bytes, which FM recognises as a copy. A claimed key is never claimed again.

How a job uses it:

1. Its table follows the outbox's columns (``outbox_table`` declares one: the scope
   ``client_id``, the key, ``event_id``, ``state``, ``payload``, ``claimed_at``,
   ``published_at`` and the job's own columns) and is described by an ``OutboxTable``; the
   job lists the table in its ``tables``.
2. A run makes ``Outbox(state, publisher, client_id, (its tables,))``, holding whatever makes
   it the scope's only publisher (order-poll: the client's poll lock), and first calls
   ``republish_claimed()``.
3. It makes its entries (``OutboxTable.entry(key, message, **columns)``), skipping keys
   already recorded (``known``), and publishes them a batch at a time through
   ``Outbox.pipeline()``: ``page(entries, write)`` waits for the confirms of the page before,
   then in one transaction records that page published, runs ``write`` (the job's own rows)
   and claims these entries, then publishes them without waiting; their confirms come back
   while the job prepares its next page. Leaving the block records the last page. A crash
   re-sends at most the page in flight. (Without pages: ``claim``, ``publish``,
   ``mark_published``; in a transaction of the job's: ``claim_in``.)

Several tables (e.g. a table of order changes beside the imported orders) can share one
outbox: claimed and recorded in the same transactions, published together.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from cscart_fm.core.broker import Confirmation, Outgoing, Publisher, contract_properties
from cscart_fm.core.errors import BridgeError
from cscart_fm.core.state import StateStore, UtcDateTime, metadata, utcnow
from cscart_fm.core.topology import ORDERS_EXCHANGE
from schemas.messages import ROUTING_KEYS, Message

log = structlog.get_logger(__name__)

CLAIMED, PUBLISHED = "claimed", "published"
REPUBLISH_CHUNK = 100
"""Claimed rows read, published and recorded at a time by ``republish_claimed``."""

Key = tuple[Any, ...]
"""The values of an outbox table's key columns (within a scope), in their order."""

_COLUMNS = ("event_id", "state", "payload", "claimed_at", "published_at")


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: a table is one object
class OutboxTable:
    """A table of messages to publish, keyed by (``scope``, ``*key``): its primary key.

    Besides the key it has the columns ``event_id``, ``state`` (claimed | published),
    ``payload`` (the exact body, kept until published: it may hold a shopper's address),
    ``claimed_at`` and ``published_at``, and whatever else the job keeps (``Entry.columns``).
    """

    table: sa.Table
    key: tuple[str, ...]
    noun: str = "messages"
    """What its messages are to a person ("orders"), in errors."""
    exchange: str = ORDERS_EXCHANGE
    scope: str = "client_id"

    def __post_init__(self) -> None:
        primary = tuple(column.name for column in self.table.primary_key.columns)
        if primary != (self.scope, *self.key):
            raise ValueError(
                f"{self.table.name}: the primary key {primary} is not ({self.scope}, *key)"
            )
        missing = [name for name in _COLUMNS if name not in self.table.c]
        if missing:
            raise ValueError(f"{self.table.name} lacks the outbox columns {missing}")

    @property
    def key_columns(self) -> list[sa.Column[Any]]:
        return [self.table.c[name] for name in self.key]

    def entry(self, key: Key, message: Message, **columns: Any) -> Entry:
        """The entry publishing ``message`` under ``key``; ``columns`` are the job's own."""
        return Entry(
            self,
            tuple(key),
            message.event_id,
            message.to_body(),
            message.schema_name,
            ROUTING_KEYS[type(message)],
            columns,
        )

    def stored(self, row: sa.Row[Any]) -> Entry | None:
        """A claimed row (from ``claimed_after``) as the entry a previous run claimed."""
        key = self.key_of(row)
        payload = row._mapping["payload"]
        if not payload:
            return None
        document = json.loads(payload)
        kind = document.get("type")
        # A message goes to its exchange with its type as the routing key (contract §1).
        return Entry(
            self, key, row._mapping["event_id"], payload.encode("utf-8"),
            f"{kind}/{document.get('version')}", str(kind),
        )

    def key_of(self, row: sa.Row[Any]) -> Key:
        return tuple(row._mapping[name] for name in self.key)

    def key_in(self, keys: Sequence[Key]) -> sa.ColumnElement[bool]:
        columns = self.key_columns
        if len(columns) == 1:  # a plain IN: SQLite looks each key up by the primary key
            return columns[0].in_([key[0] for key in keys])
        return sa.tuple_(*columns).in_([tuple(key) for key in keys])

    def claimed_after(
        self, scope: str, after: Key | None = None, *, limit: int = REPUBLISH_CHUNK
    ) -> sa.Select[Any]:
        """The next claimed rows of a scope (keys above ``after``), in key order. The state
        is written into the SQL: a planner can use a partial index (``state = 'claimed'``)
        only for a value it sees."""
        table, columns = self.table, self.key_columns
        query = sa.select(*columns, table.c.event_id, table.c.payload).where(
            table.c[self.scope] == scope,
            table.c.state == sa.bindparam("claimed", CLAIMED, literal_execute=True),
        )
        if after is not None:
            query = query.where(
                columns[0] > after[0]
                if len(columns) == 1
                else sa.tuple_(*columns) > sa.tuple_(*after)
            )
        return query.order_by(*columns).limit(limit)

    def recorded(self, scope: str, keys: Sequence[Key]) -> sa.Select[Any]:
        """Which of these keys of a scope are recorded (claimed or published), and how."""
        return sa.select(*self.key_columns, self.table.c.state).where(
            self.table.c[self.scope] == scope, self.key_in(keys)
        )

    def claim_row(self, scope: str, entry: Entry, now: datetime) -> dict[str, Any]:
        return {
            **entry.columns,
            self.scope: scope,
            **dict(zip(self.key, entry.key, strict=True)),
            "event_id": entry.event_id,
            "state": CLAIMED,
            "payload": entry.body.decode("utf-8"),
            "claimed_at": now,
            "published_at": None,
        }


def outbox_table(
    name: str,
    *key: sa.Column[Any],
    columns: Sequence[sa.Column[Any]] = (),
    noun: str = "messages",
    exchange: str = ORDERS_EXCHANGE,
) -> OutboxTable:
    """Declare an outbox table: (``client_id``, ``*key``) its primary key (only the names
    and types of ``key`` are used), the outbox's columns, the job's ``columns``, and the
    partial index that finds the claimed rows."""
    key_names = [column.name for column in key]
    table = sa.Table(
        name,
        metadata,
        sa.Column("client_id", sa.String(64), primary_key=True),
        *(sa.Column(c.name, c.type, primary_key=True, autoincrement=False) for c in key),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("payload", sa.Text, nullable=True),
        sa.Column("claimed_at", UtcDateTime(), nullable=False),
        sa.Column("published_at", UtcDateTime(), nullable=True),
        *columns,
        # Only the claimed rows (almost always none): a full index on state would tempt
        # SQLite to walk the whole history for other lookups.
        sa.Index(
            f"ix_{name}_claimed",
            "client_id",
            *key_names,
            sqlite_where=sa.text("state = 'claimed'"),
            postgresql_where=sa.text("state = 'claimed'"),
        ),
    )
    return OutboxTable(table, tuple(key_names), noun=noun, exchange=exchange)


@dataclass(frozen=True, eq=False)
class Entry:
    """One message in the outbox: its table and key, its event_id and the exact body."""

    box: OutboxTable
    key: Key
    event_id: str
    body: bytes
    schema: str  # the ``schema`` header: <type>/<version> of the body
    routing_key: str
    columns: dict[str, Any] = field(default_factory=dict)
    """The table's other columns, written with the claim."""

    def outgoing(self) -> Outgoing:
        return Outgoing(
            self.body,
            self.box.exchange,
            self.routing_key,
            contract_properties(self.event_id, self.schema),
        )


@dataclass(frozen=True)
class Sent:
    """Entries published, their confirms still to come (on the thread that sent them)."""

    entries: list[Entry]
    confirmation: Confirmation


def _by_box(entries: Sequence[Entry]) -> dict[OutboxTable, list[Entry]]:
    groups: dict[OutboxTable, list[Entry]] = {}
    for entry in entries:
        groups.setdefault(entry.box, []).append(entry)
    return groups


def not_confirmed(entries: Sequence[Entry], exc: BaseException) -> BridgeError:
    """The error of a publish the broker did not confirm: the run fails and is retried."""
    first = entries[0]
    nouns = {entry.box.noun for entry in entries}
    noun = nouns.pop() if len(nouns) == 1 else "messages"
    key = ", ".join(str(value) for value in first.key)
    exchanges = ", ".join(sorted({entry.box.exchange for entry in entries}))
    kinds = ", ".join(sorted({entry.routing_key for entry in entries}))
    return BridgeError(
        f"publishing {len(entries)} {noun} (from {key}) to {exchanges} was not confirmed "
        f"({type(exc).__name__}); they are published again on the next attempt",
        action=(
            f"The broker did not confirm {kinds} messages. Retried automatically; if "
            "dead-lettered, check RabbitMQ, then replay."
        ),
    )


PublishedHook = Callable[[Connection, Sequence[Entry]], None]
CountHook = Callable[[OutboxTable, int], None]


class Outbox:
    """One scope's (a client's) outbox over one or more outbox tables.

    ``with_published(conn, entries)`` runs in each transaction that records entries published
    (the job's own bookkeeping); ``count_published(table, n)`` is told, once it committed, how
    many rows of a table became published.
    """

    def __init__(
        self,
        state: StateStore,
        publisher: Publisher,
        scope: str,
        boxes: Sequence[OutboxTable],
        *,
        with_published: PublishedHook | None = None,
        count_published: CountHook | None = None,
    ) -> None:
        self.state = state
        self.publisher = publisher
        self.scope = scope
        self.boxes = tuple(boxes)
        self._with_published = with_published
        self._count_published = count_published

    # --- what a crash left ----------------------------------------------------------------

    def republish_claimed(self) -> int:
        """Publish again every claimed entry of the scope from its stored body (same
        event_id, same bytes) and record it; return how many."""
        count = 0
        for box in self.boxes:
            after: Key | None = None
            while True:
                with self.state.engine.connect() as conn:
                    rows = conn.execute(box.claimed_after(self.scope, after)).all()
                if not rows:
                    break
                after = box.key_of(rows[-1])
                entries = []
                for row in rows:
                    entry = box.stored(row)
                    if entry is None:
                        log.error("claimed entry has no stored body", table=box.table.name,
                                  key=list(box.key_of(row)))
                        continue
                    entries.append(entry)
                self.publish(entries)
                self.mark_published(entries)
                count += len(entries)
                log.info("re-published what a previous run had claimed", count=len(entries),
                         table=box.table.name)
        return count

    def known(self, box: OutboxTable, keys: Sequence[Key]) -> dict[Key, str]:
        """Which of these keys are recorded (claimed or published): their state."""
        if not keys:
            return {}
        with self.state.engine.connect() as conn:
            rows = conn.execute(box.recorded(self.scope, keys)).all()
        return {box.key_of(row): row.state for row in rows}

    # --- claim, publish, record -----------------------------------------------------------

    def claim(
        self,
        entries: Sequence[Entry],
        *,
        published: Sequence[Entry] = (),
        write: Callable[[Connection], None] | None = None,
    ) -> list[Entry]:
        """One transaction: ``published`` recorded published (the broker confirmed them),
        ``write`` run (the job's own rows), ``entries`` claimed. Returns the entries this
        call claimed (a row already there belongs to an earlier or another run). Nothing to
        do opens no transaction."""
        if not (entries or published or write):
            return []
        with self.state.transaction() as conn:
            done = self.record_published_in(conn, published)
            if write is not None:
                write(conn)
            claimed = self.claim_in(conn, entries)
        self._counted(done)
        return claimed

    def claim_in(self, conn: Connection, entries: Sequence[Entry]) -> list[Entry]:
        """Claim the entries in the caller's transaction; those this call claimed."""
        if not entries:
            return []
        now = utcnow()
        won: set[int] = set()
        for box, group in _by_box(entries).items():
            rows = [box.claim_row(self.scope, entry, now) for entry in group]
            inserted = self.state.insert_ignore_many(conn, box.table, rows)
            won |= {id(entry) for entry in group if (self.scope, *entry.key) in inserted}
        return [entry for entry in entries if id(entry) in won]

    def send(self, entries: Sequence[Entry]) -> Sent | None:
        """Publish the entries now; their confirms are awaited by ``confirmed``."""
        if not entries:
            return None
        try:
            confirmation = self.publisher.send([entry.outgoing() for entry in entries])
        except Exception as exc:
            raise not_confirmed(entries, exc) from exc
        return Sent(list(entries), confirmation)

    def confirmed(self, sent: Sent | None) -> list[Entry]:
        """The entries of ``sent`` once the broker confirmed every one; raises (the run is
        retried, and they are published again) otherwise."""
        if sent is None:
            return []
        try:
            sent.confirmation.wait()
        except Exception as exc:
            raise not_confirmed(sent.entries, exc) from exc
        return sent.entries

    def publish(self, entries: Sequence[Entry]) -> None:
        """Publish the entries with confirms, waiting for them."""
        self.confirmed(self.send(entries))

    def mark_published(self, entries: Sequence[Entry]) -> None:
        """Record confirmed entries published, in a transaction of their own."""
        if not entries:
            return
        with self.state.transaction() as conn:
            done = self.record_published_in(conn, entries)
        self._counted(done)

    def record_published_in(
        self, conn: Connection, entries: Sequence[Entry]
    ) -> dict[OutboxTable, int]:
        """Record confirmed entries published in the caller's transaction (body cleared);
        how many rows of each table this made published."""
        done: dict[OutboxTable, int] = {}
        if not entries:
            return done
        for box, group in _by_box(entries).items():
            table = box.table
            count = conn.execute(
                sa.update(table)
                .where(
                    table.c[box.scope] == self.scope,
                    box.key_in([entry.key for entry in group]),
                    table.c.state == CLAIMED,
                )
                .values(state=PUBLISHED, published_at=utcnow(), payload=None)
            ).rowcount
            done[box] = count if count is not None and count >= 0 else len(group)
        if self._with_published is not None:
            self._with_published(conn, entries)
        return done

    def _counted(self, done: dict[OutboxTable, int]) -> None:
        if self._count_published is None:
            return
        for box, count in done.items():
            if count:
                self._count_published(box, count)

    def pipeline(self) -> Pipeline:
        return Pipeline(self)


class Pipeline:
    """Claim, publish and record a page at a time, pipelined: a page's confirms come back
    while the caller prepares the next page, and one transaction per page records the page
    before as published and claims this one. As a context manager, leaving the block records
    the last page; leaving it on an error still records what the broker confirmed (sparing
    FM copies on the next attempt)."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self._sent: Sent | None = None  # published, confirms still coming

    def page(
        self, entries: Sequence[Entry], write: Callable[[Connection], None] | None = None
    ) -> list[Entry]:
        """Claim this page's entries (``write`` in the same transaction) and publish them;
        the entries this call claimed."""
        previous, self._sent = self._sent, None
        published = self.outbox.confirmed(previous)
        claimed = self.outbox.claim(entries, published=published, write=write)
        self._sent = self.outbox.send(claimed)
        return claimed

    def finish(self) -> None:
        """Wait for the last page's confirms and record it."""
        previous, self._sent = self._sent, None
        self.outbox.mark_published(self.outbox.confirmed(previous))

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self.finish()
        elif isinstance(error, Exception) and self._sent is not None:
            with contextlib.suppress(Exception):  # the error in hand is the one to report
                self.finish()


__all__ = [
    "CLAIMED",
    "PUBLISHED",
    "Entry",
    "Key",
    "Outbox",
    "OutboxTable",
    "Pipeline",
    "Sent",
    "outbox_table",
]
