"""The dispatch policies: who starts an answer, and when. Pure and synchronous.

Every policy keeps a :class:`~pydisco.policies._budget.BudgetLedger` from the answers it
observes. When a decision would use the budget's constrained endpoint for *optional* work (the
other endpoint could serve the answer alone) and that answer could push the constrained
share above ``b`` even in the worst case, the constrained endpoint is left out. device-only and
cloud-only name their endpoint explicitly and are never overridden.

``start=()`` means no endpoint can serve the request (no device and the cloud unavailable).
See ``docs/policies.md`` for the formulas.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
from collections.abc import Sequence

from ._base import (
    AnswerOutcome,
    DispatchDecision,
    DispatchView,
    EndpointName,
    Handoff,
)
from ._budget import (
    BudgetLedger,
    LengthSample,
    SortedLengths,
    WaitPlan,
    disco_d_plan,
    disco_s_threshold,
)

__all__ = [
    "CloudOnlyPolicy",
    "DeviceOnlyPolicy",
    "DiscoDPolicy",
    "DiscoSPolicy",
    "PdDevicePolicy",
    "RaceBothPolicy",
    "pd_device_plan",
]

_NO_ENDPOINT = DispatchDecision(start=(), reason="no endpoint available")


def _available(view: DispatchView) -> tuple[EndpointName, ...]:
    endpoints: list[EndpointName] = []
    if view.device is not None:
        endpoints.append("device")
    if view.cloud_available:
        endpoints.append("cloud")
    return tuple(endpoints)


def _other(endpoint: EndpointName) -> EndpointName:
    return "cloud" if endpoint == "device" else "device"


class _LedgerPolicy:
    """Shared by every policy: the budget ledger and the guard on optional work."""

    name = ""

    def __init__(self) -> None:
        self.ledger = BudgetLedger()

    def observe(self, outcome: AnswerOutcome) -> None:
        self.ledger.record(outcome)

    @staticmethod
    def standby_allowed(view: DispatchView) -> bool:
        """Device standby spends device tokens on speculation: not under a device budget."""
        return not (view.budget.constrained == "device" and view.budget.share < 1.0)

    def _decided(self, view: DispatchView, decision: DispatchDecision, *, guard: bool = True) -> DispatchDecision:
        """The decision as returned: budget-guarded (unless the policy names its endpoint
        explicitly), with the standby choice filled in."""
        if guard:
            decision = self._guard(view, decision)
        return dataclasses.replace(decision, device_standby=self.standby_allowed(view))

    def _guard(self, view: DispatchView, decision: DispatchDecision) -> DispatchDecision:
        """Leave the constrained endpoint out when the other one is available (so its work is
        optional) and this answer could push its share above the budget."""
        used = decision.endpoints_used()
        constrained = view.budget.constrained
        other = _other(constrained)
        if constrained not in used or other not in _available(view):
            return decision
        # This answer's worst case, plus that of the answers in flight there (concurrent answers
        # would otherwise each see the same ledger and together overshoot the budget).
        worst = view.prompt_tokens + view.max_tokens + view.tokens_in_flight.get(constrained, 0)
        if self.ledger.allows(view.budget, worst, view.tokens_spent):
            return decision
        return DispatchDecision(
            start=(other,),
            reason=f"{constrained} budget {view.budget.share:g} reached "
            f"({self.ledger.share(constrained):.3f} used); {decision.reason} overridden",
        )


class DeviceOnlyPolicy(_LedgerPolicy):
    """Always the device."""

    name = "device-only"

    def decide(self, view: DispatchView) -> DispatchDecision:
        if view.device is None:
            return DispatchDecision(start=(), reason="device-only: no device")
        return self._decided(view, DispatchDecision(start=("device",), reason="device-only"), guard=False)


class CloudOnlyPolicy(_LedgerPolicy):
    """Always the cloud."""

    name = "cloud-only"

    def decide(self, view: DispatchView) -> DispatchDecision:
        if not view.cloud_available:
            return DispatchDecision(start=(), reason="cloud-only: cloud unavailable")
        return self._decided(view, DispatchDecision(start=("cloud",), reason="cloud-only"), guard=False)


class RaceBothPolicy(_LedgerPolicy):
    """Start every available endpoint; the first token wins."""

    name = "race-both"

    def decide(self, view: DispatchView) -> DispatchDecision:
        available = _available(view)
        if not available:
            return _NO_ENDPOINT
        return self._decided(view, DispatchDecision(start=available, reason="race"))


class _PromptLearning(_LedgerPolicy):
    """A policy that learns the prompt-length distribution ``p(l)`` from observed answers."""

    def __init__(self, prompt_lengths: Sequence[int], window: int | None) -> None:
        super().__init__()
        self.prompt_lengths = LengthSample(prompt_lengths, window)

    def observe(self, outcome: AnswerOutcome) -> None:
        super().observe(outcome)
        self.prompt_lengths.add(outcome.prompt_tokens)

    def _lengths(self, view: DispatchView) -> SortedLengths:
        # Before any sample the current prompt is the whole distribution: a conservative
        # start, since one prompt alone is "long" for every budget below 1.
        lengths = self.prompt_lengths.sorted
        return lengths if len(lengths) else SortedLengths.of((view.prompt_tokens,))


class DiscoSPolicy(_PromptLearning):
    """DiSCo-S, server budget: prompts shorter than ``l_th`` run on the device only, longer
    ones race both endpoints. ``l_th`` is the smallest threshold with
    ``Σ_{l ≥ l_th} p(l)·l ≤ b·E[l]`` over the prompt lengths seen (a window of ``window``
    answers, seeded with ``prompt_lengths``). Without a device: cloud; without the cloud:
    device. A budget on the *device* instead leaves the server unconstrained (``l_th = 0``).

    A short prompt that would wait behind other answers on the device (``device_answers_ahead
    > 0``) races both instead, with ``race_when_device_busy`` (the default): DiSCo assumes
    a device free for each request, and a queued one's TTFT is no longer ``TTFT_d(l)``. This
    spends cloud tokens beyond ``l_th``'s share while the device is saturated.
    """

    name = "disco-s"

    def __init__(
        self, *, prompt_lengths: Sequence[int] = (), window: int | None = 10_000, race_when_device_busy: bool = True
    ) -> None:
        super().__init__(prompt_lengths, window)
        self.race_when_device_busy = race_when_device_busy
        self._cache: tuple[tuple[int, float], float] | None = None

    def threshold(self, view: DispatchView) -> float:
        """The current ``l_th`` for this view's budget."""
        share = view.budget.share if view.budget.constrained == "cloud" else 1.0
        if not len(self.prompt_lengths.sorted):
            return disco_s_threshold(self._lengths(view), share)
        key = (self.prompt_lengths.version, share)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, disco_s_threshold(self.prompt_lengths.sorted, share))
        return self._cache[1]

    def decide(self, view: DispatchView) -> DispatchDecision:
        available = _available(view)
        if len(available) < 2:
            return DispatchDecision(start=available, reason="disco-s: only endpoint") if available \
                else _NO_ENDPOINT
        l_th = self.threshold(view)
        if view.prompt_tokens < l_th and view.device_answers_ahead and self.race_when_device_busy:
            decision = DispatchDecision(
                start=("device", "cloud"),
                reason=f"disco-s: l < l_th={l_th:g} but {view.device_answers_ahead} answer(s) ahead on the device",
            )
        elif view.prompt_tokens < l_th:
            decision = DispatchDecision(start=("device",), reason=f"disco-s: l < l_th={l_th:g}")
        else:
            decision = DispatchDecision(start=("device", "cloud"), reason=f"disco-s: l >= l_th={l_th:g}")
        return self._decided(view, decision)


