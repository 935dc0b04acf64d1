"""Andes on a batched server: preemption and resume lose and repeat nothing over real transports,
and the clients' reader reports decide whom it preempts (only readers with slack)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import trio

from batch_support import RecordingExecutor, token_text
from cloud_support import TOKEN, client_context, running_server, trio_test, wait_until
from pydisco import RuntimeConfig, open_runtime
from pydisco._types import GenerationRequest, ReaderState, TokenPiece
from pydisco.batching import SimulatedExecutor, StepEvent, VirtualStepLoop
from pydisco.cloud import BatchedBackend, open_cloud_endpoint
from pydisco.policies import Slo, create_step_scheduler
from pydisco.testing import ScriptedEndpoint
from pydisco.policies._step import StepProfile


SKIM_RATE = 300.0  # tokens/s: a reader skimming faster than the engine writes


class Reader:
    """A sink whose reader takes tokens at ``rate`` from its first one on (``hold``: it reads
    nothing at all; ``eager``: once tokens come it skims them at SKIM_RATE, faster than they
    come, so nothing stays unread), and says so (``reader_state``) as the runtime's sinks do."""

    def __init__(self, rate: float, *, hold: bool = False, eager: bool = False) -> None:
        self.rate, self.hold, self.eager = rate, hold, eager
        self.pieces: list[TokenPiece] = []
        self.arrivals: list[float] = []

    def __call__(self, piece: TokenPiece) -> None:
        self.pieces.append(piece)
        self.arrivals.append(trio.current_time())

    def reader_state(self) -> ReaderState:
        if not self.pieces:
            return ReaderState(0, self.rate)
        if self.eager:
            return ReaderState(0, SKIM_RATE)
        read = 0 if self.hold else math.floor(self.rate * (trio.current_time() - self.arrivals[0]))
        return ReaderState(max(0, len(self.pieces) - read), self.rate)

    def longest_gap(self, after: float = 0.0) -> float:
        times = [t for t in self.arrivals if t >= after]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def exactly_once_in_order(pieces: Sequence[TokenPiece], prompt: str, tokens: int) -> bool:
    request = GenerationRequest(prompt=prompt, max_tokens=tokens)
    return [(p.position, p.text) for p in pieces] == [(k, token_text(request, k)) for k in range(tokens)]


@pytest.mark.parametrize("reports", [True, False], ids=["reported", "inferred"])
@pytest.mark.parametrize("scheme", ["ws", "quic"])
@trio_test(60)
async def test_andes_preempts_and_resumes_a_stream_and_it_gets_every_token_once_in_order(scheme: str, reports: bool) -> None:
    executor = RecordingExecutor(max_batch=1, step_s=0.002)  # one slot: a newcomer must take it
    backend = BatchedBackend.start(executor, "andes")
    try:
        async with running_server(backend, [scheme], parallel=backend.parallel, max_queue=0) as server:
            async with open_cloud_endpoint(server.urls[0], token=TOKEN, ssl_context=client_context(scheme)) as cloud:
                long_reader, newcomer = Reader(20.0), Reader(20.0)
                sinks = (long_reader, newcomer) if reports else (long_reader.__call__, newcomer.__call__)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cloud.generate, GenerationRequest(prompt="long", max_tokens=400), sinks[0])
                    # Once the long answer is far ahead of its reader (slack), a newcomer arrives.
                    await wait_until(lambda: len(long_reader.pieces) >= 40)
                    nursery.start_soon(cloud.generate, GenerationRequest(prompt="new", max_tokens=30), sinks[1])
            statistics = backend.statistics()
    finally:
        backend.close()
    assert statistics.preemptions >= 1  # the long one was paused for the newcomer, then resumed
    assert exactly_once_in_order(long_reader.pieces, "long", 400)
    assert exactly_once_in_order(newcomer.pieces, "new", 30)


class SteppedSimulator(SimulatedExecutor):
    """A simulated engine that logs who decodes at each step, by prompt."""

    def __init__(self) -> None:
        super().__init__(StepProfile(decode_s=(0.01, 0.012, 0.014), prefill_s_per_token=0.0001),
                         kv_capacity=1 << 16, max_batch=2)  # fmt: skip
        self.prompts: dict[int, str] = {}
        self.decoded: list[set[str]] = []

    def admit(self, seq_id: int, request: GenerationRequest) -> None:
        self.prompts[seq_id] = request.prompt or ""
        super().admit(seq_id, request)

    def step(self, decode: Sequence[int], prefill: tuple[int, int] | None) -> list[StepEvent]:
        self.decoded.append({self.prompts[i][0] for i in decode})
        return super().step(decode, prefill)

    def paused(self, name: str) -> bool:
        """Was ``name``'s answer left out of a step between its first and last decode?"""
        steps = [name in d for d in self.decoded]
        first, last = steps.index(True), len(steps) - 1 - steps[::-1].index(True)
        return not all(steps[first : last + 1])


