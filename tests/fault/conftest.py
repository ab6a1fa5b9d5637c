"""Fixtures of the fault-injection suite (the machinery is in ``harness.py``).

The fixtures of tests/conftest.py apply here too: ``broker_url`` is a fresh vhost on the
machine's broker; ``private_url`` is a fresh vhost on a RabbitMQ node of the suite's own, the
one the restart test stops and starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need
from tests.support.pipeline import API_KEY

from .harness import Artefacts, LeakRegistry, PrivateBroker, _rabbit_bin


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test of this directory is in the fault tier (``-m fault``; ``./dev test`` runs it
    only under CI=true): minutes of kill -9 and broker restarts, not what a change needs."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.fault)


@pytest.fixture(scope="session")
def private_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBroker]:
    need("rabbitmq-server (the suite restarts a RabbitMQ node of its own)",
         _rabbit_bin("rabbitmq-server") is not None)
    node = PrivateBroker(tmp_path_factory.mktemp("rabbit-node"))
    try:
        node.start()
    except RuntimeError as exc:
        node.stop()
        need(f"a private RabbitMQ node ({exc})", False)
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def private_url(private_broker: PrivateBroker) -> Iterator[str]:
    """A fresh vhost on the private node."""
    url = private_broker.add_vhost()
    yield url
    private_broker.ctl("delete_vhost", url.rsplit("/", 1)[1])


@pytest.fixture(scope="session")
def leak_registry() -> LeakRegistry:
    return LeakRegistry()


@pytest.fixture(scope="session")
def artefacts_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fault-artefacts")


@pytest.fixture
def artefacts(
    request: pytest.FixtureRequest, artefacts_root: Path, leak_registry: LeakRegistry
) -> Artefacts:
    """Where this run's logs, dead letters and metrics scrapes go (check 5 reads them)."""
    name = request.node.name.replace("/", "_").replace("[", "-").replace("]", "")
    found = Artefacts(artefacts_root / name)
    leak_registry.runs[name] = (found, {API_KEY})
    return found
