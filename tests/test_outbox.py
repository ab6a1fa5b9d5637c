"""The outbox on its own (``cscart_fm/core/outbox.py``): claim, publish with confirms, record,
and a crash between any two steps losing nothing and sending FM nothing twice but copies with
the same event_id and bytes — on SQLite and PostgreSQL. What FM receives is taken from a
broker: kombu's in-process one for the rules, and the real RabbitMQ (``bus_url``), whose
confirms are the outbox's proof.

Its tables are made here as a job would make one (``outbox_table``): one keyed like the order
changes to come, (client, cart order, kind, revision), and one with a single key beside it in
the same outbox.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from kombu import Connection, Exchange, Queue

from cscart_fm.core.broker import NotConfirmed, Outgoing, Publisher
from cscart_fm.core.errors import BridgeError
from cscart_fm.core.outbox import (
    CLAIMED,
    PUBLISHED,
    REPUBLISH_CHUNK,
    Entry,
    Outbox,
    OutboxTable,
    outbox_table,
)
from cscart_fm.core.state import Component, StateStore
from cscart_fm.core.topology import ORDERS_EXCHANGE
from schemas.messages import OrderPollTick

from .support.broker import drain

CHANGES = outbox_table(
    "test_outbox_changes",
    sa.Column("cart_order_id", sa.BigInteger),
    sa.Column("kind", sa.String(16)),
    sa.Column("revision", sa.Integer),
    columns=[sa.Column("order_no", sa.String(200), nullable=False)],
    noun="order changes",
)
NOTES = outbox_table("test_outbox_notes", sa.Column("note_id", sa.String(32)), noun="notes")
FM_QUEUE = "test.outbox"
PAGE = 4


class Crash(BaseException):
    """A kill -9 in the middle of a run: nothing of the run's code runs after it (not even
    the pipeline's clean-up, which handles only ``Exception``)."""


def change(order: int, kind: str = "updated", revision: int = 1) -> Entry:
    event_id = f"ACME/{order}/{kind}/{revision}"
    body = {"type": f"order.{kind}", "version": 1, "event_id": event_id, "client_id": "ACME",
            "cart_order_id": order, "revision": revision}
    return Entry(CHANGES, (order, kind, revision), event_id, json.dumps(body).encode(),
                 f"order.{kind}/1", f"order.{kind}", {"order_no": f"CS{order}"})


def note(note_id: str) -> Entry:
    body = {"type": "order.noted", "version": 1, "event_id": f"note/{note_id}"}
    return Entry(NOTES, (note_id,), f"note/{note_id}", json.dumps(body).encode(),
                 "order.noted/1", "order.noted")


@pytest.fixture
def state(state_url: str) -> Iterator[StateStore]:
    store = StateStore.open(state_url, [Component("test-outbox", (CHANGES.table, NOTES.table))])
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def fm(bus_url: str) -> str:
    """The broker (in-process, and RabbitMQ in the broker tier), with a queue taking
    everything published on ``fm.orders``."""
    with Connection(bus_url) as conn:
        exchange = Exchange(ORDERS_EXCHANGE, type="topic", durable=True)
        Queue(FM_QUEUE, exchange, routing_key="#", durable=True)(conn.default_channel).declare()
    return bus_url


def received(url: str) -> list[dict[str, Any]]:
    return [
        {"body": message.body, "message_id": message.properties.get("message_id"),
         "schema": (message.headers or {}).get("schema"),
         "routing_key": message.delivery_info.get("routing_key")}
        for message in drain(url, FM_QUEUE)
    ]


