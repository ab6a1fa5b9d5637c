"""The state store on SQLite and PostgreSQL: schema at start, insert-once, guarded upserts."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from consumers.registry import JOBS
from cscart_fm.cli.wiring import components
from cscart_fm.core.state import Component, StateStore, component_versions, metadata

probe = sa.Table(
    "test_probe",
    metadata,
    sa.Column("client_id", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Integer, nullable=False),
)
PROBE = Component("probe", (probe,))


def open_store(url: str) -> StateStore:
    """The service's whole state store, and the probe table of these tests."""
    return StateStore.open(url, [*components(), PROBE])


def versions(store: StateStore) -> dict[str, int]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(component_versions.c.component, component_versions.c.version))
        return {str(name): int(version) for name, version in rows}

pytestmark = pytest.mark.postgres


def test_schema_is_created_at_start_and_reopening_is_harmless(state_url: str) -> None:
    first = open_store(state_url)
    second = open_store(state_url)  # a second replica starting on the same database
    with second.engine.connect() as conn:
        assert "test_probe" in sa.inspect(conn).get_table_names()
    # A new database starts each component at its latest schema.
    latest = {c.name: len(c.migrations) for c in [*components(), PROBE]}
    assert versions(second) == latest
    assert latest["order-poll"] == len(JOBS.named("order-poll").migrations) == 1
    first.close()
    second.close()


def test_insert_ignore_inserts_once(state_url: str) -> None:
    store = open_store(state_url)
    with store.transaction() as conn:
        assert store.insert_ignore(conn, probe, {"client_id": "A", "key": "k", "value": 1})
        assert not store.insert_ignore(conn, probe, {"client_id": "A", "key": "k", "value": 2})
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(probe.c.value)).scalar_one() == 1
    store.close()


def test_insert_ignore_many_inserts_the_missing_rows_and_names_them(state_url: str) -> None:
    store = open_store(state_url)
    with store.transaction() as conn:
        store.insert_ignore(conn, probe, {"client_id": "A", "key": "k2", "value": 1})
        rows = [{"client_id": "A", "key": f"k{i}", "value": 10 + i} for i in range(5)]
        assert store.insert_ignore_many(conn, probe, rows) == {
            ("A", "k0"), ("A", "k1"), ("A", "k3"), ("A", "k4")}
        assert store.insert_ignore_many(conn, probe, []) == set()
    with store.engine.connect() as conn:
        values = dict(conn.execute(sa.select(probe.c.key, probe.c.value)).all())
    assert values == {"k0": 10, "k1": 11, "k2": 1, "k3": 13, "k4": 14}  # k2 kept as it was
    store.close()


def test_an_older_database_is_migrated_when_the_service_starts(state_url: str) -> None:
    """A database of the first release (its one ``schema_version`` table at 0, no version per
    component): the claimed-orders index it had is replaced by the one that finds claimed
    orders without walking the history, and every component is then at its latest."""
    store = open_store(state_url)
    with store.transaction() as conn:
        conn.execute(sa.text("DROP INDEX ix_imported_orders_claimed"))
        conn.execute(sa.text(
            "CREATE INDEX ix_imported_orders_client_state ON imported_orders (client_id, state)"))
        conn.execute(component_versions.delete())
        conn.execute(sa.text(
            "CREATE TABLE schema_version (id INTEGER PRIMARY KEY, version INTEGER NOT NULL, "
            "applied_at TIMESTAMP NOT NULL)"))
        conn.execute(sa.text(
            "INSERT INTO schema_version (id, version, applied_at) VALUES (1, 0, CURRENT_TIMESTAMP)"))
    store.close()

    reopened = open_store(state_url)
    with reopened.engine.connect() as conn:
        indexes = {ix["name"] for ix in sa.inspect(conn).get_indexes("imported_orders")}
    assert "ix_imported_orders_claimed" in indexes
    assert "ix_imported_orders_client_state" not in indexes
    assert versions(reopened)["order-poll"] == 1
    reopened.close()


def test_upsert_with_a_guard_refuses_older_values(state_url: str) -> None:
    store = open_store(state_url)
    key = ["client_id", "key"]

    def put(value: int) -> bool:
        with store.transaction() as conn:
            return store.upsert(
                conn,
                probe,
                {"client_id": "A", "key": "k", "value": value},
                key=key,
                where=probe.c.value < sa.literal(value),
            )

    assert put(5)
    assert put(7)
    assert not put(6)  # older: refused
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(probe.c.value)).scalar_one() == 7
    store.close()


def test_concurrent_writers_each_insert_once(state_url: str) -> None:
    store = open_store(state_url)
    wins: list[bool] = []
    lock = threading.Lock()

    def claim() -> None:
        with store.transaction() as conn:
            won = store.insert_ignore(conn, probe, {"client_id": "B", "key": "race", "value": 1})
        with lock:
            wins.append(won)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wins.count(True) == 1
    store.close()


def test_client_lock_is_exclusive_and_dies_with_a_killed_holder(state_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import signal
    import subprocess
    import sys
    from pathlib import Path

    store = open_store(state_url)
    with store.client_lock("order-poll", "ACME") as held:
        assert held
        with store.client_lock("order-poll", "ACME") as again:
            assert not again  # a second holder (another replica) is refused
        with store.client_lock("order-poll", "BETA") as other:
            assert other  # other clients are independent
    with store.client_lock("order-poll", "ACME") as held:
        assert held  # released

    marker = tmp_path / "holding"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, pathlib\n"
            "from cscart_fm.core.state import StateStore\n"
            "store = StateStore.open(sys.argv[1])\n"
            "with store.client_lock('order-poll', 'ACME') as held:\n"
            "    assert held\n"
            "    pathlib.Path(sys.argv[2]).write_text('x')\n"
            "    time.sleep(60)\n",
            state_url,
            str(marker),
        ],
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with store.client_lock("order-poll", "ACME") as held:
            assert not held
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        with store.client_lock("order-poll", "ACME", wait=10) as held:
            assert held  # the killed holder's lock went with it
    finally:
        holder.kill()
    store.close()


def test_replicas_starting_together_all_start(state_url: str) -> None:
    """Three Deployments start at once on a fresh database: none crashes on the schema."""
    errors: list[BaseException] = []
    stores: list[StateStore] = []

    def start() -> None:
        try:
            stores.append(open_store(state_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert versions(stores[0]) == {c.name: len(c.migrations) for c in [*components(), PROBE]}
    for store in stores:
        store.close()
