"""``cscart-fm run order-poll`` that kills itself with SIGKILL at a chosen step of a poll.

Usage: python -m tests.support.order_poll_crash STEP N   (environment as for `cscart-fm run`)

STEP is where the process dies, the Nth time it gets there:

- ``list``: once N orders were read from the store, before the page holding the Nth is
  claimed (the orders of that page are read, none of them claimed);
- ``claim``: after the Nth page's transaction committed (its orders claimed, the page before
  recorded as published), before any of its orders is published (``Outbox.claim``);
- ``publish``: once the broker confirmed the Nth page of orders, before it is recorded as
  published (``Outbox.confirmed``);
- ``mark``: after the Nth transaction that recorded orders as published, before anything
  else is published (``Outbox.claim`` with orders ``published``, ``Outbox.mark_published``);
- ``watermark``: instead of saving the watermark (every order done, the run not recorded).

The process writes ``<MARKER>`` (env ``CSCART_FM_TEST_CRASH_MARKER``) just before it dies.
``arm`` places the same steps in a test's own process (the rules tier's crash test).
"""

from __future__ import annotations

import inspect
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from consumers.order_poll import handler
from cscart.client import CsCartClient
from cscart_fm.core.outbox import Outbox

STEPS: dict[str, tuple[tuple[Any, str], ...]] = {
    "claim": ((Outbox, "claim"),),
    "publish": ((Outbox, "confirmed"),),
    "mark": ((Outbox, "claim"), (Outbox, "mark_published")),
    "watermark": ((handler, "save_watermark"),),
}


def _counts(step: str, name: str, arguments: Mapping[str, Any], result: Any) -> bool:
    """Whether this call is a hit of the step: one that did what the step names."""
    if step == "claim":
        return bool(result)  # orders claimed
    if step == "publish":
        return bool(result)  # orders confirmed
    if step == "mark":  # orders recorded as published
        return bool(arguments["published" if name == "claim" else "entries"])
    return True


Patch = Callable[[Any, str, Any], None]


def arm(step: str, n: int, die: Callable[[int], None], patch: Patch = setattr) -> None:
    """Call ``die(hits)`` the Nth time the process gets to ``step``. ``die`` must not return
    (SIGKILL here; the rules tier raises an exception no clean-up catches), and ``patch`` is
    how the methods are replaced (``monkeypatch.setattr`` to undo them after)."""
    hits = 0

    def hit() -> None:
        nonlocal hits
        hits += 1
        if hits >= n:
            die(hits)

    if step == "list":
        original_pages = CsCartClient.order_pages

        def order_pages(self: CsCartClient, **kwargs: Any) -> Iterator[Any]:
            nonlocal hits
            for page in original_pages(self, **kwargs):
                hits += len(page)
                if hits >= n:
                    die(hits)
                yield page

        patch(CsCartClient, "order_pages", order_pages)
        return
    for owner, name in STEPS[step]:
        original: Callable[..., Any] = getattr(owner, name)

        def wrapped(
            *args: Any, _name: str = name, _original: Callable[..., Any] = original,
            **kwargs: Any,
        ) -> Any:
            if step == "watermark":
                die(hits)
            result = _original(*args, **kwargs)
            bound = inspect.signature(_original).bind(*args, **kwargs)
            bound.apply_defaults()
            if _counts(step, _name, bound.arguments, result):
                hit()
            return result

        patch(owner, name, wrapped)


def main() -> None:
    step, n = sys.argv[1], int(sys.argv[2])
    marker = os.environ.get("CSCART_FM_TEST_CRASH_MARKER")

    def die(hits: int) -> None:
        if marker:
            Path(marker).write_text(f"{step} {hits}")
        os.kill(os.getpid(), signal.SIGKILL)

    arm(step, n, die)

    from cscart_fm.cli import main as cli_main

    sys.argv = ["cscart-fm", "run", "order-poll"]
    cli_main()


if __name__ == "__main__":
    main()
