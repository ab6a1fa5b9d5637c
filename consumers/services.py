"""What a running process shares with its jobs: the clients file, the state store, the
publisher to FM and one CS-Cart client per store. Built once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field

from cscart.client import StoreClients
from cscart_fm.core.broker import Publisher
from cscart_fm.core.clients import Clients
from cscart_fm.core.observability import register_secret
from cscart_fm.core.state import StateStore


@dataclass
class Services:
    clients: Clients
    state: StateStore
    publisher: Publisher
    stores: StoreClients = field(default_factory=StoreClients)

    def __post_init__(self) -> None:
        for settings in self.clients.values():
            register_secret(settings.api_key.get_secret_value())

    def close(self) -> None:
        self.stores.close()
        self.publisher.close()
        self.state.close()
