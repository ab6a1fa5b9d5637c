"""The dead-letter desk: one set of rules for replaying and discarding, whoever asks.

``cscart-fm dlq`` and the support console both act through a ``DeadLetterDesk``. It refuses
what the rules refuse, in the same words for both (``Refused``), acts, and audits every
replay and discard (``audit``): the row is written before acting, the result after.

The rules (where the two front ends used to differ, the stricter rule is the one kept):

- Collect first: before selecting or acting, new dead letters are moved in from the broker,
  at most every ``collect_interval`` seconds (every ``collect_backoff`` after a failure). An
  unreachable broker is a warning, not a refusal: the desk works on what is stored.
- By id: every id must exist. A resolved or discarded dead letter is replayed only when
  forced, and never discarded. Nothing is done unless every id may be.
- By filter: a filter that narrows nothing must say "all of them". A replay takes the open
  dead letters, a discard the open and replayed ones; oldest first, at most ``MAX_BULK``.
- Just before it is sent, each dead letter is read again: one settled meanwhile is skipped.
- A discard needs a reason (whitespace collapsed, at most 2,000 characters kept).
- A replay counts once the broker confirmed it. Whether the broker can be reached is asked
  first, so that an unreachable one is said at once; one replay at a time per desk.
"""

from __future__ import annotations

import getpass
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from cscart_fm.core.broker import Publisher, connect
from cscart_fm.core.config import redact_url
from cscart_fm.core.state import StateStore
from cscart_fm.support.dead_letters import audit
from cscart_fm.support.dead_letters.audit import Actor
from cscart_fm.support.dead_letters.collect import Collected
from cscart_fm.support.dead_letters.collect import collect as collect_letters
from cscart_fm.support.dead_letters.replay import ReplayReport, declare_topology, replay
from cscart_fm.support.dead_letters.store import (
    DISCARDED,
    OPEN,
    STATUSES,
    UNSETTLED,
    DeadLetter,
    Filter,
    count,
    discard,
    ensure_table,
    find,
    find_ids,
    summaries,
)

log = structlog.get_logger(__name__)

MAX_BULK = 500
"""At most this many dead letters are replayed or discarded by one action."""
CHUNK = 50
"""Bodies are loaded this many at a time (a stock snapshot can be megabytes)."""
MAX_REASON = 2000

REASON_REQUIRED = (
    "Say why it needs no replay: a discard needs a reason, and it is kept with the dead letter."
)
NOTHING_TO_REPLAY = "No open dead letters match: nothing to replay."
NOTHING_TO_DISCARD = "No open or replayed dead letters match: nothing to discard."

Replayer = Callable[[Sequence[DeadLetter]], ReplayReport]
OnReplayed = Callable[[DeadLetter], None]


class Refused(Exception):
    """Against the rules: nothing was done. ``message`` reads the same from every front end;
    ``kind`` lets a front end add how to ask on its side (``--force``, ``--reason``, ...)."""

    NO_REASON = "no-reason"
    MISSING = "missing"
    SETTLED = "settled"
    UNSELECTED = "unselected"
    TOO_MANY = "too-many"
    NOTHING = "nothing"
    NO_DESTINATION = "no-destination"

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def os_user() -> str:
    """Who is at the command line when they do not say (``--by``)."""
    for name in ("USER", "LOGNAME"):
        if os.environ.get(name):
            return os.environ[name]
    try:
        return getpass.getuser()
    except Exception:  # no name for this uid (a container's random one)
        return "unknown"


def cli_actor(by: str | None = None) -> Actor:
    return Actor(who=(by or "").strip() or os_user(), via=audit.CLI)


def _hashes(ids: Sequence[int]) -> str:
    return ", ".join(f"#{i}" for i in ids)


def _settled(rows: Sequence[dict[str, Any]], *, already: bool) -> str:
    parts = [
        f"#{row['id']} is {'already ' if already and row['status'] == DISCARDED else ''}"
        f"{row['status']}"
        for row in rows
    ]
    return "Dead letter " + ", ".join(parts)


