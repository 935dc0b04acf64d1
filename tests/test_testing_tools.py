"""pydisco.testing as a user's property tests meet it: the strategies draw what they say without
throwing examples away, a timeline becomes a scripted endpoint that keeps it, and a scripted
failure is counted per answer."""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.internal.observability import with_observability_callback

from pydisco import RuntimeConfig, Slo, TokenPiece, open_runtime
from pydisco._core import TOKEN_TEXT_CAPACITY
from pydisco._errors import EndpointUnavailable
from pydisco._types import GenerationRequest
from pydisco.testing import EndpointTimeline, ScriptedEndpoint, endpoint_timelines, token_texts

T = TypeVar("T")


def pieces(name: str, n: int) -> list[TokenPiece]:
    return [TokenPiece(position=i, token_id=i, text=f"{name[0]}{i} ") for i in range(n)]


def run_virtual(fn: Callable[[], Awaitable[T]]) -> T:
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


# -- token_texts -----------------------------------------------------------------------------


@pytest.mark.parametrize("max_bytes", [1, 4, 16, TOKEN_TEXT_CAPACITY])
def test_token_texts_throws_no_example_away(max_bytes: int) -> None:
    """Every test case Hypothesis runs is a valid one: none abandoned by a filter (with the old
    ``.filter`` on the byte length, 2-15 % were, depending on the budget)."""
    statuses: collections.Counter[str] = collections.Counter()
    drawn: list[str] = []

    def observe(observation: Any) -> None:
        if observation.type == "test_case":
            statuses[observation.status] += 1

    @settings(max_examples=300, database=None, derandomize=True)
    @given(token_texts(max_bytes))
    def check(text: str) -> None:
        assert len(text.encode()) <= max_bytes
        drawn.append(text)

    with with_observability_callback(observe):
        check()
    assert statuses["passed"] >= 100
    assert statuses["gave_up"] == 0, statuses
    # What it draws still has every UTF-8 width that fits in the budget.
    widths = {len(c.encode()) for text in drawn for c in text}
    assert widths == set(range(1, min(4, max_bytes) + 1)), widths


def test_token_texts_refuses_a_budget_the_ring_cannot_hold() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        token_texts(TOKEN_TEXT_CAPACITY + 1)


# -- ScriptedEndpoint.from_timeline ----------------------------------------------------------


async def arrival_offsets(endpoint: ScriptedEndpoint, request: GenerationRequest) -> list[float]:
    start = trio.current_time()
    times: list[float] = []
    await endpoint.generate(request, lambda piece: times.append(trio.current_time() - start))
    return times


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12).flatmap(lambda n: st.tuples(st.just(n), endpoint_timelines(n, ("cloud",), failure_probability=0.0))))
def test_a_scripted_endpoint_from_a_timeline_delivers_at_its_arrival_times(drawn: tuple[int, list[EndpointTimeline]]) -> None:
    n, (timeline,) = drawn
    endpoint = ScriptedEndpoint.from_timeline(timeline, pieces("cloud", n))
    request = GenerationRequest(prompt="hi", max_tokens=n, request_id="a")
    got = run_virtual(lambda: arrival_offsets(endpoint, request))
    assert endpoint.name == "cloud"
    assert got == pytest.approx(list(timeline.arrivals_s), abs=1e-9)


def test_a_resumed_run_waits_the_first_token_time_then_keeps_the_timelines_gaps() -> None:
    timeline = EndpointTimeline("device", (0.2, 0.25, 0.45, 0.5), fails_after=None)
    endpoint = ScriptedEndpoint.from_timeline(timeline, pieces("device", 4))
    request = GenerationRequest(prompt="hi", max_tokens=4, resume_token_ids=(0, 1), request_id="a")
    assert run_virtual(lambda: arrival_offsets(endpoint, request)) == pytest.approx([0.2, 0.25], abs=1e-9)


def test_a_timelines_failure_fails_the_first_run_of_each_answer() -> None:
    timeline = EndpointTimeline("cloud", (0.1, 0.2, 0.3), fails_after=1)
    endpoint = ScriptedEndpoint.from_timeline(timeline, pieces("cloud", 3))

    async def main() -> list[str]:
        outcomes = []
        for request_id, start in (("a", ()), ("a", (0,)), ("b", ())):
            request = GenerationRequest(prompt="hi", max_tokens=3, resume_token_ids=start, request_id=request_id)
            try:
                await endpoint.generate(request, lambda piece: None)
                outcomes.append("finished")
            except EndpointUnavailable:
                outcomes.append("failed")
        return outcomes

    assert run_virtual(main) == ["failed", "finished", "failed"]


