"""The step loop in virtual time: the same ``StepState`` (the same scheduler calls, the same plan
application) driven by a Trio task over a simulated batched engine whose steps take the time its
profile says — under ``trio.testing.MockClock`` an hour of a busy server replays in seconds."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import trio

from .._errors import ConfigurationError
from .._types import GenerationRequest, GenerationResult, TokenPiece, TokenSink
from ..policies._base import Slo
from ..policies._step import StepProfile, StepScheduler
from ._executor import Admission, StepEvent
from ._loop import run_answer
from ._reader import ReportBox
from ._state import Answer, LoopStatistics, StepState


class SimulatedExecutor:
    """A batched engine as a model: a step of ``b`` decodes and ``p`` prefill tokens takes
    ``profile.step(b, p)``; a sequence's prompt costs ``prompt_tokens(request)`` tokens to prefill
    and it answers with ``max_tokens`` tokens (text ``answer_text(position)``), unless its
    request says to stop earlier (``answer_tokens``)."""

    def __init__(
        self,
        profile: StepProfile,
        *,
        kv_capacity: int,
        max_batch: int,
        prefill_chunk: int = 256,
        prompt_tokens: Callable[[GenerationRequest], int] = lambda r: max(1, len(r.prompt or "") // 4),
        answer_tokens: Callable[[GenerationRequest], int] = lambda r: r.max_tokens,
    ) -> None:
        self.profile = profile
        self.kv_capacity = kv_capacity
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self._prompt_tokens = prompt_tokens
        self._answer_tokens = answer_tokens
        self._live: dict[int, list[int]] = {}  # id -> [prefill left, next position, end]

    def validate(self, request: GenerationRequest) -> None:
        if self._prompt_tokens(request) + request.max_tokens > self.kv_capacity:
            raise ConfigurationError(f"the request needs more than the {self.kv_capacity} KV tokens this engine has")

    def admission(self, seq_id: int, request: GenerationRequest) -> Admission:
        prompt = self._prompt_tokens(request)
        return Admission(prompt + request.start_position, prompt, max(0, request.max_tokens - request.start_position))

    def admit(self, seq_id: int, request: GenerationRequest) -> None:
        end = min(request.max_tokens, self._answer_tokens(request))
        self._live[seq_id] = [self._prompt_tokens(request) + request.start_position, request.start_position, end]

    def seconds(self, decode: Sequence[int], prefill: tuple[int, int] | None) -> float:
        return self.profile.step(len(decode), prefill[1] if prefill else 0)

    def step(self, decode: Sequence[int], prefill: tuple[int, int] | None) -> list[StepEvent]:
        ids = list(decode)
        if prefill is not None:
            seq = self._live[prefill[0]]
            seq[0] -= prefill[1]
            if seq[0] <= 0:
                ids.append(prefill[0])  # the prefill's last row samples the first token
        events = []
        for seq_id in ids:
            seq = self._live[seq_id]
            position = seq[1]
            seq[1] += 1
            events.append(StepEvent(seq_id, TokenPiece(position, -1, ""), "stop" if seq[1] >= seq[2] else None))
        return events

    def release(self, seq_id: int) -> None:
        self._live.pop(seq_id, None)


class VirtualStepLoop:
    """A step loop as a Trio task: ``nursery.start_soon(loop.run)``, then ``generate`` as with
    the real-time ``StepLoop``. Its clock is Trio's (virtual under MockClock)."""

    def __init__(self, executor: SimulatedExecutor, scheduler: StepScheduler, profile: StepProfile | None = None) -> None:
        self._executor = executor
        self._state = StepState(executor, scheduler, profile or executor.profile)
        self._inbox: list[Answer] = []
        self._poked = trio.Event()
        self._next_id = 0

    def statistics(self) -> LoopStatistics:
        return self._state.statistics(extra_queued=len(self._inbox))

    async def generate(self, request: GenerationRequest, sink: TokenSink, slo: Slo | None = None,
                       reports: ReportBox | None = None) -> GenerationResult:  # fmt: skip
        """See ``StepLoop.generate``."""
        self._executor.validate(request)

        def make(deliver: Any, done: Any, admitted: Any) -> Answer:
            seq_id, self._next_id = self._next_id, self._next_id + 1
            return Answer(seq_id, request, slo or Slo(), trio.current_time(), _call, deliver, done, admitted, reports)

        def submit(answer: Answer) -> None:
            self._inbox.append(answer)
            self._poke()

        return await run_answer(request, sink, make, submit, self._poke, same_thread=True)

    def _poke(self) -> None:
        self._poked.set()

    async def run(self) -> None:
        """The loop, until cancelled (answers still in it then end as cancelled)."""
        state = self._state
        try:
            while True:
                for answer in self._inbox:
                    state.take_in(answer)
                self._inbox.clear()
                state.drop_cancelled()
                plan = state.plan(trio.current_time()) if state.answers else None
                if plan is None or plan.idle:
                    with trio.move_on_after(math.inf if plan is None else 0.05):
                        await self._poked.wait()
                    self._poked = trio.Event()
                    continue
                seconds = self._executor.seconds(plan.decode, plan.prefill)
                await trio.sleep(seconds)
                state.run(plan, seconds, self._executor.step(plan.decode, plan.prefill), trio.current_time())
        finally:
            for answer in self._inbox:
                state.take_in(answer)
            state.drop_cancelled(everyone=True)


def _call(fn: Callable[..., Any], *args: Any) -> None:
    """An answer's callback, run directly: the loop runs in the answers' own Trio thread."""
    fn(*args)