@dataclass(frozen=True)
class Selection:
    """What a filtered action takes: ids oldest first (at most MAX_BULK), and how many match."""

    ids: list[int]
    total: int
    description: str
    verb: str
    """replay or discard"""
    destinations: dict[str, int] = field(default_factory=dict)
    """For a replay: where they go ("fm.events / shipment.lodged") and how many to each."""
    unreplayable: dict[int, str] = field(default_factory=dict)
    """For a replay: the matching ones that cannot be replayed, and why (not in ``ids``)."""

    @property
    def more(self) -> int:
        return max(0, self.total - len(self.ids) - len(self.unreplayable))

    @property
    def more_text(self) -> str:
        """What is left for another time, in words ("" when nothing is)."""
        if not self.more:
            return ""
        return (
            f"{self.more} more match: at most {MAX_BULK} are {self.verb}ed at once (oldest "
            f"first); {self.verb} again afterwards for the rest."
        )


@dataclass
class ReplayOutcome:
    asked: list[int]
    replayed: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)
    """No longer replayable when their turn came (settled meanwhile)."""
    refused: dict[int, str] = field(default_factory=dict)
    """None of its job's events: there is nowhere to send it."""
    not_tried: list[int] = field(default_factory=list)
    """Left after the broker refused one: they stay as they were."""

    def problem(self, letter_id: int) -> str | None:
        """Why this one was not replayed (None: it was)."""
        if letter_id in self.replayed:
            return None
        if letter_id in self.failed:
            return self.failed[letter_id]
        if letter_id in self.refused:
            return self.refused[letter_id]
        if letter_id in self.skipped:
            return f"dead letter {letter_id} was discarded or resolved meanwhile"
        return f"dead letter {letter_id} was not tried after the broker refused another"

    def result(self) -> str:
        """For the audit log."""
        if len(self.asked) == 1:
            [only] = self.asked
            problem = self.problem(only)
            return "replayed: confirmed by the broker" if problem is None else f"failed: {problem}"
        text = f"replayed {len(self.replayed)}"
        if self.failed:
            text += f"; failed: {'; '.join(self.failed.values())}"
        if self.refused:
            text += f"; {len(self.refused)} refused (none of their job's events)"
        left = len(self.skipped) + len(self.not_tried)
        if left:
            text += f"; {left} not replayed (no longer open, or not tried after a failure)"
        return text


@dataclass
class DiscardOutcome:
    asked: list[int]
    reason: str
    by: str
    discarded: list[int] = field(default_factory=list)
    unchanged: dict[int, str] = field(default_factory=dict)
    """Settled meanwhile: id → its status."""

    def result(self) -> str:
        """For the audit log."""
        if len(self.asked) == 1:
            if self.discarded:
                return "discarded"
            status = next(iter(self.unchanged.values()), "gone")
            return f"unchanged: it was already {status}"
        text = f"discarded {len(self.discarded)}"
        if self.unchanged:
            text += f"; {len(self.unchanged)} unchanged (already discarded or resolved)"
        return text


class Freshness:
    """Collects new dead letters from the broker before the desk selects or acts, at most
    every ``interval`` seconds; after a failure, every ``backoff`` seconds, with a warning
    meanwhile (the desk then works on what is stored)."""

    def __init__(
        self,
        store: StateStore,
        broker_url: str,
        *,
        interval: float,
        backoff: float,
        collect: Callable[[StateStore, str], Any],
    ) -> None:
        self.store = store
        self.broker_url = broker_url
        self.interval = interval
        self.backoff = backoff
        self._collect = collect
        self._lock = threading.Lock()
        self._last: float | None = None
        self._warning: str | None = None
        self.collected: Collected | None = None
        """What the last collection found (the test seams may return nothing)."""

    def refresh(self) -> str | None:
        with self._lock:
            now = time.monotonic()
            wait = self.backoff if self._warning else self.interval
            if self._last is not None and now - self._last < wait:
                return self._warning
            try:
                found = self._collect(self.store, self.broker_url)
            except Exception as exc:
                # The exception's text stays in the log: the console shows this to viewers.
                self._warning = (
                    f"could not collect new dead letters from the broker at "
                    f"{redact_url(self.broker_url)} ({type(exc).__name__}): showing what is "
                    "stored; dead letters wait safely in the broker until collected"
                )
                self.collected = None
                log.warning("collecting dead letters failed", error=f"{type(exc).__name__}: {exc}")
            else:
                self._warning = None
                self.collected = found if isinstance(found, Collected) else None
            self._last = time.monotonic()
            return self._warning