@pytest.mark.parametrize(
    ("arrivals", "n", "message"),
    [((0.1, 0.2), 3, "2 arrivals for an answer of 3"), ((0.2, 0.1), 2, "non-decreasing"), ((-0.1, 0.1), 2, ">= 0")],
)
def test_a_timeline_that_cannot_script_the_answer_is_refused(arrivals: tuple[float, ...], n: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScriptedEndpoint.from_timeline(EndpointTimeline("cloud", arrivals, None), pieces("cloud", n))


def test_gaps_are_waited_between_token_i_and_token_i_plus_1() -> None:
    """The docstring's contract: ``gaps_s[i]`` separates token i from token i+1 (cycled)."""
    endpoint = ScriptedEndpoint("cloud", pieces("cloud", 5), prefill_s=1.0, gaps_s=[0.1, 0.3])
    request = GenerationRequest(prompt="hi", max_tokens=5, request_id="a")
    assert run_virtual(lambda: arrival_offsets(endpoint, request)) == pytest.approx([1.0, 1.1, 1.4, 1.5, 1.8], abs=1e-9)


# -- fails_on_run / fails_on_answer ----------------------------------------------------------


def virtual_config(**kw: object) -> RuntimeConfig:
    settings_: dict[str, object] = dict(
        device_model=None, virtual_time=True, migration="never", device_standby=False,
        slo=Slo(ttft_target_s=1.0, reading_rate=50.0), silence_timeout_s=0.5,
    )  # fmt: skip
    settings_.update(kw)
    return RuntimeConfig(**settings_)  # type: ignore[arg-type]


async def endpoints_used(endpoints: dict[str, ScriptedEndpoint], answers: int) -> list[tuple[str, ...]]:
    used = []
    async with open_runtime(virtual_config(dispatch="cloud-only"), endpoints=endpoints) as rt:
        for _ in range(answers):
            async with rt.stream(prompt="hi", max_tokens=6) as answer:
                async for _piece in answer:
                    pass
            assert answer.report.finish_reason == "length"
            used.append(answer.report.endpoints_used)
            await trio.sleep(60)  # past the cloud's health backoff after a failure
    return used


def test_fails_on_run_counts_the_runs_of_each_answer() -> None:
    """``fails_on_run=0`` (the default) fails the first run of every answer, not only the
    endpoint's first run ever: each answer fails over to the device."""
    endpoints = {
        "device": ScriptedEndpoint("device", pieces("device", 6), prefill_s=0.1),
        "cloud": ScriptedEndpoint("cloud", pieces("cloud", 6), prefill_s=0.05, fails_after=2),
    }
    assert run_virtual(lambda: endpoints_used(endpoints, 3)) == [("cloud", "device")] * 3


def test_fails_on_answer_picks_the_answer_whose_runs_fail() -> None:
    endpoints = {
        "device": ScriptedEndpoint("device", pieces("device", 6), prefill_s=0.1),
        "cloud": ScriptedEndpoint("cloud", pieces("cloud", 6), prefill_s=0.05, fails_after=2, fails_on_answer=1),
    }
    assert run_virtual(lambda: endpoints_used(endpoints, 3)) == [("cloud",), ("cloud", "device"), ("cloud",)]


def test_fails_on_run_1_fails_the_second_run_of_each_answer() -> None:
    """Run 1 of an answer is its second ``generate`` call here (a resume after a failover)."""
    endpoint = ScriptedEndpoint("cloud", pieces("cloud", 3), fails_after=1, fails_on_run=1)

    async def main() -> list[str]:
        outcomes = []
        for request_id in ("a", "a", "a", "b", "b"):
            try:
                await endpoint.generate(GenerationRequest(prompt="hi", max_tokens=3, request_id=request_id), lambda piece: None)
                outcomes.append(f"{request_id} finished")
            except EndpointUnavailable:
                outcomes.append(f"{request_id} failed")
        return outcomes

    assert run_virtual(main) == ["a finished", "a failed", "a finished", "b finished", "b failed"]
