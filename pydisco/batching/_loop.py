"""A step loop: many answers on one batched engine, each step as a step scheduler plans it.

One thread owns the executor (the llama.cpp batched engine, or a simulated one) and runs:
take new requests and cancellations → build a ``StepView`` → ``scheduler.schedule(view)`` →
carry out the ``StepPlan`` (admit, reject, preempt) → ``executor.step(...)`` → hand each
answer's tokens to its Trio task. Answers enter through :meth:`StepLoop.generate`, an
``Endpoint``-style call that returns when the answer ends. Waiting for admission is not work:
the request says when it was admitted (``sink.admitted()``), and until then its first-token
deadline does not run.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import trio

from .._errors import EndpointError
from .._types import GenerationRequest, GenerationResult, TokenPiece, TokenSink
from ..policies._base import Slo
from ..policies._step import Phase, SequenceView, StepPlan, StepProfile, StepScheduler, StepView
from ._executor import BatchExecutor, StepEvent
from ._profile import LearnedStepProfile

log = logging.getLogger("pydisco.batching")


class AdmissionRefused(EndpointError):
    """The step scheduler will not serve this request (SLICE: its rate cannot be met here).
    Nothing was generated; another endpoint may serve it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="rejected")


@dataclasses.dataclass(frozen=True)
class LoopStatistics:
    """A step loop now and since it started.

    Fields:
        queued: answers waiting for admission.
        running: answers admitted (prefilling, decoding or preempted).
        steps: engine steps run.
        tokens: tokens produced.
        rejected: answers the scheduler refused.
        preemptions: times the scheduler preempted an answer.
        profile: the step latencies the loop has learnt.
    """

    queued: int
    running: int
    steps: int
    tokens: int
    rejected: int
    preemptions: int
    profile: StepProfile


class _Answer:
    """One answer in the loop. Fields the loop thread writes are read by the Trio side only
    through the callbacks it schedules."""

    def __init__(self, seq_id: int, request: GenerationRequest, slo: Slo, token: trio.lowlevel.TrioToken,
                 deliver: Callable[[list[TokenPiece]], None], done: Callable[[GenerationResult | BaseException], None],
                 admitted: Callable[[], None]) -> None:  # fmt: skip
        self.id = seq_id
        self.request = request
        self.slo = slo
        self.trio_token = token
        self.deliver = deliver
        self.done = done
        self.on_admitted = admitted
        self.arrived_s = time.monotonic()
        self.cancelled = False  # set from the Trio thread; read by the loop between steps
        self.phase = Phase.WAITING
        self.prefill_tokens = 0
        self.prompt_tokens = 0
        self.prefilled = 0
        self.generated = 0
        self.max_new_tokens = 0
        self.first_token_s: float | None = None
        self.preemptions = 0
        self.deferred_why: str | None = None

    def view(self) -> SequenceView:
        return SequenceView(
            id=self.id, slo=self.slo, arrived_s=self.arrived_s, phase=self.phase,
            prefill_tokens=self.prefill_tokens, prefilled=self.prefilled, generated=self.generated,
            max_new_tokens=self.max_new_tokens, kv_tokens=self.prefilled + self.generated,
            first_token_s=self.first_token_s, preemptions=self.preemptions,
        )  # fmt: skip


