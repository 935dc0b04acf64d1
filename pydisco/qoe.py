"""Andes' quality of experience (QoE) for one streamed answer, and Andes' scheduler estimates.

QoE compares when the user *could* read each token with when they *ideally* would
(Andes, arXiv 2404.16283). With ``r`` the user's reading rate (tokens/s), ``t_0`` the TTFT
target and ``T_d,i`` the delivery time of token ``i`` (1-based, measured from the request):

.. code-block:: text

    T_ideal_i  = t_0 + (i−1)/r
    T_actual_1 = T_d,1
    T_actual_i = max(T_d,i, T_actual_{i−1} + 1/r)        the user never reads faster than r
    S_delay    = Σ_i max(T_actual_i − T_ideal_i, 0)
    S_whole    = Σ_i (T_actual_N − T_ideal_i) = N·(T_actual_N − t_0) − N·(N−1)/(2r)
    QoE        = 1 − S_delay / S_whole                  (1 when S_delay = 0; no tokens → 0)

Both areas are measured between two *step* curves in the (time, tokens) plane: the ideal
curve has token ``i`` at ``T_ideal_i``, the actual one at ``T_actual_i``. Counting the area
strip by strip (token level ``i`` is one token high), the strip of level ``i`` under the
ideal curve runs from ``T_ideal_i`` to the window's end ``T_actual_N``, hence ``S_whole``: the
area under the ideal curve from the request until the user has read the last token. The
delay strip of level ``i`` runs from ``T_ideal_i`` to ``T_actual_i``, hence ``S_delay``.

``../shared/reference/algorithms.md`` (and the Andes authors' code) write
``S_whole = N·(T_actual_N − t_0) − N²/(2r)``: the area under the *continuous* ramp
``r·(t − t_0)``, mixed with a *step* ``S_delay``. The mix is inconsistent: for an answer
delivered exactly on time it gives ``S_whole = N·(N−2)/(2r)``, zero for two tokens and
negative for one, and a single token late by ``d`` scores ``1 − d/(d − 1/(2r)) < 0``. The step
form used here differs by ``N/(2r)`` (negligible for long answers) and has what a ratio of
areas should have: whenever a token is late, ``T_actual_N > T_ideal_N`` so ``S_whole > 0``,
and every late token's delay is at most ``T_actual_N − T_ideal_N``, so
``0 ≤ S_delay ≤ S_whole``: QoE lies in [0, 1] without clipping (it is still clipped, against
rounding).

Uniform lateness (every token exactly ``d ≥ 0`` after its ideal time) has the closed form
``QoE = (N−1) / (N−1 + 2·r·d)`` (:func:`qoe_uniform_lateness`): ``S_delay = N·d`` and
``S_whole = N·d + N·(N−1)/(2r)``.

Monotonicity: delaying tokens never lowers ``S_delay``, and QoE never rises when a delay
leaves the end ``T_actual_N`` where it was, nor when the whole answer shifts later. It is *not*
monotone in general, a property of Andes' definition (the window ends with the answer): an
answer that already started late gains QoE when its last token comes even later, because
the ideal area grows by ``N`` per second and the delay area by only 1 (two tokens at ``r = 1``
delivered at 10 s and 11 s score 1/21; the second at 111 s scores 101/221).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

__all__ = [
    "QoeBreakdown",
    "andes_priority",
    "q_serve",
    "q_wait",
    "qoe",
    "qoe_breakdown",
    "qoe_uniform_lateness",
    "ttft_penalty",
]


@dataclasses.dataclass(frozen=True, slots=True)
class QoeBreakdown:
    """The parts of one answer's QoE.

    Fields:
        qoe: ``1 − s_delay/s_whole`` in [0, 1], times the TTFT penalty if one was asked for.
        s_delay: the delay area, token·seconds.
        s_whole: the ideal area up to when the last token is read, token·seconds.
        ttft_s: time to first token from the request start (``nan`` with no tokens).
        tokens: how many tokens were delivered.
    """

    qoe: float
    s_delay: float
    s_whole: float
    ttft_s: float
    tokens: int


_ON_TIME_S = 1e-9


def _check_positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def ttft_penalty(ttft_s: float, ttft_target_s: float, alpha: float) -> float:
    """Andes' optional TTFT penalty factor ``α^(TTFT − target)``, for ``0 < α ≤ 1``.

    Only lateness is penalised: a first token before the target gives 1, never a bonus
    (``α`` to a negative power would push QoE above 1).
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    return float(alpha ** max(0.0, ttft_s - ttft_target_s))


