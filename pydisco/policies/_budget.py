"""DiSCo's budget arithmetic: the token ledger, the DiSCo-S length threshold and the DiSCo-D
wait-time plan. Pure functions and plain data; the policies in ``dispatch.py`` wire them up.

Notation as in ``../shared/reference/algorithms.md``: ``l`` prompt length, ``b`` the budget
share, ``F_s`` the empirical server-TTFT distribution, ``TTFT_d(l) = a + c·l`` the device's.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

from ._base import AnswerOutcome, Budget, DeviceSpeed

__all__ = [
    "BudgetLedger",
    "LengthSample",
    "SortedLengths",
    "WaitPlan",
    "disco_d_plan",
    "disco_s_threshold",
    "survival",
]


# ----- the ledger ----------------------------------------------------------------------------


class BudgetLedger:
    """Tokens processed per endpoint over a workload, from the answers a policy observed.

    An answer's size is the largest count any endpoint reports for it: whichever endpoint
    finished it processed the prompt plus every token of the answer (after a migration the
    target prefilled the prompt and the delivered prefix, then generated the rest), while a
    cancelled racer or a migration source processed less. So ``share(e)`` is the share of the
    workload's tokens that endpoint ``e`` processed, the quantity DiSCo's budget bounds.
    """

    def __init__(self) -> None:
        self._spent: dict[str, int] = collections.defaultdict(int)
        self.total = 0
        self.answers = 0

    def record(self, outcome: AnswerOutcome) -> None:
        counts = outcome.tokens_by_endpoint
        self.total += max(counts.values(), default=0)
        self.answers += 1
        for endpoint, tokens in counts.items():
            self._spent[endpoint] += tokens

    def spent(self, endpoint: str) -> int:
        return self._spent.get(endpoint, 0)

    def share(self, endpoint: str) -> float:
        return self.spent(endpoint) / self.total if self.total else 0.0

    def allows(
        self,
        budget: Budget,
        worst_case_tokens: int,
        reported_spent: Mapping[str, int] | None = None,
    ) -> bool:
        """May the budget's constrained endpoint work on one more answer of at most
        ``worst_case_tokens`` tokens without the share rising above ``b``?

        Worst case: the endpoint processes the whole answer, ``(C + x)/(T + x) ≤ b``; any answer
        where it does less leaves a smaller share. ``reported_spent`` (the runtime's own count,
        ``DispatchView.tokens_spent``) is used when it is ahead of this ledger.
        """
        if budget.share >= 1.0:
            return True
        spent = self.spent(budget.constrained)
        if reported_spent is not None:
            spent = max(spent, reported_spent.get(budget.constrained, 0))
        x = worst_case_tokens
        return spent + x <= budget.share * (self.total + x)


# ----- prompt-length samples -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SortedLengths:
    """An empirical prompt-length distribution: ``values`` ascending, ``prefix[i]`` the sum of
    the ``i`` smallest (so any tail sum is one subtraction)."""

    values: tuple[int, ...]
    prefix: tuple[int, ...]

    @classmethod
    def of(cls, lengths: Iterable[int]) -> SortedLengths:
        values = tuple(sorted(lengths))
        if values and values[0] < 0:
            raise ValueError("prompt lengths must be >= 0")
        return cls(values, tuple(itertools.accumulate(values, initial=0)))

    @property
    def total(self) -> int:
        return self.prefix[-1]

    def __len__(self) -> int:
        return len(self.values)

    def sum_below(self, bound: float) -> int:
        """Σ l over the sample with ``l < bound``."""
        return self.prefix[bisect.bisect_left(self.values, bound)]


class LengthSample:
    """Recent prompt lengths (a sliding window, optionally seeded) and their sorted view.

    The sorted view is rebuilt when the window has changed by 1 % since the last rebuild, so a
    policy that observes every answer pays an amortised O(log n) per answer, not a sort.
    """

    def __init__(self, seed: Sequence[int] = (), window: int | None = 10_000) -> None:
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        self._window: collections.deque[int] = collections.deque(maxlen=window)
        for length in seed:
            self._check(length)
            self._window.append(length)
        self._pending = 0
        self._sorted = SortedLengths.of(self._window)
        self.version = 0

    @staticmethod
    def _check(length: int) -> None:
        if length < 0:
            raise ValueError(f"prompt lengths must be >= 0, got {length}")

    def add(self, length: int) -> None:
        self._check(length)
        self._window.append(length)
        self._pending += 1
        if self._pending >= max(1, len(self._window) // 100):
            self._sorted = SortedLengths.of(self._window)
            self._pending = 0
            self.version += 1

    @property
    def sorted(self) -> SortedLengths:
        return self._sorted


# ----- DiSCo-S ---------------------------------------------------------------------------------


def disco_s_threshold(lengths: SortedLengths, share: float) -> float:
    """The smallest ``l_th`` with ``Σ_{l ≥ l_th} p(l)·l ≤ b·E[l]`` over the sample.

    Prompts with ``l ≥ l_th`` may use the server. Returns 0 when every prompt fits (``b = 1``),
    ``inf`` when ``b = 0``, and one more than the largest excluded length otherwise (so an
    integer threshold never splits prompts of equal length).
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"budget share must be in [0, 1], got {share!r}")
    if share == 0.0:
        return math.inf
    values, prefix = lengths.values, lengths.prefix
    total = lengths.total
    # Suffix sum from index j is total − prefix[j]; find the first j where it fits.
    j = bisect.bisect_left(prefix, total - share * total)
    if j == 0:
        return 0.0
    if j < len(values):
        j = bisect.bisect_right(values, values[j - 1])  # keep equal lengths together
    return float(values[j - 1] + 1)


