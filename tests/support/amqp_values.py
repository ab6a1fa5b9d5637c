"""AMQP values other clients can publish and Python's datetime cannot hold, for tests that
publish them with kombu/py-amqp (whose own writer emits a timestamp only from a datetime)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from cscart_fm.core import frames


class RawTimestamp(frames.OutOfRangeTimestamp):
    """Published as an AMQP timestamp ('T') of exactly these seconds, in range or not."""


@contextmanager
def raw_timestamps() -> Iterator[None]:
    """While active, py-amqp writes a ``RawTimestamp`` as a 64-bit AMQP timestamp (the
    service's own reader and writer, ``cscart_fm.core.frames``, installed in this process)."""
    frames.install()
    yield
