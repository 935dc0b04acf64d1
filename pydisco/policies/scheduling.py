"""Step schedulers: which sequences of a batched engine decode at each step, which prefill chunk
runs, who is admitted, deferred, rejected or preempted. Pure and synchronous (``_step.py`` has
the interface; docs/policies.md the formulas and where they depart from the papers).

* ``fcfs`` — iteration-level first come, first served (Orca-like);
* ``fastserve`` — skip-join multi-level feedback queue (FastServe-like);
* ``slice`` — SLICE: utility-ordered admission under the feasibility test
  ``f(n) = r_n·lat(n) + Σ_{k<n}(r_k − r_{k+1})·lat(k) ≤ 1 s`` and a decode mask per cycle;
* ``andes`` — Andes: greedy QoE-gain priority ``(Q_serve − Q_wait)/l`` over a look-ahead, used
  only when memory or latency is short, with a bound on preemptions per request and preempted
  streams resumed before their reader's buffer drains.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from ..qoe import q_serve, q_wait
from ._step import Phase, SequenceView, StepPlan, StepProfile, StepView

__all__ = [
    "AndesScheduler",
    "FastServeScheduler",
    "FcfsScheduler",
    "SliceScheduler",
    "slice_feasibility",
]

Why = tuple[int, str]


def _impossible(view: StepView) -> list[Why]:
    """Waiting sequences that could never fit the KV cache, even alone."""
    return [
        (s.id, f"needs {s.worst_case_tokens} KV tokens; the engine has {view.kv_capacity}")
        for s in view.sequences
        if s.phase == Phase.WAITING and s.worst_case_tokens > view.kv_capacity
    ]


def _admitted(view: StepView) -> list[SequenceView]:
    return [s for s in view.sequences if s.phase >= Phase.PREFILLING]


def _reserved(sequences: Iterable[SequenceView]) -> int:
    """KV the sequences may need by their end (admission reserves it: nothing is evicted)."""
    return sum(s.worst_case_tokens for s in sequences)


def _first_prefill(order: Iterable[SequenceView], tokens: int) -> tuple[int, int] | None:
    """A chunk of at most ``tokens`` for the first sequence in ``order`` still prefilling."""
    for s in order:
        left = s.prefill_tokens - s.prefilled
        if (s.phase == Phase.PREFILLING or s.phase == Phase.WAITING) and left > 0:
            return s.id, max(1, min(tokens, left))
    return None


def _decodable(s: SequenceView) -> bool:
    return s.phase in (Phase.DECODING, Phase.PREEMPTED)


# ----- fcfs -----------------------------------------------------------------------------------


class FcfsScheduler:
    """Orca-like: every admitted sequence decodes at every step; newcomers are admitted in
    arrival order while a batch slot and their worst-case KV are free (never skipping ahead);
    the oldest admitted sequence still prefilling gets the step's prefill chunk."""

    name = "fcfs"

    def schedule(self, view: StepView) -> StepPlan:
        reject = _impossible(view)
        rejected = {i for i, _ in reject}
        by_arrival = sorted(view.sequences, key=lambda s: (s.arrived_s, s.id))
        admitted = [s for s in by_arrival if s.phase >= Phase.PREFILLING]
        reserved, slots = _reserved(admitted), view.max_batch - len(admitted)
        admit: list[SequenceView] = []
        defer: list[Why] = []
        for s in (s for s in by_arrival if s.phase == Phase.WAITING and s.id not in rejected):
            if not defer and slots > 0 and reserved + s.worst_case_tokens <= view.kv_capacity:
                admit.append(s)
                reserved, slots = reserved + s.worst_case_tokens, slots - 1
            else:
                defer.append((s.id, "queued: first come, first served"))
        return StepPlan(
            decode=tuple(s.id for s in admitted if _decodable(s)),
            prefill=_first_prefill(admitted + admit, view.prefill_chunk),
            admit=tuple(s.id for s in admit),
            defer=tuple(defer),
            reject=tuple(reject),
        )


# ----- fastserve --------------------------------------------------------------------------------


