"""A job is declared once: a toy job, registered and nothing else edited, gets its queues, its
retry and dead-letter queues, its tuning, its tables, its dead-letter key and its column in
the console's overview, and runs on the runtime like the real ones."""

from __future__ import annotations

import importlib.util
import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pytest
import sqlalchemy as sa
from kombu import Connection

from consumers.registry import JOBS
from consumers.services import Services
from cscart_fm.cli import app
from cscart_fm.cli.wiring import components, open_state, runtime_for, select_jobs
from cscart_fm.core.broker import Publisher
from cscart_fm.core.clients import parse_clients
from cscart_fm.core.config import Environment
from cscart_fm.core.errors import StoreRefused
from cscart_fm.core.jobs import DeadLetterKey, Job, OverviewColumn, OverviewScope, Tuning
from cscart_fm.core.runtime import Delivery
from cscart_fm.core.state import UtcDateTime, component_versions, metadata, utcnow
from cscart_fm.support.console import overview
from cscart_fm.support.dead_letters.resolve import key_of_document
from schemas.messages import Message

from .support.broker import wait_for
from .support.pipeline import API_KEY, KEY_ENV, client_doc

ROOT = Path(__file__).resolve().parents[1]


class ToyPing(Message):
    type: Literal["toy.ping"]
    version: Literal[1]
    refuse: bool = False


toy_pings = sa.Table(
    "toy_pings",
    metadata,
    sa.Column("event_id", sa.String(64), primary_key=True),
    sa.Column("client_id", sa.String(64), nullable=False),
    sa.Column("pinged_at", UtcDateTime(), nullable=False),
)


class ToyHandler:
    def __init__(self, services: Services) -> None:
        self.services = services

    def handle(self, event: ToyPing, delivery: Delivery) -> None:
        self.services.clients.require(event.client_id)
        if event.refuse:
            raise StoreRefused("the toy refuses this ping")
        with self.services.state.transaction() as conn:
            self.services.state.insert_ignore(
                conn,
                toy_pings,
                {"event_id": event.event_id, "client_id": event.client_id, "pinged_at": utcnow()},
            )


def _last_ping(t: sa.Table, scope: OverviewScope) -> Any:
    return sa.select(t.c.client_id, sa.func.max(t.c.pinged_at)).group_by(t.c.client_id)


TOY: Job[Services] = Job(
    name="toy",
    summary="answers pings",
    events=(ToyPing,),
    build=ToyHandler,
    tuning=Tuning(prefetch=3, concurrency=2),
    tables=(toy_pings,),
    dead_letter_key=DeadLetterKey("toy", "event_id", "toy ping"),
    overview=(OverviewColumn("Last toy ping", toy_pings, _last_ping, "time"),),
)


def _ping(event_id: str, **fields: Any) -> bytes:
    body = {"type": "toy.ping", "version": 1, "event_id": event_id, "client_id": "ACME"}
    return json.dumps({**body, **fields}).encode()


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "deploy/rabbitmq/generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_registered_job_gets_its_topology_tuning_and_key() -> None:
    assert "toy" not in JOBS.names
    with JOBS.registered(TOY):
        rows = {r["name"]: r for r in JOBS.topology((1, 5)).describe() if r["kind"] == "queue"}
        assert rows["cscart.toy"]["exchange"] == "fm.events"
        assert rows["cscart.toy"]["routing_keys"] == ["toy.ping"]
        assert rows["cscart.toy"]["arguments"]["x-queue-type"] == "quorum"
        assert rows["cscart.toy"]["arguments"]["x-dead-letter-routing-key"] == "cscart.toy.dlq"
        assert rows["cscart.toy.dlq"]["exchange"] == "cscart.dead-letter"
        assert rows["cscart.toy.retry.1s"]["arguments"]["x-message-ttl"] == 1000
        assert rows["cscart.toy.retry.5s"]["arguments"]["x-dead-letter-routing-key"] == "cscart.toy"

        definitions = _generator().build_definitions(retry_delays=(1, 5))
        assert {"cscart.toy", "cscart.toy.dlq", "cscart.toy.retry.1s"} <= {
            q["name"] for q in definitions["queues"]
        }
        assert {"source": "fm.events", "destination": "cscart.toy", "routing_key": "toy.ping"}.items() <= next(
            b for b in definitions["bindings"] if b["destination"] == "cscart.toy"
        ).items()

        env = Environment()
        assert env.tuning(TOY, {}) == Tuning(prefetch=3, concurrency=2)
        assert env.tuning(TOY, {"CSCART_FM_TOY_PREFETCH": "7"}).prefetch == 7
        assert select_jobs("toy") == [TOY]

        assert key_of_document({"type": "toy.ping", "client_id": "ACME", "event_id": "p1"}) == (
            "toy:ACME:p1"
        )
        assert JOBS.key_labels()["toy"] == "toy ping"
    assert "toy" not in JOBS.names  # registered only for the block


