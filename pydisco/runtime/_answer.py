"""One answer's native objects, and the one place that moves its migration machine.

The machine (C++, ``pydisco._core.MigrationMachine``) owns the answer's state: who commits,
what is committed, how it ended, and the log of every transition. Everything the rest of the
runtime knows about the answer is read from it here, never kept a second time. Each event goes
through this object, which then wakes the tasks waiting for the answer to change (a handover
waiting for its plan, the race waiting for a winner, the coordinator waiting for the end).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import trio

from .. import _core
from .._types import GenerationRequest, TokenPiece
from ._pacing import VirtualTimePacer, trio_time_ns

State = _core.MigrationState
Role = _core.EndpointRole

ENDPOINT_IDS: dict[str, int] = {"device": 1, "cloud": 2}
ENDPOINT_NAMES: dict[int, str] = {v: k for k, v in ENDPOINT_IDS.items()}

_FINISH_REASONS = {"stop": _core.FinishReason.STOP, "length": _core.FinishReason.LENGTH}


class AnswerClock:
    """The answer's one time base: native CLOCK_MONOTONIC ns, or Trio's clock in virtual time."""

    def __init__(self, virtual: bool) -> None:
        self.virtual = virtual

    def now_ns(self) -> int:
        return trio_time_ns() if self.virtual else _core.now_ns()

    def trio_time(self, at_ns: int) -> float:
        """``at_ns`` on this clock as a Trio deadline."""
        if self.virtual:
            return at_ns / 1e9
        return trio.current_time() + (at_ns - _core.now_ns()) / 1e9


def ring_capacity(max_tokens: int) -> int:
    """A ring that holds every token of the answer and its end record, so the machine never
    meets backpressure and the reader never makes the pacer wait."""
    return 1 << max(4, math.ceil(math.log2(max_tokens + 2)))


class Answer:
    """The committed ring, the machine, the pacer and the released ring of one answer."""

    def __init__(
        self, request: GenerationRequest, *, interval_ns: int, virtual_time: bool, spin_ns: int, handoff_lead_ns: int = 0
    ) -> None:
        self.request = request
        self.clock = AnswerClock(virtual_time)
        capacity = ring_capacity(request.max_tokens)
        self.committed_ring = _core.TokenRing(capacity)
        self.released_ring = _core.TokenRing(capacity)
        self.machine = _core.MigrationMachine(self.committed_ring, max_tokens=request.max_tokens)
        self.pacer = _core.Pacer(
            self.committed_ring, self.released_ring, interval_ns=interval_ns, spin_ns=spin_ns, handoff_lead_ns=handoff_lead_ns
        )
        self.virtual_pacer = VirtualTimePacer(self.pacer) if virtual_time else None
        self.started_ns = self.clock.now_ns()
        self._waiting: list[tuple[Callable[[], bool], trio.Event]] = []  # (condition, its waiter)
        self._read_count: Callable[[], int] | None = None  # a reader that is not the released ring's

    # -- what the machine says (derived, never stored) -----------------------------------

    @property
    def state(self) -> _core.MigrationState:
        return self.machine.state

    @property
    def committed(self) -> int:
        return self.machine.committed

    @property
    def ended(self) -> bool:
        return self.machine.finish_reason != _core.FinishReason.NONE

    @property
    def source(self) -> str | None:
        """The endpoint that commits now (streaming or preparing), if any."""
        ep = self.machine.source
        return None if ep is None else ENDPOINT_NAMES[ep]

    @property
    def target(self) -> str | None:
        """The endpoint being handed the answer (preparing or handing over), if any."""
        ep = self.machine.target
        return None if ep is None else ENDPOINT_NAMES[ep]

    def role(self, name: str) -> _core.EndpointRole:
        return self.machine.counters(ENDPOINT_IDS[name]).role

    def has_failed(self, name: str) -> bool:
        return self.role(name) == Role.FAILED

    def consumed(self) -> int:
        """Tokens the reader has taken: popped from the released ring, or what a reader
        registered with ``read_by`` (a shared-memory ring's other side) says it read."""
        # The ring's count includes the end record, which follows the last committed token.
        read = self._read_count() if self._read_count is not None else self.released_ring.statistics().popped
        return min(read, self.committed)

    def read_by(self, read_count: Callable[[], int]) -> None:
        """The answer's reader is elsewhere (the pacer pushes into a shared-memory ring):
        ``read_count()`` says how many tokens it has read."""
        self._read_count = read_count

    def seconds(self, at_ns: int) -> float:
        """``at_ns`` as seconds since the request started."""
        return (at_ns - self.started_ns) / 1e9

    # -- waiting for the answer to change -----------------------------------------------

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once ``condition()`` holds (checked now and after every change).

        On cancellation: nothing changes; the condition is simply no longer awaited.
        """
        while not condition():
            waiter = (condition, trio.Event())
            self._waiting.append(waiter)
            try:
                await waiter[1].wait()
            finally:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)

    def _changed(self) -> None:
        # The conditions are checked here, by whoever changed the answer, so only a task whose
        # condition now holds wakes (it checks again when it runs): a commit does not wake
        # every waiter of the answer just to find its condition still false.
        for waiter in [w for w in self._waiting if w[0]()]:
            self._waiting.remove(waiter)
            waiter[1].set()

    # -- the token path -----------------------------------------------------------------

    def offer(self, name: str, piece: TokenPiece) -> bool:
        """Offer one token from ``name``; True if the machine committed it."""
        now = self.clock.now_ns()
        verdict = self.machine.offer(
            ENDPOINT_IDS[name], piece.position, piece.token_id, piece.text,
            produced_ns=now - max(0, piece.age_ns), now_ns=now,
        )  # fmt: skip
        if verdict != _core.OfferResult.COMMITTED:
            return False
        if self.virtual_pacer is not None:
            self.virtual_pacer.committed()
        self._changed()
        return True

    def finish(self, name: str, position: int, finish_reason: str) -> None:
        """``name`` says the answer ends at ``position`` (stale ends are ignored by the machine)."""
        reason = _FINISH_REASONS.get(finish_reason)
        if reason is None:
            raise ValueError(f"an answer finishes with 'stop' or 'length', not {finish_reason!r}")
        if self.machine.offer_end(ENDPOINT_IDS[name], position, reason, now_ns=self.clock.now_ns()) == _core.OfferResult.COMMITTED:
            self._wake_pacer()
            self._changed()

    # -- lifecycle events ---------------------------------------------------------------

    def start(self, name: str) -> None:
        self.machine.start(ENDPOINT_IDS[name], now_ns=self.clock.now_ns())
        self._changed()

    def race(self, names: Iterable[str]) -> None:
        self.machine.race([ENDPOINT_IDS[n] for n in names], now_ns=self.clock.now_ns())
        self._changed()

    def prepare(self, target: str) -> None:
        self.machine.prepare(ENDPOINT_IDS[target], now_ns=self.clock.now_ns())
        self._changed()

    def target_ready(self) -> int:
        """The source stops here; returns the position the target resumes from."""
        position = self.machine.target_ready(now_ns=self.clock.now_ns())
        self._changed()
        return position

    def endpoint_failed(self, name: str) -> None:
        self.machine.endpoint_failed(ENDPOINT_IDS[name], now_ns=self.clock.now_ns())
        self._changed()

    def resume(self, name: str) -> int:
        position = self.machine.resume(ENDPOINT_IDS[name], now_ns=self.clock.now_ns())
        self._changed()
        return position

    def give_up(self) -> None:
        self.machine.give_up(now_ns=self.clock.now_ns())
        self._wake_pacer()
        self._changed()

    def cancel(self) -> None:
        """End the answer as cancelled (idempotent: an ended answer stays as it ended)."""
        if not self.ended:
            self.machine.cancel(now_ns=self.clock.now_ns())
            self._wake_pacer()
            self._changed()

    def _wake_pacer(self) -> None:
        """The end record is committed: a virtual-time pacer waiting on an empty ring looks."""
        if self.virtual_pacer is not None:
            self.virtual_pacer.committed()

    # -- what an endpoint is asked for ---------------------------------------------------

    def request_at(self, position: int, *, by_token_ids: bool) -> GenerationRequest:
        """The request that continues the answer from ``position`` (the committed prefix).

        ``max_tokens`` bounds the whole answer (the prefix included), so it stays as asked.
        Token ids are sent when the endpoint shares the vocabulary that produced them (and
        every committed token has one); otherwise the text, re-tokenised by the endpoint.
        """
        if position == 0:
            return self.request
        # Endpoints (re)start at the committed position: nothing commits between a handover
        # and the target's first token, so the whole committed prefix is what it continues.
        assert position == self.machine.committed, (position, self.machine.committed)
        ids = self.machine.committed_token_ids
        if by_token_ids and all(i >= 0 for i in ids):
            return dataclasses.replace(self.request, resume_token_ids=tuple(ids), resume_text=None, resume_position=None)
        return dataclasses.replace(
            self.request, resume_token_ids=(), resume_text=self.machine.committed_text, resume_position=position
        )
