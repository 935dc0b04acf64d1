"""The batched server backend: every answer through one step loop over one engine, behind a real
server. Refusals reach the client as `rejected` (the runtime fails over); a client's cancel
releases its sequence within one step."""

from __future__ import annotations

import argparse
import collections
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest
import trio

from batch_support import RecordingExecutor, token_text
from cloud_support import TOKEN, running_server, trio_test, wait_until
from pydisco import RuntimeConfig, open_runtime
from pydisco._errors import ConfigurationError, EndpointError
from pydisco.cli import _serve as serve_cli
from pydisco.cli import build_parser
from pydisco.cli._config import resolve_options
from pydisco._types import GenerationRequest, TokenPiece
from pydisco.batching import SimulatedExecutor, StepEvent, VirtualStepLoop
from pydisco.cloud import BatchedBackend, RunningServer, open_cloud_endpoint, open_loopback_cloud
from pydisco.cloud import protocol as P
from pydisco.policies import Slo, create_step_scheduler
from pydisco.policies._step import StepProfile
from pydisco.testing import ScriptedEndpoint


@pytest.fixture
def executor() -> RecordingExecutor:
    return RecordingExecutor(max_batch=4)


@asynccontextmanager
async def batched_server(executor: RecordingExecutor, scheduler: str, scheme: str = "memory",
                         **backend: object) -> AsyncIterator[tuple[RunningServer, BatchedBackend]]:  # fmt: skip
    served = BatchedBackend.start(executor, scheduler, **backend)  # type: ignore[arg-type]
    try:
        async with running_server(served, [scheme], parallel=served.parallel, max_queue=0) as server:
            yield server, served
    finally:
        served.close()


def expected(prompt: str, tokens: int, start: int = 0) -> list[tuple[int, str]]:
    request = GenerationRequest(prompt=prompt, max_tokens=tokens)
    return [(p, token_text(request, p)) for p in range(start, tokens)]


def seen(pieces: list[TokenPiece]) -> list[tuple[int, str]]:
    return [(p.position, p.text) for p in pieces]


@pytest.mark.parametrize("scheduler", ["fcfs", "fastserve", "andes"])
@trio_test(30)
async def test_concurrent_answers_share_one_engine_and_each_gets_exactly_its_tokens(
    executor: RecordingExecutor, scheduler: str
) -> None:
    got: dict[str, list[TokenPiece]] = collections.defaultdict(list)
    async with batched_server(executor, scheduler) as (server, _):
        async with open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud:

            async def one(name: str, tokens: int) -> None:
                result = await cloud.generate(GenerationRequest(prompt=name, max_tokens=tokens), got[name].append)
                assert result.finish_reason == "length" and result.generated_tokens == tokens

            async with trio.open_nursery() as nursery:
                for n in range(3):
                    nursery.start_soon(one, f"q{n}", 20 + n)
    for n in range(3):
        assert seen(got[f"q{n}"]) == expected(f"q{n}", 20 + n)
    assert max(len(d) for d in executor.decoded) > 1  # one engine, steps shared
    assert server.statistics().streams_completed == 3


@trio_test(30)
async def test_the_loopback_cloud_lets_a_batched_backend_batch_its_answers(executor: RecordingExecutor) -> None:
    # The loopback cloud's server admits as many answers as the backend takes in (not one at a
    # time), so concurrent answers share the engine's steps, as behind `pydisco serve --scheduler`.
    backend = BatchedBackend.start(executor, "fcfs")
    try:
        async with open_loopback_cloud(backend=backend, profile=None) as cloud:
            async with open_cloud_endpoint(cloud.direct_url, token=cloud.token, ssl_context=cloud.ssl_context) as client:
                async with trio.open_nursery() as nursery:
                    for n in range(3):
                        nursery.start_soon(client.generate, GenerationRequest(prompt=f"q{n}", max_tokens=40), lambda piece: None)
    finally:
        backend.close()
    assert max(len(d) for d in executor.decoded) == 3


@trio_test(30)
async def test_a_request_the_scheduler_refuses_is_a_rejected_stream_and_the_link_stays(executor: RecordingExecutor) -> None:
    # SLICE refuses a rate the engine cannot give even alone (100000 tokens/s at ms steps).
    async with batched_server(executor, "slice", slo=Slo(reading_rate=100_000.0)) as (server, backend):
        async with open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud:
            for _ in range(2):
                with pytest.raises(EndpointError) as info:
                    await cloud.generate(GenerationRequest(prompt="fast", max_tokens=8), lambda piece: None)
                assert info.value.code == P.Code.REJECTED
                assert "slice scheduler refused it" in str(info.value)
            assert cloud.statistics().connected  # a refusal ends its stream, not the link
    assert server.statistics().streams_failed == 2 and backend.statistics().rejected == 2


