"""The Trio side of the native pacer.

* ``ReleasedTokens`` lets a Trio task await what a pacer thread releases, without polling:
  the pacer writes an eventfd that the task awaits with ``trio.lowlevel.wait_readable``, once
  shortly before each release (so the task is awake and spins for the token) and once at it.
* ``VirtualTimePacer`` drives a pacer from a Trio task with ``trio.sleep_until`` instead of
  its thread, so the same schedule runs under ``trio.testing.MockClock`` (simulation, tests).
  Its time base is ``trio.current_time()`` in integer nanoseconds: stamp commits with
  ``now_ns()`` of the same driver. A receiver given the driver (``ReleasedTokens(pacer,
  driver)``) awaits the driver's Trio event instead of the eventfd: one task wake-up per
  release, no epoll registration.
"""

from __future__ import annotations

import trio

from .._core import Pacer, TokenBatch


class ReleasedTokens:
    """Receives tokens a running pacer has released. One receiver per pacer (the output ring
    has a single consumer)."""

    def __init__(self, pacer: Pacer, driver: VirtualTimePacer | None = None) -> None:
        if pacer.output is None:
            raise ValueError("this pacer delivers to a callback, not to an output ring")
        self._pacer = pacer
        self._ring = pacer.output
        self._driver = driver

    async def receive(self, max_tokens: int = 1024) -> TokenBatch:
        """Wait until at least one released token is there, then take up to ``max_tokens``.

        On cancellation nothing is lost: tokens not yet returned stay in the ring.
        """
        if self._driver is not None:
            return await self._receive_virtual(max_tokens)
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

    async def _receive_virtual(self, max_tokens: int) -> TokenBatch:
        # The driver releases in this thread: what it has not released yet is not there, and
        # its event says when it has.
        assert self._driver is not None
        while True:
            tokens = self._ring.pop_many(max_tokens)
            if tokens:
                return tokens
            await self._driver.wait_released()


def trio_time_ns() -> int:
    """``trio.current_time()`` in integer nanoseconds: the virtual-time clock."""
    return round(trio.current_time() * 1e9)


class VirtualTimePacer:
    """Drives ``pacer`` (not started) from a Trio task. Call ``committed()`` after committing
    tokens (or an end record) and ``notify()`` after changing the pacer's rate, so a driver
    waiting looks again."""

    def __init__(self, pacer: Pacer) -> None:
        if pacer.running:
            raise ValueError("the pacer's own thread is running; stop it first")
        self._pacer = pacer
        self._wakeup = trio.Event()
        self._idle = False  # waiting on an empty input ring
        self._released = trio.Event()  # set at each release, then replaced
        self._drained: trio.Event | None = None  # a wait_drained() caller's

    @staticmethod
    def now_ns() -> int:
        return trio_time_ns()

    def notify(self) -> None:
        """Look again now: the rate changed (the next deadline may have moved)."""
        self._wakeup.set()

    def committed(self) -> None:
        """Records were committed. A record behind the head never moves the head's deadline
        (that depends on the head and the schedule only), so only a driver waiting on an empty
        ring has to look: one task wake-up per answer's burst, not per token."""
        if self._idle:
            self._wakeup.set()

    async def wait_released(self) -> None:
        """Return at the driver's next release (or ``release_all``)."""
        await self._released.wait()

    async def wait_drained(self) -> None:
        """Return once everything committed so far has been released."""
        while self._pacer.next_deadline() is not None:
            self._drained = drained = trio.Event()
            await drained.wait()

    def release_all(self, now_ns: int) -> int:
        """``Pacer.release_all``, telling a receiver that awaits this driver."""
        released = self._pacer.release_all(now_ns)
        if released:
            self._signal_released()
        return int(released)

    def _signal_released(self) -> None:
        self._released.set()
        self._released = trio.Event()

    async def run(self) -> None:
        """Release tokens at their deadlines until cancelled (cancellation loses nothing:
        unreleased tokens stay committed in the input ring)."""
        while True:
            deadline = self._pacer.next_deadline()
            if deadline is None:
                if self._drained is not None:
                    self._drained.set()
                    self._drained = None
                self._idle = True
                try:
                    await self._wakeup.wait()
                finally:
                    self._idle = False
                self._wakeup = trio.Event()
                continue
            if self._wakeup.is_set():  # a rate change since the last look
                self._wakeup = trio.Event()
                continue
            with trio.move_on_at(deadline / 1e9):
                # A rate change can move the next deadline earlier.
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            if self._pacer.release_due(trio_time_ns()):
                self._signal_released()