class _ServerTtft:
    """DiSCo's online ``F_s``: a prior sample plus the runtime's recent server TTFTs (or, when
    the view carries none, the cloud TTFTs this policy observed itself)."""

    def __init__(self, prior: Sequence[float], window: int) -> None:
        if any(not (s >= 0 and math.isfinite(s)) for s in prior):
            raise ValueError("server TTFT samples must be finite and >= 0")
        self.prior = tuple(sorted(float(s) for s in prior))  # sorted once: merges are cheap
        self.observed: collections.deque[float] = collections.deque(maxlen=window)
        self._memo: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def observe(self, outcome: AnswerOutcome) -> None:
        if outcome.cloud_ttft_s is not None and outcome.cloud_ttft_s >= 0:
            self.observed.append(outcome.cloud_ttft_s)

    def sorted(self, view: DispatchView) -> tuple[float, ...]:
        recent = tuple(view.server_ttft_samples_s) or tuple(self.observed)
        if self._memo is None or self._memo[0] != recent:  # a memo: same input, same answer
            self._memo = (recent, tuple(sorted(self.prior + recent)))
        return self._memo[1]


class DiscoDPolicy(_PromptLearning):
    """DiSCo-D, device budget: start on the cloud; start the device too if no token has
    arrived after ``w(l)`` (``fallback=("device", w(l))``). ``w(l)`` comes from
    :func:`~pydisco.policies._budget.disco_d_plan` over the prompt lengths seen and the server
    TTFTs (``server_ttft_prior`` plus the view's recent samples) with tail quantile
    ``tail_quantile``. Without any server TTFT sample yet, the device starts when the server
    has missed the TTFT target. A budget on the *cloud* instead leaves the device
    unconstrained (``w = 0`` where the device can win).
    """

    name = "disco-d"

    def __init__(
        self,
        *,
        prompt_lengths: Sequence[int] = (),
        server_ttft_prior: Sequence[float] = (),
        tail_quantile: float = 0.95,
        window: int | None = 10_000,
        ttft_window: int = 1000,
    ) -> None:
        if not 0.0 <= tail_quantile <= 1.0:
            raise ValueError(f"tail_quantile must be in [0, 1], got {tail_quantile!r}")
        super().__init__(prompt_lengths, window)
        self.tail_quantile = tail_quantile
        self.server_ttft = _ServerTtft(server_ttft_prior, ttft_window)
        self._memo: tuple[tuple[object, ...], WaitPlan] | None = None

    def observe(self, outcome: AnswerOutcome) -> None:
        super().observe(outcome)
        self.server_ttft.observe(outcome)

    def plan(self, view: DispatchView) -> WaitPlan | None:
        """The current ``w(l)`` plan, or ``None`` without a device or any server sample."""
        samples = self.server_ttft.sorted(view)
        if view.device is None or not samples:
            return None
        share = view.budget.share if view.budget.constrained == "device" else 1.0
        if not len(self.prompt_lengths.sorted):  # cold start: plan for this prompt alone
            return disco_d_plan(self._lengths(view), samples, view.device, share, self.tail_quantile)
        lengths = self.prompt_lengths.sorted
        key = (self.prompt_lengths.version, samples, view.device, share)
        if self._memo is None or self._memo[0] != key:
            self._memo = (key, disco_d_plan(lengths, samples, view.device, share, self.tail_quantile))
        return self._memo[1]

    def decide(self, view: DispatchView) -> DispatchDecision:
        available = _available(view)
        if len(available) < 2:
            return DispatchDecision(start=available, reason="disco-d: only endpoint") if available \
                else _NO_ENDPOINT
        plan = self.plan(view)
        if plan is None:
            wait: float | None = view.slo.ttft_target_s
            why = "no server TTFT sample yet, w = TTFT target"
        else:
            wait = plan.wait_for(view.device_prefill_tokens)  # w(l) of the device's TTFT_d(l)
            why = "w(l) from F_s"
        if wait is None:
            decision = DispatchDecision(start=("cloud",), reason="disco-d: no device fallback")
        else:
            decision = DispatchDecision(
                start=("cloud",), fallback=("device", wait), reason=f"disco-d: {why} = {wait:.3f}s"
            )
        return self._decided(view, decision)


