"""A store emulator with a large catalogue in a child process, so that a test measuring the
consumer's memory (tracemalloc traces every thread of its own process) measures only the
consumer, not the emulator sorting its catalogue for every page."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection

from cscart_emulator import StoreEmulator

from .pipeline import API_KEY, API_USER


def _serve(products: int, amount: int, pipe: Connection) -> None:
    emu = StoreEmulator(api_user=API_USER, api_key=API_KEY)
    for n in range(products):
        emu.add_product(sku_of(n), amount)
    emu.start()
    pipe.send(emu.url)
    pipe.recv()  # anything (or the parent's end closing) stops it
    emu.stop()


def sku_of(n: int) -> str:
    return f"MEM-{n:06d}"


@contextmanager
def store_in_child(products: int, amount: int = 10) -> Iterator[str]:
    """The URL of an emulator with ``products`` products (codes ``sku_of(n)``, all at
    ``amount``), served by a child process for the duration of the block."""
    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe()
    process = context.Process(target=_serve, args=(products, amount, child), daemon=True)
    process.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the store emulator did not start")
        yield str(parent.recv())
    finally:
        try:
            parent.send("stop")
        except OSError:
            pass
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
