"""The service's own memory: what was imported, pushed and applied, and the watermarks.

SQLAlchemy 2 Core over ``CSCART_FM_STATE_URL``: SQLite by default (embedded), PostgreSQL in a
cluster. Each consumer declares its own tables on ``metadata`` in its own module; opening the
store creates what is missing and runs the numbered migrations, so a new release starts on an
old database without a manual step.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from .errors import Busy

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)

Migration = Callable[[Connection], None]


def _claimed_orders_index(conn: Connection) -> None:
    """1: claimed orders are found from a partial index holding only them. With an index on
    (client, state), SQLite walked the client's whole history for them by primary key, and
    with one on (client, state, id) it walked that index to look orders up by id: each cost
    an idle tick 6–10 ms at 100,000 imported orders."""
    conn.execute(
        sa.text(
            "CREATE INDEX IF NOT EXISTS ix_imported_orders_claimed "
            "ON imported_orders (client_id, cart_order_id) WHERE state = 'claimed'"
        )
    )
    conn.execute(sa.text("DROP INDEX IF EXISTS ix_imported_orders_client_state"))


MIGRATIONS: list[Migration] = [_claimed_orders_index]
"""Schema changes after the first release, in order (a new database is created at the
latest schema by ``create_all``, and skips them)."""

DEFAULT_STATE_URL = "sqlite:///cscart-fm.sqlite"


def utcnow() -> datetime:
    return datetime.now(UTC)


def _register_table_modules() -> None:
    # Tables live beside the code that owns them; importing these modules registers them.
    import importlib

    for name in (
        "consumers.order_poll",
        "consumers.shipment_lodged",
        "consumers.stock_snapshot",
        "cscart_fm.dead_letters",
        "cscart_fm.console.audit",
        "producers.tick",
    ):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a consumer that exists but fails to import is a real error
                raise


LockBusy = Busy  # the name the consumers know it by


class StateStore:
    """An engine plus the few helpers every consumer needs (transactions, insert-or-ignore,
    per-client locks)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._sqlite_write_lock = threading.Lock()
        self._memory_locks: dict[str, threading.Lock] = {}
        self._memory_locks_guard = threading.Lock()

    @classmethod
    def open(cls, url: str = DEFAULT_STATE_URL, *, migrate: bool = True) -> StateStore:
        kwargs: dict[str, Any] = {"future": True, "pool_pre_ping": True}
        if url.startswith("sqlite"):
            # One file shared by several threads: serialise writers and wait on the file lock.
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        engine = sa.create_engine(url, **kwargs)
        if engine.dialect.name == "sqlite":

            @sa.event.listens_for(engine, "connect")
            def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=FULL")  # durable before we ack
                cursor.execute("PRAGMA busy_timeout=30000")
                cursor.close()

        store = cls(engine)
        if migrate:
            store.migrate()
        return store

    def migrate(self) -> int:
        """Create missing tables and apply pending migrations; return the schema version."""
        _register_table_modules()
        for attempt in range(5):
            try:
                with self.engine.begin() as conn:
                    if self.dialect == "postgresql":
                        # Replicas starting together take turns: concurrent CREATE TABLE on
                        # PostgreSQL fails with a unique violation in its catalogue.
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(4242424242)"))
                    metadata.create_all(conn)
                    current = conn.execute(
                        sa.select(sa.func.max(schema_version.c.version))
                    ).scalar_one_or_none()
                    if current is None:
                        current = len(MIGRATIONS)  # a new database starts at the latest schema
                        conn.execute(
                            schema_version.insert().values(version=current, applied_at=utcnow())
                        )
                    for number in range(current, len(MIGRATIONS)):
                        MIGRATIONS[number](conn)
                        conn.execute(
                            schema_version.insert().values(version=number + 1, applied_at=utcnow())
                        )
                    return len(MIGRATIONS)
            except (OperationalError, IntegrityError):
                # SQLite replicas starting at once may still race on CREATE TABLE: try again.
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A committed-on-success transaction. SQLite writers are serialised in-process so
        that threads wait for each other instead of failing with 'database is locked'."""
        if self.dialect == "sqlite":
            with self._sqlite_write_lock, self.engine.begin() as conn:
                yield conn
        else:
            with self.engine.begin() as conn:
                yield conn

    def _insert(self, table: sa.Table) -> Any:
        """An INSERT with the dialect's ON CONFLICT clauses."""
        return postgresql.insert(table) if self.dialect == "postgresql" else sqlite.insert(table)

    def insert_ignore(self, conn: Connection, table: sa.Table, values: Mapping[str, Any]) -> bool:
        """Insert a row unless its key exists; True when this call inserted it."""
        statement = self._insert(table).values(**values).on_conflict_do_nothing()
        # RETURNING, not rowcount: psycopg 3 reports -1 for an INSERT ... ON CONFLICT.
        marker = next(iter(table.primary_key.columns))
        return conn.execute(statement.returning(marker)).first() is not None

    def insert_ignore_many(
        self, conn: Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]]
    ) -> set[tuple[Any, ...]]:
        """Insert the rows whose key does not exist yet; the keys (primary-key tuples) of
        the rows this call inserted. One cached statement run for all the rows (SQLAlchemy
        sends them as multi-row INSERTs), not a statement compiled per call."""
        if not rows:
            return set()
        statement = (
            self._insert(table).on_conflict_do_nothing().returning(*table.primary_key.columns)
        )
        return {tuple(row) for row in conn.execute(statement, list(rows))}

    def upsert(
        self,
        conn: Connection,
        table: sa.Table,
        values: Mapping[str, Any],
        *,
        key: list[str],
        where: Any = None,
    ) -> bool:
        """Insert or update the row with this key (optionally only ``where`` holds);
        True when a row was written."""
        statement = self._insert(table).values(**values)
        updates = {name: statement.excluded[name] for name in values if name not in key}
        statement = statement.on_conflict_do_update(index_elements=key, set_=updates, where=where)
        marker = next(iter(table.primary_key.columns))
        return conn.execute(statement.returning(marker)).first() is not None

    @contextmanager
    def client_lock(self, job: str, client_id: str, *, wait: float | None = None) -> Iterator[bool]:
        """Hold the lock of ``job`` for ``client_id`` across every replica sharing this store.

        Yields True when held. With ``wait=None`` it does not wait and yields False if another
        holder has it; with a number it waits up to that many seconds, then raises LockBusy.
        The lock dies with its holder: a PostgreSQL session advisory lock goes with the
        connection, a SQLite file lock (flock) with the process — a killed replica never
        leaves a client locked.
        """
        deadline = None if wait is None else time.monotonic() + wait
        name = f"{job}:{client_id}"
        if self.dialect == "postgresql":
            acquire, release = self._pg_lock(name)
        elif self.engine.url.database in (None, "", ":memory:"):
            acquire, release = self._thread_lock(name)
        else:
            acquire, release = self._file_lock(name)
        try:
            while True:
                if acquire():
                    break
                if deadline is None:
                    yield False
                    return
                if time.monotonic() >= deadline:
                    raise LockBusy(f"{job} of client {client_id} is locked by another replica")
                time.sleep(0.2)
            yield True
        finally:
            release()

    def _pg_lock(self, name: str) -> tuple[Callable[[], bool], Callable[[], None]]:
        key = zlib.crc32(name.encode()) - 2**31  # advisory locks take a signed 64-bit key
        conn = self.engine.connect()
        held = False

        def acquire() -> bool:
            nonlocal held
            held = bool(
                conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
            )
            conn.commit()
            return held

        def release() -> None:
            try:
                if held:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
            finally:
                conn.close()

        return acquire, release

    def _file_lock(self, name: str) -> tuple[Callable[[], bool], Callable[[], None]]:
        database = str(self.engine.url.database)
        directory = f"{database}.locks"
        os.makedirs(directory, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        handle = open(os.path.join(directory, f"{safe}.lock"), "a+")  # noqa: SIM115 - held open on purpose
        held = False

        def acquire() -> bool:
            nonlocal held
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            held = True
            return True

        def release() -> None:
            if held:
                fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

        return acquire, release

    def _thread_lock(self, name: str) -> tuple[Callable[[], bool], Callable[[], None]]:
        with self._memory_locks_guard:
            lock = self._memory_locks.setdefault(name, threading.Lock())
        held = False

        def acquire() -> bool:
            nonlocal held
            held = lock.acquire(blocking=False)
            return held

        def release() -> None:
            if held:
                lock.release()

        return acquire, release

    def close(self) -> None:
        self.engine.dispose()
