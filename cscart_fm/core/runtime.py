"""The consumer runtime, written once: decode → validate → handle → ack / retry / dead-letter.

Each consumer is a small typed ``Handler``; this module owns everything around it.

Threads: the runtime's own thread owns the broker connection (kombu connections are not
thread-safe). It receives deliveries, sends heartbeats, acknowledges, and publishes retries
and dead letters. Handlers run on a small worker pool, so a slow store never starves the
heartbeat (with ConsumerMixin-style consuming a 30 s HTTP call loses the connection).

Hand-offs cost per burst, not per message (each thread wake-up is a system call, and a costly
one in a VM). The deliveries of one read go onto a queue the workers take from; a worker puts
each outcome on a queue back and, when it has no more work to take, writes one byte to a
socket pair that the connection thread ``poll()``s together with the broker's socket. So that
thread sleeps until the broker sends something, a worker runs dry, or the heartbeat is due;
then it acks the finished messages at the bottom of the channel's unsettled window with one
``basic.ack(multiple=True)`` (never one whose handler has not returned). Without a plain TCP
socket to wait on (memory://, TLS), it falls back to short timed waits.

Fates (the table lives on the error types in ``cscart_fm.core.errors``):
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

import contextlib
import json
import queue
import select
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from types import FrameType
from typing import Any, Generic, Protocol, TypeVar

import amqp
import structlog
from amqp.exceptions import AMQPError
from amqp.transport import TCPTransport
from kombu import Connection, Consumer, Producer
from kombu.exceptions import OperationalError as KombuOperationalError
from kombu.message import Message as AmqpMessage
from prometheus_client import Counter

from cscart_fm.core import frames, metrics
from cscart_fm.core.broker import connect
from cscart_fm.core.errors import BridgeError, Fate, InvalidMessage
from cscart_fm.core.events import parse_event
from cscart_fm.core.observability import redact_text
from cscart_fm.core.topology import DEAD_LETTER_EXCHANGE, EVENTS_EXCHANGE, ConsumerTopology
from schemas.messages import Message

log = structlog.get_logger(__name__)

E = TypeVar("E", bound=Message, contravariant=True)

CARRIED_PROPERTIES = (
    "message_id", "correlation_id", "reply_to", "app_id", "type", "priority", "timestamp",
)
"""What a retry or dead-letter copy keeps of the message's properties (not ``expiration``:
a copy must not expire on its way; not ``user_id``: the broker checks it against ours)."""

DEFERRALS_HEADER = "cscart-deferrals"
"""How many times a message went round because its client's store was slow."""

DROPPED_HEADERS = "cscart-headers-dropped"
"""On a copy whose original headers could not be written back: why."""

ATTEMPT_HEADER = "cscart-attempt"
"""Our own count of delayed retries (the broker ignores client-set ``x-`` headers)."""

_BROKER_TROUBLE = (OSError, AMQPError, KombuOperationalError)
"""Failures of the connection itself, as opposed to something about one message."""

_TICK = 0.2
"""Seconds between heartbeat checks (and the longest the connection thread sleeps)."""

_POLL = 0.02
"""Without a socket to wait on: how long to wait for a worker before reading the broker."""


@dataclass(frozen=True)
class Delivery:
    """What a handler may want to know about the message besides its body."""

    message_id: str | None
    attempt: int  # 1 on the first try; grows with each delayed retry
    redelivered: bool  # the broker handed it out before (a consumer died holding it)


class Handler(Protocol[E]):
    """One job's handler. Raise a ``BridgeError`` subtype to choose the message's fate;
    return normally only once the effect is durable."""

    def handle(self, event: E, delivery: Delivery) -> None: ...


class Middleware:
    """Hooks around every message (dramatiq's idea): each runs on the worker thread, and a
    hook that fails is logged and never changes the message's fate."""

    def before_handle(self, consumer: str, event: Message, delivery: Delivery) -> None:
        """Called after the body validated, before the handler."""

    def after_handle(self, consumer: str, event: Message, error: BridgeError | None) -> None:
        """Called once the handler returned (``error`` None) or raised."""