class FastServeScheduler:
    """FastServe-like skip-join MLFQ. Level ``k`` has a quantum of ``first_quantum·2^k`` tokens;
    a newcomer *skips* to the first level whose quantum of decode time covers its prefill time
    (a long prompt starts lower), and a sequence that used its level's quantum moves down. Each
    step serves the ``max_batch`` admitted sequences of the highest levels (oldest first within a
    level); a decoding sequence outside them is preempted (its KV kept). Newcomers are admitted in
    priority order while their worst-case KV fits."""

    name = "fastserve"

    def __init__(self, *, levels: int = 6, first_quantum: int = 4) -> None:
        if levels < 1 or first_quantum < 1:
            raise ValueError("fastserve needs levels >= 1 and first_quantum >= 1")
        self.levels = levels
        self.first_quantum = first_quantum
        self._level: dict[int, int] = {}
        self._used: dict[int, int] = {}  # tokens generated at the current level
        self._seen: dict[int, int] = {}  # generated count at the last step

    def quantum(self, level: int) -> int:
        return self.first_quantum << level

    def _skip_join(self, s: SequenceView, profile: StepProfile) -> int:
        prefill_s = profile.prefill_s_per_token * max(0, s.prefill_tokens - s.prefilled)
        for level in range(self.levels):
            if self.quantum(level) * profile.decode(1) >= prefill_s:
                return level
        return self.levels - 1

    def _update(self, view: StepView) -> None:
        present = {s.id for s in view.sequences}
        for table in (self._level, self._used, self._seen):
            for gone in set(table) - present:
                del table[gone]
        for s in view.sequences:
            if s.id not in self._level:
                self._level[s.id] = self._skip_join(s, view.profile)
                self._used[s.id], self._seen[s.id] = 0, s.generated
            self._used[s.id] += s.generated - self._seen[s.id]
            self._seen[s.id] = s.generated
            while self._used[s.id] >= self.quantum(self._level[s.id]) and self._level[s.id] < self.levels - 1:
                self._used[s.id] -= self.quantum(self._level[s.id])
                self._level[s.id] += 1

    def schedule(self, view: StepView) -> StepPlan:
        self._update(view)
        reject = _impossible(view)
        rejected = {i for i, _ in reject}
        order = sorted(
            (s for s in view.sequences if s.id not in rejected),
            key=lambda s: (self._level[s.id], s.arrived_s, s.id),
        )
        reserved = _reserved(_admitted(view))
        admit: list[SequenceView] = []
        defer: list[Why] = []
        for s in order:
            if s.phase != Phase.WAITING:
                continue
            if reserved + s.worst_case_tokens <= view.kv_capacity:
                admit.append(s)
                reserved += s.worst_case_tokens
            else:
                defer.append((s.id, "KV cache full"))
        admitted_now = {s.id for s in admit}
        served = [s for s in order if s.phase >= Phase.PREFILLING or s.id in admitted_now][: view.max_batch]
        served_ids = {s.id for s in served}
        return StepPlan(
            decode=tuple(s.id for s in served if _decodable(s)),
            prefill=_first_prefill(served, view.prefill_chunk),
            admit=tuple(s.id for s in admit),
            preempt=tuple(s.id for s in order if s.phase == Phase.DECODING and s.id not in served_ids),
            defer=tuple(defer),
            reject=tuple(reject),
        )


# ----- slice --------------------------------------------------------------------------------------


def slice_feasibility(rates: Sequence[float], profile: StepProfile) -> float:
    """SLICE's ``f(n)``: seconds of decoding one second of the tasks' required rates takes.

    With the rates sorted ``r_1 ≥ … ≥ r_n``: ``r_n`` steps run all n tasks, ``r_{n−1} − r_n``
    steps run n−1, …: ``f(n) = r_n·lat(n) + Σ_{k<n}(r_k − r_{k+1})·lat(k)``. Feasible iff ≤ 1 s.
    """
    r = sorted(rates, reverse=True)
    n = len(r)
    if n == 0:
        return 0.0
    return r[-1] * profile.decode(n) + sum((r[k - 1] - r[k]) * profile.decode(k) for k in range(1, n))


def _spread_order(columns: int) -> list[int]:
    """The columns of a cycle in an order whose every prefix is spread evenly over the cycle
    (the van der Corput sequence, in base 2), so a task given its first k columns gets k evenly
    spaced steps, and tasks with fewer steps use a subset of the columns of those with more."""
    bits = max(1, math.ceil(math.log2(columns))) if columns > 1 else 1
    order: list[int] = []
    for i in range(1 << bits):
        rev = int(f"{i:0{bits}b}"[::-1], 2)
        position = rev * columns >> bits
        if position not in order:
            order.append(position)
    order += [c for c in range(columns) if c not in order]
    return order


