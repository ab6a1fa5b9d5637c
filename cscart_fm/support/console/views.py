"""The console's pages and actions. Each takes the console and the request, returns a response.

Reading goes through ``cscart_fm.support.dead_letters`` (its filter, masking, what-happened
text) and the jobs' tables. Replays and discards go through the dead-letter desk
(``console.desk``), the one the command line uses: its rules, its refusals, its audit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import sqlalchemy as sa
import structlog

from consumers.registry import JOBS
from cscart_fm.core.errors import ERROR_TYPES, BridgeError, Fate
from cscart_fm.support.console import overview as overview_data
from cscart_fm.support.console.http import Request, Response, redirect
from cscart_fm.support.dead_letters import audit
from cscart_fm.support.dead_letters import store as dl
from cscart_fm.support.dead_letters.audit import Actor
from cscart_fm.support.dead_letters.desk import NOTHING_TO_REPLAY, Refused
from cscart_fm.support.explain import consignments, explain_order, order_ref

if TYPE_CHECKING:
    from cscart_fm.support.console.server import Console

log = structlog.get_logger(__name__)

PAGE_SIZE = 25
MAX_PAGE_SIZE = 200
REFRESH_WHILE_REPLAYED = timedelta(minutes=2)
"""A replayed dead letter's page refreshes itself this long after the replay."""

_FATES = {cls.error_type: cls.fate for cls in ERROR_TYPES}
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DEATH_WORDS = {
    "expired": "waited out its retry delay in {queue} before the next attempt",
    "rejected": "was rejected in {queue}",
    "delivery_limit": "was delivered too many times from {queue} without finishing",
    "maxlen": "was pushed out of the full queue {queue}",
}
_DEATH_OTHER = "was dead-lettered from {queue} ({reason})"


# --- filters --------------------------------------------------------------------------------------


@dataclass
class FilterForm:
    """The list's filters as typed in the form (strings), and what they select."""

    status: str = dl.OPEN
    consumer: str = ""
    client: str = ""
    type: str = ""
    since: str = ""
    until: str = ""

    @classmethod
    def read(cls, values: Mapping[str, str]) -> tuple[FilterForm, list[str]]:
        problems: list[str] = []
        form = cls(**{f.name: values.get(f.name, "").strip() for f in fields(cls)})
        form.status = form.status or dl.OPEN
        if form.status not in (*dl.STATUSES, "all"):
            problems.append(f"Status {form.status!r} is not one of {', '.join(dl.STATUSES)}, all.")
            form.status = dl.OPEN
        if form.consumer and form.consumer not in JOBS.names:
            known = ", ".join(JOBS.names)
            problems.append(f"Consumer {form.consumer!r} is not one of {known}.")
            form.consumer = ""
        form.client = form.client[:200]
        form.type = form.type[:64]
        for name in ("since", "until"):
            value = getattr(form, name)
            if value and not _valid_date(value):
                problems.append(f"{name.title()} {value!r} is not a date (YYYY-MM-DD).")
                setattr(form, name, "")
        return form, problems

    def where(self, zone: Any, statuses: Sequence[str] | None = None) -> dl.Filter:
        """Dates are whole days in the console's time zone; ``until`` includes its day."""
        since = _day_start(self.since, zone) if self.since else None
        until = _day_start(self.until, zone, plus_days=1) if self.until else None
        if statuses is None:
            statuses = list(dl.STATUSES) if self.status == "all" else [self.status]
        return dl.Filter(
            consumer=self.consumer or None,
            client_id=self.client or None,
            error_type=self.type or None,
            since=since,
            until=until,
            statuses=statuses,
        )

    @property
    def narrowed(self) -> bool:
        return any((self.consumer, self.client, self.type, self.since, self.until))

    def items(self, *, with_status: bool = True) -> list[tuple[str, str]]:
        return [
            (f.name, getattr(self, f.name))
            for f in fields(self)
            if getattr(self, f.name) and (with_status or f.name != "status")
        ]

    def describe(self) -> str:
        parts = [f"{name} {value}" for name, value in self.items(with_status=False)]
        return "open, " + ", ".join(parts) if parts else "every open dead letter"


def _valid_date(text: str) -> bool:
    if not _DATE.match(text):
        return False
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def _day_start(text: str, zone: Any, plus_days: int = 0) -> datetime:
    day = datetime.fromisoformat(text) + timedelta(days=plus_days)
    return day.replace(tzinfo=zone)


