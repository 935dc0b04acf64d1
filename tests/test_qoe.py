"""Andes' QoE: closed forms, bounds, what delays can and cannot do, and the scheduler estimates."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydisco.qoe import (
    andes_priority,
    q_serve,
    q_wait,
    qoe,
    qoe_breakdown,
    qoe_uniform_lateness,
    ttft_penalty,
)


def on_time(n: int, target: float, rate: float, start: float = 0.0) -> list[float]:
    return [start + target + i / rate for i in range(n)]


def reference_qoe(times: list[float], target: float, rate: float) -> float:
    """The definition as areas, integrated numerically: the ideal and the actual step curves
    (tokens the user has read by time t) over [0, T_actual_N]."""
    actual: list[float] = []
    for t in times:
        actual.append(t if not actual else max(t, actual[-1] + 1 / rate))
    ideal = [target + i / rate for i in range(len(times))]
    end = actual[-1]
    edges = sorted({0.0, end, *[x for x in ideal + actual if x <= end]})
    s_delay = s_whole = 0.0
    for a, b in zip(edges, edges[1:]):
        mid = (a + b) / 2
        read_ideal = sum(1 for x in ideal if x <= mid)
        read_actual = sum(1 for x in actual if x <= mid)
        s_whole += read_ideal * (b - a)
        s_delay += max(read_ideal - read_actual, 0) * (b - a)
    return 1.0 if s_delay == 0 else 1 - s_delay / s_whole


def test_all_tokens_on_time_give_one() -> None:
    assert qoe(on_time(50, 1.0, 4.5), ttft_target_s=1.0, reading_rate=4.5) == 1.0
    # Early tokens are buffered: the reader still reads at the reading rate, nothing is late.
    assert qoe([0.1] * 30, ttft_target_s=1.0, reading_rate=4.5) == 1.0


def test_no_tokens_give_zero() -> None:
    assert qoe([], ttft_target_s=1.0, reading_rate=4.5) == 0.0
    assert qoe_uniform_lateness(0, 2.0, 4.5) == 0.0


@pytest.mark.parametrize("n, late, rate", [(2, 0.5, 4.5), (100, 3.0, 3.3), (400, 0.05, 5.1), (1, 1.0, 4.0)])
def test_uniform_lateness_matches_the_closed_form(n: int, late: float, rate: float) -> None:
    start, target = 12.0, 1.5
    times = on_time(n, target + late, rate, start)
    got = qoe(times, ttft_target_s=target, reading_rate=rate, request_start_s=start)
    assert got == pytest.approx(qoe_uniform_lateness(n, late, rate), abs=1e-12)
    assert got == pytest.approx((n - 1) / (n - 1 + 2 * rate * late), abs=1e-12)
    assert got < 1.0


def test_breakdown_areas_for_uniform_lateness() -> None:
    n, late, rate = 10, 2.0, 5.0
    b = qoe_breakdown(on_time(n, 1.0 + late, rate), ttft_target_s=1.0, reading_rate=rate)
    assert b.s_delay == pytest.approx(n * late)
    assert b.s_whole == pytest.approx(n * late + n * (n - 1) / (2 * rate))
    assert b.ttft_s == pytest.approx(1.0 + late)
    assert b.tokens == n


def test_reading_rate_floor_carries_lateness_forward() -> None:
    # Every token arrives at once, 2 s late: the reader still reads one per 1/r, so each token
    # is exactly 2 s late: uniform lateness.
    rate, target, late, n = 4.0, 1.0, 2.0, 20
    got = qoe([target + late] * n, ttft_target_s=target, reading_rate=rate)
    assert got == pytest.approx(qoe_uniform_lateness(n, late, rate))


def test_single_late_token_scores_zero_not_negative() -> None:
    # algorithms.md's S_whole (N²/2r) would give 1 − d/(d − 1/(2r)) < 0 here.
    assert qoe([1.5], ttft_target_s=1.0, reading_rate=4.5) == 0.0


def test_delaying_the_last_token_can_raise_qoe() -> None:
    """Andes' window ends with the answer, so QoE is not monotone in every delay."""
    early_end = qoe([10.0, 11.0], ttft_target_s=0.001, reading_rate=1.0)
    late_end = qoe([10.0, 111.0], ttft_target_s=0.001, reading_rate=1.0)
    assert late_end > early_end


def test_ttft_penalty() -> None:
    times = on_time(20, 3.0, 4.5)
    plain = qoe(times, ttft_target_s=1.0, reading_rate=4.5)
    penalised = qoe(times, ttft_target_s=1.0, reading_rate=4.5, ttft_alpha=0.9)
    assert penalised == pytest.approx(plain * 0.9 ** 2.0)
    assert ttft_penalty(0.5, 1.0, 0.9) == 1.0  # early is not a bonus
    with pytest.raises(ValueError):
        ttft_penalty(2.0, 1.0, 1.5)


