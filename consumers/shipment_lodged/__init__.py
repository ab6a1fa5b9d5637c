"""Tracking push: FM's consignments become CS-Cart shipments and order statuses."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from consumers.services import Services
from consumers.shipment_lodged.handler import ShipmentLodgedHandler, pushed_shipments
from cscart_fm.core.jobs import DeadLetterKey, Job, OverviewColumn, OverviewScope, Tuning
from cscart_fm.core.metrics import SHIPMENT_FAILURES
from schemas.messages import ShipmentLodged


def _last_shipment(t: sa.Table, scope: OverviewScope) -> Any:
    return (
        sa.select(t.c.client_id, sa.func.max(t.c.created_at))
        .where(t.c.shipment_id.is_not(None))
        .group_by(t.c.client_id)
    )


JOB: Job[Services] = Job(
    name="shipment-lodged",
    summary="tracking push: FM's consignments become CS-Cart shipments and statuses",
    events=(ShipmentLodged,),
    build=ShipmentLodgedHandler,
    # Shipments are independent per order.
    tuning=Tuning(prefetch=8, concurrency=4),
    tables=(pushed_shipments,),
    dead_letter_key=DeadLetterKey("shipment", "shipment_ref", "shipment"),
    overview=(OverviewColumn("Last shipment pushed", pushed_shipments, _last_shipment, "time"),),
    failures=SHIPMENT_FAILURES,
)
