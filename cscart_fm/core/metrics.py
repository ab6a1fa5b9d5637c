"""Every Prometheus metric the service exports, declared in one place.

Labels are bounded: consumer names, client ids (from the clients file), operations, outcomes,
error types and status classes. Never an order id, a SKU or a shipment reference.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PREFIX = "cscart_fm"

# --- consumer runtime ------------------------------------------------------------------------
MESSAGES = Counter(
    f"{PREFIX}_messages_total",
    "Messages handled, by consumer and outcome (ok, retry, dead_letter, requeued, deferred: "
    "sent round a delay queue while its client's slow store held its share of the workers).",
    ["consumer", "outcome"],
)
MESSAGE_ERRORS = Counter(
    f"{PREFIX}_message_errors_total",
    "Handler failures by consumer and error type.",
    ["consumer", "error_type"],
)
PROCESSING_SECONDS = Histogram(
    f"{PREFIX}_processing_seconds",
    "Time to handle one message, by consumer.",
    ["consumer"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
IN_PROGRESS = Gauge(
    f"{PREFIX}_messages_in_progress",
    "Messages being handled right now, by consumer.",
    ["consumer"],
)
LAST_SUCCESS = Gauge(
    f"{PREFIX}_last_success_timestamp_seconds",
    "Unix time of the last message handled successfully, by consumer.",
    ["consumer"],
)
CONSUMER_UP = Gauge(
    f"{PREFIX}_consumer_connected",
    "1 while the consumer is connected to the broker and consuming.",
    ["consumer"],
)

# --- CS-Cart client --------------------------------------------------------------------------
STORE_REQUESTS = Counter(
    f"{PREFIX}_store_requests_total",
    "HTTP requests to CS-Cart stores, by client, operation and status class "
    "(2xx, 4xx, 5xx, timeout, error).",
    ["client", "operation", "status_class"],
)
STORE_REQUEST_SECONDS = Histogram(
    f"{PREFIX}_store_request_seconds",
    "Duration of HTTP requests to CS-Cart stores, by client and operation.",
    ["client", "operation"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
STORE_RETRIES = Counter(
    f"{PREFIX}_store_retries_total",
    "Requests to CS-Cart stores repeated after a 429, 5xx or timeout.",
    ["client", "operation"],
)

# --- orders pulling (order-poll consumer) ------------------------------------------------------
ORDERS_IMPORTED = Counter(
    f"{PREFIX}_orders_imported_total",
    "CS-Cart orders published to FM, by client.",
    ["client"],
)
ORDERS_SKIPPED = Counter(
    f"{PREFIX}_orders_skipped_total",
    "CS-Cart orders seen but not published, by client and reason (status, country, "
    "before_start_date, before_lookback, parent_order, already_imported).",
    ["client", "reason"],
)
POLL_SECONDS = Histogram(
    f"{PREFIX}_order_poll_seconds",
    "Duration of one order poll of a client's store.",
    ["client"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
LAST_POLL_SUCCESS = Gauge(
    f"{PREFIX}_order_poll_last_success_timestamp_seconds",
    "Unix time of the last successful order poll, by client.",
    ["client"],
)
POLLS_SKIPPED_BUSY = Counter(
    f"{PREFIX}_order_polls_skipped_total",
    "Ticks skipped because another replica was polling the same client.",
    ["client"],
)

# --- tracking push (shipment-lodged consumer) -------------------------------------------------
SHIPMENTS_PUSHED = Counter(
    f"{PREFIX}_shipments_pushed_total",
    "Shipments created in CS-Cart, by client.",
    ["client"],
)
SHIPMENTS_ALREADY_PUSHED = Counter(
    f"{PREFIX}_shipments_already_pushed_total",
    "Shipment events whose shipment already existed (a repeat or redelivery), by client.",
    ["client"],
)
ORDER_STATUS_UPDATES = Counter(
    f"{PREFIX}_order_status_updates_total",
    "Order statuses set after a shipment, by client and kind (shipped, partially_shipped).",
    ["client", "kind"],
)
SHIPMENT_FAILURES = Counter(
    f"{PREFIX}_shipment_failures_total",
    "Shipment events that failed, by client and error type.",
    ["client", "error_type"],
)
LAST_SHIPMENT_PUSH = Gauge(
    f"{PREFIX}_shipment_last_push_timestamp_seconds",
    "Unix time of the last shipment pushed, by client.",
    ["client"],
)

# --- stock push (stock-snapshot consumer) -----------------------------------------------------
STOCK_WRITTEN = Counter(
    f"{PREFIX}_stock_quantities_written_total",
    "Product quantities written to CS-Cart, by client.",
    ["client"],
)
STOCK_UNCHANGED = Counter(
    f"{PREFIX}_stock_quantities_unchanged_total",
    "Snapshot items whose quantity already matched the store (nothing written), by client.",
    ["client"],
)
STOCK_UNKNOWN_SKUS = Counter(
    f"{PREFIX}_stock_unknown_skus_total",
    "Snapshot items whose SKU is not a product code in the store, by client.",
    ["client"],
)
STOCK_UNTRACKED = Counter(
    f"{PREFIX}_stock_untracked_total",
    "Snapshot items whose product does not track inventory in the store, by client.",
    ["client"],
)
STOCK_STALE = Counter(
    f"{PREFIX}_stock_stale_items_total",
    "Snapshot items ignored because a newer snapshot was already applied, by client.",
    ["client"],
)
STOCK_SNAPSHOTS_IGNORED = Counter(
    f"{PREFIX}_stock_snapshots_ignored_total",
    "Snapshots acknowledged without writing because the client has update_stock off.",
    ["client"],
)
LAST_STOCK_PUSH = Gauge(
    f"{PREFIX}_stock_last_push_timestamp_seconds",
    "Unix time of the last stock snapshot applied, by client.",
    ["client"],
)

# --- dead letters -----------------------------------------------------------------------------
DEAD_LETTERS_OPEN = Gauge(
    f"{PREFIX}_dead_letters_open",
    "Dead letters collected into the state store and waiting for support, by consumer and "
    "error type (the .dlq queues are emptied into the store, so their depth is not the count).",
    ["consumer", "error_type"],
)
