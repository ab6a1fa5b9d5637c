"""``cscart-fm run order-poll`` that kills itself with SIGKILL at a chosen step of a poll.

Usage: python -m tests.support.order_poll_crash STEP N   (environment as for `cscart-fm run`)

STEP is where the process dies, the Nth time it gets there:

- ``list``: after N orders were read from the store (mid-page: they are not all claimed);
- ``claim``: after the Nth claim transaction committed, before any of its orders is published;
- ``publish``: after the Nth confirmed publish, before it is recorded as published;
- ``mark``: after the Nth "published" transaction, before the watermark is saved;
- ``watermark``: instead of saving the watermark (every order done, the run not recorded).

The process writes ``<MARKER>`` (env ``CSCART_FM_TEST_CRASH_MARKER``) just before it dies.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from consumers import order_poll
from cscart.client import CsCartClient

STEPS = {
    "claim": "claim",
    "publish": "publish",
    "mark": "mark_published",
    "watermark": "save_watermark",
}


def main() -> None:
    step, n = sys.argv[1], int(sys.argv[2])
    marker = os.environ.get("CSCART_FM_TEST_CRASH_MARKER")
    hits = 0

    def die() -> None:
        if marker:
            Path(marker).write_text(f"{step} {hits}")
        os.kill(os.getpid(), signal.SIGKILL)

    def hit() -> None:
        nonlocal hits
        hits += 1
        if hits >= n:
            die()

    if step == "list":
        original_iter = CsCartClient.iter_orders

        def iter_orders(self: CsCartClient, **kwargs: Any) -> Iterator[Any]:
            for order in original_iter(self, **kwargs):
                yield order
                if not kwargs.get("order_ids"):  # the listing, not the check after it
                    hit()

        CsCartClient.iter_orders = iter_orders  # type: ignore[method-assign]
    else:
        name = STEPS[step]
        original: Callable[..., Any] = getattr(order_poll.PollRun, name)

        def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
            if step == "watermark":
                die()
            result = original(self, *args, **kwargs)
            if step != "mark" or args[0]:  # an empty mark is no step
                hit()
            return result

        setattr(order_poll.PollRun, name, wrapped)

    from cscart_fm.cli import main as cli_main

    sys.argv = ["cscart-fm", "run", "order-poll"]
    cli_main()


if __name__ == "__main__":
    main()
