"""What the policies assume when they must estimate: answer length, catch-up time, cloud TTFT,
and the speed of a device that was never profiled. Pure functions of the views' raw facts, so
every estimate is a policy's choice (swappable with the policy), not the runtime's."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from ._base import DeviceSpeed, MigrationView, prefill_rate

__all__ = [
    "DEFAULT_CLOUD_TTFT_S",
    "UNPROFILED_DEVICE",
    "catch_up_time",
    "cloud_ttft_estimate",
    "expected_answer_tokens",
    "expected_remaining_tokens",
    "migration_overhead",
]

UNPROFILED_DEVICE = DeviceSpeed(prefill_a_s=0.02, prefill_c_s_per_token=0.0005, decode_s_per_token=0.008)
"""A device with no measured profile: SmolLM2-135M on two cores of the machines pydisco is built
on (~20 ms to a first token for a short prompt, ~8 ms a token), with a prefill cost per prompt
token in the same proportion. ``pydisco profile`` measures the real one."""

DEFAULT_CLOUD_TTFT_S = 0.3
"""The cloud's time to first token before any was observed: the order of the hosted APIs'
medians in ``../shared/data/server_ttft`` (0.2–0.6 s)."""

ANSWER_LENGTH_WINDOW = 100
"""How many recent answers the expected answer length averages."""


def expected_answer_tokens(lengths: Sequence[int], max_tokens: int) -> float:
    """``E[answer length]``: the mean of the last ``ANSWER_LENGTH_WINDOW`` answers, or half of
    ``max_tokens`` before any answer finished."""
    recent = lengths[-ANSWER_LENGTH_WINDOW:]
    return statistics.fmean(recent) if recent else max_tokens / 2


def expected_remaining_tokens(view: MigrationView) -> float:
    """``E[l_remaining] = max(0, E[total] − committed)``, never more than ``max_tokens`` allows."""
    remaining = max(0.0, expected_answer_tokens(view.answer_lengths, view.max_tokens) - view.committed)
    return min(remaining, float(max(0, view.max_tokens - view.committed)))


def cloud_ttft_estimate(samples_s: Sequence[float]) -> float:
    """The median of the observed cloud TTFTs, or ``DEFAULT_CLOUD_TTFT_S`` without any."""
    return statistics.median(samples_s) if samples_s else DEFAULT_CLOUD_TTFT_S


def catch_up_time(view: MigrationView) -> float:
    """DiSCo's ``t_m``: how long the target needs before its first token. The device prefills
    ``catch_up_tokens`` at its profiled speed; the cloud takes its usual TTFT (its prefill is
    hidden in it, and the link's delay too)."""
    if view.target == "device":
        return (view.device or UNPROFILED_DEVICE).prefill(view.catch_up_tokens)
    return cloud_ttft_estimate(view.server_ttft_samples_s)


def migration_overhead(view: MigrationView) -> float:
    """The cost of migrating: the target's catch-up prefill at its cost per prefilled token."""
    return prefill_rate(view.cost_per_token, view.prefill_cost_per_token, view.target) * view.catch_up_tokens