class SliceScheduler:
    """SLICE. Each task needs ``⌈r_i⌉`` decode steps per ``cycle_s`` (``r_i = slo.reading_rate``).

    Admission: waiting tasks in four queues — real-time short, real-time long, non-real-time
    short, non-real-time long (``short``: prefill + max_new_tokens ≤ ``short_tokens``) — each by
    utility, are admitted greedily while the admitted set stays feasible (``f(n) ≤ cycle_s``) and
    its worst-case KV fits and its first token can come within its TTFT (``first_tokens_at``:
    prefill in the cycle's slack, in admission order). A task that is infeasible even alone is
    rejected; one that does not fit beside the admitted ones is deferred, with the figure that
    says why (docs/policies.md: the first-token test is pydisco's, not the paper's).

    Rate control: a decode mask over ``C = max ⌈r_i⌉`` columns; task i is set in ``⌈r_i⌉`` evenly
    spread columns, the columns of slower tasks a subset of the faster ones' (so the cycle takes
    exactly ``f(n)`` with the ceilings), and each step decodes the current column's tasks. The mask
    is rebuilt when a task starts or stops decoding. Prefill of newcomers rides along, one chunk a
    step, sized to the cycle's slack: ``(cycle_s − f(n)) / (C·c)`` tokens, at least one.
    """

    name = "slice"

    def __init__(self, *, cycle_s: float = 1.0, short_tokens: int = 256) -> None:
        if not cycle_s > 0 or short_tokens < 1:
            raise ValueError("slice needs cycle_s > 0 and short_tokens >= 1")
        self.cycle_s = cycle_s
        self.short_tokens = short_tokens
        self._mask: list[tuple[int, ...]] = []
        self._mask_for: tuple[tuple[int, int], ...] = ()
        self._column = 0

    @staticmethod
    def steps_needed(s: SequenceView) -> int:
        return math.ceil(s.slo.reading_rate - 1e-9)

    def queue(self, s: SequenceView) -> tuple[int, float, float, int]:
        """Admission order: real-time first, short before long, by utility, then arrival."""
        long = s.prefill_tokens + s.max_new_tokens > self.short_tokens
        return (0 if s.slo.realtime else 2) + (1 if long else 0), -s.slo.weight, s.arrived_s, s.id

    def cycle_time(self, tasks: Iterable[SequenceView], profile: StepProfile) -> float:
        return slice_feasibility([self.steps_needed(s) for s in tasks], profile)

    def _admission(self, view: StepView, admitted: list[SequenceView]) -> tuple[list[SequenceView], list[Why], list[Why]]:
        reject = _impossible(view)
        rejected = {i for i, _ in reject}
        admit: list[SequenceView] = []
        defer: list[Why] = []
        reserved = _reserved(admitted)
        waiting = sorted((s for s in view.sequences if s.phase == Phase.WAITING and s.id not in rejected), key=self.queue)
        for s in waiting:
            alone = self.cycle_time([s], view.profile)
            together = self.cycle_time([*admitted, *admit, s], view.profile)
            if alone > self.cycle_s:
                reject.append((s.id, f"{self.steps_needed(s)} tokens/s alone needs {alone:.3f} s of decoding per {self.cycle_s:g} s"))
            elif together > self.cycle_s or len(admitted) + len(admit) >= view.max_batch:
                defer.append((s.id, f"beside the admitted tasks it needs f(n) = {together:.3f} s per {self.cycle_s:g} s"))
            elif reserved + s.worst_case_tokens > view.kv_capacity:
                defer.append((s.id, "KV cache full"))
            elif (late := self._first_token_misses(view, [*admitted, *admit], s)) is not None:
                why, hopeless = late
                (reject if hopeless else defer).append((s.id, why))
            else:
                admit.append(s)
                reserved += s.worst_case_tokens
        return admit, defer, reject

    def first_tokens_at(self, tasks: Sequence[SequenceView], profile: StepProfile, now_s: float) -> dict[int, float]:
        """When each task still prefilling gets its first token, if prefill has the cycle's slack
        (``1 − f(n)/cycle_s`` of the time, at ``c`` s a token) and runs in admission order."""
        c = profile.prefill_s_per_token
        share = 1.0 - self.cycle_time(tasks, profile) / self.cycle_s
        seconds_per_token = c / share if share > 0 else math.inf
        at: dict[int, float] = {}
        backlog = 0
        for t in sorted(tasks, key=self.queue):
            left = t.prefill_tokens - t.prefilled
            if t.phase in (Phase.WAITING, Phase.PREFILLING) and left > 0:
                backlog += left
                at[t.id] = now_s + (backlog * seconds_per_token if c > 0 else 0.0)
        return at

    def _first_token_misses(self, view: StepView, admitted: list[SequenceView], s: SequenceView) -> tuple[str, bool] | None:
        """Why admitting ``s`` now would miss a TTFT, and whether to reject it (else defer), or
        None. Its own: a real-time task that cannot make it even with the engine to itself is
        rejected, one that could is deferred; a non-real-time task that cannot make it anyway is
        served best effort, one that could is deferred. And an admitted task's that it would
        push past (deferred)."""
        now, profile = view.now_s, view.profile
        before = self.first_tokens_at(admitted, profile, now)
        after = self.first_tokens_at([*admitted, s], profile, now)
        own_deadline = s.arrived_s + s.slo.ttft_target_s
        if after.get(s.id, now) > own_deadline:
            alone_ends = now + (s.prefill_tokens - s.prefilled) * profile.prefill_s_per_token
            hopeless = alone_ends > own_deadline
            if s.slo.realtime and hopeless:
                return (f"its first token cannot come within its TTFT of {s.slo.ttft_target_s:g} s (its prefill alone "
                        f"ends {alone_ends - s.arrived_s:.2f} s after it arrived)"), True  # fmt: skip
            if s.slo.realtime or not hopeless:
                return (f"behind the prefill ahead of it, its first token would come {after[s.id] - s.arrived_s:.2f} s "
                        f"after it arrived (TTFT {s.slo.ttft_target_s:g} s)"), False  # fmt: skip
        for t in admitted:
            if t.id in after and before[t.id] <= t.arrived_s + t.slo.ttft_target_s < after[t.id]:
                return f"it would delay task {t.id}'s first token past its TTFT ({t.slo.ttft_target_s:g} s)", False
        return None

    def _rebuild_mask(self, decoding: list[SequenceView]) -> None:
        key = tuple(sorted((s.id, self.steps_needed(s)) for s in decoding))
        if key == self._mask_for:
            return
        self._mask_for = key
        ranked = sorted(decoding, key=lambda s: (-self.steps_needed(s), s.id))
        columns = self.steps_needed(ranked[0]) if ranked else 0
        order = _spread_order(columns)
        mask: list[list[int]] = [[] for _ in range(columns)]
        for s in ranked:
            for c in order[: self.steps_needed(s)]:
                mask[c].append(s.id)
        self._mask = [tuple(col) for col in mask]
        self._column = 0

    def schedule(self, view: StepView) -> StepPlan:
        admitted = sorted(_admitted(view), key=self.queue)
        admit, defer, reject = self._admission(view, admitted)
        self._rebuild_mask([s for s in admitted if _decodable(s)])
        decode: tuple[int, ...] = ()
        if self._mask:
            decode = self._mask[self._column % len(self._mask)]
            self._column = (self._column + 1) % len(self._mask)
        c = view.profile.prefill_s_per_token
        chunk = view.prefill_chunk
        if self._mask and c > 0:
            slack = self.cycle_s - self.cycle_time(admitted + admit, view.profile)
            chunk = max(1, min(chunk, math.floor(slack / (len(self._mask) * c))))
        return StepPlan(
            decode=decode,
            prefill=_first_prefill(sorted(admitted + admit, key=self.queue), chunk),
            admit=tuple(s.id for s in admit),
            defer=tuple(defer),
            reject=tuple(reject),
        )


