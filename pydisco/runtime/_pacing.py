"""The Trio side of the native pacer.

* ``ReleasedTokens`` lets a Trio task await what a pacer thread releases, without polling:
  the pacer writes an eventfd that the task awaits with ``trio.lowlevel.wait_readable``, once
  shortly before each release (so the task is awake and spins for the token) and once at it.
* ``VirtualTimePacer`` drives a pacer from a Trio task with ``trio.sleep_until`` instead of
  its thread, so the same schedule runs under ``trio.testing.MockClock`` (simulation, tests).
  Its time base is ``trio.current_time()`` in integer nanoseconds: stamp commits with
  ``now_ns()`` of the same driver.
"""

from __future__ import annotations

import trio

from .._core import Pacer, TokenBatch


class ReleasedTokens:
    """Receives tokens a running pacer has released. One receiver per pacer (the output ring
    has a single consumer)."""

    def __init__(self, pacer: Pacer) -> None:
        if pacer.output is None:
            raise ValueError("this pacer delivers to a callback, not to an output ring")
        self._pacer = pacer
        self._ring = pacer.output

    async def receive(self, max_tokens: int = 1024) -> TokenBatch:
        """Wait until at least one released token is there, then take up to ``max_tokens``.

        On cancellation nothing is lost: tokens not yet returned stay in the ring.
        """
        while True:
            tokens = self._ring.pop_many(max_tokens)
            if tokens:
                return tokens
            # Reset the eventfd before the last look, so a release in between keeps it readable.
            self._pacer.clear_event()
            tokens = self._ring.pop_many(max_tokens)
            if tokens:
                return tokens
            # The pacer wakes us shortly before a release (its handoff_lead_ns): wait for
            # that token spinning, without the GIL, rather than through another wake-up,
            # which comes hundreds of microseconds late on a busy machine. This holds the
            # event loop for at most the lead plus the ring's slack.
            if self._ring.spin_for_announced():
                continue
            await trio.lowlevel.wait_readable(self._pacer.fileno())


def trio_time_ns() -> int:
    """``trio.current_time()`` in integer nanoseconds: the virtual-time clock."""
    return round(trio.current_time() * 1e9)


class VirtualTimePacer:
    """Drives ``pacer`` (not started) from a Trio task. Call ``notify()`` after committing
    tokens so a driver waiting on an empty ring looks again."""

    def __init__(self, pacer: Pacer) -> None:
        if pacer.running:
            raise ValueError("the pacer's own thread is running; stop it first")
        self._pacer = pacer
        self._wakeup = trio.Event()

    @staticmethod
    def now_ns() -> int:
        return trio_time_ns()

    def notify(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        """Release tokens at their deadlines until cancelled (cancellation loses nothing:
        unreleased tokens stay committed in the input ring)."""
        while True:
            deadline = self._pacer.next_deadline()
            if deadline is None:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            with trio.move_on_at(deadline / 1e9):
                # A commit or a rate change can move the next deadline earlier.
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            self._pacer.release_due(trio_time_ns())