class LogContext(Middleware):
    """Handlers' own log lines name the message they are about."""

    def __init__(self) -> None:
        self._tokens = threading.local()

    def before_handle(self, consumer: str, event: Message, delivery: Delivery) -> None:
        self._tokens.value = structlog.contextvars.bind_contextvars(
            consumer=consumer,
            client_id=event.client_id,
            event_id=event.event_id,
            attempt=delivery.attempt,
        )

    def after_handle(self, consumer: str, event: Message, error: BridgeError | None) -> None:
        tokens = getattr(self._tokens, "value", None)
        if tokens is not None:
            structlog.contextvars.reset_contextvars(**tokens)
            self._tokens.value = None


class ClientFailures(Middleware):
    """Counts a job's failed messages per client (a client not in the clients file is
    counted as "(unknown)": a label is never a message's own value)."""

    def __init__(self, counter: Counter, known_clients: Container[str]) -> None:
        self.counter = counter
        self.known_clients = known_clients

    def after_handle(self, consumer: str, event: Message, error: BridgeError | None) -> None:
        if error is not None:
            client = event.client_id if event.client_id in self.known_clients else "(unknown)"
            self.counter.labels(client, error.error_type).inc()


@dataclass(slots=True)
class _Outcome:
    attempt: int
    error: BridgeError | None = None
    client_id: str | None = None
    event_id: str | None = None
    routing_key: str | None = None  # the event's, once its body validated
    deferred: bool = False  # its client's store is slow and holds its share: sent round


class _Waker:
    """Wakes the connection thread out of ``poll()`` with one byte, and writes none while a
    wake-up is already pending (one system call per burst, not per message)."""

    def __init__(self) -> None:
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        self._pending = False
        self._poller = _poller(self.fileno())

    def fileno(self) -> int:
        return self._read.fileno()

    def wake(self) -> None:
        if not self._pending:
            self._pending = True
            try:
                self._write.send(b"\0")
            except OSError:
                pass  # full of wake-ups already, or closed: the runtime has stopped

    def clear(self) -> None:
        """Consume the wake-ups. Read the bytes before lowering the flag, and look at the work
        only afterwards: a wake-up skipped because the flag was up then is never lost."""
        with contextlib.suppress(BlockingIOError):
            while self._read.recv(4096):
                pass
        self._pending = False

    def wait(self, timeout: float) -> None:
        if self._poller is not None:
            self._poller.poll(timeout * 1000)
        else:
            select.select([self._read], [], [], timeout)
        self.clear()

    def close(self) -> None:
        self._read.close()
        self._write.close()


@dataclass
class RuntimeOptions:
    prefetch: int = 4
    concurrency: int = 2
    heartbeat: int = 30
    max_attempts: int = 5
    shutdown_grace: float = 30.0
    reconnect_max_wait: float = 30.0
    slow_client_after: float = 10.0
    """A client whose messages in hand have all run this long has a slow store: once it
    holds all workers but one, its next messages go round a delay queue instead of taking
    the last worker from the other clients (see ``_admit``)."""
    extra: dict[str, Any] = field(default_factory=dict)


def _attempt_of(headers: Mapping[str, Any] | None) -> int:
    return max(1, _count(headers, ATTEMPT_HEADER) or 1)


def _count(headers: Mapping[str, Any] | None, name: str) -> int:
    """A count header of ours; anything else in it (a forged or broken value) counts as 0."""
    value = (headers or {}).get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value)) if isinstance(value, str) else 0
        except ValueError:
            value = 0
    return max(0, min(int(value), 1_000_000))


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


def _poller(*fds: int) -> select.poll | None:
    """A poll() object watching ``fds`` for reading. poll(), not select(): select() cannot
    watch a descriptor numbered 1024 or more, which a busy process reaches. None where the
    platform has no poll() (Windows)."""
    if not hasattr(select, "poll"):
        return None
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return poller


@dataclass(frozen=True)
class _BrokerSocket:
    """py-amqp's connection, and poll() objects on its socket with and without the waker."""

    connection: amqp.Connection
    fd: int
    with_waker: select.poll
    alone: select.poll


