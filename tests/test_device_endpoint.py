"""DeviceEndpoint (the Trio actor) on the real SmolLM2 model."""

from __future__ import annotations

import pathlib
import threading

import pytest
import trio
from device_support import chat, run_engine, shared_engine, trio_test

from pydisco.device import DeviceEndpoint, open_device_endpoint
from pydisco._errors import ConfigurationError, ModelError, PromptTooLongError
from pydisco.device import CostRates
from pydisco._types import Endpoint, GenerationRequest, TokenPiece

pytestmark = pytest.mark.model

QUESTION = chat("Name three rivers in Europe.", max_tokens=20)
LONG = GenerationRequest(prompt="A long report about harbours, ships and tides. " * 90, max_tokens=4)


_expected: dict[str, tuple[TokenPiece, ...]] = {}


def expected(request: GenerationRequest) -> tuple[TokenPiece, ...]:
    """The engine's own greedy answer, computed once per session."""
    key = repr(request)
    if key not in _expected:
        _expected[key] = tuple(run_engine(shared_engine(), request)[0])
    return _expected[key]


def endpoint(**kwargs: object) -> DeviceEndpoint:
    return DeviceEndpoint(shared_engine(), **kwargs)  # type: ignore[arg-type]


@trio_test(30)
async def test_streams_tokens_in_order_in_the_trio_thread() -> None:
    device: Endpoint = endpoint(rates=CostRates(prefill_per_token=0.5, decode_per_token=2.0))
    trio_thread = threading.get_ident()
    got: list[TokenPiece] = []

    def sink(piece: TokenPiece) -> None:
        assert threading.get_ident() == trio_thread
        got.append(piece)

    result = await device.generate(QUESTION, sink)
    assert tuple(got) == expected(QUESTION)
    assert result.finish_reason == "length" and result.generated_tokens == 20
    assert result.cost_units == 0.5 * result.prefilled_tokens + 2.0 * 20


@trio_test(30)
async def test_cancellation_stops_within_a_decode_step_and_leaves_the_actor_idle() -> None:
    device = endpoint()
    engine = shared_engine()
    got: list[TokenPiece] = []
    decoded_at_cancel: list[int] = []
    with trio.CancelScope() as scope:

        def sink(piece: TokenPiece) -> None:
            got.append(piece)
            if len(got) == 5:
                decoded_at_cancel.append(engine.cached_tokens)
                scope.cancel()

        await device.generate(QUESTION, sink)
    assert scope.cancelled_caught
    assert len(got) == 5  # nothing reaches the sink after the cancel
    record = device.cost.last
    assert record is not None and record.finish_reason == "cancelled" and record.decoded_tokens >= 5
    # Counted in tokens, not milliseconds (so a slow machine cannot fail it): at most the
    # decode step in flight when cancel() ran finished afterwards.
    assert engine.cached_tokens - decoded_at_cancel[0] <= 1
    assert not device.busy
    got.clear()
    assert (await device.generate(QUESTION, got.append)).finish_reason == "length"
    assert tuple(got) == expected(QUESTION)


@trio_test(60)
async def test_cancellation_aborts_a_long_prefill() -> None:
    device = endpoint()
    engine = shared_engine()
    engine.clear_cache()
    prompt_tokens = len(engine.tokenize(LONG.prompt or "", add_special=True))
    assert prompt_tokens > 10 * 64
    async with trio.open_nursery() as nursery:
        cancelled = trio.CancelScope()

        async def ask() -> None:
            with cancelled:
                await device.generate(LONG, lambda _: pytest.fail("no token expected"))

        nursery.start_soon(ask)
        while engine.cached_tokens == 0:  # wait until the prefill is under way
            await trio.sleep(0.002)
        at_cancel = engine.cached_tokens
        cancelled.cancel()
    record = device.cost.last
    assert record is not None and record.finish_reason == "cancelled" and record.decoded_tokens == 0
    # The chunk in flight is abandoned: at most one more finished after we looked.
    assert at_cancel <= record.prefilled_tokens <= at_cancel + 64 < prompt_tokens
    assert not device.busy
    got: list[TokenPiece] = []
    await device.generate(QUESTION, got.append)
    assert tuple(got) == expected(QUESTION)


