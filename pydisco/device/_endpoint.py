"""The device endpoint: a Trio actor that owns one :class:`LlamaEngine` on a worker thread.

The engine runs in ``trio.to_thread.run_sync(..., abandon_on_cancel=False)`` behind a
``CapacityLimiter(1)``, so exactly one thread uses it at a time and a cancelled call waits
until the thread has really stopped: when ``trio.Cancelled`` reaches the caller, the actor is
idle and ready for the next request. Tokens cross to the Trio thread without blocking the
worker (``TrioToken.run_sync_soon`` into an unbounded channel), and the caller's own task
calls ``sink`` for each, in order.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import threading
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import trio

from ._engine import LlamaEngine
from ._profile import AnswerCost, CostRates, DeviceProfile, load_or_measure_profile
from .._types import GenerationRequest, GenerationResult, TokenPiece, TokenSink, notify_admitted
from .._groups import single_exception

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class CostTotals:
    """Everything the device computed since it opened.

    Fields:
        answers: answers generated (any finish reason) plus prepares.
        prefilled_tokens: prompt and prefix tokens computed (cache hits excluded).
        decoded_tokens: tokens generated.
        units: total cost, in ``unit``.
        unit: what ``units`` counts.
    """

    answers: int
    prefilled_tokens: int
    decoded_tokens: int
    units: float
    unit: str


class CostLedger:
    """Per-answer cost records (the latest ``keep``) and running totals."""

    def __init__(self, rates: CostRates, keep: int = 1000) -> None:
        self.rates = rates
        self._recent: collections.deque[AnswerCost] = collections.deque(maxlen=keep)
        self._totals = CostTotals(0, 0, 0, 0.0, rates.unit)

    def record(self, request_id: str, prefilled: int, decoded: int, finish_reason: str) -> AnswerCost:
        units = self.rates.cost(prefilled, decoded)
        entry = AnswerCost(request_id, prefilled, decoded, units, self.rates.unit, finish_reason)
        self._recent.append(entry)
        t = self._totals
        self._totals = CostTotals(
            t.answers + 1, t.prefilled_tokens + prefilled, t.decoded_tokens + decoded, t.units + units, t.unit
        )
        return entry

    @property
    def recent(self) -> tuple[AnswerCost, ...]:
        return tuple(self._recent)

    @property
    def last(self) -> AnswerCost | None:
        return self._recent[-1] if self._recent else None

    def totals(self) -> CostTotals:
        return self._totals


class _AbortFlag:
    """``should_abort`` for the worker: set by the Trio side, or by the Trio cancel scope."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def __call__(self) -> bool:
        if self._event.is_set():
            return True
        try:
            trio.from_thread.check_cancelled()
        except trio.Cancelled:
            self._event.set()
            return True
        except RuntimeError:  # called from a llama.cpp thread that Trio does not know
            pass
        return False


