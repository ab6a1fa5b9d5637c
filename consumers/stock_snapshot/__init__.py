"""Stock push: FM's stock snapshots become the quantities of the client's CS-Cart products."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from consumers.services import Services
from consumers.stock_snapshot.handler import (
    StockSnapshotHandler,
    stock_applied,
    stock_catalogue,
    stock_product_map,
    stock_reports,
)
from cscart_fm.core.jobs import DeadLetterKey, Job, OverviewColumn, OverviewScope, Tuning
from schemas.messages import StockSnapshot


def _last_snapshot(t: sa.Table, scope: OverviewScope) -> Any:
    return sa.select(t.c.client_id, sa.func.max(t.c.created_at)).group_by(t.c.client_id)


JOB: Job[Services] = Job(
    name="stock-snapshot",
    summary="stock push: FM's snapshots become the store's product quantities",
    events=(StockSnapshot,),
    build=StockSnapshotHandler,
    # Snapshots are large and written in pages, one writer per client.
    tuning=Tuning(prefetch=2, concurrency=1),
    tables=(stock_applied, stock_product_map, stock_catalogue, stock_reports),
    dead_letter_key=DeadLetterKey("stock", "event_id", "stock snapshot"),
    overview=(
        OverviewColumn("Last stock snapshot applied", stock_reports, _last_snapshot, "time"),
    ),
)