class _Sender:
    """Sends dead letters for one action: the broker is asked once whether it can be reached
    (and the topology declared) when the first one goes, and one publisher serves them all."""

    def __init__(self, desk: DeadLetterDesk) -> None:
        self.desk = desk
        self.publisher: Publisher | None = None
        self.problem: str | None = None

    def __call__(
        self, letters: Sequence[DeadLetter], on_replayed: OnReplayed | None
    ) -> ReplayReport:
        desk = self.desk
        if not letters:
            return ReplayReport()
        if desk.replayer is not None:
            report = desk.replayer(letters)
            for letter in letters:
                if on_replayed is not None and letter.id in report.replayed:
                    on_replayed(letter)
            return report
        if self.publisher is None and self.problem is None:
            self.problem = desk.broker_unreachable()
            if self.problem is None:
                declare_topology(desk.broker_url, desk.retry_delays)
                self.publisher = Publisher(desk.broker_url)
        if self.publisher is None:  # say so now, not after kombu's 24 s of retries
            report = ReplayReport()
            report.failed[letters[0].id] = (
                f"the broker at {redact_url(desk.broker_url)} cannot be reached "
                f"({self.problem}); nothing was replayed, and the dead letter(s) stay as they were"
            )
            return report
        return replay(
            desk.store,
            self.publisher,
            letters,
            patience=desk.replay_patience,
            on_replayed=on_replayed,
        )

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()


