"""RuntimeConfig.device_max_batch: the runtime's device answers several requests at once on one
model (the batched engine and its step loop), and the answer's Slo reaches the step scheduler."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from pydisco import ConfigurationError, GenerationRequest, GenerationResult, RuntimeConfig, Slo, TokenPiece, TokenSink, open_runtime
from pydisco.device import BatchedDeviceEndpoint, open_batched_device_endpoint
from pydisco.testing import ScriptedEndpoint

from device_support import trio_test

QUESTIONS = ("Name a colour.", "Name a fruit.", "Name an animal.")


@pytest.mark.model
@trio_test(300)
async def test_a_batched_device_answers_three_requests_at_once() -> None:
    config = RuntimeConfig(device_max_batch=4, device_threads=2, dispatch="device-only", pace=False)
    spans: list[tuple[float, float, int, str]] = []

    async def ask(question: str) -> None:
        async with rt.stream([{"role": "user", "content": question}], max_tokens=12) as answer:
            first = last = None
            async for _ in answer:
                now = trio.current_time()
                first = now if first is None else first
                last = now
        assert first is not None and last is not None
        spans.append((first, last, answer.report.tokens, answer.report.finish_reason))

    async with open_runtime(config) as rt:
        device = rt.endpoints["device"]
        assert isinstance(device, BatchedDeviceEndpoint)  # the batched engine, not the solo one
        async with trio.open_nursery() as nursery:
            for q in QUESTIONS:
                nursery.start_soon(ask, q)
        stats = device.statistics()
    assert len(spans) == 3 and all(tokens > 0 and reason in ("stop", "length") for _, _, tokens, reason in spans)
    # Batched, not in turn: every answer had its first token before any other had finished.
    assert max(first for first, *_ in spans) < min(last for _, last, *_ in spans)
    assert stats.tokens > stats.steps  # steps decoded several answers at once


@pytest.mark.model
@trio_test(300)
async def test_a_real_time_answer_slice_cannot_start_in_time_goes_to_the_cloud_at_once() -> None:
    """SLICE rejects a real-time task whose first token cannot come within its TTFT even with
    the engine to itself (rather than deferring it until too late), and the runtime fails it
    over: the cloud answers it, whole, and the device counts one rejection."""
    cloud_answer = [TokenPiece(i, i, f"c{i} ") for i in range(6)]
    cloud = ScriptedEndpoint("cloud", cloud_answer, prefill_s=0.01, gaps_s=[0.001])
    urgent = Slo(ttft_target_s=1e-6, reading_rate=20.0, realtime=True)  # no prompt prefills in a microsecond
    async with open_batched_device_endpoint(scheduler="slice", max_batch=2, n_ctx=1024, n_threads=1) as device:
        config = RuntimeConfig(device_model=None, dispatch="device-only", migration="never", pace=False)
        async with open_runtime(config, endpoints={"device": device, "cloud": cloud}) as rt:
            async with rt.stream(prompt="Steer left around the box. " * 8, max_tokens=6, slo=urgent) as answer:
                text = "".join([piece.text async for piece in answer])
        rejected = device.statistics().rejected
    assert text == "".join(p.text for p in cloud_answer)
    assert answer.report.endpoints_used == ("cloud",)
    assert [m.kind for m in answer.report.migrations] == ["failover"]
    assert rejected == 1


class SloRecorder:
    """A device that records the Slo its sink carries (what a step scheduler is given)."""

    name = "device"

    def __init__(self) -> None:
        self.seen: list[Slo | None] = []

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        self.seen.append(getattr(sink, "slo", None))
        return GenerationResult("stop", 4, 4, 0)


def test_the_answers_slo_reaches_the_device_through_its_sink() -> None:
    recorder = SloRecorder()
    control = Slo(ttft_target_s=0.2, reading_rate=20.0, realtime=True)

    async def main() -> None:
        config = RuntimeConfig(device_model=None, virtual_time=True, dispatch="device-only")
        async with open_runtime(config, endpoints={"device": recorder}) as rt:
            async with rt.stream(prompt="steer", max_tokens=4, slo=control) as answer:
                async for _ in answer:
                    pass

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert recorder.seen == [control]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("device_max_batch", 0, "device_max_batch"), ("device_scheduler", "lifo", "unknown device_scheduler"),
     ("device_context", 4, "device_context")],
)  # fmt: skip
def test_bad_device_settings_are_one_configuration_error(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RuntimeConfig(**{field: value})  # type: ignore[arg-type]
