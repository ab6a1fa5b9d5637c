"""Real services for the tests: RabbitMQ (a vhost per test module, emptied before each test),
PostgreSQL, and kombu's in-process broker for the tests that need no real one.

On a laptop without them, the tests that need them skip with the reason; under ``CI=true``
the same situation is a failure, so CI can never go green by skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.support.broker import known_names, record_declarations, reset, reset_memory

AMQP_BASE = os.environ.get("CSCART_FM_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672")
PG_URL = os.environ.get("CSCART_FM_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 2
        ):
            return True
    except OSError:
        return False


def need(service: str, ok: bool) -> None:
    if ok:
        return
    reason = f"{service} is not reachable on this machine"
    if IN_CI:
        pytest.fail(f"{reason}, and CI=true requires it (.ci/run starts it)")
    pytest.skip(f"{reason}: start it to run these tests (CI runs them for real)")


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that takes ``broker_url`` is in the broker tier, whether or not it says so."""
    for item in items:
        if "broker_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.broker)


_retiring: list[threading.Thread] = []
_strays: list[str] = []


def _retire(vhost: str, url: str, module: str) -> None:
    """Delete a module's vhost on a thread (the next module's tests run meanwhile), first
    noting any queue left in it that ``reset`` would not have deleted between its tests."""

    def work() -> None:
        try:
            listed = subprocess.run(
                ["rabbitmqctl", "list_queues", "-p", vhost, "name", "--quiet",
                 "--no-table-headers"],
                capture_output=True, text=True, timeout=60,
            ).stdout.split()
            unknown = set(listed) - known_names(url)[0]
            if unknown:
                _strays.append(f"{module}: {', '.join(sorted(unknown))}")
        finally:
            subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=60)

    thread = threading.Thread(target=work, name=f"retire-{vhost}")
    thread.start()
    _retiring.append(thread)


@pytest.fixture(scope="session", autouse=True)
def _broker_bookkeeping() -> Iterator[None]:
    """Record what tests declare (for ``reset``); at the end, wait for the vhosts' deletion
    and fail if a test made a queue the reset does not know: tests would see each other."""
    undo = record_declarations()
    yield
    undo()
    for thread in _retiring:
        thread.join(timeout=120)
    if _strays:
        pytest.fail(
            "queues that tests/support/broker.py's reset() does not delete were left in a "
            "test vhost (declare them in this process, or add their delay to RESET_DELAYS): "
            + "; ".join(_strays)
        )


@pytest.fixture(scope="module")
def broker_vhost(request: pytest.FixtureRequest) -> Iterator[str]:
    """An AMQP URL on a vhost of this test module's own, deleted after it."""
    need("RabbitMQ", _reachable(AMQP_BASE, 5672))
    if shutil.which("rabbitmqctl") is None:
        need("rabbitmqctl (to give each test module its own vhost)", False)
    module = request.module.__name__.rsplit(".", 1)[-1]
    vhost = f"cscart-fm-test-{module}-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    url = f"{AMQP_BASE}/{vhost}"
    try:
        yield url
    finally:
        _retire(vhost, url, request.module.__name__)


@pytest.fixture
def broker_url(broker_vhost: str) -> str:
    """The module's vhost, emptied of every queue and exchange: tests never see each other
    (a test that leaves a consumer running would; each stops its own)."""
    reset(broker_vhost)
    return broker_vhost


@pytest.fixture
def memory_url() -> Iterator[str]:
    """kombu's in-process broker, empty, for what the real one adds nothing to: it has no
    dead-letter exchanges, delivery limits or redelivered flag (the runtime's own retries
    go to retry queues that never give them back)."""
    reset_memory()
    yield f"memory://cscart-fm-test-{uuid.uuid4().hex[:8]}"
    reset_memory()


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.broker)])
def bus_url(request: pytest.FixtureRequest) -> str:
    """The same test on the in-process broker (rules tier) and on RabbitMQ (broker tier), for
    a rule whose outcome passes through what only the real broker is trusted with, such as
    a dead letter."""
    return str(request.getfixturevalue("memory_url" if request.param == "memory" else "broker_url"))


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for the session, dropped at the end."""
    need("PostgreSQL", _reachable(PG_URL.replace("postgresql+psycopg", "postgresql"), 5432))
    import sqlalchemy as sa

    name = f"cscart_fm_test_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    base = PG_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def state_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """Each state-store test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.sqlite'}"
        return
    url = request.getfixturevalue("postgres_database")
    yield url
    import sqlalchemy as sa

    from cscart_fm.core.state import metadata

    engine = sa.create_engine(url)
    metadata.drop_all(engine)
    engine.dispose()