def test_the_cli_help_lists_every_job() -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["run", "--help"])
    assert result.exit_code == 0
    for job in JOBS:
        assert job.name in result.output


def test_a_registered_job_gets_its_tables_and_overview_column(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    clients = parse_clients({"clients": [client_doc("http://127.0.0.1:9")]}, {KEY_ENV: API_KEY})
    with JOBS.registered(TOY):
        assert "toy" in [c.name for c in components()]
        store = open_state(url)
        try:
            with store.engine.connect() as conn:
                assert "toy_pings" in sa.inspect(conn).get_table_names()
                versions = dict(
                    conn.execute(
                        sa.select(component_versions.c.component, component_versions.c.version)
                    ).all()
                )
            assert versions["toy"] == 0
            with store.transaction() as conn:
                conn.execute(
                    toy_pings.insert().values(
                        event_id="p0", client_id="ACME", pinged_at=datetime(2026, 12, 1, tzinfo=UTC)
                    )
                )
            page = overview.build(store, clients, datetime(2026, 12, 2, tzinfo=UTC))
            titles = [column.title for column in page.columns]
            assert titles[-1] == "Last toy ping"
            [acme] = page.clients
            assert acme.cells[-1] == datetime(2026, 12, 1, tzinfo=UTC)
        finally:
            store.close()


def test_a_registered_job_runs_on_the_runtime(tmp_path: Path, memory_url: str) -> None:
    """On the in-process broker: a ping is handled and recorded; a refused one is not (on
    memory:// a dead letter is dropped: the real broker's dead-lettering is tested with the
    runtime)."""
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    broker = memory_url
    clients = parse_clients({"clients": [client_doc("http://127.0.0.1:9")]}, {KEY_ENV: API_KEY})
    with JOBS.registered(TOY):
        services = Services(clients=clients, state=open_state(url), publisher=Publisher(broker))
        env = Environment(broker_url=broker, retry_delays=(1,), heartbeat=0)
        with Connection(broker) as conn:
            JOBS.topology(env.retry_delays).declare(conn)
        runtime = runtime_for(TOY, services, env)
        thread = threading.Thread(target=runtime.run, daemon=True)
        thread.start()
        try:
            wait_for(lambda: runtime.ready)
            with Connection(broker) as conn:
                producer = conn.Producer()
                for body in (_ping("p1"), _ping("p2", refuse=True), _ping("p3")):
                    producer.publish(body, exchange="fm.events", routing_key="toy.ping",
                                     content_type="application/json", serializer=None)

            def recorded() -> set[str]:
                with services.state.engine.connect() as db:
                    return set(db.execute(sa.select(toy_pings.c.event_id)).scalars())

            wait_for(lambda: recorded() == {"p1", "p3"})
            wait_for(lambda: runtime.idle)
            assert recorded() == {"p1", "p3"}
        finally:
            runtime.stop()
            thread.join(timeout=30)
            services.close()


@pytest.mark.broker
def test_a_registered_job_is_declared_on_the_broker(broker_url: str) -> None:
    with JOBS.registered(TOY), Connection(broker_url) as conn:
        declared = JOBS.topology((1,)).declare(conn)
        assert {"cscart.toy", "cscart.toy.dlq", "cscart.toy.retry.1s"} <= set(declared)
        channel = conn.default_channel
        for name in ("cscart.toy", "cscart.toy.dlq", "cscart.toy.retry.1s"):
            channel.queue_declare(queue=name, passive=True)
