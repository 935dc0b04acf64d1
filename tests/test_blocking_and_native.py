"""The blocking (thread) API and the C++ consumer path, for control loops that are not async."""

from __future__ import annotations

import time

import pytest
import trio

import pydisco
from pydisco import AnswerFailed, BlockingRuntime, NativeCollector, RuntimeConfig, open_runtime
from pydisco._types import TokenPiece
from pydisco.policies._base import Slo
from pydisco.testing import ScriptedEndpoint

ANSWER = [TokenPiece(position=i, token_id=i, text=f"t{i} ") for i in range(15)]
FAST = Slo(ttft_target_s=1.0, reading_rate=200.0)


def scripted(**cloud: object) -> dict[str, ScriptedEndpoint]:
    return {
        "device": ScriptedEndpoint("device", ANSWER, prefill_s=0.05, gaps_s=[0.002]),
        "cloud": ScriptedEndpoint("cloud", ANSWER, prefill_s=0.01, gaps_s=[0.002], **cloud),  # type: ignore[arg-type]
    }


def test_blocking_runtime_streams_in_the_callers_thread() -> None:
    config = RuntimeConfig(device_model=None, dispatch="cloud-only", migration="never", slo=FAST)
    with BlockingRuntime(config, endpoints=scripted()) as rt:
        answer = rt.stream(prompt="hi", max_tokens=15)
        pieces = list(answer)
        second = list(rt.stream(prompt="again", max_tokens=5))  # the runtime serves more answers
    assert [p.text for p in pieces] == [a.text for a in ANSWER]
    assert [p.position for p in second] == list(range(5))
    report = answer.report
    assert report.tokens == 15 and report.ttft_s is not None and len(report.tbt_s) == 14
    assert report.endpoints_used == ("cloud",)


def test_blocking_runtime_fails_over_and_raises_only_when_nothing_can_continue() -> None:
    config = RuntimeConfig(device_model=None, dispatch="cloud-only", migration="never", slo=FAST)
    with BlockingRuntime(config, endpoints=scripted(fails_after=4)) as rt:
        answer = rt.stream(prompt="hi", max_tokens=15)
        assert "".join(p.text for p in answer) == "".join(a.text for a in ANSWER)
        assert [m.kind for m in answer.report.migrations] == ["failover"]
    broken = {"cloud": ScriptedEndpoint("cloud", ANSWER, fails_after=3)}
    with BlockingRuntime(config, endpoints=broken) as rt:
        got: list[str] = []
        with pytest.raises(AnswerFailed):
            for piece in rt.stream(prompt="hi", max_tokens=15):
                got.append(piece.text)
        assert got == [a.text for a in ANSWER[:3]]  # what was committed was delivered


def test_closing_a_blocking_answer_early_cancels_it() -> None:
    slow = {"cloud": ScriptedEndpoint("cloud", ANSWER, prefill_s=0.01, gaps_s=[0.5])}
    config = RuntimeConfig(device_model=None, dispatch="cloud-only", migration="never", slo=FAST)
    with BlockingRuntime(config, endpoints=slow) as rt:
        answer = rt.stream(prompt="hi", max_tokens=15)
        first = next(iter(answer))
        started = time.monotonic()
        answer.close()
        assert time.monotonic() - started < 5.0  # not the ~7 s the rest would take
    assert first.position == 0
    assert answer.report.finish_reason == "cancelled"


def test_a_native_consumer_takes_a_runtime_answer_without_python() -> None:
    config = RuntimeConfig(device_model=None, dispatch="race-both", migration="never", slo=FAST)

    async def main() -> tuple[list[pydisco.Token], list[int]]:
        async with open_runtime(config, endpoints=scripted()) as rt:
            async with rt.stream(prompt="hi", max_tokens=15) as answer:
                collector = NativeCollector(answer.released_ring)
                with trio.fail_after(30):
                    while not collector.finished:  # it has taken the answer's end record
                        await trio.sleep(0.01)
                collector.stop()
        return collector.tokens(), collector.received_ns()

    tokens, received = trio.run(main)
    *pieces, end = tokens
    assert [t.text for t in pieces] == [a.text for a in ANSWER]
    # 15 tokens of 15 allowed: the machine ends it at max_tokens, whatever the script says next.
    assert end.is_end and end.finish_reason == pydisco.FinishReason.LENGTH and end.position == len(ANSWER)
    assert all(r >= t.released_ns for t, r in zip(tokens, received))


@pytest.mark.model
def test_blocking_runtime_on_the_real_model_matches_the_async_runtime() -> None:
    config = RuntimeConfig(dispatch="device-only", migration="never", device_threads=1, pace=False)
    question = [{"role": "user", "content": "Name a planet."}]

    async def async_text() -> str:
        async with open_runtime(config) as rt:
            async with rt.stream(question, max_tokens=16) as answer:
                return "".join([p.text async for p in answer])

    expected = trio.run(async_text)
    with BlockingRuntime(config) as rt:
        text = "".join(p.text for p in rt.stream(question, max_tokens=16))
    assert text == expected and text
