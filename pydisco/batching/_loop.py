"""A step loop: many answers on one batched engine, each step as a step scheduler plans it.

One thread owns the executor (the llama.cpp batched engine) and runs ``StepState``: take new
requests and cancellations → ``scheduler.schedule(view)`` → carry out the plan (admit, reject,
preempt) → ``executor.step(...)`` → hand each answer's tokens to its Trio task. Answers enter
through :meth:`StepLoop.generate`, an ``Endpoint``-style call that returns when the answer ends.
Waiting for admission is not work: the sink hears when the request is admitted
(``sink.admitted()``), so the runtime's first-token deadline starts there; and a sink with a
``paused()`` method hears when the scheduler preempts the answer (a server tells its client).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import trio

from .._types import GenerationRequest, GenerationResult, TokenPiece, TokenSink
from ..policies._base import Slo
from ..policies._step import StepProfile, StepScheduler
from ._executor import BatchExecutor
from ._reader import ReportBox
from ._state import Answer, LoopStatistics, StepState

log = logging.getLogger("pydisco.batching")


class _Paused:
    """The scheduler preempted the answer (queued for the sink's ``paused()``)."""


_PAUSED = _Paused()


async def run_answer(
    request: GenerationRequest,
    sink: TokenSink,
    make: Callable[[Callable[[list[TokenPiece]], None], Callable[[GenerationResult | BaseException], None], Callable[[], None]], Answer],
    submit: Callable[[Answer], None],
    poke: Callable[[], None],
    ended: Callable[[GenerationResult], None] | None = None,
    *,
    same_thread: bool = False,
) -> GenerationResult:
    """The answer's side of a step loop (shared by the real-time and the virtual-time loop):
    enqueue it, feed its tokens to ``sink`` in order, and return how it ended. ``sink`` is called
    in this task (the loop's callbacks only queue the pieces), so once this task is cancelled,
    nothing more reaches it. On cancellation the answer is marked cancelled, the loop is poked,
    and this waits until the loop has let it go before ``trio.Cancelled`` propagates. A sink
    that raises cancels the answer; its exception comes out. ``ended`` hears every result the
    loop ends the answer with, a cancelled one included (for accounting).

    ``same_thread``: the loop is a task of this Trio run (``VirtualStepLoop``). Then a piece for
    a task that waits for one with nothing queued goes to ``sink`` at once, in this task's
    context, instead of waking this task for it: the same call at the same (virtual) instant,
    one task wake-up fewer per token. A task that was cancelled no longer waits in the
    channel (Trio takes it out when it delivers the cancellation), so nothing reaches the sink
    after that, as before."""
    finished = trio.Event()
    outcome: list[GenerationResult | BaseException] = []
    send, receive = trio.open_memory_channel[TokenPiece | _Paused](math.inf)
    sink_error: Exception | None = None
    context = trio.lowlevel.current_task().context if same_thread else None

    def consume(item: TokenPiece | _Paused) -> None:
        nonlocal sink_error
        if sink_error is not None:
            return
        try:
            if isinstance(item, _Paused):
                assert paused is not None
                paused()
            else:
                sink(item)
        except Exception as e:
            sink_error = e
            answer.cancelled = True
            poke()

    def put(item: TokenPiece | _Paused) -> None:
        if context is not None:
            waiting = receive.statistics()
            if waiting.tasks_waiting_receive and not waiting.current_buffer_used:
                context.run(consume, item)
                return
        send.send_nowait(item)

    def deliver(pieces: list[TokenPiece]) -> None:  # a loop callback, in the Trio thread
        with contextlib.suppress(trio.BrokenResourceError):  # this task has stopped reading
            for piece in pieces:
                put(piece)

    def pause() -> None:  # in order with the pieces: the sink hears it after those sent before
        with contextlib.suppress(trio.BrokenResourceError):
            put(_PAUSED)

    def done(result: GenerationResult | BaseException) -> None:
        outcome.append(result)
        send.close()  # after the answer's last piece: the reading ends there
        finished.set()
        if ended is not None and isinstance(result, GenerationResult):
            ended(result)

    admitted = getattr(sink, "admitted", None) or (lambda: None)
    answer = make(deliver, done, admitted)
    paused = getattr(sink, "paused", None)  # preempted: not silence
    if paused is not None:
        answer.on_paused = pause
    submit(answer)
    try:
        async with receive:
            async for item in receive:
                consume(item)
    except trio.Cancelled:
        answer.cancelled = True
        poke()
        with trio.CancelScope(shield=True):
            await finished.wait()
        raise
    if sink_error is not None:
        raise sink_error
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


class StepLoop:
    """Runs a batched executor under a step scheduler in a thread of its own. :meth:`start`,
    then :meth:`close` (blocking: answers still in it end as cancelled)."""

    def __init__(self, executor: BatchExecutor, scheduler: StepScheduler, profile: StepProfile) -> None:
        self._state = StepState(executor, scheduler, profile)
        self._wakeup = threading.Condition()
        self._inbox: collections.deque[Answer] = collections.deque()
        self._next_id = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pydisco-step-loop", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def statistics(self) -> LoopStatistics:
        with self._wakeup:
            return self._state.statistics(extra_queued=len(self._inbox))

    async def generate(
        self,
        request: GenerationRequest,
        sink: TokenSink,
        slo: Slo | None = None,
        reports: ReportBox | None = None,
        ended: Callable[[GenerationResult], None] | None = None,
    ) -> GenerationResult:
        """Generate ``request`` among the loop's other answers (see :func:`run_answer`); ``slo``
        is its service level, the scheduler's input. ``reports``: the answer's reader is remote
        (a server's client); the loop models its buffer from the tokens it delivers and the
        reports put there (``SequenceView.unread``). Raises ``AdmissionRefused`` when the
        scheduler refuses it; ConfigurationError/PromptTooLongError before any work."""
        self._state.executor.validate(request)
        if self._thread is None:
            raise RuntimeError("the step loop is not running")
        token = trio.lowlevel.current_trio_token()

        def make(deliver: Any, done: Any, admitted: Any) -> Answer:
            with self._wakeup:
                seq_id, self._next_id = self._next_id, self._next_id + 1
            return Answer(seq_id, request, slo or Slo(), time.monotonic(), token.run_sync_soon, deliver, done, admitted, reports)

        def submit(answer: Answer) -> None:
            with self._wakeup:
                self._inbox.append(answer)
                self._wakeup.notify()

        def poke() -> None:
            with self._wakeup:
                self._wakeup.notify()

        return await run_answer(request, sink, make, submit, poke, ended)

    def _run(self) -> None:
        state = self._state
        try:
            while True:
                with self._wakeup:
                    while self._inbox:
                        state.take_in(self._inbox.popleft())
                    stopping = self._stopping
                state.drop_cancelled(everyone=stopping)
                if not state.answers:
                    if stopping:
                        return
                    self._wait(None)
                    continue
                plan = state.plan(time.monotonic())
                if plan.idle:
                    self._wait(0.05)  # until an answer arrives, ends or is cancelled
                    continue
                started = time.perf_counter()
                events = state.executor.step(plan.decode, plan.prefill)
                state.run(plan, time.perf_counter() - started, events, time.monotonic())
        except BaseException as e:  # an engine failure ends every answer with it
            log.exception("the step loop failed")
            state.fail_all(e)

    def _wait(self, timeout: float | None) -> None:
        with self._wakeup:
            if not self._inbox and not self._stopping:
                self._wakeup.wait(timeout)


def rough_profile(decode_s: float, prefill_s_per_token: float, max_batch: int) -> StepProfile:
    """A starting guess for a loop with nothing measured yet (it learns the real one as it
    steps): on a CPU-bound engine a step of ``b`` sequences gains ``1 + 0.6·(1 − 1/b)`` over
    ``b`` solo steps, the shape measured here with llama.cpp's batch API (153 tokens/s at one
    sequence, 214 at four, 243 at eight: ../shared/reference/measurements.md)."""
    table = tuple(decode_s * b / (1.0 + 0.6 * (1.0 - 1.0 / b)) for b in range(1, max_batch + 1))
    return StepProfile(decode_s=table, prefill_s_per_token=prefill_s_per_token)