@pytest.mark.parametrize("bad", [{"ttft_target_s": 0.0}, {"reading_rate": -1.0}, {"reading_rate": math.inf}])
def test_rejects_bad_parameters(bad: dict[str, float]) -> None:
    args = {"ttft_target_s": 1.0, "reading_rate": 4.5} | bad
    with pytest.raises(ValueError):
        qoe([1.0], **args)
    with pytest.raises(ValueError):
        qoe([math.nan], ttft_target_s=1.0, reading_rate=4.5)


# ----- properties ----------------------------------------------------------------------------

rates = st.floats(0.5, 20.0)
targets = st.floats(0.05, 5.0)


@st.composite
def deliveries(draw: st.DrawFn, max_tokens: int = 40) -> list[float]:
    gaps = draw(st.lists(st.floats(0.0, 3.0), min_size=1, max_size=max_tokens))
    times = [draw(st.floats(0.0, 10.0))]
    for g in gaps[1:]:
        times.append(times[-1] + g)
    return times


@settings(max_examples=100, deadline=None)
@given(deliveries(), targets, rates)
def test_qoe_is_in_unit_interval_and_matches_the_area_definition(
    times: list[float], target: float, rate: float
) -> None:
    b = qoe_breakdown(times, ttft_target_s=target, reading_rate=rate)
    assert 0.0 <= b.qoe <= 1.0
    assert 0.0 <= b.s_delay <= b.s_whole + 1e-9 or b.s_delay == 0.0
    assert b.qoe == pytest.approx(reference_qoe(times, target, rate), abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(deliveries(), targets, rates, st.data())
def test_delaying_a_token_never_lowers_the_delay_area(
    times: list[float], target: float, rate: float, data: st.DataObject
) -> None:
    i = data.draw(st.integers(0, len(times) - 1))
    delay = data.draw(st.floats(0.0, 5.0))
    later = [t + delay if j >= i else t for j, t in enumerate(times)]
    before = qoe_breakdown(times, ttft_target_s=target, reading_rate=rate)
    after = qoe_breakdown(later, ttft_target_s=target, reading_rate=rate)
    assert after.s_delay >= before.s_delay - 1e-9


@settings(max_examples=100, deadline=None)
@given(deliveries(), targets, rates, st.data())
def test_delaying_a_token_without_moving_the_end_never_raises_qoe(
    times: list[float], target: float, rate: float, data: st.DataObject
) -> None:
    if len(times) < 2:
        return
    i = data.draw(st.integers(0, len(times) - 2))
    # Delay token i, but not beyond the next one: order is kept and the last token is untouched.
    later = list(times)
    later[i] = data.draw(st.floats(times[i], times[i + 1]))
    before = qoe_breakdown(times, ttft_target_s=target, reading_rate=rate)
    after = qoe_breakdown(later, ttft_target_s=target, reading_rate=rate)
    if after.s_whole == pytest.approx(before.s_whole, abs=1e-12):
        assert after.qoe <= before.qoe + 1e-9


@settings(max_examples=100, deadline=None)
@given(deliveries(), targets, rates, st.floats(0.0, 10.0))
def test_delaying_the_whole_answer_never_raises_qoe(
    times: list[float], target: float, rate: float, shift: float
) -> None:
    before = qoe(times, ttft_target_s=target, reading_rate=rate)
    after = qoe([t + shift for t in times], ttft_target_s=target, reading_rate=rate)
    assert after <= before + 1e-9


# ----- Andes' scheduler estimates ----------------------------------------------------------


def test_q_wait_and_q_serve() -> None:
    rate, dt = 5.0, 1.0
    # E = (t+Δt)·r = 20 expected tokens; 10 delivered.
    assert q_wait(3.0, 10, rate, dt) == pytest.approx(1 - (10 / 20) ** 2)
    # Served for Δt at τ = max(1/r, 0.05) = 0.2 s: 5 more tokens.
    assert q_serve(3.0, 10, rate, dt, 0.05) == pytest.approx((15 / 20) ** 2)
    # A slow server (τ = 0.5 s) adds only 2.
    assert q_serve(3.0, 10, rate, dt, 0.5) == pytest.approx((12 / 20) ** 2)
    # The buffer already covers the look-ahead.
    assert q_wait(1.0, 30, rate, dt) == 1.0 == q_serve(1.0, 30, rate, dt, 0.05)
    assert andes_priority(0.9, 0.5, 200) == pytest.approx(0.4 / 200)


@settings(max_examples=100, deadline=None)
@given(st.floats(0.0, 100.0), st.integers(0, 500), rates, st.floats(0.01, 5.0), st.floats(0.0, 1.0))
def test_estimates_are_qoe_like(t: float, n: int, rate: float, dt: float, latency: float) -> None:
    w = q_wait(t, n, rate, dt)
    s = q_serve(t, n, rate, dt, latency)
    assert 0.0 <= w <= 1.0 and 0.0 <= s <= 1.0
    # Waiting longer never looks better; more tokens already sent never make serving worse.
    assert q_wait(t, n, rate, dt * 2) <= w + 1e-12
    assert q_serve(t, n + 1, rate, dt, latency) >= s - 1e-12