def pd_device_plan(
    prompt_tokens: int,
    max_tokens: int,
    prefill_a_s: float,
    prefill_c_s_per_token: float,
    cloud_ttft_s: float,
    display_interval_s: float,
) -> Handoff | None:
    """P/D-Device's speed controller (reconstructed): the smallest ``K ≥ 1`` with
    ``K·τ_display ≥ T_pf(l+K) − TTFT_c``, where ``T_pf(n) = a + c·n``, and the release interval
    ``τ = max(τ_display, (T_pf(l+K) − TTFT_c)/K)``. ``None`` when no ``K ≤ max_tokens``
    works (the device never catches up, so the cloud should serve the whole answer).

    Solved in closed form: ``K·(τ_display − c) ≥ a + c·l − TTFT_c``.
    """
    if display_interval_s <= 0:
        raise ValueError(f"display interval must be positive, got {display_interval_s!r}")
    c = prefill_c_s_per_token
    need = prefill_a_s + c * prompt_tokens - cloud_ttft_s

    def enough(k: int) -> bool:
        return k * display_interval_s >= need + c * k

    if enough(1):
        k = 1
    elif display_interval_s > c:  # each cloud token buys (τ_display − c) of catch-up
        k = max(1, math.ceil(need / (display_interval_s - c)))
        while not enough(k):  # guard the ceiling against rounding
            k += 1
    else:
        return None  # the device prefills a token slower than the display shows one
    if k > max_tokens:
        return None
    catch_up = prefill_a_s + prefill_c_s_per_token * (prompt_tokens + k) - cloud_ttft_s
    return Handoff(cloud_tokens=k, interval_s=max(display_interval_s, catch_up / k))