@trio_test(30)
async def test_a_failing_sink_raises_its_own_exception_and_the_actor_stays_usable() -> None:
    device = endpoint()

    def sink(piece: TokenPiece) -> None:
        if piece.position == 2:
            raise ValueError("sink is full")

    with pytest.raises(ValueError, match="sink is full"):
        await device.generate(QUESTION, sink)
    assert not device.busy
    got: list[TokenPiece] = []
    await device.generate(QUESTION, got.append)
    assert tuple(got) == expected(QUESTION)


@trio_test(30)
async def test_bad_input_fails_before_any_work_and_the_actor_stays_usable() -> None:
    device = endpoint()
    with pytest.raises(PromptTooLongError):
        await device.generate(GenerationRequest(prompt="word " * 3000), lambda _: None)
    with pytest.raises(ConfigurationError):
        await device.generate(chat("Hi", stop=("",)), lambda _: None)
    with pytest.raises(ConfigurationError):
        await device.prepare(chat("Hi", resume_token_ids=(-1,)))
    assert device.cost.totals().answers == 0  # nothing ran
    got: list[TokenPiece] = []
    await device.generate(QUESTION, got.append)
    assert tuple(got) == expected(QUESTION)


@trio_test(60)
async def test_concurrent_requests_take_turns() -> None:
    device = endpoint()
    other = chat("What is the capital of France?", max_tokens=8)
    results: dict[str, list[TokenPiece]] = {"a": [], "b": []}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(device.generate, QUESTION, results["a"].append)
        nursery.start_soon(device.generate, other, results["b"].append)
    assert tuple(results["a"]) == expected(QUESTION)
    assert tuple(results["b"]) == expected(other)


@trio_test(60)
async def test_answers_ahead_counts_the_running_and_the_queued() -> None:
    device = endpoint()
    assert device.answers_ahead == 0
    first_token, counts = trio.Event(), []

    def sink(piece: TokenPiece) -> None:
        counts.append(device.answers_ahead)
        first_token.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(device.generate, chat("Count from one to ten.", max_tokens=24), sink)
        await first_token.wait()
        nursery.start_soon(device.generate, chat("Say hi.", max_tokens=2), lambda piece: None)
    assert counts[0] == 1 and 2 in counts  # itself, then itself and the one queued behind it
    assert device.answers_ahead == 0


@trio_test(30)
async def test_prepare_makes_a_migration_target_ready() -> None:
    device = endpoint()
    answer = expected(QUESTION)  # may generate, filling the cache: clear it after
    shared_engine().clear_cache()
    takeover = chat("Name three rivers in Europe.", max_tokens=20, resume_token_ids=tuple(p.token_id for p in answer[:8]))
    computed = await device.prepare(takeover)
    assert computed > 8 and device.cost.last is not None and device.cost.last.finish_reason == "prepared"
    got: list[TokenPiece] = []
    result = await device.generate(takeover, got.append)
    assert result.prefilled_tokens == 0
    assert tuple(got) == answer[8:]


@trio_test(30)
async def test_open_device_endpoint_loads_and_frees_the_model(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelError):
        async with open_device_endpoint(tmp_path / "nope.gguf"):
            pass  # pragma: no cover
    async with open_device_endpoint(n_threads=1, n_ctx=256) as device:
        got: list[TokenPiece] = []
        await device.generate(chat("Say hi.", max_tokens=3), got.append)
        assert len(got) == 3 and device.model_id == shared_engine().model_id
    with pytest.raises(RuntimeError, match="closed"):
        device.engine.validate(chat("Hi"))
