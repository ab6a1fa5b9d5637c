"""Header values Python cannot hold, read as values instead of failing the connection.

An AMQP timestamp is 64 bits of seconds; py-amqp turns one in a header table into a datetime,
and a publisher that writes epoch *milliseconds* (1796352000000: the year 58894) makes it
raise while it reads the frame. The error surfaced as a broken connection: the consumer
reconnected for minutes, got the same message back each time, and once the broker
dead-lettered it, every round of the dead-letter collector failed on it for good. Read as an
``OutOfRangeTimestamp`` (and written back as the same timestamp when the message is copied to
the dead letters), the message is the message's fault: ``undecodable`` names the header, and
the runtime dead-letters it with that reason while the consumer goes on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from struct import pack, unpack_from
from typing import Any

from amqp import serialization


class OutOfRangeTimestamp(int):
    """The seconds of a header timestamp that no datetime can hold."""

    def __repr__(self) -> str:
        return f"OutOfRangeTimestamp({int(self)})"


_original_read_item: Callable[[Any, int], tuple[Any, int]] = serialization._read_item
_original_write_item: Callable[[Any, Any, Any], None] = serialization._write_item
_installed = threading.Lock()


def _read_item(buf: Any, offset: int) -> tuple[Any, int]:
    if buf[offset : offset + 1] != b"T":
        return _original_read_item(buf, offset)
    (seconds,) = unpack_from(">Q", buf, offset + 1)
    try:
        value: Any = datetime.fromtimestamp(seconds, tz=UTC).replace(tzinfo=None)
    except (ValueError, OverflowError, OSError):
        value = OutOfRangeTimestamp(seconds)
    return value, offset + 9


def _write_item(value: Any, write: Callable[[bytes], Any], bits: Any) -> None:
    # Written back as the timestamp it was: a copy of the message keeps its header exactly.
    if isinstance(value, OutOfRangeTimestamp):
        write(pack(">cQ", b"T", int(value)))
    else:
        _original_write_item(value, write, bits)


def install() -> None:
    """Read header timestamps with ``_read_item`` above (py-amqp looks the function up at
    each call, so nested tables and arrays get it too). Idempotent; ``broker.connect`` calls
    it before any connection reads a frame."""
    with _installed:
        serialization._read_item = _read_item  # type: ignore[assignment]
        serialization._write_item = _write_item  # type: ignore[assignment]


def undecodable(headers: Mapping[str, Any] | None) -> list[str]:
    """The headers (``x-death[0].time`` style paths) holding a value that could not be read."""
    found = _walk(headers or {}, "")
    return [path for path, value in found if isinstance(value, OutOfRangeTimestamp)]


def _walk(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}[{index}]")
    else:
        yield path, value

