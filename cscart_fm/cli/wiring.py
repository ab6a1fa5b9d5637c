"""Wiring: the one place that builds a running process from the environment and the jobs.

The CLI (and the demo) ask here for the state store with every table the service uses, the
services the jobs share, and a consumer runtime per job with the middleware support needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from consumers.registry import JOBS
from consumers.services import Services
from cscart_fm.core.broker import Publisher
from cscart_fm.core.clients import load_clients
from cscart_fm.core.config import Environment
from cscart_fm.core.errors import SettingsError
from cscart_fm.core.jobs import Job
from cscart_fm.core.runtime import ClientFailures, ConsumerRuntime, Middleware, RuntimeOptions
from cscart_fm.core.state import Component, StateStore
from cscart_fm.support.dead_letters import audit
from cscart_fm.support.dead_letters import store as dead_letters
from cscart_fm.support.dead_letters.resolve import DeadLetterResolver
from producers import tick


def components(jobs: Sequence[Job[Any]] | None = None) -> list[Component]:
    """Every component of the state store: the jobs', the producers' and support's."""
    return [
        *(job.component for job in (JOBS if jobs is None else jobs)),
        tick.COMPONENT,
        dead_letters.COMPONENT,
        audit.COMPONENT,
    ]


def open_state(url: str, *, migrate: bool = True) -> StateStore:
    """The state store with every table the service uses (created or migrated on open)."""
    return StateStore.open(url, components(), migrate=migrate)


def services_from_environment(env: Environment) -> Services:
    clients = load_clients(env.clients_path)
    state = open_state(env.state_url)
    return Services(clients=clients, state=state, publisher=Publisher(env.broker_url))


def select_jobs(name: str) -> list[Job[Services]]:
    """The job named on the command line, or every job for ``all``."""
    if name == "all":
        return list(JOBS)
    try:
        return [JOBS.named(name)]
    except KeyError:
        raise SettingsError(
            f"unknown consumer {name!r}; choose one of: {', '.join(JOBS.names)}, all"
        ) from None


def middleware(job: Job[Services], services: Services) -> list[Middleware]:
    """What runs around every message of ``job``: its per-client failure count, and the
    resolution of dead letters with the same key once a message succeeds."""
    around: list[Middleware] = [DeadLetterResolver(services.state, JOBS)]
    if job.failures is not None:
        around.insert(0, ClientFailures(job.failures, services.clients))
    return around


def runtime_for(
    job: Job[Services], services: Services, env: Environment
) -> ConsumerRuntime[Any]:
    tuning = env.tuning(job)
    return ConsumerRuntime(
        job.build(services),
        broker_url=env.broker_url,
        topology=job.topology(env.retry_delays),
        accepts=job.events,
        options=RuntimeOptions(
            prefetch=tuning.prefetch,
            concurrency=tuning.concurrency,
            heartbeat=env.heartbeat,
            max_attempts=env.max_attempts,
            shutdown_grace=env.shutdown_grace,
        ),
        middleware=middleware(job, services),
    )
