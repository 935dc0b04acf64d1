"""What the runtime reports about one answer."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True, slots=True)
class Piece:
    """One token of the answer as the application receives it.

    ``released_s`` is when the pacer released it, in seconds since the request started.
    """

    position: int
    text: str
    token_id: int
    endpoint: str
    released_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class MigrationRecord:
    """One change of the endpoint that decodes the answer (seconds since the request).

    ``kind`` is "migration" (a policy moved the answer) or "failover" (the source failed).
    ``handover_position`` is the first position the target produced. ``gap_s`` is from the
    handover (source stopped, or failure noticed) to the target's first committed token.
    """

    kind: str
    source: str
    target: str
    decided_s: float
    handover_s: float
    taken_over_s: float
    handover_position: int

    @property
    def gap_s(self) -> float:
        return self.taken_over_s - self.handover_s


@dataclasses.dataclass(frozen=True, slots=True)
class EndpointUsage:
    """What one endpoint did for this answer."""

    generated_tokens: int  # tokens it delivered that were committed
    offered_tokens: int  # tokens it produced (committed or dropped as duplicates)
    prefilled_tokens: int  # prompt + prefix tokens it computed
    cost: float  # (prefilled + offered) × the endpoint's cost per token


@dataclasses.dataclass(frozen=True, slots=True)
class AnswerReport:
    """The report of one answer: timing as the reader saw it, QoE, and who did what."""

    text: str
    tokens: int
    finish_reason: str  # "stop", "length", "cancelled", "failed"
    dispatch: str  # the dispatch policy's decision, in words
    ttft_s: float | None  # request start to the first released token
    tbt_s: tuple[float, ...]  # gaps between consecutive released tokens
    qoe: float  # Andes' QoE for the answer's SLO
    endpoints_used: tuple[str, ...]  # endpoints that committed at least one token, in order
    migrations: tuple[MigrationRecord, ...]
    usage: Mapping[str, EndpointUsage]
    late_tokens: int  # tokens released later than their pacing deadline by more than 1 ms
    max_lateness_s: float

    @property
    def total_cost(self) -> float:
        return sum(u.cost for u in self.usage.values())

    def summary(self) -> str:
        """A few human-readable lines."""
        ttft = f"{self.ttft_s * 1e3:.1f} ms" if self.ttft_s is not None else "-"
        tbt = sorted(self.tbt_s)
        tbt_p50 = f"{tbt[len(tbt) // 2] * 1e3:.1f} ms" if tbt else "-"
        lines = [
            f"tokens {self.tokens} ({self.finish_reason}), TTFT {ttft}, TBT p50 {tbt_p50}, QoE {self.qoe:.3f}",
            f"dispatch: {self.dispatch}",
            "endpoints: " + (", ".join(self.endpoints_used) or "-"),
        ]
        for m in self.migrations:
            lines.append(
                f"{m.kind} {m.source} -> {m.target} at token {m.handover_position}: "
                f"gap {m.gap_s * 1e3:.1f} ms"
            )
        for name, u in sorted(self.usage.items()):
            lines.append(
                f"{name}: {u.generated_tokens} tokens committed, {u.prefilled_tokens} prefilled, cost {u.cost:.4f}"
            )
        lines.append(f"late tokens {self.late_tokens}, max lateness {self.max_lateness_s * 1e3:.2f} ms")
        return "\n".join(lines)
