"""The device as many answers at once: a :class:`BatchedEngine` run by a step loop (its own
thread) under a step scheduler, behind the same ``Endpoint`` surface as ``DeviceEndpoint``.

Requests wait for admission in the loop, not in a lock: the sink's ``admitted()`` is called when
the scheduler admits one, so the runtime's first-token deadline starts there. A request the
scheduler refuses raises ``AdmissionRefused`` (an ``EndpointError``, code ``"rejected"``) with
the scheduler's reason; nothing was generated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import AsyncIterator

import trio

from .._types import GenerationRequest, GenerationResult, TokenPiece, TokenSink
from ..batching import LoopStatistics, StepLoop, rough_profile
from ..policies import Slo, create_step_scheduler
from ..policies._step import StepProfile, StepScheduler
from ._batched import BatchedEngine
from ._endpoint import CostLedger
from ._engine import LlamaEngine
from ._profile import CostRates, DeviceProfile, load_or_measure_profile, load_profile


class BatchedDeviceEndpoint:
    """On-device generation of many answers at once (an :class:`~pydisco._types.Endpoint`).

    Build it with :func:`open_batched_device_endpoint`, which starts and stops the loop and
    frees the model.
    """

    queues_requests = True  # requests wait for the scheduler's admission (the sink hears it)

    def __init__(
        self,
        engine: BatchedEngine,
        loop: StepLoop,
        *,
        name: str = "device",
        rates: CostRates | None = None,
        profile: DeviceProfile | None = None,
    ) -> None:
        self._engine = engine
        self._loop = loop
        self._name = name
        self._profile = profile
        self.cost = CostLedger(rates or CostRates())

    @property
    def name(self) -> str:
        return self._name

    @property
    def engine(self) -> BatchedEngine:
        """The engine. Its loop's thread owns it: only read it (``count_prompt_tokens`` …)."""
        return self._engine

    @property
    def model_id(self) -> str:
        return self._engine.model_id

    @property
    def profile(self) -> DeviceProfile | None:
        """The device's single-answer profile (what dispatch reads), when it was loaded."""
        return self._profile

    @property
    def busy(self) -> bool:
        """True while any answer is queued or admitted."""
        s = self._loop.statistics()
        return s.queued + s.running > 0

    @property
    def answers_ahead(self) -> int:
        """Answers a new one would wait for (what dispatch reads): those queued for admission,
        and, when the answers running fill a step's batch, those beyond a free place: 0 while
        it would start decoding beside the others at once."""
        s = self._loop.statistics()
        return s.queued + max(0, s.running - self._engine.max_batch + 1)

    def statistics(self) -> LoopStatistics:
        """The step loop: answers queued and running, steps, tokens, refusals, preemptions."""
        return self._loop.statistics()

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Tokens of ``request``'s prompt for this model (its chat template applied)."""
        return self._engine.count_prompt_tokens(request)

    def tokens_to_prefill(self, request: GenerationRequest) -> int:
        """Rows ``request`` would compute before its first token, given the cache now (an
        estimate: the cache may change before it is admitted)."""
        return self._engine.tokens_to_prefill(request)

    async def generate(self, request: GenerationRequest, sink: TokenSink, slo: Slo | None = None) -> GenerationResult:
        """Generate ``request`` beside the other answers, calling ``sink`` in this task for each
        token, in order; ``slo`` is what the scheduler serves it by (default: the sink's ``slo``,
        as the runtime's sinks carry the answer's, else ``Slo()``).

        Bad input raises ConfigurationError/PromptTooLongError before any work; a refusal by
        the scheduler raises ``AdmissionRefused``. If ``sink`` raises, the answer stops and the
        exception propagates.

        On cancellation: the loop releases the answer before its next step (a step is one
        token per sequence and at most one prefill chunk), its cost is recorded, nothing more
        reaches ``sink``, and ``trio.Cancelled`` is raised with the other answers unaffected.
        """
        if slo is None:  # the runtime's sinks carry the answer's (_types.TokenSink)
            slo = getattr(sink, "slo", None)
        costs: list[float] = []

        def account(result: GenerationResult) -> None:
            entry = self.cost.record(request.request_id, result.prefilled_tokens, result.generated_tokens, result.finish_reason)
            costs.append(entry.units)

        result = await self._loop.generate(request, sink, slo, ended=account)
        return dataclasses.replace(result, cost_units=costs[0] if costs else 0.0)


    async def prepare(self, request: GenerationRequest) -> int:
        """Prefill ``request``'s prompt and resumed prefix into the cache; generate nothing.

        Makes this endpoint ready to take over an answer: it runs as an answer of one token that
        nobody hears (the first token is sampled from the prefill's own logits, so it costs no
        decode), and its slot keeps the cells, which a later :meth:`generate` of the same
        request (or one with a longer committed prefix) reuses, unless a full cache took them
        back first. Returns the rows computed. A refusal raises ``AdmissionRefused``.

        On cancellation: the loop releases it before its next step; the chunks computed stay
        cached, its cost is recorded, and ``trio.Cancelled`` is raised.
        """
        self._engine.validate(request)
        if request.start_position >= request.max_tokens:
            return 0  # nothing would be generated after it: nothing to prepare
        one_token = dataclasses.replace(request, max_tokens=request.start_position + 1, stop=())
        computed: list[int] = []

        def account(result: GenerationResult) -> None:
            reason = "prepared" if result.finish_reason != "cancelled" else "cancelled"
            self.cost.record(request.request_id, result.prefilled_tokens, 0, reason)
            computed.append(result.prefilled_tokens)

        await self._loop.generate(one_token, _ignore, None, None, account)
        return computed[0]