class PdDevicePolicy(_LedgerPolicy):
    """P/D-Device: the cloud prefills and sends the first ``K`` tokens at interval ``τ`` while
    the device prefills prompt + those tokens and takes over (:func:`pd_device_plan`).

    ``TTFT_c`` is the median of the server TTFT sample (``server_ttft_prior`` plus the view's
    recent ones; 0 without any, which asks for more cloud tokens, the safe side).
    ``τ_display`` is ``display_interval_s`` or ``1/reading_rate``, and never below the cloud's
    own inter-token time (the cloud cannot release faster than it decodes).
    """

    name = "pd-device"

    def __init__(
        self,
        *,
        server_ttft_prior: Sequence[float] = (),
        display_interval_s: float | None = None,
        ttft_window: int = 1000,
    ) -> None:
        super().__init__()
        if display_interval_s is not None and not display_interval_s > 0:
            raise ValueError(f"display_interval_s must be positive, got {display_interval_s!r}")
        self.display_interval_s = display_interval_s
        self.server_ttft = _ServerTtft(server_ttft_prior, ttft_window)

    def observe(self, outcome: AnswerOutcome) -> None:
        super().observe(outcome)
        self.server_ttft.observe(outcome)

    def display_interval(self, view: DispatchView) -> float:
        tau = self.display_interval_s or 1.0 / view.slo.reading_rate
        return max(tau, view.server_tbt_s or 0.0)

    def cloud_ttft(self, view: DispatchView) -> float:
        samples = self.server_ttft.sorted(view)
        return statistics.median(samples) if samples else 0.0

    def decide(self, view: DispatchView) -> DispatchDecision:
        if view.device is None:
            return DispatchDecision(start=("cloud",), reason="pd-device: no device") \
                if view.cloud_available else _NO_ENDPOINT
        if not view.cloud_available:
            return DispatchDecision(start=("device",), reason="pd-device: cloud unavailable")
        handoff = pd_device_plan(
            view.device_prefill_tokens,
            view.max_tokens,
            view.device.prefill_a_s,
            view.device.prefill_c_s_per_token,
            self.cloud_ttft(view),
            self.display_interval(view),
        )
        if handoff is None:
            decision = DispatchDecision(
                start=("cloud",), reason="pd-device: device cannot catch up within max_tokens"
            )
        else:
            decision = DispatchDecision(
                start=("cloud",),
                handoff=handoff,
                reason=f"pd-device: K={handoff.cloud_tokens}, tau={handoff.interval_s * 1e3:.0f}ms",
            )
        return self._decided(view, decision)