@trio_test(30)
async def test_a_rejected_cloud_answer_fails_over_to_the_device(executor: RecordingExecutor) -> None:
    answer = [TokenPiece(i, i, f"d{i} ") for i in range(10)]
    async with batched_server(executor, "slice", slo=Slo(reading_rate=100_000.0)) as (server, _):
        async with open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud:
            endpoints = {"cloud": cloud, "device": ScriptedEndpoint("device", answer, prefill_s=0.01, gaps_s=[0.001])}
            config = RuntimeConfig(device_model=None, dispatch="cloud-only", migration="never",
                                   slo=Slo(reading_rate=500.0))  # fmt: skip
            async with open_runtime(config, endpoints=endpoints) as rt:  # type: ignore[arg-type]
                async with rt.stream(prompt="q", max_tokens=10) as stream:
                    text = "".join([piece.text async for piece in stream])
    assert text == "".join(p.text for p in answer)
    assert stream.report.endpoints_used == ("device",)
    assert [m.kind for m in stream.report.migrations] == ["failover"]


@trio_test(30)
async def test_a_cancelled_answer_releases_its_sequence_and_the_others_go_on(executor: RecordingExecutor) -> None:
    async with batched_server(executor, "fcfs") as (server, backend):
        async with open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud:
            got: list[TokenPiece] = []
            other: list[TokenPiece] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cloud.generate, GenerationRequest(prompt="stays", max_tokens=60), other.append)
                with trio.move_on_after(0.2):
                    await cloud.generate(GenerationRequest(prompt="goes", max_tokens=50_000), got.append)
            cancelled = next(i for i, r in executor.requests.items() if r.prompt == "goes")
            await wait_until(lambda: cancelled in executor.released and server.statistics().streams_cancelled == 1)
    assert len(other) == 60 and 0 < len(got) < 50_000
    assert seen(got) == expected("goes", 50_000)[: len(got)]
    assert backend.statistics().running == 0


class CountingExecutor(SimulatedExecutor):
    """A simulated engine that logs each step's decodes and the step count at each release."""

    def __init__(self) -> None:
        super().__init__(StepProfile(decode_s=(0.01, 0.012, 0.014, 0.016), prefill_s_per_token=0.0001),
                         kv_capacity=1 << 16, max_batch=4)  # fmt: skip
        self.steps = 0
        self.released_at: dict[int, int] = {}

    def step(self, decode: Sequence[int], prefill: tuple[int, int] | None) -> list[StepEvent]:
        self.steps += 1
        return super().step(decode, prefill)

    def release(self, seq_id: int) -> None:
        self.released_at[seq_id] = self.steps
        super().release(seq_id)


@asynccontextmanager
async def virtual_server(executor: SimulatedExecutor, scheduler: str, **backend: object) -> AsyncIterator[tuple[RunningServer, BatchedBackend]]:
    """A server over the memory transport whose batched backend's loop runs in virtual time."""
    loop = VirtualStepLoop(executor, create_step_scheduler(scheduler))
    served = BatchedBackend(loop, model_id="simulated", max_batch=executor.max_batch, **backend)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.run)
        async with running_server(served, ["memory"], parallel=served.parallel, max_queue=0) as server:
            yield server, served
        nursery.cancel_scope.cancel()


@trio_test(60, mock_clock=True)
async def test_a_client_cancel_releases_the_sequence_within_one_step() -> None:
    executor = CountingExecutor()
    async with virtual_server(executor, "fcfs") as (server, _):
        async with open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud:
            got: list[TokenPiece] = []
            with trio.CancelScope() as scope:

                def sink(piece: TokenPiece) -> None:
                    got.append(piece)
                    if len(got) == 20:
                        steps_at_cancel.append(executor.steps)
                        scope.cancel()

                steps_at_cancel: list[int] = []
                await cloud.generate(GenerationRequest(prompt="x" * 40, max_tokens=10_000), sink)
            await wait_until(lambda: 0 in executor.released_at)
    # The cancel crosses the link at once (virtual time): the step under way ends, then it goes.
    assert executor.released_at[0] - steps_at_cancel[0] <= 1
    assert len(got) == 20 and server.statistics().streams_cancelled == 1


# -- pydisco serve --scheduler ------------------------------------------------------------


def serve_args(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(["serve", "--listen", "ws://127.0.0.1:0", "--token", "t", *argv])
    return resolve_options(args)


def test_serve_scheduler_runs_one_batched_backend_over_the_batched_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    device = pytest.importorskip("pydisco.device")
    made: list[tuple[object, int, object]] = []

    class Engine(RecordingExecutor):  # stands in for pydisco.device.BatchedEngine
        def __init__(self, model: object, *, max_batch: int, n_threads: object) -> None:
            made.append((model, max_batch, n_threads))
            super().__init__(max_batch=max_batch)

    monkeypatch.setattr(device, "BatchedEngine", Engine, raising=False)
    args = serve_args("--scheduler", "andes", "--max-batch", "3", "--threads", "2")
    backend = serve_cli._backend(args)
    try:
        assert isinstance(backend, BatchedBackend) and made == [(None, 3, 2)]
        config = serve_cli.server_config(args, ["t"], backend, None)
        # The step scheduler sees the waiting answers: the server's own queue is out of the way.
        assert config.parallel == backend.parallel > 3 and config.max_queue == 0
    finally:
        backend.close()
