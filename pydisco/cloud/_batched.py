"""The batched server backend: every answer through one step loop over one batched engine.

Continuous batching with one model copy, instead of one engine per answer: the step loop
(``pydisco.batching``) asks a step scheduler (fcfs, fastserve, slice, andes) before every step
who decodes, who is admitted and who is preempted. Each answer's reader is remote, so the loop
models its unread buffer from the tokens it delivers, the reading rate the client's generate
frame gave and the client's ``reader_report`` frames (docs/protocol.md), which the server hands
over through the sink (``StreamSink``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from .._errors import ConfigurationError
from .._types import GenerationRequest, GenerationResult, TokenSink
from ..batching import BatchExecutor, LoopStatistics, ReportBox, StepLoop, rough_profile
from ..policies import Slo, create_step_scheduler
from ..policies._step import StepProfile

# The loop's first guess at its step latencies, until it has timed its own steps: SmolLM2-135M
# on two cores, 153 tokens/s at one sequence and ~0.3 ms a prefill token
# (../shared/reference/measurements.md). It follows what it measures within a few dozen steps.
_FIRST_GUESS_DECODE_S = 1 / 153
_FIRST_GUESS_PREFILL_S_PER_TOKEN = 0.0003


class AnswerLoop(Protocol):
    """What the backend drives: ``StepLoop`` (real time, a thread) or ``VirtualStepLoop``."""

    async def generate(self, request: GenerationRequest, sink: TokenSink, slo: Slo | None = None,
                       reports: ReportBox | None = None) -> GenerationResult: ...  # fmt: skip

    def statistics(self) -> LoopStatistics: ...


class BatchedBackend:
    """A server backend whose answers share one batched engine under a step scheduler.

    ``parallel`` — the answers it takes in at once — is the engine's ``max_batch`` plus
    ``max_waiting``: the step scheduler sees the waiting ones too (it decides whom to admit and
    whom to preempt for them), so the server's own FCFS gate in front only turns away what is
    beyond that (``overloaded``). A request the scheduler refuses raises ``AdmissionRefused``
    (code ``rejected``: the client fails over).
    """

    schedules_waiting = True  # its step scheduler orders the waiting answers (no server queue: backend_admission)

    def __init__(self, loop: AnswerLoop, *, model_id: str, max_batch: int, max_waiting: int = 256,
                 slo: Slo = Slo(), owned: StepLoop | None = None) -> None:  # fmt: skip
        if max_batch < 1 or max_waiting < 0:
            raise ConfigurationError(f"a batched backend needs max_batch >= 1 and max_waiting >= 0, got {max_batch}, {max_waiting}")
        self._loop = loop
        self._model_id = model_id
        self._parallel = max_batch + max_waiting
        self._slo = slo
        self._owned = owned

    @classmethod
    def start(cls, executor: BatchExecutor, scheduler: str, *, model_id: str | None = None,
              profile: StepProfile | None = None, max_waiting: int = 256, slo: Slo = Slo(),
              **scheduler_options: Any) -> BatchedBackend:  # fmt: skip
        """A backend over ``executor`` with a step loop of its own, running (``close()`` stops
        it). ``scheduler`` is a step scheduler's name; ConfigurationError for an unknown one."""
        policy = create_step_scheduler(scheduler, **scheduler_options)
        name = model_id or getattr(executor, "model_id", None)
        if not isinstance(name, str) or not name:
            raise ConfigurationError("a batched backend needs a model id (the executor has none: give model_id=)")
        first = profile or rough_profile(_FIRST_GUESS_DECODE_S, _FIRST_GUESS_PREFILL_S_PER_TOKEN, executor.max_batch)
        loop = StepLoop(executor, policy, first)
        loop.start()
        return cls(loop, model_id=name, max_batch=executor.max_batch, max_waiting=max_waiting, slo=slo, owned=loop)

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def parallel(self) -> int:
        """Answers it takes in at once (decoding, preempted or waiting for admission)."""
        return self._parallel

    def statistics(self) -> LoopStatistics:
        return self._loop.statistics()

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        """See ``Backend``. The answer's service level is the backend's ``slo`` with the
        reading rate the client gave; its reader's reports reach the scheduler as they come.
        On cancellation the loop lets the sequence go at its next step and this returns after."""
        rate = getattr(sink, "reading_rate", None)
        slo = dataclasses.replace(self._slo, reading_rate=rate) if rate else self._slo
        reports = getattr(sink, "reader_reports", None)
        return await self._loop.generate(request, sink, slo, reports if isinstance(reports, ReportBox) else ReportBox())

    def close(self) -> None:
        """Stop the step loop this backend started (answers still in it end as cancelled)."""
        if self._owned is not None:
            self._owned.close()
            self._owned = None