# ----- andes --------------------------------------------------------------------------------------


class AndesScheduler:
    """Andes' QoE-aware preemptive scheduler.

    While memory and latency suffice (KV use ≤ ``kv_trigger`` of capacity and one step of the
    whole batch is faster than the strictest reader's interval), it serves like FCFS. When either
    is short, each step picks the batch greedily: first the streams that reached
    ``max_preemptions`` (they are never preempted again), then preempted streams whose reader's
    buffer has fallen below ``resume_margin_s`` of reading (resumed before it drains), then
    decoding streams whose buffer holds less than ``preempt_slack_s`` of reading (too little
    slack for a preemption to buy: they keep decoding), then the rest by
    ``(Q_serve − Q_wait)/l`` (QoE gained per KV token over ``lookahead_s``, ``pydisco.qoe``), up
    to the largest batch whose step latency keeps pace with the strictest reader and while their
    context fits the KV capacity. Decoding streams not picked
    are preempted (their KV kept), so only streams whose reader has slack are. A reader's buffer
    is the view's ``unread`` when the loop models the reader (a server: from its client's
    reports and delivery times), else inferred here: ``generated − r·(now − first_token)``.
    """

    name = "andes"

    def __init__(
        self,
        *,
        lookahead_s: float = 1.0,
        kv_trigger: float = 0.9,
        max_preemptions: int = 1,
        resume_margin_s: float = 0.5,
        preempt_slack_s: float = 4.0,
    ) -> None:
        if not (lookahead_s > 0 and 0 < kv_trigger <= 1 and max_preemptions >= 0 and 0 <= resume_margin_s <= preempt_slack_s):
            raise ValueError("andes needs lookahead_s > 0, 0 < kv_trigger <= 1, max_preemptions >= 0, "
                             "0 <= resume_margin_s <= preempt_slack_s")
        self.lookahead_s = lookahead_s
        self.kv_trigger = kv_trigger
        self.max_preemptions = max_preemptions
        self.resume_margin_s = resume_margin_s
        self.preempt_slack_s = preempt_slack_s
        self._fcfs = FcfsScheduler()

    @staticmethod
    def buffer(s: SequenceView, now_s: float) -> float:
        """Tokens the reader has not read yet."""
        if s.unread is not None:
            return float(s.unread)
        if s.first_token_s is None:
            return 0.0
        return max(0.0, s.generated - s.slo.reading_rate * (now_s - s.first_token_s))

    def priority(self, s: SequenceView, now_s: float, token_latency_s: float) -> float:
        elapsed = max(0.0, now_s - s.arrived_s)
        rate = s.slo.reading_rate
        serve = q_serve(elapsed, s.generated, rate, self.lookahead_s, token_latency_s)
        wait = q_wait(elapsed, s.generated, rate, self.lookahead_s)
        return (serve - wait) / max(1, s.context_tokens)

    def _pinned(self, s: SequenceView) -> bool:
        """Decoding and at its preemption bound: it keeps its place until it ends."""
        return s.phase == Phase.DECODING and s.preemptions >= self.max_preemptions

    def _holds_less_than(self, s: SequenceView, now_s: float, seconds: float) -> bool:
        """Its reader holds less than ``seconds`` of reading unread."""
        return self.buffer(s, now_s) < s.slo.reading_rate * seconds

    def _rank(self, s: SequenceView, now_s: float) -> int:
        """0: pinned; 1: preempted and draining (resumed before its reader runs dry); 2: decoding
        with no slack to give (not preempted while there is room); 3: the rest, by QoE gain."""
        if self._pinned(s):
            return 0
        if s.phase == Phase.PREEMPTED and self._holds_less_than(s, now_s, self.resume_margin_s):
            return 1  # about to run dry: resumed now
        if s.phase == Phase.DECODING and self._holds_less_than(s, now_s, self.preempt_slack_s):
            return 2  # too little slack for a preemption to buy
        return 3

    def triggered(self, view: StepView) -> bool:
        live = [s for s in view.sequences if s.phase != Phase.WAITING or s.worst_case_tokens <= view.kv_capacity]
        if not live:
            return False
        strictest = 1.0 / max(s.slo.reading_rate for s in live)
        batch = min(view.max_batch, len(live))
        return view.kv_used > self.kv_trigger * view.kv_capacity or view.profile.decode(batch) > strictest or len(live) > view.max_batch

    def schedule(self, view: StepView) -> StepPlan:
        if not self.triggered(view):
            return self._fcfs.schedule(view)
        now = view.now_s
        reject = _impossible(view)
        rejected = {i for i, _ in reject}
        candidates = [s for s in view.sequences if s.id not in rejected]
        strictest = 1.0 / max(s.slo.reading_rate for s in candidates)
        batch = 1
        while batch < view.max_batch and view.profile.decode(batch + 1) <= strictest:
            batch += 1
        latency = view.profile.decode(batch)
        ranked = sorted(candidates, key=lambda s: (self._rank(s, now), -self.priority(s, now, latency), s.arrived_s, s.id))
        chosen: list[SequenceView] = []
        kv = 0
        for s in ranked:
            if self._pinned(s) or (len(chosen) < batch and kv + s.context_tokens <= view.kv_capacity):
                chosen.append(s)
                kv += s.context_tokens
        chosen_ids = {s.id for s in chosen}
        admit = [s for s in chosen if s.phase == Phase.WAITING]
        return StepPlan(
            decode=tuple(s.id for s in chosen if _decodable(s)),
            prefill=_first_prefill(chosen, view.prefill_chunk),
            admit=tuple(s.id for s in admit),
            preempt=tuple(s.id for s in candidates if s.phase == Phase.DECODING and s.id not in chosen_ids and not self._pinned(s)),
            defer=tuple((s.id, "not picked this step (QoE priority)") for s in candidates if s.phase == Phase.WAITING and s.id not in chosen_ids),
            reject=tuple(reject),
        )
