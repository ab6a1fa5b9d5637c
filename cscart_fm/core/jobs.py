"""A job, declared once: its queue and events, tuning, tables, dead-letter key and console row.

Everything else derives from the declarations in the registry (``consumers.JOBS``): the broker
topology and ``deploy/rabbitmq/definitions.json``, the ``CSCART_FM_<JOB>_*`` tuning, the
state store's tables and migrations, which dead letters a success resolves, the console's
overview and the CLI's help. Adding a job is writing its declaration and registering it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from prometheus_client import Counter

from cscart_fm.core.events import type_name
from cscart_fm.core.runtime import Handler
from cscart_fm.core.state import Component, Migration
from cscart_fm.core.topology import DEFAULT_RETRY_DELAYS, ConsumerTopology, Topology
from schemas.messages import Message
from schemas.settings import ClientSettings

C = TypeVar("C")
"""What a job's handler is built from (the process's shared services)."""


@dataclass(frozen=True)
class Tuning:
    """Defaults, overridden by ``CSCART_FM_<JOB>_PREFETCH`` and ``_CONCURRENCY``."""

    prefetch: int
    concurrency: int


@dataclass(frozen=True)
class DeadLetterKey:
    """How a later success resolves this job's dead letters: both carry the key
    ``<prefix>:<client_id>`` (or ``<prefix>:<client_id>:<field>`` with a field), read from
    the body, and a success marks the open dead letters with its key resolved."""

    prefix: str | None
    """None: the job's name (the job fills it in)."""
    field: str | None
    label: str
    """What support calls what the key names ("shipment", "client's order poll")."""

    def of(self, client_id: Any, get: Callable[[str], Any]) -> str | None:
        client = _text(client_id)
        if client is None:
            return None
        if self.field is None:
            return f"{self.prefix}:{client}"[:300]
        value = _text(get(self.field))
        return f"{self.prefix}:{client}:{value}"[:300] if value else None


def _text(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


@dataclass(frozen=True)
class OverviewScope:
    """What an overview query may need besides its table."""

    now: datetime
    zones: Mapping[str, ZoneInfo]
    """Each configured client's time zone (for "today")."""


@dataclass(frozen=True)
class OverviewColumn:
    """One column of the console's per-client overview, read from one of the job's tables."""

    title: str
    table: sa.Table
    query: Callable[[sa.Table, OverviewScope], Any]
    """A SELECT of (client_id, value) rows, one per client."""
    kind: Literal["time", "count_today"]
    stalled: Callable[[datetime | None, ClientSettings, datetime], str | None] | None = None
    """Given (this column's value, the client's settings, now): why the client's sync looks
    stalled, or None."""


@dataclass(frozen=True)
class Job(Generic[C]):
    """One consumer: ``cscart.<name>`` reads its ``events`` from ``fm.events``."""

    name: str
    summary: str
    """One line for ``cscart-fm run --help`` and the docs."""
    events: tuple[type[Message], ...]
    build: Callable[[C], Handler[Any]]
    tuning: Tuning
    tables: tuple[sa.Table, ...] = ()
    migrations: tuple[Migration, ...] = ()
    dead_letter_key: DeadLetterKey | None = None
    overview: tuple[OverviewColumn, ...] = ()
    failures: Counter | None = None
    """A counter by (client, error_type) of this job's failed messages."""

    def __post_init__(self) -> None:
        key = self.dead_letter_key
        if key is not None and key.prefix is None:
            object.__setattr__(self, "dead_letter_key", replace(key, prefix=self.name))

    @property
    def event_types(self) -> tuple[str, ...]:
        return tuple(type_name(event) for event in self.events)

    @property
    def routing_keys(self) -> tuple[str, ...]:
        """An event is published on ``fm.events`` with its type as the routing key."""
        return self.event_types

    @property
    def component(self) -> Component:
        return Component(self.name, self.tables, self.migrations)

    def topology(self, retry_delays: Sequence[int] = DEFAULT_RETRY_DELAYS) -> ConsumerTopology:
        return ConsumerTopology.of(self.name, self.routing_keys, retry_delays)


@dataclass
class Registry(Generic[C]):
    """The jobs of this service, in order; ``registered`` adds one for a while (tests)."""

    jobs: list[Job[C]] = field(default_factory=list)

    def __iter__(self) -> Iterator[Job[C]]:
        return iter(list(self.jobs))

    def __len__(self) -> int:
        return len(self.jobs)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(job.name for job in self.jobs)

    def register(self, job: Job[C]) -> Job[C]:
        if job.name in self.names:
            raise ValueError(f"a job named {job.name!r} is registered already")
        self.jobs.append(job)
        return job

    def unregister(self, name: str) -> None:
        self.jobs = [job for job in self.jobs if job.name != name]

    @contextmanager
    def registered(self, job: Job[C]) -> Iterator[Job[C]]:
        self.register(job)
        try:
            yield job
        finally:
            self.unregister(job.name)

    def named(self, name: str) -> Job[C]:
        for job in self.jobs:
            if job.name == name:
                return job
        raise KeyError(name)

    def for_event_type(self, event_type: str) -> Job[C] | None:
        for job in self.jobs:
            if event_type in job.event_types:
                return job
        return None

    def topology(self, retry_delays: Sequence[int] = DEFAULT_RETRY_DELAYS) -> Topology:
        return Topology(tuple(job.topology(retry_delays) for job in self.jobs))

    def components(self) -> list[Component]:
        return [job.component for job in self.jobs]

    def dead_letter_key(self, document: Any) -> str | None:
        """The resolve key of a (possibly invalid) body's JSON document, or None."""
        if not isinstance(document, Mapping):
            return None
        kind = document.get("type")
        job = self.for_event_type(kind) if isinstance(kind, str) else None
        if job is None or job.dead_letter_key is None:
            return None
        return job.dead_letter_key.of(document.get("client_id"), document.get)

    def dead_letter_key_of_event(self, job_name: str, event: Message) -> str | None:
        """The resolve key of a validated event (no dump of a large snapshot)."""
        key = self.named(job_name).dead_letter_key
        if key is None:
            return None
        return key.of(event.client_id, lambda name: getattr(event, name, None))

    def key_labels(self) -> dict[str, str]:
        return {
            str(job.dead_letter_key.prefix): job.dead_letter_key.label
            for job in self.jobs
            if job.dead_letter_key is not None
        }


def names_of(jobs: Iterable[Job[Any]]) -> tuple[str, ...]:
    return tuple(job.name for job in jobs)
