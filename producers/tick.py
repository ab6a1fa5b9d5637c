"""The order-poll tick producer: one ``order-poll.tick`` per client on ``fm.events``.

Two modes (``cscart-fm tick``):

- once (a Kubernetes CronJob): one tick for every client of the clients file, or for the
  clients named; ``--due`` limits it to the clients whose ``orders.poll_interval_seconds``
  elapsed since their last tick, less a tenth of it (at most 30 s) for the CronJob's start
  jitter (for a CronJob scheduled more often than the intervals);
- ``--every SECONDS`` (a Deployment with one replica): wakes every SECONDS and ticks each
  client whose poll interval elapsed; SIGTERM ends the loop after the round in hand, exit 0.

The last tick of each client is remembered in the state store (table ``tick_schedule``), so a
restarted loop (a rollout, a crash) does not tick every client again at once. If the store
is unreachable the loop keeps ticking from memory and says so: a tick is more important
than its bookkeeping, and a tick too many is harmless (a poll only imports what was not
imported yet). A tick that the broker does not confirm is not remembered: the client is
ticked again on the next wake.

The tick producer needs no store credentials: it reads only ``client_id`` and the poll
interval of each client, the rest of the clients file being validated as usual.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
import yaml

from cscart_fm.core.broker import Publisher, message_properties
from cscart_fm.core.clients import parse_clients
from cscart_fm.core.errors import SettingsError
from cscart_fm.core.events import parse_event
from cscart_fm.core.state import Component, StateStore, UtcDateTime, metadata
from cscart_fm.core.topology import EVENTS_EXCHANGE
from schemas.messages import ROUTING_KEYS, OrderPollTick

log = structlog.get_logger(__name__)

tick_schedule = sa.Table(
    "tick_schedule",
    metadata,
    sa.Column("client_id", sa.String(64), primary_key=True),
    sa.Column("last_tick_at", UtcDateTime(), nullable=False),
    sa.Column("event_id", sa.String(64), nullable=False),
)
COMPONENT = Component("tick", (tick_schedule,))

_NO_KEY_ENV = "CSCART_FM_TICK_NEEDS_NO_API_KEY"


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class TickTarget:
    client_id: str
    interval: int  # seconds (orders.poll_interval_seconds)


class UnknownClientNamed(SettingsError):
    """A client named on the command line that the clients file does not have."""


def load_targets(
    path: str | Path,
    names: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> list[TickTarget]:
    """The clients to tick, in file order (or in the order named).

    The clients file is validated as for the consumers, except that API keys are neither
    read nor required: the tick producer never talks to a store."""
    import os

    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(
            f"clients file {str(path)!r}: cannot read it ({exc.strerror})"
        ) from None
    except yaml.YAMLError:
        raise SettingsError(f"clients file {str(path)!r}: not valid YAML") from None
    if isinstance(document, dict) and isinstance(document.get("clients"), list):
        keyless = []
        for raw in document["clients"]:
            if isinstance(raw, dict):
                raw = {k: v for k, v in raw.items() if k not in ("api_key", "api_key_file")}
                raw["api_key"] = "${" + _NO_KEY_ENV + "}"
            keyless.append(raw)
        document = {**document, "clients": keyless}
    env = dict(os.environ if environ is None else environ)
    env[_NO_KEY_ENV] = "not-used-by-the-tick-producer"
    clients = parse_clients(document, env)
    targets = {
        client_id: TickTarget(client_id, settings.orders.poll_interval_seconds)
        for client_id, settings in clients.items()
    }
    if not names:
        return list(targets.values())
    unknown = [name for name in names if name not in targets]
    if unknown:
        known = ", ".join(targets) or "none"
        raise UnknownClientNamed(
            f"not in the clients file: {', '.join(unknown)} (its clients: {known})"
        )
    return [targets[name] for name in dict.fromkeys(names)]


def tick_body(client_id: str, now: datetime | None = None) -> bytes:
    """A tick as the contract's example writes it (``issued_at`` with ``+00:00``)."""
    return json.dumps(
        {
            "type": "order-poll.tick",
            "version": 1,
            "event_id": str(uuid.uuid4()),
            "client_id": client_id,
            "issued_at": (now or utcnow()).astimezone(UTC).isoformat(),
        }
    ).encode("utf-8")


def make_tick(client_id: str, now: datetime | None = None) -> tuple[bytes, OrderPollTick]:
    """The body and the validated tick (validated as any consumer will)."""
    body = tick_body(client_id, now)
    return body, parse_event(body, OrderPollTick)


