"""The budget guard under concurrency: answers in flight reserve their worst case, so answers
started together cannot each see the same ledger and overshoot the budget between them."""

from __future__ import annotations

import dataclasses

import trio
import trio.testing

from pydisco import Budget, RuntimeConfig, Slo, open_runtime
from pydisco.policies import create_dispatch_policy
from pydisco.policies._base import DeviceSpeed, DispatchView
from pydisco.testing import ScriptedEndpoint

from test_new_user_fixes import pieces

PROMPT, ANSWER = 100, 4  # each answer's worst case: 104 tokens
# One at a time, the guard lets the cloud race every other answer (at a cold start nothing has
# been done, so it may not): device, cloud, device, cloud, device: C = 208 of T = 520 tokens.
WARM_UP = 5


def endpoints() -> dict[str, ScriptedEndpoint]:
    # The cloud wins every race: its answer is the whole worst case on the budgeted endpoint.
    return {
        "cloud": ScriptedEndpoint("cloud", pieces("cloud", ANSWER), prompt_tokens=PROMPT, prefill_s=0.01),
        "device": ScriptedEndpoint("device", pieces("device", ANSWER), prompt_tokens=PROMPT, prefill_s=0.5),
    }


async def cloud_share_after_a_burst(together: int) -> tuple[float, list[tuple[str, ...]]]:
    config = RuntimeConfig(
        device_model=None, virtual_time=True, dispatch="race-both", migration="never", device_standby=False,
        budget=Budget("cloud", 0.5), slo=Slo(ttft_target_s=1.0, reading_rate=1000.0),
    )  # fmt: skip
    used: list[tuple[str, ...]] = []

    async def one() -> None:
        async with rt.stream(prompt="hi", max_tokens=ANSWER) as answer:
            async for _ in answer:
                pass
        used.append(answer.report.endpoints_used)

    async with open_runtime(config, endpoints=endpoints()) as rt:
        for _ in range(WARM_UP):
            await one()
        async with trio.open_nursery() as nursery:
            for _ in range(together):
                nursery.start_soon(one)
        return rt.statistics().budget_share_spent, used


def test_answers_started_together_stay_within_the_budget() -> None:
    share, used = trio.run(cloud_share_after_a_burst, 6, clock=trio.testing.MockClock(autojump_threshold=0))
    assert used[:WARM_UP] == [("device",), ("cloud",)] * 2 + [("device",)]
    # Room for one more worst case: 208 + 104 <= 0.5·(520 + 104). Without reservations all six
    # would race (each sees the same ledger) and the cloud would end at 832 of 1144 tokens.
    assert sum(u == ("cloud",) for u in used[WARM_UP:]) == 1
    assert share <= 0.5


def test_a_view_without_answers_in_flight_decides_as_before() -> None:
    policy = create_dispatch_policy("race-both")
    policy.ledger.total = 416  # type: ignore[attr-defined]  # four answers' work, none on the cloud
    view = DispatchView(
        prompt_tokens=PROMPT, max_tokens=ANSWER, slo=Slo(), budget=Budget("cloud", 0.5), device=None,
        cloud_available=True, server_ttft_samples_s=(), server_tbt_s=None, tokens_spent={},
    )  # fmt: skip
    assert policy.decide(view).start == ("cloud",)  # no device in this view: nothing to guard
    with_device = dataclasses.replace(view, device=DeviceSpeed(0.02, 0.001, 0.01))
    assert set(policy.decide(with_device).start) == {"device", "cloud"}
    crowded = dataclasses.replace(with_device, tokens_in_flight={"cloud": 4 * 104})
    assert policy.decide(crowded).start == ("device",)
