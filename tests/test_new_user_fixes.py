"""Small things a new user ran into (issue 12's "property-testing users"), each with a test that
failed before its fix."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from pydisco import Endpoint, RuntimeConfig, Slo, TokenPiece, open_runtime
from pydisco._errors import EndpointUnavailable
from pydisco import GenerationRequest, GenerationResult, TokenSink, notify_prefilled
from pydisco.runtime import AnswerStatus
from pydisco.testing import ScriptedEndpoint


def pieces(name: str, n: int) -> list[TokenPiece]:
    return [TokenPiece(position=i, token_id=i, text=f"{name[0]}{i} ") for i in range(n)]


def virtual_config(**kw: object) -> RuntimeConfig:
    settings: dict[str, object] = dict(device_model=None, virtual_time=True, slo=Slo(ttft_target_s=1.0, reading_rate=50.0))
    settings.update(kw)
    return RuntimeConfig(**settings)  # type: ignore[arg-type]


def test_status_after_the_whole_answer_was_read_counts_no_end_record() -> None:
    async def main() -> AnswerStatus:
        endpoints = {"device": ScriptedEndpoint("device", pieces("device", 6))}
        async with open_runtime(virtual_config(dispatch="device-only"), endpoints=endpoints) as rt:
            async with rt.stream(prompt="hi", max_tokens=6) as answer:
                async for _ in answer:
                    pass
                return answer.status()

    after = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert (after.committed, after.consumed, after.unread) == (6, 6, 0)  # was consumed 7, unread -1


# -- a failed run's prefill counts in usage and cost -----------------------------------------


async def usage_after_a_cloud_failure(cloud: Endpoint, **config: object) -> dict[str, tuple[int, float]]:
    endpoints = {"cloud": cloud, "device": ScriptedEndpoint("device", pieces("device", 4), prompt_tokens=100)}
    settings = dict(dispatch="cloud-only", migration="never", device_standby=False, first_token_timeout_s=1.0)
    settings.update(config)
    async with open_runtime(virtual_config(**settings), endpoints=endpoints) as rt:
        async with rt.stream(prompt="hi", max_tokens=4) as answer:
            async for _ in answer:
                pass
    assert answer.report.endpoints_used == ("device",)  # the cloud failed before its first token
    return {name: (u.prefilled_tokens, u.cost) for name, u in answer.report.usage.items()}


def test_a_failed_runs_prefill_is_in_usage_and_cost() -> None:
    """The cloud prefilled 100 tokens, then failed before its first token: they count (cost
    1.0 a token), as the device's 100 (0.2 a token) do. Before, the cloud showed 0."""
    cloud = ScriptedEndpoint("cloud", pieces("cloud", 4), prompt_tokens=100, fails_after=0)
    usage = trio.run(usage_after_a_cloud_failure, cloud, clock=trio.testing.MockClock(autojump_threshold=0))
    assert usage["cloud"] == (100, 100.0)
    assert usage["device"] == (100, pytest.approx(0.2 * (100 + 4)))


class SilentCloud:
    """Takes the request and never answers (a server stuck in its prefill)."""

    name = "cloud"

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


class RefusingCloud:
    """Raises at once, before any work (a refused connection), and says nothing."""

    name = "cloud"

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        raise EndpointUnavailable("connection refused")


class FailingAfterItsPrefill(RefusingCloud):
    """Says what its prefill computed, then fails."""

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        notify_prefilled(sink, 37)
        raise EndpointUnavailable("lost the link")


def test_a_run_that_timed_out_is_charged_what_it_was_asked_to_prefill() -> None:
    usage = trio.run(usage_after_a_cloud_failure, SilentCloud(), clock=trio.testing.MockClock(autojump_threshold=0))
    assert usage["cloud"][0] == 100  # the prompt as the policies count it (the device's count)


def test_a_run_that_raised_before_any_work_is_charged_what_it_said() -> None:
    refused = trio.run(usage_after_a_cloud_failure, RefusingCloud(), clock=trio.testing.MockClock(autojump_threshold=0))
    reported = trio.run(usage_after_a_cloud_failure, FailingAfterItsPrefill(), clock=trio.testing.MockClock(autojump_threshold=0))
    assert refused["cloud"] == (0, 0.0)
    assert reported["cloud"] == (37, 37.0)


