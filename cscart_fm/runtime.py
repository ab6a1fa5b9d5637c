"""The consumer runtime, written once: decode → validate → handle → ack / retry / dead-letter.

Each consumer is a small typed ``Handler``; this module owns everything around it.

Threads: the runtime's own thread owns the broker connection (kombu connections are not
thread-safe). It receives deliveries, sends heartbeats, acknowledges, and publishes retries
and dead letters. Handlers run on a small worker pool, so a slow store never starves the
heartbeat (with ConsumerMixin-style consuming a 30 s HTTP call loses the connection).

Fates (the table lives on the error types in ``cscart_fm.errors``):
- success → ack, only after the handler returned (its publishes confirmed, its state committed);
- ``Fate.RETRY`` → a copy goes to the delay queue for that attempt (confirmed), then ack;
  after ``max_attempts`` → dead letter;
- ``Fate.DEAD_LETTER`` (invalid message, unknown client, permanent store error) → a copy with
  headers saying what happened and what to do goes to the consumer's ``.dlq`` (confirmed),
  then ack;
- the consumer dies holding a message → the broker redelivers it (handlers are idempotent);
  ``x-delivery-limit`` dead-letters one that keeps killing consumers.
"""

from __future__ import annotations

import json
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from types import FrameType
from typing import Any, Generic, Protocol, TypeVar

import structlog
from amqp.exceptions import AMQPError
from kombu import Connection, Consumer, Producer
from kombu.exceptions import OperationalError as KombuOperationalError
from kombu.message import Message

from schemas.messages import _Message, parse_event

from . import metrics
from .broker import connect
from .errors import BridgeError, Fate
from .observability import redact_text
from .topology import DEAD_LETTER_EXCHANGE, ConsumerTopology

log = structlog.get_logger(__name__)

E = TypeVar("E", bound=_Message, contravariant=True)

ATTEMPT_HEADER = "cscart-attempt"

_BROKER_TROUBLE = (OSError, AMQPError, KombuOperationalError)
"""Failures of the connection itself, as opposed to something about one message."""
"""Our own count of delayed retries (the broker ignores client-set ``x-`` headers)."""


@dataclass(frozen=True)
class Delivery:
    """What a handler may want to know about the message besides its body."""

    message_id: str | None
    attempt: int  # 1 on the first try; grows with each delayed retry
    redelivered: bool  # the broker handed it out before (a consumer died holding it)


class Handler(Protocol[E]):
    """One consumer's job. Raise a ``BridgeError`` subtype to choose the message's fate;
    return normally only once the effect is durable."""

    consumer: str
    event_type: type[_Message]

    def handle(self, event: E, delivery: Delivery) -> None: ...


@dataclass
class _Outcome:
    error: BridgeError | None = None
    client_id: str | None = None
    event_id: str | None = None


@dataclass
class _InFlight:
    message: Message
    future: Future[_Outcome]
    attempt: int


