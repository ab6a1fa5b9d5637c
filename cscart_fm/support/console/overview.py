"""The per-client overview: a column per overview column the jobs declare, read-only.

One grouped query per column, whatever the number of clients, plus the open dead letters. A
column whose table cannot be read (an older database) says "unknown" and why; it never breaks
the page.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
import structlog

from consumers.registry import JOBS
from cscart_fm.core.jobs import Job, OverviewColumn, OverviewScope
from cscart_fm.core.state import StateStore, as_utc
from cscart_fm.support.dead_letters import store as dl

log = structlog.get_logger(__name__)

aware = as_utc  # the name the views know it by


@dataclass
class ClientStatus:
    client_id: str
    configured: bool
    zone: ZoneInfo
    cells: list[Any] = field(default_factory=list)
    """One value per overview column (None: nothing recorded, or the column is unknown)."""
    open_letters: int = 0
    stalled: str | None = None


@dataclass
class Overview:
    columns: list[OverviewColumn]
    known: list[bool]
    """Per column: whether it could be read."""
    clients: list[ClientStatus]
    notes: list[str] = field(default_factory=list)
    """Columns that could not be read, in plain words."""

    @property
    def open_letters(self) -> int:
        return sum(c.open_letters for c in self.clients)


def _grouped(store: StateStore, what: str, notes: list[str], query: Any) -> dict[str, Any] | None:
    try:
        with store.engine.connect() as conn:
            return {str(row[0]): row[1] for row in conn.execute(query).all()}
    except sa.exc.SQLAlchemyError as exc:
        log.warning("overview query failed", what=what, error=f"{type(exc).__name__}: {exc}")
        notes.append(f"{what}: could not be read from the state store ({type(exc).__name__})")
        return None


def local_midnight(now: datetime, zone: ZoneInfo) -> datetime:
    local = now.astimezone(zone)
    midnight = datetime(local.year, local.month, local.day, tzinfo=zone)
    return midnight.astimezone(UTC)


def build(
    store: StateStore,
    clients: Mapping[str, Any] | None,
    now: datetime,
    jobs: Sequence[Job[Any]] | None = None,
) -> Overview:
    """``clients`` is the loaded clients file (or None when it could not be read)."""
    notes: list[str] = []
    settings = dict(clients or {})
    zones = {cid: s.orders.zone for cid, s in settings.items()}
    scope = OverviewScope(now=now, zones=zones)
    columns = [column for job in (JOBS if jobs is None else jobs) for column in job.overview]
    found = [
        _grouped(store, column.title, notes, column.query(column.table, scope))
        for column in columns
    ]
    dl.ensure_table(store)
    t = dl.dead_letters
    letters = _grouped(
        store,
        "Open dead letters",
        notes,
        sa.select(sa.func.coalesce(t.c.client_id, "(no client)"), sa.func.count())
        .where(t.c.status == dl.OPEN)
        .group_by(t.c.client_id),
    )

    names = set(settings)
    for values in (*found, letters):
        names.update(values or {})
    rows: list[ClientStatus] = []
    for cid in sorted(names):
        configured = cid in settings
        zone = zones.get(cid, ZoneInfo("UTC"))
        status = ClientStatus(client_id=cid, configured=configured, zone=zone)
        for column, values in zip(columns, found, strict=True):
            if values is None:
                status.cells.append(None)
                continue
            if column.kind == "time":
                moment = as_utc(values.get(cid))
                status.cells.append(moment)
                if configured and column.stalled is not None and status.stalled is None:
                    status.stalled = column.stalled(moment, settings[cid], now)
            else:
                status.cells.append(int(values.get(cid) or 0))
        status.open_letters = int((letters or {}).get(cid, 0))
        rows.append(status)
    return Overview(columns, [values is not None for values in found], rows, notes)
