"""The service's own memory: what was imported, pushed and applied, and the watermarks.

SQLAlchemy 2 Core over ``CSCART_FM_STATE_URL``: SQLite by default (embedded), PostgreSQL in a
cluster. Each consumer declares its own tables on ``metadata`` in its own module; opening the
store creates what is missing and runs the numbered migrations, so a new release starts on an
old database without a manual step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)

Migration = Callable[[Connection], None]
MIGRATIONS: list[Migration] = []
"""Schema changes after the first release, in order; ``create_all`` makes new tables."""

DEFAULT_STATE_URL = "sqlite:///cscart-fm.sqlite"


def utcnow() -> datetime:
    return datetime.now(UTC)


def _register_table_modules() -> None:
    # Tables live beside the code that owns them; importing these modules registers them.
    import importlib

    for name in ("consumers.order_poll", "consumers.shipment_lodged", "consumers.stock_snapshot"):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a consumer that exists but fails to import is a real error
                raise


class StateStore:
    """An engine plus the few helpers every consumer needs (transactions, insert-or-ignore)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._sqlite_write_lock = threading.Lock()

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
            except OperationalError:
                # Two replicas starting at once may race on CREATE TABLE: try again.
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

    def insert_ignore(self, conn: Connection, table: sa.Table, values: Mapping[str, Any]) -> bool:
        """Insert a row unless its key exists; True when this call inserted it."""
        dialect_insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        statement = dialect_insert(table).values(**values).on_conflict_do_nothing()
        # RETURNING, not rowcount: psycopg 3 reports -1 for an INSERT ... ON CONFLICT.
        marker = next(iter(table.primary_key.columns))
        return conn.execute(statement.returning(marker)).first() is not None

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
        dialect_insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        statement = dialect_insert(table).values(**values)
        updates = {name: statement.excluded[name] for name in values if name not in key}
        statement = statement.on_conflict_do_update(index_elements=key, set_=updates, where=where)
        marker = next(iter(table.primary_key.columns))
        return conn.execute(statement.returning(marker)).first() is not None

    def close(self) -> None:
        self.engine.dispose()