def _int(value: str | None, default: int, low: int, high: int) -> int:
    try:
        number = int(value or "")
    except ValueError:
        return default
    return max(low, min(high, number))


# --- reading --------------------------------------------------------------------------------------


def summaries(
    console: Console, where: dl.Filter, *, offset: int, limit: int, newest_first: bool = True
) -> list[dict[str, Any]]:
    """One page of the list: no bodies or headers (a stock snapshot can be megabytes)."""
    return dl.summaries(console.store, where, offset=offset, limit=limit, newest_first=newest_first)


def _page_url(path: str, items: list[tuple[str, str]], page: int) -> str:
    return f"{path}?{urlencode([*items, ('page', str(page))])}"


def actor(request: Request) -> Actor:
    """Who acts, for the audit: the logged-in user, from the console, at their address."""
    user = request.require_user()
    return Actor(user.name, user.role, audit.CONSOLE, request.remote_addr)


def _collect_warning(console: Console) -> str | None:
    warning = console.desk.collect_first()
    return warning[:1].upper() + warning[1:] + "." if warning else None


def overview(console: Console, request: Request) -> Response:
    warning = _collect_warning(console)
    data = overview_data.build(console.store, console.clients, console.clock())
    return console.render(
        request,
        "overview.html",
        title="Overview",
        section="overview",
        overview=data,
        clients_error=console.clients_error,
        collect_warning=warning,
    )


