"""Delivering an answer into a shared-memory ring that another process reads.

A control loop in its own process (C++ with ``csrc/pydisco/shm_ring.hpp``, or Python with
``pydisco.ShmRingReader``) attaches to the ring by name; the answer's pacer pushes each
released token into it from its own native thread, end record included::

    producer = pydisco.ShmRingProducer("robot-answers")       # owns the name while it lives
    async with rt.stream(messages, max_tokens=64) as answer:
        await forward_to_shm(answer, producer)

The forwarder is the answer's reader (what the other process has read from the shm ring is
what the migration policy counts as read); do not iterate the answer as well.
"""

from __future__ import annotations

import trio

from .._core import ShmForwarder, ShmRingProducer
from ._blocking import BlockingAnswer
from ._runtime import AnswerStream


def _forwarder(stream: AnswerStream, producer: ShmRingProducer) -> ShmForwarder:
    """Redirects the answer's pacer into ``producer``; the runtime then counts as read what
    the other process read."""
    answer = stream._coordinator.answer
    forwarder = ShmForwarder(answer.pacer, producer)
    answer.read_by(lambda: forwarder.read)
    return forwarder


async def forward_to_shm(answer: AnswerStream, producer: ShmRingProducer) -> int:
    """Forward ``answer`` into ``producer``'s ring until its end record; returns the tokens
    forwarded. The pacer's thread does the pushing (at its real-time priority).

    A full ring (its consumer is behind, or not running) makes this wait as a slow reader
    would; bound it with ``trio.move_on_after``. On cancellation the forwarder stops: an end
    record (``cancelled``) follows what is in the ring when the answer's own had not come, so
    the consumer always sees the answer end.
    """
    forwarder = _forwarder(answer, producer)
    try:
        while not forwarder.finished:
            await trio.lowlevel.wait_readable(forwarder.fileno())
    finally:
        forwarder.stop()  # returns at once
    return forwarder.forwarded


def forward_to_shm_blocking(answer: BlockingAnswer, producer: ShmRingProducer, *, timeout: float | None = None) -> int:
    """The same for a :class:`BlockingAnswer`, in the calling thread (the GIL released while it
    waits). After ``timeout`` seconds the forwarder stops as on cancellation above."""
    forwarder = _forwarder(answer._answer, producer)
    try:
        forwarder.join(timeout)
    finally:
        forwarder.stop()
    return forwarder.forwarded
