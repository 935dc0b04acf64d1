"""The step schedulers: hand-computed cases for SLICE's feasibility, admission and decode mask and
for Andes' priorities and preemption bound, and properties of every scheduler over random
workloads in a simulated engine (virtual time: steps take the profile's latency)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydisco import ConfigurationError
from pydisco.policies import (
    AndesScheduler,
    Phase,
    SequenceView,
    Slo,
    StepPlan,
    StepProfile,
    StepView,
    create_step_scheduler,
    slice_feasibility,
    step_scheduler_names,
)
from pydisco.qoe import q_serve, q_wait

PROFILE = StepProfile(decode_s=(0.010, 0.015, 0.018, 0.020), prefill_s_per_token=0.0005)
CONTROL = Slo(ttft_target_s=0.5, reading_rate=20.0, realtime=True)  # TPOT 50 ms
CHAT = Slo(ttft_target_s=2.0, reading_rate=1 / 0.12)  # TPOT 120 ms


def seq(i: int, slo: Slo = CHAT, phase: Phase = Phase.WAITING, **kw: object) -> SequenceView:
    base: dict[str, object] = dict(arrived_s=float(i), prefill_tokens=32, max_new_tokens=64)
    base.update(kw)
    return SequenceView(id=i, slo=slo, phase=phase, **base)  # type: ignore[arg-type]


def view(*sequences: SequenceView, now: float = 10.0, kv: int = 4096, batch: int = 8, profile: StepProfile = PROFILE) -> StepView:
    return StepView(now_s=now, sequences=sequences, kv_capacity=kv, profile=profile, max_batch=batch, prefill_chunk=64)


def test_the_registry_knows_the_four_schedulers() -> None:
    assert step_scheduler_names() == ("andes", "fastserve", "fcfs", "slice")
    with pytest.raises(ConfigurationError, match="unknown step scheduler 'nope'"):
        create_step_scheduler("nope")


# ----- SLICE -----------------------------------------------------------------------------------


def test_slice_feasibility_by_hand() -> None:
    # r = 20, 10, 5: 5 steps at batch 3, 5 at batch 2, 10 at batch 1.
    assert slice_feasibility([5, 20, 10], PROFILE) == pytest.approx(5 * 0.018 + 5 * 0.015 + 10 * 0.010)
    assert slice_feasibility([], PROFILE) == 0.0
    # Beyond the table: extrapolated from its last two entries (2 ms per sequence more).
    assert PROFILE.decode(6) == pytest.approx(0.024)


def test_slice_admits_by_utility_while_feasible_and_says_why_not() -> None:
    slow = StepProfile(decode_s=(0.030, 0.045, 0.060, 0.075), prefill_s_per_token=0.0001)  # prefill no constraint
    scheduler = create_step_scheduler("slice")
    # A chat task arrived first; two control tasks later. Real-time goes first:
    # two control tasks: f = 20·0.045 = 0.9 s ≤ 1; adding the chat task (⌈8.33⌉ = 9 steps):
    # 9·0.060 + 11·0.045 = 1.035 s > 1 → deferred, with the figure.
    plan = scheduler.schedule(view(seq(0, CHAT, arrived_s=9.8), seq(1, CONTROL, arrived_s=9.9), seq(2, CONTROL, arrived_s=9.95),
                                   profile=slow))  # fmt: skip
    assert plan.admit == (1, 2)
    ((deferred, why),) = plan.defer
    assert deferred == 0 and "f(n) = 1.035 s" in why
    # A task whose rate alone cannot be met is rejected, not left waiting.
    greedy = Slo(ttft_target_s=1.0, reading_rate=40.0, realtime=True)  # 40·0.030 = 1.2 s
    plan = create_step_scheduler("slice").schedule(view(seq(3, greedy), profile=slow))
    assert plan.reject and plan.reject[0][0] == 3 and "1.200 s" in plan.reject[0][1]


def test_slice_admits_only_where_the_prefill_ahead_leaves_time_for_the_first_token() -> None:
    # 2 ms a prefill token. A control task decodes and a chat task of 300 tokens prefills
    # (alone they take f = 9·0.015 + 11·0.010 = 0.245 s of each second: its prefill would end
    # at 10 + 300·2/0.755 ms = 10.795 s ≤ 11.9).
    profile = StepProfile(decode_s=(0.010, 0.015, 0.018, 0.020), prefill_s_per_token=0.002)
    decoding = seq(1, CONTROL, Phase.DECODING, arrived_s=9.0)
    chat = seq(2, CHAT, Phase.PREFILLING, arrived_s=9.9, prefill_tokens=300)
    # A new control task (100 tokens, TTFT 0.5 s) prefills first (real-time): with it f =
    # 9·0.018 + 11·0.015 = 0.327 s, 2/0.673 = 2.972 ms a token: its first token at 10.297 s ≤
    # 10.5, the chat task's after 400 tokens at 11.189 s ≤ 11.9. Admitted; its chunk is the
    # slack over the cycle's 20 steps: 0.673 / (20 · 2 ms) = 16 tokens.
    control = seq(3, CONTROL, arrived_s=10.0, prefill_tokens=100)
    plan = create_step_scheduler("slice").schedule(view(decoding, chat, control, profile=profile))
    assert plan.admit == (3,) and plan.prefill == (3, 16)  # real-time prefills first
    # 200 tokens instead: 10.594 s > 10.5, but alone it would end at 10.4: deferred, and says why.
    control = seq(3, CONTROL, arrived_s=10.0, prefill_tokens=200)
    plan = create_step_scheduler("slice").schedule(view(decoding, chat, control, profile=profile))
    assert plan.admit == () and plan.defer[0][0] == 3 and "0.59 s after it arrived" in plan.defer[0][1]
    # 300 tokens: even alone its prefill ends at 10.6 s > 10.5: rejected at once (the runtime may
    # send it elsewhere), rather than deferred until too late.
    control = seq(3, CONTROL, arrived_s=10.0, prefill_tokens=300)
    plan = create_step_scheduler("slice").schedule(view(decoding, chat, control, profile=profile))
    assert plan.reject[0][0] == 3 and "cannot come within its TTFT of 0.5 s" in plan.reject[0][1]


def test_slice_serves_a_late_chat_task_best_effort_unless_it_delays_another() -> None:
    profile = StepProfile(decode_s=(0.010, 0.015, 0.018, 0.020), prefill_s_per_token=0.002)
    # A chat task that waited 1.9 s of its 2 s with 200 tokens to prefill (0.4 s alone) misses its
    # TTFT whatever happens: admitted all the same (a chat answer late beats none).
    late = seq(2, CHAT, arrived_s=8.1, prefill_tokens=200)
    plan = create_step_scheduler("slice").schedule(view(late, profile=profile))
    assert plan.admit == (2,)
    # ...but not ahead of a prefilling control task it would push past that one's TTFT: the
    # control task's 150 tokens alone: 0.2 s decode share → first token at 10.0 + 150·2.5 ms =
    # 10.375 ≤ 10.4; with the chat task decoding beside it f = 9·0.015 + 11·0.010 = 0.245 s:
    # 150·2/0.755 ms = 0.397 s → 10.397 s still ≤ 10.4: admitted. With 155 tokens: 10.388 →
    # 10.411 > 10.4: deferred.
    for tokens, admitted in ((150, True), (155, False)):
        control = seq(1, CONTROL, Phase.PREFILLING, arrived_s=9.9, prefill_tokens=tokens)
        plan = create_step_scheduler("slice").schedule(view(control, late, profile=profile))
        assert (plan.admit == (2,)) is admitted, (tokens, plan)
        if not admitted:
            assert "delay task 1's first token" in plan.defer[0][1]


def test_slice_mask_gives_each_task_its_rate_evenly_and_nested() -> None:
    scheduler = create_step_scheduler("slice")
    decoding = [
        seq(1, CONTROL, Phase.DECODING),  # 20 steps a cycle
        seq(2, Slo(reading_rate=10.0), Phase.DECODING),  # 10
        seq(3, CHAT, Phase.DECODING),  # ⌈8.33⌉ = 9
        seq(4, Slo(reading_rate=3.0), Phase.DECODING),  # 3
    ]
    columns = [scheduler.schedule(view(*decoding)).decode for _ in range(20)]
    counts = {i: sum(i in c for c in columns) for i in (1, 2, 3, 4)}
    assert counts == {1: 20, 2: 10, 3: 9, 4: 3}
    # Nested: a slower task decodes only in steps where every faster one does.
    for column in columns:
        assert sorted(column) == list(range(1, len(column) + 1))
    # Evenly: the 3-a-cycle task's steps are at least 5 apart (20/3 ≈ 6.7).
    steps = [k for k, c in enumerate(columns) if 4 in c]
    assert min(b - a for a, b in zip(steps, steps[1:] + [steps[0] + 20])) >= 5
    # The cycle takes exactly f(n) with the ceilings.
    assert sum(PROFILE.decode(len(c)) for c in columns) == pytest.approx(slice_feasibility([20, 10, 9, 3], PROFILE))


def test_slice_prefill_chunk_fits_the_cycles_slack() -> None:
    scheduler = create_step_scheduler("slice")
    plan = scheduler.schedule(view(seq(1, CONTROL, Phase.DECODING), seq(2, CHAT, Phase.PREFILLING, prefill_tokens=500)))
    # f = 9·0.015 + 11·0.010 = 0.245 s; slack 0.755 s over 20 steps at 0.5 ms a token: 75 → 64.
    assert plan.prefill == (2, 64)
    tight = StepProfile(decode_s=(0.04, 0.048), prefill_s_per_token=0.001)
    plan = create_step_scheduler("slice").schedule(
        view(seq(1, CONTROL, Phase.DECODING), seq(2, CHAT, Phase.PREFILLING, prefill_tokens=500), profile=tight)
    )
    # f = 9·0.048 + 11·0.040 = 0.872; slack 0.128 over 20 steps: 6 tokens a step.
    assert plan.prefill == (2, 6)


# ----- Andes -----------------------------------------------------------------------------------


def test_andes_serves_like_fcfs_while_nothing_is_short() -> None:
    sequences = [seq(i, CHAT, Phase.DECODING, generated=5) for i in range(3)]
    plan = create_step_scheduler("andes").schedule(view(*sequences))
    assert plan.decode == (0, 1, 2) and plan.preempt == ()


def test_andes_picks_by_qoe_gain_per_token_when_short_and_bounds_preemptions() -> None:
    # Four streams, room for two at the strictest reader's pace (lat(2) = 15 ms ≤ 1/20 s <
    # lat(3)? no: make the batch limit bind instead): max_batch 2.
    fast = Slo(reading_rate=20.0)
    now = 10.0
    behind = seq(0, fast, Phase.DECODING, generated=50, first_token_s=0.5, arrived_s=0.0)  # far behind its reader
    ahead = seq(1, fast, Phase.DECODING, generated=400, first_token_s=0.5, arrived_s=0.0)  # buffer of ~210 tokens
    fresh = seq(2, fast, Phase.WAITING, arrived_s=9.0)
    done_once = seq(3, fast, Phase.DECODING, generated=300, first_token_s=0.5, arrived_s=0.0, preemptions=1)
    scheduler = create_step_scheduler("andes", lookahead_s=1.0, max_preemptions=1)
    plan = scheduler.schedule(view(behind, ahead, fresh, done_once, now=now, batch=2))
    # done_once reached the bound: it is served. The other slot goes to the highest
    # (Q_serve − Q_wait)/l, computed by hand below.
    latency = PROFILE.decode(2)

    def priority(s: SequenceView) -> float:
        e = now - s.arrived_s
        return (q_serve(e, s.generated, 20.0, 1.0, latency) - q_wait(e, s.generated, 20.0, 1.0)) / max(1, s.context_tokens)

    # By hand: fresh waited 1 s with nothing: E = (1 + 1)·20 = 40, Q_wait = 0, Q_serve =
    # ((0 + 1/0.05)/40)² = 0.25, per 32 tokens of context. behind, 170 tokens short of E = 220,
    # gets Q_serve = (70/220)² < Q_wait = 1 − (170/220)²: Andes' estimates favour the new one.
    assert priority(fresh) == pytest.approx(0.25 / 32)
    assert priority(behind) < 0 < priority(fresh) and max((behind, ahead, fresh), key=priority) is fresh
    # But behind's reader has nothing left to read (50 − 20·9.5 < 0): no slack to give, so it
    # keeps the other slot; ahead, ~210 tokens ahead of its reader, is the one preempted, and
    # fresh waits for a slot. done_once is never preempted again.
    assert set(plan.decode) == {0, 3} and plan.admit == () and plan.preempt == (1,)
    assert [i for i, _ in plan.defer] == [2]
    ahead_relaxed = scheduler.schedule(view(dataclasses.replace(behind, unread=100), ahead, fresh, done_once, now=now, batch=2))
    assert ahead_relaxed.admit == (2,) and set(ahead_relaxed.preempt) == {0, 1}  # with slack, QoE gain decides


def test_andes_resumes_a_preempted_stream_before_its_buffer_drains() -> None:
    fast = Slo(reading_rate=20.0)
    draining = seq(0, fast, Phase.PREEMPTED, generated=100, first_token_s=0.0, arrived_s=0.0, unread=5)
    others = [seq(i, fast, Phase.DECODING, generated=10, first_token_s=9.0, arrived_s=8.0) for i in (1, 2)]
    plan = create_step_scheduler("andes", resume_margin_s=0.5).schedule(view(draining, *others, batch=2))
    assert 0 in plan.decode  # 5 unread < 20 tok/s · 0.5 s: it must run now
    relaxed = dataclasses.replace(draining, unread=50)
    plan = create_step_scheduler("andes", resume_margin_s=0.5).schedule(view(relaxed, *others, batch=2))
    assert 0 not in plan.decode


def test_andes_preempts_only_a_reader_with_seconds_of_slack() -> None:
    # Three decoding streams, room for two, a newcomer waiting. One reader holds 2 s of reading
    # (above the resume margin, below preempt_slack_s = 4 s): preempting it would buy a pause of
    # 1.5 s for its one allowed preemption, and it keeps its slot; the reader with 6 s of
    # reading is the one preempted.
    fast = Slo(reading_rate=20.0)
    some = seq(0, fast, Phase.DECODING, generated=200, first_token_s=0.0, arrived_s=0.0, unread=40)
    plenty = seq(1, fast, Phase.DECODING, generated=300, first_token_s=0.0, arrived_s=0.0, unread=120)
    short = seq(2, fast, Phase.DECODING, generated=10, first_token_s=9.5, arrived_s=9.0, unread=2)
    fresh = seq(3, fast, Phase.WAITING, arrived_s=9.9)
    scheduler = create_step_scheduler("andes", resume_margin_s=0.5, preempt_slack_s=4.0)
    plan = scheduler.schedule(view(some, plenty, short, fresh, batch=2))
    assert set(plan.decode) == {0, 2} and plan.preempt == (1,)
    # With the slack threshold at the resume margin (the paper's greedy order alone), the
    # 2-second reader is preempted too, for the newcomer.
    eager = create_step_scheduler("andes", resume_margin_s=0.5, preempt_slack_s=0.5)
    assert 0 in eager.schedule(view(some, plenty, short, fresh, batch=2)).preempt
    # A preempted stream resumes only below the resume margin: the gap between the two is what
    # keeps a stream from being preempted and resumed step after step.
    paused = dataclasses.replace(plenty, phase=Phase.PREEMPTED, unread=40)
    assert 1 not in scheduler.schedule(view(some, paused, short, fresh, batch=2)).decode


def test_andes_refuses_a_slack_threshold_below_its_resume_margin() -> None:
    with pytest.raises(ValueError, match="preempt_slack_s"):
        create_step_scheduler("andes", resume_margin_s=1.0, preempt_slack_s=0.5)


# ----- all schedulers in a simulated engine ------------------------------------------------------


@dataclasses.dataclass
class Sim:
    """A batched engine in virtual time: a step takes the profile's latency; a decode adds one
    token; a finished prefill yields the first token."""

    seqs: dict[int, SequenceView]
    kv_capacity: int
    max_batch: int
    now: float = 0.0
    finished: dict[int, float] = dataclasses.field(default_factory=dict)
    rejected: set[int] = dataclasses.field(default_factory=set)
    tokens_at: dict[int, list[float]] = dataclasses.field(default_factory=dict)
    preemptions: dict[int, int] = dataclasses.field(default_factory=dict)

    def view(self) -> StepView:
        live = [s for s in self.seqs.values() if s.arrived_s <= self.now]
        return StepView(self.now, tuple(live), self.kv_capacity, PROFILE, self.max_batch, 64)

    def apply(self, plan: StepPlan, v: StepView) -> None:
        live = {s.id for s in v.sequences}
        assert len(plan.decode) <= self.max_batch
        assert set(plan.decode) <= live and set(plan.admit) <= live
        for i, _ in plan.reject:
            self.rejected.add(i)
            del self.seqs[i]
        for i in plan.admit:
            assert self.seqs[i].phase == Phase.WAITING
            self.seqs[i] = dataclasses.replace(self.seqs[i], phase=Phase.PREFILLING)
        for i in plan.preempt:
            s = self.seqs[i]
            assert s.phase == Phase.DECODING and i not in plan.decode
            self.seqs[i] = dataclasses.replace(s, phase=Phase.PREEMPTED, preemptions=s.preemptions + 1)
            self.preemptions[i] = s.preemptions + 1
        self.now += PROFILE.step(len(plan.decode), plan.prefill[1] if plan.prefill else 0) if not plan.idle else 0.001
        if plan.prefill is not None:
            i, n = plan.prefill
            s = self.seqs[i]
            assert s.phase == Phase.PREFILLING and 0 < n <= 64
            prefilled = min(s.prefill_tokens, s.prefilled + n)
            self.seqs[i] = s = dataclasses.replace(s, prefilled=prefilled, kv_tokens=prefilled)
            if prefilled == s.prefill_tokens:
                self._token(dataclasses.replace(s, phase=Phase.DECODING, first_token_s=self.now))
        for i in plan.decode:
            s = self.seqs[i]
            assert s.phase in (Phase.DECODING, Phase.PREEMPTED), s
            self._token(dataclasses.replace(s, phase=Phase.DECODING))
        assert sum(s.kv_tokens for s in self.seqs.values()) <= self.kv_capacity

    def _token(self, s: SequenceView) -> None:
        """``s`` produced a token: it goes on, or it is finished (and gone)."""
        s = dataclasses.replace(s, generated=s.generated + 1, max_new_tokens=s.max_new_tokens - 1, kv_tokens=s.kv_tokens + 1)
        self.tokens_at.setdefault(s.id, []).append(self.now)
        if s.max_new_tokens == 0:
            self.finished[s.id] = self.now
            del self.seqs[s.id]
        else:
            self.seqs[s.id] = s


workloads = st.lists(
    st.tuples(st.floats(0, 2), st.integers(1, 300), st.integers(1, 40), st.sampled_from([CONTROL, CHAT, Slo(reading_rate=5.0)])),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["fcfs", "fastserve", "slice", "andes"]), work=workloads, batch=st.integers(1, 6))
def test_every_scheduler_finishes_or_answers_every_request(name: str, work: list, batch: int) -> None:  # type: ignore[type-arg]
    scheduler = create_step_scheduler(name)
    sim = Sim(
        {i: SequenceView(i, slo, a, Phase.WAITING, prefill_tokens=p, max_new_tokens=m) for i, (a, p, m, slo) in enumerate(work)},
        kv_capacity=2048,
        max_batch=batch,
    )
    for _ in range(20_000):
        if not sim.seqs:
            break
        v = sim.view()
        plan = scheduler.schedule(v)
        if not v.sequences:
            sim.now = min(s.arrived_s for s in sim.seqs.values())
            continue
        if isinstance(scheduler, AndesScheduler):  # a preemption only ever spends seconds of slack
            by_id = {s.id: s for s in v.sequences}
            for i in plan.preempt:
                s = by_id[i]
                assert scheduler.buffer(s, v.now_s) >= s.slo.reading_rate * scheduler.preempt_slack_s
        sim.apply(plan, v)
    # Nothing starves: every request finished, or was rejected (SLICE: infeasible alone) —
    # none is left waiting forever.
    assert not sim.seqs, {i: s.phase for i, s in sim.seqs.items()}
    assert set(sim.finished) | sim.rejected == set(range(len(work)))
    if name != "slice":
        assert not sim.rejected  # only SLICE refuses a rate it can never meet
    if name == "andes":
        assert max(sim.preemptions.values(), default=0) <= 1  # its bound: max_preemptions=1


@settings(max_examples=30, deadline=None)
@given(chats=st.integers(0, 12), seed=st.integers(0, 1000))
def test_slice_meets_the_control_tasks_tpot_beside_any_number_of_chats(chats: int, seed: int) -> None:
    """A control task (TPOT 50 ms, real-time) admitted first keeps its rate whatever chats come:
    SLICE defers what does not fit instead of slowing the control loop."""
    import random

    rng = random.Random(seed)
    work = {0: SequenceView(0, CONTROL, 0.0, Phase.WAITING, prefill_tokens=16, max_new_tokens=100)}
    for i in range(1, chats + 1):
        work[i] = SequenceView(i, CHAT, rng.uniform(0, 1), Phase.WAITING, prefill_tokens=rng.randint(16, 400), max_new_tokens=60)
    sim = Sim(work, kv_capacity=8192, max_batch=8)
    scheduler = create_step_scheduler("slice")
    while 0 in sim.seqs or 0 not in sim.finished:
        v = sim.view()
        sim.apply(scheduler.schedule(v), v)
    times = sim.tokens_at[0]
    mean_tpot = (times[-1] - times[0]) / (len(times) - 1)
    assert mean_tpot <= CONTROL.tpot_s * (1 + 1e-9), mean_tpot
    assert math.isfinite(mean_tpot)
