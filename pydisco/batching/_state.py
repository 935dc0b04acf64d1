"""The answers in a step loop and what each step does to them — no thread, no clock of its own.

``StepState`` is shared by the real-time loop (a thread driving the llama.cpp batched engine,
``_loop.StepLoop``) and the virtual-time loop (a Trio task driving a simulated engine,
``_virtual.VirtualStepLoop``): the same scheduler calls, the same plan application, the same
bookkeeping, whichever clock and engine. Callbacks to an answer's Trio task go through the
answer's own ``call`` (``TrioToken.run_sync_soon`` from a thread; a direct call in the task).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from .._errors import EndpointError
from .._types import GenerationRequest, GenerationResult, TokenPiece
from ..policies._base import Slo
from ..policies._step import Phase, SequenceView, StepPlan, StepProfile, StepScheduler, StepView
from ._executor import BatchExecutor, StepEvent
from ._profile import LearnedStepProfile
from ._reader import ReaderModel, ReportBox

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


class Answer:
    """One answer in a step loop."""

    def __init__(
        self,
        seq_id: int,
        request: GenerationRequest,
        slo: Slo,
        arrived_s: float,
        call: Callable[..., Any],
        deliver: Callable[[list[TokenPiece]], None],
        done: Callable[[GenerationResult | BaseException], None],
        admitted: Callable[[], None],
        reports: ReportBox | None = None,
    ) -> None:
        self.id = seq_id
        self.request = request
        self.slo = slo
        self.arrived_s = arrived_s
        self.call = call  # runs a callback in the answer's Trio thread
        self.deliver = deliver
        self.done = done
        self.on_admitted = admitted
        self.on_paused: Callable[[], None] = lambda: None  # the answer's sink hears it was preempted
        self.cancelled = False  # set by the answer's task; read between steps
        self.phase = Phase.WAITING
        self.prefill_tokens = 0
        self.prompt_tokens = 0
        self.prefilled = 0
        self.generated = 0
        self.max_new_tokens = 0
        self.first_token_s: float | None = None
        self.preemptions = 0
        self.deferred_why: str | None = None
        # A remote reader (a server's client): its buffer as the loop models it, from this
        # answer's deliveries and the reports the connection hands over. The loop's thread owns
        # the model; ``reports`` is the one thing written from outside.
        self.reports = reports
        self.reader = ReaderModel(slo.reading_rate, start_position=request.start_position) if reports is not None else None
        self._applied_report = 0

    def take_report(self, now_s: float) -> None:
        """Apply the reader's newest report, if it is new (between steps, in the loop's thread)."""
        if self.reports is None or self.reader is None:
            return
        latest = self.reports.latest()
        if latest is not None and latest[0] != self._applied_report:
            self._applied_report = latest[0]
            self.reader.report(latest[1], now_s)

    def view(self, now_s: float) -> SequenceView:
        reader = self.reader
        slo = self.slo if reader is None or reader.rate == self.slo.reading_rate else dataclasses.replace(self.slo, reading_rate=reader.rate)
        return SequenceView(
            id=self.id, slo=slo, arrived_s=self.arrived_s, phase=self.phase,
            prefill_tokens=self.prefill_tokens, prefilled=self.prefilled, generated=self.generated,
            max_new_tokens=self.max_new_tokens, kv_tokens=self.prefilled + self.generated,
            first_token_s=self.first_token_s, preemptions=self.preemptions,
            unread=reader.unread(now_s) if reader is not None else None,
        )  # fmt: skip

    def result(self, reason: str) -> GenerationResult:
        return GenerationResult(reason, self.prompt_tokens, self.prefilled, self.generated)


class StepState:
    def __init__(self, executor: BatchExecutor, scheduler: StepScheduler, profile: StepProfile) -> None:
        self.executor = executor
        self.scheduler = scheduler
        self.profile = LearnedStepProfile(profile, executor.max_batch)
        self.answers: dict[int, Answer] = {}
        self.counts: collections.Counter[str] = collections.Counter()

    def statistics(self, extra_queued: int = 0) -> LoopStatistics:
        answers = list(self.answers.values())
        queued = extra_queued + sum(1 for a in answers if a.phase == Phase.WAITING)
        c = self.counts
        return LoopStatistics(queued, len(answers) + extra_queued - queued, c["steps"], c["tokens"], c["rejected"],
                              c["preemptions"], self.profile.current())  # fmt: skip

    def take_in(self, answer: Answer) -> None:
        """A new answer: the executor says what admitting it would take."""
        try:
            admission = self.executor.admission(answer.id, answer.request)
        except Exception as e:
            answer.call(answer.done, e)
            return
        answer.prefill_tokens = admission.prefill_tokens
        answer.prompt_tokens = admission.prompt_tokens
        answer.max_new_tokens = admission.max_new_tokens
        self.answers[answer.id] = answer

    def drop_cancelled(self, everyone: bool = False) -> None:
        for answer in [a for a in self.answers.values() if a.cancelled or everyone]:
            self._end(answer, answer.result("cancelled"))

    def plan(self, now_s: float) -> StepPlan:
        executor = self.executor
        for answer in self.answers.values():
            answer.take_report(now_s)
        view = StepView(now_s, tuple(a.view(now_s) for a in self.answers.values()), executor.kv_capacity,
                        self.profile.current(), executor.max_batch, executor.prefill_chunk)  # fmt: skip
        plan = self._carry_out(self.scheduler.schedule(view))

        def running(seq_id: int) -> bool:  # not ended, and admitted (its admission may have failed)
            answer = self.answers.get(seq_id)
            return answer is not None and answer.phase != Phase.WAITING

        if plan.prefill is not None and not running(plan.prefill[0]):
            plan = dataclasses.replace(plan, prefill=None)
        if not all(running(s) for s in plan.decode):
            plan = dataclasses.replace(plan, decode=tuple(s for s in plan.decode if running(s)))
        return plan

    def _reserved(self) -> int:
        """KV the admitted answers may need by their ends (prefill, generated, still allowed)."""
        return sum(a.prefill_tokens + a.generated + a.max_new_tokens for a in self.answers.values() if a.phase != Phase.WAITING)

    def _carry_out(self, plan: StepPlan) -> StepPlan:
        """Carry out the plan's rejections, deferrals, admissions and preemptions; the plan to
        run. When an admission waits for a sequence slot, the answers holding the slots are the
        only way one frees: the plan's preemptions (made to make room) are not carried out, and
        the slot holders it leaves idle decode too, up to the batch."""
        for seq_id, why in plan.reject:
            answer = self.answers[seq_id]
            self.counts["rejected"] += 1
            log.info("answer %s refused by the %s scheduler: %s", answer.request.request_id or seq_id, self.scheduler.name, why)
            self._end(answer, AdmissionRefused(f"the {self.scheduler.name} scheduler refused it: {why}"))
        for seq_id, why in plan.defer:
            self._keep_waiting(self.answers[seq_id], why)
        slots = getattr(self.executor, "max_sequences", None)  # sequences the engine holds at once
        held = False
        for seq_id in plan.admit:
            answer = self.answers[seq_id]
            if slots is not None and sum(1 for a in self.answers.values() if a.phase != Phase.WAITING) >= slots:
                # The scheduler does not see the engine's slots; preempted answers hold theirs.
                # It waits for one to free, rather than fail as the engine would make it.
                self._keep_waiting(answer, f"all {slots} sequence slots hold admitted answers (preempted ones included)")
                held = True
                continue
            try:
                took = self.executor.admit(seq_id, answer.request)
            except Exception as e:  # this answer cannot start (the engine has no room): it alone ends
                log.info("answer %s could not be admitted: %s", answer.request.request_id or seq_id, e)
                self.answers.pop(answer.id, None)
                answer.call(answer.done, e)
                continue
            if took is not None:  # the cache changed while it waited: what it really needs
                answer.prefill_tokens, answer.max_new_tokens = took.prefill_tokens, took.max_new_tokens
            answer.phase = Phase.PREFILLING if answer.prefill_tokens else Phase.DECODING
            if self._reserved() > self.executor.kv_capacity:
                # The scheduler reserved from a view taken before this step's admissions; taken
                # in, this one pins cached cells nobody's reservation covers (a prefix it shares
                # with an answer that has ended), so it no longer fits. It waits, rather than
                # the cache filling over every answer later.
                self.executor.release(seq_id)
                answer.phase = Phase.WAITING
                self._keep_waiting(answer, "the KV cache's free cells are reserved")
                continue
            answer.call(answer.on_admitted)
        if held:
            idle = tuple(a.id for a in self.answers.values()
                         if a.phase in (Phase.DECODING, Phase.PREEMPTED) and a.id not in plan.decode)  # fmt: skip
            room = max(0, self.executor.max_batch - len(plan.decode))
            return dataclasses.replace(plan, decode=plan.decode + idle[:room])
        for seq_id in plan.preempt:
            answer = self.answers[seq_id]
            answer.phase = Phase.PREEMPTED
            answer.preemptions += 1
            self.counts["preemptions"] += 1
            answer.call(answer.on_paused)
        return plan

    @staticmethod
    def _keep_waiting(answer: Answer, why: str) -> None:
        """``answer`` stays waiting for admission, told ``why`` (logged when it first waits)."""
        if answer.deferred_why is None:
            log.info("answer %s waits for admission: %s", answer.request.request_id or answer.id, why)
        answer.deferred_why = why

    def run(self, plan: StepPlan, seconds: float, events: list[StepEvent], now_s: float) -> None:
        """The executor ran ``plan`` in ``seconds``, with ``events``, ending at ``now_s``."""
        self.profile.record(len(plan.decode), plan.prefill[1] if plan.prefill else 0, seconds)
        self.counts["steps"] += 1
        if plan.prefill is not None:
            answer = self.answers[plan.prefill[0]]
            answer.prefilled = min(answer.prefill_tokens, answer.prefilled + plan.prefill[1])
            if answer.prefilled == answer.prefill_tokens:
                answer.phase = Phase.DECODING
        for seq_id in plan.decode:
            self.answers[seq_id].phase = Phase.DECODING
        pieces: dict[int, list[TokenPiece]] = collections.defaultdict(list)
        for event in events:
            answer = self.answers[event.seq_id]
            if event.piece is not None:
                pieces[answer.id].append(event.piece)
                answer.generated += 1
                answer.max_new_tokens -= 1
                self.counts["tokens"] += 1
                if answer.first_token_s is None:
                    answer.first_token_s = now_s
            if event.finish is not None:
                self._flush(answer, pieces.pop(answer.id, []), now_s)
                self._end(answer, answer.result(event.finish))
        for seq_id, batch in pieces.items():
            self._flush(self.answers[seq_id], batch, now_s)

    @staticmethod
    def _flush(answer: Answer, pieces: list[TokenPiece], now_s: float) -> None:
        if pieces:
            if answer.reader is not None:
                answer.reader.deliver(len(pieces), now_s)
            answer.call(answer.deliver, pieces)

    def _end(self, answer: Answer, result: GenerationResult | BaseException) -> None:
        if answer.phase != Phase.WAITING:
            self.executor.release(answer.id)
        self.answers.pop(answer.id, None)
        answer.call(answer.done, result)

    def fail_all(self, error: BaseException) -> None:
        for answer in list(self.answers.values()):
            self.answers.pop(answer.id, None)
            answer.call(answer.done, EndpointError(f"the batched engine failed: {error}"))