def publish_tick(publisher: Publisher, client_id: str, now: datetime) -> OrderPollTick:
    """Publish one tick on ``fm.events`` with the contract's properties; wait for the confirm."""
    body, tick = make_tick(client_id, now)
    publisher.publish_raw(
        body,
        exchange=EVENTS_EXCHANGE,
        routing_key=ROUTING_KEYS[OrderPollTick],
        properties=message_properties(tick),
    )
    return tick


class Schedule:
    """The last tick of each client: in memory, and in the state store when there is one."""

    def __init__(self, store: StateStore | None = None) -> None:
        self.store = store
        self.last: dict[str, datetime] = {}
        if store is not None:
            try:
                with store.transaction() as conn:
                    tick_schedule.create(conn, checkfirst=True)
                with store.engine.connect() as conn:
                    for client_id, when in conn.execute(
                        sa.select(tick_schedule.c.client_id, tick_schedule.c.last_tick_at)
                    ):
                        self.last[client_id] = when
            except sa.exc.SQLAlchemyError as exc:
                log.warning(
                    "state store unavailable: last ticks kept in memory only",
                    error=f"{type(exc).__name__}: {exc}",
                )
                self.store = None

    def due(self, target: TickTarget, now: datetime, slack: float = 0.0) -> bool:
        last = self.last.get(target.client_id)
        if last is None or last > now:  # never ticked, or the clock went back
            return True
        return (now - last) >= timedelta(seconds=target.interval - slack)

    def record(self, tick: OrderPollTick, when: datetime) -> None:
        self.last[tick.client_id] = when
        if self.store is None:
            return
        try:
            with self.store.transaction() as conn:
                self.store.upsert(
                    conn,
                    tick_schedule,
                    {"client_id": tick.client_id, "last_tick_at": when, "event_id": tick.event_id},
                    key=["client_id"],
                )
        except sa.exc.SQLAlchemyError as exc:
            log.warning(
                "could not remember the tick in the state store",
                client_id=tick.client_id,
                error=f"{type(exc).__name__}: {exc}",
            )


def due_slack(interval: int) -> float:
    """How early a ``--due`` run may tick: a CronJob starts a few seconds late or early each
    minute, and a client 2 s short of its interval must not wait a whole extra minute."""
    return min(30.0, interval / 10)


def tick_once(
    publisher: Publisher,
    targets: Iterable[TickTarget],
    *,
    schedule: Schedule | None = None,
    due_only: bool = False,
    clock: Callable[[], datetime] = utcnow,
) -> list[OrderPollTick]:
    """Publish one tick per target (or per due target) with confirms; raise on the first
    tick the broker does not confirm."""
    sent = []
    for target in targets:
        now = clock()
        if (
            due_only
            and schedule is not None
            and not schedule.due(target, now, due_slack(target.interval))
        ):
            continue
        tick = publish_tick(publisher, target.client_id, now)
        log.info("tick published", client_id=tick.client_id, event_id=tick.event_id)
        if schedule is not None:
            schedule.record(tick, now)
        sent.append(tick)
    return sent


def run_loop(
    publisher: Publisher,
    targets: Sequence[TickTarget],
    every: float,
    *,
    schedule: Schedule,
    wait: Callable[[float], bool],
    clock: Callable[[], datetime] = utcnow,
    on_tick: Callable[[OrderPollTick], None] | None = None,
) -> int:
    """Tick due clients every ``every`` seconds until ``wait`` returns True (stop asked).

    Wakes are scheduled at a fixed rate from the start, so a client with an interval that is
    a multiple of ``every`` is ticked on time (half a wake of slack absorbs the jitter). A
    tick the broker does not confirm is logged and tried on the next wake. Returns the number
    of ticks published."""
    slack = min(every / 2, 5.0)
    published = 0
    next_wake = clock()
    while True:
        now = clock()
        for target in targets:
            if not schedule.due(target, now, slack):
                continue
            try:
                tick = publish_tick(publisher, target.client_id, now)
            except Exception as exc:
                log.error(
                    "tick not confirmed by the broker; trying again on the next wake",
                    client_id=target.client_id,
                    error=f"{type(exc).__name__}: {exc}",
                )
                continue
            schedule.record(tick, now)
            published += 1
            log.info("tick published", client_id=tick.client_id, event_id=tick.event_id)
            if on_tick is not None:
                on_tick(tick)
        next_wake += timedelta(seconds=every)
        now = clock()
        if next_wake <= now:  # a slow round or a clock jump: do not try to catch up
            next_wake = now + timedelta(seconds=every)
        if wait((next_wake - now).total_seconds()):
            return published


def describe(targets: Sequence[TickTarget]) -> list[dict[str, Any]]:
    return [{"client_id": t.client_id, "interval_seconds": t.interval} for t in targets]
