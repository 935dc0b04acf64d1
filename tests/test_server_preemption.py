"""Andes on a batched server: preemption and resume lose and repeat nothing over real transports,
and the clients' reader reports decide whom it preempts (only readers with slack)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import trio

from batch_support import RecordingExecutor, token_text
from cloud_support import TOKEN, client_context, running_server, trio_test, wait_until
from pydisco._types import GenerationRequest, ReaderState, TokenPiece
from pydisco.batching import SimulatedExecutor, StepEvent, VirtualStepLoop
from pydisco.cloud import BatchedBackend, open_cloud_endpoint
from pydisco.policies import create_step_scheduler
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
