"""Wiring: what a running process shares between its consumers.

``Services`` is built once per process from the environment (contract §4) and handed to each
consumer's ``build`` function; a consumer module exposes ``build(services) -> Handler``.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from schemas.messages import _Message
from schemas.settings import Clients, ClientSettings, load_clients

from .broker import Publisher
from .config import Environment
from .dead_letters import DeadLetterResolver
from .errors import SettingsError
from .observability import register_secret
from .runtime import Handler
from .state import StateStore
from .topology import CONSUMER_NAMES

CONSUMER_MODULES = {
    "order-poll": "consumers.order_poll",
    "shipment-lodged": "consumers.shipment_lodged",
    "stock-snapshot": "consumers.stock_snapshot",
}


class NotBuiltYet(SettingsError):
    """A consumer named on the command line that this release does not have yet."""


class StoreClients:
    """One CS-Cart client per store, shared by every thread of the process, so that the
    per-store rate limit and concurrency cap hold for the whole process."""

    def __init__(self, clients: Clients) -> None:
        self._clients = clients
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    def for_client(self, settings: ClientSettings) -> Any:
        from cscart.client import CsCartClient

        with self._lock:
            client = self._cache.get(settings.client_id)
            if client is None:
                client = CsCartClient.for_client(settings)
                self._cache[settings.client_id] = client
            return client

    def close(self) -> None:
        with self._lock:
            clients, self._cache = list(self._cache.values()), {}
        for client in clients:
            client.close()


@dataclass
class Services:
    env: Environment
    clients: Clients
    state: StateStore
    publisher: Publisher
    stores: StoreClients = field(init=False)
    success_hooks: list[Callable[[str, _Message], None]] = field(default_factory=list)
    """Called (consumer name, event) after each message a consumer handled successfully."""

    def __post_init__(self) -> None:
        self.stores = StoreClients(self.clients)
        for settings in self.clients.values():
            register_secret(settings.api_key.get_secret_value())
        # A dead letter whose key (client + order/shipment) later succeeds is marked resolved.
        self.success_hooks.append(DeadLetterResolver(self.state))

    @classmethod
    def from_environment(cls, env: Environment) -> Services:
        clients = load_clients(env.clients_path)
        state = StateStore.open(env.state_url)
        return cls(env=env, clients=clients, state=state, publisher=Publisher(env.broker_url))

    def message_succeeded(self, consumer: str, event: _Message) -> None:
        for hook in self.success_hooks:
            hook(consumer, event)

    def close(self) -> None:
        self.stores.close()
        self.publisher.close()
        self.state.close()


def handler_factory(consumer: str) -> Callable[[Services], Handler[Any]]:
    """The ``build`` function of a consumer, or NotBuiltYet saying so plainly."""
    if consumer not in CONSUMER_NAMES:
        raise SettingsError(
            f"unknown consumer {consumer!r}; choose one of: {', '.join(CONSUMER_NAMES)}, all"
        )
    module_name = CONSUMER_MODULES[consumer]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise NotBuiltYet(
            f"the {consumer} consumer is not built in this release of cscart-fm yet"
        ) from None
    build: Callable[[Services], Handler[Any]] = module.build
    return build


def available_consumers() -> list[str]:
    names = []
    for name in CONSUMER_NAMES:
        try:
            handler_factory(name)
        except NotBuiltYet:
            continue
        names.append(name)
    return names