def check_each_once(got: list[dict[str, Any]], entries: Sequence[Entry]) -> int:
    """Every entry at FM, as published: copies only the same message (event_id, bytes).
    Returns how many copies."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for message in got:
        by_id.setdefault(message["message_id"], []).append(message)
    assert sorted(by_id) == sorted(entry.event_id for entry in entries)
    for entry in entries:
        for message in by_id[entry.event_id]:
            body = message["body"]
            assert (body if isinstance(body, bytes) else body.encode()) == entry.body
            assert message["schema"] == entry.schema
            assert message["routing_key"] == entry.routing_key
    return len(got) - len(by_id)


def rows(state: StateStore, box: OutboxTable) -> dict[tuple[Any, ...], Any]:
    with state.engine.connect() as conn:
        return {box.key_of(row): row for row in conn.execute(sa.select(box.table)).all()}


def all_published(state: StateStore, entries: Sequence[Entry]) -> None:
    for box in (CHANGES, NOTES):
        stored = rows(state, box)
        for entry in entries:
            if entry.box is box:
                row = stored[entry.key]
                assert row.state == PUBLISHED and row.payload is None, row
                assert row.event_id == entry.event_id and row.published_at is not None
        assert len(stored) == len([e for e in entries if e.box is box])


# --- claim, publish, record ---------------------------------------------------------------------


def test_entries_are_claimed_published_and_recorded_once_a_page_at_a_time(
    state: StateStore, fm: str
) -> None:
    recorded: list[tuple[Any, ...]] = []
    counted: Counter[str] = Counter()
    publisher = Publisher(fm)
    outbox = Outbox(
        state, publisher, "ACME", (CHANGES, NOTES),
        with_published=lambda conn, entries: recorded.extend(e.key for e in entries),
        count_published=lambda box, n: counted.update({box.table.name: n}),
    )
    pages = [[change(1), change(2), note("a")], [change(3), change(1, "cancelled", 0)], []]
    try:
        with outbox.pipeline() as pipeline:
            for number, page in enumerate(pages):
                assert pipeline.page(page) == page
                if number == 1:  # page 0 recorded published as page 1 was claimed
                    assert rows(state, CHANGES)[(1, "updated", 1)].state == PUBLISHED
                    assert rows(state, CHANGES)[(3, "updated", 1)].state == CLAIMED
        everything = [entry for page in pages for entry in page]
        all_published(state, everything)
        assert sorted(map(str, recorded)) == sorted(str(e.key) for e in everything)
        assert counted == {"test_outbox_changes": 4, "test_outbox_notes": 1}
        assert rows(state, CHANGES)[(3, "updated", 1)].order_no == "CS3"  # the job's column
        assert check_each_once(received(fm), everything) == 0

        # A key is claimed once, ever: claiming it again claims and publishes nothing.
        fresh = outbox.claim([change(1), note("a"), change(1, revision=2)])
        assert [entry.key for entry in fresh] == [(1, "updated", 2)]
        known = outbox.known(CHANGES, [(1, "updated", 1), (1, "updated", 2), (9, "updated", 1)])
        assert known == {(1, "updated", 1): PUBLISHED, (1, "updated", 2): CLAIMED}
        assert received(fm) == []
    finally:
        publisher.close()


def test_a_table_names_its_key_and_has_the_outbox_columns() -> None:
    other = sa.MetaData()
    plain = sa.Table("plain", other, sa.Column("client_id", sa.String, primary_key=True),
                     sa.Column("ref", sa.String, primary_key=True))
    with pytest.raises(ValueError, match="lacks the outbox columns"):
        OutboxTable(plain, key=("ref",))
    with pytest.raises(ValueError, match="primary key"):
        OutboxTable(CHANGES.table, key=("cart_order_id",))
    tick = OrderPollTick(type="order-poll.tick", version=1, event_id="e-1", client_id="ACME",
                         issued_at=datetime.now(UTC))
    entry = NOTES.entry(("n1",), tick)
    assert (entry.event_id, entry.body, entry.schema) == ("e-1", tick.to_body(), tick.schema_name)
    assert entry.routing_key == "order-poll.tick" and entry.key == ("n1",)


# --- without a broker: what is not confirmed stays claimed ------------------------------------------


class _Confirmation:
    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def wait(self) -> None:
        if self.fail:
            raise NotConfirmed("nacked")


class FakePublisher:
    """Takes every batch; the confirms of the ``fail``-th batch never come."""

    def __init__(self, fail: int | None = None, refuse: bool = False) -> None:
        self.batches: list[list[Outgoing]] = []
        self.fail = fail
        self.refuse = refuse

    def send(self, messages: Sequence[Outgoing], **_: Any) -> _Confirmation:
        if self.refuse:
            raise ConnectionError("broker down")
        self.batches.append(list(messages))
        return _Confirmation(len(self.batches) == self.fail)


def test_what_the_broker_did_not_confirm_stays_claimed_and_the_error_says_so(
    state: StateStore,
) -> None:
    fake = FakePublisher(fail=2)
    outbox = Outbox(state, fake, "ACME", (CHANGES,))  # type: ignore[arg-type]

    def two_pages() -> None:
        with outbox.pipeline() as pipeline:
            pipeline.page([change(1), change(2)])
            pipeline.page([change(3)])

    with pytest.raises(BridgeError) as caught:
        two_pages()
    assert "publishing 1 order changes (from 3, updated, 1) to fm.orders" in caught.value.reason
    assert "order.updated" in caught.value.action
    stored = rows(state, CHANGES)
    assert {key: row.state for key, row in stored.items()} == {
        (1, "updated", 1): PUBLISHED, (2, "updated", 1): PUBLISHED, (3, "updated", 1): CLAIMED}
    assert json.loads(stored[(3, "updated", 1)].payload)["revision"] == 1  # kept to send again

    refused = Outbox(state, FakePublisher(refuse=True), "ACME", (CHANGES,))  # type: ignore[arg-type]
    with pytest.raises(BridgeError, match="not confirmed"):
        refused.republish_claimed()
    assert rows(state, CHANGES)[(3, "updated", 1)].state == CLAIMED


def test_an_error_in_the_job_still_records_the_page_the_broker_confirmed(
    state: StateStore,
) -> None:
    fake = FakePublisher()
    outbox = Outbox(state, fake, "ACME", (CHANGES,))  # type: ignore[arg-type]

    def a_page_then_an_error() -> None:
        with outbox.pipeline() as pipeline:
            pipeline.page([change(1), change(2)])
            raise ValueError("the store broke")

    with pytest.raises(ValueError, match="the store broke"):
        a_page_then_an_error()
    assert {row.state for row in rows(state, CHANGES).values()} == {PUBLISHED}
    assert len(fake.batches) == 1


def test_a_page_with_nothing_to_write_opens_no_transaction(
    state: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[int] = []
    original = state.transaction

    def counting() -> Any:
        opened.append(1)
        return original()

    monkeypatch.setattr(state, "transaction", counting)
    outbox = Outbox(state, FakePublisher(), "ACME", (CHANGES,))  # type: ignore[arg-type]
    with outbox.pipeline() as pipeline:
        assert pipeline.page([]) == []
    assert opened == []
    assert outbox.republish_claimed() == 0


def test_a_backlog_of_claims_is_published_again_in_key_order_with_the_same_bytes(
    state: StateStore,
) -> None:
    backlog = [change(n // 4, ("updated", "cancelled")[n % 2], n % 4) for n in range(250)]
    notes = [note(f"n{n:03d}") for n in range(3)]
    crashed = Outbox(state, FakePublisher(), "ACME", (CHANGES, NOTES))  # type: ignore[arg-type]
    assert len(crashed.claim(backlog + notes)) == 253  # then the run died
    fake = FakePublisher()
    assert Outbox(state, fake, "ACME", (CHANGES, NOTES)).republish_claimed() == 253  # type: ignore[arg-type]
    assert [len(batch) for batch in fake.batches] == [REPUBLISH_CHUNK, REPUBLISH_CHUNK, 50, 3]
    sent = [message for batch in fake.batches for message in batch]
    expected = sorted(backlog, key=lambda entry: entry.key) + notes
    assert [m.properties["message_id"] for m in sent] == [e.event_id for e in expected]
    assert [m.body for m in sent] == [e.body for e in expected]
    assert [m.routing_key for m in sent] == [e.routing_key for e in expected]
    assert [m.properties["headers"]["schema"] for m in sent] == [e.schema for e in expected]
    all_published(state, backlog + notes)


# --- crashes --------------------------------------------------------------------------------------


def _crash_on(
    monkeypatch: pytest.MonkeyPatch, name: str, call: int, *, before: bool
) -> None:
    """Make the ``call``-th call of ``Outbox.<name>`` crash, before or after it ran."""
    original: Callable[..., Any] = getattr(Outbox, name)
    calls = 0

    def crashing(self: Outbox, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == call and before:
            raise Crash(name)
        result = original(self, *args, **kwargs)
        if calls == call:
            raise Crash(name)
        return result

    monkeypatch.setattr(Outbox, name, crashing)


# (where the run dies, the copies FM may then get: at most the page in flight)
CRASHES = {
    # page 2's transaction fails: page 1 (confirmed) is not recorded, page 2 not claimed
    "in the claim": (("claim", 2, True), PAGE, PAGE),
    # page 2 claimed, nothing of it published
    "after the claim": (("send", 2, True), 0, 0),
    # page 2 published, its confirms not awaited (the 1st call confirms no page: none before)
    "after the publish": (("confirmed", 3, True), 0, PAGE),
    # page 2 confirmed, not recorded
    "after the confirm": (("confirmed", 3, False), PAGE, PAGE),
    # page 2 recorded (and page 3 claimed), nothing more
    "after the record": (("claim", 3, False), 0, 0),
    # the last page recorded in its own transaction
    "after the last record": (("mark_published", 1, False), 0, 0),
}


@pytest.mark.parametrize("crash", list(CRASHES))
def test_a_crash_between_any_two_steps_loses_nothing_and_sends_only_same_event_id_copies(
    state: StateStore, fm: str, monkeypatch: pytest.MonkeyPatch, crash: str
) -> None:
    (name, call, before), least, most = CRASHES[crash]
    pages = [[change(PAGE * p + i) for i in range(PAGE)] for p in range(3)]
    everything = [entry for page in pages for entry in page]

    def run(publisher: Publisher) -> int:
        """One run of a job: what a crash left, then its pages (the job lists them again)."""
        outbox = Outbox(state, publisher, "ACME", (CHANGES,))
        republished = outbox.republish_claimed()
        with outbox.pipeline() as pipeline:
            for page in pages:
                pipeline.page(page)
        return republished

    dying = Publisher(fm)
    with monkeypatch.context() as patch:
        _crash_on(patch, name, call, before=before)
        with pytest.raises(Crash):
            run(dying)
    dying.close()  # the dead process's connection goes with it

    again = Publisher(fm)
    try:
        republished = run(again)
    finally:
        again.close()
    all_published(state, everything)
    copies = check_each_once(received(fm), everything)
    assert least <= copies <= most, copies
    assert republished in (0, PAGE)  # the page in flight, if any