# -- what a new user's first tries ran into, held in place -----------------------------------


def test_the_policies_see_a_scripted_endpoints_prompt_count_without_a_device() -> None:
    """With no device engine, the prompt length in the DispatchView is the endpoint's count
    (ScriptedEndpoint(prompt_tokens=...)), not the text's length / 4."""
    from pydisco.policies import DispatchDecision, DispatchView, create_dispatch_policy, register_dispatch_policy

    seen: list[tuple[int, int]] = []

    class Recording:
        name = "recording-cloud-only"

        def decide(self, view: DispatchView) -> DispatchDecision:
            seen.append((view.prompt_tokens, view.device_prefill_tokens))
            return create_dispatch_policy("cloud-only").decide(view)

        def observe(self, outcome: object) -> None:
            pass

    register_dispatch_policy("recording-cloud-only", Recording, replace=True)

    async def main() -> None:
        endpoints = {"cloud": ScriptedEndpoint("cloud", pieces("cloud", 3), prompt_tokens=321)}
        async with open_runtime(virtual_config(dispatch="recording-cloud-only"), endpoints=endpoints) as rt:
            async with rt.stream(prompt="a short prompt", max_tokens=3) as answer:
                async for _ in answer:
                    pass

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert seen == [(321, 321)]


def test_every_runtime_config_field_is_documented() -> None:
    import dataclasses
    import pathlib
    import re

    page = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "embedding.md").read_text()
    section = page[page.index("## Configuration (`RuntimeConfig`)") :]
    rows = [line for line in section[section.index("| field |") :].split("\n\n")[0].splitlines()[2:]]
    documented = {name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    fields = {f.name for f in dataclasses.fields(RuntimeConfig)}
    assert fields <= documented, f"undocumented RuntimeConfig fields: {sorted(fields - documented)}"
    assert documented <= fields, f"documented fields RuntimeConfig lacks: {sorted(documented - fields)}"


def test_a_blocking_answers_report_says_running_while_it_runs() -> None:
    """Read early, the report says "running", not "cancelled"; once closed early, "cancelled"."""
    import threading

    from pydisco import BlockingRuntime

    release = threading.Event()

    class Held(ScriptedEndpoint):
        async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
            await trio.to_thread.run_sync(release.wait)
            return await super().generate(request, sink)

    config = RuntimeConfig(device_model=None, dispatch="cloud-only", realtime_pacer=False)
    with BlockingRuntime(config, endpoints={"cloud": Held("cloud", pieces("cloud", 3))}) as rt:
        answer = rt.stream(prompt="hi", max_tokens=3)
        early = answer.report
        release.set()
        answer.close()
    assert (early.finish_reason, early.tokens) == ("running", 0)
    assert answer.report.finish_reason == "cancelled"


def test_blocking_stream_takes_exactly_the_async_streams_arguments() -> None:
    """Explicit, typed keywords (a typo is a TypeError at the call), the same as Runtime.stream."""
    import inspect

    from pydisco import BlockingRuntime, Runtime

    def parameters(fn: object) -> list[tuple[str, object, object, object]]:
        signature = inspect.signature(fn)  # type: ignore[arg-type]
        return [(p.name, p.kind, p.default, p.annotation) for p in signature.parameters.values() if p.name != "self"]

    assert parameters(BlockingRuntime.stream) == parameters(Runtime.stream.__wrapped__)  # type: ignore[attr-defined]
    assert all(kind is not inspect.Parameter.VAR_KEYWORD for _, kind, _, _ in parameters(BlockingRuntime.stream))


def test_the_one_percentile_helper_interpolates_as_statistics_and_numpy_do() -> None:
    import math
    import random

    import numpy

    from pydisco._percentiles import percentile

    rng = random.Random(3)
    for n in (1, 2, 3, 10, 101):
        values = [rng.expovariate(1.0) for _ in range(n)]
        for p in (0, 1, 50, 90, 99, 100):
            assert percentile(values, p) == pytest.approx(float(numpy.percentile(values, p)), rel=1e-12)
    assert math.isnan(percentile([], 50))
    for bad in (-1, 101, 0.5):
        with pytest.raises(ValueError, match="whole number"):
            percentile([1.0], bad)  # type: ignore[arg-type]