def qoe_breakdown(
    delivery_times_s: Sequence[float],
    ttft_target_s: float,
    reading_rate: float,
    request_start_s: float = 0.0,
    *,
    ttft_alpha: float | None = None,
) -> QoeBreakdown:
    """QoE of one answer from its token delivery times, with the areas it came from.

    ``delivery_times_s`` are when each token reached the user, in order, on the same clock as
    ``request_start_s``. ``ttft_alpha`` (``0 < α ≤ 1``) applies :func:`ttft_penalty`.
    """
    _check_positive("ttft_target_s", ttft_target_s)
    _check_positive("reading_rate", reading_rate)
    n = len(delivery_times_s)
    if n == 0:
        return QoeBreakdown(qoe=0.0, s_delay=0.0, s_whole=0.0, ttft_s=math.nan, tokens=0)
    interval = 1.0 / reading_rate
    s_delay = 0.0  # token·seconds; lateness under a nanosecond (clock resolution) is on time
    actual = -math.inf
    for i, t in enumerate(delivery_times_s):
        if not math.isfinite(t):
            raise ValueError(f"delivery time {i} is not finite: {t!r}")
        actual = max(t - request_start_s, actual + interval)
        late = actual - (ttft_target_s + i * interval)
        if late > _ON_TIME_S:
            s_delay += late
    s_whole = n * (actual - ttft_target_s) - n * (n - 1) * interval / 2.0
    # S_delay > 0 implies S_whole ≥ S_delay > 0 (module docstring); the guard is for rounding.
    value = 1.0 if s_delay <= 0.0 else min(1.0, max(0.0, 1.0 - s_delay / s_whole))
    ttft = delivery_times_s[0] - request_start_s
    if ttft_alpha is not None:
        value *= ttft_penalty(ttft, ttft_target_s, ttft_alpha)
    return QoeBreakdown(qoe=value, s_delay=s_delay, s_whole=s_whole, ttft_s=ttft, tokens=n)


def qoe(
    delivery_times_s: Sequence[float],
    ttft_target_s: float,
    reading_rate: float,
    request_start_s: float = 0.0,
    *,
    ttft_alpha: float | None = None,
) -> float:
    """Andes' QoE in [0, 1] of one answer (see the module docstring for the formula)."""
    return qoe_breakdown(
        delivery_times_s, ttft_target_s, reading_rate, request_start_s, ttft_alpha=ttft_alpha
    ).qoe


def qoe_uniform_lateness(tokens: int, lateness_s: float, reading_rate: float) -> float:
    """Closed-form QoE of ``tokens`` tokens each delivered ``lateness_s ≥ 0`` after its ideal
    time: ``(N−1) / (N−1 + 2·r·d)``; 1 when on time, 0 with no tokens."""
    _check_positive("reading_rate", reading_rate)
    if lateness_s < 0:
        raise ValueError(f"lateness_s must be >= 0, got {lateness_s!r}")
    if tokens <= 0:
        return 0.0
    if lateness_s == 0:
        return 1.0
    return (tokens - 1) / (tokens - 1 + 2.0 * reading_rate * lateness_s)


# ----- Andes' scheduler estimates ------------------------------------------------------------


def _expected_tokens(elapsed_s: float, reading_rate: float, lookahead_s: float) -> float:
    """``E = (t + Δt)·r``: tokens the user expects to have read at the end of the look-ahead."""
    _check_positive("reading_rate", reading_rate)
    if elapsed_s < 0 or lookahead_s < 0:
        raise ValueError("elapsed_s and lookahead_s must be >= 0")
    return (elapsed_s + lookahead_s) * reading_rate


def q_wait(elapsed_s: float, delivered: int, reading_rate: float, lookahead_s: float) -> float:
    """Andes' estimated QoE if the request is *not* served for the next ``lookahead_s``:
    ``1 − ((E − n)/E)²``, or 1 when ``E ≤ n`` (the buffer already covers the look-ahead).

    ``elapsed_s`` is the time since the request arrived, ``delivered`` (n) the tokens sent.
    """
    expected = _expected_tokens(elapsed_s, reading_rate, lookahead_s)
    if expected <= delivered:
        return 1.0
    return 1.0 - ((expected - delivered) / expected) ** 2


def q_serve(
    elapsed_s: float,
    delivered: int,
    reading_rate: float,
    lookahead_s: float,
    token_latency_s: float,
) -> float:
    """Andes' estimated QoE if the request *is* served for the next ``lookahead_s``:
    ``min(1, ((n + Δt/τ)/E)²)`` with ``τ = max(1/r, token_latency_s)`` (the user never reads
    faster than ``r``), or 1 when ``E ≤ n``."""
    if token_latency_s < 0:
        raise ValueError(f"token_latency_s must be >= 0, got {token_latency_s!r}")
    expected = _expected_tokens(elapsed_s, reading_rate, lookahead_s)
    if expected <= delivered:
        return 1.0
    tau = max(1.0 / reading_rate, token_latency_s)
    return min(1.0, ((delivered + lookahead_s / tau) / expected) ** 2)


def andes_priority(q_serve_value: float, q_wait_value: float, context_tokens: int) -> float:
    """Andes' greedy knapsack priority ``(Q_serve − Q_wait)/l``: QoE gained per KV token."""
    if context_tokens <= 0:
        raise ValueError(f"context_tokens must be positive, got {context_tokens!r}")
    return (q_serve_value - q_wait_value) / context_tokens
