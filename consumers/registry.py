"""The jobs of cscart-fm, in the order they are shown: the one list every part derives from."""

from __future__ import annotations

from consumers import order_poll, shipment_lodged, stock_snapshot
from consumers.services import Services
from cscart_fm.core.jobs import Registry

JOBS: Registry[Services] = Registry([order_poll.JOB, shipment_lodged.JOB, stock_snapshot.JOB])