# ----- DiSCo-D ---------------------------------------------------------------------------------


def survival(server_ttft_sorted: Sequence[float], wait_s: float | None) -> float:
    """Empirical ``P(TTFT_s > w)``: how often a fallback started at ``w`` actually starts.
    ``None`` (no fallback) gives 0."""
    if wait_s is None or not server_ttft_sorted:
        return 0.0
    m = len(server_ttft_sorted)
    return (m - bisect.bisect_right(server_ttft_sorted, wait_s)) / m


def _wait_for_survival(server_ttft_sorted: Sequence[float], target: float) -> float:
    """The smallest ``w`` in ``{0} ∪ samples`` with ``P(TTFT_s > w) ≤ target``."""
    m = len(server_ttft_sorted)
    allowed = math.floor(target * m + 1e-9)  # samples that may exceed w
    if allowed >= m:
        return 0.0
    return max(0.0, server_ttft_sorted[m - allowed - 1])


@dataclasses.dataclass(frozen=True, slots=True)
class WaitPlan:
    """DiSCo-D's ``w(l)`` as a piecewise rule (see :func:`disco_d_plan`).

    Fields:
        zero_below: prompts with ``l < zero_below`` start the device at once (``w = 0``).
        boundary_length / boundary_wait_s: the one length the budget covers partly, and its
            wait (``None``: no fallback).
        tail_wait_s: the tail-protection wait ``F_s⁻¹(q)`` (``None``: no tail fallback).
        tail_below: prompts shorter than this are short enough for the device to beat the
            server's tail; longer ones get no fallback.
        expected_share: the planned ``Σ p(l)·P(TTFT_s > w(l))·l / E[l]`` over the sample.
    """

    zero_below: float
    boundary_length: int | None
    boundary_wait_s: float | None
    tail_wait_s: float | None
    tail_below: float
    expected_share: float

    def wait_for(self, prompt_tokens: int) -> float | None:
        """``w(l)`` in seconds, or ``None`` when the device should not start at all."""
        if prompt_tokens == self.boundary_length:
            return self.boundary_wait_s
        if prompt_tokens < self.zero_below:
            return 0.0
        if self.tail_wait_s is not None and prompt_tokens < self.tail_below:
            return self.tail_wait_s
        return None


def _useful_below(device: DeviceSpeed, wait_s: float, server_max_s: float) -> float:
    """Lengths ``l`` below this bound can still win: ``w + TTFT_d(l) < max TTFT_s``."""
    slack = server_max_s - wait_s - device.prefill_a_s
    if device.prefill_c_s_per_token <= 0:
        return math.inf if slack > 0 else -math.inf
    return slack / device.prefill_c_s_per_token