class StepLoop:
    """Runs a batched executor under a step scheduler. Start with :meth:`start` (or use
    :func:`open_step_loop`); :meth:`close` stops the thread once the answers in it have ended."""

    def __init__(self, executor: BatchExecutor, scheduler: StepScheduler, profile: StepProfile) -> None:
        self._executor = executor
        self._scheduler = scheduler
        self._profile = LearnedStepProfile(profile, executor.max_batch)
        self._wakeup = threading.Condition()
        self._inbox: collections.deque[_Answer] = collections.deque()
        self._answers: dict[int, _Answer] = {}  # the loop thread's
        self._next_id = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._counts: collections.Counter[str] = collections.Counter()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pydisco-step-loop", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the loop thread (blocking): answers still in it end as cancelled. Idempotent."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def statistics(self) -> LoopStatistics:
        with self._wakeup:
            answers = list(self._answers.values()) + list(self._inbox)
        queued = sum(1 for a in answers if a.phase == Phase.WAITING)
        c = self._counts
        return LoopStatistics(queued, len(answers) - queued, c["steps"], c["tokens"], c["rejected"], c["preemptions"],
                              self._profile.current())  # fmt: skip

    # -- the Trio side ---------------------------------------------------------------------

    async def generate(self, request: GenerationRequest, sink: TokenSink, slo: Slo | None = None) -> GenerationResult:
        """Generate ``request`` among the loop's other answers, calling ``sink`` in this Trio
        thread for each token in order. ``slo``: its service level (the scheduler's input).

        Raises ``AdmissionRefused`` when the scheduler refuses it. If ``sink`` has an
        ``admitted()`` method, it is called when the scheduler admits the request. On
        cancellation the answer leaves the loop before its next step, this waits for that, and
        ``trio.Cancelled`` propagates.
        """
        self._executor.validate(request)
        if self._thread is None:
            raise RuntimeError("the step loop is not running")
        token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        outcome: list[GenerationResult | BaseException] = []
        sink_error: list[BaseException] = []

        def deliver(pieces: list[TokenPiece]) -> None:  # in this Trio thread
            if sink_error:
                return
            try:
                for piece in pieces:
                    sink(piece)
            except Exception as e:
                sink_error.append(e)
                answer.cancelled = True

        def done(result: GenerationResult | BaseException) -> None:
            outcome.append(result)
            finished.set()

        admitted = getattr(sink, "admitted", None) or (lambda: None)
        with self._wakeup:
            answer = _Answer(self._next_id, request, slo or Slo(), token, deliver, done, admitted)
            self._next_id += 1
            self._inbox.append(answer)
            self._wakeup.notify()
        try:
            await finished.wait()
        except trio.Cancelled:
            answer.cancelled = True
            with self._wakeup:
                self._wakeup.notify()
            with trio.CancelScope(shield=True):
                await finished.wait()
            raise
        if sink_error:
            raise sink_error[0]
        result = outcome[0]
        if isinstance(result, BaseException):
            raise result
        return result

    # -- the loop thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._turn():
                pass
        except BaseException as e:  # an engine failure ends every answer with it
            log.exception("the step loop failed")
            for answer in list(self._answers.values()) + list(self._inbox):
                self._finish(answer, EndpointError(f"the batched engine failed: {e}"))
            self._answers.clear()

    def _turn(self) -> bool:
        """One turn of the loop; False when it is to stop."""
        with self._wakeup:
            while self._inbox:
                answer = self._inbox.popleft()
                self._answers[answer.id] = answer
                self._take_in(answer)
            if self._stopping:
                for answer in list(self._answers.values()):
                    answer.cancelled = True
        self._drop_cancelled()
        if not self._answers:
            if self._stopping:
                return False
            with self._wakeup:
                if not self._inbox and not self._stopping:
                    self._wakeup.wait()
            return True
        executor = self._executor
        view = StepView(time.monotonic(), tuple(a.view() for a in self._answers.values()), executor.kv_capacity,
                        self._profile.current(), executor.max_batch, executor.prefill_chunk)  # fmt: skip
        plan = self._scheduler.schedule(view)
        self._carry_out(plan)
        if plan.idle:
            with self._wakeup:  # nothing to run until an answer arrives, ends or is cancelled
                if not self._inbox and not self._stopping:
                    self._wakeup.wait(timeout=0.05)
            return True
        started = time.perf_counter()
        events = executor.step(plan.decode, plan.prefill)
        self._profile.record(len(plan.decode), plan.prefill[1] if plan.prefill else 0, time.perf_counter() - started)
        self._counts["steps"] += 1
        self._apply(plan, events)
        return True

    def _take_in(self, answer: _Answer) -> None:
        try:
            admission = self._executor.admission(answer.id, answer.request)
        except Exception as e:
            self._finish(answer, e)
            del self._answers[answer.id]
            return
        answer.prefill_tokens = admission.prefill_tokens
        answer.prompt_tokens = admission.prompt_tokens
        answer.max_new_tokens = admission.max_new_tokens

    def _drop_cancelled(self) -> None:
        for answer in [a for a in self._answers.values() if a.cancelled]:
            self._release(answer)
            self._finish(answer, self._result(answer, "cancelled"))

    def _carry_out(self, plan: StepPlan) -> None:
        for seq_id, why in plan.reject:
            answer = self._answers[seq_id]
            self._counts["rejected"] += 1
            log.info("answer %s refused by the %s scheduler: %s", answer.request.request_id or seq_id, self._scheduler.name, why)
            self._release(answer)
            self._finish(answer, AdmissionRefused(f"the device's {self._scheduler.name} scheduler refused it: {why}"))
        for seq_id, why in plan.defer:
            answer = self._answers[seq_id]
            if answer.deferred_why is None:
                log.info("answer %s waits for admission: %s", answer.request.request_id or seq_id, why)
            answer.deferred_why = why
        for seq_id in plan.admit:
            answer = self._answers[seq_id]
            self._executor.admit(seq_id, answer.request)
            answer.phase = Phase.PREFILLING
            answer.trio_token.run_sync_soon(answer.on_admitted)
            if answer.prefill_tokens == 0:
                answer.phase = Phase.DECODING  # everything cached: its first step samples
        for seq_id in plan.preempt:
            answer = self._answers[seq_id]
            answer.phase = Phase.PREEMPTED
            answer.preemptions += 1
            self._counts["preemptions"] += 1

    def _apply(self, plan: StepPlan, events: list[StepEvent]) -> None:
        now = time.monotonic()
        if plan.prefill is not None:
            answer = self._answers[plan.prefill[0]]
            answer.prefilled = min(answer.prefill_tokens, answer.prefilled + plan.prefill[1])
            if answer.prefilled == answer.prefill_tokens:
                answer.phase = Phase.DECODING
        for seq_id in plan.decode:
            self._answers[seq_id].phase = Phase.DECODING
        pieces: dict[int, list[TokenPiece]] = collections.defaultdict(list)
        for event in events:
            answer = self._answers[event.seq_id]
            if event.piece is not None:
                pieces[answer.id].append(event.piece)
                answer.generated += 1
                answer.max_new_tokens -= 1
                self._counts["tokens"] += 1
                if answer.first_token_s is None:
                    answer.first_token_s = now
            if event.finish is not None:
                self._flush(answer, pieces.pop(answer.id, []))
                self._release(answer)
                self._finish(answer, self._result(answer, event.finish))
        for seq_id, batch in pieces.items():
            self._flush(self._answers[seq_id], batch)

    @staticmethod
    def _flush(answer: _Answer, pieces: list[TokenPiece]) -> None:
        if pieces:
            answer.trio_token.run_sync_soon(answer.deliver, pieces)

    def _release(self, answer: _Answer) -> None:
        if answer.phase != Phase.WAITING:
            self._executor.release(answer.id)
        self._answers.pop(answer.id, None)

    @staticmethod
    def _result(answer: _Answer, reason: str) -> GenerationResult:
        return GenerationResult(reason, answer.prompt_tokens, answer.prefilled, answer.generated)

    @staticmethod
    def _finish(answer: _Answer, result: GenerationResult | BaseException) -> None:
        try:
            answer.trio_token.run_sync_soon(answer.done, result)
        except trio.RunFinishedError:
            pass


def rough_profile(decode_s: float, prefill_s_per_token: float, max_batch: int) -> StepProfile:
    """A starting guess for a loop with nothing measured yet (it learns the real one as it
    steps): on a CPU-bound engine a step of ``b`` sequences gains ``1 + 0.6·(1 − 1/b)`` over
    ``b`` solo steps, the shape measured here with llama.cpp's batch API (153 tokens/s at one
    sequence, 214 at four, 243 at eight: ../shared/reference/measurements.md)."""
    table = tuple(decode_s * b / (1.0 + 0.6 * (1.0 - 1.0 / b)) for b in range(1, max_batch + 1))
    return StepProfile(decode_s=table, prefill_s_per_token=prefill_s_per_token)
