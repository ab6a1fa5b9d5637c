"""Producers and support tools on the ``cscart-fm`` command: ``tick``, ``publish``, ``dlq``.

Written for support staff first: tables and plain sentences that say what happened and what
to do; ``--json`` on every command for scripts. Exit codes: 0 done, 1 the broker or the
store failed us, 2 what was asked is wrong (a bad event, an unknown client or id).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Annotated, Any

import structlog
import typer

from consumers.registry import JOBS
from cscart_fm.cli.console import register as register_console
from cscart_fm.cli.output import echo
from cscart_fm.cli.wiring import open_state
from cscart_fm.core.broker import Publisher
from cscart_fm.core.clients import load_clients
from cscart_fm.core.config import Environment, read_environment, redact_url
from cscart_fm.core.errors import InvalidMessage, SettingsError
from cscart_fm.core.observability import configure_logging, register_secret
from cscart_fm.core.state import StateStore
from cscart_fm.support.dead_letters.collect import DeadLetterCollector, collect
from cscart_fm.support.dead_letters.desk import (
    NOTHING_TO_DISCARD,
    NOTHING_TO_REPLAY,
    DeadLetterDesk,
    Refused,
    cli_actor,
)
from cscart_fm.support.dead_letters.replay import declare_topology
from cscart_fm.support.dead_letters.store import (
    OPEN,
    REPLAYED,
    STATUSES,
    DeadLetter,
    Filter,
    count,
    find,
    get,
    iter_ids,
    stats,
)
from producers.publish import CannotRead, publish_event, read_source, validate
from producers.tick import Schedule, load_targets, run_loop, tick_once

log = structlog.get_logger("cscart_fm.support")

JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    echo(f"cscart-fm: {message}", err=True)
    return typer.Exit(code)


class _CurrentStderr:
    """Log lines go to whatever ``sys.stderr`` is when they are written."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _environment(*, for_people: bool) -> Environment:

    try:
        env = read_environment()
    except SettingsError as exc:
        raise _fail(str(exc)) from None
    if for_people:  # quiet, readable logs unless asked otherwise
        level = os.environ.get("CSCART_FM_LOG_LEVEL", "WARNING").strip().upper() or "WARNING"
        fmt = os.environ.get("CSCART_FM_LOG_FORMAT", "console").strip().lower() or "console"
        configure_logging(level, fmt, stream=_CurrentStderr())
    else:
        configure_logging(env.log_level, env.log_format, stream=_CurrentStderr())
    return env


def _print_json(value: Any) -> None:
    echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))


# --- tick ------------------------------------------------------------------------------------


