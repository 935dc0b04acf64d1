"""The policy interface: pure, synchronous, swappable decisions.

Policies never do I/O and have no clock: the runtime hands them a read-only view (with
``now_s`` where time matters) and acts on the decision they return. The same policy code runs
in real time and under Trio's MockClock. Actors never import a concrete policy; they ask the
registry (``pydisco.policies.create_dispatch_policy(name, **options)``) for one by name.

Endpoints are named ``"device"`` and ``"cloud"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

EndpointName = Literal["device", "cloud"]


@dataclasses.dataclass(frozen=True)
class DeviceSpeed:
    """What a policy knows of the device: ``TTFT_d(l) = prefill_a_s + prefill_c_s_per_token·l``
    and the decode time per token (pydisco.device.DeviceProfile has these fields)."""

    prefill_a_s: float
    prefill_c_s_per_token: float
    decode_s_per_token: float

    def ttft(self, prompt_tokens: int) -> float:
        return self.prefill_a_s + self.prefill_c_s_per_token * prompt_tokens

    def prefill(self, tokens: int) -> float:
        """Seconds to prefill ``tokens`` tokens (the migration/catch-up time t_m's compute part)."""
        return self.prefill_a_s + self.prefill_c_s_per_token * tokens


@dataclasses.dataclass(frozen=True)
class Budget:
    """DiSCo's budget: the share ``b`` of all tokens that the ``constrained`` endpoint may
    process over a workload (``E[I(l)·l] ≤ b·E[l]``). ``share=1`` means unconstrained."""

    constrained: EndpointName = "cloud"
    share: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"budget share must be in [0, 1], got {self.share!r}")


@dataclasses.dataclass(frozen=True)
class Slo:
    """Per-request service level: a TTFT target and the rate its consumer takes tokens at.

    ``reading_rate`` (tokens/s) is the pace the reader is released tokens at and the rate a
    step scheduler must sustain: its time per output token is ``tpot_s = 1/reading_rate`` (a
    control loop's 50 ms TPOT is ``reading_rate=20``). ``realtime`` marks a task whose TPOT is
    a hard need (SLICE's real-time class); ``utility`` orders admission when not everything
    fits (SLICE; default 100 for real-time tasks, 1 for others, as in the authors' code).
    """

    ttft_target_s: float = 1.0
    reading_rate: float = 4.5  # tokens/s, Andes' reading speed
    realtime: bool = False
    utility: float | None = None

    def __post_init__(self) -> None:
        if not (self.ttft_target_s > 0 and self.reading_rate > 0):
            raise ValueError("SLO targets must be positive")
        if self.utility is not None and not self.utility > 0:
            raise ValueError(f"utility must be positive, got {self.utility!r}")

    @property
    def tpot_s(self) -> float:
        return 1.0 / self.reading_rate

    @property
    def weight(self) -> float:
        """The utility SLICE orders by."""
        if self.utility is not None:
            return self.utility
        return 100.0 if self.realtime else 1.0


@dataclasses.dataclass(frozen=True)
class DispatchView:
    """Everything a dispatch policy may look at for one request."""

    prompt_tokens: int
    max_tokens: int
    slo: Slo
    budget: Budget
    device: DeviceSpeed | None  # None when there is no device endpoint
    cloud_available: bool
    server_ttft_samples_s: Sequence[float]  # recent cloud TTFTs (DiSCo's online F_s)
    server_tbt_s: float | None  # recent cloud inter-token time, if known
    # Tokens processed so far by each endpoint over the workload (for budget accounting).
    tokens_spent: Mapping[str, int]
    # Prompt tokens the device's KV cache already holds (a shared system prompt, earlier turns):
    # its time to first token is TTFT_d(prompt_tokens - device_cached_tokens).
    device_cached_tokens: int = 0
    # Answers the device will run or admit before this one (one model serving requests in
    # turn, or a step loop's admission queue): its first token waits for them.
    device_answers_ahead: int = 0
    # Worst-case tokens (prompt + max_tokens) of the answers still in flight that each endpoint
    # was dispatched to: not in ``tokens_spent`` yet, so a budget guard reserves them.
    tokens_in_flight: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @property
    def device_prefill_tokens(self) -> int:
        """Prompt tokens the device must compute before its first token."""
        return max(0, self.prompt_tokens - self.device_cached_tokens)


