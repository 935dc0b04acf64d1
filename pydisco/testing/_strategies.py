"""Hypothesis strategies for testing policies, endpoints and coordinators against pydisco."""

from __future__ import annotations

import dataclasses
import functools

from hypothesis import strategies as st

from .._core import TOKEN_TEXT_CAPACITY
from .._types import TokenPiece


def token_texts(max_bytes: int = 16) -> st.SearchStrategy[str]:
    """Text pieces of whole UTF-8 characters, multi-byte ones included, at most ``max_bytes``.

    Drawn as up to ``max_bytes`` characters and cut after the last whole character that fits:
    every example drawn is used (a filter on the length would throw some away)."""
    if not 0 < max_bytes <= TOKEN_TEXT_CAPACITY:
        raise ValueError(f"max_bytes must be in 1..{TOKEN_TEXT_CAPACITY}")
    characters = st.characters(codec="utf-8", exclude_categories=["Cs"])
    return st.text(characters, max_size=max_bytes).map(functools.partial(_whole_characters_within, max_bytes=max_bytes))


def _whole_characters_within(text: str, max_bytes: int) -> str:
    return text.encode()[:max_bytes].decode(errors="ignore")  # a cut character's bytes go


@st.composite
def answers(draw: st.DrawFn, min_tokens: int = 0, max_tokens: int = 40) -> list[TokenPiece]:
    """A whole answer: pieces at positions 0..n-1 with token ids and text."""
    n = draw(st.integers(min_tokens, max_tokens))
    return [
        TokenPiece(position=i, token_id=draw(st.integers(0, 49151)), text=draw(token_texts()))
        for i in range(n)
    ]


@st.composite
def arrival_times(
    draw: st.DrawFn,
    n: int,
    *,
    start_s: float = 0.0,
    mean_gap_s: float = 0.01,
    max_stall_s: float = 0.5,
) -> list[float]:
    """``n`` non-decreasing arrival times: jittered gaps around ``mean_gap_s`` plus occasional
    stalls up to ``max_stall_s`` (a slow server, a retransmission, a GC pause)."""
    times: list[float] = []
    t = start_s + draw(st.floats(0.0, max_stall_s))  # time to first token
    for _ in range(n):
        times.append(t)
        gap = draw(st.floats(0.0, 2.0 * mean_gap_s))
        if draw(st.integers(0, 9)) == 0:
            gap += draw(st.floats(0.0, max_stall_s))
        t += gap
    return times


@dataclasses.dataclass(frozen=True)
class EndpointTimeline:
    """How one endpoint would deliver an answer: when each token arrives, and whether (and
    after how many tokens) it fails. ``first_token_s`` is its TTFT."""

    name: str
    arrivals_s: tuple[float, ...]
    fails_after: int | None

    @property
    def first_token_s(self) -> float:
        return self.arrivals_s[0] if self.arrivals_s else float("inf")


@st.composite
def endpoint_timelines(
    draw: st.DrawFn,
    n_tokens: int,
    names: tuple[str, ...] = ("device", "cloud"),
    *,
    failure_probability: float = 0.3,
) -> list[EndpointTimeline]:
    """One timeline per endpoint for an answer of ``n_tokens``: random TTFT, pace, stalls, and
    (with the given probability each) a failure part-way through."""
    out = []
    for name in names:
        mean_gap = draw(st.sampled_from([0.005, 0.01, 0.03]))
        arrivals = draw(arrival_times(n_tokens, mean_gap_s=mean_gap))
        fails = draw(st.floats(0, 1)) < failure_probability
        fails_after = draw(st.integers(0, max(0, n_tokens - 1))) if fails else None
        out.append(EndpointTimeline(name, tuple(arrivals), fails_after))
    return out


@dataclasses.dataclass(frozen=True)
class PacingStep:
    """One step of a pacing script: at ``at_ns``, commit ``commits`` tokens, or set a new
    interval (``interval_ns``), or drive the pacer (``drive``)."""

    at_ns: int
    commits: int = 0
    interval_ns: int | None = None
    drive: bool = False


@st.composite
def pacing_scripts(draw: st.DrawFn, max_steps: int = 60) -> list[PacingStep]:
    """Commit bursts, rate changes and driver wake-ups (on time or late) in time order."""
    t = 0
    steps: list[PacingStep] = []
    for _ in range(draw(st.integers(1, max_steps))):
        t += draw(st.integers(0, 50_000_000))
        kind = draw(st.sampled_from(["commit", "commit", "drive", "drive", "rate"]))
        if kind == "commit":
            steps.append(PacingStep(t, commits=draw(st.integers(1, 5))))
        elif kind == "rate":
            steps.append(PacingStep(t, interval_ns=draw(st.sampled_from([0, 1_000_000, 5_000_000, 20_000_000, 50_000_000]))))
        else:
            steps.append(PacingStep(t, drive=True))
    return steps