def disco_d_plan(
    lengths: SortedLengths,
    server_ttft_sorted: Sequence[float],
    device: DeviceSpeed,
    share: float,
    tail_quantile: float = 0.95,
) -> WaitPlan:
    """DiSCo-D's wait times ``w(l)`` under a device budget ``b`` (reconstructed, two phases).

    The device's expected cost is ``Σ p(l)·P(TTFT_s > w(l))·l`` and must stay ``≤ b·E[l]``.

    1. Tail protection: ``w_tail = F_s⁻¹(q)``, ``q = tail_quantile``, for every prompt the
       device can still win with (``w_tail + TTFT_d(l) < max TTFT_s``). If that alone costs
       more than ``b·E[l]``, ``w_tail`` rises to the quantile that fits exactly.
    2. The rest of the budget lowers ``w(l)`` to 0 for the shortest prompts first. Lowering
       ``w`` from ``w_tail`` to 0 gains ``G(l) = E[min(S, w_tail + d_l)] − E[min(S, d_l)]`` of
       TTFT, and ``dG/dd_l = P(S > w_tail + d_l) − P(S > d_l) ≤ 0`` while ``d_l`` grows with
       ``l``: the gain per device token ``G(l)/l`` falls with ``l``, so shortest-first is the
       greedy order by gain per token. Only prompts with ``TTFT_d(l) < max TTFT_s`` qualify.
       The length where the budget runs out gets the quantile wait that spends exactly what
       is left.

    Lengths never seen between two sampled ones follow the same piecewise rule; the zero
    region ends just above the last length the budget fully covered, so an unseen length
    never gets more than its neighbours.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"budget share must be in [0, 1], got {share!r}")
    if not 0.0 <= tail_quantile <= 1.0:
        raise ValueError(f"tail_quantile must be in [0, 1], got {tail_quantile!r}")
    if not server_ttft_sorted:
        raise ValueError("the plan needs at least one server TTFT sample")
    values, prefix = lengths.values, lengths.prefix
    total = lengths.total
    budget = share * total
    server_max = server_ttft_sorted[-1]

    # Phase 1: tail protection.
    w_tail = _wait_for_survival(server_ttft_sorted, 1.0 - tail_quantile)
    base = lengths.sum_below(_useful_below(device, w_tail, server_max))
    if survival(server_ttft_sorted, w_tail) * base > budget:
        w_tail = _wait_for_survival(server_ttft_sorted, budget / base)
    tail_below = _useful_below(device, w_tail, server_max)
    surv_tail = survival(server_ttft_sorted, w_tail)
    tail_wait: float | None = w_tail if surv_tail > 0 else None
    j1 = bisect.bisect_left(values, tail_below)  # sample prompts under tail protection
    spent = surv_tail * prefix[j1]

    # Phase 2: shortest prompts to w = 0 while the rest of the budget lasts. At w = 0 the
    # device starts unless the server answered instantly, so it costs P(TTFT_s > 0)·l.
    left = budget - spent
    surv_zero = survival(server_ttft_sorted, 0.0)
    j2 = bisect.bisect_left(values, _useful_below(device, 0.0, server_max))

    def extra(j: int) -> float:  # cost of moving the j shortest sample prompts to w = 0
        k = min(j, j1)
        return (surv_zero - surv_tail) * prefix[k] + surv_zero * (prefix[j] - prefix[k])

    lo, hi = 0, j2  # largest j ≤ j2 with extra(j) ≤ left (extra is non-decreasing)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if extra(mid) <= left:
            lo = mid
        else:
            hi = mid - 1
    j = lo
    boundary: int | None = None
    boundary_wait: float | None = None
    if j < j2:
        boundary = values[j]
        j = bisect.bisect_left(values, boundary)  # ties of the boundary length stay together
        count = bisect.bisect_right(values, boundary) - j
        surv_now = surv_tail if j < j1 else 0.0
        weight = count * boundary
        target = surv_now + (left - extra(j)) / weight if weight else 1.0
        w = _wait_for_survival(server_ttft_sorted, min(1.0, target))
        # Worth starting only if the device can still win from there.
        if survival(server_ttft_sorted, w) > 0 and w + device.ttft(boundary) < server_max:
            boundary_wait = w
    zero_below = float(values[j - 1] + 1) if j > 0 else 0.0

    # The planned cost, region by region: w = 0, the boundary length, the tail.
    cost = surv_zero * prefix[j]
    after = j
    if boundary is not None:
        after = bisect.bisect_right(values, boundary)
        cost += survival(server_ttft_sorted, boundary_wait) * (prefix[after] - prefix[j])
    if after < j1:
        cost += surv_tail * (prefix[j1] - prefix[after])
    return WaitPlan(
        zero_below=zero_below,
        boundary_length=boundary,
        boundary_wait_s=boundary_wait,
        tail_wait_s=tail_wait,
        tail_below=tail_below,
        expected_share=cost / total if total else 0.0,
    )
