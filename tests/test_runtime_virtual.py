"""The runtime in virtual time (MockClock) with scripted endpoints: whatever the timings and
failures, the reader gets the answer with no gap and no repeat, or — only when every endpoint
fails — a clear AnswerFailed after an intact prefix."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import pydisco
from pydisco import RuntimeConfig, open_runtime
from pydisco.runtime import AnswerFailed
from pydisco._types import TokenPiece
from pydisco.policies._base import Slo
from pydisco.testing import ScriptedEndpoint


def make_answer(n: int) -> list[TokenPiece]:
    return [TokenPiece(position=i, token_id=100 + i, text=f"w{i} ") for i in range(n)]


def run_virtual(fn):  # type: ignore[no-untyped-def]
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def config(**kw: object) -> RuntimeConfig:
    base: dict[str, object] = dict(
        device_model=None,
        virtual_time=True,
        slo=Slo(ttft_target_s=1.0, reading_rate=50.0),
        silence_timeout_s=0.5,
        first_token_timeout_s=2.0,
    )
    base.update(kw)
    return RuntimeConfig(**base)  # type: ignore[arg-type]


async def read_all(rt: pydisco.Runtime, max_tokens: int) -> tuple[list[pydisco.Piece], pydisco.AnswerReport, BaseException | None]:
    pieces: list[pydisco.Piece] = []
    error: BaseException | None = None
    async with rt.stream(prompt="hello", max_tokens=max_tokens) as answer:
        try:
            async for piece in answer:
                pieces.append(piece)
        except AnswerFailed as e:
            error = e
    return pieces, answer.report, error


timings = st.fixed_dictionaries(
    {
        "prefill_s": st.floats(0.001, 0.5),
        "gaps_s": st.lists(st.floats(0.001, 0.08), min_size=1, max_size=4),
        "fails_after": st.none() | st.integers(0, 12),
    }
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 24),
    device=timings,
    cloud=timings,
    dispatch=st.sampled_from(["race-both", "cloud-only", "device-only"]),
    migration=st.sampled_from(["disco-migrate", "never"]),
)
def test_no_gap_no_repeat_whatever_the_timing_and_failures(
    n: int, device: dict, cloud: dict, dispatch: str, migration: str  # type: ignore[type-arg]
) -> None:
    answer = make_answer(n)
    endpoints = {
        "device": ScriptedEndpoint("device", answer, **device),
        "cloud": ScriptedEndpoint("cloud", answer, **cloud),
    }

    async def main() -> tuple[list[pydisco.Piece], pydisco.AnswerReport, BaseException | None]:
        async with open_runtime(config(dispatch=dispatch, migration=migration), endpoints=endpoints) as rt:
            with trio.fail_after(600):  # virtual seconds
                return await read_all(rt, max_tokens=n)

    pieces, report, error = run_virtual(main)
    event(f"{dispatch}, {migration}: " + (", ".join(m.kind for m in report.migrations) or "no handover"))
    event("failed" if error else "finished")
    assert [p.position for p in pieces] == list(range(len(pieces)))  # no gap, no repeat
    assert [p.text for p in pieces] == [a.text for a in answer[: len(pieces)]]
    assert report.text == "".join(p.text for p in pieces)
    if error is None:
        assert len(pieces) == n and report.finish_reason in ("stop", "length")
    else:
        # Only when both endpoints were scripted to fail can the answer fail.
        assert device["fails_after"] is not None and cloud["fails_after"] is not None
        assert report.finish_reason == "failed"


def test_failover_when_the_cloud_dies_mid_answer() -> None:
    answer = make_answer(20)
    endpoints = {
        "device": ScriptedEndpoint("device", answer, prefill_s=0.3, gaps_s=[0.01]),
        "cloud": ScriptedEndpoint("cloud", answer, prefill_s=0.05, gaps_s=[0.01], fails_after=6),
    }

    async def main() -> tuple[list[pydisco.Piece], pydisco.AnswerReport, BaseException | None]:
        async with open_runtime(config(dispatch="cloud-only", migration="never"), endpoints=endpoints) as rt:
            return await read_all(rt, max_tokens=20)

    pieces, report, error = run_virtual(main)
    assert error is None
    assert "".join(p.text for p in pieces) == "".join(a.text for a in answer)
    assert [p.endpoint for p in pieces[:6]] == ["cloud"] * 6
    assert {p.endpoint for p in pieces[6:]} == {"device"}
    assert [(m.kind, m.source, m.target, m.handover_position) for m in report.migrations] == [
        ("failover", "cloud", "device", 6)
    ]
    # the device's catch-up prefill (0.3 s) is the gap the reader sees
    assert report.migrations[0].gap_s == pytest.approx(0.3, abs=0.02)


def test_a_silent_cloud_is_failed_over_after_the_silence_timeout() -> None:
    answer = make_answer(12)
    endpoints = {
        "device": ScriptedEndpoint("device", answer, prefill_s=0.05, gaps_s=[0.01]),
        # a 5 s stall after 4 tokens: longer than the 0.5 s silence timeout
        "cloud": ScriptedEndpoint("cloud", answer, prefill_s=0.02, gaps_s=[0.01, 0.01, 0.01, 5.0]),
    }

    async def main() -> tuple[list[pydisco.Piece], pydisco.AnswerReport, BaseException | None]:
        async with open_runtime(config(dispatch="cloud-only", migration="never"), endpoints=endpoints) as rt:
            return await read_all(rt, max_tokens=12)

    pieces, report, error = run_virtual(main)
    assert error is None and len(pieces) == 12
    assert report.migrations and report.migrations[0].kind == "failover"
    assert report.migrations[0].handover_position == 4


def test_the_answer_fails_clearly_when_every_endpoint_fails() -> None:
    answer = make_answer(10)
    endpoints = {
        "device": ScriptedEndpoint("device", answer, fails_after=2),
        "cloud": ScriptedEndpoint("cloud", answer, fails_after=3),
    }

    async def main() -> tuple[list[pydisco.Piece], pydisco.AnswerReport, BaseException | None]:
        async with open_runtime(config(dispatch="cloud-only", migration="never"), endpoints=endpoints) as rt:
            return await read_all(rt, max_tokens=10)

    pieces, report, error = run_virtual(main)
    assert isinstance(error, AnswerFailed)
    assert "".join(p.text for p in pieces) == "".join(a.text for a in answer[:5])  # 3 + 2, intact
    assert report.finish_reason == "failed"


def test_pacing_releases_at_the_reading_rate_in_virtual_time() -> None:
    answer = make_answer(10)
    endpoints = {"device": ScriptedEndpoint("device", answer, prefill_s=0.1, gaps_s=[0.001])}

    async def main() -> tuple[list[pydisco.Piece], pydisco.AnswerReport, BaseException | None]:
        cfg = config(dispatch="device-only", migration="never", slo=Slo(ttft_target_s=1.0, reading_rate=5.0))
        async with open_runtime(cfg, endpoints=endpoints) as rt:
            return await read_all(rt, max_tokens=10)

    pieces, report, _ = run_virtual(main)
    times = [p.released_s for p in pieces]
    assert times[0] == pytest.approx(0.1, abs=1e-3)  # TTFT is not paced
    assert all(b - a == pytest.approx(0.2, abs=1e-3) for a, b in zip(times, times[1:]))  # 5 tok/s
    assert report.late_tokens == 0
    assert report.qoe == pytest.approx(1.0)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    share=st.sampled_from([0.2, 0.4, 0.7]),
    dispatch=st.sampled_from(["disco-s", "disco-d"]),
    seed=st.integers(0, 1000),
)
def test_budget_holds_over_a_workload_through_the_runtime(share: float, dispatch: str, seed: int) -> None:
    """A workload through one runtime: the constrained endpoint's share of processed tokens,
    as the runtime reports it (prompt prefill + tokens produced), stays within the budget."""
    import random

    from pydisco.policies._base import Budget

    rng = random.Random(seed)
    constrained = "cloud" if dispatch == "disco-s" else "device"
    answer = make_answer(30)
    endpoints = {
        "device": ScriptedEndpoint("device", answer, prefill_s=0.05, prefill_s_per_token=0.0005, gaps_s=[0.01]),
        "cloud": ScriptedEndpoint("cloud", answer, prefill_s=0.2, gaps_s=[0.005, 0.02]),
    }
    cfg = config(dispatch=dispatch, migration="never", budget=Budget(constrained=constrained, share=share))
    constrained_tokens = 0
    answer_sizes = 0

    async def main() -> None:
        async with open_runtime(cfg, endpoints=endpoints) as rt:
            for _ in range(25):
                words = rng.randint(5, 400)
                async with rt.stream(prompt="word " * words, max_tokens=rng.randint(5, 30)) as answer:
                    async for _piece in answer:
                        pass
                processed = {n: u.prefilled_tokens + u.offered_tokens for n, u in answer.report.usage.items()}
                nonlocal constrained_tokens, answer_sizes
                constrained_tokens += processed.get(constrained, 0)
                answer_sizes += max(processed.values(), default=0)  # DiSCo's l for this answer

    run_virtual(main)
    assert answer_sizes > 0
    event(f"{dispatch} b={share}: constrained endpoint used" if constrained_tokens else f"{dispatch} b={share}: unused")
    assert constrained_tokens <= share * answer_sizes + 1e-9, (constrained_tokens, answer_sizes)
