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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from cscart_fm.core.errors import Busy

metadata = sa.MetaData()
"""Every table of the service is declared on this one MetaData; which of them a store creates
is what its components name (``StateStore.open``)."""


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """A moment, stored with its zone where the database keeps one and handed back aware, in
    UTC, on every database (SQLite hands back naive datetimes, and aggregates as text)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("a naive datetime would be ambiguous in the state store")
        return value

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> datetime | None:
        return as_utc(value)


def as_utc(value: Any) -> datetime | None:
    """A stored moment as an aware UTC datetime (SQLite's naive values and text are UTC)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Migration = Callable[[Connection], None]
"""A schema change of a component after its first release, run once on an older database.
Idempotent (``IF NOT EXISTS``): a database older than the versions runs them all."""


@dataclass(frozen=True)
class Component:
    """Tables that belong together (a job's, the dead-letter desk's), with their migrations in
    order: a new database gets the latest tables and skips them."""

    name: str
    tables: tuple[sa.Table, ...]
    migrations: tuple[Migration, ...] = ()


component_versions = sa.Table(
    "component_versions",
    metadata,
    sa.Column("component", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("applied_at", UtcDateTime(), nullable=False),
)

DEFAULT_STATE_URL = "sqlite:///cscart-fm.sqlite"


def utcnow() -> datetime:
    return datetime.now(UTC)


LockBusy = Busy  # the name the consumers know it by


class StateStore:
    """An engine plus the few helpers every consumer needs (transactions, insert-or-ignore,
    per-client locks)."""

    def __init__(self, engine: Engine, components: Sequence[Component] = ()) -> None:
        self.engine = engine
        self.components = tuple(components)
        self.dialect = engine.dialect.name
        self._sqlite_write_lock = threading.Lock()
        self._memory_locks: dict[str, threading.Lock] = {}
        self._memory_locks_guard = threading.Lock()

    @classmethod
    def open(
        cls,
        url: str = DEFAULT_STATE_URL,
        components: Sequence[Component] = (),
        *,
        migrate: bool = True,
    ) -> StateStore:
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

        store = cls(engine, components)
        if migrate:
            store.migrate()
        return store

    def migrate(self) -> dict[str, int]:
        """Create missing tables and run each component's pending migrations; return each
        component's schema version."""
        tables = [component_versions, *(t for c in self.components for t in c.tables)]
        for attempt in range(5):
            try:
                with self.engine.begin() as conn:
                    if self.dialect == "postgresql":
                        # Replicas starting together take turns: concurrent CREATE TABLE on
                        # PostgreSQL fails with a unique violation in its catalogue.
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(4242424242)"))
                    existed = set(sa.inspect(conn).get_table_names())
                    metadata.create_all(conn, tables=tables)
                    return {c.name: self._migrate(conn, c, existed) for c in self.components}
            except (OperationalError, IntegrityError):
                # SQLite replicas starting at once may still race on CREATE TABLE: try again.
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    @staticmethod
    def _migrate(conn: Connection, component: Component, existed: set[str]) -> int:
        latest = len(component.migrations)
        versions = component_versions.c
        current = conn.execute(
            sa.select(versions.version).where(versions.component == component.name)
        ).scalar_one_or_none()
        if current is None:
            # New tables are created at the latest schema. Tables that predate the versions
            # (a database of the first release) get every migration: each is idempotent.
            new = not any(table.name in existed for table in component.tables)
            current = latest if new else 0
            conn.execute(
                component_versions.insert().values(
                    component=component.name, version=current, applied_at=utcnow()
                )
            )
        for number in range(current, latest):
            component.migrations[number](conn)
            conn.execute(
                component_versions.update()
                .where(versions.component == component.name)
                .values(version=number + 1, applied_at=utcnow())
            )
        return latest

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

    def upsert_many(
        self,
        conn: Connection,
        table: sa.Table,
        rows: Sequence[Mapping[str, Any]],
        *,
        key: list[str],
        where: Callable[[Any], Any] | None = None,
        chunk: int = 500,
    ) -> None:
        """``upsert`` for many rows, a statement per ``chunk`` rows (a snapshot records
        thousands). ``where(excluded)`` limits which existing rows are replaced."""
        for start in range(0, len(rows), chunk):
            part = list(rows[start : start + chunk])
            statement = self._insert(table).values(part)
            updates = {name: statement.excluded[name] for name in part[0] if name not in key}
            condition = where(statement.excluded) if where is not None else None
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=key, set_=updates, where=condition
                )
            )

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
