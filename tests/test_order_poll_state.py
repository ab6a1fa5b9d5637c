"""The order-poll consumer's own state queries stay lookups, whatever the history.

An idle tick runs the same queries with 1,000 or 100,000 imported orders, and must cost the
same (benchmark 2). SQLite chooses its index without statistics; twice an index meant for one
query made another walk the client's whole history. These check the plans on SQLite (the
embedded default): every query of a tick searches an index, none scans.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from consumers.order_poll.tables import IMPORTED, imported_orders
from cscart_fm.cli.wiring import open_state
from cscart_fm.core.outbox import CLAIMED, PUBLISHED
from cscart_fm.core.state import StateStore


def _plan(store: StateStore, query: sa.Select[object]) -> str:
    sql = str(query.compile(store.engine, compile_kwargs={"literal_binds": True}))
    with store.engine.connect() as conn:
        return " / ".join(row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))


def test_a_ticks_lookups_use_an_index_with_a_long_history(tmp_path: Path) -> None:
    store = open_state(f"sqlite:///{tmp_path / 'state.sqlite'}")
    now = datetime.now(UTC)
    rows = [
        {"client_id": "ACME", "cart_order_id": n, "order_no": f"CS{n}", "event_id": f"e{n}",
         "state": CLAIMED if n % 5000 == 0 else PUBLISHED, "payload": None,
         "cart_status": "P", "placed_at": now, "claimed_at": now, "published_at": now}
        for n in range(1, 20_001)
    ]
    with store.transaction() as conn:
        conn.execute(imported_orders.insert(), rows)

    claimed = _plan(store, IMPORTED.claimed_after("ACME"))
    later = _plan(store, IMPORTED.claimed_after("ACME", (5000,)))  # the next chunk
    known = _plan(store, IMPORTED.recorded("ACME", [(n,) for n in range(19_900, 19_931)]))

    assert "ix_imported_orders_claimed" in claimed and "SCAN" not in claimed, claimed
    assert "ix_imported_orders_claimed" in later and "SCAN" not in later, later
    assert "cart_order_id=?" in known and "SCAN" not in known, known
    with store.engine.connect() as conn:
        assert [r.cart_order_id for r in conn.execute(IMPORTED.claimed_after("ACME"))] == [
            5000, 10_000, 15_000, 20_000]
        assert len(conn.execute(IMPORTED.recorded("ACME", [(1,), (2,), (30_000,)])).all()) == 2
    store.close()
