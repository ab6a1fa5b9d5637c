"""A consumer process for crash and shutdown tests: the real runtime with a slow handler.

Usage: python -m tests.support.slow_consumer BROKER_URL MARKER_DIR HANDLE_SECONDS GRACE
Each message's shipment_ref is written to MARKER_DIR/started-<ref> when the handler starts
and MARKER_DIR/done-<ref>-<n> when it finishes (n counts repeated handling).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from consumers.registry import JOBS
from cscart_fm.core.observability import configure_logging
from cscart_fm.core.runtime import (
    ConsumerRuntime,
    Delivery,
    RuntimeOptions,
    run_until_stopped,
    stop_on_signals,
)
from schemas.messages import ShipmentLodged

SHIPMENTS = JOBS.named("shipment-lodged")


class SlowHandler:
    consumer = "shipment-lodged"
    event_type = ShipmentLodged

    def __init__(self, markers: Path, seconds: float) -> None:
        self.markers = markers
        self.seconds = seconds

    def handle(self, event: ShipmentLodged, delivery: Delivery) -> None:
        ref = event.shipment_ref
        (self.markers / f"started-{ref}").write_text(str(delivery.redelivered))
        time.sleep(self.seconds)
        n = len(list(self.markers.glob(f"done-{ref}-*")))
        (self.markers / f"done-{ref}-{n}").write_text(str(delivery.redelivered))


def main() -> None:
    url, markers, seconds, grace = (
        sys.argv[1],
        Path(sys.argv[2]),
        float(sys.argv[3]),
        float(sys.argv[4]),
    )
    configure_logging("INFO", "json")
    stop = threading.Event()
    stop_on_signals(stop)
    runtime: ConsumerRuntime[ShipmentLodged] = ConsumerRuntime(
        SlowHandler(markers, seconds),
        broker_url=url,
        topology=SHIPMENTS.topology((1,)),
        accepts=SHIPMENTS.events,
        options=RuntimeOptions(prefetch=1, concurrency=1, heartbeat=5, shutdown_grace=grace),
    )
    (markers / "ready").write_text("")
    run_until_stopped([runtime], stop)


if __name__ == "__main__":
    main()
