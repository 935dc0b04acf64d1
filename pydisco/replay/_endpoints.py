"""Simulated endpoints: the device, the batched server and the last hop as Trio code that
meets the ``Endpoint`` protocol, so the shipped runtime (dispatch, migration machine, pacer,
policies) runs against them unchanged under ``trio.testing.MockClock``.

Every request carries its trace facts by ``request_id`` in a :class:`TraceBook` (its prompt and
answer lengths, its SLO): a model looks them up instead of counting text.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import random
import statistics
from collections.abc import Callable

import trio

from .._errors import EndpointUnavailable, PromptTooLongError
from .._types import GenerationRequest, GenerationResult, TokenPiece, TokenSink, notify_admitted
from ..batching import SimulatedExecutor, VirtualStepLoop
from ..policies import create_step_scheduler
from ..policies._base import Slo
from ._models import DeviceModel, LastHop, ServerModel

__all__ = ["CloudStatistics", "SharedDevice", "SimulatedCloud", "SimulatedDevice", "TraceBook"]

MODEL_ID = "pydisco-replay"  # device and cloud share a vocabulary: resumes go by token ids
SAMPLE_WINDOW = 1000  # recent TTFTs and inter-token times kept (as the real cloud client does)


@dataclasses.dataclass(frozen=True, slots=True)
class TraceFacts:
    prompt_tokens: int
    answer_tokens: int
    slo: Slo


class TraceBook:
    """The trace facts of the requests in flight, by request id."""

    def __init__(self) -> None:
        self._facts: dict[str, TraceFacts] = {}

    def add(self, request_id: str, facts: TraceFacts) -> None:
        self._facts[request_id] = facts

    def remove(self, request_id: str) -> None:
        self._facts.pop(request_id, None)

    def facts(self, request: GenerationRequest) -> TraceFacts:
        try:
            return self._facts[request.request_id]
        except KeyError:
            raise KeyError(f"request {request.request_id!r} is not in the replay's trace book") from None

    def prompt_tokens(self, request: GenerationRequest) -> int:
        return self.facts(request).prompt_tokens

    def answer_tokens(self, request: GenerationRequest) -> int:
        return self.facts(request).answer_tokens


def _token(position: int, source: int) -> TokenPiece:
    # Distinct ids per endpoint, one character of text each: the report's text and the machine's
    # commit log stay small.
    return TokenPiece(position, source * 1_000_000 + position, "·")


class _Sink:
    """A sink that sees each piece first, and forwards ``admitted``."""

    __slots__ = ("_sink", "_see", "admitted")

    def __init__(self, sink: TokenSink, see: Callable[[TokenPiece], None]) -> None:
        self._sink = sink
        self._see = see
        self.admitted: Callable[[], None] = lambda: notify_admitted(sink)

    def __call__(self, piece: TokenPiece) -> None:
        self._see(piece)
        self._sink(piece)


# ----- the device -------------------------------------------------------------------------------


@dataclasses.dataclass
class _DeviceState:
    busy: trio.Lock = dataclasses.field(default_factory=trio.Lock)
    cached: int = 0  # prompt + answer tokens its KV cache holds for this request
    prefilled: int = 0
    decoded: int = 0


class SimulatedDevice:
    """Each request's own device (a trace's requests come from many users, each with a phone):
    requests never wait for each other. Per request, one thing at a time (a prepare, then a
    generate), with a KV cache that remembers what it prefilled or generated for that answer,
    as the real engine's does; prefill takes ``a + c·tokens``, each further token
    ``decode_s_per_token``. A request whose prompt and answer exceed the context is refused
    (``PromptTooLongError``) before any work: the runtime then routes it to the cloud, or the
    replay counts it as refused."""

    queues_requests = True
    model_id = MODEL_ID

    def __init__(self, model: DeviceModel, book: TraceBook) -> None:
        self.model = model
        self.profile = model  # what the runtime reads: prefill_a_s, prefill_c_s_per_token, decode_s_per_token
        self._book = book
        self._state: dict[str, _DeviceState] = {}
        self.refused: set[str] = set()

    @property
    def name(self) -> str:
        return "device"

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return self._book.prompt_tokens(request)

    def forget(self, request_id: str) -> tuple[int, int]:
        """The request is over: drop its state; (tokens prefilled, tokens decoded) for it."""
        state = self._state.pop(request_id, None)
        self.refused.discard(request_id)
        return (state.prefilled, state.decoded) if state is not None else (0, 0)

    def _validate(self, request: GenerationRequest) -> _DeviceState:
        prompt = self._book.prompt_tokens(request)
        if prompt + request.max_tokens > self.model.context_tokens:
            self.refused.add(request.request_id)
            raise PromptTooLongError(
                f"device: prompt {prompt} + answer {request.max_tokens} tokens exceed its context of {self.model.context_tokens}"
            )
        return self._state.setdefault(request.request_id, _DeviceState())

    async def _prefill(self, request: GenerationRequest, state: _DeviceState) -> int:
        need = self._book.prompt_tokens(request) + request.start_position
        tokens = max(0, need - state.cached)
        try:
            await trio.sleep(self.model.prefill_s(tokens))
        except trio.Cancelled:
            state.prefilled += tokens // 2  # stopped halfway, on average
            raise
        state.cached = max(state.cached, need)
        state.prefilled += tokens
        return tokens

    async def prepare(self, request: GenerationRequest) -> int:
        """Prefill only (a migration target, or standby following the cloud)."""
        state = self._validate(request)
        async with state.busy:
            return await self._prefill(request, state)

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        state = self._validate(request)
        async with state.busy:
            notify_admitted(sink)
            prefilled = await self._prefill(request, state)
            end = min(request.max_tokens, self._book.answer_tokens(request))
            sent = 0
            for position in range(request.start_position, end):
                if position > request.start_position:
                    await trio.sleep(self.model.decode_s_per_token)
                sink(_token(position, 1))
                sent += 1
                state.decoded += 1
                state.cached = self._book.prompt_tokens(request) + position
        finish = "length" if end >= request.max_tokens else "stop"
        return GenerationResult(finish, self._book.prompt_tokens(request), prefilled, sent)


class SharedDevice:
    """One device serving every request (a single user's phone, a robot's computer): the
    requests share its batched engine, a step loop whose decode step slows with the batch as
    the multi-stream engine's does (``DeviceModel.step_profile``), under a step scheduler. It has
    no ``prepare`` (no standby): a migration to it prefills what it needs."""

    queues_requests = True
    model_id = MODEL_ID

    def __init__(self, model: DeviceModel, book: TraceBook, *, max_batch: int = 4, scheduler: str = "fcfs") -> None:
        self.model = model
        self.profile = model
        self._book = book
        self.refused: set[str] = set()
        executor = SimulatedExecutor(
            model.step_profile(max_batch), kv_capacity=model.context_tokens, max_batch=max_batch,
            prompt_tokens=book.prompt_tokens, answer_tokens=book.answer_tokens,
        )  # fmt: skip
        self._executor = executor
        self._loop = VirtualStepLoop(executor, create_step_scheduler(scheduler))
        self._prefilled: collections.Counter[str] = collections.Counter()
        self._decoded: collections.Counter[str] = collections.Counter()

    @property
    def name(self) -> str:
        return "device"

    @property
    def answers_ahead(self) -> int:
        """Answers waiting for the step loop's admission (a new one queues behind them)."""
        return self._loop.statistics().queued

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return self._book.prompt_tokens(request)

    async def run(self) -> None:
        await self._loop.run()

    def forget(self, request_id: str) -> tuple[int, int]:
        self.refused.discard(request_id)
        return self._prefilled.pop(request_id, 0), self._decoded.pop(request_id, 0)

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        prompt = self._book.prompt_tokens(request)
        if prompt + request.max_tokens > self.model.context_tokens:
            self.refused.add(request.request_id)
            raise PromptTooLongError(f"device: prompt {prompt} + answer {request.max_tokens} tokens exceed its context")
        rid = request.request_id

        def see(piece: TokenPiece) -> None:
            self._decoded[rid] += 1

        self._prefilled[rid] += prompt + request.start_position
        result = await self._loop.generate(request, _Sink(sink, see), self._book.facts(request).slo)
        return result


