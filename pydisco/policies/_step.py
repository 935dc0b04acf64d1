"""The step scheduler's interface: what it sees of the engine at each step and what it decides.

Policy meets mechanism in two plain records, as in vLLM v1: the engine loop builds a
:class:`StepView` before each step and asks ``scheduler.schedule(view)`` for a :class:`StepPlan`
(who decodes, which prefill chunk runs, who is admitted, deferred, rejected or preempted); it runs
the plan and builds the next view. Schedulers are pure and synchronous — no I/O, no clock of
their own (``now_s`` is in the view) — so the same code runs in real time and under MockClock.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Protocol

from ._base import Slo


class Phase(enum.IntEnum):
    """Where a sequence is; ordered, so ``phase >= PREFILLING`` means it was admitted."""

    WAITING = 0  # arrived, not admitted
    PREFILLING = 1  # admitted, its prompt is being computed (chunk by chunk)
    DECODING = 2  # producing tokens
    PREEMPTED = 3  # admitted, paused by the scheduler; its KV is kept


@dataclasses.dataclass(frozen=True)
class SequenceView:
    """One sequence (an answer being generated) as the scheduler sees it.

    Fields:
        id: the engine's id for it.
        slo: its service level (``reading_rate`` is the rate it needs; ``realtime``,
            ``utility`` for SLICE).
        arrived_s: when it arrived (the view's clock).
        phase: see :class:`Phase`.
        prefill_tokens: tokens it must prefill in all (prompt and resumed prefix, less what a
            cached prefix already holds).
        prefilled: of those, computed so far.
        generated: tokens it has produced (delivered to its stream).
        max_new_tokens: tokens it may still produce at most.
        kv_tokens: KV cells it holds now.
        first_token_s: when its first token came, if it did.
        preemptions: times the scheduler preempted it.
        unread: its reader's unread buffer in tokens, as the loop knows it: the reader's own
            report brought forward by the tokens delivered since and the reading rate, else
            inferred from delivery times alone (``pydisco.batching.ReaderModel``). None when
            the loop models no reader for it (the scheduler then infers one itself).
    """

    id: int
    slo: Slo
    arrived_s: float
    phase: Phase
    prefill_tokens: int
    prefilled: int = 0
    generated: int = 0
    max_new_tokens: int = 128
    kv_tokens: int = 0
    first_token_s: float | None = None
    preemptions: int = 0
    unread: float | None = None

    @property
    def context_tokens(self) -> int:
        """The KV it needs to decode its next token: prefill plus generated so far."""
        return self.prefill_tokens + self.generated

    @property
    def worst_case_tokens(self) -> int:
        """The KV it may need by its end."""
        return self.prefill_tokens + self.generated + self.max_new_tokens


@dataclasses.dataclass(frozen=True)
class StepProfile:
    """Measured step latencies of the engine: ``decode_s[b-1]`` is one decode step with ``b``
    sequences, ``prefill_s_per_token`` the extra a prefill token adds to a step. Batch sizes
    beyond the table are extrapolated from its last two entries."""

    decode_s: tuple[float, ...]
    prefill_s_per_token: float

    def __post_init__(self) -> None:
        if not self.decode_s or any(not x > 0 for x in self.decode_s) or self.prefill_s_per_token < 0:
            raise ValueError("a step profile needs positive decode latencies and a prefill cost >= 0")

    def decode(self, batch: int) -> float:
        """``lat(b)``: seconds for one decode step of ``batch`` sequences (0 for none)."""
        if batch <= 0:
            return 0.0
        table = self.decode_s
        if batch <= len(table):
            return table[batch - 1]
        slope = table[-1] - table[-2] if len(table) > 1 else table[-1]
        return table[-1] + max(0.0, slope) * (batch - len(table))

    def step(self, batch: int, prefill_tokens: int = 0) -> float:
        return self.decode(batch) + self.prefill_s_per_token * prefill_tokens


@dataclasses.dataclass(frozen=True)
class StepView:
    """The engine before one step."""

    now_s: float
    sequences: Sequence[SequenceView]
    kv_capacity: int  # KV cells in all
    profile: StepProfile
    max_batch: int  # sequences one decode step can hold
    prefill_chunk: int  # most prefill tokens one step may carry

    @property
    def kv_used(self) -> int:
        return sum(s.kv_tokens for s in self.sequences)

    def by_id(self, seq_id: int) -> SequenceView:
        for s in self.sequences:
            if s.id == seq_id:
                return s
        raise KeyError(seq_id)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one step does. ``decode``: sequences (DECODING, or PREEMPTED being resumed) that
    each decode one token. ``prefill``: ``(id, tokens)``, one prefill chunk of an admitted
    sequence. ``admit``: WAITING sequences admitted (they prefill next). ``preempt``: sequences
    paused (KV kept). ``defer``/``reject``: ``(id, why)`` — deferred ones stay waiting and are
    told why; rejected ones end now (the runtime may send them to another endpoint)."""

    decode: tuple[int, ...] = ()
    prefill: tuple[int, int] | None = None
    admit: tuple[int, ...] = ()
    preempt: tuple[int, ...] = ()
    defer: tuple[tuple[int, str], ...] = ()
    reject: tuple[tuple[int, str], ...] = ()

    @property
    def idle(self) -> bool:
        return not self.decode and self.prefill is None


class StepScheduler(Protocol):
    name: str

    def schedule(self, view: StepView) -> StepPlan:
        """Decide one step. Pure: the same view (and the scheduler's own bookkeeping of what it
        decided before) gives the same plan."""
        ...
