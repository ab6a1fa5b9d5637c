"""Resolving dead letters once a later message with the same key succeeds.

``DeadLetterResolver`` is installed around every consumer (``cscart_fm.cli.wiring``): after
any message succeeds, one indexed UPDATE marks ``open``/``replayed`` rows with the same key
``resolved``. The key is derived from the body as each job declares it:
``shipment:<client>:<shipment_ref>``, ``order-poll:<client>``, ``stock:<client>:<event_id>``.
A dead letter still waiting uncollected in its queue when its key succeeds is collected as
``open`` later: keep a collector running to make that window short.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection as DbConnection

from consumers.registry import JOBS
from cscart_fm.core.errors import BridgeError
from cscart_fm.core.jobs import Registry
from cscart_fm.core.runtime import Middleware
from cscart_fm.core.state import StateStore, utcnow
from cscart_fm.support.dead_letters.store import RESOLVED, UNSETTLED, dead_letters, ensure_table
from schemas.messages import Message

log = structlog.get_logger(__name__)


def key_of_document(document: Any) -> str | None:
    """The resolve key of a (possibly invalid) message body, as its job declares it."""
    return JOBS.dead_letter_key(document)


def _unresolved(key: str) -> sa.ColumnElement[bool]:
    """The open and replayed dead letters with this key (the key and status index)."""
    c = dead_letters.c
    return sa.and_(c.key == key, c.status.in_(list(UNSETTLED)))


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