def tick(
    clients: Annotated[
        list[str] | None,
        typer.Argument(help="client_ids to tick (default: every client in the clients file)."),
    ] = None,
    every: Annotated[
        float | None,
        typer.Option(
            "--every",
            min=1.0,
            help="Keep running: wake every SECONDS and tick each client whose "
            "orders.poll_interval_seconds elapsed. SIGTERM stops it (exit 0).",
        ),
    ] = None,
    due: Annotated[
        bool,
        typer.Option(
            "--due",
            help="Once: tick only the clients whose poll interval elapsed since their last "
            "tick (remembered in the state store), for a CronJob that runs more often.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Publish an order-poll tick per client (once, or --every SECONDS), with confirms."""

    env = _environment(for_people=every is None)
    try:
        targets = load_targets(env.clients_path, clients or ())
    except SettingsError as exc:
        raise _fail(str(exc)) from None
    if not targets:
        raise _fail("the clients file has no clients to tick")
    declare_topology(env.broker_url, env.retry_delays)
    # No heartbeats: between rounds nobody services the connection, and a broker that missed
    # them would close it; a dead connection is replaced at the next publish anyway.
    publisher = Publisher(env.broker_url, heartbeat=0)
    store = _open_store(env, required=False) if (due or every is not None) else None
    try:
        schedule = Schedule(store) if store is not None or every is not None else None
        if every is None:
            try:
                sent = tick_once(publisher, targets, schedule=schedule, due_only=due)
            except Exception as exc:
                raise _fail(
                    f"the broker at {redact_url(env.broker_url)} did not confirm a tick "
                    f"({type(exc).__name__}: {exc}); run it again",
                    1,
                ) from None
            if as_json:
                _print_json(
                    [
                        {
                            "client_id": t.client_id,
                            "event_id": t.event_id,
                            "issued_at": t.issued_at.isoformat(),
                        }
                        for t in sent
                    ]
                )
            else:
                for t in sent:
                    echo(f"ticked {t.client_id} (event_id {t.event_id})")
                skipped = len(targets) - len(sent)
                if skipped:
                    echo(f"{skipped} client(s) not due yet")
            return
        stop = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("signal received: stopping the tick loop", signal=signum)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        assert schedule is not None
        log.info(
            "tick loop started",
            every_seconds=every,
            clients={t.client_id: t.interval for t in targets},
            broker=redact_url(env.broker_url),
        )
        published = run_loop(publisher, targets, every, schedule=schedule, wait=stop.wait)
        log.info("tick loop stopped", published=published)
    finally:
        publisher.close()
        if store is not None:
            store.close()


# --- publish ---------------------------------------------------------------------------------


def publish(
    source: Annotated[str, typer.Argument(help="A JSON file with one event, or - for stdin.")],
    as_json: JsonOption = False,
) -> None:
    """Validate one JSON event and publish it where the contract says, with confirms.

    order-poll.tick, shipment.lodged and stock.snapshot go to fm.events, order.imported to
    fm.orders. A bad event is refused (exit 2) naming the field, and nothing is published.
    """

    env = _environment(for_people=True)
    try:
        body, event = validate(read_source(source))
    except CannotRead as exc:
        raise _fail(str(exc)) from None
    except InvalidMessage as exc:
        raise _fail(f"refused, nothing published: the event is not valid: {exc.reason}") from None
    declare_topology(env.broker_url, env.retry_delays)
    publisher = Publisher(env.broker_url)
    try:
        exchange, routing_key = publish_event(publisher, body, event)
    except Exception as exc:
        raise _fail(
            f"the broker at {redact_url(env.broker_url)} did not confirm the event "
            f"({type(exc).__name__}: {exc}); it may not have been published: publish it again",
            1,
        ) from None
    finally:
        publisher.close()
    result = {
        "schema": event.schema_name,
        "event_id": event.event_id,
        "client_id": event.client_id,
        "exchange": exchange,
        "routing_key": routing_key,
        "confirmed": True,
    }
    if as_json:
        _print_json(result)
    else:
        echo(
            f"published {event.schema_name} for client {event.client_id} "
            f"(event_id {event.event_id}) to {exchange} / {routing_key}: confirmed by the broker"
        )


# --- dlq -------------------------------------------------------------------------------------

dlq_app = typer.Typer(
    no_args_is_help=True,
    help="Dead letters: what failed, why, and what to do (list, show, replay, discard, stats). "
    "Every command first collects new dead letters from the broker. Replays and discards "
    "follow the support console's rules and go to its audit log.",
)

ConsumerOption = Annotated[
    str | None, typer.Option("--consumer", help=" | ".join(JOBS.names))
]
ClientOption = Annotated[str | None, typer.Option("--client", help="A client_id.")]
TypeOption = Annotated[
    str | None, typer.Option("--type", help="An error type, e.g. not-found, unknown-client.")
]
SinceOption = Annotated[
    str | None,
    typer.Option("--since", help="Dead-lettered on or after (ISO date or time, UTC if no offset)."),
]
UntilOption = Annotated[
    str | None,
    typer.Option("--until", help="Dead-lettered before (an ISO date includes that whole day)."),
]
NoCollectOption = Annotated[
    bool,
    typer.Option("--no-collect", help="Do not collect new dead letters from the broker first."),
]


def _open_store(env: Environment, *, required: bool = True) -> StateStore | None:

    try:
        return open_state(env.state_url)
    except Exception as exc:
        if required:
            raise _fail(
                f"cannot open the state store {redact_url(env.state_url)} "
                f"({type(exc).__name__}: {exc})",
                1,
            ) from None
        log.warning("state store unavailable", error=f"{type(exc).__name__}: {exc}")
        return None


def _secrets_known() -> bool:
    """Whether every client's API key is registered for masking (the clients file read): a
    dead letter's headers are shown only then (``DeadLetter.details``)."""
    try:
        clients = load_clients(read_environment().clients_path)
    except SettingsError:
        return False
    for settings in clients.values():
        register_secret(settings.api_key.get_secret_value())
    return True


def _open_desk(no_collect: bool) -> DeadLetterDesk:
    """The dead-letter desk the console uses too, on the state store; it collects first."""

    env = _environment(for_people=True)
    store = _open_store(env)
    assert store is not None
    desk = DeadLetterDesk(
        store,
        env.broker_url,
        retry_delays=env.retry_delays,
        collect=None if no_collect else collect,
        # A command is short: this one collection serves the desk's "collect first" for it.
        collect_interval=math.inf,
        collect_backoff=math.inf,
    )
    warning = desk.collect_first()
    if warning:
        echo(f"warning: {warning}", err=True)
    elif desk.collected is not None and desk.collected.total_new:
        echo(f"collected {desk.collected.total_new} new dead letter(s)", err=True)
    return desk


def _refused(refused: Refused, hints: dict[str, str]) -> typer.Exit:
    """The desk's refusal, word for word as the console says it, and how to ask here."""
    hint = hints.get(refused.kind)
    return _fail(f"{refused.message} ({hint})" if hint else refused.message)


_SELECT_HINT = "give ids, a filter (--client, --type, ...) or --all"


def _when(text: str | None, option: str, *, end: bool) -> datetime | None:
    if not text:
        return None
    try:
        if len(text) == 10:  # a date: the whole day, in UTC
            day = datetime.fromisoformat(text).replace(tzinfo=UTC)
            return day + timedelta(days=1) if end else day
        value = datetime.fromisoformat(text)
    except ValueError:
        raise _fail(
            f"{option}: expected an ISO date or time such as 2026-11-23 or "
            f"2026-11-23T10:00:00+11:00, got {text!r}"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _filter(
    *,
    ids: Sequence[str] = (),
    consumer: str | None,
    client: str | None,
    error_type: str | None,
    since: str | None,
    until: str | None,
    status: str,
) -> Filter:

    if consumer and consumer not in JOBS.names:
        raise _fail(f"--consumer: expected one of {', '.join(JOBS.names)}, got {consumer!r}")
    statuses = [s.strip() for s in status.split(",") if s.strip()]
    if statuses == ["all"]:
        statuses = list(STATUSES)
    bad = [s for s in statuses if s not in STATUSES]
    if bad or not statuses:
        raise _fail(f"--status: expected all or some of {', '.join(STATUSES)}, got {status!r}")
    try:
        id_list = list(iter_ids(ids))
    except ValueError as exc:
        raise _fail(str(exc)) from None
    return Filter(
        ids=id_list,
        consumer=consumer,
        client_id=client,
        error_type=error_type,
        since=_when(since, "--since", end=False),
        until=_when(until, "--until", end=True),
        statuses=statuses,
    )


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _moment(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _list_rows(letters: Sequence[DeadLetter]) -> list[list[str]]:
    rows = []
    for letter in letters:
        summary = letter.summary()
        rows.append(
            [
                str(letter.id),
                _moment(letter.dead_lettered_at),
                letter.consumer,
                letter.client_id or "-",
                letter.error_type,
                _short(summary["reason"], 60),
                letter.status,
            ]
        )
    return rows


LIST_HEADERS = ("ID", "DEAD-LETTERED (UTC)", "CONSUMER", "CLIENT", "ERROR TYPE", "REASON", "STATUS")


@dlq_app.command("list")
def dlq_list(
    consumer: ConsumerOption = None,
    client: ClientOption = None,
    error_type: TypeOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    status: Annotated[
        str,
        typer.Option(
            "--status",
            help="open, replayed, discarded, resolved (comma-separated), or all.",
        ),
    ] = "open",
    limit: Annotated[int, typer.Option("--limit", min=1, help="Show at most this many.")] = 100,
    as_json: JsonOption = False,
    no_collect: NoCollectOption = False,
) -> None:
    """List dead letters, newest first (open ones unless --status says otherwise)."""

    where = _filter(
        consumer=consumer,
        client=client,
        error_type=error_type,
        since=since,
        until=until,
        status=status,
    )
    desk = _open_desk(no_collect)
    try:
        letters = find(desk.store, where, limit=limit, newest_first=True)
        total = count(desk.store, where)
    finally:
        desk.store.close()
    if as_json:
        _print_json([letter.summary() for letter in letters])
        return
    label = "/".join(where.statuses) if len(where.statuses) < 4 else "all"
    if not letters:
        echo(f"No {label} dead letters" + (" match." if where.narrows else "."))
        return
    echo(_table(LIST_HEADERS, _list_rows(letters)))
    shown = f"{len(letters)} of {total}" if total > len(letters) else str(total)
    echo(f"\n{shown} {label} dead letter(s). Details and what to do: cscart-fm dlq show ID")


def _show_text(letter: DeadLetter, reveal: bool, secrets_known: bool) -> str:
    details = letter.details(reveal=reveal, secrets_known=secrets_known)
    out = [f"Dead letter {letter.id}: {letter.status.upper()}", ""]
    out.append(f"What happened: {letter.what_happened}")
    out.append(f"  Error type: {letter.error_type}")
    out.append(f"  Reason: {details['reason']}")
    out.append(f"What to do: {details['action']}")
    if letter.status in ("open", "replayed"):
        out.append(f"  Once fixed:  cscart-fm dlq replay {letter.id}")
        out.append(f'  If not needed: cscart-fm dlq discard {letter.id} --reason "why"')
    out.append("")
    out.append(f"Attempts: {letter.attempts}")
    out.append(
        f"When: dead-lettered {_moment(letter.dead_lettered_at)} UTC, "
        f"collected {_moment(letter.collected_at)} UTC"
    )
    out.append(
        f"Message: {letter.message_schema or 'no schema header'}, "
        f"message_id {letter.message_id or '-'}, client {letter.client_id or '-'}"
    )
    out.append(
        f"Goes to: {letter.goes_to} (where a replay sends it)"
    )
    if letter.replay_count:
        out.append(
            f"Replayed: {letter.replay_count} time(s), last {_moment(letter.last_replayed_at)} UTC"
        )
    else:
        out.append("Replayed: not yet")
    if letter.previous_replays or letter.replay_of:
        earlier = f" (from dead letter {letter.replay_of})" if letter.replay_of else ""
        out.append(
            f"  This message had been replayed {letter.previous_replays} time(s) before "
            f"and failed again{earlier}."
        )
    if letter.status == "discarded":
        out.append(
            f"Discarded: by {letter.discarded_by or '-'} at {_moment(letter.discarded_at)} UTC, "
            f"because: {letter.discard_reason}"
        )
    if letter.status == "resolved":
        out.append(
            f"Resolved: {_moment(letter.resolved_at)} UTC, a later message for the same "
            f"{letter.key or 'key'} succeeded ({letter.resolved_by or '-'})"
        )
    out.append("")
    deaths = letter.x_death
    if deaths:
        out.append("History (x-death, the broker's record, most recent first):")
        for death in deaths:
            keys = ",".join(str(k) for k in death.get("routing-keys") or [])
            when = _moment(_iso_to_dt(death.get("time")))
            out.append(
                f"  {when} UTC  queue {death.get('queue')}: {death.get('reason')} "
                f"×{death.get('count')} (came from {death.get('exchange') or '(default)'} / {keys})"
            )
    else:
        out.append("History (x-death): none (cscart-fm dead-lettered it itself: see the reason)")
    out.append("")
    masked = "" if reveal else " (shoppers' personal data masked; --reveal shows it)"
    out.append(f"Payload{masked}:")
    payload = details["payload"]
    text = (
        json.dumps(payload, indent=2, ensure_ascii=False)
        if not isinstance(payload, str)
        else payload
    )
    out.extend(f"  {line}" for line in text.splitlines() or [""])
    return "\n".join(out)


def _iso_to_dt(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


@dlq_app.command("show")
def dlq_show(
    letter_id: Annotated[str, typer.Argument(metavar="ID", help="The id from dlq list.")],
    reveal: Annotated[
        bool, typer.Option("--reveal", help="Show shoppers' personal data unmasked.")
    ] = False,
    as_json: JsonOption = False,
    no_collect: NoCollectOption = False,
) -> None:
    """Show one dead letter: what happened, what to do, attempts, history and payload."""

    try:
        [number] = list(iter_ids([letter_id]))
    except ValueError as exc:
        raise _fail(str(exc)) from None
    desk = _open_desk(no_collect)
    try:
        letter = get(desk.store, number)
    finally:
        desk.store.close()
    if letter is None:
        raise _fail(f"no dead letter {number} (cscart-fm dlq list --status all lists them)")
    if reveal:
        log.info("dead letter shown with personal data", dead_letter=number)
    if as_json:
        _print_json(letter.details(reveal=reveal, secrets_known=_secrets_known()))
    else:
        echo(_show_text(letter, reveal, _secrets_known()))


@dlq_app.command("replay")
def dlq_replay(
    ids: Annotated[
        list[str] | None, typer.Argument(metavar="[ID]...", help="Ids to replay.")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Replay every open dead letter.")] = False,
    consumer: ConsumerOption = None,
    client: ClientOption = None,
    error_type: TypeOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="Also replay ids that are discarded or resolved.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only list what would be replayed.")
    ] = False,
    as_json: JsonOption = False,
    no_collect: NoCollectOption = False,
) -> None:
    """Send dead letters back to their consumer: ids, a filter, or --all open ones.

    Each is republished to its original exchange and routing key and marked replayed only
    once the broker confirmed it; it is resolved when the consumer then succeeds. A filter
    takes at most 500 at once, oldest first. Audited (the console's audit log shows it).
    """

    where = _filter(
        ids=ids or (),
        consumer=consumer,
        client=client,
        error_type=error_type,
        since=since,
        until=until,
        status="all" if ids else OPEN,
    )
    hints = {Refused.SETTLED: "add --force to replay anyway", Refused.UNSELECTED: _SELECT_HINT}
    desk = _open_desk(no_collect)
    try:
        try:
            unreplayable: dict[int, str] = {}
            if ids:
                rows = desk.check_replay(where.ids, force=force, within=where)
                chosen, more_text = [int(row["id"]) for row in rows], ""
            else:
                selection = desk.select_replay(where, everything=all_)
                chosen, more_text = selection.ids, selection.more_text
                unreplayable = selection.unreplayable
        except Refused as refused:
            raise _refused(refused, hints) from None
        if dry_run or not chosen:
            if as_json:
                _print_json({"would_replay" if dry_run else "replayed": chosen})
            elif not chosen:
                echo(NOTHING_TO_REPLAY)
            else:
                letters = find(desk.store, Filter(ids=chosen))
                echo(_table(LIST_HEADERS, _list_rows(letters)))
                echo(f"\n{len(chosen)} dead letter(s) would be replayed.")
                for goes_to, n in Counter(letter.goes_to for letter in letters).items():
                    echo(f"  to {goes_to}: {n}")
                for letter_id, why in unreplayable.items():
                    echo(f"  not dead letter {letter_id}: {why}")
                if more_text:
                    echo(more_text)
            return

        def said(letter: DeadLetter) -> None:
            if not as_json:
                echo(
                    f"replayed {letter.id} ({letter.consumer}, {letter.client_id or '-'}, "
                    f"{letter.error_type}) to {letter.goes_to}: confirmed"
                )

        actor = cli_actor()
        try:
            if ids:
                outcome = desk.replay(chosen, actor, force=force, within=where, on_replayed=said)
            else:
                outcome = desk.replay_selected(
                    chosen, actor, description=where.describe(), on_replayed=said
                )
        except Refused as refused:
            raise _refused(refused, hints) from None
    finally:
        desk.store.close()
    if as_json:
        _print_json(
            {
                "replayed": outcome.replayed,
                "failed": outcome.failed,
                "not_tried": outcome.not_tried,
                "skipped": outcome.skipped,
                "refused": {**unreplayable, **outcome.refused},
            }
        )
    else:
        echo(f"{len(outcome.replayed)} replayed.")
        for message in outcome.failed.values():
            echo(f"FAILED: {message}", err=True)
        if outcome.skipped:
            echo(
                f"Skipped (discarded or resolved meanwhile): "
                f"{', '.join(map(str, outcome.skipped))}.",
                err=True,
            )
        for letter_id, why in {**unreplayable, **outcome.refused}.items():
            echo(f"Not replayed: dead letter {letter_id}: {why}", err=True)
        if outcome.not_tried:
            echo(
                "Not tried (the broker is not taking messages): "
                f"{', '.join(map(str, outcome.not_tried))}."
                " They stay as they were: replay them again later.",
                err=True,
            )
        if more_text:
            echo(more_text)
    if outcome.failed:
        raise typer.Exit(1)


@dlq_app.command("discard")
def dlq_discard(
    ids: Annotated[
        list[str] | None, typer.Argument(metavar="[ID]...", help="Ids to discard.")
    ] = None,
    reason: Annotated[
        str, typer.Option("--reason", help="Why it needs no replay (kept with the dead letter).")
    ] = "",
    by: Annotated[
        str | None, typer.Option("--by", help="Who discards it (default: $USER).")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Discard every open dead letter.")] = False,
    consumer: ConsumerOption = None,
    client: ClientOption = None,
    error_type: TypeOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    as_json: JsonOption = False,
    no_collect: NoCollectOption = False,
) -> None:
    """Mark dead letters as not needing a replay, with the reason (kept for good).

    Resolved and discarded ones are refused; a filter takes at most 500 at once (open and
    replayed ones, oldest first). Audited (the console's audit log shows it).
    """

    hints = {
        Refused.NO_REASON: '--reason is required, e.g. --reason "FM resent the shipment"',
        Refused.UNSELECTED: _SELECT_HINT,
    }
    try:
        said_why = DeadLetterDesk.reason(reason)
    except Refused as refused:
        raise _refused(refused, hints) from None
    where = _filter(
        ids=ids or (),
        consumer=consumer,
        client=client,
        error_type=error_type,
        since=since,
        until=until,
        status="all" if ids else f"{OPEN},{REPLAYED}",
    )
    actor = cli_actor(by)
    more_text = ""
    desk = _open_desk(no_collect)
    try:
        try:
            if ids:
                outcome = desk.discard(where.ids, actor, said_why, within=where)
            else:
                selection = desk.select_discard(where, everything=all_)
                more_text = selection.more_text
                if not selection.ids:
                    if as_json:
                        _print_json(
                            {"discarded": [], "unchanged": {}, "reason": said_why, "by": actor.who}
                        )
                    else:
                        echo(NOTHING_TO_DISCARD)
                    return
                outcome = desk.discard_selected(
                    selection.ids, actor, said_why, description=selection.description
                )
        except Refused as refused:
            raise _refused(refused, hints) from None
    finally:
        desk.store.close()
    if as_json:
        _print_json(
            {
                "discarded": outcome.discarded,
                "unchanged": outcome.unchanged,
                "reason": outcome.reason,
                "by": outcome.by,
            }
        )
        return
    if outcome.discarded:
        echo(
            f"discarded {', '.join(map(str, outcome.discarded))} (by {outcome.by}): "
            f"{outcome.reason}"
        )
    else:
        echo("Nothing discarded.")
    for letter_id, status in outcome.unchanged.items():
        echo(f"left {letter_id} as it is: already {status}")
    if more_text:
        echo(more_text)


@dlq_app.command("stats")
def dlq_stats(as_json: JsonOption = False, no_collect: NoCollectOption = False) -> None:
    """Counts: by status, and open ones by consumer, error type and client."""

    desk = _open_desk(no_collect)
    try:
        numbers = stats(desk.store)
    finally:
        desk.store.close()
    if as_json:
        _print_json(numbers)
        return
    echo(
        "Dead letters: " + ", ".join(f"{n} {status}" for status, n in numbers["by_status"].items())
    )
    groups = numbers["open_by_consumer_and_type"]
    if not groups:
        echo("Nothing open.")
        return
    echo("")
    echo(
        _table(
            ("CONSUMER", "ERROR TYPE", "OPEN", "OLDEST (UTC)"),
            [
                [
                    g["consumer"],
                    g["error_type"],
                    str(g["count"]),
                    _moment(_iso_to_dt(g["oldest"])),
                ]
                for g in groups
            ],
        )
    )
    echo("")
    echo(
        "Open by client: "
        + ", ".join(f"{client} {n}" for client, n in numbers["open_by_client"].items())
    )


@dlq_app.command("collect")
def dlq_collect(
    every: Annotated[
        float | None,
        typer.Option("--every", min=1.0, help="Keep collecting every SECONDS until SIGTERM."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Move new dead letters from the broker's .dlq queues into the state store.

    The other dlq commands do this first anyway; --every keeps doing it (a small Deployment).
    """

    env = _environment(for_people=every is None)
    store = _open_store(env)
    assert store is not None
    try:
        if every is None:
            try:
                found = collect(store, env.broker_url)
            except Exception as exc:
                raise _fail(
                    f"could not collect from {redact_url(env.broker_url)} "
                    f"({type(exc).__name__}: {exc})",
                    1,
                ) from None
            if as_json:
                _print_json({"new": found.new, "already_stored": found.already_stored})
            else:
                echo(f"collected {found.total_new} new dead letter(s)")
            return
        collector = DeadLetterCollector(store, env.broker_url, interval=every)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        collector.start()
        while not stop.wait(1.0):
            pass
        collector.stop()
    finally:
        store.close()


def register(app: typer.Typer) -> None:
    """Add ``tick``, ``publish``, the ``dlq`` group and the ``console`` to ``cscart-fm``."""

    app.command("tick")(tick)
    app.command("publish")(publish)
    app.add_typer(dlq_app, name="dlq")
    register_console(app)
