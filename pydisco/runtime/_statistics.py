"""What a runtime has done since it opened, summed over its answers' reports
(``Runtime.statistics()``): for a dashboard or the Prometheus exporter
(``pydisco.observability.RuntimeCollector``). Each answer is counted once, when its stream block
ends, from its report — nothing here is measured a second way."""

from __future__ import annotations

import bisect
import collections
import dataclasses
from collections.abc import Mapping

from ..policies._base import AnswerOutcome, Budget
from ..policies._budget import BudgetLedger
from ._report import AnswerReport

# Upper bounds of the QoE histogram's buckets (QoE is in [0, 1]; most answers sit near 1, so
# the buckets are finer there).
QOE_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


@dataclasses.dataclass(frozen=True)
class RuntimeStatistics:
    """A runtime's answers so far.

    Fields:
        answers: answers streamed (their stream block ended).
        answers_by_outcome: by finish reason ("stop", "length", "failed", "cancelled").
        answers_by_endpoint: answers each endpoint committed at least one token to.
        tokens_by_endpoint: tokens each endpoint committed (what the readers got from it).
        migrations: handovers a migration policy (or P/D-Device's plan) decided.
        failovers: handovers because the endpoint generating failed.
        late_tokens: tokens released more than 1 ms after their pacing deadline.
        qoe_buckets: ``(upper bound, answers with QoE <= it)``, cumulative, for ``QOE_BUCKETS``.
        qoe_sum: the answers' QoE summed (mean QoE = qoe_sum / answers).
        budget: the configured budget (which endpoint, what share it may process).
        budget_share_spent: the share of the workload's tokens the budget's endpoint processed
            (DiSCo's ledger: prompt and answer tokens, each answer counted at its largest size).
    """

    answers: int
    answers_by_outcome: Mapping[str, int]
    answers_by_endpoint: Mapping[str, int]
    tokens_by_endpoint: Mapping[str, int]
    migrations: int
    failovers: int
    late_tokens: int
    qoe_buckets: tuple[tuple[float, int], ...]
    qoe_sum: float
    budget: Budget
    budget_share_spent: float


class StatisticsRecorder:
    """Sums the reports of a runtime's answers."""

    def __init__(self, budget: Budget) -> None:
        self._budget = budget
        self._ledger = BudgetLedger()
        self._outcomes: collections.Counter[str] = collections.Counter()
        self._by_endpoint: collections.Counter[str] = collections.Counter()
        self._tokens: collections.Counter[str] = collections.Counter()
        self._handovers: collections.Counter[str] = collections.Counter()
        self._late = 0
        self._qoe_counts = [0] * (len(QOE_BUCKETS) + 1)  # the last: above every bound (never, for QoE <= 1)
        self._qoe_sum = 0.0

    def record(self, report: AnswerReport, outcome: AnswerOutcome) -> None:
        self._ledger.record(outcome)
        self._outcomes[report.finish_reason] += 1
        self._by_endpoint.update(report.endpoints_used)
        for name, usage in report.usage.items():
            self._tokens[name] += usage.generated_tokens
        self._handovers.update(m.kind for m in report.migrations)
        self._late += report.late_tokens
        self._qoe_counts[bisect.bisect_left(QOE_BUCKETS, report.qoe)] += 1
        self._qoe_sum += report.qoe

    def statistics(self) -> RuntimeStatistics:
        cumulative, total = [], 0
        for bound, count in zip(QOE_BUCKETS, self._qoe_counts):
            total += count
            cumulative.append((bound, total))
        return RuntimeStatistics(
            answers=self._ledger.answers,
            answers_by_outcome=dict(self._outcomes),
            answers_by_endpoint=dict(self._by_endpoint),
            tokens_by_endpoint=dict(self._tokens),
            migrations=self._handovers["migration"],
            failovers=self._handovers["failover"],
            late_tokens=self._late,
            qoe_buckets=tuple(cumulative),
            qoe_sum=self._qoe_sum,
            budget=self._budget,
            budget_share_spent=self._ledger.share(self._budget.constrained),
        )