async def race(reported: bool) -> SteppedSimulator:
    """Two long answers far ahead of their 4.5 tokens/s readers — "h" first, whose reader holds
    everything, then "e", whose reader skims every token at once — then a newcomer "n" takes one
    of the two slots. ``reported``: the clients report their readers (else plain sinks, as an
    older client: the server assumes the default reading rate and infers the buffers)."""
    executor = SteppedSimulator()
    loop = VirtualStepLoop(executor, create_step_scheduler("andes"))
    backend = BatchedBackend(loop, model_id="simulated", max_batch=executor.max_batch)
    holding, eager, newcomer = Reader(4.5, hold=True), Reader(4.5, eager=True), Reader(4.5)
    async with trio.open_nursery() as outer:
        outer.start_soon(loop.run)
        async with running_server(backend, ["memory"], parallel=backend.parallel, max_queue=0) as server:
            async with open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud:
                async with trio.open_nursery() as nursery:
                    for prompt, reader in (("h", holding), ("e", eager)):
                        sink = reader if reported else reader.__call__
                        nursery.start_soon(cloud.generate, GenerationRequest(prompt=prompt * 40, max_tokens=300), sink)
                        await trio.sleep(0.05)
                    await trio.sleep(1.0)
                    sink = newcomer if reported else newcomer.__call__
                    nursery.start_soon(cloud.generate, GenerationRequest(prompt="n" * 40, max_tokens=50), sink)
                assert (cloud.statistics().reader_reports > 0) == reported
        outer.cancel_scope.cancel()
    assert backend.statistics().preemptions >= 1
    for reader, tokens in ((holding, 300), (eager, 300), (newcomer, 50)):
        assert [p.position for p in reader.pieces] == list(range(tokens))
    return executor


@trio_test(120, mock_clock=True)
async def test_andes_preempts_the_stream_whose_reader_reported_slack_not_the_one_that_has_none() -> None:
    executor = await race(reported=True)
    assert executor.paused("h") and not executor.paused("e")


@trio_test(120, mock_clock=True)
async def test_without_reports_the_later_stream_is_preempted_whatever_its_reader_has() -> None:
    # The control: by delivery times alone both readers have slack, so nothing protects the
    # skimming reader's answer: it is paused too.
    executor = await race(reported=False)
    assert executor.paused("e")


@pytest.mark.parametrize("tell_pauses", [True, False], ids=["told", "silent"])
@trio_test(200, mock_clock=True)
async def test_a_paused_cloud_answer_is_not_silence_while_its_reader_has_tokens(tell_pauses: bool) -> None:
    # A runtime's answer runs far ahead of its 4.5 tokens/s reader; the server pauses it for a
    # newcomer longer than the runtime's silence timeout. Told of the pause (the paused frame),
    # the runtime waits, its reader still reading; a sink that cannot hear it fails over.
    executor = SteppedSimulator()
    executor.max_batch = 1
    loop = VirtualStepLoop(executor, create_step_scheduler("andes"))
    backend = BatchedBackend(loop, model_id="simulated", max_batch=1)
    device_answer = [TokenPiece(i, 10_000 + i, f"d{i} ") for i in range(400)]
    config = RuntimeConfig(device_model=None, virtual_time=True, dispatch="cloud-only", migration="never",
                           slo=Slo(reading_rate=4.5), silence_timeout_s=0.3)  # fmt: skip
    async with trio.open_nursery() as outer:
        outer.start_soon(loop.run)
        async with running_server(backend, ["memory"], parallel=backend.parallel, max_queue=0) as server:
            async with open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud, \
                       open_cloud_endpoint(server.urls[0], token=TOKEN) as other:  # fmt: skip
                endpoint = cloud if tell_pauses else DeafToPauses(cloud)
                endpoints = {"cloud": endpoint, "device": ScriptedEndpoint("device", device_answer, gaps_s=[0.01])}
                async with open_runtime(config, endpoints=endpoints) as rt:  # type: ignore[arg-type]
                    async with rt.stream(prompt="r" * 40, max_tokens=400) as answer:
                        async with trio.open_nursery() as nursery:
                            async def newcomer() -> None:
                                await trio.sleep(1.0)
                                # A fast reader (100 tokens/s): Andes serves it for about a second.
                                await other.generate(GenerationRequest(prompt="n" * 40, max_tokens=100), Reader(100.0))

                            nursery.start_soon(newcomer)
                            pieces = [piece async for piece in answer]
        outer.cancel_scope.cancel()
    assert backend.statistics().preemptions >= 1
    assert [p.position for p in pieces] == list(range(400))  # every token once, in order, either way
    if tell_pauses:
        assert executor.paused("r")  # paused, then resumed on the server
        assert answer.report.endpoints_used == ("cloud",) and not answer.report.migrations
    else:
        assert [m.kind for m in answer.report.migrations] == ["failover"]


class DeafToPauses:
    """A cloud endpoint whose sinks lack ``paused`` (an endpoint that cannot tell)."""

    def __init__(self, inner: object) -> None:
        self._inner = inner
        self.name = "cloud"

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def generate(self, request: GenerationRequest, sink: object) -> object:
        def plain(piece: TokenPiece) -> None:
            sink(piece)  # type: ignore[operator]

        plain.admitted = getattr(sink, "admitted")  # type: ignore[attr-defined]
        plain.reader_state = getattr(sink, "reader_state")  # type: ignore[attr-defined]
        return await self._inner.generate(request, plain)  # type: ignore[attr-defined]
