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
    "Messages handled, by consumer and outcome (ok, retry, dead_letter, requeued).",
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
