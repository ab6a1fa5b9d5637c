"""The audit trail, kept for good: who, when, from where, what, on which dead letters, why, result.

Every replay and discard the desk does, whether asked from the console or the command line,
and the console's logins (and failed ones), logouts and every reveal of personal data. An
action writes its row *before* it acts (``result`` = ``started``) and updates the result
after, so a process that dies mid-action still leaves the row. Rows are never updated after
their result, and never deleted.

The table keeps the name it had when only the console wrote to it, ``console_audit``, and so
does its component: renaming them would buy nothing but a migration.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cscart_fm.core.observability import redact_text
from cscart_fm.core.state import Component, StateStore, UtcDateTime, metadata, utcnow

STARTED = "started"
CONSOLE, CLI = "console", "cli"
"""Where an action came from (the ``via`` column)."""

console_audit = sa.Table(
    "console_audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", UtcDateTime(), nullable=False),
    sa.Column("who", sa.String(200), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    # login, login-failed, logout, replay, replay-filtered, discard, discard-filtered, reveal
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("letter_id", sa.Integer, nullable=True),  # set when one dead letter is the target
    sa.Column("target", sa.Text, nullable=False),  # "dead letter 12", the filter and its ids, ...
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("result", sa.Text, nullable=False),
    sa.Column("remote_addr", sa.String(64), nullable=True),
    sa.Column("via", sa.String(16), nullable=False, server_default=CONSOLE),
    sa.Index("ix_console_audit_letter", "letter_id"),
)


def _add_via(conn: Connection) -> None:
    """1: where each action came from; every row before this one came from the console."""
    columns = {column["name"] for column in sa.inspect(conn).get_columns("console_audit")}
    if "via" not in columns:
        conn.execute(
            sa.text(
                "ALTER TABLE console_audit ADD COLUMN via VARCHAR(16) NOT NULL DEFAULT 'console'"
            )
        )


COMPONENT = Component("console-audit", (console_audit,), migrations=(_add_via,))

_lock = threading.Lock()
_ready: set[int] = set()


def ensure_table(store: StateStore) -> None:
    """Create (or bring up to date) the table on a store opened without this component."""
    with _lock:
        if id(store) in _ready:
            return
        for attempt in range(3):
            try:
                with store.transaction() as conn:
                    console_audit.create(conn, checkfirst=True)
                    _add_via(conn)
                break
            except sa.exc.SQLAlchemyError:
                if attempt == 2:  # two processes creating it at once: the loser finds it made
                    raise
                time.sleep(0.2)
        _ready.add(id(store))


@dataclass(frozen=True)
class Actor:
    """Who acts, and from where: a console user (with their role and address) or someone at
    the command line (``--by``, else their OS user name)."""

    who: str
    role: str = "-"
    via: str = CLI
    remote_addr: str | None = None


@dataclass(frozen=True)
class Entry:
    id: int
    at: datetime
    who: str
    role: str
    action: str
    letter_id: int | None
    target: str
    reason: str | None
    result: str
    remote_addr: str | None
    via: str


def _clip(text: str | None, size: int) -> str | None:
    return None if text is None else redact_text(text)[:size]


def start(
    store: StateStore,
    actor: Actor,
    *,
    action: str,
    target: str,
    letter_id: int | None = None,
    reason: str | None = None,
    result: str = STARTED,
) -> int:
    """Write the row (before acting); return its id for ``finish``."""
    with store.transaction() as conn:
        row = conn.execute(
            console_audit.insert()
            .values(
                at=utcnow(),
                who=actor.who[:200],
                role=actor.role[:16],
                action=action[:32],
                letter_id=letter_id,
                target=_clip(target, 8000) or "",
                reason=_clip(reason, 2000),
                result=_clip(result, 2000) or "",
                remote_addr=(actor.remote_addr or "")[:64] or None,
                via=actor.via[:16],
            )
            .returning(console_audit.c.id)
        ).first()
    assert row is not None
    return int(row[0])


def finish(store: StateStore, entry_id: int, result: str) -> None:
    with store.transaction() as conn:
        conn.execute(
            sa.update(console_audit)
            .where(console_audit.c.id == entry_id)
            .values(result=_clip(result, 2000) or "")
        )


def _entry(row: Any) -> Entry:
    return Entry(**dict(row))


def page(
    store: StateStore,
    *,
    offset: int = 0,
    limit: int = 50,
    letter_id: int | None = None,
    who: str | None = None,
    action: str | None = None,
) -> tuple[list[Entry], int]:
    """A page of entries, newest first, and how many there are in all."""
    clauses: list[Any] = []
    if letter_id is not None:
        clauses.append(console_audit.c.letter_id == letter_id)
    if who:
        clauses.append(console_audit.c.who == who)
    if action:
        clauses.append(console_audit.c.action == action)
    with store.engine.connect() as conn:
        total = int(
            conn.execute(
                sa.select(sa.func.count()).select_from(console_audit).where(*clauses)
            ).scalar_one()
        )
        rows = conn.execute(
            sa.select(console_audit)
            .where(*clauses)
            .order_by(console_audit.c.id.desc())
            .offset(offset)
            .limit(limit)
        ).mappings()
        return [_entry(row) for row in rows], total


def entries_for_letter(store: StateStore, letter_id: int, limit: int = 50) -> Sequence[Entry]:
    return page(store, letter_id=letter_id, limit=limit)[0]