def _broker_socket(conn: Connection, waker: _Waker) -> _BrokerSocket | None:
    """The broker's socket when waiting for it to be readable tells the whole truth: over
    plain TCP py-amqp reads exactly one frame's bytes at a time, so nothing it could deliver
    waits in a buffer. Over TLS, OpenSSL may hold decrypted bytes poll() cannot see, and
    other transports (memory://) have no socket: those use timed waits instead."""
    connection = conn.connection
    plain = isinstance(connection, amqp.Connection) and type(connection.transport) is TCPTransport
    if not plain:
        return None
    fd = connection.sock.fileno()
    with_waker, alone = _poller(fd, waker.fileno()), _poller(fd)
    if with_waker is None or alone is None:
        return None
    return _BrokerSocket(connection, fd, with_waker, alone)


class ConsumerRuntime(Generic[E]):
    """Runs one handler on its work queue until ``stop()``; reconnects after broker loss."""

    def __init__(
        self,
        handler: Handler[E],
        *,
        broker_url: str,
        topology: ConsumerTopology,
        accepts: tuple[type[Message], ...],
        options: RuntimeOptions | None = None,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self.handler = handler
        self.accepts = accepts
        self.middleware = [LogContext(), *middleware]
        self.topology = topology
        self.options = options or RuntimeOptions()
        self.broker_url = broker_url
        self.name = topology.name
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._stopping = False  # the connection thread is handing back instead of handling
        # Every delivery of the current channel not yet settled, in delivery-tag order:
        # queued for a worker, being handled, or finished and waiting for its ack.
        self._in_flight: dict[int, AmqpMessage] = {}
        self._pending: deque[AmqpMessage] = deque()  # delivered while stopping: to hand back
        self._received: list[AmqpMessage] = []  # delivered during the current read burst
        self._work: queue.SimpleQueue[AmqpMessage | None] = queue.SimpleQueue()
        self._at_workers = 0  # put on _work and not yet taken back from _done
        self._done: queue.SimpleQueue[tuple[AmqpMessage, _Outcome]] = queue.SimpleQueue()
        self._waker = _Waker()
        self._share = max(1, self.options.concurrency - 1)
        self._running: dict[str, list[float]] = {}  # client → start times of its messages
        self._running_lock = threading.Lock()
        self._multiple_ack = False
        self._next_tick = 0.0
        self.log = log.bind(consumer=self.name)
        # Label children bound once: a labels() lookup per message costs a lock and a hash.
        self._ok = metrics.MESSAGES.labels(self.name, "ok")
        self._last_success = metrics.LAST_SUCCESS.labels(self.name)
        self._in_progress = metrics.IN_PROGRESS.labels(self.name)
        self._processing = metrics.PROCESSING_SECONDS.labels(self.name)
        # Daemon threads: once the grace period is over and the message was handed back, a
        # handler still stuck on a store must not delay the exit Kubernetes asked for.
        self._workers = [
            threading.Thread(target=self._work_loop, name=f"{self.name}-worker-{i}", daemon=True)
            for i in range(self.options.concurrency)
        ]
        for thread in self._workers:
            thread.start()

    # --- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the runtime to finish (or hand back) what it holds and return from ``run``."""
        self._stop.set()
        self._waker.wake()

    @property
    def ready(self) -> bool:
        """Connected and consuming (for /readyz)."""
        return self._connected.is_set()

    def is_ready(self) -> bool:
        return self.ready

    @property
    def idle(self) -> bool:
        """Nothing delivered and not yet settled."""
        return not self._in_flight and not self._pending

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
                    self._abandon()
                    self._stop.wait(wait)
                    wait = min(wait * 2, self.options.reconnect_max_wait)
        finally:
            self._connected.clear()
            metrics.CONSUMER_UP.labels(self.name).set(0)
            self._take_back_unstarted()  # a lost connection's: not to be started on the way out
            for _ in self._workers:
                self._work.put(None)
            self._waker.close()
            self.log.info("consumer stopped")

    def _abandon(self) -> None:
        """Forget the lost connection's messages: the broker gives them out again. Wait for
        the handlers still running, so a redelivered copy never runs beside the original."""
        self._take_back_unstarted()
        while self._at_workers and not self._stop.is_set():  # each one taken comes back
            with contextlib.suppress(queue.Empty):
                self._done.get(timeout=0.5)
                self._at_workers -= 1
        self._pending.clear()
        self._received.clear()
        self._in_flight.clear()
        self._stopping = False

    def _take_back_unstarted(self) -> list[AmqpMessage]:
        """The messages still queued for the workers, which no worker can start any more."""
        taken: list[AmqpMessage] = []
        with contextlib.suppress(queue.Empty):
            while (message := self._work.get_nowait()) is not None:
                taken.append(message)
        self._at_workers -= len(taken)
        return taken

    def _run_connected(self) -> None:
        with connect(self.broker_url, heartbeat=self.options.heartbeat) as conn:
            conn.connect()
            consume_channel = conn.channel()
            consume_channel.basic_qos(0, self.options.prefetch, False)
            producer = Producer(conn.channel())
            for queue_ in self.topology.queues():
                queue_(producer.channel).declare()
            consumer = Consumer(
                consume_channel,
                queues=[self.topology.queue],
                on_message=self._on_message,  # raw bodies: we decode, kombu must not
                no_ack=False,
                auto_declare=False,
            )
            # Only AMQP's basic.ack takes ``multiple``; kombu's virtual transports would ack
            # the one tag and keep the others unacknowledged.
            self._multiple_ack = isinstance(consume_channel, amqp.Channel)
            broker = _broker_socket(conn, self._waker)
            consumer.consume()
            self._connected.set()
            metrics.CONSUMER_UP.labels(self.name).set(1)
            self.log.info(
                "consuming",
                queue=self.topology.queue_name,
                prefetch=self.options.prefetch,
                concurrency=self.options.concurrency,
                wake_up="socket" if broker is not None else "timed",
            )
            pump: Callable[[], None] = (
                partial(self._pump_socket, conn, broker)
                if broker is not None
                else partial(self._pump_timed, conn)
            )
            while not self._stop.is_set():
                self._settle(producer)
                pump()
            self._shutdown(consumer, producer, pump)

    def _on_message(self, message: AmqpMessage) -> None:
        """Called by kombu on this thread for each delivery, in delivery-tag order."""
        self._in_flight[message.delivery_tag] = message
        self._received.append(message)

    def _dispatch(self) -> None:
        """Hand the deliveries of one read burst to the workers, after the burst: a worker
        woken by the first one would otherwise fight this thread for the GIL at every
        socket read of the rest."""
        if not self._received:
            return
        if self._stopping:
            self._pending.extend(self._received)
        else:
            for message in self._received:
                self._work.put(message)
            self._at_workers += len(self._received)
        self._received.clear()

    def _tick(self, conn: Connection) -> None:
        now = time.monotonic()
        if now >= self._next_tick:
            conn.heartbeat_check()
            self._next_tick = now + _TICK

    def _pump_socket(self, conn: Connection, broker: _BrokerSocket) -> None:
        """Sleep until the broker sends something, a worker runs dry, or the heartbeat is
        due; then read every complete delivery already there, without blocking."""
        self._dispatch()  # what kombu delivered while a confirm or a cancel was awaited
        # Bytes py-amqp already holds (a partial frame put back after a read timeout): read
        # again without sleeping, whatever poll() says about the socket.
        buffered = bool(broker.connection.transport._read_buffer)
        timeout = 0.0 if buffered else max(0.0, self._next_tick - time.monotonic())
        ready = {fd for fd, _ in broker.with_waker.poll(timeout * 1000)}
        if self._waker.fileno() in ready:
            self._waker.clear()
        if buffered or broker.fd in ready:  # readable, closed or failed: the read tells
            # Bounded, so a broker that keeps sending cannot keep finished messages unacked.
            for _ in range(self.options.prefetch + 2):
                try:
                    broker.connection.drain_events(timeout=0)
                except TimeoutError:  # nothing more, or only part of a frame yet
                    break
                if not broker.alone.poll(0):  # drained, known without a read failing on it
                    break
            self._dispatch()
        self._tick(conn)

    def _pump_timed(self, conn: Connection) -> None:
        """The same without a socket to wait on: wait for a worker a little, then read."""
        self._dispatch()
        if self._in_flight:
            self._waker.wait(_POLL)
            for _ in range(self.options.prefetch + 2):
                try:
                    conn.drain_events(timeout=0)
                except TimeoutError:
                    break
        else:
            try:
                conn.drain_events(timeout=_TICK)
            except TimeoutError:  # nothing arrived: time for the heartbeat
                pass
        self._dispatch()
        self._tick(conn)

    def _shutdown(
        self, consumer: Consumer, producer: Producer, pump: Callable[[], None]
    ) -> None:
        """SIGTERM: stop taking messages, finish those in hand within the grace period,
        hand back the rest (a requeue, or the closing connection returns them)."""
        self._stopping = True
        self._pending.extend(self._take_back_unstarted())
        self.log.info("stopping: finishing messages in hand", in_flight=self._at_workers)
        consumer.cancel()
        self._hand_back()
        deadline = time.monotonic() + self.options.shutdown_grace
        while True:
            self._settle(producer)
            if not self._at_workers or time.monotonic() >= deadline:
                break
            pump()
        self._hand_back()  # anything delivered before the cancel took effect
        if self._in_flight:
            self.log.warning(
                "grace period over: handing back unfinished messages",
                count=len(self._in_flight),
            )
        self._connected.clear()

    def _hand_back(self) -> None:
        self._dispatch()  # while stopping, the latest deliveries go to _pending
        while self._pending:
            message = self._pending.popleft()
            message.requeue()
            del self._in_flight[message.delivery_tag]
            metrics.MESSAGES.labels(self.name, "requeued").inc()

    # --- per message, on a worker ---------------------------------------------------------------

    def _work_loop(self) -> None:
        while (message := self._work.get()) is not None:
            try:
                outcome = self._process(message)
            except BaseException as exc:  # every message taken must come back (see _abandon)
                outcome = _Outcome(attempt=_attempt_of(message.headers))
                outcome.error = _internal_error(exc)
            self._done.put((message, outcome))
            # Wake the connection thread when this worker runs out of work. While it has
            # more, a CPU-bound handler keeps the GIL and the woken thread could only wait
            # for it; an I/O-bound one delays the ack at most to the next tick (_TICK), when
            # the connection thread settles whatever is done.
            if self._work.empty():
                self._waker.wake()

    def _process(self, message: AmqpMessage) -> _Outcome:
        """Runs on a worker thread; reads the message but never touches the connection."""
        started = time.monotonic()
        self._in_progress.inc()
        body = message.body
        outcome = _Outcome(attempt=_attempt_of(message.headers))
        try:
            unreadable = frames.undecodable(message.headers)
            if unreadable:
                raise InvalidMessage(
                    f"header {unreadable[0][:100]}: a timestamp no date can hold (milliseconds "
                    "sent where the AMQP timestamp is seconds?)"
                )
            event: Message = parse_event(body, self.accepts)
            outcome.client_id, outcome.event_id = event.client_id, event.event_id
            outcome.routing_key = getattr(event, "type", None)  # the routing key of its type
            delivery = Delivery(
                message_id=message.properties.get("message_id"),
                attempt=outcome.attempt,
                redelivered=bool(message.delivery_info.get("redelivered")),
            )
            admitted = self._admit(event.client_id)
            if admitted is None:
                outcome.deferred = True
                return outcome
            try:
                self._around(event, delivery)
            finally:
                self._release(event.client_id, admitted)
        except BridgeError as exc:
            outcome.error = exc
        except Exception as exc:
            self.log.exception("handler failed unexpectedly", event_id=outcome.event_id)
            outcome.error = _internal_error(exc)
        finally:
            self._in_progress.dec()
            self._processing.observe(time.monotonic() - started)
        if outcome.error is not None and outcome.client_id is None:
            outcome.client_id = _peek_client_id(body)
        return outcome

    def _admit(self, client_id: str) -> float | None:
        """When this client's message may start (its start time), or None: the client holds
        its share of the workers (all but one) and every one of its messages in hand has run
        ``slow_client_after`` seconds, so its store is slow and the last worker stays free
        for the other clients. A healthy client may use every worker."""
        now = time.monotonic()
        with self._running_lock:
            starts = self._running.setdefault(client_id, [])
            slow = bool(starts) and now - max(starts) >= self.options.slow_client_after
            if len(starts) >= self._share and slow:
                return None
            starts.append(now)
            return now

    def _release(self, client_id: str, started: float) -> None:
        with self._running_lock:
            starts = self._running.get(client_id, [])
            starts.remove(started)
            if not starts:
                self._running.pop(client_id, None)

    def _around(self, event: Message, delivery: Delivery) -> None:
        """The handler inside the middleware: hooks entered run their ``after_handle``."""
        entered: list[Middleware] = []
        error: BridgeError | None = None
        try:
            for middleware in self.middleware:
                self._hook(middleware.before_handle, event, delivery)
                entered.append(middleware)
            self.handler.handle(event, delivery)  # type: ignore[arg-type]
        except BridgeError as exc:
            error = exc
            raise
        except Exception as exc:
            error = _internal_error(exc)
            raise
        finally:
            for middleware in reversed(entered):
                self._hook(middleware.after_handle, event, error)

    def _hook(self, hook: Callable[..., None], *args: Any) -> None:
        try:
            hook(self.name, *args)
        except Exception:
            # Bookkeeping (metrics, resolving dead letters) must never turn a done message
            # into a failed one, nor a failed one into another failure.
            self.log.exception("middleware failed", hook=getattr(hook, "__qualname__", "?"))

    # --- settling, on the connection thread -------------------------------------------------

    def _settle(self, producer: Producer) -> None:
        """Acknowledge finished messages, after their retry or dead letter is confirmed."""
        if self._done.empty():
            return
        handled: list[AmqpMessage] = []
        while not self._done.empty():  # only this thread takes from _done
            message, outcome = self._done.get_nowait()
            self._at_workers -= 1
            if outcome.error is None and not outcome.deferred:
                handled.append(message)
                continue
            try:
                if outcome.error is not None:
                    self._settle_failed(producer, message, outcome, outcome.error)
                else:
                    self._defer(producer, message, outcome)
            except _BROKER_TROUBLE:
                raise  # the connection is gone: the broker redelivers what was not acked
            except Exception:
                # Something about this message itself (a header the client cannot encode...)
                # must not look like a broker outage, or it would come back forever. Reject
                # it: the work queue's own dead-letter exchange takes it to the .dlq.
                self.log.exception("could not settle a message; rejected to the dead letters")
                message.reject(requeue=False)
                metrics.MESSAGES.labels(self.name, "dead_letter").inc()
            del self._in_flight[message.delivery_tag]
        if handled:
            self._ack_handled(handled)

    def _ack_handled(self, handled: list[AmqpMessage]) -> None:
        """Ack messages whose handler returned. The run of them at the bottom of the channel's
        unsettled window goes in one ``basic.ack(multiple=True)``, which acks every tag up to
        its own: only ever tags whose handler returned. The others are acked one by one now
        rather than held back behind a slower message."""
        in_flight = self._in_flight
        rest = {message.delivery_tag for message in handled}
        if self._multiple_ack and len(rest) > 1:
            run: list[int] = []
            for tag in in_flight:  # lowest tag first
                if tag not in rest:
                    break
                run.append(tag)
            if len(run) > 1:
                in_flight[run[-1]].ack(multiple=True)
                for tag in run:
                    del in_flight[tag]
                rest.difference_update(run)
                self._ok.inc(len(run))
        for tag in sorted(rest):
            in_flight.pop(tag).ack()
            self._ok.inc()
        self._last_success.set_to_current_time()

    def _defer(self, producer: Producer, message: AmqpMessage, outcome: _Outcome) -> None:
        """Round a delay queue and back, its attempt not counted, its prefetch slot freed;
        each deferral of one message waits longer (the retry ladder)."""
        deferrals = _count(message.headers, DEFERRALS_HEADER) + 1
        delay = self.topology.retry_delay(deferrals)
        self._republish(
            producer,
            message,
            exchange="",
            routing_key=self.topology.retry_queue_name(delay),
            headers={ATTEMPT_HEADER: outcome.attempt, DEFERRALS_HEADER: deferrals},
        )
        message.ack()
        metrics.MESSAGES.labels(self.name, "deferred").inc()
        self.log.warning(
            "client's store is slow and holds its share of the workers; message deferred",
            client_id=outcome.client_id,
            event_id=outcome.event_id,
            retry_in_seconds=delay,
        )

    def _settle_failed(
        self, producer: Producer, message: AmqpMessage, outcome: _Outcome, error: BridgeError
    ) -> None:
        attempt = outcome.attempt
        metrics.MESSAGE_ERRORS.labels(self.name, error.error_type).inc()
        bound = self.log.bind(
            client_id=outcome.client_id,
            event_id=outcome.event_id,
            error_type=error.error_type,
            reason=error.reason,
            attempt=attempt,
        )
        if error.fate is Fate.RETRY and attempt < self.options.max_attempts:
            delay = self.topology.retry_delay(attempt)
            self._republish(
                producer,
                message,
                exchange="",
                routing_key=self.topology.retry_queue_name(delay),
                headers={
                    ATTEMPT_HEADER: attempt + 1,
                    "cscart-last-error-type": error.error_type,
                    "cscart-last-reason": redact_text(error.reason)[:500],
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
                headers=self._dead_letter_headers(error, attempt, outcome),
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
            "cscart-action": redact_text(error.action)[:1000],
            "cscart-consumer": self.name,
            "cscart-attempts": attempt,
            "cscart-client-id": outcome.client_id or "",
            "cscart-dead-lettered-at": datetime.now(UTC).isoformat(timespec="seconds"),
            "cscart-original-exchange": EVENTS_EXCHANGE,
            "cscart-original-routing-key": outcome.routing_key or self.topology.routing_key,
        }

    def _republish(
        self,
        producer: Producer,
        message: AmqpMessage,
        *,
        exchange: str,
        routing_key: str,
        headers: Mapping[str, Any],
    ) -> None:
        """Publish a copy of the message (same body and properties) and wait for the confirm.
        A header of the message's own that cannot be written back is dropped from the copy
        (and the copy says so): the copy still carries the runtime's reason."""
        # Always bytes: py-amqp decodes a body whose content_encoding names a text codec, and
        # kombu would re-encode a str with whatever the message claims ("binary" included).
        body, encoding = message.body, message.content_encoding or "utf-8"
        if isinstance(body, str):
            try:
                body = body.encode(encoding)
            except (LookupError, UnicodeError):
                body, encoding = body.encode("utf-8", "surrogateescape"), "utf-8"

        carried = {
            name: message.properties[name]
            for name in CARRIED_PROPERTIES
            if message.properties.get(name) not in (None, "")
        }

        def publish(with_headers: Mapping[str, Any], properties: Mapping[str, Any]) -> None:
            producer.publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                headers=dict(with_headers),
                serializer=None,
                content_type=message.content_type or "application/json",
                content_encoding=encoding,
                delivery_mode=2,
                retry=False,
                **properties,
            )

        try:
            publish({**(message.headers or {}), **headers}, carried)
        except _BROKER_TROUBLE:
            raise
        except Exception as exc:  # encoding fails before anything is written
            self.log.warning("a header could not be copied; dropped", error=type(exc).__name__)
            kept = {"message_id": carried["message_id"]} if "message_id" in carried else {}
            publish({**headers, DROPPED_HEADERS: f"{type(exc).__name__}: {exc}"[:300]}, kept)


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
