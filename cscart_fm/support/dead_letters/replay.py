"""Replaying a dead letter: its body back where it was going, confirmed by the broker.

The stored body is published with its original properties to its job's work exchange, with
the routing key of the job's event its body is (``destination``): never where a header says,
since anyone who can publish can write headers; a body that is none of its job's events is
not replayed. Our own headers
and the broker's ``x-`` headers are dropped (a replay starts with a fresh attempt counter);
``cscart-replay-count`` (the message's replays so far, ours: the broker ignores client-set
``x-`` headers since 3.13) and ``cscart-replay-of`` (this row's id) are added. The row is
marked ``replayed`` only after the broker confirmed the publish; a publish that fails is
retried on a new connection for up to ``patience`` seconds, then reported, and the row stays
as it was. A crash between the confirm and the update can replay a message twice — the
consumers are idempotent — but nothing is ever lost. The topology is declared first so that
a replay is never published to an exchange with no queue bound.

What may be replayed, and who did it, is the desk's business (``desk``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import structlog
from kombu import Connection

from consumers.registry import JOBS
from cscart_fm.core.broker import Publisher
from cscart_fm.core.state import StateStore, utcnow
from cscart_fm.core.topology import DEFAULT_RETRY_DELAYS
from cscart_fm.support.dead_letters.store import (
    REPLAYED,
    RESOLVED,
    DeadLetter,
    NoDestination,
    dead_letters,
    destination,
)

log = structlog.get_logger(__name__)

REPLAY_COUNT_HEADER = "cscart-replay-count"
"""How many times this message was replayed from the dead-letter store, over its whole life."""
REPLAY_OF_HEADER = "cscart-replay-of"
"""The id of the dead letter a replayed message came from."""

REPLAYED_PROPERTIES = (
    "content_type",
    "content_encoding",
    "message_id",
    "correlation_id",
    "type",
    "app_id",
    "priority",
    "reply_to",
)
"""Properties a replay carries over (``expiration`` and ``user_id`` are not: a replay must
neither expire on its way nor be refused for another user's name)."""


class ReplayFailed(Exception):
    """The broker did not confirm a replay in time; the dead letter stays where it was."""


def replay_headers(letter: DeadLetter) -> dict[str, Any]:
    kept = {k: v for k, v in letter.headers.items() if not k.startswith(("x-", "cscart-"))}
    kept[REPLAY_COUNT_HEADER] = letter.previous_replays + letter.replay_count + 1
    kept[REPLAY_OF_HEADER] = letter.id
    return kept


def replay_properties(letter: DeadLetter) -> dict[str, Any]:
    props = {k: letter.properties[k] for k in REPLAYED_PROPERTIES if letter.properties.get(k)}
    props.setdefault("content_type", "application/json")
    props.setdefault("content_encoding", "utf-8")
    props["delivery_mode"] = 2
    props["headers"] = replay_headers(letter)
    return props


def declare_topology(broker_url: str, retry_delays: Sequence[int] | None = None) -> None:
    """Declare the contract's topology so nothing is published where no queue is bound.

    Failing to declare (e.g. a queue declared with other arguments by another release) is
    logged, not fatal: the publish itself still needs its confirm."""
    try:
        with Connection(broker_url, connect_timeout=10) as conn:
            conn.ensure_connection(max_retries=3)
            JOBS.topology(retry_delays or DEFAULT_RETRY_DELAYS).declare(conn)
    except Exception as exc:
        log.warning("could not declare the topology", error=f"{type(exc).__name__}: {exc}")


def replay_one(
    store: StateStore,
    publisher: Publisher,
    letter: DeadLetter,
    *,
    patience: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Publish the dead letter back where it was going, wait for the confirm, then mark it.

    A publish that fails (the broker restarting, a dropped connection) is tried again on a
    new connection until ``patience`` seconds passed; then ReplayFailed, and the row is left
    as it was."""
    exchange, routing_key = destination(letter.consumer, letter.body)
    deadline = time.monotonic() + patience
    wait = 0.5
    properties = replay_properties(letter)
    while True:
        try:
            publisher.publish_raw(
                letter.body, exchange=exchange, routing_key=routing_key, properties=properties
            )
            break
        except Exception as exc:
            if time.monotonic() + wait > deadline:
                raise ReplayFailed(
                    f"dead letter {letter.id}: the broker did not confirm the replay "
                    f"({type(exc).__name__}: {exc}); it stays {letter.status}"
                ) from exc
            log.warning(
                "replay not confirmed; trying again",
                dead_letter=letter.id,
                error=f"{type(exc).__name__}: {exc}",
                retry_in=wait,
            )
            sleep(wait)
            wait = min(wait * 2, 5.0)
    c = dead_letters.c
    with store.transaction() as conn:
        conn.execute(
            sa.update(dead_letters)
            .where(c.id == letter.id)
            .values(
                # The consumer may already have succeeded and resolved it: keep that.
                status=sa.case((c.status == RESOLVED, RESOLVED), else_=REPLAYED),
                replay_count=c.replay_count + 1,
                last_replayed_at=utcnow(),
            )
        )
    log.info(
        "dead letter replayed",
        dead_letter=letter.id,
        consumer=letter.consumer,
        client_id=letter.client_id,
        exchange=exchange,
        routing_key=routing_key,
    )


@dataclass
class ReplayReport:
    replayed: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)
    """Not one of its job's events: nowhere to send it (the others still go)."""


def replay(
    store: StateStore,
    publisher: Publisher,
    letters: Iterable[DeadLetter],
    *,
    patience: float = 60.0,
    on_replayed: Callable[[DeadLetter], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> ReplayReport:
    """Replay several, oldest first; stop at the first one the broker will not take."""
    report = ReplayReport()
    for letter in letters:
        try:
            replay_one(store, publisher, letter, patience=patience, sleep=sleep)
        except NoDestination as exc:
            report.refused[letter.id] = f"dead letter {letter.id} cannot be replayed: {exc}"
            continue
        except ReplayFailed as exc:
            report.failed[letter.id] = str(exc)
            break
        report.replayed.append(letter.id)
        if on_replayed is not None:
            on_replayed(letter)
    return report
