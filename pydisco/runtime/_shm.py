"""Delivering an answer into a shared-memory ring that another process reads.

A control loop in its own process (C++ with ``csrc/pydisco/shm_ring.hpp``, or Python with
``pydisco.ShmRingReader``) attaches to the ring by name; the runtime's process forwards each
answer's released tokens into it from a native thread, end record included::

    producer = pydisco.ShmRingProducer("robot-answers")       # owns the name while it lives
    async with rt.stream(messages, max_tokens=64) as answer:
        await forward_to_shm(answer, producer)

The forwarder is the answer's reader (its pops are what the migration policy counts as read);
do not iterate the answer as well.
"""

from __future__ import annotations

import trio

from .._core import ShmForwarder, ShmRingProducer
from ._blocking import BlockingAnswer
from ._runtime import AnswerStream

# Below the pacer (50) so it releases first, above a consumer's usual 40: the hop between them.
FORWARDER_PRIORITY = 45


async def forward_to_shm(answer: AnswerStream, producer: ShmRingProducer, *, realtime_priority: int = FORWARDER_PRIORITY) -> int:
    """Forward ``answer`` into ``producer``'s ring until its end record; returns the tokens
    forwarded. The thread asks for SCHED_FIFO at ``realtime_priority`` (0: never).

    A full ring (its consumer is behind, or not running) makes this wait as a slow reader
    would; bound it with ``trio.move_on_after``. On cancellation the forwarder stops: what was
    already released goes into the ring, then an end record (``cancelled`` when the answer's
    own had not come), so the consumer always sees the answer end.
    """
    forwarder = ShmForwarder(answer.released_ring, producer, realtime_priority)
    try:
        while not forwarder.finished:
            await trio.lowlevel.wait_readable(forwarder.fileno())
    finally:
        forwarder.stop()  # returns at once: the thread is woken, not awaited
    return forwarder.forwarded


def forward_to_shm_blocking(
    answer: BlockingAnswer, producer: ShmRingProducer, *, timeout: float | None = None, realtime_priority: int = FORWARDER_PRIORITY
) -> int:
    """The same for a :class:`BlockingAnswer`, in the calling thread (the GIL released while it
    waits). After ``timeout`` seconds the forwarder stops as on cancellation above."""
    forwarder = ShmForwarder(answer.released_ring, producer, realtime_priority)
    try:
        forwarder.join(timeout)
    finally:
        forwarder.stop()
    return forwarder.forwarded