# ----- the cloud ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CloudStatistics:
    """What the runtime's policies read from a cloud endpoint (the real client's fields)."""

    ttft_samples: tuple[float, ...]
    inter_token_p50: float | None
    server_model: str | None
    requests: int
    refused_outage: int
    lost_outage: int


class SimulatedCloud:
    """A pydisco server reached over the last hop: the request crosses the uplink, waits the
    API's overhead (a measured sample), then runs in the server's step loop (the shipped
    ``VirtualStepLoop`` over a ``SimulatedExecutor``, under the model's step scheduler) among
    every other request; its tokens come back over the downlink in order. During an outage a new
    request is refused and one in flight fails (``EndpointUnavailable``), as a cut link does.

    ``announces_admission``: the runtime hears when the server admits a request (its
    first-token deadline starts then). False is the real cloud client's case: the protocol has
    no such frame, so time in the server's queue counts against the deadline.

    Start the server with ``nursery.start_soon(cloud.run)``."""

    def __init__(self, server: ServerModel, book: TraceBook, *, link: LastHop | None = None, seed: int = 0,
                 announces_admission: bool = True) -> None:  # fmt: skip
        self.server = server
        self.queues_requests = announces_admission  # the runtime waits for word of admission
        self._book = book
        self._link = link if link is not None and not link.is_ideal else None
        self._outages = link.outages.schedule() if link is not None and link.outages is not None else None
        self._rng = random.Random(seed)
        self._link_rng = random.Random(seed + 1)
        executor = SimulatedExecutor(
            server.step, kv_capacity=server.kv_capacity, max_batch=server.max_batch,
            prefill_chunk=server.prefill_chunk, prompt_tokens=book.prompt_tokens, answer_tokens=book.answer_tokens,
        )  # fmt: skip
        self._executor = executor
        self._loop = VirtualStepLoop(executor, create_step_scheduler(server.scheduler))
        self._ttft: collections.deque[float] = collections.deque(maxlen=SAMPLE_WINDOW)
        self._gaps: collections.deque[float] = collections.deque(maxlen=SAMPLE_WINDOW)
        self._gap_p50: tuple[int, float | None] = (-1, None)
        self._counts = collections.Counter[str]()
        self._decoded: collections.Counter[str] = collections.Counter()
        self._prefilled: collections.Counter[str] = collections.Counter()
        self.model_id = MODEL_ID

    @property
    def name(self) -> str:
        return "cloud"

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return self._book.prompt_tokens(request)

    def loop_statistics(self) -> object:
        return self._loop.statistics()

    def statistics(self) -> CloudStatistics:
        n = self._counts["gaps"]
        if self._gap_p50[0] != n // 100:  # the median of the window, refreshed every 100 gaps
            self._gap_p50 = (n // 100, statistics.median(self._gaps) if self._gaps else None)
        return CloudStatistics(tuple(self._ttft), self._gap_p50[1], MODEL_ID, self._counts["requests"],
                               self._counts["refused_outage"], self._counts["lost_outage"])  # fmt: skip

    def forget(self, request_id: str) -> tuple[int, int]:
        return self._prefilled.pop(request_id, 0), self._decoded.pop(request_id, 0)

    async def run(self) -> None:
        """The server's step loop, until cancelled."""
        await self._loop.run()

    def _sink(self, sink: TokenSink, see: Callable[[TokenPiece], None]) -> _Sink:
        forward = _Sink(sink, see)
        if not self.queues_requests:
            forward.admitted = lambda: None  # no word of admission reaches the runtime
        return forward

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        self._counts["requests"] += 1
        link, outages = self._link, self._outages
        started = trio.current_time()
        if outages is not None and outages.cut_at(started):
            self._counts["refused_outage"] += 1
            raise EndpointUnavailable("cloud: unreachable (the last hop is cut)")
        rid = request.request_id
        prompt = self._book.prompt_tokens(request)
        fresh = request.start_position == 0
        last = [math.nan]

        def see(piece: TokenPiece) -> None:
            now = trio.current_time()
            if math.isnan(last[0]):
                if fresh:
                    self._ttft.append(now - started)
            else:
                self._gaps.append(now - last[0])
                self._counts["gaps"] += 1
            last[0] = now
            self._decoded[rid] += 1

        up = link.delay_s(link.up, prompt * link.bytes_per_prompt_token, self._link_rng) if link is not None else 0.0
        overhead = self.server.overhead_samples_s[self._rng.randrange(len(self.server.overhead_samples_s))]
        slo = self._book.facts(request).slo
        self._prefilled[rid] += prompt + request.start_position
        if link is None and outages is None:
            await trio.sleep(up + overhead)
            return await self._loop.generate(request, self._sink(sink, see), slo)
        return await self._over_link(request, sink, see, slo, up + overhead, started)

    async def _over_link(self, request: GenerationRequest, sink: TokenSink, see: Callable[[TokenPiece], None],
                         slo: Slo, delay_s: float, started: float) -> GenerationResult:
        """The request through a real last hop: tokens are delayed in order by the downlink, and
        an outage during the answer cuts it."""
        link, outages = self._link, self._outages
        queue: collections.deque[tuple[float, TokenPiece]] = collections.deque()
        arrived = trio.Event()
        last_delivery = [started]
        result: list[GenerationResult] = []
        lost = [False]

        def down(piece: TokenPiece) -> None:
            now = trio.current_time()
            delay = link.delay_s(link.down, link.bytes_per_answer_token, self._link_rng) if link is not None else 0.0
            at = max(last_delivery[0], now + delay)  # a stream never reorders
            last_delivery[0] = at
            queue.append((at, piece))
            arrived.set()

        async def deliver(cancel: trio.CancelScope) -> None:
            nonlocal arrived
            forward = self._sink(sink, see)
            while True:
                while queue:
                    at, piece = queue[0]
                    await trio.sleep_until(at)
                    queue.popleft()
                    forward(piece)
                if result:
                    cancel.cancel()
                    return
                await arrived.wait()
                arrived = trio.Event()

        async def cut(cancel: trio.CancelScope) -> None:
            if outages is None:
                return
            await trio.sleep_until(outages.next_cut(started))
            lost[0] = True
            cancel.cancel()

        # The step loop's admission reaches the runtime's sink directly (when it announces it).
        announces = self.queues_requests

        class _Admit:
            def __call__(self, piece: TokenPiece) -> None:
                down(piece)

            def admitted(self) -> None:
                if announces:
                    notify_admitted(sink)

        admit = _Admit()

        async def server_side_admitting() -> None:
            await trio.sleep(delay_s)
            result.append(await self._loop.generate(request, admit, slo))
            arrived.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_side_admitting)
            nursery.start_soon(deliver, nursery.cancel_scope)
            nursery.start_soon(cut, nursery.cancel_scope)
        if lost[0]:  # tokens still on the wire are lost with the link
            self._counts["lost_outage"] += 1
            raise EndpointUnavailable("cloud: the last hop was cut during the answer")
        if not result:
            raise EndpointUnavailable("cloud: the answer ended without a result")
        return result[0]