def _ignore(_: TokenPiece) -> None:
    """A prepared answer's token: sampled, never reported."""


def measure_step_profile(engine: BatchedEngine, *, decode_steps: int = 8) -> StepProfile:
    """A first step profile for the loop (it learns the real one as it runs): one prefill chunk
    and ``decode_steps`` one-sequence decode steps timed on ``engine``, extended to larger
    batches by :func:`~pydisco.batching.rough_profile`. Call it before a loop drives the engine
    (it needs no answer admitted); it leaves the cache empty."""
    counting = ", ".join(str(i) for i in range(1, engine.prefill_chunk + 1))  # > one chunk of tokens
    request = GenerationRequest(prompt=counting, max_tokens=decode_steps + 2)
    engine.clear()
    left = engine.admit(0, request).prefill_tokens
    prefill: list[float] = []  # seconds per token of each full chunk
    decode: list[float] = []
    try:
        while left > 0:
            chunk = min(engine.prefill_chunk, left)
            started = time.perf_counter()
            engine.step([], (0, chunk))
            if chunk == engine.prefill_chunk:
                prefill.append((time.perf_counter() - started) / chunk)
            left -= chunk
        for _ in range(decode_steps):
            started = time.perf_counter()
            engine.step([0], None)
            decode.append(time.perf_counter() - started)
    finally:
        engine.release(0)
        engine.clear()
    return rough_profile(statistics.median(decode), statistics.median(prefill), engine.max_batch)


DEFAULT_CONTEXT = 4096  # KV cells


@contextlib.asynccontextmanager
async def open_batched_device_endpoint(
    model_path: str | os.PathLike[str] | None = None,
    *,
    scheduler: str | StepScheduler = "fcfs",
    max_batch: int = 8,
    max_sequences: int | None = None,
    n_threads: int | None = None,
    n_ctx: int = DEFAULT_CONTEXT,
    prefill_chunk: int = 64,
    name: str = "device",
    rates: CostRates | None = None,
    profile: bool = False,
    verbose: bool = False,
) -> AsyncIterator[BatchedDeviceEndpoint]:
    """Load a model (the default SmolLM2 when ``model_path`` is None) into a
    :class:`BatchedEngine` and yield its endpoint, its step loop running ``scheduler`` (a name:
    fcfs, fastserve, slice, andes; or a scheduler object).

    ``n_ctx`` is the KV cells all answers share; ``max_batch`` the answers one step decodes,
    ``max_sequences`` those admitted at once (see :class:`BatchedEngine`). With ``profile=True`` the single-answer device
    profile dispatch uses is loaded from the cache (measured on first use, as
    ``open_device_endpoint`` does); it also seeds the loop's step profile, which otherwise
    comes from a short measurement at opening. An unknown scheduler raises ConfigurationError
    and a missing or corrupt model ModelError, before anything runs. On exit, answers still
    running end as cancelled, the loop stops and the model is freed.

    On cancellation while loading: waits for the load to finish, frees the model, and raises.
    """
    policy = create_step_scheduler(scheduler) if isinstance(scheduler, str) else scheduler
    engine = await trio.to_thread.run_sync(
        lambda: BatchedEngine(model_path, max_batch=max_batch, max_sequences=max_sequences, n_ctx=n_ctx,
                              prefill_chunk=prefill_chunk, n_threads=n_threads, verbose=verbose)
    )  # fmt: skip
    try:
        cached = load_profile(engine.model_id, engine.n_threads)
        device_profile = cached
        if profile and cached is None:
            device_profile = await trio.to_thread.run_sync(lambda: _measure_device_profile(engine))
        if device_profile is not None:
            steps = rough_profile(device_profile.decode_s_per_token, device_profile.prefill_c_s_per_token, max_batch)
        else:
            steps = await trio.to_thread.run_sync(lambda: measure_step_profile(engine))
        loop = StepLoop(engine, policy, steps)
        loop.start()
        try:
            yield BatchedDeviceEndpoint(engine, loop, name=name, rates=rates, profile=device_profile if profile else None)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(loop.close)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(engine.close)


def _measure_device_profile(engine: BatchedEngine) -> DeviceProfile:
    """The single-answer profile, measured (and cached) with a single-sequence engine on the
    same model, since that is what the profile describes."""
    with LlamaEngine(engine.path, n_threads=engine.n_threads) as solo:
        return load_or_measure_profile(solo)