@dataclasses.dataclass(frozen=True)
class Handoff:
    """P/D-Device: the cloud prefills and sends the first ``cloud_tokens`` tokens, released at
    ``interval_s`` apart; the device prefills prompt + those tokens and takes over."""

    cloud_tokens: int
    interval_s: float


@dataclasses.dataclass(frozen=True)
class DispatchDecision:
    """Who starts, and when.

    ``start``: endpoints started at once (two means a race: the first token wins).
    ``fallback``: (endpoint, wait_s) — start it only if no token has arrived after ``wait_s``
    (DiSCo-D's ``w(l)``), or at once if every endpoint started before it failed. ``handoff``:
    a P/D-Device plan (then ``start`` is ``("cloud",)``). ``device_standby``: see below.
    """

    start: tuple[EndpointName, ...]
    fallback: tuple[EndpointName, float] | None = None
    handoff: Handoff | None = None
    reason: str = ""
    # While the cloud decodes, may the device follow the committed prefix (spending device
    # tokens on speculation, so a failover or migration to it computes only the last few)?
    device_standby: bool = True

    def endpoints_used(self) -> tuple[EndpointName, ...]:
        """Every endpoint this decision may run the answer on: those started, the fallback, and
        both for a handoff."""
        used = list(self.start)
        if self.fallback is not None:
            used.append(self.fallback[0])
        if self.handoff is not None:
            used += ["device", "cloud"]
        return tuple(dict.fromkeys(used))


@dataclasses.dataclass(frozen=True)
class AnswerOutcome:
    """What happened to one answer, fed back to the policy that dispatched it."""

    prompt_tokens: int
    tokens_by_endpoint: Mapping[str, int]  # prompt + generated tokens each endpoint processed
    cloud_ttft_s: float | None  # the cloud's TTFT if it produced a first token


class DispatchPolicy(Protocol):
    name: str

    def decide(self, view: DispatchView) -> DispatchDecision: ...

    def observe(self, outcome: AnswerOutcome) -> None:
        """Learn from a finished answer (budget spent, server TTFT). No I/O."""
        ...


@dataclasses.dataclass(frozen=True)
class MigrationView:
    """An answer in flight, for the migration decision (DiSCo §token-level migration).

    Raw facts only; what a policy estimates from them (the answer's length, the target's
    catch-up time ``t_m``, the overhead) is the policy's business (``pydisco.policies`` has
    the built-in estimates). The runtime asks only while the answer streams from ``source``
    and ``target`` is there and has not failed.
    """

    now_s: float  # seconds since the request started
    source: EndpointName
    target: EndpointName  # the candidate (the other endpoint)
    prompt_tokens: int
    committed: int  # tokens committed so far
    unread: int  # committed but not yet consumed by the reader (the buffer B)
    reading_rate: float  # tokens/s the reader consumes
    max_tokens: int
    # Tokens the target must prefill to take over now: prompt + committed, less what its cache
    # already holds (a device on standby follows the committed prefix).
    catch_up_tokens: int
    answer_lengths: Sequence[int]  # lengths of recent finished answers, oldest first
    device: DeviceSpeed | None  # the device's measured speed (None: never profiled)
    server_ttft_samples_s: Sequence[float]  # recent cloud TTFTs
    cost_per_token: Mapping[str, float]  # cost per token processed on each endpoint
    # Cost per prefilled token where it differs (``prefill_rate``); empty: as cost_per_token.
    prefill_cost_per_token: Mapping[str, float] = dataclasses.field(default_factory=dict)


class MigrationPolicy(Protocol):
    name: str

    def should_migrate(self, view: MigrationView) -> bool: ...


def prefill_rate(cost_per_token: Mapping[str, float], prefill_cost_per_token: Mapping[str, float], endpoint: str) -> float:
    """What one prefilled token costs on ``endpoint``: its prefill price where one is given,
    else its price per token, else 0."""
    if endpoint in prefill_cost_per_token:
        return prefill_cost_per_token[endpoint]
    return cost_per_token.get(endpoint, 0.0)
