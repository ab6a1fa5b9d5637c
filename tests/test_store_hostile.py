"""A hostile or broken store: every attempt has a total deadline (a store that trickles its
answer one byte at a time, each byte restarting the socket's read timeout, cannot hold a call
past it), and an answer nested too deeply to parse is a bad response."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from pydantic import SecretStr

from cscart.client import CsCartClient
from cscart_fm.core.errors import BadResponse, StoreOutcomeUnknown, StoreRefused, StoreUnreachable
from schemas.settings import StoreLimits

DRIP = 0.25
"""Seconds between two bytes of the trickling store: well under the read timeout."""


@contextmanager
def trickling_store(phase: str) -> Iterator[str]:
    """A store on loopback that answers every request a byte at a time, forever: during the
    status line and headers (``headers``) or during the body (``body``)."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)  # the request
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            if phase == "body":
                conn.sendall(head + b"Content-Length: 100000\r\n\r\n")
                drip = b"[" + b" " * 99_999
            else:
                drip = head * 1000
            for byte in drip:
                if stop.is_set():
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return  # the client hung up
                time.sleep(DRIP)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        server.close()


def client(url: str) -> CsCartClient:
    limits = StoreLimits(read_timeout=2, attempt_timeout=1.5, max_attempts=1)
    return CsCartClient(
        client_id="SLOW", store_url=url, api_user="a@b.example",
        api_key=SecretStr("slow-store-key-123"), limits=limits,
    )


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_a_trickling_read_ends_at_the_attempt_deadline(phase: str) -> None:
    with trickling_store(phase) as url, client(url) as store:
        started = time.monotonic()
        with pytest.raises(StoreUnreachable) as info:
            store.get_user(1)
        elapsed = time.monotonic() - started
    assert "no complete answer within attempt_timeout (1.5 s)" in info.value.reason
    assert 1.4 <= elapsed < 3.5  # the deadline, not the 400 s the trickle would take


def test_a_trickling_answer_to_a_post_is_an_unknown_outcome() -> None:
    """The request went out: a write cut off at the deadline may have been applied."""
    with trickling_store("body") as url, client(url) as store:
        started = time.monotonic()
        with pytest.raises(StoreOutcomeUnknown) as info:
            store.create_shipment(
                order_id=1, shipping_id=1, tracking_number="T1", carrier="aup",
                comments="FM ref X", products={"1": 1}, notify_user=False,
            )
        assert time.monotonic() - started < 3.5
    assert "attempt_timeout" in info.value.reason


def test_calls_within_the_deadline_are_untouched() -> None:
    """A deadline that never fires leaves the connection to be reused."""
    server = socket.create_server(("127.0.0.1", 0))
    answers = 0

    def serve() -> None:
        nonlocal answers
        conn, _ = server.accept()
        with conn:
            while True:
                request = conn.recv(65536)
                if not request:
                    return
                body = b'{"user_id": "1", "email": "a@b.example", "user_type": "A", "status": "A"}'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                answers += 1

    threading.Thread(target=serve, daemon=True).start()
    with client(f"http://127.0.0.1:{server.getsockname()[1]}") as store:
        for _ in range(3):
            assert store.get_user(1).email == "a@b.example"
            time.sleep(0.6)  # the three calls outlast one deadline together
    server.close()
    assert answers == 3  # one connection, kept alive across the three calls


@pytest.mark.parametrize(("status", "error"), [(200, BadResponse), (400, StoreRefused)])
def test_json_nested_too_deeply_is_a_bad_response(status: int, error: type[Exception]) -> None:
    """100,000 nested arrays overflow Python's JSON parser: once an uncaught RecursionError
    classed internal-error; now a bad answer (200) or a refusal without its message (400)."""
    body = b"[" * 100_000 + b"]" * 100_000
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(
                f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n".encode()
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )

    threading.Thread(target=serve, daemon=True).start()
    with client(f"http://127.0.0.1:{server.getsockname()[1]}") as store, pytest.raises(error) as info:
        store.get_user(1)
    server.close()
    assert "users.get" in str(info.value)
