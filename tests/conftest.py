"""Real services for the tests: RabbitMQ (a fresh vhost per test) and PostgreSQL.

On a laptop without them, the tests that need them skip with the reason; under ``CI=true``
the same situation is a failure, so CI can never go green by skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

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


@pytest.fixture
def broker_url() -> Iterator[str]:
    """An AMQP URL on a brand-new vhost, deleted afterwards: tests never see each other."""
    need("RabbitMQ", _reachable(AMQP_BASE, 5672))
    if shutil.which("rabbitmqctl") is None:
        need("rabbitmqctl (to give each test its own vhost)", False)
    vhost = f"cscart-fm-test-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield f"{AMQP_BASE}/{vhost}"
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=60)


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


@pytest.fixture(params=["sqlite", "postgresql"])
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