def letters(console: Console, request: Request) -> Response:
    form, problems = FilterForm.read(request.query)
    per_page = _int(request.query.get("per_page"), PAGE_SIZE, 5, MAX_PAGE_SIZE)
    page = _int(request.query.get("page"), 1, 1, 10**6)
    warning = _collect_warning(console)
    where = form.where(console.zone)
    total = dl.count(console.store, where)
    rows = summaries(console, where, offset=(page - 1) * per_page, limit=per_page)
    pages = max(1, -(-total // per_page))
    open_matching = 0
    if request.user is not None and request.user.is_operator:
        open_matching = (
            total
            if form.status == dl.OPEN
            else dl.count(console.store, form.where(console.zone, [dl.OPEN]))
        )
    items = form.items()
    if per_page != PAGE_SIZE:
        items.append(("per_page", str(per_page)))
    first = (page - 1) * per_page + 1
    return console.render(
        request,
        "letters.html",
        title="Dead letters",
        section="letters",
        form=form,
        problems=problems,
        statuses=(*dl.STATUSES, "all"),
        consumers=JOBS.names,
        error_types=sorted(dl.ERROR_TITLES.items()),
        client_ids=sorted(console.clients or {}),
        rows=rows,
        total=total,
        first=first,
        last=first + len(rows) - 1,
        page=page,
        pages=pages,
        prev_url=_page_url("/letters", items, page - 1) if page > 1 else None,
        next_url=_page_url("/letters", items, page + 1) if page < pages else None,
        narrowed=form.narrowed,
        open_matching=open_matching,
        filter_fields=form.items(with_status=False),
        collect_warning=warning,
    )


def _fate_text(letter: dl.DeadLetter) -> str:
    fate = _FATES.get(letter.error_type)
    if fate is Fate.DEAD_LETTER:
        return (
            "This kind of error is not retried: it was dead-lettered at once, because a person "
            "has to act first."
        )
    if fate is Fate.RETRY:
        return (
            "This kind of error is retried automatically; it was dead-lettered after "
            f"{letter.attempts} attempt(s) failed."
        )
    if "cscart-error-type" not in letter.headers:
        return "The broker dead-lettered it itself."
    return ""


def _history(console: Console, letter: dl.DeadLetter) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for death in letter.x_death:
        when = overview_data.aware(death.get("time"))
        words = _DEATH_WORDS.get(str(death.get("reason")), _DEATH_OTHER)
        count = death.get("count")
        text = "The message " + words.format(queue=death.get("queue"), reason=death.get("reason"))
        if isinstance(count, int) and count > 1:
            text += f" ({count} times)"
        events.append({"at": when or letter.dead_lettered_at, "text": text + "."})
    events.append(
        {
            "at": letter.dead_lettered_at,
            "text": f"Dead-lettered by the {letter.consumer} consumer as {letter.error_type} after "
            f"{letter.attempts} attempt(s).",
        }
    )
    events.append({"at": letter.collected_at, "text": "Collected into the state store."})
    if letter.last_replayed_at is not None:
        events.append(
            {
                "at": letter.last_replayed_at,
                "text": f"Last replayed (replayed {letter.replay_count} time(s) in all).",
            }
        )
    if letter.discarded_at is not None:
        events.append(
            {
                "at": letter.discarded_at,
                "text": f"Discarded by {letter.discarded_by or '?'}: {letter.discard_reason}",
            }
        )
    if letter.resolved_at is not None:
        events.append(
            {
                "at": letter.resolved_at,
                "text": f"Resolved: a later message succeeded ({letter.resolved_by or '?'}).",
            }
        )
    for entry in audit.entries_for_letter(console.store, letter.id):
        reason = f" Reason: {entry.reason}." if entry.reason else ""
        who = (
            f"Console: {entry.who} ({entry.role})"
            if entry.via == audit.CONSOLE
            else f"Command line: {entry.who}"
        )
        events.append({"at": entry.at, "text": f"{who} — {entry.action}: {entry.result}." + reason})
    return sorted(events, key=lambda e: e["at"])


def _json_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def render_letter(
    console: Console, request: Request, letter: dl.DeadLetter, *, reveal: bool
) -> Response:
    details = letter.details(reveal=reveal, secrets_known=console.clients is not None)
    refresh = None
    if (
        not reveal
        and letter.status == dl.REPLAYED
        and letter.last_replayed_at is not None
        and console.clock() - letter.last_replayed_at < REFRESH_WHILE_REPLAYED
    ):
        refresh = 3
    key_kind = (letter.key or "").split(":", 1)[0]
    return console.render(
        request,
        "letter.html",
        title=f"Dead letter #{letter.id}",
        section="letters",
        letter=letter,
        details=details,
        error_title=dl.ERROR_TITLES.get(letter.error_type, letter.error_type),
        fate_text=_fate_text(letter),
        history=_history(console, letter),
        payload=console.hide_secrets(_json_text(details["payload"])),
        headers=console.hide_secrets(_json_text(details["headers"])),
        revealed=reveal,
        refresh=refresh,
        key_label=JOBS.key_labels().get(key_kind, "message"),
    )


def _letter_id(request: Request) -> int:
    return int(request.params["id"])


def letter(console: Console, request: Request) -> Response:
    found = dl.get(console.store, _letter_id(request))
    if found is None:
        return console.error(request, 404, "Not found", "There is no such dead letter.", "/letters")
    return render_letter(console, request, found, reveal=False)


# --- actions (operators only; POST with the CSRF token, checked before these run) -----------------


def reveal(console: Console, request: Request) -> Response:
    letter_id = _letter_id(request)
    found = dl.get(console.store, letter_id)
    if found is None:
        return console.error(request, 404, "Not found", "There is no such dead letter.", "/letters")
    who = actor(request)
    audit.start(
        console.store,
        who,
        action="reveal",
        letter_id=letter_id,
        target=f"dead letter {letter_id} ({found.consumer}, {found.client_id or '-'})",
        result="personal data shown",
    )
    log.info("console: personal data revealed", dead_letter=letter_id, by=who.who)
    return render_letter(console, request, found, reveal=True)


def replay(console: Console, request: Request) -> Response:
    letter_id = _letter_id(request)
    here = f"/letters/{letter_id}"
    found = dl.get(console.store, letter_id)
    if found is None:
        return console.error(request, 404, "Not found", "There is no such dead letter.", "/letters")
    try:
        outcome = console.desk.replay(
            [letter_id], actor(request), force=request.form.get("force") == "yes"
        )
    except Refused as refused:
        request.flash("error", refused.message)
        return redirect(here)
    problem = outcome.problem(letter_id)
    if problem is None:
        request.flash(
            "ok",
            f"Dead letter #{letter_id} replayed: the broker took it. It turns resolved once the "
            f"{found.consumer} consumer succeeds with it.",
        )
    else:
        request.flash("error", f"Not replayed: {problem}")
    return redirect(here)


def discard(console: Console, request: Request) -> Response:
    letter_id = _letter_id(request)
    here = f"/letters/{letter_id}"
    found = dl.get(console.store, letter_id)
    if found is None:
        return console.error(request, 404, "Not found", "There is no such dead letter.", "/letters")
    try:
        outcome = console.desk.discard([letter_id], actor(request), request.form.get("reason", ""))
    except Refused as refused:
        request.flash("error", refused.message)
        return redirect(here)
    if outcome.discarded:
        request.flash("ok", f"Dead letter #{letter_id} discarded.")
    else:  # settled between the check and the update
        status = outcome.unchanged.get(letter_id, found.status)
        request.flash("error", f"Nothing changed: dead letter #{letter_id} is {status}.")
    return redirect(here)


def replay_filtered(console: Console, request: Request) -> Response:
    form, problems = FilterForm.read(request.form)
    back = _page_url("/letters", form.items(), 1)
    if problems:
        request.flash("error", " ".join(problems))
        return redirect(back)
    where = form.where(console.zone, [dl.OPEN])
    if request.form.get("confirm") != "yes":
        # The confirmation is the explicit ask: with no filter, it names every open one.
        selection = console.desk.select_replay(where, everything=True)
        if not selection.ids:
            request.flash("error", NOTHING_TO_REPLAY)
            return redirect(back)
        selected = summaries(
            console,
            dl.Filter(ids=selection.ids, statuses=[dl.OPEN]),
            offset=0,
            limit=len(selection.ids),
            newest_first=False,
        )
        return console.render(
            request,
            "confirm_replay.html",
            title="Confirm replay",
            section="letters",
            letters=selected,
            ids=",".join(str(row["id"]) for row in selected),
            more=selection.more,
            more_text=selection.more_text,
            destinations=selection.destinations,
            unreplayable=selection.unreplayable,
            description=form.describe(),
            filter_fields=form.items(with_status=False),
            back_url=back,
        )
    try:
        ids = list(dl.iter_ids(x for x in request.form.get("ids", "").split(",") if x.strip()))
    except ValueError as exc:
        request.flash("error", str(exc))
        return redirect(back)
    try:
        outcome = console.desk.replay_selected(ids, actor(request), description=where.describe())
    except Refused as refused:
        request.flash("error", refused.message)
        return redirect(back)
    if outcome.replayed:
        request.flash(
            "ok",
            f"Replayed {len(outcome.replayed)} dead letter(s): the broker took them. Each turns "
            "resolved once its consumer succeeds.",
        )
    if outcome.failed or outcome.skipped or outcome.not_tried:
        result = outcome.result()
        request.flash("error", result[0].upper() + result[1:] + ".")
    return redirect(_page_url("/letters", [*form.items(with_status=False), ("status", "all")], 1))


# --- order lookup and audit -----------------------------------------------------------------------


def orders(console: Console, request: Request) -> Response:
    client = request.query.get("client", "").strip()[:64]
    order = request.query.get("order", "").strip()[:64]
    context: dict[str, Any] = {
        "client": client or (sorted(console.clients)[0] if console.clients else ""),
        "order": order,
        "client_ids": sorted(console.clients or {}),
        "clients_error": console.clients_error,
        "error": None,
        "explanation": None,
        "shipments": None,
        "letters_url": None,
    }
    if client and order:
        context.update(_explain(console, client, order))
        context["letters_url"] = _page_url("/letters", [("client", client), ("status", "all")], 1)
    return console.render(request, "orders.html", title="Order lookup", section="orders", **context)


def _explain(console: Console, client: str, order: str) -> dict[str, Any]:
    if console.services is None:
        return {"error": "Order lookup needs the clients file, and it could not be read."}
    out: dict[str, Any] = {}
    try:
        out["explanation"] = console.hide_secrets(explain_order(console.services, client, order))
    except BridgeError as exc:  # UnknownClient
        return {"error": exc.reason}
    except ValueError as exc:
        return {"error": str(exc)}
    except Exception as exc:
        log.exception("order lookup failed", client_id=client)
        return {"error": f"The lookup failed ({type(exc).__name__}); see the console's log."}
    try:
        settings = console.services.clients.require(client)
        order_id = order_ref(order, settings.orders)
        out["shipments"] = consignments(console.services, client, order_id)
    except (ValueError, BridgeError, sa.exc.SQLAlchemyError):
        out["shipments"] = None
    return out


def audit_log(console: Console, request: Request) -> Response:
    page = _int(request.query.get("page"), 1, 1, 10**6)
    per_page = 50
    entries, total = audit.page(console.store, offset=(page - 1) * per_page, limit=per_page)
    pages = max(1, -(-total // per_page))
    return console.render(
        request,
        "audit.html",
        title="Audit log",
        section="audit",
        entries=entries,
        page=page,
        pages=pages,
        prev_url=f"/audit?page={page - 1}" if page > 1 else None,
        next_url=f"/audit?page={page + 1}" if page < pages else None,
    )