class DeviceEndpoint:
    """On-device generation with one llama.cpp model (an :class:`~pydisco._types.Endpoint`).

    Requests run one at a time in arrival order; each reuses whatever prefix of the KV cache
    matches it. Build it with :func:`open_device_endpoint`, which also closes the model.
    """

    def __init__(
        self,
        engine: LlamaEngine,
        *,
        name: str = "device",
        rates: CostRates | None = None,
        profile: DeviceProfile | None = None,
    ) -> None:
        self._engine = engine
        self._name = name
        self._limiter = trio.CapacityLimiter(1)
        self._profile = profile
        self.cost = CostLedger(rates or CostRates())

    queues_requests = True  # one engine: requests take turns (the sink hears when one starts)

    @property
    def name(self) -> str:
        return self._name

    @property
    def engine(self) -> LlamaEngine:
        """The engine. Only touch it from inside this endpoint's calls; it has one owner."""
        return self._engine

    @property
    def model_id(self) -> str:
        return self._engine.model_id

    @property
    def profile(self) -> DeviceProfile | None:
        """The device's measured profile, once :meth:`load_profile` (or the opener) got it."""
        return self._profile

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Tokens of ``request``'s prompt for this model (its chat template applied). Cheap
        (tokenising only) and safe from the Trio thread while the engine works."""
        return self._engine.count_prompt_tokens(request)

    def tokens_to_prefill(self, request: GenerationRequest) -> int:
        """Tokens ``request`` would compute before its first token, given the KV cache now (an
        estimate while another answer runs: the cache may change first)."""
        return self._engine.tokens_to_prefill(request)

    @property
    def answers_ahead(self) -> int:
        """Requests a new one would wait for: the one holding the engine and those queued."""
        stats = self._limiter.statistics()
        return stats.borrowed_tokens + stats.tasks_waiting

    @property
    def busy(self) -> bool:
        """True while a request holds the engine (or waits for its thread to stop)."""
        return self._limiter.borrowed_tokens > 0

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        """Generate ``request``, calling ``sink`` in this task for each token, in order.

        Bad input raises ConfigurationError/PromptTooLongError before any work. ``max_tokens``
        bounds the whole answer (resumed prefix included). If ``sink`` raises, generation stops
        and the exception propagates.

        On cancellation: the worker stops within one decode step (a prefill is aborted
        mid-chunk by llama.cpp's abort callback); this call waits for that, records the cost of
        what was computed, passes nothing more to ``sink``, and raises ``trio.Cancelled`` with
        the endpoint idle and usable.
        """
        self._engine.validate(request)
        abort = _AbortFlag()
        send, receive = trio.open_memory_channel[TokenPiece](math.inf)
        trio_token = trio.lowlevel.current_trio_token()

        def deliver(piece: TokenPiece) -> None:  # runs in the Trio thread; must not raise
            if not abort.is_set():
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    send.send_nowait(piece)

        def on_token(piece: TokenPiece) -> None:  # runs in the worker thread
            trio_token.run_sync_soon(deliver, piece)

        def work() -> GenerationResult:
            return self._engine.generate(request, on_token, abort)

        outcome: list[GenerationResult] = []

        async def run_worker() -> None:
            with send:
                async with self._limiter:  # requests take turns: this one starts now
                    notify_admitted(sink)
                    result = await trio.to_thread.run_sync(work, abandon_on_cancel=False)
            # Recorded here so that a cancelled answer is accounted for too.
            entry = self.cost.record(
                request.request_id, result.prefilled_tokens, result.generated_tokens, result.finish_reason
            )
            outcome.append(dataclasses.replace(result, cost_units=entry.units))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_worker)
                try:
                    async with receive:
                        async for piece in receive:
                            sink(piece)
                except BaseException:
                    abort.set()  # the worker is still running: stop it, the nursery waits
                    raise
        except BaseExceptionGroup as group:
            raise single_exception(group) from None
        await trio.lowlevel.checkpoint_if_cancelled()
        return outcome[0]

    async def prepare(self, request: GenerationRequest) -> int:
        """Prefill ``request``'s prompt and resumed prefix into the KV cache; generate nothing.

        Makes this endpoint ready to take over an answer: a later :meth:`generate` of the same
        request (or one with a longer committed prefix) reuses the cache. Returns the tokens
        computed (0 if the cache already held them).

        On cancellation: the prefill stops mid-chunk; the part already computed stays cached,
        its cost is recorded, and ``trio.Cancelled`` is raised with the endpoint idle.
        """
        self._engine.validate(request)
        abort = _AbortFlag()
        computed = await self._in_worker(lambda: self._engine.prefill_only(request, abort))
        self.cost.record(request.request_id, computed, 0, "cancelled" if abort.is_set() else "prepared")
        await trio.lowlevel.checkpoint_if_cancelled()
        return computed

    async def load_profile(self, *, refresh: bool = False) -> DeviceProfile:
        """Load this device's profile from the cache, measuring it (seconds) if missing.

        On cancellation: the call waits for the worker to finish the measurement in progress
        (it cannot be interrupted part-way), then raises ``trio.Cancelled``.
        """
        self._profile = await self._in_worker(lambda: load_or_measure_profile(self._engine, refresh=refresh))
        return self._profile

    async def aclose(self) -> None:
        """Free the model once the request in progress (if any) ends.

        On cancellation: waits for the worker anyway (the model cannot be freed under it).
        """
        with trio.CancelScope(shield=True):
            await self._in_worker(self._engine.close)

    async def _in_worker(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, abandon_on_cancel=False, limiter=self._limiter)


DEFAULT_CONTEXT = 2048  # KV cells


@contextlib.asynccontextmanager
async def open_device_endpoint(
    model_path: str | os.PathLike[str] | None = None,
    *,
    n_threads: int | None = None,
    n_ctx: int = DEFAULT_CONTEXT,
    name: str = "device",
    rates: CostRates | None = None,
    profile: bool = False,
    verbose: bool = False,
) -> AsyncIterator[DeviceEndpoint]:
    """Load a model (the default SmolLM2 when ``model_path`` is None) and yield its endpoint.

    With ``profile=True`` the device profile is loaded from the cache or measured on first use.
    A missing or corrupt model raises ModelError before anything else. The model is freed on
    exit, after any request still running there has stopped.

    On cancellation while loading: waits for the load to finish, frees the model, and raises.
    """
    engine = await trio.to_thread.run_sync(
        lambda: LlamaEngine(model_path, n_threads=n_threads, n_ctx=n_ctx, verbose=verbose)
    )
    endpoint = DeviceEndpoint(engine, name=name, rates=rates)
    try:
        if profile:
            await endpoint.load_profile()
        yield endpoint
    finally:
        await endpoint.aclose()