class _WorkerPool:
    """A fixed pool of daemon threads. Unlike ThreadPoolExecutor's, its threads never keep
    the process alive: once the grace period is over and the message was handed back, a
    handler still stuck on a store must not delay the exit Kubernetes asked for."""

    def __init__(self, size: int, name: str) -> None:
        self._tasks: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            future, call = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:
                future.set_exception(exc)

    def submit(self, call: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self._tasks.put((future, call))
        return future

    def shutdown(self) -> None:
        for _ in self._threads:
            self._tasks.put(None)


@dataclass
class RuntimeOptions:
    prefetch: int = 4
    concurrency: int = 2
    heartbeat: int = 30
    max_attempts: int = 5
    shutdown_grace: float = 30.0
    reconnect_max_wait: float = 30.0
    extra: dict[str, Any] = field(default_factory=dict)


def _attempt_of(headers: Mapping[str, Any] | None) -> int:
    try:
        return max(1, int((headers or {}).get(ATTEMPT_HEADER, 1)))
    except (TypeError, ValueError):
        return 1


def _peek_client_id(body: bytes) -> str | None:
    """The client_id of a body that failed validation, for the dead letter's headers."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    value = document.get("client_id") if isinstance(document, dict) else None
    return value[:64] if isinstance(value, str) else None


def _internal_error(exc: BaseException) -> BridgeError:
    # An unexpected exception is a bug or an outage we did not type: retried, then
    # dead-lettered. Its text is scrubbed because libraries may quote data in it.
    text = redact_text(str(exc).splitlines()[0] if str(exc) else "")[:300]
    return BridgeError(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


class ConsumerRuntime(Generic[E]):
    """Runs one handler on its work queue until ``stop()``; reconnects after broker loss."""

    def __init__(
        self,
        handler: Handler[E],
        *,
        broker_url: str,
        topology: ConsumerTopology,
        options: RuntimeOptions | None = None,
        on_success: Callable[[str, _Message], None] | None = None,
    ) -> None:
        self.handler = handler
        self.on_success = on_success
        self.topology = topology
        self.options = options or RuntimeOptions()
        self.broker_url = broker_url
        self.name = handler.consumer
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._pending: deque[Message] = deque()
        self._in_flight: list[_InFlight] = []
        self._workers = _WorkerPool(self.options.concurrency, f"{self.name}-worker")
        self._finished = threading.Event()  # set by a worker when its handler is done
        self.log = log.bind(consumer=self.name)

    # --- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the runtime to finish (or hand back) what it holds and return from ``run``."""
        self._stop.set()

    @property
    def ready(self) -> bool:
        """Connected and consuming (for /readyz)."""
        return self._connected.is_set()

    def is_ready(self) -> bool:
        return self.ready

    def run(self) -> None:
        wait = 1.0
        metrics.CONSUMER_UP.labels(self.name).set(0)
        try:
            while not self._stop.is_set():
                try:
                    self._run_connected()
                    wait = 1.0
                except Exception as exc:
                    self._connected.clear()
                    metrics.CONSUMER_UP.labels(self.name).set(0)
                    if self._stop.is_set():
                        break
                    self.log.warning(
                        "broker connection lost; reconnecting",
                        error=f"{type(exc).__name__}: {exc}",
                        retry_in=wait,
                    )
                    # Messages held by the lost connection come back from the broker; wait for
                    # their handlers so a redelivered copy never runs beside the original.
                    self._drain_workers(timeout=None)
                    self._pending.clear()
                    self._in_flight.clear()
                    self._stop.wait(wait)
                    wait = min(wait * 2, self.options.reconnect_max_wait)
        finally:
            self._connected.clear()
            metrics.CONSUMER_UP.labels(self.name).set(0)
            self._workers.shutdown()
            self.log.info("consumer stopped")

    def _wake(self, _future: Future[_Outcome]) -> None:
        self._finished.set()

    def _drain_workers(self, timeout: float | None) -> None:
        for item in list(self._in_flight):
            try:
                item.future.result(timeout=timeout)
            except Exception:  # noqa: S112 - the outcome is discarded: the broker redelivers
                continue

    def _run_connected(self) -> None:
        with connect(self.broker_url, heartbeat=self.options.heartbeat) as conn:
            conn.connect()
            consume_channel = conn.channel()
            consume_channel.basic_qos(0, self.options.prefetch, False)
            producer = Producer(conn.channel())
            for queue in self.topology.queues():
                queue(producer.channel).declare()
            consumer = Consumer(
                consume_channel,
                queues=[self.topology.queue],
                on_message=self._pending.append,  # raw bodies: we decode, kombu must not
                no_ack=False,
                auto_declare=False,
            )
            consumer.consume()
            self._connected.set()
            metrics.CONSUMER_UP.labels(self.name).set(1)
            self.log.info(
                "consuming",
                queue=self.topology.queue_name,
                prefetch=self.options.prefetch,
                concurrency=self.options.concurrency,
            )
            while not self._stop.is_set():
                self._settle(producer)
                self._start_pending()
                self._pump(conn)
            self._shutdown(conn, consumer, producer)

    def _pump(self, conn: Connection) -> None:
        """Read what the broker sent and keep the heartbeat, waking as soon as a worker
        finishes: a handler done in 50 µs must not wait on a socket read's timeout."""
        if self._in_flight:
            self._finished.wait(0.02)
            self._finished.clear()
            # Read every frame already there without blocking (one delivery per call).
            for _ in range(self.options.prefetch + 2):
                try:
                    conn.drain_events(timeout=0)
                except TimeoutError:  # socket.timeout: nothing more right now
                    break
        else:
            try:
                conn.drain_events(timeout=0.2)
            except TimeoutError:  # nothing arrived: time for the heartbeat
                pass
        conn.heartbeat_check()

    def _shutdown(self, conn: Connection, consumer: Consumer, producer: Producer) -> None:
        """SIGTERM: stop taking messages, finish those in hand within the grace period,
        hand back the rest (a requeue, or the closing connection returns them)."""
        self.log.info("stopping: finishing messages in hand", in_flight=len(self._in_flight))
        consumer.cancel()
        while self._pending:
            self._pending.popleft().requeue()
            metrics.MESSAGES.labels(self.name, "requeued").inc()
        deadline = time.monotonic() + self.options.shutdown_grace
        while self._in_flight and time.monotonic() < deadline:
            self._settle(producer)
            self._pump(conn)
        self._settle(producer)
        while self._pending:  # anything delivered before the cancel took effect
            self._pending.popleft().requeue()
            metrics.MESSAGES.labels(self.name, "requeued").inc()
        if self._in_flight:
            self.log.warning(
                "grace period over: handing back unfinished messages",
                count=len(self._in_flight),
            )
        self._connected.clear()

    # --- per message --------------------------------------------------------------------------

    def _start_pending(self) -> None:
        while self._pending and len(self._in_flight) < self.options.concurrency:
            message = self._pending.popleft()
            attempt = _attempt_of(message.headers)
            delivery = Delivery(
                message_id=message.properties.get("message_id"),
                attempt=attempt,
                redelivered=bool(message.delivery_info.get("redelivered")),
            )
            future = self._workers.submit(partial(self._process, message.body, delivery))
            future.add_done_callback(self._wake)
            self._in_flight.append(_InFlight(message, future, attempt))

    def _process(self, body: bytes, delivery: Delivery) -> _Outcome:
        """Runs on a worker thread; never touches the broker connection."""
        started = time.monotonic()
        metrics.IN_PROGRESS.labels(self.name).inc()
        outcome = _Outcome()
        try:
            event = parse_event(body, self.handler.event_type)
            outcome.client_id, outcome.event_id = event.client_id, event.event_id
            with structlog.contextvars.bound_contextvars(
                consumer=self.name,
                client_id=event.client_id,
                event_id=event.event_id,
                attempt=delivery.attempt,
            ):
                self.handler.handle(event, delivery)  # type: ignore[arg-type]
            if self.on_success is not None:
                try:
                    self.on_success(self.name, event)
                except Exception:
                    # Bookkeeping after success (e.g. resolving dead letters) must never
                    # turn a done message into a failed one.
                    self.log.exception("success hook failed", event_id=event.event_id)
        except BridgeError as exc:
            outcome.error = exc
        except Exception as exc:
            self.log.exception("handler failed unexpectedly", event_id=outcome.event_id)
            outcome.error = _internal_error(exc)
        finally:
            metrics.IN_PROGRESS.labels(self.name).dec()
            metrics.PROCESSING_SECONDS.labels(self.name).observe(time.monotonic() - started)
        if outcome.error is not None and outcome.client_id is None:
            outcome.client_id = _peek_client_id(body)
        return outcome

    def _settle(self, producer: Producer) -> None:
        """Acknowledge finished messages, after their retry or dead letter is confirmed."""
        done = [item for item in self._in_flight if item.future.done()]
        if not done:
            return
        self._in_flight = [item for item in self._in_flight if not item.future.done()]
        # Hand the workers their next messages first: they run while this thread acks.
        self._start_pending()
        for item in done:
            try:
                self._settle_one(producer, item)
            except _BROKER_TROUBLE:
                raise  # the connection is gone: the broker redelivers what was not acked
            except Exception:
                # Something about this message itself (a header the client cannot encode...)
                # must not look like a broker outage, or it would come back forever. Reject
                # it: the work queue's own dead-letter exchange takes it to the .dlq.
                self.log.exception("could not settle a message; rejected to the dead letters")
                item.message.reject(requeue=False)
                metrics.MESSAGES.labels(self.name, "dead_letter").inc()

    def _settle_one(self, producer: Producer, item: _InFlight) -> None:
        outcome = item.future.result()
        message = item.message
        error = outcome.error
        if error is None:
            message.ack()
            metrics.MESSAGES.labels(self.name, "ok").inc()
            metrics.LAST_SUCCESS.labels(self.name).set_to_current_time()
            return
        metrics.MESSAGE_ERRORS.labels(self.name, error.error_type).inc()
        bound = self.log.bind(
            client_id=outcome.client_id,
            event_id=outcome.event_id,
            error_type=error.error_type,
            reason=error.reason,
            attempt=item.attempt,
        )
        if error.fate is Fate.RETRY and item.attempt < self.options.max_attempts:
            delay = self.topology.retry_delay(item.attempt)
            self._republish(
                producer,
                message,
                exchange="",
                routing_key=self.topology.retry_queue_name(delay),
                headers={
                    ATTEMPT_HEADER: item.attempt + 1,
                    "cscart-last-error-type": error.error_type,
                    "cscart-last-reason": error.reason[:500],
                },
            )
            message.ack()
            metrics.MESSAGES.labels(self.name, "retry").inc()
            bound.warning("failed; retrying later", retry_in_seconds=delay)
        else:
            self._republish(
                producer,
                message,
                exchange=DEAD_LETTER_EXCHANGE,
                routing_key=self.topology.dead_letter_queue_name,
                headers=self._dead_letter_headers(error, item.attempt, outcome),
            )
            message.ack()
            metrics.MESSAGES.labels(self.name, "dead_letter").inc()
            bound.error("dead-lettered", action=error.action)

    def _dead_letter_headers(
        self, error: BridgeError, attempt: int, outcome: _Outcome
    ) -> dict[str, Any]:
        exhausted = error.fate is Fate.RETRY
        reason = error.reason
        if exhausted:
            reason = f"gave up after {attempt} attempts: {reason}"
        return {
            "cscart-error-type": error.error_type,
            "cscart-reason": redact_text(reason)[:1000],
            "cscart-action": error.action,
            "cscart-consumer": self.name,
            "cscart-attempts": attempt,
            "cscart-client-id": outcome.client_id or "",
            "cscart-dead-lettered-at": datetime.now(UTC).isoformat(timespec="seconds"),
            "cscart-original-exchange": self.topology.queue.exchange.name,
            "cscart-original-routing-key": self.topology.routing_key,
        }

    @staticmethod
    def _republish(
        producer: Producer,
        message: Message,
        *,
        exchange: str,
        routing_key: str,
        headers: Mapping[str, Any],
    ) -> None:
        """Publish a copy of the message (same body and properties) and wait for the confirm."""
        properties = message.properties
        merged = {**(message.headers or {}), **headers}
        # Always bytes: py-amqp decodes a body whose content_encoding names a text codec, and
        # kombu would re-encode a str with whatever the message claims ("binary" included).
        body, encoding = message.body, message.content_encoding or "utf-8"
        if isinstance(body, str):
            try:
                body = body.encode(encoding)
            except (LookupError, UnicodeError):
                body, encoding = body.encode("utf-8", "surrogateescape"), "utf-8"
        producer.publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            headers=merged,
            serializer=None,
            content_type=message.content_type or "application/json",
            content_encoding=encoding,
            delivery_mode=2,
            message_id=properties.get("message_id"),
            retry=False,
        )


def run_until_stopped(runtimes: list[ConsumerRuntime[Any]], stop: threading.Event) -> None:
    """Run several runtimes on their own threads until ``stop`` is set, then stop them all."""
    threads = [
        threading.Thread(target=runtime.run, name=f"consumer-{runtime.name}", daemon=True)
        for runtime in runtimes
    ]
    for thread in threads:
        thread.start()
    while not stop.wait(0.5):
        if not any(thread.is_alive() for thread in threads):
            break
    for runtime in runtimes:
        runtime.stop()
    longest = max((r.options.shutdown_grace for r in runtimes), default=0.0) + 5
    deadline = time.monotonic() + longest
    for thread in threads:
        thread.join(timeout=max(0.1, deadline - time.monotonic()))


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM (Kubernetes) and SIGINT (Ctrl-C) finish or hand back the messages in hand,
    then the process exits 0. Python as PID 1 ignores SIGTERM without a handler."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal received: finishing the messages in hand", signal=signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
