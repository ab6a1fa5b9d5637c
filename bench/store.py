"""The CS-Cart store emulator in a process of its own, driven over a pipe.

The emulator sorts and serialises whole catalogues for every page; in a child process that
work never counts against the consumer measured (its memory, its GIL). Store calls are counted
from the emulator's own request log, never estimated.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

from cscart_emulator import StoreEmulator


def _serve(options: dict[str, Any], pipe: Connection) -> None:
    emu = StoreEmulator(**options)
    emu.start()
    pipe.send(("ok", emu.url))
    while True:
        try:
            request = pipe.recv()
        except EOFError:
            break
        if request is None:
            break
        name, args, kwargs = request
        try:
            pipe.send(("ok", _dispatch(emu, name, args, kwargs)))
        except Exception:
            pipe.send(("error", traceback.format_exc()))
    emu.stop()


def _dispatch(emu: StoreEmulator, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if name == "mark":
        with emu._lock:
            return len(emu.requests)
    if name == "counts":
        since = int(args[0]) if args else 0
        with emu._lock:
            rows = emu.requests[since:]
        return Counter(r.endpoint or "unrouted" for r in rows)
    if name == "faulted":
        since = int(args[0]) if args else 0
        with emu._lock:
            rows = emu.requests[since:]
        return Counter(r.fault for r in rows if r.fault)
    if name == "store_seconds":
        since = int(args[0]) if args else 0
        with emu._lock:
            rows = emu.requests[since:]
        return sum(r.duration for r in rows)
    if name == "queries":
        since, endpoint = int(args[0]), str(args[1])
        with emu._lock:
            rows = emu.requests[since:]
        return [r.query for r in rows if r.endpoint == endpoint]
    if name == "errors":
        return list(emu.errors)
    if name == "seed_products":
        prefix, count, amount = args
        for n in range(int(count)):
            emu.add_product(f"{prefix}{n:06d}", int(amount))
        return int(count)
    if name == "product_amounts":
        prefix = str(args[0])
        with emu._lock:
            return {
                p["product_code"]: int(p["amount"])
                for p in emu.products.values()
                if p["product_code"].startswith(prefix)
            }
    method = getattr(emu, name)
    return method(*args, **kwargs)


class RemoteStore:
    """A ``StoreEmulator`` in a child process. ``call(name, ...)`` runs one of its methods
    there (``add_history``, ``set_fault``, ``clear_log`` ...); ``mark``/``counts`` read the
    request log."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._pipe: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self.url = ""

    def start(self) -> RemoteStore:
        context = multiprocessing.get_context("fork")
        parent, child = context.Pipe()
        process = context.Process(target=_serve, args=(self._options, child), daemon=True)
        process.start()
        self._pipe, self._process = parent, process
        if not parent.poll(60):
            raise RuntimeError("the store emulator did not start")
        _, self.url = parent.recv()
        return self

    @property
    def pid(self) -> int:
        process = self._process
        if process is None or process.pid is None:
            raise RuntimeError("the store emulator is not running")
        return process.pid

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        assert self._pipe is not None, "start() first"
        self._pipe.send((name, args, kwargs))
        status, value = self._pipe.recv()
        if status != "ok":
            raise RuntimeError(f"store emulator: {name} failed:\n{value}")
        return value

    def mark(self) -> int:
        """The position in the request log now (count calls from here with ``counts``)."""
        return int(self.call("mark"))

    def counts(self, since: int = 0) -> Counter[str]:
        """Requests per endpoint since ``mark()`` (faulted ones included)."""
        result: Counter[str] = self.call("counts", since)
        return result

    def stop(self) -> None:
        if self._pipe is not None:
            try:
                self._pipe.send(None)
            except OSError:
                pass
        if self._process is not None:
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=5)
        self._pipe = self._process = None

    def __enter__(self) -> RemoteStore:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