class DeadLetterDesk:
    """Replays and discards dead letters by the rules, auditing each action.

    ``collect=None`` skips collecting (``--no-collect``); ``collect`` and ``replayer`` are
    also the test seams for the broker's side of things."""

    def __init__(
        self,
        store: StateStore,
        broker_url: str,
        *,
        retry_delays: Sequence[int] | None = None,
        replay_patience: float = 60.0,
        collect: Callable[[StateStore, str], Any] | None = collect_letters,
        collect_interval: float = 3.0,
        collect_backoff: float = 30.0,
        replayer: Replayer | None = None,
    ) -> None:
        self.store = store
        self.broker_url = broker_url
        self.retry_delays = retry_delays
        self.replay_patience = replay_patience
        self.replayer = replayer
        self.freshness = (
            None
            if collect is None
            else Freshness(
                store,
                broker_url,
                interval=collect_interval,
                backoff=collect_backoff,
                collect=collect,
            )
        )
        self._replay_lock = threading.Lock()
        ensure_table(store)
        audit.ensure_table(store)

    # --- collecting ------------------------------------------------------------------------------

    def collect_first(self) -> str | None:
        """Collect (unless done lately); a warning when the broker could not be reached."""
        return None if self.freshness is None else self.freshness.refresh()

    @property
    def collected(self) -> Collected | None:
        return None if self.freshness is None else self.freshness.collected

    # --- the rules -------------------------------------------------------------------------------

    @staticmethod
    def reason(text: str) -> str:
        """The reason a discard keeps, or Refused."""
        reason = " ".join((text or "").split())[:MAX_REASON]
        if not reason:
            raise Refused(Refused.NO_REASON, REASON_REQUIRED)
        return reason

    def _check_ids(
        self,
        ids: Sequence[int],
        within: Filter | None,
        *,
        allowed: Sequence[str],
        verb: str,
        already: bool,
    ) -> list[dict[str, Any]]:
        unique = sorted(set(ids))
        if not unique:
            raise Refused(
                Refused.UNSELECTED, f"Nothing selected: say which dead letters to {verb}."
            )
        if len(unique) > MAX_BULK:
            raise Refused(
                Refused.TOO_MANY,
                f"At most {MAX_BULK} dead letters are {verb}ed at once: ask for fewer.",
            )
        self.collect_first()
        where = replace(within or Filter(), ids=unique, statuses=())
        rows = {row["id"]: row for row in summaries(self.store, where, newest_first=False)}
        missing = [i for i in unique if i not in rows]
        if missing:
            raise Refused(
                Refused.MISSING, f"There is no dead letter {_hashes(missing)}: nothing {verb}ed."
            )
        settled = [rows[i] for i in unique if rows[i]["status"] not in allowed]
        if settled:
            raise Refused(
                Refused.SETTLED, f"{_settled(settled, already=already)}: nothing {verb}ed."
            )
        return [rows[i] for i in unique]

    def _select(
        self, where: Filter, statuses: Sequence[str], *, verb: str, everything: bool
    ) -> Selection:
        if not (where.narrows or everything):
            raise Refused(
                Refused.UNSELECTED,
                f"Nothing selected: say which dead letters to {verb} "
                "(ids, a filter, or all of them).",
            )
        self.collect_first()
        chosen = replace(where, ids=(), statuses=tuple(statuses))
        ids = find_ids(self.store, chosen, limit=MAX_BULK)
        total = len(ids) if len(ids) < MAX_BULK else count(self.store, chosen)
        selection = Selection(ids, total, chosen.describe(), verb)
        if verb == "replay" and ids:
            for letter in find(self.store, Filter(ids=ids)):
                goes_to = letter.goes_to
                if goes_to.startswith("nowhere: "):
                    selection.unreplayable[letter.id] = goes_to.removeprefix("nowhere: ")
                else:
                    selection.destinations[goes_to] = selection.destinations.get(goes_to, 0) + 1
            selection.ids[:] = [i for i in ids if i not in selection.unreplayable]
        return selection

    @staticmethod
    def _bulk(ids: Sequence[int], *, verb: str, nothing: str) -> list[int]:
        unique = sorted(set(ids))
        if not unique:
            raise Refused(Refused.NOTHING, nothing)
        if len(unique) > MAX_BULK:
            raise Refused(
                Refused.TOO_MANY,
                f"At most {MAX_BULK} dead letters are {verb}ed at once: ask for fewer.",
            )
        return unique

    @staticmethod
    def _target(rows: Sequence[dict[str, Any]]) -> tuple[str, int | None]:
        if len(rows) == 1:
            [row] = rows
            return (
                f"dead letter {row['id']} ({row['consumer']}, {row['client_id'] or '-'}, "
                f"{row['error_type']}, was {row['status']})",
                int(row["id"]),
            )
        return f"dead letters {', '.join(str(row['id']) for row in rows)}", None

    # --- replaying -------------------------------------------------------------------------------

    def check_replay(
        self, ids: Sequence[int], *, force: bool = False, within: Filter | None = None
    ) -> list[dict[str, Any]]:
        """The dead letters (list rows) a replay of these ids would send, or Refused."""
        allowed = STATUSES if force else UNSETTLED
        rows = self._check_ids(ids, within, allowed=allowed, verb="replay", already=False)
        nowhere = [
            f"{letter.id} cannot be replayed: {letter.goes_to.removeprefix('nowhere: ')}"
            for letter in find(self.store, Filter(ids=[row["id"] for row in rows]))
            if letter.goes_to.startswith("nowhere: ")
        ]
        if nowhere:
            raise Refused(
                Refused.NO_DESTINATION,
                f"Dead letter {'; '.join(nowhere)}: nothing replayed. A replay goes only to "
                "its job's queue, as one of the job's events.",
            )
        return rows

    def replay(
        self,
        ids: Sequence[int],
        actor: Actor,
        *,
        force: bool = False,
        within: Filter | None = None,
        on_replayed: OnReplayed | None = None,
    ) -> ReplayOutcome:
        """Replay these dead letters (resolved or discarded ones only when ``force``)."""
        rows = self.check_replay(ids, force=force, within=within)
        target, letter_id = self._target(rows)
        return self._replay(
            [row["id"] for row in rows],
            STATUSES if force else UNSETTLED,
            actor,
            action="replay",
            target=target,
            letter_id=letter_id,
            on_replayed=on_replayed,
        )

    def select_replay(self, where: Filter, *, everything: bool = False) -> Selection:
        """The open dead letters a filtered replay takes (to confirm, or for a dry run)."""
        return self._select(where, (OPEN,), verb="replay", everything=everything)

    def replay_selected(
        self,
        ids: Sequence[int],
        actor: Actor,
        *,
        description: str,
        on_replayed: OnReplayed | None = None,
    ) -> ReplayOutcome:
        """Replay a confirmed selection: each one only if it is still open."""
        unique = self._bulk(ids, verb="replay", nothing="Nothing to replay.")
        return self._replay(
            unique,
            (OPEN,),
            actor,
            action="replay-filtered",
            target=f"{description}: dead letters {', '.join(map(str, unique))}",
            letter_id=None,
            on_replayed=on_replayed,
        )

    def _replay(
        self,
        ids: list[int],
        statuses: Sequence[str],
        actor: Actor,
        *,
        action: str,
        target: str,
        letter_id: int | None,
        on_replayed: OnReplayed | None,
    ) -> ReplayOutcome:
        entry = audit.start(self.store, actor, action=action, target=target, letter_id=letter_id)
        outcome = ReplayOutcome(asked=ids)
        sender = _Sender(self)
        try:
            with self._replay_lock:  # one replay at a time: ordering, and one connection
                for start in range(0, len(ids), CHUNK):
                    chunk = ids[start : start + CHUNK]
                    letters = find(self.store, Filter(ids=chunk, statuses=tuple(statuses)))
                    loaded = {letter.id for letter in letters}
                    outcome.skipped += [i for i in chunk if i not in loaded]
                    report = sender(letters, on_replayed)
                    outcome.replayed += report.replayed
                    outcome.failed.update(report.failed)
                    outcome.refused.update(report.refused)
                    if report.failed:
                        break
        except Exception as exc:
            audit.finish(self.store, entry, f"failed: {type(exc).__name__}: {exc}")
            raise
        finally:
            sender.close()
        done = {*outcome.replayed, *outcome.failed, *outcome.skipped, *outcome.refused}
        outcome.not_tried = [i for i in ids if i not in done]
        audit.finish(self.store, entry, outcome.result())
        return outcome

    def broker_unreachable(self) -> str | None:
        try:
            with connect(self.broker_url) as conn:
                conn.connect()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    # --- discarding ------------------------------------------------------------------------------

    def discard(
        self, ids: Sequence[int], actor: Actor, reason: str, *, within: Filter | None = None
    ) -> DiscardOutcome:
        """Discard these dead letters, saying why; none may be resolved or discarded."""
        text = self.reason(reason)
        rows = self._check_ids(ids, within, allowed=UNSETTLED, verb="discard", already=True)
        target, letter_id = self._target(rows)
        return self._discard(
            [row["id"] for row in rows],
            actor,
            text,
            action="discard",
            target=target,
            letter_id=letter_id,
        )

    def select_discard(self, where: Filter, *, everything: bool = False) -> Selection:
        """The open and replayed dead letters a filtered discard takes."""
        return self._select(where, UNSETTLED, verb="discard", everything=everything)

    def discard_selected(
        self, ids: Sequence[int], actor: Actor, reason: str, *, description: str
    ) -> DiscardOutcome:
        """Discard a selection: each one only if it is still open or replayed."""
        text = self.reason(reason)
        unique = self._bulk(ids, verb="discard", nothing="Nothing to discard.")
        return self._discard(
            unique,
            actor,
            text,
            action="discard-filtered",
            target=f"{description}: dead letters {', '.join(map(str, unique))}",
            letter_id=None,
        )

    def _discard(
        self,
        ids: list[int],
        actor: Actor,
        reason: str,
        *,
        action: str,
        target: str,
        letter_id: int | None,
    ) -> DiscardOutcome:
        entry = audit.start(
            self.store, actor, action=action, target=target, letter_id=letter_id, reason=reason
        )
        outcome = DiscardOutcome(asked=ids, reason=reason, by=actor.who)
        try:
            outcome.discarded = discard(self.store, ids, reason=reason, by=actor.who)
            others = [i for i in ids if i not in outcome.discarded]
            if others:
                outcome.unchanged = {
                    row["id"]: row["status"]
                    for row in summaries(self.store, Filter(ids=others), newest_first=False)
                }
        except Exception as exc:
            audit.finish(self.store, entry, f"failed: {type(exc).__name__}: {exc}")
            raise
        audit.finish(self.store, entry, outcome.result())
        return outcome
